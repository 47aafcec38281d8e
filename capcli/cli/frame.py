"""The capcli command line's frame: the Typer app and its global flags, logging to stderr, progress
bars, one-line errors and their exit codes, and main(). The commands live beside it, one module each.

Results go to stdout and nothing else does; progress bars (only on a terminal), warnings and
errors go to stderr. Exit codes: 0 ok, 1 a run failed (or some images could not be read),
2 bad usage or input, 130 interrupted (143 SIGTERM, 129 SIGHUP)."""

from __future__ import annotations

import copy
import errno
import functools
import inspect
import logging
import os
import sys

import typer
from typer.core import TyperGroup
from typing_extensions import Annotated

from capcli.errors import CapcliError
from capcli.progress import Reporter
from capcli.version import __version__

GLOBAL_FLAGS = ("-q", "--quiet", "--debug")


def _untyped_flags(params: list) -> list:
    """Typer's help shows a `<bool>` type beside every flag; a flag takes no value, so show none.
    Choices get room to wrap between them: at 80 columns `<additive|general|dot|none>` was cut mid-word."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif getattr(param, "type_descriptor", None) and param.type_descriptor.is_choice and param.metavar is None:
            param.metavar = "<" + " | ".join(str(getattr(c, "value", c)) for c in param.type_descriptor.choices) + ">"
    return params


GENERAL = "General"  # the help panel of the global flags and --help, last in every command's help
# train's and build-vocab's old name for --split-ratios, before evaluate's --split (a split name) made it ambiguous
OLD_SPELLINGS = {"train": {"--split": "--split-ratios"}, "build-vocab": {"--split": "--split-ratios"}}


def _reflowed(text: str | None) -> str | None:
    """A docstring as help text: the lines of a paragraph joined (Typer keeps hard line breaks, which
    make ragged lines in a terminal), except example commands (`$ capcli ...`), which keep a line each."""
    if not text:
        return text
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in paragraph.splitlines():
            if lines and not line.startswith("$ ") and not lines[-1].startswith("$ "):
                lines[-1] += " " + line
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _respelled(arg: str, spellings: dict[str, str]) -> str:
    name, equals, value = arg.partition("=")
    return spellings.get(name, name) + equals + value if arg.startswith("--") else arg


class _Group(TyperGroup):
    """capcli's command group: the global flags may come anywhere on the line, flags show no type,
    every command's help lists the global flags."""

    def parse_args(self, ctx, args):
        # `capcli caption -q x.jpg` reads as naturally as `capcli -q caption x.jpg`: lift the global
        # flags in front of the command, so no command needs its own copy (up to a `--`).
        end = args.index("--") if "--" in args else len(args)
        lifted = [a for a in args[:end] if a in GLOBAL_FLAGS]
        rest = [a for a in args[:end] if a not in GLOBAL_FLAGS]
        command_name = next((a for a in rest if not a.startswith("-")), None)
        rest = [_respelled(a, OLD_SPELLINGS.get(command_name, {})) for a in rest]
        return super().parse_args(ctx, lifted + rest + args[end:])

    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None and not getattr(command, "capcli_ready", False):
            command.help = _reflowed(command.help)
            shown = [copy.copy(p) for p in self.get_params(ctx) if set(p.opts) & set(GLOBAL_FLAGS)]
            for param in shown:
                param.expose_value = False  # shown, never parsed here: parse_args lifts them in front of the command
            for param in [*shown, command.get_help_option(ctx)]:
                param.rich_help_panel = GENERAL
            command.params.extend(shown)
            _untyped_flags(command.get_params(ctx))
            command.capcli_ready = True
        return command


app = typer.Typer(
    cls=_Group,
    name="capcli",
    help="Show, Attend and Tell image captioning: build-vocab, train, caption, beam, evaluate; quantize and export for serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

log = logging.getLogger("capcli")
_debug = False
_quiet = False


# --------------------------------------------------------------------------- plumbing

class _StderrFormatter(logging.Formatter):
    def format(self, record):
        prefix = "capcli: warning: " if record.levelno >= logging.WARNING else "capcli: "
        return prefix + record.getMessage()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(_StderrFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


class RichReporter(Reporter):
    """A rich progress bar on stderr, drawn only when stderr is a terminal (or on ``console``)."""

    def __init__(self, console=None):
        self.console = console
        self.enabled = console is not None or sys.stderr.isatty()
        self.progress = None

    def start(self, description, total, unit="items"):
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        self.stop()
        # In a narrow terminal the figures (info) give way, cut with an ellipsis, then the bar: never
        # the counts or the times (at 80 columns rich cut the elapsed time and the ETA to "0:…").
        kept = functools.partial(Column, no_wrap=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}", table_column=kept()),
            BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=5)),
            MofNCompleteColumn(table_column=kept()), TextColumn(unit, table_column=kept()),
            TimeElapsedColumn(table_column=kept()), TextColumn("eta", table_column=kept()),
            TimeRemainingColumn(table_column=kept()), _InfoColumn(table_column=Column(ratio=2)),
            console=self.console or Console(stderr=True), transient=False, expand=True,
            redirect_stdout=False,  # results go to stdout as they are made, never into the bar's stderr
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, info="")

    def update(self, advance=1, **fields):
        if self.progress is None:
            return
        info = "  ".join(_figure(k, v) for k, v in fields.items())
        self.progress.update(self.task, advance=advance, **({"info": info} if fields else {}))

    def stop(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _figure(name: str, value) -> str:
    """One figure of the progress bar: `loss 3.21`, `1234 captions/s` (not `captions/s 1.23e+03`)."""
    if not isinstance(value, float):
        return f"{name.replace('_', ' ')} {value}"
    shown = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{shown} {name[:-len('_per_s')]}/s" if name.endswith("_per_s") else f"{name.replace('_', ' ')} {shown}"


def _InfoColumn(table_column):
    """The figures, on one line, cut with an ellipsis where the terminal is too narrow for them."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class InfoColumn(ProgressColumn):
        def render(self, task):
            return Text(task.fields.get("info", ""), no_wrap=True, overflow="ellipsis")

    return InfoColumn(table_column=table_column)


def _fail(message: str, code: int) -> None:
    """One line on stderr and exit ``code``; with --debug the traceback first (the code stays the same)."""
    if _debug and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    sys.stderr.write(f"capcli: {message}\n")
    raise typer.Exit(code)


def handle_errors(fn):
    """Turn library errors into one line on stderr and an exit code; --debug adds tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except CapcliError as e:
            _fail(e.message, e.exit_code)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt as e:  # Ctrl-C, and SIGTERM/SIGHUP (signals.Stopped)
            from capcli.runtime.signals import exit_code, signal_name, stop_signal

            signum = stop_signal(e)
            _fail(f"interrupted by {signal_name(signum)}", exit_code(signum))
        except Exception as e:  # a bug, or a resource problem we did not foresee
            _fail(_explain(e), 1)

    return wrapper


def _explain(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    if "out of memory" in text.lower():
        return "out of GPU memory: lower --batch-size (or use a smaller --grid / --image-size)"
    if isinstance(e, OSError) and e.errno is not None:  # the disk or the system said no, about a file
        reason = (e.strerror or text or e.__class__.__name__)
        reason = reason[:1].lower() + reason[1:]
        if e.errno == errno.ENOSPC:
            return f"no space left on device{': ' + str(e.filename) if e.filename else ''}"
        return f"{e.filename}: {reason}" if e.filename else reason
    return f"unexpected error: {e.__class__.__name__}: {text} (run with --debug for the traceback)"


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS at every free.

    Every encoder batch on the CPU allocates activations of several MB; with glibc's defaults each
    one is a fresh mmap that the kernel zero-fills page by page (docs/performance-notes.md has the
    figures). It changes the whole process, so the command line sets it, never the library. A no-op where
    the C library has no mallopt (macOS, Windows).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # blocks up to 32 MB (glibc's maximum) come from the heap...
    mallopt(m_trim_threshold, 1 << 30)  # ...which keeps up to 1 GB of freed memory for the next batch


def _quiet_broken_pipe() -> None:
    """The reader went away (`| head -1`): stop quietly, as Unix tools do."""
    _silence_stdout()
    raise typer.Exit(0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so Python's last flush of it cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def _print_version(asked: bool) -> None:
    if asked:
        print(f"capcli {__version__}")
        raise typer.Exit(0)


@app.callback(epilog="-q and --debug may also follow the command: capcli caption -q photos/")
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print capcli's version and exit.", callback=_print_version, is_eager=True)] = False,
):
    global _debug, _quiet
    _debug, _quiet = debug, quiet
    _setup_logging(quiet)
    keep_freed_memory()
    from capcli.runtime.signals import raise_on_stop_signals

    raise_on_stop_signals()  # SIGTERM and SIGHUP unwind like Ctrl-C: files are closed, temporary files removed



def is_quiet() -> bool:
    """-q was given: only warnings and errors on stderr (no progress bars)."""
    return _quiet


def main() -> None:
    try:
        app()  # standalone mode: always ends in SystemExit
        code = 0
    except SystemExit as e:
        code = e.code
    except BrokenPipeError:  # the reader went away while Python flushed stdout on the way out
        _silence_stdout()
        code = 0
    dist = sys.modules.get("capcli.runtime.distributed")  # imported only by training
    if dist is not None and dist.joined_a_group():
        dist.exit_process(code if isinstance(code, int) else 1)  # see there: torchrun workers skip shutdown
    sys.exit(code)


if __name__ == "__main__":
    main()

