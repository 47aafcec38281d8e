"""Captioning a whole collection: where one process's results go (result file, stdout, sidecars),
which of its images it can skip, and what it counted.

The command line drives it (``capcli caption|beam DIR -o FILE --resume --sidecar .txt``); nothing
here prints. The pieces: result lines (result_lines.py), result files that resume, locked
(result_files.py), the shares of several processes and their merged parts (shards.py), and
sidecar files (sidecars.py).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from capcli.errors import CapcliError
from capcli.infer.result_files import ResultFile
from capcli.infer.result_lines import json_line, line_problem, result_json, result_line
from capcli.infer.shards import part_path
from capcli.infer.sidecars import Sidecars


@dataclass
class Counts:
    """What a process did with its images; the counts of several processes add up (``sum(..., Counts())``)."""

    captioned: int = 0  # results made by this run, failures included
    failed: int = 0  # unreadable, or the sidecar could not be written
    written: int = 0  # sidecars written
    skipped: int = 0  # already in the result file, or with a sidecar (never read)

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(*(a + b for a, b in zip(astuple(self), astuple(other))))


class Outputs:
    """One process's outputs: each result goes to the result file (``output``, or its part
    ``index`` of ``count``) or back to the caller for stdout, and to its sidecar; the images
    already there are skipped; everything is counted. ``also_done`` holds images done elsewhere
    (the file merged by an earlier run of several processes)."""

    def __init__(self, fmt: str, output: Path | None, resume: bool, sidecars: Sidecars | None,
                 index: int = 0, count: int = 1, also_done: set[str] | None = None):
        self.fmt, self.sidecars = fmt, sidecars
        target = output if count == 1 or output is None else part_path(output, index, count)
        self.file = None if target is None else ResultFile(target, fmt, resume)
        self.done = (self.file.done if self.file else set()) | (also_done or set())
        self.counts = Counts()

    def todo(self, items: Iterable) -> Iterator:
        """``items`` less those already in the result file or with a sidecar (counted as skipped)."""
        for item in items:
            if str(item) in self.done or (self.sidecars is not None and not self.sidecars.wanted(str(item))):
                self.counts.skipped += 1
                continue
            yield item

    def put(self, r) -> str | None:
        """Write ``r``'s sidecar and result line; returns the line for stdout when there is no
        result file. A result its line cannot hold, or whose sidecar cannot be written, becomes a
        failure (``r.error``)."""
        self.counts.captioned += 1
        if r.ok and (problem := line_problem(r, self.fmt)):
            r.error = problem  # before its sidecar: an image has all its outputs or fails
        if r.ok and self.sidecars is not None:
            try:
                text = json_line(result_json(r)) if self.fmt == "jsonl" else r.caption
                if self.sidecars.write(r.path, text):
                    self.counts.written += 1
                else:
                    self.counts.skipped += 1  # appeared meanwhile
            except CapcliError as e:
                r.error = e.message
            except OSError as e:
                r.error = f"cannot write its sidecar: {e.strerror or e}"
        self.counts.failed += not r.ok
        line = result_line(r, self.fmt)
        if line is not None and self.file is not None:
            self.file.write(line)
            return None
        return line

    def close(self, failed: bool = False) -> None:
        """Close the result file (see ResultFile.close for ``failed``)."""
        if self.file is not None:
            self.file.close(failed)
