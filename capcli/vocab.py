"""Tokenizer and vocabulary: words <-> ids, saved as JSON with the counts it was built from."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from capcli.errors import CapcliError
from capcli.files import FileProblem, atomic_write_bytes, read_json

SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
PAD, START, END, UNK = range(4)

# A word is a run of letters or digits, possibly with inner apostrophes ("dog's").
# Everything else (punctuation, whitespace) separates words and is dropped: a caption's
# trailing " ." carries no meaning and would only teach the model to print it.
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
# Typographic apostrophes (’ ‘ ʼ) as typed by phones and word processors: the same word as with '.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def tokenize(text: str) -> list[str]:
    """Lowercase and split into words, dropping punctuation: "A dog, running." -> [a, dog, running]."""
    return _WORD.findall(text.lower().translate(_APOSTROPHES))


@dataclass
class Vocab:
    words: list[str]  # id -> word; the four specials first
    counts: dict[str, int] = field(default_factory=dict)  # train-split counts, for the record
    min_freq: int = 1
    max_len: int = 50  # longest training caption, in words

    def __post_init__(self) -> None:
        if tuple(self.words[:4]) != SPECIALS:
            raise CapcliError(f"vocabulary must start with {' '.join(SPECIALS)}")
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise CapcliError("vocabulary has duplicate words")

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 5, max_len: int = 50) -> "Vocab":
        """Count words over ``captions`` (the train split only) and keep those seen ``min_freq`` times."""
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + kept, dict(counts), min_freq, max_len)

    def encode(self, caption: str) -> list[int]:
        """Caption -> [<start>, w1, ..., wn, <end>]; unknown words become <unk>."""
        ids = [self.index.get(w, UNK) for w in tokenize(caption)]
        return [START, *ids, END]

    def decode_ids(self, ids: Sequence[int]) -> list[str]:
        """Ids -> words, stopping at <end> and skipping the other specials."""
        words = []
        for i in ids:
            if i == END:
                break
            if i >= len(SPECIALS):
                words.append(self.words[i])
        return words

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.decode_ids(ids))

    def coverage(self, captions: Iterable[str]) -> float:
        """Fraction of word occurrences in ``captions`` that the vocabulary knows."""
        known = total = 0
        for c in captions:
            for w in tokenize(c):
                total += 1
                known += w in self.index
        return known / total if total else 0.0

    def to_json(self) -> dict:
        return {"words": self.words, "counts": self.counts, "min_freq": self.min_freq, "max_len": self.max_len}

    @classmethod
    def from_json(cls, data: object, source: str = "vocabulary") -> "Vocab":
        bad = CapcliError(f"{source}: not a capcli vocabulary (expected JSON with a 'words' list)")
        if not (isinstance(data, dict) and isinstance(data.get("words"), list) and all(isinstance(w, str) for w in data["words"])):
            raise bad
        try:
            return cls(
                list(data["words"]),
                {str(k): int(v) for k, v in dict(data.get("counts", {})).items()},
                int(data.get("min_freq", 1)),
                int(data.get("max_len", 50)),
            )
        except CapcliError as e:
            raise CapcliError(f"{source}: {e.message}") from None
        except (KeyError, TypeError, ValueError, AttributeError):
            raise bad from None

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), json.dumps(self.to_json(), ensure_ascii=False, indent=1).encode())

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        try:
            data = read_json(path, "vocabulary")
        except FileProblem as e:
            raise CapcliError(str(e)) from None
        return cls.from_json(data, str(path))
