"""Caption a dataset split with a Captioner and score it (``capcli evaluate``)."""

from __future__ import annotations

import dataclasses

from capcli.data.images import MAX_IMAGE_PIXELS
from capcli.metrics.captions import score_predictions


def evaluate_model(captioner, samples, options, batch_size: int = 32, tokenizer: str = "auto", on_result=None,
                   max_pixels: int = MAX_IMAGE_PIXELS):
    """Caption every sample's image with ``captioner`` and score against all of its references.

    ``options`` is a sampling.DecodeOptions (nbest is ignored: one caption per image is scored).
    Returns (scores, notes, results); unreadable images are left out of the scores and listed in
    notes. ``on_result(result)`` is called as each caption is made (for progress bars). Images of
    more than ``max_pixels`` pixels are refused as unreadable (0: no limit).
    """
    references, candidates, results, failed = {}, {}, [], []
    by_path = {str(s.image): s for s in samples}
    options = dataclasses.replace(options, nbest=1)
    for r in captioner.caption_stream([s.image for s in samples], options, batch_size, max_pixels=max_pixels):
        results.append(r)
        if on_result is not None:
            on_result(r)
        if not r.ok:
            failed.append(f"{r.path}: {r.error}")
            continue
        references[r.path] = list(by_path[r.path].captions)
        candidates[r.path] = r.caption
    if not candidates:
        raise ValueError("no image could be captioned")
    scores, notes = score_predictions(references, candidates, captioner.vocab.tokenizer, tokenizer)
    if failed:
        notes.append(f"{len(failed)} unreadable images left out (first: {failed[0]})")
    return scores, notes, results
