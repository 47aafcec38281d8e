"""Metrics for sequences read character by character (char and SMILES models): exact match and
normalised edit similarity. Each prediction is scored against the best of its references."""

from __future__ import annotations

from typing import Mapping, Sequence


def levenshtein(a: str, b: str) -> int:
    """Edit distance: the fewest insertions, deletions and substitutions that turn ``a`` into ``b``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:0] to each prefix of b
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / max(len a, len b), in characters: 1 for equal strings, 0 for nothing in common."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


def sequence_scores(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> dict[str, float]:
    """{"exact match": fraction equal to a reference, "edit similarity": mean of the best edit similarity}."""
    keys = sorted(candidates)
    if not keys:
        raise ValueError("no predictions to score")
    exact = sum(candidates[k] in references[k] for k in keys)
    similarity = sum(max(edit_similarity(candidates[k], r) for r in references[k]) for k in keys)
    return {"exact match": exact / len(keys), "edit similarity": similarity / len(keys)}
