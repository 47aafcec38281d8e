"""Cross-entropy training: teacher forcing on the reference captions, the loss of capcli.train.losses."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from capcli.runtime import distributed
from capcli.runtime.devices import autocast
from capcli.text.vocab import PAD
from capcli.train.features import CaptionSet
from capcli.train.losses import caption_loss
from capcli.train.objective import StepContext


def collate(tokens: Sequence[list[int]], device: torch.device):
    """Captions -> (padded ids (N, T+1), lengths, order): longest first, as Decoder.forward wants."""
    order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i]))
    lengths = [len(tokens[i]) for i in order]
    padded = torch.full((len(order), lengths[0]), PAD, dtype=torch.long)  # (N, T+1)
    for row, i in enumerate(order):
        padded[row, : lengths[row]] = torch.tensor(tokens[i])
    return padded.to(device, non_blocking=True), lengths, order


def teacher_forced(padded: torch.Tensor, lengths: list[int]):
    """The TrainNet head of teacher forcing: features -> logits (N, T, V), alphas (N, T, L)."""
    return lambda decoder, features: decoder(features, padded, lengths)


class CrossEntropy:
    """Batches of --batch-size captions (bucketed by length); under DDP each process computes its
    slice, and the loss is divided by the global batch's word count, so the processes' averaged
    gradient is the global batch's."""

    phase = "xe"

    def __init__(self, run: StepContext, captions: CaptionSet):
        self.run, self.captions = run, captions

    def batches(self, generator: torch.Generator) -> list[list[int]]:
        return self.run.source.batches(self.captions, self.run.cfg.batch_size, generator)

    def step(self, batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        """Captions of images found unreadable are left out; the loss is still divided by the global
        batch's word count (every process knows it without asking the others)."""
        run, captions = self.run, self.captions
        cfg, ctx = run.cfg, run.ctx
        # This process's part of the batch (caption indices), less the captions of unreadable images.
        local_rows = distributed.shard_batch(batch, ctx.rank, ctx.world_size) if ctx.enabled else batch
        inputs = run.source.load(sorted({captions.image[i] for i in local_rows}))
        local_rows = [i for i in local_rows if captions.image[i] in inputs.loaded_rows]
        has_rows = bool(local_rows)
        if not has_rows:  # nothing to train on here: join the gradient all-reduce with a zero-weight caption
            local_rows = batch[:1]
            inputs = run.source.placeholder(captions.image[batch[0]])
        total_words = sum(len(captions.tokens[i]) - 1 for i in batch)
        padded, lengths, order = collate([captions.tokens[i] for i in local_rows], run.device)
        attention_reg = cfg.attention_reg if cfg.attention != "none" else 0.0
        with autocast(run.device, run.precision):
            image_rows = [captions.image[local_rows[i]] for i in order]  # the image of each caption, longest first
            x, rows = inputs.inputs_for_rows(image_rows)  # (N, L, D), or images and rows
            (logits, alphas), _ = run.net(x, rows, teacher_forced(padded, lengths))
            loss, nll, _ = caption_loss(logits, alphas, padded, lengths, cfg.label_smoothing, attention_reg,
                                        total_words=total_words, total_captions=len(batch),
                                        scale=ctx.world_size * float(has_rows))
        nll = float(distributed.all_reduce_sum(ctx, (nll * float(has_rows)).reshape(1)))
        return loss, {"nll": nll, "words": total_words, "captions": len(batch)}

    def progress(self, sums: dict) -> dict[str, float]:
        mean = sums.get("nll", 0.0) / max(sums.get("words", 0), 1)
        return {"loss": mean, "ppl": math.exp(min(mean, 50))}

    def summary(self, sums: dict) -> tuple[dict, float, str]:
        train_loss = sums.get("nll", 0.0) / max(sums.get("words", 0), 1)
        return ({"train_loss": train_loss, "train_ppl": math.exp(min(train_loss, 50))}, -train_loss,
                f"train loss {train_loss:.3f}")
