"""The command line: frame.py is the frame (flags, errors, exit codes, main); each command has its
module. Nothing outside the CLI imports it; it imports the library, and prints."""

# Each module registers its command; `capcli --help` lists them in this order.
from capcli.cli import build_vocab  # noqa: F401, I001
from capcli.cli import train  # noqa: F401
from capcli.cli import caption  # noqa: F401
from capcli.cli import evaluate  # noqa: F401
from capcli.cli import quantize  # noqa: F401
from capcli.cli import export  # noqa: F401
from capcli.cli.frame import RichReporter, app, keep_freed_memory, main

__all__ = ["app", "main", "keep_freed_memory", "RichReporter"]
