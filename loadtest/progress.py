"""The progress line on stderr: a bar redrawn with \\r on a TTY, a summary line every 5 s if not."""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from typing import TextIO

from loadtest.classify import ADMITTED, SKIPPED


def counts_text(totals: Counter[str]) -> str:
    """'sent 240  admitted 120  refused user 80 quota-minute 40' (errors and skips if any)."""
    sent = sum(n for label, n in totals.items() if label != SKIPPED)
    refused = [f"{label} {n}" for label, n in sorted(totals.items())
               if label not in (ADMITTED, SKIPPED) and not label.startswith("error:")]
    errors = sum(n for label, n in totals.items() if label.startswith("error:"))
    parts = [f"sent {sent}", f"admitted {totals[ADMITTED]}"]
    parts.append("refused " + (" ".join(refused) if refused else "0"))
    if errors:
        parts.append(f"errors {errors}")
    if totals[SKIPPED]:
        parts.append(f"skipped {totals[SKIPPED]}")
    return "  ".join(parts)


class Progress:
    """Call update(elapsed) as often as you like; it redraws at most every `interval` s."""

    def __init__(self, total: float, counts: Callable[[], Counter[str]],
                 stream: TextIO | None = None, every: float = 5.0, interval: float = 0.1) -> None:
        self.total = total
        self.counts = counts
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if not self.tty else interval
        self.next_at = 0.0 if self.tty else every
        self.drawn = False

    def update(self, elapsed: float, force: bool = False) -> None:
        if not force and elapsed < self.next_at:
            return
        self.next_at = elapsed + self.every
        text = counts_text(self.counts())
        if self.tty:
            self.stream.write("\r" + self._bar(elapsed, text))
            self.drawn = True
        else:
            self.stream.write(f"loadtest {min(elapsed, self.total):5.1f}/{self.total:g}s  "
                              f"{text}\n")
        self.stream.flush()

    def close(self, elapsed: float) -> None:
        """The last state, then a newline so that what follows starts on its own line."""
        self.update(elapsed, force=True)
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return shutil.get_terminal_size((100, 20)).columns

    def _bar(self, elapsed: float, text: str) -> str:
        width = self._columns() - 1
        done = min(1.0, elapsed / self.total) if self.total else 1.0
        cells = 24
        filled = int(done * cells)
        line = (f"[{'#' * filled}{'.' * (cells - filled)}] "
                f"{min(elapsed, self.total):5.1f}/{self.total:g}s  {text}")
        return line[:width].ljust(width)

