"""Progress lines on stderr: bytes (downloads, checksums, unpacking) and counts (images embedded, training steps).

Standard library only, so a tool that only moves files never imports TensorFlow.

`ByteProgress` shows bytes done, rate and time left ("cub200 CUB_200_2011.tgz: 412.3 MiB of 1.07 GiB (37%), 5.2 MiB/s,
2:11 left"); `CountProgress` a labelled count with a bar ("embedding 4,224 test images, trained hdml: 1,984/4,224
[=====>      ] 47%, 350 images/s, 0:06 left"). Both fit the terminal's width (`terminal_width`).

On a terminal a line is redrawn in place (carriage return) every 0.2 s; into a file or a pipe, one full line is
written every 10 s, so a log of a three-hour download stays short. The final line is always written and ends with a
newline, so whatever follows (a table, the next step) starts on a clean line. The time left is shown once a second
of work gives a rate to extrapolate.

One line at a time is "live" (drawn without its newline). Whatever else writes to the terminal first calls
`end_line()`, which finishes or erases it: the tools' log handler, their error messages, and evaluation results
printed between training steps all do.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional, Sequence, TextIO, Tuple

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
#: Width assumed when neither COLUMNS nor the stream tells (a file, a pipe, a test's StringIO).
DEFAULT_WIDTH = 100

# The line drawn in place without its newline (an object with `_end_live(keep)`), or None.
_live = None


def end_line(keep: bool = True) -> None:
    """Finishes the line that is being redrawn in place, so other output starts on a line of its own.

    Args:
      keep: True leaves the last state on screen (a newline); False erases it (the owner draws it again at its
        next update, e.g. the training bar after an evaluation printed its results).
    """
    global _live
    live, _live = _live, None
    if live is not None:
        live._end_live(keep)


def _set_live(owner) -> None:
    global _live
    if _live is not None and _live is not owner:
        end_line(keep=True)
    _live = owner


def _release_live(owner) -> None:
    global _live
    if _live is owner:
        _live = None


def terminal_width(stream: Optional[TextIO] = None) -> int:
    """Columns available to a line on `stream`: $COLUMNS when set, else the terminal's width, else DEFAULT_WIDTH."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return os.get_terminal_size((stream or sys.stderr).fileno()).columns or DEFAULT_WIDTH
    except (AttributeError, OSError, ValueError):
        return DEFAULT_WIDTH


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


def format_count(n: float) -> str:
    """An integer with thousands separators: 4224 -> "4,224"."""
    return f"{int(n):,}"


def fit_line(parts: Sequence[Tuple[str, int]], width: int, fraction: Optional[float] = None, bar_index: int = 1,
             max_bar: int = 30, min_bar: int = 10) -> str:
    """Joins `parts` with spaces into one line of at most width - 1 characters (writing the last column makes some
    terminals wrap).

    Args:
      parts: (text, priority) in display order; while the line is too long, the part of the lowest priority is
        dropped (of equal ones, the rightmost); priority 0 parts are always kept.
      width: the terminal's columns.
      fraction: 0..1 draws a bar "[=====>    ]" in front of parts[bar_index], as wide as the room left (at most
        max_bar columns with its brackets, in steps of 5 below that; left out when fewer than min_bar columns
        would be inside them); None draws none.
      bar_index: the part the bar goes in front of.
    Returns:
      the line; cut with "..." when even the priority-0 parts are too long.
    """
    limit = max(10, width - 1)
    kept = [i for i, (text, _) in enumerate(parts) if text]

    def joined(indices):
        return " ".join(parts[i][0] for i in indices)

    while len(joined(kept)) > limit:
        droppable = [i for i in kept if parts[i][1] > 0]
        if not droppable:
            break
        lowest = min(parts[i][1] for i in droppable)
        kept.remove(max(i for i in droppable if parts[i][1] == lowest))
    texts = [parts[i][0] for i in kept]
    room = min(max_bar, limit - len(joined(kept)) - 1) - 2
    room -= room % 5 if room < max_bar - 2 else 0  # steps of 5 columns: the bar does not jitter with the numbers
    if fraction is not None and room >= min_bar:
        filled = int(round(min(max(fraction, 0.0), 1.0) * room))
        head = ">" if 0 < filled < room else ""
        texts.insert(sum(1 for i in kept if i < bar_index),
                     "[" + "=" * (filled - len(head)) + head + " " * (room - filled) + "]")
    text = " ".join(texts)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def wrap(text: str, stream: Optional[TextIO] = None, width: Optional[int] = None, indent: str = "  ") -> str:
    """`text` broken at spaces into lines of at most width - 1 characters, continuation lines indented, when it is
    printed on a terminal (`stream`, default sys.stdout; `width` default the terminal's); unchanged into a file, so
    a log keeps one record per line."""
    import textwrap
    if width is None:
        stream = stream if stream is not None else sys.stdout
        if not getattr(stream, "isatty", lambda: False)():
            return text
        width = terminal_width(stream)
    return "\n".join(textwrap.fill(line, width=max(20, width - 1), subsequent_indent=indent,
                                   break_long_words=False, break_on_hyphens=False) for line in text.splitlines())


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
            _release_live(self) if final else _set_live(self)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _end_live(self, keep: bool) -> None:
        self.stream.write("\n" if keep else "\r" + " " * self._width + "\r")
        self._width = 0 if keep else self._width
        self.stream.flush()


class CountProgress:
    """Progress of counted work (images, batches) with a label, drawn on `stream` (default sys.stderr).

        embedding 4,224 test images, trained hdml: 1,984/4,224 [=========>          ] 47% 350 images/s 0:06 left
        embedding 4,224 test images, trained hdml: 4,224 images in 0:12 (350 images/s)

    Args:
      label: what is being done.
      total: units expected (None: unknown, no bar and no time left); `update` past it raises the total.
      unit: plural name of what is counted ("images").
      stream: where to draw; None = sys.stderr.
      enabled: False draws nothing (the object still counts).
      clock: seconds, monotonic (tests pass a fake one).
      width: columns of the line; None = `terminal_width(stream)`.
      transient: erase the line when done instead of leaving the final line (a step repeated during training);
        into a file nothing is written for it then.
    """

    def __init__(self, label: str, total: Optional[int] = None, unit: str = "images",
                 stream: Optional[TextIO] = None, enabled: bool = True, clock: Callable[[], float] = time.monotonic,
                 width: Optional[int] = None, transient: bool = False):
        self.label, self.total, self.unit, self.done = label, total, unit, 0
        self.transient = transient
        self._stream, self._enabled, self._clock = stream, enabled, clock
        self._start = self._last_draw = clock()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._interval = 0.2 if self._tty else (float("inf") if transient else 10.0)
        self._width = width if width is not None else terminal_width(self.stream)
        self._drawn = 0  # characters of the line now on screen (tty)
        self._closed = False

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def rate(self) -> float:
        """Units per second so far (0 before any time has passed)."""
        elapsed = self._clock() - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The current state as one line that fits the width (no newline)."""
        rate, elapsed = self.rate(), self._clock() - self._start
        if self.total:
            parts = [(f"{self.label}:", 0), (f"{format_count(self.done)}/{format_count(self.total)}", 0),
                     (f"{min(100, int(100 * self.done / self.total))}%", 3)]
        else:
            parts = [(f"{self.label}:", 0), (f"{format_count(self.done)} {self.unit}", 0)]
        if rate > 0 and elapsed >= 1.0:
            parts.append((f"{_format_rate(rate)} {self.unit}/s", 1))
            if self.total and self.done < self.total:
                parts.append((f"{format_duration((self.total - self.done) / rate)} left", 2))
        fraction = self.done / self.total if self.total and self._tty else None  # no bar in a log file
        return fit_line(parts, self._width, fraction=fraction, bar_index=2)

    def update(self, n: int = 1) -> None:
        """Adds n units and redraws when the last drawing is old enough."""
        self.done += n
        if self.total is not None and self.done > self.total:
            self.total = self.done
        now = self._clock()
        if self._enabled and now - self._last_draw >= self._interval:
            self._draw(self.line())
            self._last_draw = now

    def close(self, note: str = "") -> None:
        """Draws the final line (count, time, rate and an optional note) ending with a newline; idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self._enabled:
            return
        if self.transient:
            if _live is self:
                end_line(keep=False)
            return
        elapsed = self._clock() - self._start
        text = f"{self.label}: {format_count(self.done)} {self.unit} in {format_duration(elapsed)}"
        if elapsed >= 1.0 and self.done:
            text += f" ({_format_rate(self.rate())} {self.unit}/s)"
        self._draw(text + (f"; {note}" if note else ""), final=True)

    def __enter__(self) -> "CountProgress":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        elif _live is self:  # an error: keep the state reached, on a line of its own
            end_line(keep=True)

    def _draw(self, text: str, final: bool = False) -> None:
        if self._tty:
            if final and len(text) > max(10, self._width - 1):
                text = text[:max(10, self._width - 1) - 3] + "..."
            redraw_live(self, text, final)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _end_live(self, keep: bool) -> None:
        erase_live(self, keep)
        self._drawn = 0
        self.stream.flush()



def redraw_live(owner, text: str, final: bool) -> None:
    """Draws `text` over `owner`'s live line on a terminal (`owner.stream`, `owner._drawn`: characters on it now);
    `final` ends the line and releases it, otherwise `owner` holds the live line."""
    owner.stream.write("\r" + text + " " * max(0, owner._drawn - len(text)) + ("\n" if final else ""))
    owner._drawn = 0 if final else len(text)
    _release_live(owner) if final else _set_live(owner)


def erase_live(owner, keep: bool) -> None:
    """Ends `owner`'s live line: kept as written (`keep`) or wiped. The caller decides what `_drawn` becomes."""
    owner.stream.write("\n" if keep else "\r" + " " * owner._drawn + "\r")

def _format_rate(rate: float) -> str:
    """Three significant figures at most: 0.25, 3.1, 42, 1,250."""
    if rate >= 100:
        return f"{rate:,.0f}"
    return f"{rate:.2g}" if rate < 10 else f"{rate:.0f}"


class Activity:
    """A step whose length nobody knows in advance (k-means restarts, a t-SNE map): its label and the time it has
    taken so far, redrawn every second on a terminal by a background thread; into a file, one line when it ends.

        untrained network: scoring (k-means, 10 restarts; Recall@K, MAP@R): 0:07
        untrained network: scoring (k-means, 10 restarts; Recall@K, MAP@R): done in 0:12

    Use as a context manager. An error inside leaves the line as it was, ended.

    Args:
      label: what is being done.
      stream: where to draw; None = sys.stderr.
      enabled: False draws nothing.
      clock: seconds, monotonic.
      interval: seconds between redraws on a terminal.
      transient: erase the line when done (nothing is written into a file).
    """

    def __init__(self, label: str, stream: Optional[TextIO] = None, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic, interval: float = 1.0, transient: bool = False):
        import threading
        self.label, self._stream, self._enabled, self._clock, self._interval = label, stream, enabled, clock, interval
        self.transient = transient
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._drawn = 0
        self._start = clock()
        self.seconds = 0.0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def __enter__(self) -> "Activity":
        import threading
        self._start = self._clock()
        if self._enabled and self._tty:
            self._draw(f"{self.label} ...")
            self._thread = threading.Thread(target=self._tick, daemon=True, name="hdml_tf-activity")
            self._thread.start()
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.seconds = self._clock() - self._start
        if not self._enabled:
            return
        if kind is None and self.transient:
            with self._lock:
                if _live is self:
                    end_line(keep=False)
        elif kind is None:
            self._draw(f"{self.label}: done in {format_duration(self.seconds)}", final=True)
        elif _live is self:
            end_line(keep=True)

    def _tick(self) -> None:
        while not self._stop.wait(self._interval):
            self._draw(f"{self.label}: {format_duration(self._clock() - self._start)}")

    def _draw(self, text: str, final: bool = False) -> None:
        with self._lock:
            if self._tty:
                if _live is not self and self._drawn and not final:
                    return  # someone else ended this line (a log record): do not draw over their output
                limit = max(10, terminal_width(self.stream) - 1)
                text = text if len(text) <= limit else text[:limit - 3] + "..."
                redraw_live(self, text, final)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def _end_live(self, keep: bool) -> None:
        erase_live(self, keep)
        self.stream.flush()
