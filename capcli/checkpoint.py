"""Model files (safetensors + metadata), training state, and atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from capcli.errors import CapcliError


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, because the umask is
    # process-wide: a file another thread created between the two calls would get mode 0666.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(path, write)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state_dict(path: str | Path) -> dict:
    """Tensors from a .safetensors file, or from a .pt/.pth via torch.load(weights_only=True)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CapcliError(f"{path}: no such file")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except CapcliError:
        raise
    except Exception as e:
        raise CapcliError(f"{path}: cannot read weights ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CapcliError(f"{path}: not a file of named tensors")
    return state


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


# --------------------------------------------------------------------------- model files

FORMAT = "capcli-model"
FORMAT_VERSION = "1"


def save_model(path, model, vocab, *, encoder_weights: str, training: dict | None = None, dtype=None) -> None:
    """Write weights + everything ``caption`` needs (config, vocabulary, provenance) as one .safetensors."""
    import json

    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    vocab_json = {"words": vocab.words, "min_freq": vocab.min_freq, "max_len": vocab.max_len}
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
        import json

        try:
            training = json.loads(self.metadata.get("training") or "{}")
        except ValueError:
            return {}  # the record of how it was trained is damaged; the model itself still works
        return training if isinstance(training, dict) else {}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a capcli model file, after checking that it is one (no tensors read)."""
    import json
    import struct

    path = Path(path)
    if path.is_dir():
        raise CapcliError(f"{path}: is a directory, expected a .safetensors model file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
                raise CapcliError(
                    f"{path}: is a pickled PyTorch file; capcli only loads .safetensors model files "
                    f"and never unpickles (convert it with the tool that made it)"
                )
            if len(head) < 8:
                raise CapcliError(f"{path}: not a capcli model (empty or truncated file)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CapcliError(f"{path}: not a capcli model (not a safetensors file, or truncated)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CapcliError(f"{path}: no such file") from None
    except PermissionError:
        raise CapcliError(f"{path}: permission denied") from None
    except OSError as e:
        raise CapcliError(f"{path}: cannot read ({e.strerror or e.__class__.__name__})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CapcliError(f"{path}: not a capcli model (not a safetensors file, or corrupt)") from None
    if not isinstance(header, dict):
        raise CapcliError(f"{path}: not a capcli model (not a safetensors file, or corrupt)")
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


def load_model(path: str | Path, device: str = "cpu", *, encoder: str | None = None) -> LoadedModel:
    """Load and validate a capcli model file; every problem becomes a one-line CapcliError."""
    import json

    import torch

    from capcli.model import CaptionModel, ModelConfig
    from capcli.vocab import Vocab

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
        model = CaptionModel.from_config(cfg)
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
    import torch

    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_train_state(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CapcliError(f"{path}: no such file") from None
    except Exception as e:
        raise CapcliError(f"{path}: cannot read training state ({e.__class__.__name__})") from None
