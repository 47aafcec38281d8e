"""What a training objective is, and the module DistributedDataParallel wraps.

An objective takes one global batch of the epoch and gives back a loss and the batch's figures
(summed over the processes); the loop (capcli.train.loop) runs backward and the optimizer step,
adds the figures to the epoch's sums and never asks which objective it runs. Cross-entropy
(capcli.train.xe) and self-critical training (capcli.train.scst) are the two; a third is a new
file with the same four methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from capcli.model.caption_model import CaptionModel
from capcli.model.decoder import Decoder
from capcli.runtime.distributed import DistContext
from capcli.train.config import TrainConfig


@dataclass
class StepContext:
    """What an objective's steps use of the run."""

    cfg: TrainConfig
    ctx: DistContext
    net: nn.Module  # TrainNet, or DistributedDataParallel around it
    decoder: Decoder  # the bare decoder, for passes without gradients
    source: object  # the feature source (capcli.train.features)
    device: torch.device
    precision: str  # the decoder's (capcli.runtime.devices.decoder_precision)


class Objective(Protocol):
    phase: str  # recorded with each epoch ("xe", "scst")

    def batches(self, generator: torch.Generator) -> list[list[int]]:
        """The epoch's global batches, the same on every process."""

    def step(self, batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to minimise, figures of the global batch to add to the epoch's sums)."""

    def progress(self, sums: dict) -> dict[str, float]:
        """What the progress bar shows of the epoch so far."""

    def summary(self, sums: dict) -> tuple[dict, float, str]:
        """(the epoch record's train figures, the score that picks the best epoch when there is no
        validation set, a phrase for the epoch's log line)."""


class TrainNet(nn.Module):
    """What DistributedDataParallel wraps: the batch's inputs -> features -> ``head(decoder, features)``.

    Inputs are cached features (N, L, D), or with a fine-tuned encoder the input of its top
    ``top_blocks`` blocks for the batch's distinct images (the cached output of the frozen part
    below them (n_img, C, h, w), or the images (n_img, 3, S, S) when the whole encoder runs) and
    ``rows``, the image of each row: those blocks then run inside the forward, so DDP also averages
    their gradients. ``head`` is the objective's use of the decoder (teacher forcing, sampling);
    returns (its output, the features).
    """

    def __init__(self, model: CaptionModel, top_blocks: int = 0):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder
        self.top_blocks = top_blocks  # the feature source's (capcli.train.features)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None, head: Callable[[Decoder, torch.Tensor], object]):
        if rows is not None:
            # (N, L, D): once per image, shared by its rows. index_select, not x[rows]: on the CPU the
            # gradient of indexing adds an image's rows in a varying order (threads), index_select's in
            # a fixed one, so a resumed run ends bit for bit as one never stopped.
            x = self.encoder.upper(x, self.top_blocks).index_select(0, rows)
        return head(self.decoder, x), x
