"""Model files: one safetensors file holding the weights, and in its metadata the config, the
vocabulary and how the model was trained. Checked whole before anything is allocated."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch.overrides import TorchFunctionMode

from capcli.choices import shown
from capcli.errors import CapcliError
from capcli.files import FileProblem, atomic_write_bytes, first_line, parse_json, safetensors_header
from capcli.model.caption_model import CaptionModel
from capcli.model.config import ModelConfig
from capcli.text.vocab import Vocab



FORMAT = "capcli-model"
FORMAT_VERSION = "1"


def save_model(path, model, vocab, *, encoder_weights: str, training: dict | None = None, dtype=None) -> None:
    """Write weights + everything ``caption`` needs (config, vocabulary, provenance) as one .safetensors."""
    from safetensors.torch import save

    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    vocab_json = {"words": vocab.words, "min_freq": vocab.min_freq, "max_len": vocab.max_len, "tokenizer": vocab.tokenizer}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.cfg.to_dict()),
        "vocab": json.dumps(vocab_json, ensure_ascii=False),
        "encoder_weights": encoder_weights,
        "training": json.dumps(training or {}),
        "torch_version": torch.__version__,
    }
    # Serialised in memory, then written by Python: a full disk is then an OSError naming the file
    # (safetensors' own writer reports it as a SafetensorError).
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


class LoadedModel:
    def __init__(self, model, vocab, metadata: dict):
        self.model, self.vocab, self.metadata = model, vocab, metadata

    @property
    def training(self) -> dict:
        return training_record(self.metadata)


def training_record(metadata: dict) -> dict:
    """How the model was trained ({} when the record is missing or damaged: the model itself still works).

    The entries capcli reads back (`evaluate` the split, `--resume` the checkpoint id) must be text or null.
    """
    try:
        training = parse_json(metadata.get("training") or "{}", "training")
    except FileProblem:
        return {}
    if not isinstance(training, dict) or any(not isinstance(training.get(k), (str, type(None))) for k in _TRAINING_TEXT):
        return {}
    return training


_TRAINING_TEXT = ("split", "split_source", "checkpoint_id")


# safetensors' dtype names -> (bytes per element, kind); a weight may be stored in any dtype of its kind
_DTYPES = {"BOOL": (1, "bool"), "U8": (1, "int"), "I8": (1, "int"), "F8_E4M3": (1, "float"), "F8_E5M2": (1, "float"),
           "I16": (2, "int"), "U16": (2, "int"), "F16": (2, "float"), "BF16": (2, "float"), "I32": (4, "int"),
           "U32": (4, "int"), "F32": (4, "float"), "I64": (8, "int"), "U64": (8, "int"), "F64": (8, "float")}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a capcli model file, after checking that it is one (no tensors read)."""
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """(metadata, {tensor name: (dtype, shape)}) of a capcli model file whose header is whole and
    fits the file's size; no tensor is read.

    The file is parsed as safetensors first; only a file that is not one is looked at again, to
    say what it is instead (a pickle is never unpickled). A safetensors file starts with its
    header length, so its first byte may be anything, 0x80 included.
    """
    path = Path(path)
    if path.is_dir():
        raise CapcliError(f"{path}: is a directory, expected a .safetensors model file")
    try:
        parsed = safetensors_header(path)
        if parsed is None:
            raise CapcliError(f"{path}: {_not_safetensors_reason(path)}")
    except FileNotFoundError:
        raise CapcliError(f"{path}: no such file") from None
    except PermissionError:
        raise CapcliError(f"{path}: permission denied") from None
    except OSError as e:
        raise CapcliError(f"{path}: cannot read ({e.strerror or e.__class__.__name__})") from None
    header, n, size = parsed
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CapcliError(f"{path}: a safetensors file, but not a capcli model (no capcli metadata)")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        version = version if isinstance(version, str) and version.isprintable() and len(version) < 20 else shown(version)
        raise CapcliError(f"{path}: capcli model format {version} is not supported by this capcli (needs {FORMAT_VERSION})")
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)):
            raise CapcliError(f"{path}: corrupt model file (a tensor entry of the header lacks its data offsets)")
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if not (isinstance(dtype, str) and dtype in _DTYPES and isinstance(shape, list) and all(_is_count(x) for x in shape)):
            raise CapcliError(f"{path}: corrupt model file (the header entry of {shown(name, 100)} has no valid dtype and shape)")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPES[dtype][0]:
            raise CapcliError(f"{path}: corrupt model file (the header entry of {shown(name, 100)}: its data offsets do not fit its shape)")
        tensors[name], end = (dtype, tuple(shape)), max(end, offsets[1])
    if 8 + n + end > size:
        raise CapcliError(f"{path}: truncated model file ({size} bytes, expected {8 + n + end})")
    return metadata, tensors


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _not_safetensors_reason(path: Path) -> str:
    """Why a file that does not parse as safetensors is refused, worded from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip archive, or a bare pickle
        return ("is a pickled PyTorch file; capcli only loads .safetensors model files "
                "and never unpickles (convert it with the tool that made it)")
    if len(head) < 8:
        return "not a capcli model (empty or truncated file)"
    return "not a capcli model (not a safetensors file, or truncated)"


class _SkipInitOnMeta(TorchFunctionMode):
    """Random initialisation of meta tensors does nothing: skip it. Done all the same, it imports
    torch's Python decompositions (900 modules with sympy: 1.5 s and 150 MB for Embedding's normal_)."""

    FILLS = {"normal_", "uniform_", "kaiming_uniform_", "constant_", "erfinv_", "exponential_", "bernoulli_",
             "random_", "log_normal_", "geometric_", "cauchy_"}  # torch.nn.init's and Tensor's in-place fills

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in self.FILLS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def _meta_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The state_dict ``cfg`` implies, on the meta device: shapes and dtypes, no memory."""
    with torch.device("meta"), _SkipInitOnMeta():
        return CaptionModel(cfg).state_dict()


class ModelFile(NamedTuple):
    """What a model file holds besides its tensors, checked by ``inspect_model``."""
    cfg: ModelConfig
    vocab: Vocab
    metadata: dict[str, str]


def inspect_model(path: str | Path) -> ModelFile:
    """Every check of ``load_model`` that needs no tensor: one-line CapcliErrors, and nothing
    allocated on the file's word.

    The config's sizes are checked against choices.MODEL_LIMITS; the model is built on the meta
    device (shapes and dtypes, no memory) and every tensor's shape and kind compared with the
    header, whose entries already fit the file's size; the vocabulary is built last, once its
    size is known to fit the weights.
    """
    path = Path(path)
    metadata, header = _read_header(path)
    config = _metadata_json(path, metadata, "config")
    if not isinstance(config, dict):
        raise CapcliError(f"{path}: damaged capcli metadata (config is not a JSON object)")
    try:
        cfg = ModelConfig.from_dict(config)
        expected = _meta_state_dict(cfg)
    except CapcliError as e:  # a size out of bounds, an encoder this capcli does not know
        raise CapcliError(f"{path}: {e.message}") from None
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a timm model that cannot be built so
        raise CapcliError(f"{path}: damaged capcli metadata (config: {e.__class__.__name__}: {first_line(e)})") from None
    missing = [name for name in expected if name not in header]
    unexpected = [name for name in header if name not in expected]
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {shown(unexpected[0])}"
        raise CapcliError(f"{path}: weights do not match the model config ({detail}, {len(missing)} missing, {len(unexpected)} unexpected)")
    for name, t in expected.items():
        dtype, shape = header[name]
        if shape != tuple(t.shape):
            raise CapcliError(f"{path}: weight {name} has shape {shape}, the config implies {tuple(t.shape)}")
        kind = "float" if t.is_floating_point() else "bool" if t.dtype == torch.bool else "int"
        if _DTYPES[dtype][1] != kind:
            raise CapcliError(f"{path}: weight {name} is stored as {dtype}, the model needs a {kind} type")
    data = _metadata_json(path, metadata, "vocab")
    words = data.get("words") if isinstance(data, dict) else None
    if isinstance(words, list) and len(words) != cfg.vocab_size:  # before a vocabulary of any size is built
        raise CapcliError(f"{path}: vocabulary has {len(words)} words but the model expects {cfg.vocab_size}")
    return ModelFile(cfg, Vocab.from_json(data, f"{path}: vocabulary"), metadata)


def _metadata_json(path: Path, metadata: dict, key: str) -> object:
    text = metadata.get(key)
    if not isinstance(text, str):
        raise CapcliError(f"{path}: damaged capcli metadata (no {key})")
    try:
        return parse_json(text, key)
    except FileProblem as e:
        raise CapcliError(f"{path}: damaged capcli metadata ({e})") from None


# The settings two configs must share to be one model: the weights' sizes and names, and the dropout.
_SAME_MODEL = ("encoder", "image_size", "grid", "attention", "rnn", "embed_dim", "attention_dim", "decoder_dim", "dropout")


def check_same_model(path: Path, cfg: ModelConfig, vocab: Vocab, config_source: Path, vocab_source: Path) -> None:
    """Refuse a config or vocabulary that is not the model file's own: a run folder's config.json or
    vocab.json changed after its last.safetensors was saved. Checked before a model is built from
    them, which would fail or allocate what they ask."""
    saved = inspect_model(path)
    if vocab.words != saved.vocab.words or vocab.tokenizer != saved.vocab.tokenizer:
        raise CapcliError(f"{vocab_source}: not the vocabulary of {path}; was it changed?")
    for name in _SAME_MODEL:
        ours, theirs = getattr(cfg, name), getattr(saved.cfg, name)
        if ours != theirs:
            raise CapcliError(f"{config_source}: {name} is {shown(ours)}, but {path} has {shown(theirs)}; was it changed?")


def load_model(path: str | Path, device: str = "cpu", *, encoder: str | None = None) -> LoadedModel:
    """Load and validate a capcli model file; every problem becomes a one-line CapcliError.

    Tensors are read, and the model built, only after ``inspect_model`` found that they fit.
    """
    path = Path(path)
    cfg, vocab, metadata = inspect_model(path)
    if encoder is not None and encoder != cfg.encoder:
        raise CapcliError(f"{path}: this model was built for the {cfg.encoder} encoder, not {encoder}")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CapcliError(f"{path}: corrupt model file ({first_line(e) or e.__class__.__name__})") from None
    model = CaptionModel(cfg)
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
    model.eval()
    return LoadedModel(model.to(torch.device(device)), vocab, metadata)
