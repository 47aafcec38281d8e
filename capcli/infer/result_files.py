"""Result files (-o FILE): lines appended and flushed as results come, one run at a time (locked),
and resumed by the paths of the lines already there.

A run killed at any moment leaves whole lines, and at worst half of the last one, which a resume
drops; result files are split at newlines only (a file name may hold any other character).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from capcli.errors import CapcliError
from capcli.infer.result_lines import line_bytes, line_path

log = logging.getLogger("capcli")

TEXT_CANNOT_RESUME = ("--resume finds finished images by their paths, which text output lacks: "
                      "use -o FILE.tsv or FILE.jsonl (or --format tsv|jsonl)")


def whole_lines(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(number, line with its newline) for each whole line of a result file, split at b"\\n" only;
    the last line, if a kill cut it off before its newline, is left out."""
    for number, line in enumerate(f, 1):
        if line.endswith(b"\n"):
            yield number, line


def line_key(line: bytes, fmt: str, where: str) -> str:
    """The path a tsv or jsonl result line (without its newline) is about, as the walk or stdin give it."""
    return line_path(line.decode("utf-8", "surrogateescape"), fmt, where)


def _paths_done(f: BinaryIO, fmt: str, where: Path) -> tuple[set[str], int]:
    """The paths of a result file's whole lines, and those lines' length in bytes."""
    if fmt == "text":
        raise CapcliError(TEXT_CANNOT_RESUME)
    done, length = set(), 0
    for number, line in whole_lines(f):
        length += len(line)
        if line != b"\n":
            done.add(line_key(line[:-1], fmt, f"{where} line {number}"))
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
