"""Starting training: ``train()`` a new run, ``resume()`` a stopped one, each in the process group
torchrun describes (``torchrun --nproc-per-node N -m capcli train ...``) or alone."""

from __future__ import annotations

import logging
from pathlib import Path

from capcli.errors import CapcliError
from capcli.files import FileProblem, read_json
from capcli.model import files as model_files
from capcli.progress import Reporter
from capcli.runtime import distributed
from capcli.runtime.distributed import DistContext
from capcli.text.vocab import Vocab
from capcli.train.config import RESUMABLE, TrainConfig
from capcli.train.interrupted import TrainingInterrupted
from capcli.train.loop import Trainer
from capcli.train.setup import model_config

log = logging.getLogger("capcli")


def _distributed(fn, run_dir: Path | None = None):
    """Run ``fn(ctx)`` in the process group torchrun describes (or alone); a collective that fails
    because another process died or hung becomes a one-line error instead of a traceback or a hang."""
    ctx = distributed.setup()
    try:
        result = fn(ctx)
    except Exception as e:
        if ctx.enabled and not isinstance(e, (CapcliError, TrainingInterrupted)) and distributed.is_failure(e):
            raise distributed.DistributedError(distributed.failure_message(ctx, e, run_dir)) from None
        raise
    distributed.cleanup(ctx)
    return result


def train(cfg: TrainConfig, reporter: Reporter | None = None, explicit: set[str] | None = None) -> dict:
    """A new run. ``explicit``: the settings given on the command line (see capcli.train.setup.init_settings)."""
    cfg.validate()

    def run(ctx: DistContext) -> dict:
        trainer = Trainer(cfg, reporter, ctx=ctx, explicit=explicit)
        with trainer.stops:
            trainer.setup()
            return trainer.run()

    return _distributed(run, Path(cfg.output))


def resume(run_dir: str | Path, changes: dict | None = None, reporter: Reporter | None = None) -> dict:
    """Continue the run in ``run_dir`` with its own settings; ``changes`` may set those in RESUMABLE
    (each applied change is logged); any other setting is a CapcliError."""
    run_dir = Path(run_dir)
    changes = dict(changes or {})
    fixed = sorted(k for k in changes if k not in RESUMABLE)
    if fixed:
        names = ", ".join("--" + k.replace("_", "-") for k in fixed)
        allowed = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE)
        raise CapcliError(f"{names} cannot change when resuming {run_dir} (its settings are in config.json); "
                          f"--resume takes only {allowed}; to change the others start a new run with -o")

    def read_config() -> tuple[dict, bool]:
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise CapcliError(f"{run_dir}: not a capcli run folder (no config.json)")
        try:
            data = read_json(config_path, "run configuration")
            settings = TrainConfig.from_dict(data)
        except FileProblem as e:  # not JSON, nested too deeply, a huge number
            raise CapcliError(str(e)) from None
        except (ValueError, TypeError) as e:
            raise CapcliError(f"{config_path}: damaged run configuration ({e})") from None
        has_checkpoint = (run_dir / "last.safetensors").is_file()
        if has_checkpoint:  # config.json and vocab.json must still be last.safetensors' own (edited by hand?)
            vocab = Vocab.load(run_dir / "vocab.json")
            model_files.check_same_model(run_dir / "last.safetensors", model_config(settings, len(vocab)), vocab,
                                        config_path, run_dir / "vocab.json")
        else:
            # Stopped before its first checkpoint (while caching features): it starts over, reusing
            # the features. A run that has saved epochs and lost last.safetensors cannot continue
            # exactly, and starting over would overwrite its best model and metrics.
            saved = [name for name in ("best.safetensors", "metrics.jsonl") if (run_dir / name).exists()]
            if saved:
                raise CapcliError(f"{run_dir / 'last.safetensors'}: missing, but the run has saved epochs "
                                  f"({' and '.join(saved)}): it cannot resume; start a new run with -o "
                                  f"(or --init {run_dir / 'best.safetensors'} to start from its best model)")
        return data, has_checkpoint

    def run(ctx: DistContext) -> dict:
        data, has_checkpoint = distributed.on_main(ctx, read_config)  # the run folder may be on rank 0's disk only
        cfg = TrainConfig.from_dict(data)
        for k, v in changes.items():
            if getattr(cfg, k) != v:
                log.info("resume: --%s %s (the run had %s)", k.replace("_", "-"), v, getattr(cfg, k))
                setattr(cfg, k, v)
        cfg.output = str(run_dir)
        # Stopped before the first checkpoint (e.g. while caching features): start over with the
        # same settings; the features cached so far are reused.
        trainer = Trainer(cfg, reporter, resume=has_checkpoint, ctx=ctx)
        with trainer.stops:
            trainer.setup()
            return trainer.run()

    return _distributed(run, run_dir)
