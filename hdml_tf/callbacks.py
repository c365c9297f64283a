"""Keras callbacks that make a long training safe to interrupt: checkpoints, preemption, NaN guard, step limit.

Each callback counts global steps itself (`initial_step` + batches seen in this `fit`), the number of batches
consumed, which is also the sampler's position. `hdml_tf.experiment.fit` wires them up from a `RunConfig`;
they work with any `model.fit` on an `HDMLModel`:

- `PeriodicCheckpoint`: a checkpoint every N steps and at the end of training (`CheckpointManager`, atomic).
- `SaveOnSignal`: on SIGTERM (preemption) or SIGINT (Ctrl-C), finishes the running step, saves, stops `fit`;
  `interrupted` tells. Without a checkpoint manager it still stops cleanly and says that nothing was saved.
- `EpochLog`: one history row per epoch (CSV, numbered by global epoch, with the global step) and every logged
  loss and diagnostic as TensorBoard scalars at the global step; a resumed run continues the same files.
- `ContinueEpochMeans`: a run resumed mid-epoch continues that epoch's running means where the checkpoint left
  them, so its history row equals the uninterrupted run's.
- `NonFiniteGuard`: logs each skipped step with the losses / gradients that were NaN or Inf and raises
  `TrainingDiverged` after K consecutive skipped steps, before any further checkpoint is written.
- `StopAtStep`: ends `fit` at exactly the requested global step (epochs may not divide it, or a resumed run
  starts mid-epoch).

Put `NonFiniteGuard` before `PeriodicCheckpoint` in the list: an exception in it ends `fit` before a checkpoint
of that step could be written.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np

from hdml_tf import atomic
from hdml_tf.checkpointing import CheckpointManager
from hdml_tf.errors import HDMLError

log = logging.getLogger(__name__)


class TrainingDiverged(HDMLError):
    """Too many consecutive steps had a NaN/Inf loss or gradient; the last good checkpoint is kept."""


class TrainingInterrupted(HDMLError):
    """A signal (SIGTERM: preemption; SIGINT: Ctrl-C) stopped training, after saving a checkpoint when there is a
    checkpoint directory; run the same command again to resume.

    `exit_code` is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), what a shell reports for a process
    the signal ended.
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


#: The signals that stop training cleanly: preemption (SIGTERM) and Ctrl-C (SIGINT).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SaveOnSignal(_StepCallback):
    """On SIGTERM or SIGINT (Ctrl-C), lets the running step finish, saves a checkpoint, and stops `fit`.

    The handler is installed for the duration of `fit` (main thread only) and only sets a flag; a second signal
    gets the previous handler (by default: terminate at once; Ctrl-C twice raises KeyboardInterrupt). After `fit`,
    `interrupted` is the signal number (None if none came) and `message` says where the state is.

    Args:
      checkpoint: the run's PeriodicCheckpoint, or None without a checkpoint directory (training then stops and the
        message says that the model was not saved).
      signals: the signals handled.
      initial_step: global step at the start of `fit`.
      total_steps: the run's last step, named in the message.
    """

    def __init__(self, checkpoint: Optional[PeriodicCheckpoint], signals: Sequence[int] = STOP_SIGNALS,
                 initial_step: int = 0, total_steps: Optional[int] = None):
        super().__init__(initial_step)
        self.checkpoint = checkpoint
        self.signals = tuple(signals)
        self.total_steps = total_steps
        self.interrupted: Optional[int] = None
        self.message = ""
        self._previous = {}

    def _handle(self, signum, frame):
        self.interrupted = signum
        signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)  # a second signal is not deferred
        log.warning("received %s: %s after the current step, then stopping", signal.Signals(signum).name,
                    "saving a checkpoint" if self.checkpoint is not None else "stopping training")

    def on_train_begin(self, logs=None):
        if threading.current_thread() is not threading.main_thread():
            log.warning("training runs outside the main thread: SIGTERM / Ctrl-C will not save a checkpoint")
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
        of = f" of {self.total_steps}" if self.total_steps else ""
        if self.checkpoint is None:
            self.message = (f"training stopped by {name} at step {self.step}{of}; the model was not saved (no "
                            f"--checkpoint_dir): pass --checkpoint_dir to be able to resume")
            log.warning("%s", self.message)
            return
        manager = self.checkpoint.manager
        # The checkpoint callback counts the same steps; save through it so it does not save the step twice.
        path = self.checkpoint.save()
        if path is not None:
            self.message = (f"training stopped by {name} at step {self.step}{of}; the checkpoint in "
                            f"{manager.directory} holds that step: run the same command again to resume")
        else:
            latest = manager.latest_step
            self.message = (f"training stopped by {name} at step {self.step}{of}, but its checkpoint could not be "
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


class ContinueEpochMeans(keras.callbacks.Callback):
    """Puts back the per-epoch running means (`model.metrics_variables`) a checkpoint saved mid-epoch.

    Keras resets them at the start of every epoch, including the first epoch of a resumed run; when that epoch
    started before the checkpoint, its means must continue from the checkpoint's state so that its history row is
    the uninterrupted run's. Pass the values `CheckpointManager.restore` read (`restored_metrics`).
    """

    def __init__(self, values: Sequence[np.ndarray]):
        super().__init__()
        self.values = list(values)
        self._done = False

    def on_epoch_begin(self, epoch, logs=None):
        if self._done:
            return
        self._done = True
        variables = list(self.model.metrics_variables)
        if len(variables) != len(self.values) or any(tuple(v.shape) != tuple(np.shape(x))
                                                      for v, x in zip(variables, self.values)):
            log.warning("the checkpoint's epoch means do not fit this model's metrics; the resumed epoch's history "
                        "row averages only the steps after the resume")
            return
        for v, x in zip(variables, self.values):
            v.assign(x)


class EpochLog(_StepCallback):
    """The run's history, one row per epoch, in a CSV and in TensorBoard, continuous across resumes.

    Each epoch end adds {"epoch": global epoch number (1..), "step": global step, every logged quantity} to the CSV
    (rewritten atomically: a kill never leaves half a row) and writes every logged number as a TensorBoard scalar
    (tag = the Keras log key, e.g. "loss", "j_gen", "pull_factor", "val_recall@1"; x = the global step). A resumed run
    calls `resume_at(step)`: rows after that step (steps the resumed run trains again) are dropped from the CSV,
    and the TensorBoard directory is rewritten from the rows kept, so both read as one uninterrupted run.

    A failed write (full disk) is logged and tried again at the next epoch; training goes on.

    Args:
      csv_path: the history CSV.
      tensorboard_dir: TensorBoard log directory of the training scalars (None: no TensorBoard).
      steps_per_epoch: steps per epoch (for the global epoch number of a row).
      initial_step: global step at the start of `fit`.
    """

    def __init__(self, csv_path, tensorboard_dir=None, steps_per_epoch: int = 1, initial_step: int = 0):
        super().__init__(initial_step)
        self.csv_path = Path(csv_path)
        self.tensorboard_dir = Path(tensorboard_dir) if tensorboard_dir else None
        self.steps_per_epoch = int(steps_per_epoch)
        self.rows: List[Dict[str, float]] = []
        self._writer = None
        self.resume_at(initial_step)

    def resume_at(self, step: int) -> None:
        """Continues the history of the run at global step `step` (rows after it are dropped: trained again)."""
        from hdml_tf.rundir import read_csv_rows
        self.step = int(step)
        old = read_csv_rows(self.csv_path)
        self.rows = [r for r in old if _row_step(r) is not None and _row_step(r) <= self.step] if self.step else []
        if len(self.rows) != len(old):
            self._write_csv()
        if self.tensorboard_dir is not None and (old or self._event_files()):
            self._rewrite_tensorboard()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": -(-self.step // self.steps_per_epoch), "step": self.step}
        row.update({k: float(v) for k, v in (logs or {}).items() if _is_number(v)})
        self.rows = [r for r in self.rows if _row_step(r) != self.step] + [row]
        self._write_csv()
        self._write_scalars([row])

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------------------------------------ files
    def _write_csv(self) -> None:
        from hdml_tf.rundir import rows_to_csv
        try:
            with atomic.guarded("the training history", self.csv_path):
                self.csv_path.parent.mkdir(parents=True, exist_ok=True)
                atomic.write_text(self.csv_path, rows_to_csv(self.rows))
        except HDMLError as e:
            log.error("%s; training goes on and the next epoch tries again", e)

    def _event_files(self) -> List[Path]:
        if self.tensorboard_dir is None or not self.tensorboard_dir.is_dir():
            return []
        return sorted(self.tensorboard_dir.glob("events.out.tfevents.*"))

    def _rewrite_tensorboard(self) -> None:
        """Replaces the event files by one holding exactly the kept rows (TensorBoard would otherwise show the
        steps a killed process ran past its last checkpoint twice)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for p in self._event_files():
            try:
                p.unlink()
            except OSError as e:
                log.warning("could not remove %s (%s); TensorBoard may show steps twice", p,
                            atomic.describe_os_error(e))
        self._write_scalars(self.rows)

    def _write_scalars(self, rows) -> None:
        if self.tensorboard_dir is None or not rows:
            return
        import tensorflow as tf

        from hdml_tf.evaluation.callback import write_scalars
        try:
            if self._writer is None:
                self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
                self._writer = tf.summary.create_file_writer(str(self.tensorboard_dir))
            for row in rows:
                write_scalars(self._writer, {k: v for k, v in row.items() if k not in ("epoch", "step")},
                              int(row["step"]))
        except (OSError, tf.errors.OpError) as e:
            log.error("could not write TensorBoard scalars to %s (%s); training goes on", self.tensorboard_dir,
                      atomic.describe_os_error(e) if isinstance(e, OSError) else e.message)


def _row_step(row) -> Optional[int]:
    step = row.get("step")
    if step is None or (isinstance(step, float) and math.isnan(step)):
        return None
    return int(step)


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
