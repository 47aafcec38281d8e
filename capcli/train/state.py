"""The training state beside last.safetensors (optimizer, scaler, counters, RNG): for --resume."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from capcli.errors import CapcliError
from capcli.files import atomic_write_bytes

def save_train_state(path: Path, state: dict) -> None:
    """Optimizer, scheduler, counters and RNG for --resume: plain tensors and numbers, no objects."""
    buffer = io.BytesIO()  # as save_model: torch.save's writer turns a full disk into "enforce fail ..."
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def load_train_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CapcliError(f"{path}: no such file") from None
    except Exception as e:
        raise CapcliError(f"{path}: cannot read training state ({e.__class__.__name__})") from None
