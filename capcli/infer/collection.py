"""Captioning a whole collection: the share of the images each process takes, result lines, result
files that resume, the parts of several processes merged in input order, and sidecar files.

The command line drives it (``capcli caption|beam DIR -o FILE --resume --sidecar .txt``); nothing
here prints. A result file is appended to and flushed as results come, so a run killed at any
moment leaves whole lines (and at worst half of the last one, dropped on resume); a run holds a
lock on its file, so a second run on it stops instead of mixing lines; sidecars are written
atomically, so one is there whole or not at all.

Any name a filesystem allows survives: result files are split at newlines only, a name that is not
UTF-8 is written as its own bytes in text and tsv and with \\udcXX escapes in JSON (os.fsdecode's
surrogates, which json.loads gives back), and a path a tsv line cannot hold (a tab or a newline in
it) is that image's error rather than a line that another image could be read from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence

from capcli.runtime.distributed import shard_range
from capcli.choices import FORMATS as FORMATS
from capcli.errors import CapcliError
from capcli.files import FileProblem, atomic_write, atomic_write_bytes, parse_json
from capcli.data.images import IMAGE_SUFFIXES, is_url

log = logging.getLogger("capcli")

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


# Escaped in JSON lines although JSON allows them raw: line breaks to str.splitlines and to some
# JSON readers, and the surrogates that stand for the bytes of a name that are not UTF-8.
_RAW_IN_JSON = re.compile(r"[\x85\u2028\u2029\ud800-\udfff]")


def json_line(obj) -> str:
    """``obj`` as one line of JSON, non-ASCII text as it is, bar the characters _RAW_IN_JSON escapes."""
    return _RAW_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False))


def printable(text: str) -> str:
    """``text`` for a one-line message: line breaks, control characters and the bytes of a name
    that are not UTF-8 written as escapes (\\n, \\x1b, \\xff), everything else as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else
                   f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else  # os.fsdecode's stand-in for a byte
                   repr(c)[1:-1] for c in text)


def line_bytes(line: str) -> bytes:
    """A result line as written to a file or stdout: UTF-8, and a file name's bytes that are not
    UTF-8 (os.fsdecode's surrogates) as those bytes again."""
    return (line + "\n").encode("utf-8", "surrogateescape")


def line_problem(r, fmt: str) -> str | None:
    """Why ``r`` cannot be one line of ``fmt``, if it cannot: a tab or a newline in a path would
    split a tsv line, and the pieces could read as another image's line."""
    if fmt == "tsv" and r.path is not None and ("\t" in r.path or "\n" in r.path):
        return "its path has a tab or a newline, which a tsv line cannot hold: use --format jsonl"
    return None


def result_line(r, fmt: str) -> str | None:
    """One CaptionResult as a line of output (no newline); None: the format has no line for it."""
    if fmt == "text":
        return r.caption if r.ok else ""  # an empty line keeps the output aligned with the input
    if fmt == "tsv":
        return f"{r.path}\t{r.caption}" if r.ok else None
    return json_line(result_json(r))


def line_path(line: str, fmt: str, where: str) -> str:
    """The image a tsv or jsonl result line is about."""
    if fmt == "tsv":
        if "\t" not in line:
            raise CapcliError(f"{where}: not a tsv result line (path<TAB>caption)")
        return line.split("\t", 1)[0]
    try:
        path = parse_json(line, where)["path"]
    except (FileProblem, KeyError, TypeError):  # FileProblem: not JSON, or JSON nested too deeply
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

def _whole_lines(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(number, line with its newline) for each whole line of a result file, split at b"\\n" only;
    the last line, if a kill cut it off before its newline, is left out."""
    for number, line in enumerate(f, 1):
        if line.endswith(b"\n"):
            yield number, line


def _line_key(line: bytes, fmt: str, where: str) -> str:
    """The path a tsv or jsonl result line (without its newline) is about, as the walk or stdin give it."""
    return line_path(line.decode("utf-8", "surrogateescape"), fmt, where)


def _paths_done(f: BinaryIO, fmt: str, where: Path) -> tuple[set[str], int]:
    """The paths of a result file's whole lines, and those lines' length in bytes."""
    if fmt == "text":
        raise CapcliError(TEXT_CANNOT_RESUME)
    done, length = set(), 0
    for number, line in _whole_lines(f):
        length += len(line)
        if line != b"\n":
            done.add(_line_key(line[:-1], fmt, f"{where} line {number}"))
    return done, length


def read_done(path: Path, fmt: str) -> set[str]:
    """The images a result file already has, by path."""
    with open(path, "rb") as f:
        return _paths_done(f, fmt, path)[0]


class ResultFile:
    """Result lines appended to ``path`` and flushed at once, under an exclusive lock held while
    it is open. An existing file is refused unless ``resume``, which keeps it and reads which
    images it holds (``done``), dropping the half line a kill may have left."""

    def __init__(self, path: Path, fmt: str, resume: bool):
        self.path, self.fmt = path, fmt
        if path.is_dir():
            raise CapcliError(f"{path} is a folder: -o takes a file name")
        existed = path.exists()
        if existed and not resume:
            raise CapcliError(f"{path} already exists: add --resume to skip the images in it and append the rest, "
                              f"or choose another -o")
        self.new = not existed  # made by this run: removed again if the run fails before writing to it
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND: each line goes to the end of the file as it is then, whoever else has it open
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | (0 if existed else os.O_EXCL), 0o666)
        except FileExistsError:  # made since we looked: another job writing the same file
            raise CapcliError(f"{path} already exists: another run is writing it?") from None
        except OSError as e:  # read-only, no permission, a file where a folder should be
            raise CapcliError(f"{path}: cannot write ({e.strerror or e})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device: --resume would read it for ever
                raise CapcliError(f"{path}: not a regular file")
            _lock(fd, path)
            with open(fd, "rb", closefd=False) as f:
                self.done, whole = _paths_done(f, fmt, path)
            if whole < os.fstat(fd).st_size:
                os.ftruncate(fd, whole)  # the half line a kill left: that image is captioned again
        except BaseException:
            os.close(fd)
            raise
        self.file = open(fd, "ab")

    def write(self, line: str) -> None:
        self.file.write(line_bytes(line))
        self.file.flush()  # a killed run keeps every result it reported
        self.new = False

    def close(self, failed: bool = False) -> None:
        """Close the file, which ends the lock. A run that ``failed`` before writing a line removes
        the file if it made it, so that the same command can be run again."""
        if failed and self.new:
            self.path.unlink(missing_ok=True)  # still locked: no other run has it
        self.file.close()


def _lock(fd: int, path: Path) -> None:
    """Lock the open result file for this run, or stop at once if another run has it: two runs
    appending to one file interleave their lines, and each skips only what it read at the start."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the file is closed, even by a kill
    except BlockingIOError:
        raise CapcliError(f"{path}: another capcli run{_lock_holder(fd)} is writing it: let it finish, "
                          f"or choose another -o") from None
    except OSError as e:  # a filesystem without locks
        log.warning("%s: cannot lock (%s): a second run on the same file would mix its lines with this one's",
                    path, e.strerror or e)


def _lock_holder(fd: int) -> str:
    """Who holds the lock on ``fd``'s file, as ' (pid N)' where /proc/locks (Linux) says, else ''."""
    st = os.fstat(fd)
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:  # 1: FLOCK  ADVISORY  WRITE 1234 00:2f:5678 0 EOF
                fields = line.split()
                if "FLOCK" in fields and file_id in fields:
                    return f" (pid {fields[fields.index(file_id) - 1]})"
    except OSError:
        pass
    return ""


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
                    for number, line in _whole_lines(f):  # a line cut off by a kill: never in a finished part
                        if fmt != "text":
                            key = _line_key(line[:-1], fmt, f"{source} line {number}")
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
    ``overwrite``. A sidecar belongs to the first image of the run that maps to it, which writes it
    or keeps it as it was; another image that maps to it (photo.png beside photo.jpg) fails, in this
    run and in every later one, rather than take the first one's caption."""

    def __init__(self, suffix: str, directory: Path | None, roots: Iterable[str], overwrite: bool):
        suffix = suffix if suffix.startswith(".") else "." + suffix
        if suffix == "." or "/" in suffix or os.sep in suffix:
            raise CapcliError(f"--sidecar {suffix!r}: expected an extension such as .txt")
        if suffix.lower() in image_extensions():
            raise CapcliError(f"--sidecar {suffix}: that is an image extension; sidecars would replace images")
        if directory is not None:
            writable_folder(directory, "--sidecar-dir")
        self.suffix, self.directory, self.overwrite = suffix, directory, overwrite
        self.roots = [os.path.join(os.path.normpath(r), "") for r in roots]  # "photos/": prefixes of the paths found there
        # hash() of each sidecar an image of this run has taken: 10^7 images hold ints, not paths. Two
        # sidecars with one hash (odds ~10^-6 at 10^7) fail the second image; nothing is overwritten.
        self.taken: set[int] = set()

    def path(self, image: str) -> Path:
        """Where the sidecar of ``image`` (a local path) goes; CapcliError if it has none."""
        if is_url(image):
            raise CapcliError("a URL has no folder for a sidecar file")
        if os.path.splitext(image)[1].lower() == self.suffix.lower():
            raise CapcliError(f"its sidecar would have its own extension {self.suffix}, and replace it")
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

    def wanted(self, image: str) -> bool:
        """Does ``image`` still need its sidecar? (A URL does, to be reported as a failure.)"""
        try:
            sidecar = self.path(image)
        except CapcliError:
            return True
        key = hash(str(sidecar))
        if self.overwrite or key in self.taken or not sidecar.exists() or sidecar.is_dir():
            return True  # written, or reported as a failure (another image's sidecar, a folder)
        self.taken.add(key)  # kept as it is, as this image's
        return False

    def write(self, image: str, text: str) -> bool:
        """Write the sidecar atomically; False when one appeared meanwhile and may not be replaced."""
        sidecar = self.path(image)
        key = hash(str(sidecar))
        if key in self.taken:
            raise CapcliError(f"its sidecar {sidecar} belongs to another image of this run "
                              f"(same name, other extension); rename one of them")
        if sidecar.is_dir():
            raise CapcliError(f"its sidecar {sidecar} is a folder")
        self.taken.add(key)
        if sidecar.exists() and not self.overwrite:
            return False
        atomic_write_bytes(sidecar, (text + "\n").encode("utf-8"))
        return True


def writable_folder(folder: Path, option: str) -> None:
    """Make ``folder`` (given as ``option``) if need be; CapcliError, before any image is read,
    if it cannot be made or written in."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only, no permission, a file where a folder should be
        raise CapcliError(f"{folder}: cannot make the {option} folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK):  # a read-only filesystem says so even to root
        raise CapcliError(f"{folder}: cannot write in the {option} folder")


def image_extensions() -> set[str]:
    """Extensions of files that are images: capcli's, and every one Pillow can open (.jfif, .apng...)."""
    from PIL import Image

    return IMAGE_SUFFIXES | {e.lower() for e in Image.registered_extensions()}


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
