"""The settings of a training run: one dataclass, saved as the run folder's config.json.

The CLI's `train` options carry the same names, and the CLI builds a TrainConfig from them by
name; this module imports no torch, so `capcli train --help` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from capcli.choices import MODEL_LIMITS, check_names, model_setting_problem, shown
from capcli.errors import CapcliError
from capcli.model.config import ModelConfig
from capcli.text.tokenizers import TOKENIZERS

SCST_BASELINES = ("mean", "greedy")  # capcli.train.scst's (named here: this module imports no torch)


@dataclass
class TrainConfig:
    output: str = "runs/capcli"  # the run folder
    # data
    data: str | None = None
    captions: str | None = None
    images: str | None = None
    split: str | None = None  # train/val/test percentages for a hash split; None: the dataset's own, else 90/5/5
    vocab: str | None = None
    tokenizer: str = "word"  # word | char | smiles (see capcli.text.tokenizers); a --vocab file's must match
    min_freq: int | None = None  # None: 5 for words, 1 for characters and SMILES tokens
    max_len: int | None = None  # longest training caption in tokens; None: the vocabulary's (else the tokenizer's default)
    max_bad_fraction: float = 0.01  # stop when more of the images than this cannot be read
    # model: ModelConfig's settings, with its defaults (MODEL_FIELDS below), and the encoder's weights
    encoder: str = ModelConfig.encoder
    encoder_weights: str | None = None
    image_size: int = ModelConfig.image_size
    grid: int = ModelConfig.grid
    attention: str = ModelConfig.attention
    rnn: str = ModelConfig.rnn
    embed_dim: int = ModelConfig.embed_dim
    attention_dim: int = ModelConfig.attention_dim
    decoder_dim: int = ModelConfig.decoder_dim
    dropout: float = ModelConfig.dropout
    # optimisation
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    attention_reg: float = 1.0  # lambda of the doubly stochastic attention penalty
    label_smoothing: float = 0.0
    # Encoder blocks trained, from the top (capcli.model.encoders.FINE_TUNE_BLOCKS): the frozen part
    # below them is cached, the top ones run at every step. 0: a frozen encoder, all of it cached.
    fine_tune_blocks: int = 0
    # The whole encoder at every step, no cache (the way before --fine-tune-blocks; the same result,
    # slower); trains --fine-tune-blocks blocks, else the encoder's usual top (3 for Lite0, 1 for ResNets).
    fine_tune_encoder: bool = False
    encoder_lr: float = 1e-4
    patience: int = 5  # early stop after this many epochs without a better val BLEU-4 (val CIDEr with SCST)
    lr_patience: int = 2  # halve the learning rate after every this many of them (0: never)
    val_beam: int = 1  # validation captions: 1 greedy, K beam search
    init: str | None = None  # start from this model file's weights and vocabulary (and model settings)
    # self-critical training (capcli.train.scst)
    scst_after: int | None = None  # cross-entropy epochs before it starts; None: never
    scst_samples: int = 5  # K captions sampled per image
    scst_baseline: str = "mean"  # mean: of the image's other samples; greedy: its greedy caption's reward
    scst_lr: float = 5e-5  # the learning rate of the self-critical phase
    # running
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (GPU); config.json records the one that ran
    seed: int = 0
    workers: int = 2
    save_every: float = 10.0  # minutes between saves within an epoch (0: only at epoch ends)

    def validate(self) -> None:
        """Check the names and the model's sizes before any data is read or any file is written."""
        check_names(self.encoder, self.attention, self.rnn)
        for name in _MODEL_SIZES:
            if problem := model_setting_problem(name, getattr(self, name), "--" + name.replace("_", "-")):
                raise CapcliError(problem)
        if self.tokenizer not in TOKENIZERS:
            raise CapcliError(f"unknown tokenizer {self.tokenizer!r} (choose {', '.join(TOKENIZERS)})")
        if self.data is None and self.captions is None:
            raise CapcliError("give the data: --data DIR, or --captions FILE --images DIR")
        if self.val_beam < 1:
            raise CapcliError("--val-beam must be at least 1")
        if self.fine_tune_blocks:  # the encoder's blocks are known to capcli.model.encoders, which imports torch
            from capcli.model.encoders import fine_tune_blocks_problem

            if problem := fine_tune_blocks_problem(self.encoder, self.fine_tune_blocks):
                raise CapcliError(problem)
        if self.scst_baseline not in SCST_BASELINES:
            raise CapcliError(f"unknown --scst-baseline {self.scst_baseline!r} (choose {', '.join(SCST_BASELINES)})")
        if self.scst_after is not None:
            if self.tokenizer != "word":
                raise CapcliError(f"--scst-after needs a word model: self-critical training rewards captions by "
                                  f"CIDEr, and this run's tokenizer is {self.tokenizer}")
            if self.scst_samples < (2 if self.scst_baseline == "mean" else 1):
                raise CapcliError("--scst-samples must be at least 2 with --scst-baseline mean (the baseline is "
                                  "the mean of the other samples)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> "TrainConfig":
        """The settings a run's config.json holds. The file may have been edited: a ValueError names
        the first setting of the wrong type or out of range, before anything is built from it."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        types = {f.name: f.type for f in fields(cls)}  # e.g. "int | None" (annotations are strings here)
        settings = {name: value for name, value in ((_RENAMED.get(k, k), v) for k, v in data.items()) if name in types}
        for name, value in settings.items():
            if problem := _setting_problem(name, value, types[name].split(" | ")):
                raise ValueError(problem)
        return cls(**settings)


# The model settings a run chooses: its fields that ModelConfig has too, in TrainConfig's order. The
# rest of a ModelConfig comes from the data (vocab_size) and the encoder (feature_dim, mean, std).
MODEL_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.name in {m.name for m in fields(ModelConfig)})

# config.json of runs started by capcli 0.1.0 used these names
_RENAMED = {"out": "output", "save_every_minutes": "save_every"}

# What --resume may change; everything else is the run's own and stays as it was.
RESUMABLE = ("epochs", "patience", "device", "precision", "workers", "save_every", "max_bad_fraction")

# The model sizes that choices.MODEL_LIMITS bounds (the vocabulary's size comes from the data).
_MODEL_SIZES = tuple(name for name in (*MODEL_LIMITS, "dropout") if name != "vocab_size")
# Settings that must be at least 1, as the CLI's options are; every other number but the seed is at least 0.
_COUNTS = ("epochs", "batch_size", "patience", "val_beam", "scst_samples", "workers", "min_freq", "max_len")
_KIND_WORDS = {"str": "a string", "int": "a whole number", "float": "a number", "bool": "true or false", "None": "null"}


def _setting_problem(name: str, value: object, kinds: list[str]) -> str | None:
    """Why a config.json setting annotated ``kinds`` cannot be ``value``, or None."""
    if not _is_of(value, kinds):
        return f"{name} must be {' or '.join(_KIND_WORDS[k] for k in kinds)}, not {shown(value)}"
    if name in _MODEL_SIZES:
        return model_setting_problem(name, value, name)
    least = 1 if name in _COUNTS else 0
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "seed" and value < least:
        return f"{name} {shown(value)} must be at least {least}"
    return None


def _is_of(value: object, kinds: list[str]) -> bool:
    """Whether a JSON value fits a field annotated with ``kinds`` (a bool is not a number, nor NaN or inf)."""
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return "int" in kinds or "float" in kinds
    if isinstance(value, float):
        return "float" in kinds and math.isfinite(value)
    return (value is None and "None" in kinds) or (isinstance(value, str) and "str" in kinds)
