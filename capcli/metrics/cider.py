"""CIDEr-D (Vedantam et al., 2015) with fixed document frequencies: the self-critical reward.

The math is coco-caption's (pycocoevalcap's ``CiderScorer``), step for step: n-grams n = 1..4,
tf-idf vectors with idf = log(images) - log(max(1, df)), per n the cosine of candidate and
reference with the candidate's weights clipped at the reference's (min(v_c, v_r) * v_r), a
Gaussian length penalty exp(-delta^2 / (2 sigma^2)) with sigma 6, then the mean over n, the mean
over the references, x10. Like coco-caption, the "length" of a sentence is its number of bigrams
(words - 1; only the difference of two lengths is ever used).

What differs is where the document frequencies come from. pycocoevalcap counts them from the
references of each call, in pure Python, every time; here they are counted once, from a fixed
corpus (the train split's references, see capcli.train.scst), and a reference's vector is built once per
``prepare`` and reused for all candidates of its image. Sentences are lists of tokens; tokenizing
them is the caller's business.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

from capcli.files import FileProblem, atomic_write_bytes, read_json

N = 4  # n-grams of 1..N words
SIGMA = 6.0  # standard deviation of the length penalty, in words

Ngram = tuple  # of str


def ngram_counts(words: Sequence[str], n: int = N) -> dict[Ngram, int]:
    """Every n-gram of 1..n words in ``words`` with its count."""
    counts: dict[Ngram, int] = {}
    for k in range(1, n + 1):
        for g in zip(*[words[i:] for i in range(k)]):  # the k-word windows, as tuples
            counts[g] = counts.get(g, 0) + 1
    return counts


def document_frequencies(references: Iterable[Sequence[Sequence[str]]], n: int = N) -> tuple[dict[Ngram, int], int]:
    """(df, images): df[g] = how many images have n-gram g in at least one of their references.

    ``references`` holds, per image, its reference sentences (token lists).
    """
    df: dict[Ngram, int] = {}
    images = 0
    for refs in references:
        images += 1
        for g in {g for ref in refs for g in ngram_counts(ref, n)}:
            df[g] = df.get(g, 0) + 1
    return df, images


class Vector(NamedTuple):
    """A sentence as CIDEr sees it: tf-idf weights per n-gram size, their norms, its length."""

    weights: list[dict[Ngram, float]]  # one dict per n
    norms: list[float]  # (n,)
    length: int  # number of bigrams, as coco-caption counts it


class CiderD:
    """CIDEr-D against fixed document frequencies ``df`` counted over ``images`` images."""

    def __init__(self, df: Mapping[Ngram, float], images: int, n: int = N, sigma: float = SIGMA):
        if images < 1:
            raise ValueError("document frequencies need at least one image")
        self.n, self.sigma = n, sigma
        self.ref_len = math.log(float(images))  # coco-caption's name: log of the corpus size
        # Stored as idf weights: the counts are only ever used through this.
        self.idf = {g: self.ref_len - math.log(max(1.0, float(c))) for g, c in df.items()}

    def vector(self, words: Sequence[str]) -> Vector:
        weights: list[dict[Ngram, float]] = [{} for _ in range(self.n)]
        squares = [0.0] * self.n
        length = 0
        for g, tf in ngram_counts(words, self.n).items():
            k = len(g) - 1
            w = float(tf) * self.idf.get(g, self.ref_len)  # unseen n-gram: df counts as 1, log 1 = 0
            weights[k][g] = w
            squares[k] += w * w
            if k == 1:
                length += tf
        return Vector(weights, [math.sqrt(s) for s in squares], length)

    def prepare(self, references: Sequence[Sequence[str]]) -> list[Vector]:
        """An image's references as vectors: build once, score many candidates against them."""
        return [self.vector(r) for r in references]

    def score(self, candidate: Sequence[str] | Vector, references: Sequence[Sequence[str]] | list[Vector]) -> float:
        """CIDEr-D of one candidate against an image's references (token lists, or ``prepare``'s vectors)."""
        if not references:
            raise ValueError("CIDEr-D needs at least one reference")
        c = candidate if isinstance(candidate, Vector) else self.vector(candidate)
        refs = references if isinstance(references[0], Vector) else self.prepare(references)  # type: ignore[arg-type]
        two_sigma_sq = 2.0 * self.sigma ** 2
        total = 0.0
        for r in refs:
            penalty = math.exp(-float(c.length - r.length) ** 2 / two_sigma_sq)
            for k in range(self.n):
                hyp, ref = c.weights[k], r.weights[k]
                val = 0.0
                for g, w in hyp.items():
                    wr = ref.get(g)
                    if wr is not None:
                        val += min(w, wr) * wr  # clipping: repeating a reference word earns nothing more
                if c.norms[k] != 0 and r.norms[k] != 0:
                    val /= c.norms[k] * r.norms[k]
                total += val * penalty
        return total / self.n / len(refs) * 10.0


# --------------------------------------------------------------------------- the cached file

FORMAT = "capcli-cider-df"


def fingerprint(references: Iterable[Sequence[Sequence[str]]]) -> str:
    """A hash of a corpus of references: a cached df is reused only for the very corpus it counts."""
    h = hashlib.sha256()
    for refs in references:
        for ref in refs:
            h.update("\x1f".join(ref).encode())
            h.update(b"\x1e")
        h.update(b"\x1d")
    return h.hexdigest()


def save_document_frequencies(path: str | Path, df: Mapping[Ngram, int], images: int, key: str, note: str = "") -> None:
    """JSON, n-grams as space-joined tokens (a token never holds a space): {"a dog": 12, ...}."""
    data = {"format": FORMAT, "images": images, "key": key, "note": note,
            "df": {" ".join(g): c for g, c in sorted(df.items(), key=lambda item: (len(item[0]), item[0]))}}
    atomic_write_bytes(Path(path), json.dumps(data, ensure_ascii=False).encode())


def load_document_frequencies(path: str | Path, key: str) -> tuple[dict[Ngram, int], int] | None:
    """(df, images) from ``path`` if it holds the df of the corpus ``key``; None if absent, damaged or another corpus's."""
    try:
        data = read_json(path, "document frequencies")
    except FileProblem:
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
        return None
    try:
        return {tuple(g.split(" ")): int(c) for g, c in data["df"].items()}, int(data["images"])
    except (KeyError, AttributeError, TypeError, ValueError):
        return None
