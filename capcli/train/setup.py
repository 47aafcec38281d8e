"""Assembling a training run: the settings (--init's), the data, the run folder, the vocabulary, the
model and its starting weights, the feature source, the encoded captions, the optimizer and the
SCST reward. ``Run`` holds them; the loop (capcli.train.loop) is a Run that trains.

Under torchrun rank 0 reads the run folder and the weights files and hands what it read to the
other ranks (capcli.runtime.distributed.on_main): other machines need neither.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

import torch

from capcli.data.datasets import Sample, load_dataset, split_counts
from capcli.data.splits import parse_split_ratios
from capcli.errors import CapcliError
from capcli.files import atomic_write_bytes
from capcli.metrics.cider import CiderD
from capcli.metrics.validation import CIDER_SELECTION, METRIC_LABELS, SELECTION
from capcli.model import files as model_files
from capcli.model.caption_model import CaptionModel
from capcli.model.config import ModelConfig
from capcli.model.encoders import default_fine_tune_blocks
from capcli.progress import Reporter
from capcli.runtime import distributed
from capcli.runtime.devices import decoder_precision, encoder_batch, precision_note, resolve_precision
from capcli.runtime.distributed import SINGLE, DistContext
from capcli.runtime.signals import StopSignals, exit_code, signal_name, stop_signal
from capcli.text.vocab import Vocab
from capcli.train import scst
from capcli.train.config import MODEL_FIELDS, TrainConfig
from capcli.train.feature_cache import build_feature_cache, cache_key
from capcli.train.features import CachedFeatures, CachedLowerOutputs, CaptionSet, EncodedImages
from capcli.train.interrupted import TrainingInterrupted, continue_command
from capcli.train.objective import TrainNet
from capcli.train.state import TrainState

log = logging.getLogger("capcli")


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The model settings of a run: its MODEL_FIELDS (encoder, sizes, dropout...)."""
    return ModelConfig(vocab_size=vocab_size, **{name: getattr(cfg, name) for name in MODEL_FIELDS})


# Model settings a run started with --init takes from the model file: all but --dropout, which may
# still be given (it changes no weight).
INIT_FIXED = tuple(name for name in MODEL_FIELDS if name != "dropout")


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


def os_reason(e: OSError) -> str:
    """An OSError's reason in capcli's words: "read-only file system", "no space left on device"."""
    text = e.strerror or str(e) or e.__class__.__name__
    return text[:1].lower() + text[1:]


class Run:
    """One training run: its settings, and the parts ``assemble`` makes of them; under torchrun one
    per process, ``ctx`` saying which.

    After ``assemble``: ``vocab``, ``model`` (on ``device``), ``weights_source`` (where the starting
    weights came from), ``train_samples``/``val_samples`` and their encoded captions
    ``train_set``/``val_set``, the feature ``source``, ``state`` (a fresh TrainState), ``reward``
    (SCST's, or None) and ``train_net`` (the module DDP wraps).
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
        # Stop signals raise at once while setting up (the feature cache keeps what it has) and are
        # deferred to the next step boundary while training (see the loop's run); entered by
        # capcli.train.launch's train()/resume().
        self.stops = StopSignals()

    def assemble(self) -> None:
        """Make the run's parts, in this order: --init's settings, the data, the run folder and its
        config.json, the vocabulary, the model and its weights, the feature source, the captions,
        a fresh training state and the SCST reward."""
        cfg, ctx = self.cfg, self.ctx
        cfg.validate()
        torch.manual_seed(cfg.seed)
        self.init_model: model_files.LoadedModel | None = None  # --init's model, on rank 0 until its weights are in
        if cfg.init and not self.resume:
            self._take_init_settings()
        if cfg.fine_tune_encoder and not cfg.fine_tune_blocks:  # config.json records the blocks it trains
            cfg.fine_tune_blocks = default_fine_tune_blocks(cfg.encoder)
        # The data first: a run that cannot start leaves no run folder behind.
        samples = self._load_samples()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # every rank: the feature cache lives here
        except OSError as e:
            raise CapcliError(f"{self.run_dir}: cannot create the run folder ({os_reason(e)})") from None
        log.info("%s", precision_note(cfg.precision, self.precision, self.device))
        cfg.precision = self.precision  # the run's config records what ran
        if ctx.is_main:
            atomic_write_bytes(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1).encode())
        self.vocab = distributed.on_main(ctx, lambda: self._vocabulary(samples))

        self.model = CaptionModel(model_config(cfg, len(self.vocab)))
        # Rank 0 loads, the others receive: other machines need neither the run folder nor the weights file.
        self.weights_source = distributed.on_main(ctx, self._load_weights)
        self.model.encoder.set_trained_blocks(cfg.fine_tune_blocks)
        self.model.to(self.device)
        distributed.broadcast_module(ctx, self.model)

        self.train_samples = [s for s in samples if s.split == "train"]
        self.val_samples = [s for s in samples if s.split == "val"]
        if not self.val_samples:
            log.warning("no validation images: the best model is chosen by training loss")
        self.source = self._feature_source([s.image for s in self.train_samples + self.val_samples])
        self.bad_reported = len(self.source.bad)  # unreadable images warned about so far
        self.train_set = encode_captions(self.vocab, self.train_samples, 0, self.source.bad)
        self.val_set = encode_captions(self.vocab, self.val_samples, len(self.train_samples), self.source.bad)

        # The phase of the next epoch: "xe" (cross-entropy) or "scst"; capcli.train.schedule switches it.
        phase = "scst" if cfg.scst_after == 0 else "xe"
        self.state = TrainState(self.new_optimizer(phase), torch.amp.GradScaler("cuda", enabled=self.decoder_precision == "fp16"),
                                phase=phase, bad_images=self.source.bad)
        self.reward = self._reward() if cfg.scst_after is not None else None
        if cfg.scst_after is not None and cfg.scst_after >= cfg.epochs:
            log.warning("--scst-after %d: no self-critical epoch within --epochs %d", cfg.scst_after, cfg.epochs)
        elif cfg.scst_after == 0 and not cfg.init and not self.resume:
            log.warning("self-critical training from untrained weights rarely learns: start from a cross-entropy "
                        "model with --init, or give --scst-after N > 0")
        self.train_net = TrainNet(self.model, self.source.top_blocks)

    def _take_init_settings(self) -> None:
        """--init: the model file's settings become the run's (rank 0 reads the file, every rank takes them)."""
        cfg = self.cfg

        def read_init() -> dict:
            self.init_model = model_files.load_model(cfg.init)
            return init_settings(cfg, self.init_model, self.explicit)

        for name, value in distributed.on_main(self.ctx, read_init).items():
            setattr(cfg, name, value)
        cfg.validate()  # e.g. --scst-after with a char model

    def _load_samples(self) -> list[Sample]:
        """The dataset's samples (all splits); an empty train split is a CapcliError."""
        cfg = self.cfg
        dataset = load_dataset(cfg.data, captions_file=cfg.captions, images_dir=cfg.images,
                               split_ratios=parse_split_ratios(cfg.split) if cfg.split else None)
        samples, self.split_source = dataset.samples, dataset.split_source
        if split_counts(samples)["train"] == 0:
            raise CapcliError(f"{cfg.data or cfg.captions}: the train split is empty")
        return samples

    def _load_weights(self) -> str:
        """Load the starting weights (the last checkpoint, --init's model, or the encoder's pretrained
        ones); returns where the encoder's weights came from."""
        if self.resume:
            loaded = model_files.load_model(self.run_dir / "last.safetensors")
        elif self.cfg.init:
            loaded, self.init_model = self.init_model, None
        else:
            return self.model.encoder.load_pretrained(self.cfg.encoder_weights)
        self.model.load_state_dict(loaded.model.state_dict())
        return loaded.metadata["encoder_weights"]

    def _feature_source(self, paths: list[Path]):
        """The cache of the frozen encoder, or of its frozen part below the --fine-tune-blocks; the
        whole encoder at every step with --fine-tune-encoder or when no block is frozen. A stop
        signal while caching ends the run with TrainingInterrupted; the features cached so far are kept."""
        encoder, blocks = self.model.encoder, self.cfg.fine_tune_blocks
        if self.cfg.fine_tune_encoder or blocks == len(encoder.block_names):
            return EncodedImages(encoder, paths, self.model.cfg, self.device, self.cfg.workers)
        try:
            cache = self._build_cache(paths, blocks)
            return CachedLowerOutputs(cache, encoder, blocks, self.device) if blocks else CachedFeatures(cache, self.device)
        except KeyboardInterrupt as e:
            signum = stop_signal(e)
            raise TrainingInterrupted(f"interrupted by {signal_name(signum)} while caching features; the images "
                                      f"cached so far are kept; continue with: {continue_command(self.ctx, self.run_dir)}",
                                      exit_code(signum)) from None

    def new_optimizer(self, phase: str) -> torch.optim.Optimizer:
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

    def _build_cache(self, paths: list[Path], blocks: int):
        """The cache of every image's encoder features, or with ``blocks`` N > 0 of the output of the
        frozen part below the top N blocks."""
        mcfg, encoder = self.model.cfg, self.model.encoder
        encode = (lambda images: encoder.lower(images, blocks)) if blocks else encoder  # images -> (b, C, h, w) | (b, L, D)
        with torch.no_grad():
            probe = encode(torch.zeros(1, 3, mcfg.image_size, mcfg.image_size, device=self.device))
        shape = (len(paths), *probe.shape[1:])
        key = cache_key(mcfg, self.weights_source, self.precision, paths, blocks)
        cache = build_feature_cache(self.ctx, self.run_dir, key, shape, encode, paths, mcfg, self.device,
                                    self.precision, self.reporter, self.cfg.workers, encoder_batch(self.device, self.precision))
        self.check_bad(cache.bad, len(paths))
        return cache

    def check_bad(self, bad: dict[int, str], n_images: int, saved: str = "") -> None:
        """A CapcliError when more than --max-bad-fraction of the images cannot be read (``saved``: what
        the message adds about the run's last checkpoint), else a warning about those skipped."""
        fraction = len(bad) / max(n_images, 1)
        if fraction > self.cfg.max_bad_fraction:
            raise CapcliError(
                f"{len(bad)} of {n_images} images cannot be read ({fraction:.1%}, more than the allowed "
                f"{self.cfg.max_bad_fraction:.1%}; see --max-bad-fraction); first: {next(iter(bad.values()))}{saved}",
                exit_code=1)
        if bad:
            log.warning("skipping %d unreadable image%s (first: %s)", len(bad), "s" * (len(bad) != 1),
                        next(iter(bad.values())))


def encode_captions(vocab: Vocab, samples: list[Sample], offset: int, bad: dict[int, str]) -> CaptionSet:
    """The token ids of ``samples``' captions (sample i is image ``offset + i``), leaving out the
    unreadable images (``bad``), the empty captions and those longer than the vocabulary's max_len."""
    out, too_long = CaptionSet(), 0
    for i, s in enumerate(samples):
        if offset + i in bad:
            continue
        for c in s.captions:
            ids = vocab.encode(c)
            if len(ids) - 2 > vocab.max_len:
                too_long += 1
                continue
            if len(ids) > 2:
                out.image.append(offset + i)
                out.tokens.append(ids)
    if too_long:
        log.info("left out %d captions longer than %d tokens", too_long, vocab.max_len)
    return out
