"""The signals that end runs: Ctrl-C (SIGINT), SIGTERM (SLURM, Kubernetes, `timeout`, torchrun)
and SIGHUP (a closed terminal), all handled alike.

A run either stops at once (the signal raises ``Stopped`` where the program is, and ``finally``
blocks keep what was done) or, inside ``StopSignals.deferred()``, at a boundary of its own
choosing: the signal is noted and the run asks ``received`` when it can stop cleanly (training
does, between steps, so a checkpoint is always whole).
"""

from __future__ import annotations

import contextlib
import signal
import threading

# The exit status of a process that ends because of the signal: 128 + its number (shells' habit).
STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class Stopped(KeyboardInterrupt):
    """A stop signal, raised as an exception (a KeyboardInterrupt, so code that handles Ctrl-C
    handles them all); ``exit_code`` is 128 + the signal's number (130, 143, 129)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum
        self.exit_code = exit_code(signum)


def stop_signal(exc: BaseException) -> int:
    """The signal behind an interruption: ``Stopped``'s, or SIGINT for a plain KeyboardInterrupt."""
    return getattr(exc, "signum", signal.SIGINT)


def raise_on_stop_signals() -> None:
    """Make SIGTERM and SIGHUP raise ``Stopped`` as Ctrl-C raises KeyboardInterrupt, so that a
    terminated process unwinds (closing files, removing temporary files) instead of dying where it
    stands. The command line calls this once; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise Stopped(signum)

    for signum in STOP_SIGNALS:
        if signum != signal.SIGINT and signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, handler)


class StopSignals:
    """While entered, a stop signal raises ``Stopped`` at once, or, inside ``deferred()``, is noted
    in ``received`` (the first signal's number) for the caller to act on at its next boundary; a
    second signal while a deferred block runs is noted too, never raised. Restores the previous
    handlers on exit. Outside the main thread it does nothing (Python delivers signals there only)."""

    def __init__(self):
        self.received: int | None = None
        self._deferring = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        if not self._deferring:
            raise Stopped(signum)

    @contextlib.contextmanager
    def deferred(self):
        """Signals only noted while the block runs (nothing is raised in it, nor when it ends)."""
        self._deferring += 1
        try:
            yield self
        finally:
            self._deferring -= 1
