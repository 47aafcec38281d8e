"""Validating a run's model after an epoch: the teacher-forced loss on the val captions, and the
scores of the captions it writes for the val images, as ``capcli evaluate`` would write them."""

from __future__ import annotations

import math

import torch

from capcli.infer.decode import DecodeOptions, decode
from capcli.metrics.validation import validation_scores
from capcli.runtime import distributed
from capcli.runtime.devices import autocast
from capcli.text.tokenizers import DEFAULT_DECODE_LEN, DEFAULT_NO_REPEAT_NGRAM
from capcli.train.features import length_bucketed_batches
from capcli.train.losses import caption_loss
from capcli.train.setup import Run
from capcli.train.xe import collate, teacher_forced


@torch.no_grad()
def validate(run: Run) -> dict:
    """Validation loss (teacher forced) and the scores of real greedy (or --val-beam) outputs, no
    teacher forcing (BLEU-4 for words, and CIDEr with self-critical training; exact match and
    edit similarity for characters and SMILES).

    Under DDP the ranks share the batches out (whole batches, so each is computed as a single
    process would) and rank 0 scores the gathered captions; the other ranks return {}.
    """
    ctx, captions = run.ctx, run.val_set
    run.model.eval()
    if not len(captions):
        return {}
    nll_sum = words = 0
    batches = length_bucketed_batches([len(t) for t in captions.tokens], 256, torch.Generator().manual_seed(0))
    for batch in batches[ctx.rank::ctx.world_size]:
        inputs = run.source.load(sorted({captions.image[i] for i in batch}))
        batch = [i for i in batch if captions.image[i] in inputs.loaded_rows]
        if not batch:
            continue
        padded, lengths, order = collate([captions.tokens[i] for i in batch], run.device)
        with autocast(run.device, run.decoder_precision):
            x, rows = inputs.inputs_for_rows([captions.image[batch[i]] for i in order])
            (logits, alphas), _ = run.train_net(x, rows, teacher_forced(padded, lengths))
            _, nll, n = caption_loss(logits, alphas, padded, lengths)
        nll_sum, words = nll_sum + float(nll), words + n
    images = sorted(set(captions.image))
    samples = run.train_samples + run.val_samples
    candidates = {}
    chunks = [images[k:k + 128] for k in range(0, len(images), 128)]
    # The captions `capcli evaluate` would write (its longest output, its repetition guard), so val
    # scores what it scores.
    tokenizer = run.vocab.tokenizer
    options = DecodeOptions(beam_size=run.cfg.val_beam, max_len=DEFAULT_DECODE_LEN[tokenizer],
                            no_repeat_ngram=DEFAULT_NO_REPEAT_NGRAM[tokenizer])
    for chunk in chunks[ctx.rank::ctx.world_size]:
        with autocast(run.device, run.decoder_precision):
            features, ok = run.source.features(chunk)  # (n, L, D) of the readable images
            loaded = [i for i, good in zip(chunk, ok) if good]
            hyps = decode(run.model.decoder, features, options) if loaded else []  # beam 1: greedy
        candidates.update({str(i): run.vocab.decode(h[0].tokens) for i, h in zip(loaded, hyps)})
    if ctx.enabled:
        parts = distributed.all_gather_object(ctx, (nll_sum, words, candidates))
        if not ctx.is_main:
            return {}
        nll_sum, words = sum(p[0] for p in parts), sum(p[1] for p in parts)
        candidates = {k: v for p in parts for k, v in p[2].items()}
    if not candidates:
        return {}
    references = {k: list(samples[int(k)].captions) for k in candidates}
    return {"val_loss": nll_sum / max(words, 1), "val_ppl": math.exp(min(nll_sum / max(words, 1), 50)),
            **validation_scores(references, candidates, run.vocab.tokenizer, cider=run.cfg.scst_after is not None)}
