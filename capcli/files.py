"""Generic file I/O: atomic writes, and reading tensors and JSON. Imports nothing of capcli.

Problems a user can fix come out as ``FileProblem("PATH: reason")``; capcli's modules turn it
into their one error type.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable


class FileProblem(Exception):
    """A file that cannot be used; the message is ``PATH: reason``, one line."""


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, because the umask is
    # process-wide: a file another thread created between the two calls would get mode 0666.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new, never half.

    The file's data is synced before the rename and the folder after it, so after a power loss
    the path holds the old file or the whole new one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from None
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, read-only: about the file being written, not its temporary name
        Path(tmp).unlink(missing_ok=True)
        raise _naming(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _naming(e: OSError, path: Path) -> OSError:
    """The same error (its errno and subclass), about ``path``."""
    return OSError(e.errno, e.strerror or str(e), str(path)) if e.errno is not None else e


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def parse_json(text: str | bytes, where: str) -> object:
    """``json.loads`` for JSON from a user's file: anything wrong is ``FileProblem("WHERE: invalid
    JSON (reason)")``, one line. ``where`` names the file, and the line for JSON Lines.

    Beyond bad syntax that covers what json.loads lets through or crashes on: nesting deeper
    than the parser's recursion (RecursionError), an integer with more digits than Python
    converts (ValueError), and a number like 1e999999 that is too large for a float (it would
    come back as inf).
    """
    try:
        return json.loads(text, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        at = f" at line {e.lineno}" if e.lineno > 1 else ""
        raise FileProblem(f"{where}: invalid JSON ({e.msg}{at})") from None
    except RecursionError:
        raise FileProblem(f"{where}: invalid JSON (nested too deeply)") from None
    except UnicodeDecodeError:  # bytes given that are not UTF-8 (nor UTF-16/32)
        raise FileProblem(f"{where}: not UTF-8 text") from None
    except ValueError:  # an integer of thousands of digits, or _finite_float's refusal
        raise FileProblem(f"{where}: invalid JSON (a number too large)") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number too large: {text[:20]}")
    return value


def read_json(path: str | Path, what: str = "JSON") -> object:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileProblem(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FileProblem(f"{path}: is a directory, expected {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FileProblem(f"{path}: cannot read {what} ({e.__class__.__name__}: {first_line(e)})") from None
    return parse_json(text, str(path))


def read_state_dict(path: str | Path) -> dict:
    """Tensors from a .safetensors file, or from a .pt/.pth via torch.load(weights_only=True)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileProblem(f"{path}: no such file")
    try:
        if is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FileProblem(f"{path}: cannot read weights ({e.__class__.__name__}: {first_line(e)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FileProblem(f"{path}: not a file of named tensors")
    return state


def safetensors_header(path: str | Path) -> tuple[dict, int, int] | None:
    """(header, header length, file size) when ``path`` parses as a safetensors file, else None.

    A safetensors file starts with its JSON header's length (u64, little-endian), then the header,
    a JSON object. OSError (missing, unreadable) is left to the caller.
    """
    import struct

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > size - 8 or n > 100_000_000:
            return None
        raw = f.read(n)
    if raw[:1] != b"{":
        return None
    try:
        header = parse_json(raw, str(path))
    except FileProblem:  # not JSON, or JSON that no safetensors writer makes (nested deep, huge numbers)
        return None
    return (header, n, size) if isinstance(header, dict) else None


def is_safetensors(path: str | Path) -> bool:
    try:
        return safetensors_header(path) is not None
    except OSError:
        return False


def first_line(e: BaseException) -> str:
    """An exception's message, its first line only: messages stay one line."""
    return str(e).splitlines()[0] if str(e) else ""


def cache_dir() -> Path:
    """capcli's cache folder: $CAPCLI_CACHE_DIR, else $XDG_CACHE_HOME/capcli, else ~/.cache/capcli.
    Everything in it can be deleted; capcli rebuilds what it needs."""
    if folder := os.environ.get("CAPCLI_CACHE_DIR"):
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "capcli"
