"""The training state: what a run changes as it trains besides the weights (optimizer, scaler,
counters, the best score, the history, the random generators), saved beside last.safetensors for
--resume, plain tensors and numbers only (read back with torch.load(weights_only=True))."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from capcli.errors import CapcliError
from capcli.files import atomic_write_bytes


def new_sums() -> dict:
    """An epoch's running totals: captions and seconds, and each objective's own figures (words and
    NLL for cross-entropy; samples, tokens, reward, entropy for self-critical training)."""
    return {"nll": 0.0, "words": 0, "captions": 0, "seconds": 0.0,
            "reward": 0.0, "entropy": 0.0, "tokens": 0, "reward_seconds": 0.0}


@dataclass
class TrainState:
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    phase: str = "xe"  # the objective of the next epoch: "xe" (cross-entropy) or "scst"
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps of the next epoch done
    best_score: float = float("-inf")
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best (early stop, learning-rate halving)
    epoch_sums: dict = field(default_factory=new_sums)
    history: list[dict] = field(default_factory=list)  # one record per finished epoch: metrics.jsonl, curves.png
    bad_images: dict[int, str] = field(default_factory=dict)  # unreadable images (the feature source's own dict)

    def to_dict(self, device: torch.device) -> dict:
        return {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "best_score": self.best_score, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "phase": self.phase, "epoch_sums": dict(self.epoch_sums), "history": list(self.history),
            "bad_images": {str(k): v for k, v in self.bad_images.items()},
            "rng": torch.get_rng_state(),
            # The training GPU's generator only: a resume may see fewer GPUs than the run did.
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }

    def restore(self, saved: dict, device: torch.device, cuda_rng: bool = True) -> None:
        """Take ``saved`` (to_dict's output), the optimizer's learning rates included; the optimizer
        must be the one of the saved phase."""
        self.phase = saved.get("phase", "xe")
        self.optimizer.load_state_dict(saved["optimizer"])
        restore_scaler(self.scaler, saved.get("scaler") or {})
        self.epoch, self.step_in_epoch = saved["epoch"], saved["step_in_epoch"]
        self.best_score, self.best_epoch, self.bad_epochs = saved["best_score"], saved["best_epoch"], saved["bad_epochs"]
        self.epoch_sums = {**new_sums(), **saved["epoch_sums"]}
        self.history = list(saved.get("history", []))
        self.bad_images.update({int(k): v for k, v in saved.get("bad_images", {}).items()})
        torch.set_rng_state(saved["rng"])
        if cuda_rng:
            restore_cuda_rng(saved.get("cuda_rng"), device)


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """Load a saved gradient scaler's state where both sides have one. A run saved without a
    scaler (fp32, bf16) and resumed with fp16 starts a fresh one; a disabled scaler ignores one."""
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)


def restore_cuda_rng(saved, device: torch.device) -> None:
    """Restore the training GPU's random generator. Runs saved by older capcli hold a list with
    every GPU that was visible then: the entry of this device's index is the one that trained."""
    if device.type != "cuda" or saved is None:
        return
    if isinstance(saved, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(saved):
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, device)


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
