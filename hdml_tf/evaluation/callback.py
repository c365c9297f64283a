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
import json
import os
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from hdml_tf.data.image_set import ImageSet
from hdml_tf.evaluation import metrics
from hdml_tf.evaluation.embedding import embed_dataset, image_set_dataset

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


class EvaluationCallback(keras.callbacks.Callback):
    """Evaluates retrieval and clustering on a held-out dataset every k epochs or steps.

    Each evaluation embeds `data` with the model (the model returns L2-normalized embeddings when called),
    computes `metrics.evaluate`, and
      * writes `val_nmi`, `val_f1`, `val_recall@K`, `val_map@r`, `val_r_precision` into the Keras `logs`: at the
        batch that triggered a step-based evaluation and, at every epoch end, the latest results (so epoch-level
        consumers - ModelCheckpoint, EarlyStopping, History, CSVLogger - see them too);
      * writes them to TensorBoard (`log_dir`, tags "val_recall@1", ..., x-axis = global training step);
      * appends a row to `csv_path` (epoch, step, eval_seconds, metrics);
      * saves the weights to `best_weights_path` when `monitor` improves (strictly; higher is better for every
        metric here), and to `last_weights_path` after every evaluation;
      * at the end of training (after a final evaluation when the last step was not evaluated) prints the best and
        the last results and writes them to `summary_path` as JSON.

    When to evaluate: `schedule="official"` (500, 1000, ..., 5000, then every 64 steps), or `every_n_steps=k`, or
    a callable `schedule(step) -> bool`; epoch-based with `every_n_epochs` (default: 1 when no step schedule is
    given, otherwise off). Steps count training batches from `initial_step` (for a resumed run).

    NMI and F1 follow the official protocol unless told otherwise: k-means with k = the number of classes of the
    evaluation split, best of `n_init` = 10 restarts, random_state `seed` = 1 (`metrics.nmi_f1`); the printed
    table says which protocol produced it (`protocol()`).

    Attributes:
      step: global training step (batches seen + initial_step).
      history: list of {"epoch", "step", "eval_seconds", metric: value} per evaluation.
      last, best: the latest and the best evaluation rows (None before the first).
    """

    def __init__(self, data: _Data, *, every_n_epochs: Optional[int] = None, every_n_steps: Optional[int] = None,
                 schedule: Union[None, str, Callable[[int], bool]] = None, monitor: str = "recall@1",
                 recall_ks: Sequence[int] = metrics.PAPER_RECALL_KS, clustering: bool = True, with_map: bool = True,
                 kmeans: str = "auto", n_clusters: Optional[int] = None, seed: int = metrics.OFFICIAL_KMEANS_SEED,
                 n_init: int = metrics.OFFICIAL_KMEANS_RESTARTS, chunk_size: Optional[int] = None,
                 prefix: str = "val_", best_weights_path: Optional[str] = None,
                 last_weights_path: Optional[str] = None, csv_path: Optional[str] = None,
                 log_dir: Optional[str] = None, summary_path: Optional[str] = None, initial_step: int = 0,
                 evaluate_on_train_end: bool = True, progress: bool = False, verbose: int = 1):
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
        for name, path in (("best_weights_path", best_weights_path), ("last_weights_path", last_weights_path)):
            if path is not None and not str(path).endswith(".weights.h5"):
                raise ValueError(f"{name}={path!r} must end with '.weights.h5' (Keras 3 save_weights)")
        self.recall_ks = tuple(recall_ks)
        expected = (["nmi", "f1"] if clustering else []) + [f"recall@{k}" for k in self.recall_ks] \
            + (["map@r", "r_precision"] if with_map else [])
        key = monitor[len(prefix):] if prefix and monitor.startswith(prefix) else monitor
        if key not in expected:
            raise ValueError(f"monitor={monitor!r} is not computed; choose one of {', '.join(expected)}")
        self.data = data
        self.every_n_epochs = every_n_epochs
        self.schedule = schedule
        self.monitor = key
        self.metric_options = dict(clustering=clustering, with_map=with_map, kmeans=kmeans, n_clusters=n_clusters,
                                   seed=seed, n_init=n_init, chunk_size=chunk_size)
        self._kmeans_k = n_clusters  # k of the last evaluation's k-means (the number of classes when None)
        self.prefix = prefix
        self.best_weights_path = best_weights_path
        self.last_weights_path = last_weights_path
        self.csv_path = csv_path
        self.log_dir = log_dir
        self.summary_path = summary_path
        self.step = int(initial_step)
        self.evaluate_on_train_end = evaluate_on_train_end
        self.progress = progress
        self.verbose = verbose
        self.history: List[Dict[str, float]] = []
        self.last: Optional[Dict[str, float]] = None
        self.best: Optional[Dict[str, float]] = None
        self._epoch = 0
        self._epoch_start_step = self.step
        self._writer = None

    @classmethod
    def for_image_set(cls, image_set: ImageSet, *, make_dataset: Optional[Callable[[ImageSet], tf.data.Dataset]] = None,
                      batch_size: int = 64, augment=None, **options) -> "EvaluationCallback":
        """A callback evaluating an ImageSet (e.g. the validation half of `split_validation_classes`).

        Args:
          image_set: the evaluation split.
          make_dataset: builds its (images, labels) tf.data dataset; None = `image_set_dataset(image_set,
            batch_size, augment)` (in-memory images as they are, or the data pipeline's evaluation geometry).
          batch_size, augment: see `image_set_dataset`.
          **options: EvaluationCallback arguments; `recall_ks` defaults to `datasets.recall_ks` of the set.
        """
        if make_dataset is not None:
            dataset = make_dataset(image_set)
        else:
            dataset = image_set_dataset(image_set, batch_size, augment)
        from hdml_tf.data import datasets
        options.setdefault("recall_ks", datasets.recall_ks(image_set.name, len(image_set)))
        return cls(dataset, **options)

    # ------------------------------------------------------------------------------------------------- hooks
    def on_train_begin(self, logs=None):
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

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
                   "clustering_protocol": self.protocol()}
        if self.summary_path:
            _makedirs_for(self.summary_path)
            with open(self.summary_path, "w") as f:
                json.dump(summary, f, indent=2)
        if self.verbose:
            print(f"evaluation: best by {self.monitor} at step {self.best['step']}, last at step {self.last['step']}")
            print(metrics.format_results({"best": self._metric_part(self.best), "last": self._metric_part(self.last)},
                                         protocol=self.protocol()))
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
        results = metrics.evaluate(embeddings, labels, self.recall_ks, **self.metric_options)
        self._kmeans_k = self.metric_options["n_clusters"] or len(np.unique(labels))
        row = {"epoch": self._epoch + 1, "step": self.step, "eval_seconds": round(time.time() - start, 3), **results}
        self.history.append(row)
        self.last = row
        improved = self.best is None or row[self.monitor] > self.best[self.monitor]
        if improved:
            self.best = row
            if self.best_weights_path:
                _makedirs_for(self.best_weights_path)
                self.model.save_weights(self.best_weights_path)
        if self.last_weights_path:
            _makedirs_for(self.last_weights_path)
            self.model.save_weights(self.last_weights_path)
        self._write_csv(row)
        self._write_tensorboard(results)
        if self.verbose:
            shown = " ".join(f"{k}={100 * v:.2f}" for k, v in results.items())
            print(f"\nevaluation at step {self.step} (epoch {self._epoch + 1}, {row['eval_seconds']:.1f} s): {shown}"
                  + (" [best]" if improved else ""))
        return row

    def protocol(self) -> Optional[str]:
        """How NMI/F1 were computed (`metrics.clustering_protocol`), once an evaluation ran with clustering."""
        o = self.metric_options
        if not o["clustering"] or not self._kmeans_k:
            return None
        return metrics.clustering_protocol(self._kmeans_k, n_init=o["n_init"], seed=o["seed"], kmeans=o["kmeans"])

    def _prefixed(self, row: Dict[str, float]) -> Dict[str, float]:
        return {self.prefix + k: v for k, v in self._metric_part(row).items()}

    @staticmethod
    def _metric_part(row: Dict[str, float]) -> Dict[str, float]:
        return {k: v for k, v in row.items() if k not in ("epoch", "step", "eval_seconds")}

    def _write_csv(self, row: Dict[str, float]):
        if not self.csv_path:
            return
        header = list(row)
        _makedirs_for(self.csv_path)
        exists = os.path.exists(self.csv_path) and os.path.getsize(self.csv_path) > 0
        if exists:
            with open(self.csv_path, newline="") as f:
                old = next(csv.reader(f), [])
            if old != header:
                raise ValueError(f"{self.csv_path} has columns {','.join(old)}; this run writes "
                                 f"{','.join(header)}: use a new csv_path")
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            if not exists:
                writer.writeheader()
            writer.writerow(row)

    def _write_tensorboard(self, results: Dict[str, float]):
        if self._writer is None:
            if not self.log_dir:
                return
            self._writer = tf.summary.create_file_writer(self.log_dir)
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
