"""How long work reports progress without printing: the library calls a Reporter, the CLI draws it."""

from __future__ import annotations


class Reporter:
    """Silent by default; the CLI passes one that draws a rich progress bar on a terminal."""

    def start(self, description: str, total: int | None, unit: str = "items") -> None:
        pass

    def update(self, advance: int = 1, **fields) -> None:
        """Advance the current task; ``fields`` (loss=..., ppl=...) are shown beside the bar."""

    def stop(self) -> None:
        pass
