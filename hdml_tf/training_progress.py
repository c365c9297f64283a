"""The training progress line: a few quantities a person follows, the step of the whole run and its time left.

Keras' own bar prints every logged quantity (fourteen for HDML, more with new diagnostics) and wraps over many lines
in an 80- or 120-column terminal. `TrainingProgress` shows the step out of the run's total, a bar, J_metric, J_m and
the synthetic weight 1 - e^(-beta/J_gen) (the weight of J_syn in J_metric), skipped non-finite steps when there are
any, the speed and the time left for all remaining steps, fitted to the terminal's width (on a narrow one the speed,
then the quantities give way before the time left). On a terminal the line is redrawn in place and each epoch
leaves one line (the glyph demo at 100 columns):

    hdml 149/600 [===>           ] 24% loss 5.873 J_m 3.401 syn_w 0.08062 | 1.82 steps/s, 4:08 left
    hdml epoch 2/6 (step 200/600): loss 6.400 J_m 3.829 syn_w 0.1028 | 1.84 steps/s, 3:37 left
    hdml epoch 6/6 (step 600/600): loss 1.466 J_m 0.7404 syn_w 0.2494 | 1.80 steps/s, 6:07 in all

Into a file or a pipe it writes the epoch lines and one progress line a minute, without the bar. The speed is the
median of the last SPEED_WINDOW step durations; the first step (graph tracing) and whatever runs between steps
(evaluations, checkpoints) are left out. Every logged quantity still goes to the History (history_<variant>.csv)
and to TensorBoard: this is only what the screen shows.
"""
from __future__ import annotations

import collections
import statistics
import sys
import time
from typing import Callable, Dict, Mapping, Optional, Sequence, TextIO, Tuple

import keras

from hdml_tf import progress

#: (log key, label) of the quantities shown, in order; other keys (new diagnostics included) are not shown.
SHOWN: Tuple[Tuple[str, str], ...] = (("loss", "loss"), ("j_m", "J_m"), ("syn_weight", "syn_w"))
#: Steps whose durations estimate the speed (the median, so an evaluation between two steps does not count).
SPEED_WINDOW = 200


def format_value(value: float) -> str:
    """Four significant figures, trailing zeros kept so the line does not jitter: 54.70, 0.01234, 1.235e+05."""
    return f"{float(value):#.4g}"


def format_speed(seconds_per_step: float) -> str:
    """"7.47 steps/s" (three figures), or "2.31 s/step" below one step a second."""
    rate = 1.0 / seconds_per_step
    if rate < 1:
        return f"{seconds_per_step:#.3g} s/step"
    return f"{rate:#.3g} steps/s" if rate < 1000 else f"{rate:,.0f} steps/s"


class TrainingProgress(keras.callbacks.Callback):
    """One progress line for `model.fit` (pass `verbose=0` to fit so Keras draws no bar of its own).

    Args:
      total_steps: the run's last global step (`RunConfig.steps`).
      initial_step: the global step training starts from (a resumed run's checkpoint step).
      steps_per_epoch: steps of one Keras epoch (epoch numbers shown as Keras counts them).
      label: what is trained ("hdml", "baseline").
      shown: (log key, label) pairs to show; keys absent from the logs are skipped.
      stream: where to draw; None = sys.stderr.
      width: line width; None = the terminal's (`hdml_tf.progress.terminal_width`).
      clock: seconds, monotonic (tests pass a fake one).
      interval: seconds between redraws (default 0.2 on a terminal, 60 into a file).
    """

    def __init__(self, total_steps: int, initial_step: int = 0, steps_per_epoch: Optional[int] = None,
                 label: str = "", shown: Sequence[Tuple[str, str]] = SHOWN, stream: Optional[TextIO] = None,
                 width: Optional[int] = None, clock: Callable[[], float] = time.monotonic,
                 interval: Optional[float] = None):
        super().__init__()
        self.total_steps, self.step = int(total_steps), int(initial_step)
        self.steps_per_epoch = steps_per_epoch
        self.label, self.shown = label, tuple(shown)
        self._stream, self._clock = stream, clock
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = width
        self._interval = interval if interval is not None else (0.2 if self._tty else 60.0)
        self._durations = collections.deque(maxlen=SPEED_WINDOW)  # seconds per step
        self._last_end: Optional[float] = None  # when the last step ended (None: next interval not measured)
        self._last_draw = -float("inf")
        self._epoch_start = self._start_step = self.step
        self._train_start = clock()
        self._epoch = 0
        self._drawn = 0
        self._logs: Dict[str, float] = {}

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def width(self) -> int:
        return self._width if self._width is not None else progress.terminal_width(self.stream)

    # ------------------------------------------------------------------------------------------- Keras hooks
    def on_train_begin(self, logs=None):
        self._last_end = None  # the first step traces and compiles the graph: not a step time
        self._train_start = self._clock()
        self._start_step = self.step
        self._draw(self.line(note="first step: building the training graph"))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._epoch_start = int(epoch), self.step
        self._last_end = None  # whatever ran between epochs (evaluation, checkpoints) is not a step time

    def on_train_batch_end(self, batch, logs=None):
        now = self._clock()
        previous, self.step = self.step, self._epoch_start + int(batch) + 1
        if self._last_end is not None and self.step > previous:
            per_step = (now - self._last_end) / (self.step - previous)
            self._durations.extend([per_step] * min(self.step - previous, SPEED_WINDOW))
        self._last_end = now
        self._logs = _floats(logs)
        if now - self._last_draw >= self._interval:
            self._draw(self.line())
            self._last_draw = now

    def on_epoch_end(self, epoch, logs=None):
        self._logs = _floats(logs) or self._logs
        self._draw(self.epoch_line(epoch), final=True)
        self._last_draw = self._clock()

    def on_train_end(self, logs=None):
        if self._drawn:
            progress.end_line(keep=True)

    # ------------------------------------------------------------------------------------------- lines
    def seconds_per_step(self) -> Optional[float]:
        """Median duration of the recent steps (None before two steps ran)."""
        return statistics.median(self._durations) if self._durations else None

    def _speed_parts(self):
        per_step = self.seconds_per_step()
        if not per_step:
            return []
        if self.step >= self.total_steps:  # the end: how long it took instead of "0:00 left"
            time = f"{progress.format_duration(self._clock() - self._train_start)} in all"
        else:
            time = f"{progress.format_duration((self.total_steps - self.step) * per_step)} left"
        # Priorities (fit_line drops the lowest first on a narrow terminal): the time left outlasts the quantities,
        # the speed goes first.
        return [("|", 8), (format_speed(per_step) + ",", 3), (time, 8)]

    def _quantity_parts(self):
        parts = []
        for rank, (key, name) in enumerate(self.shown):
            if key in self._logs:
                parts.append((f"{name} {format_value(self._logs[key])}", max(4, 6 - rank)))
        skipped = self._logs.get("skipped_steps", 0.0)
        if skipped and skipped > 0:
            parts.append((f"skipped {int(skipped)}", 20))  # non-finite steps: the one thing never to hide
        return parts

    def line(self, note: str = "") -> str:
        """The live line: label, step of total, bar, percentage, quantities, speed and time left (or `note`)."""
        total = max(self.total_steps, 1)
        parts = [(self.label, 0), (f"{progress.format_count(self.step)}/{progress.format_count(total)}", 0),
                 (f"{min(100, 100 * self.step // total)}%", 2)]
        parts += [(note, 5)] if note else self._quantity_parts() + self._speed_parts()
        return progress.fit_line([p for p in parts if p[0]], self.width, bar_index=2 if self.label else 1,
                                 fraction=self.step / total if self._tty else None)  # no bar in a log file

    def epoch_line(self, epoch: int) -> str:
        """The line an epoch leaves: epoch of epochs, the step reached, the epoch's mean quantities, speed."""
        epochs = -(-self.total_steps // self.steps_per_epoch) if self.steps_per_epoch else None
        head = f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else "")
        parts = [(self.label, 0), (head, 0),
                 (f"(step {progress.format_count(self.step)}/{progress.format_count(self.total_steps)}):", 0)]
        parts += self._quantity_parts() + self._speed_parts()
        return progress.fit_line([p for p in parts if p[0]], self.width)

    # ------------------------------------------------------------------------------------------- drawing
    def _draw(self, text: str, final: bool = False) -> None:
        if self._tty:
            progress.redraw_live(self, text, final)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _end_live(self, keep: bool) -> None:
        """Called through `hdml_tf.progress.end_line` when something else prints between two steps."""
        progress.erase_live(self, keep)
        self.stream.flush()
        self._drawn = 0
        self._last_end = None  # that something took time that is not a step's


def _floats(logs: Optional[Mapping]) -> Dict[str, float]:
    out = {}
    for key, value in (logs or {}).items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out
