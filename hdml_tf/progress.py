"""A progress line for byte streams (downloads, checksums, unpacking): bytes done, rate and time left, on stderr.

Standard library only, so a tool that only moves files never imports TensorFlow. (`keras.utils.Progbar`, used for
image counts in `hdml_tf.data.images`, prints raw integers and time per unit on stdout, which reads badly for
gigabytes: "412345678/1150585339 ... 0us/byte".)

On a terminal the line is redrawn in place (carriage return) every 0.2 s; into a file or a pipe, one full line is
written every 10 s, so a log of a three-hour download stays short. The final line is always written; the time left
is shown once a second of transfer gives a rate to extrapolate.

    cub200 CUB_200_2011.tgz: 412.3 MiB of 1.07 GiB (37%), 5.2 MiB/s, 2:11 left
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """Binary units with one decimal above 1 KiB: 512 -> "512 B", 1536 -> "1.5 KiB", 1150585339 -> "1.07 GiB"."""
    if n < 1024:
        return f"{int(n)} B"
    value, unit = float(n), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    # Two decimals below 10 units, so 1.07 GiB is not shown as 1.1 GiB; one above (412.3 MiB).
    return f"{value:.2f} {_UNITS[unit]}" if value < 10 else f"{value:.1f} {_UNITS[unit]}"


def format_duration(seconds: float) -> str:
    """Whole seconds as m:ss, or h:mm:ss from one hour on: 75 -> "1:15", 3725 -> "1:02:05"."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ByteProgress:
    """Progress of one byte stream, drawn on `stream` (default sys.stderr).

    Args:
      label: what moves, e.g. "cub200 CUB_200_2011.tgz".
      total: bytes expected in all (None when unknown: no percentage and no time left).
      done: bytes already there before this run (a resumed download); they count towards the percentage but
        not towards the rate.
      stream: where to draw; None = sys.stderr.
      enabled: False draws nothing (the object still counts).
      clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, label: str, total: Optional[int] = None, done: int = 0, stream: Optional[TextIO] = None,
                 enabled: bool = True, clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.total = total
        self.done = done
        self._start_done = done
        self._stream = stream
        self._enabled = enabled
        self._clock = clock
        self._start = clock()
        self._last_draw = self._start  # the first line after one interval: a rate over no time means nothing
        self._width = 0
        out = self.stream
        self._tty = bool(getattr(out, "isatty", lambda: False)())
        self._interval = 0.2 if self._tty else 10.0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def rate(self) -> float:
        """Bytes per second moved in this run (0 before any time has passed)."""
        elapsed = self._clock() - self._start
        return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The current state as one line (no newline)."""
        rate = self.rate()
        parts = [format_bytes(self.done)]
        if self.total:
            parts = [f"{format_bytes(self.done)} of {format_bytes(self.total)} "
                     f"({min(100, int(100 * self.done / self.total))}%)"]
        parts.append(f"{format_bytes(rate)}/s")
        if self.total and rate > 0 and self.done < self.total and self._clock() - self._start >= 1.0:
            parts.append(f"{format_duration((self.total - self.done) / rate)} left")
        return f"{self.label}: " + ", ".join(parts)

    def update(self, n: int) -> None:
        """Adds n bytes and redraws when the last drawing is old enough."""
        self.done += n
        now = self._clock()
        if self._enabled and now - self._last_draw >= self._interval:
            self._draw(final=False)
            self._last_draw = now

    def close(self, note: str = "") -> None:
        """Draws the final line (with the elapsed time and an optional note) and ends it with a newline."""
        if not self._enabled:
            return
        self._draw(final=True, note=note)

    def _draw(self, final: bool, note: str = "") -> None:
        text = self.line()
        if final:
            text += f", {format_duration(self._clock() - self._start)} in all" + (f"; {note}" if note else "")
        if self._tty:
            pad = " " * max(0, self._width - len(text))
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
