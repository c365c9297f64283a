"""Per-step diagnostics of a training run: every logged quantity of every step, to a CSV and to TensorBoard.

Keras' logs (and `history_<variant>.csv`) hold means over an epoch; what makes an HDML run go wrong often happens
within a 64-step window of the running means J_avg / J_gen, so `StepLog` records each step's own values
(`HDMLModel.last_step_logs`): J_m before and after its weight e^(−β/J_gen), J_syn, the synthetic weight, the pull
factor, the generator's losses, and the norms of the gradients that the real and the synthetic part of J_metric
send into the backbone (`HDMLModel`'s "grad_real_norm", "grad_syn_norm").

    steps_<variant>.csv       step, then every logged key of the model (`hdml_tf.rundir.RunDir.steps`)
    logs/<variant>/           TensorBoard scalars "step/<key>" (`RunDir.logs`)
"""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Dict, List, Optional

import keras
import tensorflow as tf

from hdml_tf import atomic

#: Keys drawn in the per-step curves (`plot_steps`), those present in the CSV; the rest stay in the CSV only.
STEP_CURVE_KEYS = ("j_m_unweighted", "j_m", "j_syn", "loss", "syn_weight", "pull_factor", "pulled_fraction",
                   "j_recon", "j_soft", "grad_real_norm", "grad_syn_norm", "j_avg")


def scalar_metadata() -> bytes:
    """Summary metadata that files a raw `tf.summary.write` under TensorBoard's scalars plugin (the `tensorboard`
    package, which `tf.summary.scalar` needs, is not a dependency)."""
    from tensorflow.core.framework import summary_pb2
    plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
    return summary_pb2.SummaryMetadata(plugin_data=plugin).SerializeToString()


def write_scalars(writer, rows: List[Dict[str, float]], prefix: str = "") -> None:
    """Writes rows {"step": s, key: value, ...} as TensorBoard scalars `<prefix><key>` at step s; NaN is skipped."""
    metadata = scalar_metadata()
    with writer.as_default():
        for row in rows:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and value is not None and math.isfinite(value):
                    tf.summary.write(prefix + key, tf.constant(value, tf.float32), step=step, metadata=metadata)
    writer.flush()


def read_steps(path) -> Dict[str, List[float]]:
    """A steps CSV as {column: [float per row]} (empty when the file is absent)."""
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {key: [float(r[key]) if r[key] not in ("", None) else math.nan for r in rows] for key in rows[0]}


class StepLog(keras.callbacks.Callback):
    """Records each training step's own logged values (an `HDMLModel`'s `last_step_logs`).

    The CSV is rewritten atomically at the end of every epoch and of training, so an interrupted run keeps the rows
    up to its last epoch; a resumed run (`initial_step` > 0) keeps the file's rows up to that step and continues it.

    Args:
      csv_path: the CSV to write: "step" (global, 1-based: the step that produced the row), then the model's keys.
      log_dir: TensorBoard directory for the scalars "step/<key>", or None.
      initial_step: the global step this `fit` starts from.
    """

    def __init__(self, csv_path, log_dir: Optional[str] = None, initial_step: int = 0):
        super().__init__()
        self.csv_path = str(csv_path)
        self.log_dir = log_dir
        self.rows: List[Dict[str, float]] = []
        self._unwritten: List[Dict[str, float]] = []
        self._writer = None
        self.resume_at(initial_step)

    def resume_at(self, initial_step: int) -> None:
        """Continues at global step `initial_step`: the CSV's rows up to it are kept, later ones dropped."""
        self.step = int(initial_step)
        self.rows, self._unwritten = [], []
        if self.step > 0:
            kept = read_steps(self.csv_path)
            steps = kept.get("step", [])
            self.rows = [{k: kept[k][i] for k in kept} for i in range(len(steps)) if steps[i] <= self.step]

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        row = {"step": self.step, **self.model.last_step_logs()}
        self.rows.append(row)
        self._unwritten.append(row)

    def on_epoch_end(self, epoch, logs=None):
        self.flush()

    def on_train_end(self, logs=None):
        self.flush()

    def flush(self) -> None:
        """Writes the CSV (atomic) and the TensorBoard scalars of the steps recorded since the last flush."""
        if not self.rows:
            return
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys, restval="")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (int(v) if k == "step" else repr(float(v))) for k, v in row.items()})
        os.makedirs(os.path.dirname(os.path.abspath(self.csv_path)), exist_ok=True)
        atomic.write_text(self.csv_path, buffer.getvalue())
        if self.log_dir and self._unwritten:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)
            write_scalars(self._writer, self._unwritten, prefix="step/")
        self._unwritten = []


def plot_steps(csv_path, png_path, title: Optional[str] = None) -> Optional[str]:
    """The per-step curves (`STEP_CURVE_KEYS` found in the CSV) as a PNG; None when there is nothing to draw."""
    from hdml_tf.evaluation.plots import plot_training_curves
    data = read_steps(csv_path)
    keys = [k for k in STEP_CURVE_KEYS if k in data]
    if not keys:
        return None
    return plot_training_curves(str(csv_path), str(png_path), keys=keys, title=title)
