"""The training loop: epochs of steps, each epoch validated, recorded and saved, until --epochs, an
early stop or a stop signal. Teacher-forced cross-entropy on ``Decoder.step``, then optionally
self-critical training (capcli.train.scst, ``--scst-after N``) on the same step.

The other jobs of a run live beside it: assembling it (capcli.train.setup, whose ``Run`` the
``Trainer`` extends), validation (capcli.train.validation), the plateau count and the switch to
self-critical training (capcli.train.schedule), checkpoints (capcli.train.checkpoints), and
starting or resuming it (capcli.train.launch).

Features come from a feature source (capcli.train.features): the cache of a frozen encoder (the
default: every image encoded once, an epoch only runs the decoder), the cache of its frozen lower
part when its top blocks are fine-tuned (they run at every step), or the whole encoder. The loop
does not know which.

Under torchrun (``torchrun --nproc-per-node N -m capcli train ...``) the same code trains one
model with DistributedDataParallel; see capcli.runtime.distributed and ``Trainer``. --batch-size stays
the global batch, split across the processes, and the loss is normalised by the global batch's
word count, so N processes take the same steps as one process with the same --batch-size.
"""

from __future__ import annotations

import logging
import time

import torch

from capcli.runtime import distributed
from capcli.runtime.signals import exit_code, signal_name
from capcli.text.tokenizers import DEFAULT_DECODE_LEN
from capcli.train import checkpoints, scst, validation
from capcli.train.interrupted import TrainingInterrupted, continue_command
from capcli.train.objective import Objective, StepContext
from capcli.train.schedule import halve_learning_rate, judge_epoch, start_scst
from capcli.train.setup import Run
from capcli.train.state import new_sums
from capcli.train.xe import CrossEntropy

log = logging.getLogger("capcli")


def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Dropout seed of one step of one rank under DDP: reproducible, and so resumable, without saving RNG states."""
    return (seed * 100_003 + epoch) * 1_000_003 + step * 1009 + rank


class Trainer(Run):
    """One training run; under torchrun one Trainer per process, ``ctx`` saying which.

    Distributed (see capcli.runtime.distributed): every rank builds the same global batches and takes its
    slice of each; DDP averages the gradients, so the ranks' weights stay identical. Rank 0 reads
    the run folder (vocabulary, checkpoints) and hands what it read to the others, and alone
    writes config.json, metrics.jsonl, curves.png and checkpoints and draws the progress bar;
    validation is shared out and rank 0's verdict (score, early stop, learning-rate halving) is
    broadcast.
    """

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Assemble the run (capcli.train.setup), restore its training state when resuming, then
        what the loop runs: the network (DDP-wrapped under torchrun) and the objective of each phase."""
        cfg, ctx = self.cfg, self.ctx
        self.assemble()
        if self.resume:
            checkpoints.restore_state(self)
        self.net: torch.nn.Module = self.train_net
        if ctx.enabled:
            self.net = distributed.wrap_ddp(self.train_net, self.device)
            distributed.log_batch_plan(ctx, self.device, cfg.batch_size, self.state.optimizer.param_groups[0]["lr"])
        # The objective of each phase; the loop runs whichever state.phase names.
        run = StepContext(cfg, ctx, self.net, self.model.decoder, self.source, self.device, self.decoder_precision)
        self.objectives: dict[str, Objective] = {"xe": CrossEntropy(run, self.train_set)}
        if self.reward is not None:
            max_len = min(self.vocab.max_len, DEFAULT_DECODE_LEN["word"])
            self.objectives["scst"] = scst.SelfCritical(run, self.train_set.image, self.reward, max_len)

    def validate(self) -> dict:
        """See capcli.train.validation.validate. A method, so that every validation of the loop goes
        through the Trainer (the tests stop a run in the middle of one)."""
        return validation.validate(self)

    # ---------------------------------------------------------------- loop
    def run(self) -> dict:
        """Train until --epochs, an early stop, or a stop signal. Signals are deferred to the next
        step boundary (or the end of the epoch's validation and saves): the run saves a whole
        checkpoint there and raises TrainingInterrupted. Under torchrun the ranks agree on the
        step to stop at, so the checkpoint is one they all reached."""
        cfg, ctx = self.cfg, self.ctx
        if self.state.epoch >= cfg.epochs:
            log.info("already trained %d epochs (raise --epochs to go on)", self.state.epoch)
            return checkpoints.summary(self)
        if self.state.bad_epochs >= cfg.patience:
            log.info("this run stopped early after epoch %d", self.state.epoch)
            return checkpoints.summary(self)
        self.sync_checks = 0  # steps checked by CAPCLI_DEBUG_SYNC_CHECK
        with self.stops.deferred():
            if cfg.init and not self.state.history and self.val_samples:
                self._score_start()
                self._stop_if_signalled("while scoring the --init model")
            last_save = time.time()
            while self.state.epoch < cfg.epochs:
                epoch = self.state.epoch + 1
                self._run_epoch(epoch, last_save)
                stop = self._end_epoch(epoch)  # validation and saves finish before a signal is acted on
                last_save = time.time()
                if stop or self.state.epoch >= cfg.epochs:
                    break  # the run is complete: a signal now changes nothing
                self._stop_if_signalled(f"after epoch {epoch}")
        if self.sync_checks:
            log.info("sync check: the parameters of all %d processes were identical after each of %d steps",
                     ctx.world_size, self.sync_checks)
        return checkpoints.summary(self)

    def _score_start(self) -> None:
        """Validate the --init model as epoch 0: the bar the run's epochs must beat, so that
        best.safetensors is never worse on val than the model the run started from."""
        t0 = time.time()
        val = self.validate()
        key, label = self.selection
        val = distributed.broadcast_object(self.ctx, val)
        if key not in val:
            return
        self.state.best_score, self.state.best_epoch = val[key], 0
        self.state.history.append({"epoch": 0, "phase": "init", **val, "val_seconds": time.time() - t0, "best": True})
        log.info("epoch 0 (the --init model): val loss %.3f, %s %.4f (best)", val["val_loss"], label, val[key])
        checkpoints.save(self, best=True)

    def _run_epoch(self, epoch: int, last_save: float) -> None:
        """The training steps of ``epoch`` from ``step_in_epoch`` on, saving every --save-every minutes."""
        cfg, ctx = self.cfg, self.ctx
        objective = self.objectives[self.state.phase]
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # the same global batches on every rank
        batches = objective.batches(g)  # each step takes this rank's slice
        if self.state.step_in_epoch == 0:
            torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout and sampling: reproducible per epoch
            self.state.epoch_sums = new_sums()
        self.net.train()
        self.reporter.start(f"epoch {epoch}/{cfg.epochs}", len(batches), unit="batches")
        if self.state.step_in_epoch:
            self.reporter.update(self.state.step_in_epoch)
        # Seconds of this process only: a resumed epoch's earlier steps count their own time, not
        # the hours between the stop and the resume.
        t_start, seconds_before = time.time(), self.state.epoch_sums["seconds"]
        for batch in batches[self.state.step_in_epoch:]:
            self._stop_if_signalled(f"in epoch {epoch} at step {self.state.step_in_epoch}")
            if ctx.enabled:
                torch.manual_seed(_step_seed(cfg.seed, epoch, self.state.step_in_epoch, ctx.rank))
            self._step(objective, batch)
            if distributed.sync_check_enabled():
                distributed.check_in_sync(ctx, self.model, f"epoch {epoch} step {self.state.step_in_epoch}")
                self.sync_checks += 1
            self.state.epoch_sums["seconds"] = seconds_before + time.time() - t_start
            s = self.state.epoch_sums
            self.reporter.update(1, **objective.progress(s), captions_per_s=s["captions"] / max(s["seconds"], 1e-9))
            if cfg.save_every and time.time() - last_save > 60 * cfg.save_every:
                checkpoints.save(self)
                last_save = time.time()
        self.reporter.stop()

    def _step(self, objective: Objective, batch: list[int]) -> None:
        """One optimizer step of ``objective`` on global batch ``batch``."""
        loss, figures = objective.step(batch)
        self.state.optimizer.zero_grad(set_to_none=True)
        self.state.scaler.scale(loss).backward()  # under DDP: the gradient all-reduce
        self._update(figures)

    def _update(self, totals: dict) -> None:
        """The optimizer step after backward; counts the step and adds ``totals`` to the epoch's sums.

        A stop signal is acted on between steps (see run), never inside one, so the weights, the
        optimizer and the step count of a saved checkpoint always agree.
        """
        cfg = self.cfg
        if cfg.grad_clip:
            self.state.scaler.unscale_(self.state.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.state.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        self.state.scaler.step(self.state.optimizer)
        self.state.scaler.update()
        self.state.step_in_epoch += 1
        for k, v in totals.items():
            self.state.epoch_sums[k] += v

    def _end_epoch(self, epoch: int) -> bool:
        """After the epoch's steps: validate, record the epoch, apply the verdict (best epoch,
        learning-rate halving, the switch to self-critical training) and save; True: stop early."""
        cfg, s = self.cfg, self.state.epoch_sums
        t0 = time.time()
        val = self.validate()
        if self.source.finds_bad_images and self.ctx.enabled:  # each rank found its own unreadable images
            for bad in distributed.all_gather_object(self.ctx, self.source.bad):
                self.source.bad.update(bad)
        phase = self.state.phase
        train, fallback, progress = self.objectives[phase].summary(s)  # fallback: the score without val images
        key, label = self.selection
        score = val.get(key, fallback)
        # Rank 0's numbers decide for all: the same best model, learning-rate halving and early stop everywhere.
        val, score = distributed.broadcast_object(self.ctx, (val, score))
        improved, halve, stop, switch = judge_epoch(self.state, cfg, epoch, score)
        record = {
            "epoch": epoch, "phase": phase, **train, **val,
            "lr": self.state.optimizer.param_groups[0]["lr"], "train_seconds": s["seconds"],
            "val_seconds": time.time() - t0, "captions_per_s": s["captions"] / max(s["seconds"], 1e-9),
            "best": improved,
        }
        if halve:
            halve_learning_rate(self.state.optimizer)
        self.state.epoch, self.state.step_in_epoch = epoch, 0
        self.state.history.append(record)
        log.info(
            "epoch %d: %s, val loss %s, %s %s%s, %.0f captions/s%s",
            epoch, progress, f"{val['val_loss']:.3f}" if val else "-", label, f"{val[key]:.4f}" if val else "-",
            " (best)" if improved else "", record["captions_per_s"],
            f"; learning rate halved to {self.state.optimizer.param_groups[0]['lr']:.3g}" if halve else "",
        )
        if switch:
            if stop and epoch < cfg.scst_after:
                log.info("cross-entropy stopped improving: no better %s for %d epochs", label, cfg.patience)
            stop = False
            start_scst(self, epoch, from_best=not improved)
        checkpoints.save(self, best=improved)
        if len(self.source.bad) > self.bad_reported:
            self.bad_reported = len(self.source.bad)
            n = len(self.train_samples) + len(self.val_samples)
            again = continue_command(self.ctx, self.run_dir)
            self.check_bad(self.source.bad, n, saved=f"; epoch {epoch} is saved: continue with {again}")
        if stop:
            log.info("early stop: no better %s for %d epochs (best %.4f at epoch %d)", label, cfg.patience, self.state.best_score, self.state.best_epoch)
        return stop

    def _stop_if_signalled(self, where: str) -> None:
        """At a boundary: if a stop signal came (to any rank, under torchrun), save and raise
        TrainingInterrupted, on every rank at the same step."""
        signum = self.stops.received or 0
        if self.ctx.enabled:  # one small all-reduce per step: the ranks stop at the same step
            signum = int(distributed.all_reduce_max(self.ctx, torch.tensor([signum], device=self.device))[0])
        if not signum:
            return
        self.reporter.stop()
        checkpoints.save(self)  # rank 0; a second signal while it runs is only noted
        if not self.ctx.is_main:
            raise TrainingInterrupted(f"interrupted by {signal_name(signum)} (rank {self.ctx.rank}; rank 0 saved the "
                                      f"checkpoint)", exit_code(signum))
        raise TrainingInterrupted(f"interrupted {where} by {signal_name(signum)}; saved {self.run_dir / 'last.safetensors'}; "
                                  f"continue with: {continue_command(self.ctx, self.run_dir)}", exit_code(signum))
