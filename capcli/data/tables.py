"""Caption tables (CSV, TSV, JSONL) -> rows of image, caption and split, whatever their column names."""

from __future__ import annotations

import csv
import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from capcli.choices import shown
from capcli.data.images import IMAGE_SUFFIXES
from capcli.errors import CapcliError
from capcli.files import FileProblem, parse_json

# Column names accepted in generic caption files (first match wins).
IMAGE_COLUMNS = ("image", "image_name", "filename", "file_name", "file", "image_path", "path", "img")


_CAPTION_COLUMNS = ("caption", "text", "sentence", "comment", "raw", "description")


@dataclass
class _Row:
    image: str
    caption: str
    split: str | None
    line: int


def _open_text(path: Path) -> str:
    try:
        raw = _read_bytes(path)
    except FileNotFoundError:
        raise CapcliError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CapcliError(f"{path}: is a directory, expected a caption file") from None
    except OSError as e:
        raise CapcliError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CapcliError(f"{path}:{line}: not UTF-8 text") from None


def _read_bytes(path: Path) -> bytes:
    """A caption file's bytes. A pipe is read from what writes to it (``--captions <(zcat c.csv.gz)``),
    without the wait for a writer that a named FIFO's plain open does; a device is refused."""
    kind = os.stat(path).st_mode
    if stat.S_ISDIR(kind):
        raise IsADirectoryError(path)
    if not (stat.S_ISREG(kind) or stat.S_ISFIFO(kind)):
        raise CapcliError(f"{path}: not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO: returns at once, writer or not
    if stat.S_ISFIFO(kind):
        os.set_blocking(fd, True)  # then wait for what a writer sends; with none, the end comes at once
    with open(fd, "rb") as f:
        raw = f.read()
    if not raw and stat.S_ISFIFO(kind):
        raise CapcliError(f"{path}: not a regular file, and nothing wrote to it (a FIFO needs its writer first)")
    return raw


def _pick(names: Sequence[str], wanted: Sequence[str]) -> int | None:
    lowered = [n.strip().lower() for n in names]
    for w in wanted:
        if w in lowered:
            return lowered.index(w)
    return None


def _looks_like_image_name(text: str) -> bool:
    return Path(_image_key(text)).suffix.lower() in IMAGE_SUFFIXES


_CAPTION_NUMBER = re.compile(r"#\d+$")


def _image_key(text: str) -> str:
    """'name.jpg#2' (Flickr token files number each image's captions) -> 'name.jpg'."""
    text = text.strip()
    stripped = _CAPTION_NUMBER.sub("", text)
    return stripped if Path(stripped).suffix.lower() in IMAGE_SUFFIXES else text


def table_delimiter(path: Path, text: str) -> str:
    """A table's delimiter: a tab for .tsv files and for tables whose first line holds one, else a comma."""
    return "\t" if path.suffix.lower() == ".tsv" or "\t" in text.split("\n", 1)[0] else ","


def read_caption_table(path: Path, text: str | None = None) -> list[_Row]:
    """Read a CSV, TSV or JSONL caption file into rows of (image, caption, split, line number).

    CSV follows RFC 4180 (quoted fields may hold commas, doubled quotes and newlines); a header
    row names the columns, or, when the first field of the first row looks like an image file
    name, the file has no header and the columns are image, caption. ``text``: the file's text,
    when the caller has read it already (a pipe can be read only once).
    """
    text = _open_text(path) if text is None else text
    if path.suffix.lower() in (".jsonl", ".ndjson") or (path.suffix.lower() == ".json" and text.lstrip()[:1] == "{"):
        return _read_jsonl(path, text)
    delimiter = table_delimiter(path, text)
    tsv, kind = delimiter == "\t", "TSV" if delimiter == "\t" else "CSV"
    # CSV quoting is strict, so a stray or unclosed quote is an error at its line instead of a
    # field that silently swallows the rest of the file. TSV has no quoting (a caption may start
    # with a quote, as some in Flickr token files do); a field wrapped in quotes is unwrapped below.
    # skipinitialspace: 'a.jpg, "a dog, running"' is quoted as it looks, not a field that starts with a space.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True, skipinitialspace=True,
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    raw_lines = io.StringIO(text, newline="").readlines()  # split as the reader splits them
    rows: list[_Row] = []
    columns: tuple[int, int, int | None] | None = None
    while True:
        line = reader.line_num + 1  # where the next record starts
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            reason = "a quoted field is never closed" if "unexpected end of data" in str(e) else str(e)
            raise CapcliError(f"{path}:{line}: malformed {kind} ({reason})") from None
        if tsv:
            record = [_unquote(f) for f in record]
        if not record or all(not f.strip() for f in record):
            continue  # blank line
        if columns is None:
            img, cap = _pick(record, IMAGE_COLUMNS), _pick(record, _CAPTION_COLUMNS)
            if img is not None and cap is not None:
                columns, width = (img, cap, _pick(record, ("split",))), len(record)
                continue  # that was the header
            if _looks_like_image_name(record[0]) and len(record) >= 2:
                columns, width = (0, 1, None), 2  # no header: image, caption
            else:
                found = ", ".join(f.strip() for f in record[:6])
                raise CapcliError(
                    f"{path}:{line}: no image and caption columns in the header (found: {found}); "
                    f"expected e.g. 'image,caption'"
                )
        img, cap, split = columns
        if len(record) <= max(img, cap):
            raise CapcliError(f"{path}:{line}: expected {width} fields, found {len(record)}")
        if len(record) > width:
            if cap != width - 1:
                raise CapcliError(f"{path}:{line}: expected {width} fields, found {len(record)} (quote fields that hold {'tabs' if tsv else 'commas'})")
            # An unquoted delimiter inside the last column, the caption: it is the rest of the line,
            # taken from the line itself, as the reader dropped the spaces after each delimiter.
            parts = raw_lines[line - 1].rstrip("\r\n").split(delimiter, cap) if line == reader.line_num else []
            if len(parts) == cap + 1 and [p.strip() for p in parts[:cap]] == [f.strip() for f in record[:cap]]:
                record = record[:cap] + [parts[cap]]
            else:
                record = record[:cap] + [delimiter.join(record[cap:])]
        split_value = record[split].strip().lower() if split is not None and split < len(record) else None
        rows.append(_Row(_image_key(record[img]), record[cap].strip(), split_value or None, line))
    if columns is None:
        raise CapcliError(f"{path}: no captions in the file")
    return rows


def _unquote(field: str) -> str:
    """'"a dog, running"' -> 'a dog, running' (TSV written by CSV tools); other fields unchanged."""
    if len(field) >= 2 and field[0] == field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def _read_jsonl(path: Path, text: str) -> list[_Row]:
    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = parse_json(raw, f"{path}:{line}")
        except FileProblem as e:
            raise CapcliError(str(e)) from None
        if not isinstance(obj, dict):
            raise CapcliError(f"{path}:{line}: expected a JSON object per line")
        img = next((obj[k] for k in IMAGE_COLUMNS if k in obj), None)
        cap = next((obj[k] for k in _CAPTION_COLUMNS if k in obj), None)
        if img is None or cap is None:
            found = ", ".join(k if k.isprintable() else shown(k) for k in list(obj)[:6])
            raise CapcliError(
                f"{path}:{line}: no image and caption fields (found: {found}); "
                f"expected e.g. {{\"image\": ..., \"caption\": ...}}"
            )
        split = obj.get("split")
        try:
            image, caps = _image_key(_text(img)), [_text(c).strip() for c in (cap if isinstance(cap, list) else [cap])]
            split = _text(split).strip().lower() if split else None
        except TypeError:
            raise CapcliError(f"{path}:{line}: the image, caption and split fields must be text") from None
        rows.extend(_Row(image, c, split, line) for c in caps)
    return rows


def _text(value: object) -> str:
    """A JSON field read as text: a string, or a number (an image named 1234); anything else is a TypeError."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"expected text, not {type(value).__name__}")
