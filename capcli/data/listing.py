"""Which images a run is given: files as named, folders walked in sorted order, URLs as they are,
and paths read from stdin ('-')."""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

from capcli.data.images import IMAGE_SUFFIXES
from capcli.data.urls import is_url
from capcli.errors import CapcliError

log = logging.getLogger("capcli")

STDIN_LINE_LIMIT = 16 * 1024  # bytes of one path on stdin (PATH_MAX is 4096 on Linux; URLs may be longer)


def expand_paths(inputs: Iterable[str]) -> Iterator[Path | str]:
    """Yield image paths from files, directories (recursively, sorted) and '-' (paths on stdin);
    URLs (https://...) are yielded as they are, strings.

    Explicit files are yielded whatever their suffix (they may fail to load later, and are then
    reported), as Paths; inside directories only files with image suffixes are taken, as strings
    (see walk_images). Symbolic links are followed, each real directory visited once, so a link
    loop ends.
    """
    for item in inputs:
        if item == "-":
            for line in stdin_lines():
                yield from expand_paths([line])
            continue
        if is_url(item):
            yield item  # never Path(item): that turns https://host into https:/host
            continue
        path = Path(item)
        if path.is_dir():
            yield from walk_images(path)
        else:
            yield path


def stdin_lines() -> Iterator[str]:
    """The non-empty lines of stdin as file names, read as bytes: split at newlines only (a name
    may hold a carriage return or a U+2028; a CRLF list's last \\r is dropped), bytes that are not
    UTF-8 kept as os.fsdecode keeps them, and no line longer than STDIN_LINE_LIMIT read into memory
    (``- < /dev/zero`` is refused at once)."""
    import sys

    for number in itertools.count(1):
        line = sys.stdin.buffer.readline(STDIN_LINE_LIMIT + 1)  # + 1: room for the newline
        if not line:
            return
        if len(line) > STDIN_LINE_LIMIT and not line.endswith(b"\n"):
            raise CapcliError(f"stdin line {number}: longer than {STDIN_LINE_LIMIT} bytes: not a file name or URL "
                              f"(give one per line)")
        line = line[:-1] if line.endswith(b"\n") else line
        line = line[:-1] if line.endswith(b"\r") else line
        if line:
            yield os.fsdecode(line)


def walk_images(root: Path) -> Iterator[str]:
    """The image files under ``root`` as path strings, in the order ``sorted()`` of their Paths
    would give, found as the walk goes: a folder's entries sorted by name, a subfolder's files
    where its name sorts. Nothing is held but the folders on the way down, so listing a folder of
    10^6 files into a list costs the strings and no more."""
    visited: set[str] = set()

    def walk(directory: str) -> Iterator[str]:
        real = os.path.realpath(directory)
        if real in visited:  # a symbolic link back up the tree
            return
        visited.add(real)
        try:
            with os.scandir(directory) as it:
                entries = sorted((e.name, _is_dir(e)) for e in it)
        except OSError as e:
            log.warning("%s: cannot list (%s); skipped", directory, e.strerror or e)
            return
        for name, is_dir in entries:
            path = os.path.join(directory, name)
            if is_dir:
                yield from walk(path)
            elif os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                yield path

    yield from walk(str(root))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symbolic link that loops: a file that will fail to load, and say why
        return False
