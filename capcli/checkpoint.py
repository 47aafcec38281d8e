"""Model files (one safetensors file: weights + config + vocabulary + provenance) and training state."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from capcli.errors import CapcliError
from capcli.files import atomic_write, safetensors_header
from capcli.model import CaptionModel, ModelConfig
from capcli.vocab import Vocab


# --------------------------------------------------------------------------- model files

FORMAT = "capcli-model"
FORMAT_VERSION = "1"


def save_model(path, model, vocab, *, encoder_weights: str, training: dict | None = None, dtype=None) -> None:
    """Write weights + everything ``caption`` needs (config, vocabulary, provenance) as one .safetensors."""
    from safetensors.torch import save_file

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
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


class LoadedModel:
    def __init__(self, model, vocab, metadata: dict):
        self.model, self.vocab, self.metadata = model, vocab, metadata

    @property
    def training(self) -> dict:
        try:
            training = json.loads(self.metadata.get("training") or "{}")
        except ValueError:
            return {}  # the record of how it was trained is damaged; the model itself still works
        return training if isinstance(training, dict) else {}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a capcli model file, after checking that it is one (no tensors read).

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
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CapcliError(f"{path}: capcli model format {metadata.get('format_version')} is not supported by this capcli (needs {FORMAT_VERSION})")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        raise CapcliError(f"{path}: corrupt model file (a tensor entry of the header lacks its data offsets)") from None
    if 8 + n + end > size:
        raise CapcliError(f"{path}: truncated model file ({size} bytes, expected {8 + n + end})")
    return metadata


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


def load_model(path: str | Path, device: str = "cpu", *, encoder: str | None = None) -> LoadedModel:
    """Load and validate a capcli model file; every problem becomes a one-line CapcliError."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        config = json.loads(metadata["config"])
        if not isinstance(config, dict):
            raise TypeError("'config' is not a JSON object")
        cfg = ModelConfig.from_dict(config)
        vocab = Vocab.from_json(json.loads(metadata["vocab"]), f"{path}: vocabulary")
    except CapcliError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CapcliError(f"{path}: damaged capcli metadata ({e.__class__.__name__}: {_first_line(e)})") from None
    if len(vocab) != cfg.vocab_size:
        raise CapcliError(f"{path}: vocabulary has {len(vocab)} words but the model expects {cfg.vocab_size}")
    if encoder is not None and encoder != cfg.encoder:
        raise CapcliError(f"{path}: this model was built for the {cfg.encoder} encoder, not {encoder}")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CapcliError(f"{path}: corrupt model file ({_first_line(e) or e.__class__.__name__})") from None
    try:
        model = CaptionModel(cfg)
    except CapcliError as e:  # e.g. an encoder name this capcli does not know
        raise CapcliError(f"{path}: {e.message}") from None
    except (TypeError, ValueError, RuntimeError) as e:  # a config value of the wrong type or range
        raise CapcliError(f"{path}: damaged capcli metadata (config: {e.__class__.__name__}: {_first_line(e)})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CapcliError(f"{path}: weights do not match the model config ({detail}, {len(missing)} missing, {len(unexpected)} unexpected)")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise CapcliError(f"{path}: weight {name} has shape {tuple(t.shape)}, the config implies {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    model.eval()
    return LoadedModel(model.to(torch.device(device)), vocab, metadata)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


# --------------------------------------------------------------------------- training state

def save_train_state(path: Path, state: dict) -> None:
    """Optimizer, scheduler, counters and RNG for --resume: plain tensors and numbers, no objects."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_train_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CapcliError(f"{path}: no such file") from None
    except Exception as e:
        raise CapcliError(f"{path}: cannot read training state ({e.__class__.__name__})") from None
