"""Vocabulary: tokens <-> ids, saved as JSON with its tokenizer and the counts it was built from."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from capcli.choices import MODEL_LIMITS, shown
from capcli.errors import CapcliError
from capcli.files import FileProblem, atomic_write_bytes, read_json
from capcli.text.tokenizers import DEFAULT_MAX_LEN, check_tokenizer, detokenize, tokenize

SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
PAD, START, END, UNK = range(4)
MAX_TOKENS = MODEL_LIMITS["vocab_size"][1]

# What no token may hold: control characters (C0, DEL, C1 with U+0085), the line and paragraph
# separators, and lone surrogates. Written in a caption they would break or forge output lines (a
# token "\nb.jpg\tx"), and a lone surrogate cannot be written as UTF-8 at all. Spaces are fine: a
# char model's alphabet holds " ".
_UNWRITABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


@dataclass
class Vocab:
    words: list[str]  # id -> token (a word, a character or a SMILES token); the four specials first
    counts: dict[str, int] = field(default_factory=dict)  # train-split counts, for the record
    min_freq: int = 1
    max_len: int = 50  # longest training sequence, in tokens
    tokenizer: str = "word"  # see capcli.text.tokenizers

    def __post_init__(self) -> None:
        try:
            check_tokenizer(self.tokenizer)
        except ValueError as e:
            raise CapcliError(str(e)) from None
        if tuple(self.words[:4]) != SPECIALS:
            raise CapcliError(f"vocabulary must start with {' '.join(SPECIALS)}")
        if len(self.words) > MAX_TOKENS:  # before anything is built from them
            raise CapcliError(f"vocabulary has {len(self.words)} tokens, more than capcli's limit of {MAX_TOKENS}")
        if _UNWRITABLE.search("".join(self.words)):  # one search over all: fast for big vocabularies
            i, token = next((i, w) for i, w in enumerate(self.words) if _UNWRITABLE.search(w))
            char = _UNWRITABLE.search(token).group()
            raise CapcliError(f"vocabulary token {i} ({shown(token)}) holds a control character (U+{ord(char):04X})")
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
        # A caption's control characters (e.g. a NUL in a char model's data) stay out: they read as <unk>
        kept = sorted((w for w, n in counts.items() if n >= min_freq and not _UNWRITABLE.search(w)),
                      key=lambda w: (-counts[w], w))
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
        if not (isinstance(data, dict) and isinstance(data.get("words"), list)):
            raise bad
        counts, min_freq, max_len = data.get("counts", {}), data.get("min_freq", 1), data.get("max_len", 50)
        tokenizer = data.get("tokenizer", "word")  # files written before capcli 0.3 hold words
        if not (all(isinstance(w, str) for w in data["words"]) and isinstance(counts, dict)
                and all(_is_count(n) for n in counts.values()) and _is_count(min_freq) and min_freq >= 1
                and _is_count(max_len) and max_len >= 1 and isinstance(tokenizer, str)):
            raise bad
        try:
            return cls(list(data["words"]), dict(counts), min_freq, max_len, tokenizer)
        except CapcliError as e:
            raise CapcliError(f"{source}: {e.message}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), json.dumps(self.to_json(), ensure_ascii=False, indent=1).encode())

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        try:
            data = read_json(path, "vocabulary")
        except FileProblem as e:
            raise CapcliError(str(e)) from None
        return cls.from_json(data, str(path))


def _is_count(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0
