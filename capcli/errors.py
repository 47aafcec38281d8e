"""The one error type the library raises for problems a user can fix."""


class CapcliError(Exception):
    """A user-facing problem: the CLI prints ``capcli: <message>`` and exits with ``exit_code``.

    Exit codes follow Unix habit: 2 for bad input or usage (a missing file, a corrupt model),
    1 for a run that started and then failed (out of memory, too many unreadable images).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
