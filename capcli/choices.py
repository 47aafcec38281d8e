"""The names and sizes a model config takes, importable without torch: the CLI checks options before it loads anything."""

from capcli.errors import CapcliError

ENCODERS = ("lite0", "lite1", "lite2", "resnet50", "resnet101", "resnet152")  # plus "timm:<name>"
ATTENTIONS = ("additive", "general", "dot", "none")
RNNS = ("lstm", "gru")
# Choices of the CLI's options. Devices, precisions and runtimes are named here, not beside the code that
# handles them (runtime.devices, infer.encoding): those modules import torch. The result formats' code
# (infer.result_lines) imports none, so FORMATS could live there; it stays beside caption's other choices.
DEVICES = ("auto", "cpu", "cuda")  # plus "cuda:N", which the option help does not list
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # of training, and of the encoder on PyTorch
CAPTION_PRECISIONS = PRECISIONS + ("int8",)  # int8: the encoder on OpenVINO, CPU only
RUNTIMES = ("auto", "torch", "openvino")  # what runs the encoder when captioning; auto: OpenVINO on the CPU
# auto keeps PyTorch for fewer images than this, when their number is known: starting OpenVINO (~0.5 s
# here) costs more than its faster encoder saves (~5 ms an image; docs/precision.md, bench_caption.py)
OPENVINO_FROM_IMAGES = 64
FORMATS = ("text", "tsv", "jsonl")  # of caption/beam results
EXPORT_FORMATS = ("onnx",)  # of `capcli export`
CALIBRATION_IMAGES = 300  # `capcli quantize`'s default: NNCF's own; fewer than ~100 loses accuracy


def encoder_name_problem(name: str) -> str | None:
    """None for a name capcli can build, else why not (timm names are checked when timm builds them)."""
    if name in ENCODERS or (name.startswith("timm:") and len(name) > 5):
        return None
    return f"unknown encoder {name!r} (choose {', '.join(ENCODERS)} or timm:NAME)"


def check_names(encoder: str, attention: str, rnn: str) -> None:
    if problem := encoder_name_problem(encoder):
        raise CapcliError(problem)
    if attention not in ATTENTIONS:
        raise CapcliError(f"unknown attention {attention!r} (choose {', '.join(ATTENTIONS)})")
    if rnn not in RNNS:
        raise CapcliError(f"unknown rnn {rnn!r} (choose {', '.join(RNNS)})")


# The bounds of a model's sizes, stated once: `train` checks its options against them, and every
# model file's config is checked against them before anything is built. They admit every model worth
# training and keep a model file from making capcli allocate or compute without end (image_size
# 3000 took 3.4 GB and 53 s a caption; grid 3000 asked for 46 GB). Dropout is 0 <= p < 1.
MODEL_LIMITS = {
    "vocab_size": (4, 1_000_000),  # the four special tokens at least
    "image_size": (32, 1024),
    "grid": (0, 64),  # 0: the encoder's own grid
    "embed_dim": (1, 8192),
    "attention_dim": (1, 8192),
    "decoder_dim": (1, 8192),
}


def model_setting_problem(name: str, value: object, label: str) -> str | None:
    """None when the model setting ``name`` may be ``value``, else why not, naming it as ``label``
    (``--image-size`` for an option, ``image_size`` in a file)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number" if name == "dropout" else "a whole number"
        return f"{label} must be {kind}, not {shown(value)}"
    if name == "dropout":
        return None if 0 <= value < 1 else f"{label} {shown(value)} must be at least 0 and below 1"
    lo, hi = MODEL_LIMITS[name]
    if isinstance(value, int) and lo <= value <= hi:
        return None
    return f"{label} {shown(value)} must be a whole number from {lo} to {hi}"


def shown(value: object, width: int = 40) -> str:
    """A value from a file, as it reads in a one-line message (repr: control characters escaped), cut to ``width``."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."
