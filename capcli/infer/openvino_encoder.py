"""A model's encoder on OpenVINO, for the CPU: fp32 (PyTorch's numbers, about three times faster
here) or int8.

Encoders are known by their content: the key hashes the weights, the input size, the grid and the
model's domain (photos or drawings, which calibrate int8 differently), so every model trained with
the frozen default encoder shares one converted encoder and one int8 encoder. A converted fp32
encoder is cached in capcli's cache folder the first time it is used (conversion takes seconds,
loading the cached one a fraction of that); int8 encoders come from the shipped weights/encoders/
or from `capcli quantize`, which writes into the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from capcli.errors import CapcliError
from capcli.files import cache_dir, fsync_dir
from capcli.infer.shipped import weights_dirs
from capcli.model.caption_model import CaptionModel

log = logging.getLogger("capcli")

IMAGES_PER_CALL = 8  # OpenVINO's CPU plugin is near its best from 4-8 images a call (bench/bench_caption.py)


def import_openvino(why: str):
    try:
        import openvino
    except ImportError:
        raise CapcliError(f"{why} needs OpenVINO, which is not installed: pip install openvino "
                          f"(or --runtime torch)") from None
    return openvino


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def domain(tokenizer: str) -> str:
    """The images a model reads, as int8 calibration needs to know: SMILES models read drawings."""
    return "drawings" if tokenizer == "smiles" else "photos"


def encoder_key(model: CaptionModel, tokenizer: str) -> str:
    """A name for the encoder from its content: two models with the same encoder weights, input
    size, grid and domain share it, whatever they are called."""
    digest = hashlib.sha256(f"{model.cfg.encoder}|{model.cfg.image_size}|{model.cfg.grid}|{domain(tokenizer)}".encode())
    for name, tensor in sorted(model.encoder.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"|{name}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes())
    return f"{model.cfg.encoder.replace(':', '-')}-{model.cfg.image_size}-{digest.hexdigest()[:16]}"


def encoder_folders() -> list[Path]:
    """Where encoders are looked for, first match wins: the cache, then the shipped weights."""
    return [cache_dir() / "encoders", *(folder / "encoders" for folder in weights_dirs())]


def find_encoder(key: str, precision: str) -> Path | None:
    for folder in encoder_folders():
        if (path := folder / f"{key}-{precision}.xml").is_file() and path.with_suffix(".bin").is_file():
            return path
    return None


def convert(model: CaptionModel):
    """The model's encoder as an OpenVINO model, (N, 3, S, S) -> (N, L, D) for any N."""
    ov = import_openvino("the OpenVINO encoder")
    size = model.cfg.image_size
    encoder = model.encoder.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic in 'SAME' padding
        return ov.convert_model(encoder, example_input=torch.zeros(1, 3, size, size), input=[(-1, 3, size, size)])


def save(ov_model, xml_path: Path) -> None:
    """Write an OpenVINO model as XML_PATH and its .bin, each whole or not at all: the .bin is put
    in place before the .xml, whose presence says the pair is complete."""
    ov = import_openvino("saving an OpenVINO model")
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=xml_path.parent) as tmp:
        tmp_xml = Path(tmp) / xml_path.name
        ov.save_model(ov_model, tmp_xml, compress_to_fp16=False)
        for suffix in (".bin", ".xml"):
            with open(tmp_xml.with_suffix(suffix), "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_xml.with_suffix(suffix), xml_path.with_suffix(suffix))
    fsync_dir(xml_path.parent)


class OpenVinoEncoder:
    """Compiled for this CPU; called like the PyTorch encoder: (N, 3, S, S) -> (N, L, D)."""

    runtime = "openvino"

    def __init__(self, xml_or_model, model: CaptionModel, precision: str, source: str):
        ov = import_openvino(f"--precision {precision}" if precision == "int8" else "the OpenVINO encoder")
        core = ov.Core()
        ov_model = core.read_model(xml_or_model) if isinstance(xml_or_model, Path) else xml_or_model
        self._check_shapes(ov_model, model, source)
        self.precision, self.source = precision, source
        # int8: the layers left in floating point run in f32, also where OpenVINO would pick bf16 (AMX)
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),  # as many as PyTorch: torchrun, OMP_NUM_THREADS
        }
        # OpenVINO keeps the compiled model too (keyed by the model, the CPU and this config; a damaged
        # file is compiled again), so a cold start loads it instead of compiling: ~0.1-0.2 s here
        compiled_cache = cache_dir() / "compiled"
        try:
            compiled_cache.mkdir(parents=True, exist_ok=True)
            self.compiled = core.compile_model(ov_model, "CPU", {**config, "CACHE_DIR": str(compiled_cache)})
        except (OSError, RuntimeError) as e:
            log.debug("compiling without OpenVINO's model cache in %s (%s)", compiled_cache, e)
            self.compiled = core.compile_model(ov_model, "CPU", config)

    @staticmethod
    def _check_shapes(ov_model, model: CaptionModel, source: str) -> None:
        size, dim = model.cfg.image_size, model.cfg.feature_dim
        shape_in, shape_out = ov_model.input(0).get_partial_shape(), ov_model.output(0).get_partial_shape()
        fits = (len(ov_model.inputs) == 1 and shape_in.rank.get_length() == 4
                and [d.get_length() for d in list(shape_in)[1:]] == [3, size, size]
                and shape_out.rank.get_length() == 3 and shape_out[2].get_length() == dim)
        if not fits:
            raise CapcliError(f"{source}: this encoder does not fit the model (input {shape_in}, output "
                              f"{shape_out}; the model needs (N, 3, {size}, {size}) -> (N, L, {dim}))")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for k in range(0, images.size(0), IMAGES_PER_CALL):
            chunk = images[k:k + IMAGES_PER_CALL].float().contiguous().numpy()  # (c, 3, S, S)
            out.append(torch.from_numpy(self.compiled(chunk)[0].copy()))  # (c, L, D)
        return torch.cat(out)  # (N, L, D)


def fp32_encoder(model: CaptionModel, key: str, precision: str = "fp32") -> OpenVinoEncoder:
    """The floating-point encoder (fp32, or bf16 on CPUs that have it), converted once and cached;
    where the cache cannot be written, converted in memory every time (a warning says so)."""
    path = cache_dir() / "encoders" / f"{key}-fp32.xml"
    if path.is_file() and path.with_suffix(".bin").is_file():
        try:
            return OpenVinoEncoder(path, model, precision, str(path))
        except Exception as e:  # a damaged cache file: rebuilt below
            log.warning("%s: cannot be read (%s); converting the encoder again", path, str(e).strip().splitlines()[0])
    log.debug("converting the encoder for OpenVINO (once for this encoder; cached in %s)", path.parent)
    ov_model = convert(model)
    try:
        save(ov_model, path)
    except OSError as e:
        log.warning("cannot cache the OpenVINO encoder in %s (%s): it will be converted again next time",
                    path.parent, e.strerror or e)
        return OpenVinoEncoder(ov_model, model, precision, "converted encoder")
    # compiled from the file, as every later run compiles it, so OpenVINO's compiled cache serves them
    return OpenVinoEncoder(path, model, precision, str(path))


def int8_encoder(model: CaptionModel, key: str, model_name: str) -> OpenVinoEncoder:
    path = find_encoder(key, "int8")
    if path is None:
        raise CapcliError(f"{model_name}: no int8 encoder for this model yet; make one with: "
                          f"capcli quantize {model_name} --calibration IMAGE_DIR")
    try:
        return OpenVinoEncoder(path, model, "int8", str(path))
    except CapcliError:
        raise
    except Exception as e:
        raise CapcliError(f"{path}: cannot be read as an OpenVINO model ({str(e).strip().splitlines()[0]})") from None
