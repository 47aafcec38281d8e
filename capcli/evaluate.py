"""Scores of a model's output, by its tokenizer: caption metrics with pycocoevalcap for words
(BLEU-1..4, METEOR (needs Java), ROUGE-L, CIDEr); exact match and edit similarity for characters
and SMILES, with chemistry metrics for SMILES when RDKit is installed."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
from typing import Mapping, Sequence

from capcli.chem_metrics import chem_scores, rdkit_available
from capcli.images import MAX_IMAGE_PIXELS
from capcli.sequence_metrics import sequence_scores
from capcli.tokenizers import tokenize

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def java_available() -> bool:
    return shutil.which("java") is not None


def _simple_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    return {k: [" ".join(tokenize(c)) for c in v] for k, v in captions.items()}


@contextlib.contextmanager
def _quiet_fd2():
    """Silence the Java tokenizer's chatter on stderr (it writes to the inherited file descriptor)."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(io.StringIO()), _quiet_fd2():
        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def score_captions(
    references: Mapping[str, Sequence[str]],
    candidates: Mapping[str, str],
    metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE-L", "CIDEr"),
    tokenizer: str = "auto",
) -> tuple[dict[str, float], list[str]]:
    """Score one candidate per id against all of its references.

    ``metrics`` picks families: "BLEU" (gives BLEU-1..4), "METEOR", "ROUGE-L", "CIDEr".
    ``tokenizer``: "ptb" (Stanford PTB tokenizer, needs Java), "simple" (capcli's own: lowercase,
    punctuation dropped) or "auto" (ptb when Java is present). Returns (scores, notes): notes say
    what was skipped and why.
    """
    keys = sorted(candidates)
    if not keys:
        raise ValueError("no captions to score")
    notes: list[str] = []
    use_ptb = tokenizer == "ptb" or (tokenizer == "auto" and java_available())
    tok = _ptb_tokenize if use_ptb else _simple_tokenize
    gts = tok({k: list(references[k]) for k in keys})
    res = tok({k: [candidates[k]] for k in keys})
    # pycocoevalcap's scorers assume a non-empty hypothesis (METEOR can hang on an empty one).
    res = {k: [v[0] if v and v[0].strip() else "empty"] for k, v in res.items()}
    scores: dict[str, float] = {}
    # The scorers print to stdout, which carries capcli's results only.
    with contextlib.redirect_stdout(io.StringIO()):
        if "BLEU" in metrics:
            from pycocoevalcap.bleu.bleu import Bleu

            bleu, _ = Bleu(4).compute_score(gts, res)
            scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
        if "METEOR" in metrics:
            if java_available():
                from pycocoevalcap.meteor.meteor import Meteor

                meteor = Meteor()
                try:
                    scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
                finally:
                    with contextlib.suppress(Exception):
                        meteor.close()
            else:
                notes.append("METEOR skipped: it needs a Java runtime (java not found on PATH)")
        if "ROUGE-L" in metrics:
            from pycocoevalcap.rouge.rouge import Rouge

            scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        if "CIDEr" in metrics:
            from pycocoevalcap.cider.cider import Cider

            scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if not use_ptb and tokenizer == "auto":
        notes.append("tokenised without Java: lowercase, punctuation removed (PTB tokenizer needs java)")
    return {m: scores[m] for m in METRICS if m in scores}, notes


def score_predictions(
    references: Mapping[str, Sequence[str]], candidates: Mapping[str, str], kind: str = "word", tokenizer: str = "auto",
) -> tuple[dict[str, float], list[str]]:
    """Score one prediction per id the way its model's tokenizer ``kind`` calls for; (scores, notes).

    ``tokenizer`` is score_captions' (word models only).
    """
    if kind == "word":
        return score_captions(references, candidates, tokenizer=tokenizer)
    scores, notes = sequence_scores(references, candidates), []
    if kind == "smiles":
        if rdkit_available():
            scores.update(chem_scores(references, candidates))
        else:
            notes.append("chemistry metrics skipped: they need RDKit (pip install 'capcli[chem]')")
    return scores, notes


# The validation score (record key) that picks a run's best epoch, by tokenizer; labels: curves.METRIC_LABELS.
# Exact match stays near 0 for the first epochs of a SMILES model; edit similarity shows progress from the start.
SELECTION = {"word": "val_bleu4", "char": "val_edit_similarity", "smiles": "val_edit_similarity"}
# A run with self-critical training (capcli.scst) picks its best epoch by val CIDEr, in both phases.
CIDER_SELECTION = "val_cider"


def validation_scores(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str], kind: str,
                      cider: bool = False) -> dict[str, float]:
    """The validation record of an epoch: BLEU-4 for words (no Java needed; and CIDEr if ``cider``),
    else exact match and edit similarity."""
    if kind == "word":
        scores, _ = score_captions(references, candidates, metrics=("BLEU", "CIDEr") if cider else ("BLEU",),
                                   tokenizer="simple")
        return {"val_bleu4": scores["BLEU-4"], **({"val_cider": scores["CIDEr"]} if cider else {})}
    scores = sequence_scores(references, candidates)
    return {"val_exact_match": scores["exact match"], "val_edit_similarity": scores["edit similarity"]}


def evaluate_model(captioner, samples, options, batch_size: int = 32, tokenizer: str = "auto", on_result=None,
                   max_pixels: int = MAX_IMAGE_PIXELS):
    """Caption every sample's image with ``captioner`` and score against all of its references.

    ``options`` is a sampling.DecodeOptions (nbest is ignored: one caption per image is scored).
    Returns (scores, notes, results); unreadable images are left out of the scores and listed in
    notes. ``on_result(result)`` is called as each caption is made (for progress bars). Images of
    more than ``max_pixels`` pixels are refused as unreadable (0: no limit).
    """
    references, candidates, results, failed = {}, {}, [], []
    by_path = {str(s.image_path): s for s in samples}
    options = dataclasses.replace(options, nbest=1)
    for r in captioner.caption_stream([s.image_path for s in samples], options, batch_size, max_pixels=max_pixels):
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
