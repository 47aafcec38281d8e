"""The settings of one model, stored in its model file; importable without torch (the CLI checks
options with it before anything is loaded)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from capcli.choices import MODEL_LIMITS, check_names, model_setting_problem, shown
from capcli.errors import CapcliError


@dataclass
class ModelConfig:
    vocab_size: int
    encoder: str = "lite0"
    image_size: int = 224  # images are resized to image_size x image_size
    grid: int = 0  # pool the feature map to grid x grid; 0 keeps the encoder's own (7x7 at 224)
    feature_dim: int = 0  # D, filled in from the encoder
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # input normalisation, from the encoder
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    attention: str = "additive"
    rnn: str = "lstm"
    embed_dim: int = 256
    attention_dim: int = 256
    decoder_dim: int = 512
    dropout: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """The config a model file holds, checked (``validate``) before anything is built from it."""
        if "vocab_size" not in data:
            raise CapcliError("model config: no vocab_size")
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        for name in ("mean", "std"):
            value = getattr(cfg, name)
            if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(x) for x in value)):
                raise CapcliError(f"model config: {name} must be a list of 3 numbers, not {shown(value)}")
            setattr(cfg, name, tuple(value))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Known names, and sizes within choices.MODEL_LIMITS: a config never asks for more than capcli can train."""
        for name in ("encoder", "attention", "rnn"):
            if not isinstance(getattr(self, name), str):
                raise CapcliError(f"model config: {name} must be a name, not {shown(getattr(self, name))}")
        check_names(self.encoder, self.attention, self.rnn)
        for name in (*MODEL_LIMITS, "dropout"):
            if problem := model_setting_problem(name, getattr(self, name), name):
                raise CapcliError(f"model config: {problem}")
        if isinstance(self.feature_dim, bool) or not isinstance(self.feature_dim, int) or self.feature_dim < 0:
            raise CapcliError(f"model config: feature_dim must be a whole number, not {shown(self.feature_dim)}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
