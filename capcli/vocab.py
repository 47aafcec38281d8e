"""Vocabulary: tokens <-> ids, saved as JSON with its tokenizer and the counts it was built from."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from capcli.errors import CapcliError
from capcli.files import FileProblem, atomic_write_bytes, read_json
from capcli.tokenizers import DEFAULT_MAX_LEN, check_tokenizer, detokenize, tokenize

SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
PAD, START, END, UNK = range(4)


@dataclass
class Vocab:
    words: list[str]  # id -> token (a word, a character or a SMILES token); the four specials first
    counts: dict[str, int] = field(default_factory=dict)  # train-split counts, for the record
    min_freq: int = 1
    max_len: int = 50  # longest training sequence, in tokens
    tokenizer: str = "word"  # see capcli.tokenizers

    def __post_init__(self) -> None:
        try:
            check_tokenizer(self.tokenizer)
        except ValueError as e:
            raise CapcliError(str(e)) from None
        if tuple(self.words[:4]) != SPECIALS:
            raise CapcliError(f"vocabulary must start with {' '.join(SPECIALS)}")
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise CapcliError("vocabulary has duplicate words")

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int | None = None, max_len: int | None = None,
              tokenizer: str = "word") -> "Vocab":
        """Count tokens over ``captions`` (the train split only) and keep those seen ``min_freq`` times.

        By default words need 5 sightings; characters and SMILES tokens 1, since a character model
        must be able to write every symbol of its alphabet.
        """
        check_tokenizer(tokenizer)
        if min_freq is None:
            min_freq = 5 if tokenizer == "word" else 1
        counts = Counter(w for c in captions for w in tokenize(c, tokenizer))
        kept = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + kept, dict(counts), min_freq, max_len or DEFAULT_MAX_LEN[tokenizer], tokenizer)

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.tokenizer)

    def encode(self, caption: str) -> list[int]:
        """Caption -> [<start>, t1, ..., tn, <end>]; unknown tokens become <unk>."""
        ids = [self.index.get(w, UNK) for w in self.tokenize(caption)]
        return [START, *ids, END]

    def decode_ids(self, ids: Sequence[int]) -> list[str]:
        """Ids -> tokens, stopping at <end> and skipping the other specials."""
        words = []
        for i in ids:
            if i == END:
                break
            if i >= len(SPECIALS):
                words.append(self.words[i])
        return words

    def decode(self, ids: Sequence[int]) -> str:
        return detokenize(self.decode_ids(ids), self.tokenizer)

    def coverage(self, captions: Iterable[str]) -> float:
        """Fraction of token occurrences in ``captions`` that the vocabulary knows."""
        known = total = 0
        for c in captions:
            for w in self.tokenize(c):
                total += 1
                known += w in self.index
        return known / total if total else 0.0

    def to_json(self) -> dict:
        return {"words": self.words, "counts": self.counts, "min_freq": self.min_freq, "max_len": self.max_len,
                "tokenizer": self.tokenizer}

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
                str(data.get("tokenizer", "word")),  # files written before capcli 0.3 hold words
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
