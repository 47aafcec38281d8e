"""A collection shared by several processes (torchrun) or jobs (--shard I/N): which images each
takes, the part file each writes, and the parts merged into one file in input order."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from capcli.errors import CapcliError
from capcli.files import atomic_write
from capcli.infer.result_files import line_key, whole_lines
from capcli.runtime.distributed import shard_range


def parse_shard(text: str) -> tuple[int, int]:
    """--shard I/N -> (I, N): job I (counted from 0) of N."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise CapcliError(f"--shard {text!r}: expected I/N, e.g. 0/4 for the first of 4 jobs") from None
    if count < 1 or not 0 <= index < count:
        raise CapcliError(f"--shard {text}: I must be 0..{max(count, 1) - 1} (jobs are counted from 0)")
    return index, count


def share(items: Sequence, index: int, count: int, batch_size: int) -> Sequence:
    """Share ``index`` of ``count`` of the sorted input list: contiguous runs of whole batches, so
    every image is captioned in the same batch, beside the same images, as one process would, and
    the parts concatenated in order are the input order."""
    lo, hi = shard_range(math.ceil(len(items) / batch_size), index, count)  # in batches
    return items[lo * batch_size:min(hi * batch_size, len(items))]


def part_path(output: Path, index: int, count: int) -> Path:
    """out.jsonl -> out.part-3-of-8.jsonl (numbers padded, so the parts sort in order)."""
    width = len(str(count - 1))
    return output.with_name(f"{output.stem}.part-{index:0{width}d}-of-{count}{output.suffix}")


def merge_parts(output: Path, parts: Sequence[Path], fmt: str) -> int:
    """Write ``output`` as its own lines (if it exists) then each part's, in order, atomically;
    lines about an image already written are dropped. Removes the parts. Returns the lines written."""
    seen: set[str] = set()
    written = 0

    def write(tmp: Path) -> None:
        nonlocal written
        with open(tmp, "wb") as out:
            for source in ([output] if output.exists() else []) + list(parts):
                with open(source, "rb") as f:
                    for number, line in whole_lines(f):  # a line cut off by a kill: never in a finished part
                        if fmt != "text":
                            key = line_key(line[:-1], fmt, f"{source} line {number}")
                            if key in seen:
                                continue
                            seen.add(key)
                        out.write(line)
                        written += 1

    atomic_write(output, write)
    for part in parts:
        part.unlink(missing_ok=True)
    return written
