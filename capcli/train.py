"""Training: feature cache, length-bucketed batches, teacher forcing, validation, checkpoints, resume.

With a frozen encoder (the default) every image is encoded once, into an fp16 cache under the
run folder, and the encoder is off the hot path: an epoch only runs the decoder. With
``fine_tune_encoder`` batches are drawn by image, and each image's encoder output is shared by
all of its captions, so the encoder still runs once per image per epoch.

Under torchrun (``torchrun --nproc-per-node N -m capcli train ...``) the same code trains one
model with DistributedDataParallel; see capcli.distributed and ``Trainer``. --batch-size stays
the global batch, split across the processes, and the loss is normalised by the global batch's
word count, so N processes take the same steps as one process with the same --batch-size.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch

from capcli import checkpoint, distributed
from capcli.datasets import Sample, load_dataset, parse_split_ratios, split_counts
from capcli.devices import amp_enabled, autocast
from capcli.distributed import SINGLE, DistContext
from capcli.errors import CapcliError
from capcli.evaluate import score_captions
from capcli.feature_cache import build_feature_cache, cache_key
from capcli.files import atomic_write_bytes
from capcli.images import ImageError, image_batches, normalize_pixels
from capcli.model import CaptionModel, ModelConfig, caption_loss, loss_terms
from capcli.progress import Reporter
from capcli.sampling import greedy
from capcli.signals import defer_sigint, ignore_sigint
from capcli.vocab import PAD, Vocab

log = logging.getLogger("capcli")


@dataclass
class TrainConfig:
    out: str = "runs/capcli"
    # data
    data: str | None = None
    captions: str | None = None
    images: str | None = None
    split: str = "90/5/5"
    vocab: str | None = None
    min_freq: int = 5
    max_len: int = 50
    max_bad_fraction: float = 0.01  # stop when more of the images than this cannot be read
    # model
    encoder: str = "lite0"
    encoder_weights: str | None = None
    image_size: int = 224
    grid: int = 0
    attention: str = "additive"
    rnn: str = "lstm"
    embed_dim: int = 256
    attention_dim: int = 256
    decoder_dim: int = 512
    dropout: float = 0.5
    # optimisation
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    attention_reg: float = 1.0  # lambda of the doubly stochastic attention penalty
    label_smoothing: float = 0.0
    fine_tune_encoder: bool = False
    encoder_lr: float = 1e-4
    patience: int = 5  # early stop after this many epochs without a better val BLEU-4
    lr_patience: int = 2  # halve the learning rate after this many
    # running
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    save_every_minutes: float = 10.0

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size, encoder=self.encoder, image_size=self.image_size, grid=self.grid,
            attention=self.attention, rnn=self.rnn, embed_dim=self.embed_dim,
            attention_dim=self.attention_dim, decoder_dim=self.decoder_dim, dropout=self.dropout,
        )

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# Options that --resume may change; the others are fixed by the run.
RESUME_OVERRIDES = ("epochs", "patience", "device", "workers", "save_every_minutes", "max_bad_fraction")


class TrainingInterrupted(Exception):
    """Ctrl-C: a checkpoint was saved; the CLI exits 130."""


# =========================================================================== batches

@dataclass
class CaptionSet:
    """Encoded captions of one split: caption i belongs to image ``image[i]`` (a cache row)."""

    image: list[int] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of indices whose captions have (nearly) the same length, in random order.

    Sorting by length (random order within a length) keeps padding out of the batches;
    shuffling the batches keeps the epoch random.
    """
    noise = torch.rand(len(lengths), generator=generator).tolist()
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], noise[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def collate(tokens: Sequence[list[int]], device: torch.device):
    """Captions -> (padded ids (N, T+1), lengths, order): longest first, as Decoder.forward wants."""
    order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i]))
    lengths = [len(tokens[i]) for i in order]
    padded = torch.full((len(order), lengths[0]), PAD, dtype=torch.long)  # (N, T+1)
    for row, i in enumerate(order):
        padded[row, : lengths[row]] = torch.tensor(tokens[i])
    return padded.to(device, non_blocking=True), lengths, order


class _TrainNet(torch.nn.Module):
    """What DistributedDataParallel wraps: one forward from the batch's inputs to the decoder's outputs.

    Inputs are cached features (N, L, D), or with a fine-tuned encoder the batch's images
    (n_img, 3, S, S) and ``rows``, the image of each caption: the encoder then runs inside the
    forward, so DDP also averages the gradients of its unfrozen blocks.
    """

    def __init__(self, model: CaptionModel):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder

    def forward(self, x: torch.Tensor, padded: torch.Tensor, lengths: list[int], rows: torch.Tensor | None = None):
        if rows is not None:
            x = self.encoder(x)[rows]  # (N, L, D): once per image, shared by its captions
        return self.decoder(x, padded, lengths)  # (N, T, V), (N, T, L)


def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Dropout seed of one step of one rank under DDP: reproducible, and so resumable, without saving RNG states."""
    return (seed * 100_003 + epoch) * 1_000_003 + step * 1009 + rank


# =========================================================================== the run

class Trainer:
    """One training run; under torchrun one Trainer per process, ``ctx`` saying which.

    Distributed (see capcli.distributed): every rank builds the same global batches and takes its
    slice of each; DDP averages the gradients, so the ranks' weights stay identical. Rank 0 reads
    the run folder (vocabulary, checkpoints) and hands what it read to the others, and alone
    writes config.json, metrics.jsonl and checkpoints and draws the progress bar; validation is
    shared out and rank 0's verdict (score, early stop, learning-rate decay) is broadcast.
    """

    def __init__(self, cfg: TrainConfig, reporter: Reporter | None = None, resume: bool = False,
                 ctx: DistContext = SINGLE):
        self.cfg, self.ctx = cfg, ctx
        self.reporter = (reporter or Reporter()) if ctx.is_main else Reporter()
        self.run_dir = Path(cfg.out)
        self.resume = resume
        self.device = distributed.training_device(ctx, cfg.device)
        self.sync_checks = 0  # steps checked by CAPCLI_DEBUG_SYNC_CHECK

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)  # every rank: the feature cache lives here
        if ctx.is_main:
            atomic_write_bytes(self.run_dir / "config.json", json.dumps(asdict(cfg), indent=1).encode())

        samples = load_dataset(cfg.data, captions_file=cfg.captions, images_dir=cfg.images, split_ratios=parse_split_ratios(cfg.split))
        counts = split_counts(samples)
        log.info("data: %d images (train %d, val %d, test %d)", len(samples), counts["train"], counts["val"], counts["test"])
        if counts["train"] == 0:
            raise CapcliError(f"{cfg.data or cfg.captions}: the train split is empty")
        self.vocab = distributed.on_main(ctx, lambda: self._vocabulary(samples))

        mcfg = cfg.model_config(len(self.vocab))
        self.model = CaptionModel(mcfg)

        def load_weights() -> str:
            if self.resume:
                loaded = checkpoint.load_model(self.run_dir / "last.safetensors")
                self.model.load_state_dict(loaded.model.state_dict())
                return loaded.metadata["encoder_weights"]
            return self.model.encoder.load_pretrained(cfg.encoder_weights)

        # Rank 0 loads, the others receive: other machines need neither the run folder nor the weights file.
        self.weights_source = distributed.on_main(ctx, load_weights)
        self.model.encoder.set_fine_tune(cfg.fine_tune_encoder)
        self.model.to(self.device)
        distributed.broadcast_module(ctx, self.model)

        self.train_samples = [s for s in samples if s.split == "train"]
        self.val_samples = [s for s in samples if s.split == "val"]
        if not self.val_samples:
            log.warning("no validation images: the best model is chosen by training loss")
        if not cfg.fine_tune_encoder:
            self._build_cache()
        self.train_set = self._encode_captions(self.train_samples, 0)
        self.val_set = self._encode_captions(self.val_samples, len(self.train_samples))

        decoder_params = list(self.model.decoder.parameters())
        groups = [{"params": decoder_params, "lr": cfg.lr}]
        encoder_params = [p for p in self.model.encoder.parameters() if p.requires_grad]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": cfg.encoder_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="max", factor=0.5, patience=cfg.lr_patience)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and amp_enabled()
                                           and not torch.cuda.is_bf16_supported())

        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0
        self.best_score, self.best_epoch, self.bad_epochs = float("-inf"), 0, 0
        self.epoch_sums = {"nll": 0.0, "words": 0, "captions": 0, "seconds": 0.0}
        if self.resume:
            self._restore_state()

        self.net: torch.nn.Module = _TrainNet(self.model)
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            import inspect

            # BatchNorm is frozen (eval mode): no buffers to sync at every forward.
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
            self.net = DistributedDataParallel(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                               **no_sync)
            per_rank = cfg.batch_size / ctx.world_size
            log.info(
                "distributed: %d processes on %d machine(s), %s on %s; global batch %d captions "
                "(--batch-size is the global batch: %s per process); learning rate %g as given, not scaled "
                "with the number of processes: a run matches one process with the same --batch-size",
                ctx.world_size, max(1, ctx.world_size // max(ctx.local_world_size, 1)),
                distributed.backend_name(ctx, self.device), self.device.type, cfg.batch_size,
                f"{per_rank:g}" if per_rank == int(per_rank) else f"{math.floor(per_rank)}-{math.ceil(per_rank)}", cfg.lr)
            if cfg.batch_size < ctx.world_size:
                log.warning("--batch-size %d is smaller than the %d processes: some have nothing to do at each step",
                            cfg.batch_size, ctx.world_size)

    def _vocabulary(self, samples: list[Sample]) -> Vocab:
        cfg, path = self.cfg, self.run_dir / "vocab.json"
        if self.resume:
            return Vocab.load(path)
        if cfg.vocab:
            vocab = Vocab.load(cfg.vocab)
        else:
            vocab = Vocab.build((c for s in samples if s.split == "train" for c in s.captions), cfg.min_freq, cfg.max_len)
            log.info("vocabulary: %d words (min count %d, train split only)", len(vocab), cfg.min_freq)
        vocab.save(path)
        return vocab

    def _build_cache(self) -> None:
        paths = [s.image_path for s in self.train_samples + self.val_samples]
        mcfg = self.model.cfg
        with torch.no_grad():
            probe = self.model.encoder(torch.zeros(1, 3, mcfg.image_size, mcfg.image_size, device=self.device))  # (1, L, D)
        shape = (len(paths), probe.size(1), probe.size(2))
        batch = 64 if self.device.type == "cuda" else 4  # on the CPU, big batches slow Lite0 down
        self.cache = build_feature_cache(self.ctx, self.run_dir, cache_key(mcfg, self.weights_source, paths), shape,
                                         self.model.encoder, paths, mcfg, self.device, self.reporter, self.cfg.workers, batch)
        bad = self.cache.bad
        if bad:
            fraction = len(bad) / len(paths)
            first = next(iter(bad.values()))
            if fraction > self.cfg.max_bad_fraction:
                raise CapcliError(
                    f"{len(bad)} of {len(paths)} images cannot be read ({fraction:.1%}, more than the allowed "
                    f"{self.cfg.max_bad_fraction:.1%}; see --max-bad-fraction); first: {first}", exit_code=1)
            log.warning("skipping %d unreadable image%s (first: %s)", len(bad), "s" * (len(bad) != 1), first)

    def _encode_captions(self, samples: list[Sample], offset: int) -> CaptionSet:
        out, too_long = CaptionSet(), 0
        bad = getattr(self, "cache", None) and self.cache.bad or {}
        for i, s in enumerate(samples):
            if offset + i in bad:
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
            log.info("left out %d captions longer than %d words", too_long, self.vocab.max_len)
        return out

    # ---------------------------------------------------------------- state
    def _state(self) -> dict:
        return {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best_score": self.best_score, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "epoch_sums": dict(self.epoch_sums),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def _rng_state(self) -> tuple:
        return torch.get_rng_state(), (torch.cuda.get_rng_state() if self.device.type == "cuda" else None)

    def _set_rng_state(self, cpu: torch.Tensor, cuda: torch.Tensor | None) -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)

    def _read_state(self) -> dict:
        meta = checkpoint.read_metadata(self.run_dir / "last.safetensors")
        cid = json.loads(meta.get("training") or "{}").get("checkpoint_id")
        return checkpoint.load_train_state(self.run_dir / f"last.state-{cid}.pt")

    def _restore_state(self) -> None:
        state = distributed.on_main(self.ctx, self._read_state)  # rank 0 reads, every rank restores
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.best_score, self.best_epoch, self.bad_epochs = state["best_score"], state["best_epoch"], state["bad_epochs"]
        self.epoch_sums = state["epoch_sums"]
        torch.set_rng_state(state["rng"])  # under DDP dropout is seeded per step instead
        if state["cuda_rng"] and torch.cuda.is_available() and not self.ctx.enabled:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        where = f"epoch {self.epoch + 1}, step {self.step_in_epoch}" if self.step_in_epoch else f"after epoch {self.epoch}"
        log.info("resuming %s (%s)", self.run_dir, where)

    def _summary(self, **extra) -> dict:
        summary = {
            "data": self.cfg.data or self.cfg.captions, "split": self.cfg.split,
            "epochs": self.epoch, "best_epoch": self.best_epoch,
            "val_bleu4": None if self.best_score == float("-inf") else self.best_score,
            "train_images": len(self.train_samples), "train_captions": len(self.train_set),
            "lr": self.cfg.lr, "batch_size": self.cfg.batch_size, "seed": self.cfg.seed,
            "options": {k: v for k, v in asdict(self.cfg).items() if k not in ("out", "data", "captions", "images")},
            **extra,
        }
        if self.ctx.enabled:
            summary["processes"] = self.ctx.world_size
        return summary

    def save(self, best: bool = False) -> None:
        """last.safetensors + its training state (+ best.safetensors); each write atomic. Rank 0 only.

        The state file is named after a checkpoint id stored in the model's metadata, and is
        written first: a crash between the two writes leaves the previous pair intact.
        """
        if not self.ctx.is_main:
            return
        cid = f"{self.epoch}-{self.step_in_epoch}-{int(time.time() * 1000)}"
        checkpoint.save_train_state(self.run_dir / f"last.state-{cid}.pt", self._state())
        checkpoint.save_model(self.run_dir / "last.safetensors", self.model, self.vocab,
                              encoder_weights=self.weights_source, training=self._summary(checkpoint_id=cid))
        for old in self.run_dir.glob("last.state-*.pt"):
            if old.name != f"last.state-{cid}.pt":
                old.unlink(missing_ok=True)
        if best:
            checkpoint.save_model(self.run_dir / "best.safetensors", self.model, self.vocab,
                                  encoder_weights=self.weights_source, training=self._summary())

    # ---------------------------------------------------------------- batches
    def _batch_images(self, images: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine-tuning: the batch's distinct images (n_img, 3, S, S) and each caption's row among them (N,)."""
        samples = self.train_samples + self.val_samples
        unique = sorted(set(images))
        cfg = self.model.cfg
        items = next(image_batches([samples[i].image_path for i in unique], cfg.image_size, len(unique),
                                   self.cfg.workers, overlap=False))
        for path, item in items:
            if isinstance(item, ImageError):
                raise CapcliError(f"{path}: {item}", exit_code=1)
        pixels = torch.stack([item for _, item in items])  # (n_img, S, S, 3) uint8
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
        x = normalize_pixels(pixels.to(self.device, non_blocking=True), cfg.mean, cfg.std)  # (n_img, 3, S, S)
        where = {img: k for k, img in enumerate(unique)}
        rows = torch.tensor([where[i] for i in images])
        return x, rows.to(self.device, non_blocking=True)

    def _batch_features(self, images: list[int], train: bool) -> torch.Tensor:
        """Encoder features (N, L, D) for cache rows / image indices ``images``."""
        if not self.cfg.fine_tune_encoder:
            index = torch.tensor(images)
            f = self.cache.features[index]  # (N, L, D) fp16
            if self.device.type == "cuda":
                f = f.pin_memory()
            return f.to(self.device, non_blocking=True).float()
        x, rows = self._batch_images(images)
        with torch.set_grad_enabled(train):
            return self.model.encoder(x)[rows]  # (N, L, D): the encoder once per image, shared by its captions

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches: the same on every rank (seeded by --seed and the epoch)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        if not self.cfg.fine_tune_encoder:
            return length_bucketed_batches([len(t) for t in self.train_set.tokens], self.cfg.batch_size, g)
        # By image: every caption of an image in the same batch, the encoder run once for all.
        by_image: dict[int, list[int]] = {}
        for i, img in enumerate(self.train_set.image):
            by_image.setdefault(img, []).append(i)
        images = list(by_image)
        perm = torch.randperm(len(images), generator=g).tolist()
        per_batch = max(1, self.cfg.batch_size // max(1, round(len(self.train_set) / max(len(images), 1))))
        order = [images[i] for i in perm]
        return [[c for img in order[k:k + per_batch] for c in by_image[img]] for k in range(0, len(order), per_batch)]

    # ---------------------------------------------------------------- loop
    def run(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        if self.epoch >= cfg.epochs:
            log.info("already trained %d epochs (raise --epochs to go on)", self.epoch)
            return self._summary()
        if self.bad_epochs >= cfg.patience:
            log.info("this run stopped early after epoch %d", self.epoch)
            return self._summary()
        last_save = time.time()
        while self.epoch < cfg.epochs:
            epoch = self.epoch + 1
            batches = self._epoch_batches(epoch)  # global batches; each step takes this rank's slice (_train_step)
            if self.step_in_epoch == 0:
                torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout: reproducible per epoch
                self.epoch_sums = {"nll": 0.0, "words": 0, "captions": 0, "seconds": 0.0}
            self.net.train()
            self.reporter.start(f"epoch {epoch}/{cfg.epochs}", len(batches), unit="batches")
            if self.step_in_epoch:
                self.reporter.update(self.step_in_epoch)
            step_before, rng_before = -1, None
            try:
                t_start, seconds_before = time.time(), self.epoch_sums["seconds"]
                for batch in batches[self.step_in_epoch:]:
                    if ctx.enabled:
                        torch.manual_seed(_step_seed(cfg.seed, epoch, self.step_in_epoch, ctx.rank))
                    step_before, rng_before = self.step_in_epoch, self._rng_state()
                    self._train_step(batch)  # also counts the step
                    if distributed.sync_check_enabled():
                        distributed.check_in_sync(ctx, self.model, f"epoch {epoch} step {self.step_in_epoch}")
                        self.sync_checks += 1
                    self.epoch_sums["seconds"] = seconds_before + time.time() - t_start
                    s = self.epoch_sums
                    self.reporter.update(1, loss=s["nll"] / max(s["words"], 1),
                                         ppl=math.exp(min(s["nll"] / max(s["words"], 1), 50)),
                                         captions_per_s=s["captions"] / max(s["seconds"], 1e-9))
                    if cfg.save_every_minutes and time.time() - last_save > 60 * cfg.save_every_minutes:
                        self.save()
                        last_save = time.time()
            except KeyboardInterrupt:
                self.reporter.stop()
                if rng_before is not None and self.step_in_epoch == step_before:
                    self._set_rng_state(*rng_before)  # stopped inside a step: undo its dropout draws
                with ignore_sigint():
                    self.save()  # rank 0 alone, no collective: the others may already be gone
                again = (f"torchrun --nproc-per-node {ctx.local_world_size} ... -m capcli train --resume {self.run_dir}"
                         if ctx.enabled else f"capcli train --resume {self.run_dir}")
                if not ctx.is_main:
                    raise TrainingInterrupted(f"interrupted (rank {ctx.rank}; rank 0 saves the checkpoint)") from None
                raise TrainingInterrupted(
                    f"interrupted in epoch {epoch} at step {self.step_in_epoch}; saved "
                    f"{self.run_dir / 'last.safetensors'}; continue with: {again}") from None
            self.reporter.stop()
            with ignore_sigint():
                stop = self._end_epoch(epoch)
            last_save = time.time()
            if stop:
                break
        if self.sync_checks:
            log.info("sync check: the parameters of all %d processes were identical after each of %d steps",
                     ctx.world_size, self.sync_checks)
        return self._summary()

    def _train_step(self, batch: list[int]) -> None:
        """One optimizer step on global batch ``batch``; under DDP this rank computes its slice of it."""
        cfg, ctx = self.cfg, self.ctx
        weight = 1.0
        mine = distributed.shard_batch(batch, ctx.rank, ctx.world_size) if ctx.enabled else batch
        if not mine:  # fewer captions than ranks: join the gradient all-reduce with a zero-weight caption
            mine, weight = batch[:1], 0.0
        total_words = sum(len(self.train_set.tokens[i]) - 1 for i in batch)
        padded, lengths, order = collate([self.train_set.tokens[i] for i in mine], self.device)
        images = [self.train_set.image[mine[i]] for i in order]
        attention_reg = cfg.attention_reg if self.model.cfg.attention != "none" else 0.0
        with autocast(self.device):
            if cfg.fine_tune_encoder:
                x, rows = self._batch_images(images)
            else:
                x, rows = self._batch_features(images, train=True), None  # (N, L, D)
            logits, alphas = self.net(x, padded, lengths, rows)
            loss, nll, _ = loss_terms(logits, alphas, padded, lengths, cfg.label_smoothing, attention_reg,
                                      total_words=total_words, total_captions=len(batch), scale=ctx.world_size * weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # under DDP: the gradient all-reduce
        nll = float(distributed.all_reduce_sum(ctx, (nll * weight).reshape(1)))
        # From here on no more waiting on other processes; Ctrl-C waits for the update and the
        # step count to agree, so that a checkpoint saved on Ctrl-C resumes exactly.
        with defer_sigint():
            if cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step_in_epoch += 1
            self.epoch_sums["nll"] += nll
            self.epoch_sums["words"] += total_words
            self.epoch_sums["captions"] += len(batch)

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation loss (teacher forced) and BLEU-4 of real greedy captions, no teacher forcing.

        Under DDP the ranks share the batches out (whole batches, so each is computed as a single
        process would) and rank 0 scores the gathered captions; the other ranks return {}.
        """
        ctx = self.ctx
        self.model.eval()
        if not len(self.val_set):
            return {}
        nll_sum = words = 0
        g = torch.Generator().manual_seed(0)
        batches = length_bucketed_batches([len(t) for t in self.val_set.tokens], 256, g)
        for batch in batches[ctx.rank::ctx.world_size]:
            padded, lengths, order = collate([self.val_set.tokens[i] for i in batch], self.device)
            with autocast(self.device):
                features = self._batch_features([self.val_set.image[batch[i]] for i in order], train=False)
                _, nll, n = caption_loss(self.model.decoder, features, padded, lengths)
            nll_sum, words = nll_sum + nll, words + n
        images = sorted(set(self.val_set.image))
        samples = self.train_samples + self.val_samples
        candidates = {}
        chunks = [images[k:k + 128] for k in range(0, len(images), 128)]
        for chunk in chunks[ctx.rank::ctx.world_size]:
            with autocast(self.device):
                hyps = greedy(self.model.decoder, self._batch_features(chunk, train=False), max_len=self.vocab.max_len)
            candidates.update({str(i): self.vocab.decode(h.tokens) for i, h in zip(chunk, hyps)})
        if ctx.enabled:
            parts = distributed.all_gather_object(ctx, (nll_sum, words, candidates))
            if not ctx.is_main:
                return {}
            nll_sum, words = sum(p[0] for p in parts), sum(p[1] for p in parts)
            candidates = {k: v for p in parts for k, v in p[2].items()}
        references = {str(i): list(samples[i].captions) for i in images}
        scores, _ = score_captions(references, candidates, metrics=("BLEU",), tokenizer="simple")
        return {"val_loss": nll_sum / max(words, 1), "val_ppl": math.exp(min(nll_sum / max(words, 1), 50)),
                "val_bleu4": scores["BLEU-4"]}

    def _end_epoch(self, epoch: int) -> bool:
        cfg, s = self.cfg, self.epoch_sums
        t0 = time.time()
        val = self.validate()
        train_loss = s["nll"] / max(s["words"], 1)
        score = val.get("val_bleu4", -train_loss)
        # Rank 0's numbers decide for all: the same best model, learning-rate decay and early stop everywhere.
        val, score = distributed.broadcast_object(self.ctx, (val, score))
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
        else:
            self.bad_epochs += 1
        self.scheduler.step(score)
        self.epoch, self.step_in_epoch = epoch, 0
        record = {
            "epoch": epoch, "train_loss": train_loss, "train_ppl": math.exp(min(train_loss, 50)), **val,
            "lr": self.optimizer.param_groups[0]["lr"], "train_seconds": s["seconds"],
            "val_seconds": time.time() - t0, "captions_per_s": s["captions"] / max(s["seconds"], 1e-9),
            "best": improved,
        }
        if self.ctx.is_main:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        log.info(
            "epoch %d: train loss %.3f, val loss %s, val BLEU-4 %s%s, %.0f captions/s",
            epoch, train_loss, f"{val['val_loss']:.3f}" if val else "-", f"{val['val_bleu4']:.4f}" if val else "-",
            " (best)" if improved else "", record["captions_per_s"],
        )
        self.save(best=improved)
        if self.bad_epochs >= cfg.patience:
            log.info("early stop: no better val BLEU-4 for %d epochs (best %.4f at epoch %d)", cfg.patience, self.best_score, self.best_epoch)
            return True
        return False


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


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> dict:
    def run(ctx: DistContext) -> dict:
        trainer = Trainer(cfg, reporter, ctx=ctx)
        trainer.setup()
        return trainer.run()

    return _distributed(run, Path(cfg.out))


def resume(run_dir: str | Path, overrides: dict | None = None, reporter: Reporter | None = None) -> dict:
    run_dir = Path(run_dir)

    def read_config() -> tuple[dict, bool]:
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise CapcliError(f"{run_dir}: not a capcli run folder (no config.json)")
        try:
            data = json.loads(config_path.read_text())
            TrainConfig.from_dict(data)
        except (ValueError, TypeError) as e:
            raise CapcliError(f"{config_path}: damaged run configuration ({e})") from None
        return data, (run_dir / "last.safetensors").is_file()

    def run(ctx: DistContext) -> dict:
        data, has_checkpoint = distributed.on_main(ctx, read_config)  # the run folder may be on rank 0's disk only
        cfg = TrainConfig.from_dict(data)
        for k, v in (overrides or {}).items():
            if k in RESUME_OVERRIDES and v is not None:
                setattr(cfg, k, v)
        cfg.out = str(run_dir)
        # Stopped before the first checkpoint (e.g. while caching features): start over with the
        # same settings; the features cached so far are reused.
        trainer = Trainer(cfg, reporter, resume=has_checkpoint, ctx=ctx)
        trainer.setup()
        return trainer.run()

    return _distributed(run, run_dir)
