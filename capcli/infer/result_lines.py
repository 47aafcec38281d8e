"""One result as a line of output (text, tsv or jsonl), a line back to the image it is about, and
the format a run writes.

Any name a filesystem allows survives: a name that is not UTF-8 is written as its own bytes in
text and tsv and with \\udcXX escapes in JSON (os.fsdecode's surrogates, which json.loads gives
back), and a path a tsv line cannot hold (a tab or a newline in it) is that image's error rather
than a line that another image could be read from.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from capcli.errors import CapcliError
from capcli.files import FileProblem, parse_json

SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv"}  # -o FILE without --format


def output_format(given: str | None, output: Path | None) -> str:
    """--format when given, else the -o file's suffix (.jsonl, .tsv; anything else: text)."""
    if given is not None:
        return given
    return SUFFIX_FORMATS.get(output.suffix.lower(), "text") if output is not None else "text"


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
