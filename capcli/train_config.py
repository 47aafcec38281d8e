"""The settings of a training run: one dataclass, saved as the run folder's config.json.

The CLI's `train` options carry the same names, and the CLI builds a TrainConfig from them by
name; this module imports no torch, so `capcli train --help` stays fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from capcli.choices import check_names
from capcli.errors import CapcliError
from capcli.tokenizers import TOKENIZERS

SCST_BASELINES = ("mean", "greedy")  # capcli.scst's (named here: this module imports no torch)


@dataclass
class TrainConfig:
    output: str = "runs/capcli"  # the run folder
    # data
    data: str | None = None
    captions: str | None = None
    images: str | None = None
    split: str | None = None  # train/val/test percentages for a hash split; None: the dataset's own, else 90/5/5
    vocab: str | None = None
    tokenizer: str = "word"  # word | char | smiles (see capcli.tokenizers); a --vocab file's must match
    min_freq: int | None = None  # None: 5 for words, 1 for characters and SMILES tokens
    max_len: int | None = None  # longest training caption in tokens; None: the vocabulary's (else the tokenizer's default)
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
    patience: int = 5  # early stop after this many epochs without a better val BLEU-4 (val CIDEr with SCST)
    lr_patience: int = 2  # halve the learning rate after every this many of them (0: never)
    val_beam: int = 1  # validation captions: 1 greedy, K beam search
    init: str | None = None  # start from this model file's weights and vocabulary (and model settings)
    # self-critical training (capcli.scst)
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
        """Check the names before any data is read or any file is written."""
        check_names(self.encoder, self.attention, self.rnn)
        if self.tokenizer not in TOKENIZERS:
            raise CapcliError(f"unknown tokenizer {self.tokenizer!r} (choose {', '.join(TOKENIZERS)})")
        if self.data is None and self.captions is None:
            raise CapcliError("give the data: --data DIR, or --captions FILE --images DIR")
        if self.val_beam < 1:
            raise CapcliError("--val-beam must be at least 1")
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
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = {_RENAMED.get(k, k): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# config.json of runs started by capcli 0.1.0 used these names
_RENAMED = {"out": "output", "save_every_minutes": "save_every"}

# What --resume may change; everything else is the run's own and stays as it was.
RESUMABLE = ("epochs", "patience", "device", "precision", "workers", "save_every", "max_bad_fraction")
