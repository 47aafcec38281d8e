"""How a dataset's images are split into train, val and test: its own split, or a hash of the image name."""

from __future__ import annotations

import hashlib
from typing import Sequence

from capcli.errors import CapcliError

SPLITS = ("train", "val", "test")


DEFAULT_SPLIT = (0.90, 0.05, 0.05)


def parse_split_ratios(text: str) -> tuple[float, float, float]:
    """"90/5/5" (or "0.9,0.05,0.05") -> (0.9, 0.05, 0.05)."""
    parts = [p for p in text.replace(",", "/").replace(":", "/").split("/") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0 or values[0] == 0:
        raise CapcliError(f"--split-ratios {text!r}: expected three numbers train/val/test such as 90/5/5")
    total = sum(values)
    return (values[0] / total, values[1] / total, values[2] / total)


def _ratio_text(ratios: Sequence[float]) -> str:
    """(0.9, 0.05, 0.05) -> "90/5/5"."""
    return "/".join(f"{round(r * 100, 1):g}" for r in ratios)


def hash_split(image_name: str, ratios: Sequence[float] = DEFAULT_SPLIT) -> str:
    """Deterministic split of one image by a hash of its file name (not its folder)."""
    digest = hashlib.blake2b(image_name.encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
    if u < ratios[0]:
        return "train"
    return "val" if u < ratios[0] + ratios[1] else "test"
