"""A progress bar on stderr: bytes, speed, time left. Redrawn in place on a terminal, a
line every 10% otherwise (logs of scripts and CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Final, TextIO

MIB: Final = 1024 * 1024
WIDTH: Final = 24
REDRAW_SECONDS: Final = 0.1
LOG_STEP_PERCENT: Final = 10


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        interactive: bool | None = None,
    ) -> None:
        self.total = total
        self.done = 0
        self._stream = stream or sys.stderr
        self._clock = clock
        self._interactive = self._stream.isatty() if interactive is None else interactive
        self._started = clock()
        # Bytes the server had before this run: they do not count towards the speed.
        self._skipped = 0
        self._drawn_at = 0.0
        self._logged_step = -1

    def skip(self, count: int) -> None:
        """``count`` bytes were already on the server."""
        self.done += count
        self._skipped += count

    def advance(self, count: int) -> None:
        self.done += count
        now = self._clock()
        if self._interactive:
            if now - self._drawn_at >= REDRAW_SECONDS:
                self._drawn_at = now
                self._stream.write("\r" + self.render())
                self._stream.flush()
        else:
            step = self.percent() // LOG_STEP_PERCENT
            if step > self._logged_step:
                self._logged_step = step
                self._stream.write(self.render() + "\n")
                self._stream.flush()

    def percent(self) -> int:
        return 100 if not self.total else self.done * 100 // self.total

    def speed(self) -> float:
        """Bytes per second sent by this run."""
        elapsed = self._clock() - self._started
        return (self.done - self._skipped) / elapsed if elapsed > 0 else 0.0

    def render(self) -> str:
        filled = WIDTH * self.done // self.total if self.total else WIDTH
        bar = "#" * filled + "." * (WIDTH - filled)
        speed = self.speed()
        left = _duration((self.total - self.done) / speed) if speed > 0 else "-:--:--"
        return (
            f"[{bar}] {self.percent():3d}% {self.done / MIB:,.1f}/{self.total / MIB:,.1f} MiB "
            f"{speed / 1e6:,.1f} MB/s {left} left"
        )

    def finish(self) -> None:
        elapsed = self._clock() - self._started
        prefix = "\r" if self._interactive else ""
        self._stream.write(
            f"{prefix}[{'#' * WIDTH}] 100% {self.total / MIB:,.1f} MiB in {_duration(elapsed)}, "
            f"{self.speed() / 1e6:,.1f} MB/s\n"
        )
        self._stream.flush()
