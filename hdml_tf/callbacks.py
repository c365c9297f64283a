"""Keras callbacks that make a long training safe to interrupt: checkpoints, preemption, NaN guard, step limit.

Each callback counts global steps itself (`initial_step` + batches seen in this `fit`), the number of batches
consumed, which is also the sampler's position. `hdml_tf.experiment.fit` wires them up from a `RunConfig`;
they work with any `model.fit` on an `HDMLModel`:

- `PeriodicCheckpoint`: a checkpoint every N steps and at the end of training (`CheckpointManager`, atomic).
- `SaveOnSignal`: on SIGTERM (preemption), finishes the running step, saves, stops `fit`; `interrupted` tells.
- `NonFiniteGuard`: logs each skipped step with the losses / gradients that were NaN or Inf and raises
  `TrainingDiverged` after K consecutive skipped steps, before any further checkpoint is written.
- `StopAtStep`: ends `fit` at exactly the requested global step (epochs may not divide it, or a resumed run
  starts mid-epoch).

Put `NonFiniteGuard` before `PeriodicCheckpoint` in the list: an exception in it ends `fit` before a checkpoint
of that step could be written.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional, Sequence

import keras
import numpy as np

from hdml_tf.checkpointing import CheckpointManager
from hdml_tf.errors import HDMLError

log = logging.getLogger(__name__)


class TrainingDiverged(HDMLError):
    """Too many consecutive steps had a NaN/Inf loss or gradient; the last good checkpoint is kept."""


class TrainingInterrupted(HDMLError):
    """A signal (SIGTERM: preemption) stopped training after a checkpoint was saved; run again to resume.

    `exit_code` is 128 + the signal number (143 for SIGTERM), what a shell reports for a process the signal ended.
    """

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


def _scalar(variable) -> float:
    return float(np.asarray(keras.ops.convert_to_numpy(variable)))


class _StepCallback(keras.callbacks.Callback):
    def __init__(self, initial_step: int = 0):
        super().__init__()
        self.step = int(initial_step)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1


class StopAtStep(_StepCallback):
    """Stops `fit` once the global step reaches `total_steps`."""

    def __init__(self, total_steps: int, initial_step: int = 0):
        super().__init__(initial_step)
        self.total_steps = int(total_steps)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.step >= self.total_steps:
            self.model.stop_training = True


class PeriodicCheckpoint(_StepCallback):
    """Saves every `every` global steps (0: only at the end) and when training ends.

    A save that falls during a run of skipped (non-finite) steps is postponed to the next good step, so the newest
    checkpoint always follows an applied update. A failed write (full disk) is logged and retried at the next
    save; training goes on.
    """

    def __init__(self, manager: CheckpointManager, every: int, initial_step: int = 0):
        super().__init__(initial_step)
        self.manager = manager
        self.every = int(every)
        self.saved_step: Optional[int] = None
        self._due = False
        self._skipped = 0.0

    def on_train_begin(self, logs=None):
        self._skipped = _scalar(self.model.skipped)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        skipped = _scalar(self.model.skipped)
        bad_step, self._skipped = skipped > self._skipped, skipped
        if self.every and self.step % self.every == 0:
            self._due = True
        if self._due and not bad_step:
            self.save()

    def on_train_end(self, logs=None):
        self.save()

    def save(self):
        """Saves the current step unless it is already saved; returns the path (None if the write failed)."""
        if self.saved_step == self.step:
            return self.manager.directory
        path = self.manager.save(self.model, self.step)
        if path is not None:
            self.saved_step = self.step
            self._due = False
        return path


class SaveOnSignal(_StepCallback):
    """On SIGTERM (or `signals`), lets the running step finish, saves a checkpoint, and stops `fit`.

    The handler is installed for the duration of `fit` (main thread only) and only sets a flag; a second signal
    gets the previous handler (by default: terminate at once). After `fit`, `interrupted` is the signal number
    (None if none came) and `message` says where the state is.
    """

    def __init__(self, checkpoint: PeriodicCheckpoint, signals: Sequence[int] = (signal.SIGTERM,),
                 initial_step: int = 0):
        super().__init__(initial_step)
        self.checkpoint = checkpoint
        self.signals = tuple(signals)
        self.interrupted: Optional[int] = None
        self.message = ""
        self._previous = {}

    def _handle(self, signum, frame):
        self.interrupted = signum
        signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)  # a second signal is not deferred
        log.warning("received %s: saving a checkpoint after the current step, then stopping",
                    signal.Signals(signum).name)

    def on_train_begin(self, logs=None):
        if threading.current_thread() is not threading.main_thread():
            log.warning("training runs outside the main thread: SIGTERM will not save a checkpoint")
            return
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.interrupted is not None and not self.message:
            self.model.stop_training = True
            self._stop()

    def _stop(self):
        name = signal.Signals(self.interrupted).name
        manager = self.checkpoint.manager
        # The checkpoint callback counts the same steps; save through it so it does not save the step twice.
        path = self.checkpoint.save()
        if path is not None:
            self.message = (f"training stopped by {name} at step {self.step}; the checkpoint in {manager.directory} "
                            f"holds that step: run the same command again to resume")
        else:
            latest = manager.latest_step
            self.message = (f"training stopped by {name} at step {self.step}, but its checkpoint could not be "
                            f"written ({manager.last_error}); resuming restarts from "
                            f"{'step %d' % latest if latest is not None else 'scratch'}")
        log.warning("%s", self.message)

    def on_train_end(self, logs=None):
        if self.interrupted is not None and not self.message:  # the signal came after the last step
            self._stop()
        self.restore_handlers()

    def restore_handlers(self):
        """Puts the previous signal handlers back (also call it when `fit` raised: on_train_end did not run)."""
        for s, previous in self._previous.items():
            if signal.getsignal(s) == self._handle:
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


class NonFiniteGuard(_StepCallback):
    """Logs every skipped step (NaN/Inf in a loss or gradient: `HDMLModel.train_step` applied no update) with the
    quantities that went bad, and raises `TrainingDiverged` after `max_bad_steps` consecutive ones (0: never).

    Args:
      max_bad_steps: K; K consecutive skipped steps stop training.
      initial_step: global step at the start of `fit`.
      manager: the run's CheckpointManager, named in the message (where the last good checkpoint is), if any.
    """

    def __init__(self, max_bad_steps: int, initial_step: int = 0, manager: Optional[CheckpointManager] = None):
        super().__init__(initial_step)
        self.max_bad_steps = int(max_bad_steps)
        self.manager = manager
        self.streak = 0
        self.total = 0
        self._skipped = 0.0

    def on_train_begin(self, logs=None):
        self._skipped = _scalar(self.model.skipped)

    def bad_quantities(self):
        """Names of the losses / gradient routes that were NaN or Inf in the last step."""
        report = getattr(self.model, "nonfinite_report", None)
        return report() if report is not None else []

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        skipped = _scalar(self.model.skipped)
        if skipped <= self._skipped:
            self.streak = 0
            return
        self._skipped = skipped
        self.streak += 1
        self.total += 1
        bad = ", ".join(self.bad_quantities()) or "unknown"
        log.warning("step %d skipped: non-finite %s; weights, optimizer state and BatchNorm statistics left "
                    "unchanged (%d in a row, %d in this run)", self.step, bad, self.streak, self.total)
        if self.max_bad_steps and self.streak >= self.max_bad_steps:
            first = self.step - self.streak + 1
            where = ""
            if self.manager is not None:
                latest = self.manager.latest_step
                where = (f"; the last good checkpoint (step {latest}) in {self.manager.directory} is kept"
                         if latest is not None else "; no checkpoint was written yet")
            raise TrainingDiverged(
                f"training diverged: {self.streak} consecutive steps ({first}..{self.step}) had non-finite values "
                f"({bad} in the last one) and were not applied{where}. Lower the learning rates, check the data "
                f"of those steps, or raise max_bad_steps")
