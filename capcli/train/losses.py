"""The teacher-forced cross-entropy loss of a caption batch, with the attention penalty."""

from __future__ import annotations

import torch


def caption_loss(logits: torch.Tensor, alphas: torch.Tensor, padded: torch.Tensor, lengths: list[int],
                 label_smoothing: float = 0.0, attention_reg: float = 0.0, total_words: int | None = None,
                 total_captions: int | None = None, scale: float = 1.0):
    """Teacher-forced loss from ``Decoder.forward``'s outputs: (loss to minimise, summed word NLL
    as a detached tensor, word count).

    The doubly stochastic penalty is lambda * mean_i (1 - sum_t alpha_ti)^2: the paper's sum over
    the L cells, divided by L so that one lambda suits any grid size (with the plain sum, 49-196
    cells make it dwarf the word loss at lambda = 1).

    The means are sums divided by ``total_words`` / ``total_captions`` (default: this batch's own).
    Under DistributedDataParallel each rank holds part of a global batch and DDP averages the
    gradients over the ranks: dividing by the global counts and scaling by the number of ranks
    makes that average the gradient of the global batch's mean loss, as one process would get.
    """
    targets = padded[:, 1:]  # (N, T)
    steps = torch.arange(targets.size(1), device=targets.device)  # (T,)
    mask = steps.unsqueeze(0) < (torch.tensor(lengths, device=targets.device) - 1).unsqueeze(1)  # (N, T)
    logp = torch.log_softmax(logits[mask].float(), dim=-1)  # (W, V) for the W real words
    nll = -logp.gather(1, targets[mask].unsqueeze(1)).squeeze(1)  # (W,)
    words = nll.numel()
    n_words = total_words or words
    loss = nll.sum() / n_words
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * logp.sum() / (n_words * logp.size(1))
    if attention_reg:
        coverage = alphas.float().sum(dim=1)  # (N, L) attention each cell got over the caption
        n_cells = (total_captions or coverage.size(0)) * coverage.size(1)
        loss = loss + attention_reg * ((1.0 - coverage) ** 2).sum() / n_cells
    return loss * scale, nll.detach().sum(), words
