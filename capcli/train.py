"""Training: feature cache, length-bucketed batches, teacher forcing, validation, checkpoints, resume.

With a frozen encoder (the default) every image is encoded once, into an fp16 cache under the
run folder, and the encoder is off the hot path: an epoch only runs the decoder. With
``fine_tune_encoder`` batches are drawn by image, and each image's encoder output is shared by
all of its captions, so the encoder still runs once per image per epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from capcli import checkpoint
from capcli.data import Sample, load_dataset, parse_split_ratios, prefetch_images, split_counts
from capcli.errors import CapcliError
from capcli.evaluate import score_captions
from capcli.model import CaptionModel, ModelConfig, resolve_device
from capcli.progress import Reporter
from capcli.sampling import greedy
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


# =========================================================================== feature cache

class FeatureCache:
    """Encoder features of a list of images, fp16, memory-mapped from one file.

    The file lives in the run folder and is reused by --resume; a key made of the encoder, its
    weights and the image list guards against reusing features that no longer match. Progress
    is recorded as it goes, so an interrupted caching run continues where it stopped.
    """

    def __init__(self, directory: Path, key: str, shape: tuple[int, int, int]):
        self.data_path = directory / f"features-{key}.f16"
        self.index_path = directory / f"features-{key}.json"
        self.shape = shape
        n, L, D = shape
        if not self.data_path.exists() or self.data_path.stat().st_size != n * L * D * 2:
            with open(self.data_path, "wb") as f:
                f.truncate(n * L * D * 2)
            checkpoint.atomic_write_bytes(self.index_path, json.dumps({"done": 0, "bad": {}}).encode())
        self.features = torch.from_file(str(self.data_path), shared=True, size=n * L * D, dtype=torch.float16).view(n, L, D)
        state = json.loads(self.index_path.read_text()) if self.index_path.exists() else {"done": 0, "bad": {}}
        self.done: int = state["done"]
        self.bad: dict[int, str] = {int(k): v for k, v in state["bad"].items()}

    def _save_progress(self) -> None:
        checkpoint.atomic_write_bytes(self.index_path, json.dumps({"done": self.done, "bad": self.bad}).encode())

    def fill(self, encoder: torch.nn.Module, paths: Sequence[Path], cfg: ModelConfig, device: torch.device,
             reporter: Reporter, workers: int, batch_size: int) -> None:
        """Encode paths[done:] and write their rows; unreadable images are recorded in ``bad``."""
        if self.done >= len(paths):
            return
        t0 = time.time()
        start = self.done
        reporter.start("caching features", len(paths) - start, unit="images")
        batch_idx: list[int] = []
        batch: list[torch.Tensor] = []
        last_save = time.time()

        def flush():
            if batch:
                x = torch.stack(batch).to(device)  # (b, 3, S, S)
                with torch.no_grad(), _autocast(device):
                    f = encoder(x)  # (b, L, D)
                self.features[batch_idx[0]:batch_idx[-1] + 1] = f.to("cpu", torch.float16)
            self.done = (batch_idx[-1] + 1) if batch_idx else self.done
            reporter.update(len(batch_idx))
            batch_idx.clear()
            batch.clear()

        try:
            for i, (path, item) in enumerate(prefetch_images(paths[start:], cfg.image_size, cfg.mean, cfg.std, workers), start):
                if isinstance(item, Exception):
                    self.bad[i] = f"{path}: {item}"
                    if batch:
                        flush()
                    self.done = i + 1
                    reporter.update(1)
                    continue
                batch_idx.append(i)
                batch.append(item)
                if len(batch) >= batch_size:
                    flush()
                    if time.time() - last_save > 30:
                        self._save_progress()
                        last_save = time.time()
            flush()
        finally:
            self._save_progress()  # keep what was done, also on Ctrl-C
            reporter.stop()
        n = self.done - start
        log.info("cached features of %d images in %.1f s (%.1f ms/image)", n, time.time() - t0, 1000 * (time.time() - t0) / max(n, 1))


def _cache_key(cfg: ModelConfig, weights_source: str, paths: Sequence[Path]) -> str:
    h = hashlib.sha1()
    h.update(json.dumps([cfg.encoder, cfg.grid, cfg.image_size, weights_source]).encode())
    for p in paths:
        h.update(str(p).encode() + b"\0")
    return h.hexdigest()[:16]


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


def caption_loss(decoder, features: torch.Tensor, padded: torch.Tensor, lengths: list[int],
                 label_smoothing: float = 0.0, attention_reg: float = 0.0):
    """Teacher-forced loss. Returns (loss to minimise, summed word NLL, word count).

    The doubly stochastic penalty is lambda * mean_i (1 - sum_t alpha_ti)^2: the paper's sum over
    the L cells, divided by L so that one lambda suits any grid size (with the plain sum, 49-196
    cells make it dwarf the word loss at lambda = 1).
    """
    logits, alphas = decoder(features, padded, lengths)  # (N, T, V), (N, T, L)
    targets = padded[:, 1:]  # (N, T)
    steps = torch.arange(targets.size(1), device=targets.device)  # (T,)
    mask = steps.unsqueeze(0) < (torch.tensor(lengths, device=targets.device) - 1).unsqueeze(1)  # (N, T)
    logp = torch.log_softmax(logits[mask].float(), dim=-1)  # (W, V) for the W real words
    nll = -logp.gather(1, targets[mask].unsqueeze(1)).squeeze(1)  # (W,)
    words = nll.numel()
    loss = nll.mean()
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * logp.mean()
    if attention_reg:
        coverage = alphas.float().sum(dim=1)  # (N, L) attention each cell got over the caption
        loss = loss + attention_reg * ((1.0 - coverage) ** 2).mean()
    return loss, float(nll.detach().sum()), words


def _autocast(device: torch.device):
    """bf16 autocast on GPUs that have it, fp16 on older ones; nothing on the CPU."""
    if device.type != "cuda":
        import contextlib

        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


# =========================================================================== the run

class Trainer:
    def __init__(self, cfg: TrainConfig, reporter: Reporter | None = None, resume: bool = False):
        self.cfg, self.reporter = cfg, reporter or Reporter()
        self.run_dir = Path(cfg.out)
        self.resume = resume
        self.device = resolve_device(cfg.device)

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_bytes(self.run_dir / "config.json", json.dumps(asdict(cfg), indent=1).encode())

        samples = load_dataset(cfg.data, captions_file=cfg.captions, images_dir=cfg.images, split_ratios=parse_split_ratios(cfg.split))
        counts = split_counts(samples)
        log.info("data: %d images (train %d, val %d, test %d)", len(samples), counts["train"], counts["val"], counts["test"])
        if counts["train"] == 0:
            raise CapcliError(f"{cfg.data or cfg.captions}: the train split is empty")
        self.vocab = self._vocabulary(samples)

        mcfg = cfg.model_config(len(self.vocab))
        self.model = CaptionModel.from_config(mcfg)
        if self.resume:
            loaded = checkpoint.load_model(self.run_dir / "last.safetensors")
            self.model.load_state_dict(loaded.model.state_dict())
            self.weights_source = loaded.metadata["encoder_weights"]
        else:
            self.weights_source = self.model.encoder.load_pretrained(cfg.encoder_weights)
        self.model.encoder.set_fine_tune(cfg.fine_tune_encoder)
        self.model.to(self.device)

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
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and not torch.cuda.is_bf16_supported())

        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0
        self.best_score, self.best_epoch, self.bad_epochs = float("-inf"), 0, 0
        self.epoch_sums = {"nll": 0.0, "words": 0, "captions": 0, "seconds": 0.0}
        if self.resume:
            self._restore_state()

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
        self.cache = FeatureCache(self.run_dir, _cache_key(mcfg, self.weights_source, paths), shape)
        batch = 64 if self.device.type == "cuda" else 4  # on the CPU, big batches slow Lite0 down
        self.cache.fill(self.model.encoder, paths, mcfg, self.device, self.reporter, self.cfg.workers, batch)
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

    def _restore_state(self) -> None:
        meta = checkpoint.read_metadata(self.run_dir / "last.safetensors")
        cid = json.loads(meta.get("training") or "{}").get("checkpoint_id")
        state = checkpoint.load_train_state(self.run_dir / f"last.state-{cid}.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.best_score, self.best_epoch, self.bad_epochs = state["best_score"], state["best_epoch"], state["bad_epochs"]
        self.epoch_sums = state["epoch_sums"]
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        where = f"epoch {self.epoch + 1}, step {self.step_in_epoch}" if self.step_in_epoch else f"after epoch {self.epoch}"
        log.info("resuming %s (%s)", self.run_dir, where)

    def _summary(self, **extra) -> dict:
        return {
            "data": self.cfg.data or self.cfg.captions, "split": self.cfg.split,
            "epochs": self.epoch, "best_epoch": self.best_epoch,
            "val_bleu4": None if self.best_score == float("-inf") else self.best_score,
            "train_images": len(self.train_samples), "train_captions": len(self.train_set),
            "lr": self.cfg.lr, "batch_size": self.cfg.batch_size, "seed": self.cfg.seed, **extra,
        }

    def save(self, best: bool = False) -> None:
        """last.safetensors + its training state (+ best.safetensors); each write atomic.

        The state file is named after a checkpoint id stored in the model's metadata, and is
        written first: a crash between the two writes leaves the previous pair intact.
        """
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
    def _batch_features(self, images: list[int], train: bool) -> torch.Tensor:
        """Encoder features (N, L, D) for cache rows / image indices ``images``."""
        if not self.cfg.fine_tune_encoder:
            index = torch.tensor(images)
            f = self.cache.features[index]  # (N, L, D) fp16
            if self.device.type == "cuda":
                f = f.pin_memory()
            return f.to(self.device, non_blocking=True).float()
        samples = self.train_samples + self.val_samples
        unique = sorted(set(images))
        tensors = []
        for path, item in prefetch_images([samples[i].image_path for i in unique], self.model.cfg.image_size,
                                          self.model.cfg.mean, self.model.cfg.std, self.cfg.workers):
            if isinstance(item, Exception):
                raise CapcliError(f"{path}: {item}", exit_code=1)
            tensors.append(item)
        x = torch.stack(tensors).to(self.device)  # (n_img, 3, S, S)
        with torch.set_grad_enabled(train):
            f = self.model.encoder(x)  # (n_img, L, D): once per image, shared by its captions
        where = {img: k for k, img in enumerate(unique)}
        return f[torch.tensor([where[i] for i in images], device=self.device)]  # (N, L, D)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
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
        cfg = self.cfg
        if self.epoch >= cfg.epochs:
            log.info("already trained %d epochs (raise --epochs to go on)", self.epoch)
            return self._summary()
        if self.bad_epochs >= cfg.patience:
            log.info("this run stopped early after epoch %d", self.epoch)
            return self._summary()
        last_save = time.time()
        while self.epoch < cfg.epochs:
            epoch = self.epoch + 1
            batches = self._epoch_batches(epoch)
            if self.step_in_epoch == 0:
                torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout: reproducible per epoch
                self.epoch_sums = {"nll": 0.0, "words": 0, "captions": 0, "seconds": 0.0}
            self.model.train()
            self.reporter.start(f"epoch {epoch}/{cfg.epochs}", len(batches), unit="batches")
            if self.step_in_epoch:
                self.reporter.update(self.step_in_epoch)
            try:
                t_start, seconds_before = time.time(), self.epoch_sums["seconds"]
                for batch in batches[self.step_in_epoch:]:
                    self._train_step(batch)
                    self.step_in_epoch += 1
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
                with _ignore_sigint():
                    self.save()
                raise TrainingInterrupted(
                    f"interrupted in epoch {epoch} at step {self.step_in_epoch}; saved "
                    f"{self.run_dir / 'last.safetensors'}; continue with: capcli train --resume {self.run_dir}") from None
            self.reporter.stop()
            with _ignore_sigint():
                stop = self._end_epoch(epoch)
            last_save = time.time()
            if stop:
                break
        return self._summary()

    def _train_step(self, batch: list[int]) -> None:
        cfg = self.cfg
        padded, lengths, order = collate([self.train_set.tokens[i] for i in batch], self.device)
        images = [self.train_set.image[batch[i]] for i in order]
        with _autocast(self.device):
            features = self._batch_features(images, train=True)  # (N, L, D)
            loss, nll, words = caption_loss(self.model.decoder, features, padded, lengths, cfg.label_smoothing,
                                            cfg.attention_reg if self.model.cfg.attention != "none" else 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.epoch_sums["nll"] += nll
        self.epoch_sums["words"] += words
        self.epoch_sums["captions"] += len(batch)

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation loss (teacher forced) and BLEU-4 of real greedy captions, no teacher forcing."""
        self.model.eval()
        if not len(self.val_set):
            return {}
        nll_sum = words = 0
        g = torch.Generator().manual_seed(0)
        for batch in length_bucketed_batches([len(t) for t in self.val_set.tokens], 256, g):
            padded, lengths, order = collate([self.val_set.tokens[i] for i in batch], self.device)
            with _autocast(self.device):
                features = self._batch_features([self.val_set.image[batch[i]] for i in order], train=False)
                _, nll, n = caption_loss(self.model.decoder, features, padded, lengths)
            nll_sum, words = nll_sum + nll, words + n
        images = sorted(set(self.val_set.image))
        samples = self.train_samples + self.val_samples
        candidates = {}
        for k in range(0, len(images), 128):
            chunk = images[k:k + 128]
            with _autocast(self.device):
                hyps = greedy(self.model.decoder, self._batch_features(chunk, train=False), max_len=self.vocab.max_len)
            candidates.update({str(i): self.vocab.decode(h.tokens) for i, h in zip(chunk, hyps)})
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


class _ignore_sigint:
    """Finish a checkpoint write even if Ctrl-C is pressed again."""

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            self.previous = None

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> dict:
    trainer = Trainer(cfg, reporter)
    trainer.setup()
    return trainer.run()


def resume(run_dir: str | Path, overrides: dict | None = None, reporter: Reporter | None = None) -> dict:
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CapcliError(f"{run_dir}: not a capcli run folder (no config.json)")
    try:
        cfg = TrainConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as e:
        raise CapcliError(f"{config_path}: damaged run configuration ({e})") from None
    for k, v in (overrides or {}).items():
        if k in RESUME_OVERRIDES and v is not None:
            setattr(cfg, k, v)
    cfg.out = str(run_dir)
    # Stopped before the first checkpoint (e.g. while caching features): start over with the
    # same settings; the features cached so far are reused.
    trainer = Trainer(cfg, reporter, resume=(run_dir / "last.safetensors").is_file())
    trainer.setup()
    return trainer.run()
