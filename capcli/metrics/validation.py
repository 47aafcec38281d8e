"""The validation score of an epoch, and which score picks a run's best epoch."""

from __future__ import annotations

from typing import Mapping, Sequence

from capcli.metrics.captions import score_captions
from capcli.metrics.sequence import sequence_scores

# The validation score (record key) that picks a run's best epoch, by tokenizer, and its label.
# Exact match stays near 0 for the first epochs of a SMILES model; edit similarity shows progress from the start.
SELECTION = {"word": "val_bleu4", "char": "val_edit_similarity", "smiles": "val_edit_similarity"}
# A run with self-critical training (capcli.train.scst) picks its best epoch by val CIDEr, in both phases.
CIDER_SELECTION = "val_cider"
METRIC_LABELS = {"val_bleu4": "val BLEU-4", "val_edit_similarity": "val edit similarity", "val_cider": "val CIDEr"}


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
