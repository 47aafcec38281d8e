"""A run's checkpoints: best.safetensors, last.safetensors and the training state beside it,
metrics.jsonl and curves.png, written in an order a crash cannot break, and read back on --resume;
the run's summary, which each model file carries."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from capcli.errors import CapcliError
from capcli.files import atomic_write, atomic_write_bytes
from capcli.model import files as model_files
from capcli.runtime import distributed
from capcli.train import state as train_state
from capcli.train.curves import save_curves
from capcli.train.interrupted import continue_command
from capcli.train.setup import Run, os_reason

log = logging.getLogger("capcli")


def summary(run: Run, **extra) -> dict:
    """What the run is and reached: its data and options, the epochs done, the best epoch and score."""
    cfg, state = run.cfg, run.state
    key = run.selection[0]
    summary = {
        "data": cfg.data or cfg.captions, "split": cfg.split, "split_source": run.split_source,
        "epochs": state.epoch, "best_epoch": state.best_epoch,
        "selection": key,
        key: None if state.best_score == float("-inf") else state.best_score,
        "train_images": len(run.train_samples), "train_captions": len(run.train_set),
        "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed, "precision": run.precision,
        "fine_tune_blocks": cfg.fine_tune_blocks,  # the encoder's top blocks trained (0: frozen)
        "options": {k: v for k, v in cfg.to_dict().items() if k not in ("output", "data", "captions", "images")},
        **extra,
    }
    if run.ctx.enabled:
        summary["processes"] = run.ctx.world_size
    return summary


def save(run: Run, best: bool = False) -> None:
    """best.safetensors (when ``best``), then the training state, then last.safetensors, then
    metrics.jsonl and curves.png; each write atomic. Rank 0 only.

    The state file is named after a checkpoint id stored in last's metadata and is written
    before it: a crash between two writes leaves the previous pair intact. best comes first, so
    a crash before last is written replays the epoch, which writes best again. metrics.jsonl is
    rewritten from the history kept in the state, so a replayed epoch is logged once.
    """
    if not run.ctx.is_main:
        return
    try:
        _write_checkpoint(run, best)
    except OSError as e:  # a full disk, a quota, a folder made read-only: the previous checkpoint is whole
        where = f": {e.filename}" if e.filename else ""
        raise CapcliError(f"{os_reason(e)}{where}; the previous checkpoint is kept: make room and continue with: "
                          f"{continue_command(run.ctx, run.run_dir)}", exit_code=1) from None


def _write_checkpoint(run: Run, best: bool) -> None:
    run_dir, state = run.run_dir, run.state
    training = summary(run)
    if best:
        model_files.save_model(run_dir / "best.safetensors", run.model, run.vocab,
                              encoder_weights=run.weights_source, training=training)
    cid = f"{state.epoch}-{state.step_in_epoch}-{int(time.time() * 1000)}"
    state_path = _state_path(run_dir, cid)
    train_state.save_train_state(state_path, state.to_dict(run.device))
    try:
        model_files.save_model(run_dir / "last.safetensors", run.model, run.vocab,
                              encoder_weights=run.weights_source, training={**training, "checkpoint_id": cid})
    except BaseException:
        state_path.unlink(missing_ok=True)  # no last.safetensors names it
        raise
    for old in run_dir.glob("last.state-*.pt"):
        if old != state_path:
            old.unlink(missing_ok=True)
    atomic_write_bytes(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.history).encode())
    save_curves(run_dir / "curves.png", state.history, run.selection[0] if run.val_samples else "train_loss",
                write=atomic_write)


def _state_path(run_dir: Path, checkpoint_id: str) -> Path:
    """The training state that belongs to the last.safetensors whose metadata holds ``checkpoint_id``."""
    return run_dir / f"last.state-{checkpoint_id}.pt"


def read_state(run_dir: Path) -> dict:
    """The saved training state of the run's last.safetensors."""
    meta = model_files.read_metadata(run_dir / "last.safetensors")
    cid = model_files.training_record(meta).get("checkpoint_id")
    return train_state.load_train_state(_state_path(run_dir, cid))


def restore_state(run: Run) -> None:
    """--resume: put the saved training state into ``run.state``; rank 0 reads, every rank restores."""
    saved = distributed.on_main(run.ctx, lambda: read_state(run.run_dir))
    run.state.restore(saved, run.device, cuda_rng=not run.ctx.enabled)  # under DDP dropout is seeded per step
    state = run.state
    where = f"epoch {state.epoch + 1}, step {state.step_in_epoch}" if state.step_in_epoch else f"after epoch {state.epoch}"
    log.info("resuming %s (%s)", run.run_dir, where)
