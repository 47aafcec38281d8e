"""A run stopped by a signal: the exception it ends with, and the command that continues it."""

from __future__ import annotations

from pathlib import Path

from capcli.runtime.distributed import DistContext


class TrainingInterrupted(Exception):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP): a checkpoint was saved (or the features cached so far
    kept); the CLI exits with ``exit_code``, 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def continue_command(ctx: DistContext, run_dir: Path) -> str:
    """The command that continues the run in ``run_dir`` (under torchrun: with its process count)."""
    if ctx.enabled:
        return f"torchrun --nproc-per-node {ctx.local_world_size} ... -m capcli train --resume {run_dir}"
    return f"capcli train --resume {run_dir}"
