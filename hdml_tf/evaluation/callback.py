"""Periodic evaluation during `fit`: metrics into the Keras logs, TensorBoard and a CSV; best and last checkpoints.

The official training loop (main_npair.py of github wzzheng/HDML) evaluates every 500 steps, every 64 steps once
step 5000 is reached, and keeps the checkpoint with the best TEST NMI. Selecting on the test classes flatters the
result; the fair protocol (Musgrave et al., ECCV 2020) selects on classes held out from the TRAINING split:
`split_validation_classes`. Either way `EvaluationCallback` reports the last evaluation next to the selected one.

Habit from tensorflow-similarity's `EvalCallback`: results land in `logs` with a `val_` prefix, so
`keras.callbacks.ModelCheckpoint(monitor="val_recall@1", mode="max")` or `EarlyStopping` work with no glue. Put this
callback BEFORE them in the `callbacks` list: Keras hands the same `logs` dict to the callbacks in order.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from hdml_tf import atomic
from hdml_tf.data.image_set import ImageSet
from hdml_tf.evaluation import metrics
from hdml_tf.evaluation.embedding import embed_dataset

# Official schedule (main_npair.py): evaluate when step % bp_epoch == 0, bp_epoch = 500 until step 5000, then 64.
OFFICIAL_FIRST_PERIOD = 500
OFFICIAL_SWITCH_STEP = 5000
OFFICIAL_SECOND_PERIOD = 64


def official_schedule(step: int) -> bool:
    """True at the official evaluation steps: 500, 1000, ..., 5000, then every multiple of 64 (5056, 5120, ...)."""
    if step <= OFFICIAL_SWITCH_STEP:
        return step > 0 and step % OFFICIAL_FIRST_PERIOD == 0
    return step % OFFICIAL_SECOND_PERIOD == 0


def split_validation_classes(image_set: ImageSet, fraction: float = 0.25, seed: int = 0) -> Tuple[ImageSet, ImageSet]:
    """Splits a TRAINING set by class into (train, validation) for fair model selection.

    Classes (not images) are held out, so validation measures retrieval of unseen classes like the test split does.
    The default 0.25 is one fold of the 4-fold class-disjoint cross-validation of Musgrave et al. (ECCV 2020).

    Args:
      image_set: the training split (labels 0..C-1).
      fraction: share of the classes that goes to validation; round(fraction * C), at least 2 and leaving 2.
      seed: which classes are drawn (NumPy default_rng).
    Returns:
      (train, validation): both remapped to labels 0..C'-1, named "<name>[train]" and "<name>[val]".
    Raises:
      ValueError: fraction outside (0, 1) or fewer than 4 classes with images.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction} must lie strictly between 0 and 1")
    present = np.unique(image_set.labels)
    if len(present) < 4:
        raise ValueError(f"ImageSet {image_set.name!r} has {len(present)} classes; a class-disjoint validation "
                         "split needs at least 4 (2 to train on, 2 to validate)")
    n_val = int(min(max(round(fraction * len(present)), 2), len(present) - 2))
    val_classes = np.random.default_rng(seed).choice(present, size=n_val, replace=False)
    is_val = np.isin(image_set.labels, val_classes)
    train = image_set.subset(np.nonzero(~is_val)[0], name=f"{image_set.name}[train]").remap()
    val = image_set.subset(np.nonzero(is_val)[0], name=f"{image_set.name}[val]").remap()
    return train, val


_Data = Union[tf.data.Dataset, Iterable, Callable[[keras.Model], Tuple[np.ndarray, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class EvaluationFiles:
    """Where an EvaluationCallback writes (each optional; `hdml_tf.rundir.RunDir` names a run's own).

    Attributes:
      best_weights: `.weights.h5` saved when the monitored metric improves (strictly).
      last_weights: `.weights.h5` saved after every evaluation.
      csv: one row per evaluation (epoch, step, eval_seconds, metrics), appended.
      tensorboard: a TensorBoard log directory (tags "val_recall@1", ..., x-axis = global training step).
      summary: JSON with the best and the last evaluation, written at the end of training.
    """

    best_weights: Optional[str] = None
    last_weights: Optional[str] = None
    csv: Optional[str] = None
    tensorboard: Optional[str] = None
    summary: Optional[str] = None

    def __post_init__(self):
        for name in ("best_weights", "last_weights"):
            path = getattr(self, name)
            if path is not None and not str(path).endswith(".weights.h5"):
                raise ValueError(f"{name}={path!r} must end with '.weights.h5' (Keras 3 save_weights)")


class EvaluationCallback(keras.callbacks.Callback):
    """Evaluates retrieval and clustering on a held-out dataset every k epochs or steps.

    Each evaluation embeds `data` with the model (the model returns L2-normalized embeddings when called), scores
    it with `protocol` (`metrics.EvaluationProtocol`: Recall@K, MAP@R, R-Precision, NMI/F1 by the official k-means
    protocol unless told otherwise), and
      * writes `val_nmi`, `val_f1`, `val_recall@K`, `val_map@r`, `val_r_precision` into the Keras `logs`: at the
        batch that triggered a step-based evaluation and, at every epoch end, the latest results (so epoch-level
        consumers - ModelCheckpoint, EarlyStopping, History, CSVLogger - see them too);
      * writes the files of `files` (`EvaluationFiles`: best / last weights, a CSV row, TensorBoard scalars, and at
        the end of training a JSON summary), and prints the best and the last results.

    When to evaluate: `schedule="official"` (500, 1000, ..., 5000, then every 64 steps), or `every_n_steps=k`, or
    a callable `schedule(step) -> bool`; epoch-based with `every_n_epochs` (default: 1 when no step schedule is
    given, otherwise off). Steps are global: a resumed run calls `resume_at(step)` before `fit`.

    Attributes (public state):
      step: global training step (batches seen since `resume_at` / `initial_step`).
      history: list of {"epoch", "step", "eval_seconds", metric: value} per evaluation.
      last, best: the latest and the best evaluation rows (None before the first); `metrics_of(row)` keeps the
        metrics only; `last_metrics` / `best_metrics` are those of `last` / `best`.
      monitor, prefix, protocol, files.
    """

    def __init__(self, data: _Data, *, protocol: Optional[metrics.EvaluationProtocol] = None,
                 monitor: str = "recall@1", every_n_epochs: Optional[int] = None, every_n_steps: Optional[int] = None,
                 schedule: Union[None, str, Callable[[int], bool]] = None, files: Optional[EvaluationFiles] = None,
                 prefix: str = "val_", initial_step: int = 0, evaluate_on_train_end: bool = True,
                 progress: bool = False, verbose: int = 1):
        super().__init__()
        if schedule is not None and every_n_steps is not None:
            raise ValueError("give either schedule= or every_n_steps=, not both")
        if isinstance(schedule, str):
            if schedule != "official":
                raise ValueError(f"schedule={schedule!r} is unknown; expected 'official' or a callable step -> bool")
            schedule = official_schedule
        elif schedule is not None and not callable(schedule):
            raise ValueError(f"schedule must be 'official', a callable or None, got {type(schedule).__name__}")
        if every_n_steps is not None:
            if not isinstance(every_n_steps, int) or every_n_steps < 1:
                raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
            schedule = lambda step, k=every_n_steps: step % k == 0  # noqa: E731
        if every_n_epochs is None and schedule is None:
            every_n_epochs = 1
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be a positive integer or None, got {every_n_epochs!r}")
        self.protocol = protocol or metrics.EvaluationProtocol()
        expected = self.protocol.metric_names()
        key = monitor[len(prefix):] if prefix and monitor.startswith(prefix) else monitor
        if key not in expected:
            raise ValueError(f"monitor={monitor!r} is not computed; choose one of {', '.join(expected)}")
        self.data = data
        self.every_n_epochs = every_n_epochs
        self.schedule = schedule
        self.monitor = key
        self.prefix = prefix
        self.files = files or EvaluationFiles()
        self.evaluate_on_train_end = evaluate_on_train_end
        self.progress = progress
        self.verbose = verbose
        self.history: List[Dict[str, float]] = []
        self.last: Optional[Dict[str, float]] = None
        self.best: Optional[Dict[str, float]] = None
        self._num_classes = 0  # classes of the last evaluated split (k of its k-means unless the protocol fixes k)
        self._epoch = 0
        self._writer = None
        self.resume_at(initial_step)

    def resume_at(self, step: int) -> None:
        """Counts training steps from global step `step` (call before `fit` when a run resumes mid-way)."""
        self.step = self._epoch_start_step = int(step)

    @staticmethod
    def metrics_of(row: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
        """The metrics of an evaluation row (without "epoch", "step", "eval_seconds")."""
        if row is None:
            return None
        return {k: v for k, v in row.items() if k not in ("epoch", "step", "eval_seconds")}

    @property
    def last_metrics(self) -> Optional[Dict[str, float]]:
        return self.metrics_of(self.last)

    @property
    def best_metrics(self) -> Optional[Dict[str, float]]:
        return self.metrics_of(self.best)

    # ------------------------------------------------------------------------------------------------- hooks
    def on_train_begin(self, logs=None):
        if self.files.tensorboard and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.files.tensorboard)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start_step = self.step

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the index of the last step run (with steps_per_execution > 1 Keras reports once per execution),
        # so the schedule is checked for every step since the previous report. (Keras 3 reports a partial last
        # execution of an epoch as a full one; steps are then over-counted by the missing steps.)
        previous, self.step = self.step, self._epoch_start_step + int(batch) + 1
        if self.schedule is not None and any(self.schedule(s) for s in range(previous + 1, self.step + 1)):
            row = self.evaluate_now()
            if logs is not None:
                logs.update(self._prefixed(row))

    def on_epoch_end(self, epoch, logs=None):
        due = self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0
        if due and (self.last is None or self.last["step"] != self.step):
            self.evaluate_now()
        if logs is not None and self.last is not None:
            logs.update(self._prefixed(self.last))

    def on_train_end(self, logs=None):
        if self.evaluate_on_train_end and (self.last is None or self.last["step"] != self.step):
            self.evaluate_now()
        if self.last is None:
            return
        summary = {"monitor": self.prefix + self.monitor, "best": self.best, "last": self.last,
                   "clustering_protocol": self.describe_protocol()}
        if self.files.summary:
            _makedirs_for(self.files.summary)
            atomic.write_json(self.files.summary, summary)
        if self.verbose:
            print(f"evaluation: best by {self.monitor} at step {self.best['step']}, last at step {self.last['step']}")
            print(metrics.format_results({"best": self.best_metrics, "last": self.last_metrics},
                                         protocol=self.describe_protocol()))
        if self._writer is not None:
            self._writer.flush()

    # ---------------------------------------------------------------------------------------------- helpers
    def evaluate_now(self) -> Dict[str, float]:
        """Runs one evaluation at the current step and records it (logs are updated by the calling hook)."""
        start = time.time()
        if callable(self.data) and not isinstance(self.data, tf.data.Dataset):
            embeddings, labels = self.data(self.model)
        else:
            embeddings, labels = embed_dataset(self.model, self.data, progress=self.progress)
        results = self.protocol.evaluate(embeddings, labels)
        self._num_classes = len(np.unique(labels))
        row = {"epoch": self._epoch + 1, "step": self.step, "eval_seconds": round(time.time() - start, 3), **results}
        self.history.append(row)
        self.last = row
        improved = self.best is None or row[self.monitor] > self.best[self.monitor]
        if improved:
            self.best = row
            if self.files.best_weights:
                self._save_weights(self.files.best_weights)
        if self.files.last_weights:
            self._save_weights(self.files.last_weights)
        self._write_csv(row)
        self._write_tensorboard(results)
        if self.verbose:
            shown = " ".join(f"{k}={100 * v:.2f}" for k, v in results.items())
            print(f"\nevaluation at step {self.step} (epoch {self._epoch + 1}, {row['eval_seconds']:.1f} s): {shown}"
                  + (" [best]" if improved else ""))
        return row

    def describe_protocol(self) -> Optional[str]:
        """How NMI/F1 were computed (`metrics.clustering_protocol`), once an evaluation ran with clustering."""
        return self.protocol.describe(self._num_classes) if self._num_classes else None

    def _save_weights(self, path: str) -> None:
        _makedirs_for(path)
        with atomic.atomic_path(path) as temp:
            self.model.save_weights(str(temp))

    def _prefixed(self, row: Dict[str, float]) -> Dict[str, float]:
        return {self.prefix + k: v for k, v in self.metrics_of(row).items()}

    def _write_csv(self, row: Dict[str, float]):
        if not self.files.csv:
            return
        header = list(row)
        _makedirs_for(self.files.csv)
        exists = os.path.exists(self.files.csv) and os.path.getsize(self.files.csv) > 0
        if exists:
            with open(self.files.csv, newline="") as f:
                old = next(csv.reader(f), [])
            if old != header:
                raise ValueError(f"{self.files.csv} has columns {','.join(old)}; this run writes "
                                 f"{','.join(header)}: use a new csv_path")
        with open(self.files.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            if not exists:
                writer.writeheader()
            writer.writerow(row)

    def _write_tensorboard(self, results: Dict[str, float]):
        if self._writer is None:
            if not self.files.tensorboard:
                return
            self._writer = tf.summary.create_file_writer(self.files.tensorboard)
        with self._writer.as_default():
            for key, value in results.items():
                # tf.summary.scalar needs the tensorboard package; the raw op with the scalars plugin tag does not.
                tf.summary.write(self.prefix + key, tf.constant(value, tf.float32), step=self.step,
                                 metadata=_SCALAR_METADATA)
        self._writer.flush()


def _scalar_metadata() -> bytes:
    from tensorflow.core.framework import summary_pb2

    plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
    return summary_pb2.SummaryMetadata(plugin_data=plugin).SerializeToString()


_SCALAR_METADATA = _scalar_metadata()


def _makedirs_for(path: str):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
