"""Ctrl-C at the right moment: held back while a step or an end-of-epoch save must finish whole."""

from __future__ import annotations

import signal


class defer_sigint:
    """Hold back Ctrl-C until the block is done, then raise it."""

    def __enter__(self):
        self.caught = False

        def handler(signum, frame):
            self.caught = True

        try:
            self.previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self.previous = None

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            if self.caught and exc[0] is None and callable(self.previous):
                self.previous(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt


class ignore_sigint:
    """Finish a checkpoint write even if Ctrl-C is pressed again."""

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            self.previous = None

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
