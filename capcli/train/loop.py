"""Training: the loop, validation, checkpoints, resume. Teacher-forced cross-entropy on ``Decoder.step``,
then optionally self-critical training (capcli.train.scst, ``--scst-after N``) on the same step.

Features come from a feature source (capcli.train.features): the cache of a frozen encoder (the
default: every image encoded once, an epoch only runs the decoder) or the encoder itself when it
is fine-tuned. The loop does not know which.

Under torchrun (``torchrun --nproc-per-node N -m capcli train ...``) the same code trains one
model with DistributedDataParallel; see capcli.runtime.distributed and ``Trainer``. --batch-size stays
the global batch, split across the processes, and the loss is normalised by the global batch's
word count, so N processes take the same steps as one process with the same --batch-size.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import fields
from pathlib import Path

import torch

from capcli.data.datasets import Sample, load_dataset, split_counts
from capcli.data.splits import parse_split_ratios
from capcli.errors import CapcliError
from capcli.files import FileProblem, atomic_write, atomic_write_bytes, read_json
from capcli.infer.decode import DecodeOptions, decode
from capcli.metrics.cider import CiderD
from capcli.metrics.validation import (
    CIDER_SELECTION,
    METRIC_LABELS,
    SELECTION,
    validation_scores,
)
from capcli.model import files as model_files
from capcli.model.caption_model import CaptionModel
from capcli.model.config import ModelConfig
from capcli.progress import Reporter
from capcli.runtime import distributed
from capcli.runtime.devices import (
    autocast,
    decoder_precision,
    encoder_batch,
    precision_note,
    resolve_precision,
)
from capcli.runtime.distributed import SINGLE, DistContext
from capcli.runtime.signals import StopSignals, exit_code, signal_name, stop_signal
from capcli.text.tokenizers import DEFAULT_DECODE_LEN
from capcli.text.vocab import Vocab
from capcli.train import scst
from capcli.train import state as train_state
from capcli.train.config import RESUMABLE, TrainConfig
from capcli.train.curves import save_curves
from capcli.train.feature_cache import build_feature_cache, cache_key
from capcli.train.features import (
    CachedFeatures,
    CaptionSet,
    EncodedImages,
    length_bucketed_batches,
)
from capcli.train.losses import caption_loss
from capcli.train.objective import Objective, StepContext, TrainNet
from capcli.train.state import TrainState, new_sums
from capcli.train.xe import CrossEntropy, collate, teacher_forced

log = logging.getLogger("capcli")



class TrainingInterrupted(Exception):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP): a checkpoint was saved (or the features cached so far
    kept); the CLI exits with ``exit_code``, 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The model settings of a run: TrainConfig's fields of the same names (encoder, sizes, dropout...)."""
    shared = {f.name for f in fields(ModelConfig)} & {f.name for f in fields(TrainConfig)}
    return ModelConfig(vocab_size=vocab_size, **{name: getattr(cfg, name) for name in shared})


# Model settings a run started with --init takes from the model file (--dropout may still be given:
# it changes no weight).
INIT_FIXED = ("encoder", "image_size", "grid", "attention", "rnn", "embed_dim", "attention_dim", "decoder_dim")


def init_settings(cfg: TrainConfig, loaded: model_files.LoadedModel, explicit: set[str] | None = None) -> dict:
    """The settings of a run started from the model ``loaded`` (``--init``): its model settings and
    tokenizer, and its dropout unless --dropout is given. ``explicit``: the options given on the
    command line (None: those that differ from TrainConfig's defaults); one of them that contradicts
    the file, or any option about building a vocabulary or encoder weights, is a CapcliError."""
    if explicit is None:
        default = TrainConfig()
        explicit = {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != getattr(default, f.name)}
    for name in ("vocab", "min_freq", "encoder_weights"):
        if getattr(cfg, name) is not None:
            raise CapcliError(f"--{name.replace('_', '-')} cannot be given with --init: the model file {cfg.init} "
                              f"brings its own vocabulary and encoder weights")
    mcfg = loaded.model.cfg
    settings = {name: getattr(mcfg, name) for name in INIT_FIXED}
    settings["tokenizer"] = loaded.vocab.tokenizer
    if "dropout" not in explicit:
        settings["dropout"] = mcfg.dropout
    for name, value in settings.items():
        if name in explicit and getattr(cfg, name) != value:
            option = "--" + name.replace("_", "-")
            raise CapcliError(f"{option} {getattr(cfg, name)} contradicts --init {cfg.init} (a model with {option} "
                              f"{value}); leave {option} out to take the model's")
    return settings


def plateau_step(improved: bool, bad_epochs: int, lr_patience: int, patience: int) -> tuple[int, bool, bool]:
    """After an epoch: (bad epochs since the best, halve the learning rate now?, stop now?).

    One count decides both: the rate halves after every ``lr_patience`` epochs without a better
    score, and training stops after ``patience`` of them.
    """
    bad_epochs = 0 if improved else bad_epochs + 1
    halve = not improved and lr_patience > 0 and bad_epochs % lr_patience == 0
    return bad_epochs, halve, bad_epochs >= patience


def _reason(e: OSError) -> str:
    """An OSError's reason in capcli's words: "read-only file system", "no space left on device"."""
    text = e.strerror or str(e) or e.__class__.__name__
    return text[:1].lower() + text[1:]


def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Dropout seed of one step of one rank under DDP: reproducible, and so resumable, without saving RNG states."""
    return (seed * 100_003 + epoch) * 1_000_003 + step * 1009 + rank


# =========================================================================== the run

class Trainer:
    """One training run; under torchrun one Trainer per process, ``ctx`` saying which.

    Distributed (see capcli.runtime.distributed): every rank builds the same global batches and takes its
    slice of each; DDP averages the gradients, so the ranks' weights stay identical. Rank 0 reads
    the run folder (vocabulary, checkpoints) and hands what it read to the others, and alone
    writes config.json, metrics.jsonl, curves.png and checkpoints and draws the progress bar;
    validation is shared out and rank 0's verdict (score, early stop, learning-rate halving) is
    broadcast.
    """

    def __init__(self, cfg: TrainConfig, reporter: Reporter | None = None, resume: bool = False,
                 ctx: DistContext = SINGLE, explicit: set[str] | None = None):
        self.cfg, self.ctx = cfg, ctx
        self.explicit = explicit  # the options given on the command line (for --init's checks)
        self.reporter = (reporter or Reporter()) if ctx.is_main else Reporter()
        self.run_dir = Path(cfg.output)
        self.resume = resume
        self.device = distributed.training_device(ctx, cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)  # the encoder's
        self.decoder_precision = decoder_precision(self.precision, self.device)
        self.sync_checks = 0  # steps checked by CAPCLI_DEBUG_SYNC_CHECK
        # Stop signals raise at once while setting up (the feature cache keeps what it has) and are
        # deferred to the next step boundary while training (see run); entered by train()/resume().
        self.stops = StopSignals()

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        cfg.validate()
        torch.manual_seed(cfg.seed)
        self.init_model: model_files.LoadedModel | None = None  # --init's model, on rank 0 until its weights are in
        if cfg.init and not self.resume:
            def read_init() -> dict:
                self.init_model = model_files.load_model(cfg.init)
                return init_settings(cfg, self.init_model, self.explicit)

            for name, value in distributed.on_main(ctx, read_init).items():
                setattr(cfg, name, value)
            cfg.validate()  # e.g. --scst-after with a char model
        # The data first: a run that cannot start leaves no run folder behind.
        dataset = load_dataset(cfg.data, captions_file=cfg.captions, images_dir=cfg.images,
                               split_ratios=parse_split_ratios(cfg.split) if cfg.split else None)
        samples, self.split_source = dataset.samples, dataset.split_source
        if split_counts(samples)["train"] == 0:
            raise CapcliError(f"{cfg.data or cfg.captions}: the train split is empty")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # every rank: the feature cache lives here
        except OSError as e:
            raise CapcliError(f"{self.run_dir}: cannot create the run folder ({_reason(e)})") from None
        log.info("%s", precision_note(cfg.precision, self.precision, self.device))
        cfg.precision = self.precision  # the run's config records what ran
        if ctx.is_main:
            atomic_write_bytes(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1).encode())
        self.vocab = distributed.on_main(ctx, lambda: self._vocabulary(samples))

        self.model = CaptionModel(model_config(cfg, len(self.vocab)))

        def load_weights() -> str:
            if self.resume:
                loaded = model_files.load_model(self.run_dir / "last.safetensors")
            elif cfg.init:
                loaded, self.init_model = self.init_model, None
            else:
                return self.model.encoder.load_pretrained(cfg.encoder_weights)
            self.model.load_state_dict(loaded.model.state_dict())
            return loaded.metadata["encoder_weights"]

        # Rank 0 loads, the others receive: other machines need neither the run folder nor the weights file.
        self.weights_source = distributed.on_main(ctx, load_weights)
        self.model.encoder.set_fine_tune(cfg.fine_tune_encoder)
        self.model.to(self.device)
        distributed.broadcast_module(ctx, self.model)

        self.train_samples = [s for s in samples if s.split == "train"]
        self.val_samples = [s for s in samples if s.split == "val"]
        if not self.val_samples:
            log.warning("no validation images: the best model is chosen by training loss")
        paths = [s.image_path for s in self.train_samples + self.val_samples]
        if cfg.fine_tune_encoder:
            self.source = EncodedImages(self.model.encoder, paths, self.model.cfg, self.device, cfg.workers)
        else:
            try:
                self.source = CachedFeatures(self._build_cache(paths), self.device)
            except KeyboardInterrupt as e:
                signum = stop_signal(e)
                raise TrainingInterrupted(f"interrupted by {signal_name(signum)} while caching features; the images "
                                          f"cached so far are kept; continue with: {self._again()}",
                                          exit_code(signum)) from None
        self.bad_reported = len(self.source.bad)  # unreadable images warned about so far
        self.train_set = self._encode_captions(self.train_samples, 0)
        self.val_set = self._encode_captions(self.val_samples, len(self.train_samples))

        # The phase of the next epoch: "xe" (cross-entropy) or "scst"; see _end_epoch for the switch.
        phase = "scst" if cfg.scst_after == 0 else "xe"  # see _end_epoch for the switch
        self.state = TrainState(self._new_optimizer(phase), torch.amp.GradScaler("cuda", enabled=self.decoder_precision == "fp16"),
                                phase=phase, bad_images=self.source.bad)
        self.reward = self._reward() if cfg.scst_after is not None else None
        if cfg.scst_after is not None and cfg.scst_after >= cfg.epochs:
            log.warning("--scst-after %d: no self-critical epoch within --epochs %d", cfg.scst_after, cfg.epochs)
        elif cfg.scst_after == 0 and not cfg.init and not self.resume:
            log.warning("self-critical training from untrained weights rarely learns: start from a cross-entropy "
                        "model with --init, or give --scst-after N > 0")

        if self.resume:
            self._restore_state()

        self.train_net = TrainNet(self.model)
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

    def _new_optimizer(self, phase: str) -> torch.optim.Optimizer:
        """AdamW over the decoder (and the fine-tuned encoder blocks), at the learning rates of ``phase``."""
        cfg = self.cfg
        lr, encoder_lr = cfg.lr, cfg.encoder_lr
        if phase == "scst":  # the encoder's rate keeps its ratio to the decoder's
            lr, encoder_lr = cfg.scst_lr, (cfg.encoder_lr * cfg.scst_lr / cfg.lr if cfg.lr else cfg.scst_lr)
        groups = [{"params": list(self.model.decoder.parameters()), "lr": lr}]
        encoder_params = [p for p in self.model.encoder.parameters() if p.requires_grad]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": encoder_lr})
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    @property
    def selection(self) -> tuple[str, str]:
        """(record key, label) of the score that picks the best epoch: val CIDEr in both phases of a
        run with self-critical training (one scale from start to end), else the tokenizer's."""
        key = CIDER_SELECTION if self.cfg.scst_after is not None else SELECTION[self.vocab.tokenizer]
        return key, METRIC_LABELS[key]

    def _reward(self) -> scst.CiderReward:
        """The SCST reward: CIDEr-D with document frequencies of the train split's references only."""
        captions = [list(s.captions) for s in self.train_samples]
        df, images = distributed.on_main(self.ctx, lambda: scst.train_document_frequencies(self.run_dir, captions))
        log.info("CIDEr-D reward: document frequencies of %d n-grams from the references of the %d train images",
                 len(df), images)
        return scst.CiderReward(CiderD(df, images), self.vocab.words, lambda row: self.train_samples[row].captions)

    def _again(self) -> str:
        """The command that continues this run."""
        if self.ctx.enabled:
            return f"torchrun --nproc-per-node {self.ctx.local_world_size} ... -m capcli train --resume {self.run_dir}"
        return f"capcli train --resume {self.run_dir}"

    def _vocabulary(self, samples: list[Sample]) -> Vocab:
        cfg, path = self.cfg, self.run_dir / "vocab.json"
        if self.resume:
            return Vocab.load(path)
        if cfg.vocab or cfg.init:
            vocab = self.init_model.vocab if cfg.init else Vocab.load(cfg.vocab)
            if vocab.tokenizer != cfg.tokenizer:
                raise CapcliError(f"{cfg.vocab}: a {vocab.tokenizer} vocabulary, but --tokenizer is {cfg.tokenizer}")
            if cfg.max_len is not None and cfg.max_len != vocab.max_len:
                log.info("longest caption: %d tokens (--max-len), not the vocabulary's %d", cfg.max_len, vocab.max_len)
                vocab.max_len = cfg.max_len
        else:
            vocab = Vocab.build((c for s in samples if s.split == "train" for c in s.captions), cfg.min_freq, cfg.max_len,
                                cfg.tokenizer)
            log.info("vocabulary: %d %s tokens (min count %d, train split only)", len(vocab), vocab.tokenizer, vocab.min_freq)
        vocab.save(path)
        return vocab

    def _build_cache(self, paths: list[Path]):
        mcfg = self.model.cfg
        with torch.no_grad():
            probe = self.model.encoder(torch.zeros(1, 3, mcfg.image_size, mcfg.image_size, device=self.device))  # (1, L, D)
        shape = (len(paths), probe.size(1), probe.size(2))
        key = cache_key(mcfg, self.weights_source, self.precision, paths)
        cache = build_feature_cache(self.ctx, self.run_dir, key, shape, self.model.encoder, paths, mcfg, self.device,
                                    self.precision, self.reporter, self.cfg.workers, encoder_batch(self.device, self.precision))
        self._check_bad(cache.bad, len(paths))
        if cache.bad:
            log.warning("skipping %d unreadable image%s (first: %s)", len(cache.bad), "s" * (len(cache.bad) != 1),
                        next(iter(cache.bad.values())))
        return cache

    def _check_bad(self, bad: dict[int, str], n_images: int, saved: str = "") -> None:
        fraction = len(bad) / max(n_images, 1)
        if fraction > self.cfg.max_bad_fraction:
            raise CapcliError(
                f"{len(bad)} of {n_images} images cannot be read ({fraction:.1%}, more than the allowed "
                f"{self.cfg.max_bad_fraction:.1%}; see --max-bad-fraction); first: {next(iter(bad.values()))}{saved}",
                exit_code=1)

    def _encode_captions(self, samples: list[Sample], offset: int) -> CaptionSet:
        out, too_long = CaptionSet(), 0
        for i, s in enumerate(samples):
            if offset + i in self.source.bad:
                continue
            for c in s.captions:
                ids = self.vocab.encode(c)
                if len(ids) - 2 > self.vocab.max_len:
                    too_long += 1
                    continue
                if len(ids) > 2:
                    out.image.append(offset + i)
                    out.tokens.append(ids)
        if too_long:
            log.info("left out %d captions longer than %d tokens", too_long, self.vocab.max_len)
        return out

    # ---------------------------------------------------------------- state
    def _read_state(self) -> dict:
        meta = model_files.read_metadata(self.run_dir / "last.safetensors")
        cid = model_files.training_record(meta).get("checkpoint_id")
        return train_state.load_train_state(self.run_dir / f"last.state-{cid}.pt")

    def _restore_state(self) -> None:
        saved = distributed.on_main(self.ctx, self._read_state)  # rank 0 reads, every rank restores
        self.state.restore(saved, self.device, cuda_rng=not self.ctx.enabled)  # under DDP dropout is seeded per step
        state = self.state
        where = f"epoch {state.epoch + 1}, step {state.step_in_epoch}" if state.step_in_epoch else f"after epoch {state.epoch}"
        log.info("resuming %s (%s)", self.run_dir, where)

    def _summary(self, **extra) -> dict:
        summary = {
            "data": self.cfg.data or self.cfg.captions, "split": self.cfg.split, "split_source": self.split_source,
            "epochs": self.state.epoch, "best_epoch": self.state.best_epoch,
            "selection": self.selection[0],
            self.selection[0]: None if self.state.best_score == float("-inf") else self.state.best_score,
            "train_images": len(self.train_samples), "train_captions": len(self.train_set),
            "lr": self.cfg.lr, "batch_size": self.cfg.batch_size, "seed": self.cfg.seed, "precision": self.precision,
            "options": {k: v for k, v in self.cfg.to_dict().items() if k not in ("output", "data", "captions", "images")},
            **extra,
        }
        if self.ctx.enabled:
            summary["processes"] = self.ctx.world_size
        return summary

    def save(self, best: bool = False) -> None:
        """best.safetensors (when ``best``), then the training state, then last.safetensors, then
        metrics.jsonl and curves.png; each write atomic. Rank 0 only.

        The state file is named after a checkpoint id stored in last's metadata and is written
        before it: a crash between two writes leaves the previous pair intact. best comes first, so
        a crash before last is written replays the epoch, which writes best again. metrics.jsonl is
        rewritten from the history kept in the state, so a replayed epoch is logged once.
        """
        if not self.ctx.is_main:
            return
        try:
            self._write_checkpoint(best)
        except OSError as e:  # a full disk, a quota, a folder made read-only: the previous checkpoint is whole
            where = f": {e.filename}" if e.filename else ""
            raise CapcliError(f"{_reason(e)}{where}; the previous checkpoint is kept: make room and continue with: "
                              f"{self._again()}", exit_code=1) from None

    def _write_checkpoint(self, best: bool) -> None:
        summary = self._summary()
        if best:
            model_files.save_model(self.run_dir / "best.safetensors", self.model, self.vocab,
                                  encoder_weights=self.weights_source, training=summary)
        cid = f"{self.state.epoch}-{self.state.step_in_epoch}-{int(time.time() * 1000)}"
        state_path = self.run_dir / f"last.state-{cid}.pt"
        train_state.save_train_state(state_path, self.state.to_dict(self.device))
        try:
            model_files.save_model(self.run_dir / "last.safetensors", self.model, self.vocab,
                                  encoder_weights=self.weights_source, training={**summary, "checkpoint_id": cid})
        except BaseException:
            state_path.unlink(missing_ok=True)  # no last.safetensors names it
            raise
        for old in self.run_dir.glob("last.state-*.pt"):
            if old != state_path:
                old.unlink(missing_ok=True)
        atomic_write_bytes(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.state.history).encode())
        save_curves(self.run_dir / "curves.png", self.state.history, self.selection[0] if self.val_samples else "train_loss",
                    write=atomic_write)

    # ---------------------------------------------------------------- loop
    def run(self) -> dict:
        """Train until --epochs, an early stop, or a stop signal. Signals are deferred to the next
        step boundary (or the end of the epoch's validation and saves): the run saves a whole
        checkpoint there and raises TrainingInterrupted. Under torchrun the ranks agree on the
        step to stop at, so the checkpoint is one they all reached."""
        cfg, ctx = self.cfg, self.ctx
        if self.state.epoch >= cfg.epochs:
            log.info("already trained %d epochs (raise --epochs to go on)", self.state.epoch)
            return self._summary()
        if self.state.bad_epochs >= cfg.patience:
            log.info("this run stopped early after epoch %d", self.state.epoch)
            return self._summary()
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
        return self._summary()

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
                self.save()
                last_save = time.time()
        self.reporter.stop()

    def _stop_if_signalled(self, where: str) -> None:
        """At a boundary: if a stop signal came (to any rank, under torchrun), save and raise
        TrainingInterrupted, on every rank at the same step."""
        signum = self.stops.received or 0
        if self.ctx.enabled:  # one small all-reduce per step: the ranks stop at the same step
            signum = int(distributed.all_reduce_max(self.ctx, torch.tensor([signum], device=self.device))[0])
        if not signum:
            return
        self.reporter.stop()
        self.save()  # rank 0; a second signal while it runs is only noted
        if not self.ctx.is_main:
            raise TrainingInterrupted(f"interrupted by {signal_name(signum)} (rank {self.ctx.rank}; rank 0 saved the "
                                      f"checkpoint)", exit_code(signum))
        raise TrainingInterrupted(f"interrupted {where} by {signal_name(signum)}; saved {self.run_dir / 'last.safetensors'}; "
                                  f"continue with: {self._again()}", exit_code(signum))

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

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation loss (teacher forced) and the scores of real greedy (or --val-beam) outputs, no
        teacher forcing (BLEU-4 for words, and CIDEr with self-critical training; exact match and
        edit similarity for characters and SMILES).

        Under DDP the ranks share the batches out (whole batches, so each is computed as a single
        process would) and rank 0 scores the gathered captions; the other ranks return {}.
        """
        ctx, captions = self.ctx, self.val_set
        self.model.eval()
        if not len(captions):
            return {}
        nll_sum = words = 0
        batches = length_bucketed_batches([len(t) for t in captions.tokens], 256, torch.Generator().manual_seed(0))
        for batch in batches[ctx.rank::ctx.world_size]:
            inputs = self.source.load(sorted({captions.image[i] for i in batch}))
            batch = [i for i in batch if captions.image[i] in inputs.usable]
            if not batch:
                continue
            padded, lengths, order = collate([captions.tokens[i] for i in batch], self.device)
            with autocast(self.device, self.decoder_precision):
                x, rows = inputs.for_captions([captions.image[batch[i]] for i in order])
                (logits, alphas), _ = self.train_net(x, rows, teacher_forced(padded, lengths))
                _, nll, n = caption_loss(logits, alphas, padded, lengths)
            nll_sum, words = nll_sum + float(nll), words + n
        images = sorted(set(captions.image))
        samples = self.train_samples + self.val_samples
        candidates = {}
        chunks = [images[k:k + 128] for k in range(0, len(images), 128)]
        # The captions `capcli evaluate` would write: the same longest output, so val scores what it scores.
        options = DecodeOptions(beam_size=self.cfg.val_beam, max_len=DEFAULT_DECODE_LEN[self.vocab.tokenizer])
        for chunk in chunks[ctx.rank::ctx.world_size]:
            with autocast(self.device, self.decoder_precision):
                features, ok = self.source.features(chunk)  # (n, L, D) of the readable images
                usable = [i for i, good in zip(chunk, ok) if good]
                hyps = decode(self.model.decoder, features, options) if usable else []  # beam 1: greedy
            candidates.update({str(i): self.vocab.decode(h[0].tokens) for i, h in zip(usable, hyps)})
        if ctx.enabled:
            parts = distributed.all_gather_object(ctx, (nll_sum, words, candidates))
            if not ctx.is_main:
                return {}
            nll_sum, words = sum(p[0] for p in parts), sum(p[1] for p in parts)
            candidates = {k: v for p in parts for k, v in p[2].items()}
        if not candidates:
            return {}
        references = {k: list(samples[int(k)].captions) for k in candidates}
        return {"val_loss": nll_sum / max(words, 1), "val_ppl": math.exp(min(nll_sum / max(words, 1), 50)),
                **validation_scores(references, candidates, self.vocab.tokenizer, cider=self.cfg.scst_after is not None)}

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
        self.save(best=True)

    def _end_epoch(self, epoch: int) -> bool:
        cfg, s = self.cfg, self.state.epoch_sums
        t0 = time.time()
        val = self.validate()
        if self.source.fine_tunes_encoder and self.ctx.enabled:  # each rank found its own unreadable images
            for bad in distributed.all_gather_object(self.ctx, self.source.bad):
                self.source.bad.update(bad)
        phase = self.state.phase
        train, fallback, progress = self.objectives[phase].summary(s)  # fallback: the score without val images
        key, label = self.selection
        score = val.get(key, fallback)
        # Rank 0's numbers decide for all: the same best model, learning-rate halving and early stop everywhere.
        val, score = distributed.broadcast_object(self.ctx, (val, score))
        improved = score > self.state.best_score
        if improved:
            self.state.best_score, self.state.best_epoch = score, epoch
        self.state.bad_epochs, halve, stop = plateau_step(improved, self.state.bad_epochs, cfg.lr_patience, cfg.patience)
        record = {
            "epoch": epoch, "phase": phase, **train, **val,
            "lr": self.state.optimizer.param_groups[0]["lr"], "train_seconds": s["seconds"],
            "val_seconds": time.time() - t0, "captions_per_s": s["captions"] / max(s["seconds"], 1e-9),
            "best": improved,
        }
        # The cross-entropy phase ends after --scst-after epochs, or earlier when it stops improving.
        switch = phase == "xe" and cfg.scst_after is not None and (epoch >= cfg.scst_after or stop)
        if halve and not switch:
            for group in self.state.optimizer.param_groups:
                group["lr"] *= 0.5
        self.state.epoch, self.state.step_in_epoch = epoch, 0
        self.state.history.append(record)
        log.info(
            "epoch %d: %s, val loss %s, %s %s%s, %.0f captions/s%s",
            epoch, progress, f"{val['val_loss']:.3f}" if val else "-", label, f"{val[key]:.4f}" if val else "-",
            " (best)" if improved else "", record["captions_per_s"],
            f"; learning rate halved to {self.state.optimizer.param_groups[0]['lr']:.3g}" if halve and not switch else "",
        )
        if switch:
            if stop and epoch < cfg.scst_after:
                log.info("cross-entropy stopped improving: no better %s for %d epochs", label, cfg.patience)
            stop = False
            self._start_scst(epoch, from_best=not improved)
        self.save(best=improved)
        if len(self.source.bad) > self.bad_reported:
            self.bad_reported = len(self.source.bad)
            n = len(self.train_samples) + len(self.val_samples)
            self._check_bad(self.source.bad, n, saved=f"; epoch {epoch} is saved: continue with {self._again()}")
            log.warning("skipping %d unreadable image%s (first: %s)", len(self.source.bad),
                        "s" * (len(self.source.bad) != 1), next(iter(self.source.bad.values())))
        if stop:
            log.info("early stop: no better %s for %d epochs (best %.4f at epoch %d)", label, cfg.patience, self.state.best_score, self.state.best_epoch)
        return stop

    def _start_scst(self, epoch: int, from_best: bool) -> None:
        """Switch to self-critical training: from the best cross-entropy weights (by val CIDEr), with
        a fresh optimizer at --scst-lr and a fresh count of epochs without gain. Called before the
        epoch's save, so that a resumed run continues from exactly this state."""
        if from_best:  # the best epoch is an earlier one: its weights are in best.safetensors
            def best_weights() -> None:
                self.model.load_state_dict(model_files.load_model(self.run_dir / "best.safetensors").model.state_dict())

            distributed.on_main(self.ctx, best_weights)
            distributed.broadcast_module(self.ctx, self.model)
        self.state.phase, self.state.bad_epochs = "scst", 0
        self.state.optimizer = self._new_optimizer("scst")
        log.info("self-critical training from epoch %d on (%d samples per image, baseline: %s), starting from the "
                 "weights of epoch %d (%s %.4f), learning rate %g", epoch + 1, self.cfg.scst_samples,
                 self.cfg.scst_baseline, self.state.best_epoch, self.selection[1], self.state.best_score, self.cfg.scst_lr)


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
    """A new run. ``explicit``: the settings given on the command line (see init_settings)."""
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
