"""Scores of a model's output, by its tokenizer: caption metrics with pycocoevalcap for words
(BLEU-1..4, METEOR (needs Java), ROUGE-L, CIDEr); exact match and edit similarity for characters
and SMILES, with chemistry metrics for SMILES when RDKit is installed."""

from __future__ import annotations

import contextlib
import io
import shutil
from typing import Mapping, Sequence

from capcli.metrics.chemistry import chem_scores, rdkit_available
from capcli.metrics.sequence import sequence_scores
from capcli.text.tokenizers import tokenize

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
