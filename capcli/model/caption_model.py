"""The whole model: CNN encoder -> grid of features (B, L, D) -> attention decoder."""

from __future__ import annotations

import math

import torch
from torch import nn

from capcli.model.config import ModelConfig
from capcli.model.decoder import Decoder
from capcli.model.encoders import Encoder


class CaptionModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.encoder = Encoder(cfg.encoder, cfg.grid)
        cfg.feature_dim = self.encoder.feature_dim
        cfg.mean, cfg.std = self.encoder.mean, self.encoder.std
        self.cfg = cfg
        self.decoder = Decoder(cfg)

    def grid_shape(self, cells: int | None = None) -> tuple[int, int]:
        """(h, w) of the attention grid, for drawing attention maps: of ``cells`` grid cells (L) when
        known, else found by running the encoder once."""
        if self.cfg.grid:
            return self.cfg.grid, self.cfg.grid
        side = cells
        if side is None:
            with torch.no_grad():
                side = self.encoder(torch.zeros(1, 3, self.cfg.image_size, self.cfg.image_size, device=self.device)).size(1)
        h = int(math.isqrt(side))
        return (h, side // h) if h * (side // h) == side else (1, side)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
