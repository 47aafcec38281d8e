"""Captioning a whole collection: the share of the images each process takes, result lines, result
files that resume, the parts of several processes merged in input order, and sidecar files.

The command line drives it (``capcli caption|beam DIR -o FILE --resume --sidecar .txt``); nothing
here prints. A result file is appended to and flushed as results come, so a run killed at any
moment leaves whole lines (and at worst half of the last one, dropped on resume); sidecars are
written atomically, so one is there whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from capcli.distributed import shard_range
from capcli.errors import CapcliError
from capcli.files import atomic_write, atomic_write_bytes
from capcli.images import IMAGE_SUFFIXES, is_url

FORMATS = ("text", "tsv", "jsonl")
TEXT_CANNOT_RESUME = ("--resume finds finished images by their paths, which text output lacks: "
                      "use -o FILE.tsv or FILE.jsonl (or --format tsv|jsonl)")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv"}  # -o FILE without --format


def output_format(given: str | None, output: Path | None) -> str:
    """--format when given, else the -o file's suffix (.jsonl, .tsv; anything else: text)."""
    if given is not None:
        return given
    return SUFFIX_FORMATS.get(output.suffix.lower(), "text") if output is not None else "text"


# --------------------------------------------------------------------------- result lines

def _num(x: float):
    return round(x, 5) if math.isfinite(x) else None


def result_json(r) -> dict:
    if not r.ok:
        return {"path": r.path, "error": r.error}
    obj = {"path": r.path, "caption": r.caption, "tokens": r.tokens, "score": _num(r.score), "logprob": _num(r.logprob)}
    if r.alternatives:
        obj["alternatives"] = [{"caption": a.caption, "tokens": a.tokens, "score": _num(a.score), "logprob": _num(a.logprob)}
                               for a in r.alternatives]
    return obj


def result_line(r, fmt: str) -> str | None:
    """One CaptionResult as a line of output (no newline); None: the format has no line for it."""
    if fmt == "text":
        return r.caption if r.ok else ""  # an empty line keeps the output aligned with the input
    if fmt == "tsv":
        return f"{r.path}\t{r.caption}" if r.ok else None
    return json.dumps(result_json(r), ensure_ascii=False)


def line_path(line: str, fmt: str, where: str) -> str:
    """The image a tsv or jsonl result line is about."""
    if fmt == "tsv":
        if "\t" not in line:
            raise CapcliError(f"{where}: not a tsv result line (path<TAB>caption)")
        return line.split("\t", 1)[0]
    try:
        path = json.loads(line)["path"]
    except (ValueError, KeyError, TypeError):
        raise CapcliError(f"{where}: not a capcli jsonl result line") from None
    if not isinstance(path, str):
        raise CapcliError(f"{where}: not a capcli jsonl result line")
    return path


# --------------------------------------------------------------------------- shares

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


# --------------------------------------------------------------------------- result files

def read_done(path: Path, fmt: str) -> set[str]:
    """The images a result file already has, by path; a last line cut off by a kill is removed."""
    if fmt == "text":
        raise CapcliError(TEXT_CANNOT_RESUME)
    with open(path, "rb+") as f:
        data = f.read()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):
            f.truncate(whole)  # the half line a kill left: that image is captioned again
    done = set()
    try:
        lines = data[:whole].decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise CapcliError(f"{path}: not a capcli result file (not UTF-8 text)") from None
    for number, line in enumerate(lines, 1):
        if line:
            done.add(line_path(line, fmt, f"{path} line {number}"))
    return done


class ResultFile:
    """Result lines appended to ``path`` and flushed at once. An existing file is refused unless
    ``resume``, which keeps it and reads which images it holds (``done``)."""

    def __init__(self, path: Path, fmt: str, resume: bool):
        self.path, self.fmt = path, fmt
        self.done: set[str] = set()
        if path.is_dir():
            raise CapcliError(f"{path} is a folder: -o takes a file name")
        exists = path.exists()
        if exists and not resume:
            raise CapcliError(f"{path} already exists: add --resume to skip the images in it and append the rest, "
                              f"or choose another -o")
        if exists:
            self.done = read_done(path, fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.file = open(path, "a" if exists else "x", encoding="utf-8", newline="\n")
        except FileExistsError:  # made since we looked: another job writing the same file
            raise CapcliError(f"{path} already exists: another run is writing it?") from None
        except OSError as e:
            raise CapcliError(f"{path}: cannot write ({e.strerror or e})") from None

    def write(self, line: str) -> None:
        self.file.write(line + "\n")
        self.file.flush()  # a killed run keeps every result it reported

    def close(self) -> None:
        self.file.close()


def merge_parts(output: Path, parts: Sequence[Path], fmt: str) -> int:
    """Write ``output`` as its own lines (if it exists) then each part's, in order, atomically;
    lines about an image already written are dropped. Removes the parts. Returns the lines written."""
    seen: set[str] = set()
    written = 0

    def write(tmp: Path) -> None:
        nonlocal written
        with open(tmp, "w", encoding="utf-8", newline="\n") as out:
            for source in ([output] if output.exists() else []) + list(parts):
                with open(source, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        if not line.endswith("\n"):
                            continue  # cut off by a kill (never in a finished part)
                        if fmt != "text":
                            key = line_path(line.rstrip("\n"), fmt, f"{source} line {number}")
                            if key in seen:
                                continue
                            seen.add(key)
                        out.write(line)
                        written += 1

    atomic_write(output, write)
    for part in parts:
        part.unlink(missing_ok=True)
    return written


# --------------------------------------------------------------------------- sidecars

class Sidecars:
    """A text file per image: ``a/b/photo.jpg`` -> ``a/b/photo.txt`` beside it, or under
    ``directory`` mirroring the tree below the folder it was found in (``roots``).

    An existing sidecar is kept (``wanted`` is False, so the image is not even read) unless
    ``overwrite``. Two images that map to one sidecar (photo.jpg and photo.png) are caught: a
    sidecar written since ``started`` (a time.time()) belongs to another image of this run."""

    def __init__(self, suffix: str, directory: Path | None, roots: Iterable[str], overwrite: bool, started: float):
        suffix = suffix if suffix.startswith(".") else "." + suffix
        if suffix == "." or "/" in suffix or os.sep in suffix:
            raise CapcliError(f"--sidecar {suffix!r}: expected an extension such as .txt")
        if suffix.lower() in IMAGE_SUFFIXES:
            raise CapcliError(f"--sidecar {suffix}: that is an image extension; sidecars would replace images")
        self.suffix, self.directory, self.overwrite, self.started = suffix, directory, overwrite, started
        self.roots = [os.path.join(os.path.normpath(r), "") for r in roots]  # "photos/": prefixes of the paths found there

    def path(self, image: str) -> Path:
        """Where the sidecar of ``image`` (a local path) goes; CapcliError if it has none."""
        if is_url(image):
            raise CapcliError("a URL has no folder for a sidecar file")
        if self.directory is None:
            return Path(image).with_suffix(self.suffix)
        relative = os.path.normpath(image)
        for root in self.roots:
            if relative.startswith(root):
                relative = relative[len(root):]
                break
        relative = os.path.splitdrive(relative)[1].lstrip(os.sep)
        if relative.split(os.sep)[0] == "..":
            raise CapcliError(f"cannot mirror a path outside the working folder under --sidecar-dir {self.directory}")
        return (self.directory / relative).with_suffix(self.suffix)

    def _written_by_this_run(self, sidecar: Path) -> bool:
        try:
            return sidecar.stat().st_mtime >= self.started
        except OSError:
            return False

    def wanted(self, image: str) -> bool:
        """Does ``image`` still need its sidecar? (A URL does, to be reported as a failure.)"""
        try:
            sidecar = self.path(image)
        except CapcliError:
            return True
        return self.overwrite or not sidecar.exists() or self._written_by_this_run(sidecar)

    def write(self, image: str, text: str) -> bool:
        """Write the sidecar atomically; False when one appeared meanwhile and may not be replaced."""
        sidecar = self.path(image)
        if sidecar.exists():
            if self._written_by_this_run(sidecar):
                raise CapcliError(f"its sidecar {sidecar} was already written for another image of this run "
                                  f"(same name, other extension); rename one of them")
            if not self.overwrite:
                return False
        atomic_write_bytes(sidecar, (text + "\n").encode("utf-8"))
        return True


# --------------------------------------------------------------------------- one process's part

@dataclass
class Counts:
    captioned: int = 0  # results made by this run, failures included
    failed: int = 0  # unreadable, or the sidecar could not be written
    written: int = 0  # sidecars written
    skipped: int = 0  # already in the result file, or with a sidecar (never read)

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(*(a + b for a, b in zip(astuple(self), astuple(other))))


class Destination:
    """Where one process's results go and what it can skip: the result file (``output``, or its
    part ``index`` of ``count``), the sidecars, and the counts. ``also_done`` holds images done
    elsewhere (the file merged by an earlier run of several processes)."""

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
        result file. A sidecar that cannot be written makes ``r`` a failure (``r.error``)."""
        self.counts.captioned += 1
        if r.ok and self.sidecars is not None:
            try:
                text = json.dumps(result_json(r), ensure_ascii=False) if self.fmt == "jsonl" else r.caption
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

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
