"""The run directory: every file a training run leaves in its `--output_dir`, written and read in one place.

    runs/glyphs_npair_hdml/version_1/        (the default: a new directory per run; or --output_dir, --run_name)
      run.json                 who owns the directory: the run's identity (configuration), state (running,
                               interrupted, failed, complete), every start of it (`RunClaim`)
      results.json             what was run and what came out (`write_results`): configuration, data counts,
                               skipped images, library versions, commit, wall time, steps, metrics
      history_<variant>.csv    one row per epoch, numbered as in an uninterrupted run (`EpochLog` callback)
      steps_<variant>.csv      every step's own logged values (`hdml_tf.diagnostics.StepLog`); steps_<variant>.png
      curves_<variant>.png     the training curves (`plot_curves`)
      <variant>.keras          the whole training model: weights, generator, classifier, running means and the three
                               optimizers (`save_keras`; `load_keras` resumes training from it)
      <variant>.weights.h5     the last weights alone
      logs/<variant>/train     TensorBoard: every training loss and diagnostic per epoch (x: global step)
      <variant>.best.weights.h5, eval_<variant>.csv, eval_<variant>.json, logs/<variant>/   with evaluation during
                               training (`hdml_tf.evaluation.EvaluationCallback`)

`<variant>` is "hdml" or "baseline". Every file is written atomically (`hdml_tf.atomic`): a failed write (full disk,
killed process) leaves the previous file or none, never a truncated one, and is one `WriteError` line. Weights and
`.keras` files are serialized in memory first and written with plain file I/O, so a full disk never reaches h5py.

**A run owns its directory** (`claim_run`): the directory is created and test-written before any work; a directory
holding another run is refused unless `overwrite`; the same run (same identity) continues where it stopped, and a
complete one is left untouched. A lock (`DirectoryLock`) keeps a second process out of a directory in use.

The tools read runs back through this module only: `find_checkpoint` resolves a run directory, a `.keras` or a
`.weights.h5` to the weights plus the run's configuration, `load_checkpoint` rebuilds the model from them, and
`load_embedder` gives any of those (or an exported SavedModel) as a callable images → embeddings for the embed /
search / evaluate tools.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from hdml_tf import atomic
from hdml_tf.errors import HDMLError

if TYPE_CHECKING:  # pragma: no cover
    from hdml_tf.serving import EmbeddingInfo

# TensorFlow, Keras and hdml_tf.serving are imported inside the functions that load or save models, so that tools can
# resolve and check paths (`find_checkpoint`, `RunDir`) and fail with one line before the slow TensorFlow import.

RESULTS = "results.json"
#: The ownership record of a run directory (and, as OWNER, of a checkpoint directory).
MARKER = "run.json"
OWNER = "owner.json"
LOCK = ".lock"
MARKER_FORMAT = "hdml_tf-run/1"
#: Where runs go when neither --output_dir nor --run_name names a directory.
DEFAULT_ROOT = "runs"
VARIANTS = ("hdml", "baseline")
#: The hdml_tf entry `save_keras` adds to a `.keras` zip (geometry and the three optimizers' configurations).
KERAS_METADATA_ENTRY = "hdml_tf.json"
_OPTIMIZER_NAMES = ("metric_optimizer", "generator_optimizer", "classifier_optimizer")


class RunDir:
    """The files of one run directory (see the module docstring); nothing is created until something is written."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self):
        return f"RunDir({str(self.path)!r})"

    # ---------------------------------------------------------------------------------------- names
    @property
    def results(self) -> Path:
        return self.path / RESULTS

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def keras(self, variant: str) -> Path:
        return self.path / f"{variant}.keras"

    def weights(self, variant: str) -> Path:
        return self.path / f"{variant}.weights.h5"

    def best_weights(self, variant: str) -> Path:
        return self.path / f"{variant}.best.weights.h5"

    def history(self, variant: str) -> Path:
        return self.path / f"history_{variant}.csv"

    def curves(self, variant: str) -> Path:
        return self.path / f"curves_{variant}.png"

    def eval_csv(self, variant: str) -> Path:
        return self.path / f"eval_{variant}.csv"

    def eval_json(self, variant: str) -> Path:
        return self.path / f"eval_{variant}.json"

    def logs(self, variant: str) -> Path:
        """TensorBoard directory of a variant: evaluation scalars (val_*) here, training scalars in `train/`."""
        return self.path / "logs" / variant

    def steps(self, variant: str) -> Path:
        """Every step's own logged values (`hdml_tf.diagnostics.StepLog`)."""
        return self.path / f"steps_{variant}.csv"

    def step_curves(self, variant: str) -> Path:
        return self.path / f"steps_{variant}.png"

    def train_logs(self, variant: str) -> Path:
        return self.logs(variant) / "train"

    def owned_files(self) -> List[Path]:
        """Every file or directory of this run that exists (what `overwrite` removes; nothing else is touched)."""
        names = [self.results, self.marker]
        for v in VARIANTS:
            names += [self.keras(v), self.weights(v), self.best_weights(v), self.history(v), self.curves(v),
                      self.eval_csv(v), self.eval_json(v), self.logs(v), self.steps(v),
                      self.step_curves(v)]
        found = [p for p in names if p.exists()]
        if self.path.is_dir():  # temporaries of writes a killed process left
            found += [p for p in self.path.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
        return found

    def training_files(self, variant: str) -> List[Path]:
        """The files a variant's training writes as it goes (removed when an interrupted run starts from step 0)."""
        return [p for p in (self.history(variant), self.curves(variant), self.eval_csv(variant),
                            self.eval_json(variant), self.best_weights(variant), self.logs(variant),
                            self.steps(variant), self.step_curves(variant)) if p.exists()]

    # ---------------------------------------------------------------------------------------- writing
    def write_results(self, results: Dict) -> Path:
        """results.json (atomic; one WriteError line when it cannot be written)."""
        with atomic.guarded("the results", self.results):
            self.path.mkdir(parents=True, exist_ok=True)
            return atomic.write_json(self.results, results)

    def read_history(self, variant: str) -> List[Dict[str, float]]:
        """Rows of history_<variant>.csv ([] when absent): {"epoch", "step", key: value}; empty cells are NaN."""
        return read_csv_rows(self.history(variant))

    def write_history(self, variant: str, history) -> Path:
        """history_<variant>.csv from rows [{"epoch", "step", key: value}] or a Keras History dict {key: [values]}
        (epochs numbered 1..; atomic). Columns: epoch, step (when known), then every other key, sorted."""
        rows = history if isinstance(history, list) else _history_rows(history)
        with atomic.guarded("the training history", self.history(variant)):
            self.path.mkdir(parents=True, exist_ok=True)
            return atomic.write_text(self.history(variant), rows_to_csv(rows))

    def plot_curves(self, variant: str) -> Optional[Path]:
        """curves_<variant>.png from history_<variant>.csv (atomic; None when matplotlib is missing or the history
        has no row yet)."""
        try:
            from hdml_tf.evaluation.plots import plot_training_curves
        except ImportError:  # pragma: no cover - plots are optional for a run
            return None
        if not self.read_history(variant):
            return None
        target = self.curves(variant)
        with atomic.guarded("the training curves", target), atomic.atomic_path(target) as temp:
            plot_training_curves(str(self.history(variant)), str(temp))
        return target

    def plot_steps(self, variant: str) -> Optional[Path]:
        """steps_<variant>.png from steps_<variant>.csv (None when matplotlib is missing or nothing was logged)."""
        try:
            from hdml_tf.diagnostics import plot_steps
        except ImportError:  # pragma: no cover - plots are optional for a run
            return None
        if not self.steps(variant).exists():
            return None
        drawn = plot_steps(self.steps(variant), self.step_curves(variant), title=f"{variant}: every step")
        return Path(drawn) if drawn else None

    def save_model(self, model, variant: str, *, image_size: int, resize: int, backbone: str) -> None:
        """<variant>.weights.h5 and <variant>.keras (with the run's geometry), each atomic."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_weights(model, self.weights(variant), what="the weights")
        save_keras(model, self.keras(variant), image_size=image_size, resize=resize, backbone=backbone)

    # ---------------------------------------------------------------------------------------- reading
    def read_results(self) -> Dict:
        """results.json as a dict ({} when absent); HDMLError when unreadable."""
        if not self.results.is_file():
            return {}
        try:
            return json.loads(self.results.read_text())
        except (OSError, ValueError) as e:
            raise HDMLError(f"{self.results} is not readable JSON ({e})") from None

    def read_marker(self) -> Optional[Dict]:
        """run.json as a dict (None when absent or unreadable: then the directory's owner is unknown)."""
        return _read_json(self.marker)

    def variants(self) -> Tuple[str, ...]:
        """Variants with saved weights, "hdml" first."""
        return tuple(v for v in VARIANTS if self.keras(v).is_file() or self.weights(v).is_file())


# -------------------------------------------------------------------------------------------- CSV rows
def csv_columns(path) -> List[str]:
    """The header of a CSV file ([] when absent or empty)."""
    try:
        with open(path, newline="") as f:
            return next(csv.reader(f), [])
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def read_csv_rows(path) -> List[Dict[str, float]]:
    """Rows of a numeric CSV with a header ([] when the file is absent); empty cells are NaN."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows.append({k: _number(v) for k, v in row.items() if k})
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise HDMLError(f"{path} is not a readable CSV file ({e})") from None
    return rows


def _number(text):
    if text is None or text == "":
        return float("nan")
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def rows_to_csv(rows: Sequence[Dict], columns: Optional[Sequence[str]] = None) -> str:
    """CSV text of rows with possibly different keys: `columns` in their order (then any other key), else "epoch",
    "step" first and the others sorted; missing cells empty (an epoch before the first evaluation has no val_*)."""
    columns = list(columns or [])
    keys = sorted({k for row in rows for k in row} - {"epoch", "step"} - set(columns))
    head = columns + [k for k in ("epoch", "step") if k not in columns and any(k in row for row in rows)] + keys
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(head)
    for row in rows:
        writer.writerow(["" if (k not in row or _is_nan(row[k])) else _cell(row[k]) for k in head])
    return buffer.getvalue()


def _cell(value):
    if isinstance(value, (int, str)):
        return value
    return repr(float(value))  # round-trips exactly


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _history_rows(history: Dict[str, List[float]]) -> List[Dict[str, float]]:
    """Keras History.history {key: [per-epoch values]} → rows; keys that start later (val_*) are aligned to the
    last epochs."""
    length = max((len(v) for v in history.values()), default=0)
    rows = [{"epoch": i + 1} for i in range(length)]
    for key, values in history.items():
        for i, value in enumerate(values):
            rows[length - len(values) + i][key] = float(value)
    return rows


def _read_json(path: Path) -> Optional[Dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# -------------------------------------------------------------------------------------------- run ownership
#: RunConfig fields that say how a run is carried out, not what it computes: the same run continued with other
#: values is still the same run (data moved, checkpoints elsewhere, more GPUs, another verbosity).
HOW_FIELDS = frozenset({"data_dir", "cache", "output_dir", "run_name", "overwrite", "verbose", "checkpoint_dir",
                        "checkpoint_every", "keep_checkpoints", "max_bad_steps", "eval_batch_size", "strategy",
                        "jit_compile", "deterministic"})


def run_identity(run: Dict, method: Dict, optim: Dict, variants: Sequence[str]) -> Dict:
    """What makes two runs the same run: the configuration minus HOW_FIELDS, and the trained variants."""
    return {"run": {k: v for k, v in sorted(run.items()) if k not in HOW_FIELDS}, "method": dict(sorted(method.items())),
            "optim": dict(sorted(optim.items())), "variants": list(variants)}


def fingerprint(identity: Dict) -> str:
    """A short hash of a run identity (JSON, keys sorted; tuples and lists alike)."""
    text = json.dumps(identity, sort_keys=True, default=atomic._json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def identity_differences(ours: Dict, theirs: Dict, limit: int = 4) -> str:
    """"steps 1200 (the other run: 600), loss triplet (npair)" — what differs between two identities."""
    ours, theirs = _normalized(ours), _normalized(theirs)
    found = []
    for section in sorted(set(ours) | set(theirs)):
        a, b = ours.get(section), theirs.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key, "<unset>") != b.get(key, "<unset>"):
                    found.append(f"{key} {a.get(key, '<unset>')} (there: {b.get(key, '<unset>')})")
        elif a != b:
            found.append(f"{section} {a} (there: {b})")
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return ", ".join(found[:limit]) + more


def _normalized(identity: Dict) -> Dict:
    return json.loads(json.dumps(identity, sort_keys=True, default=atomic._json_default))


def default_output_dir(dataset: str, loss: str, variants: Sequence[str], run_name: Optional[str] = None,
                       root: str = DEFAULT_ROOT) -> Path:
    """`runs/<run_name>`, or a directory no run uses yet: runs/<dataset>_<loss>_<method>/version_<N> (N = 1 +
    the highest existing version), so a run never lands in another run's directory by default."""
    if run_name:
        return Path(root) / run_name
    method = "+".join(variants)
    parent = Path(root) / f"{dataset}_{loss}_{method}"
    versions = [int(m.group(1)) for p in (parent.iterdir() if parent.is_dir() else [])
                if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return parent / f"version_{max(versions, default=0) + 1}"


def recorded_output_dir(checkpoint_dir: Optional[str], identity: Dict) -> Optional[Path]:
    """The output directory a checkpoint directory records for this same run (None: none, or another run's)."""
    if not checkpoint_dir:
        return None
    owner = _read_json(Path(checkpoint_dir) / OWNER)
    if owner and owner.get("fingerprint") == fingerprint(identity) and owner.get("output_dir"):
        return Path(owner["output_dir"])
    return None


class DirectoryLock:
    """An exclusive advisory lock (`fcntl.flock`) on `<directory>/.lock`, held while a run uses the directory.

    The operating system releases it when the process ends, however it ends (kill -9 included), so a stale lock
    never blocks a resume. A second process is refused at once with one line naming the holder (pid, host, start).
    Where `fcntl` does not exist (Windows) the lock is a no-op.
    """

    def __init__(self, directory, what: str):
        self.path = Path(directory) / LOCK
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> "DirectoryLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise atomic.WriteError(f"cannot use {self.what}: {describe(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
                holder = (f" (pid {info.get('pid')} on {info.get('host')}, started {info.get('started')})"
                          if info else "")
            os.close(fd)
            raise HDMLError(f"another process{holder} is using {self.what}; wait for it to finish, or use another "
                            "directory") from None
        self._fd = fd
        return self

    def record_holder(self) -> None:
        """Writes this process's pid, host and start time into the lock file (for the refusal message)."""
        if self._fd is None:
            return
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, info, 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def free_bytes(path) -> Optional[int]:
    """Free bytes on the file system of `path` for this user (None when the platform cannot tell)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def describe(e: OSError) -> str:
    return atomic.describe_os_error(e)


class RunClaim:
    """One process's claim on a run directory (and its checkpoint directory) for the duration of a run.

    Attributes:
      out: the RunDir.
      state: "new" (a fresh run), "resume" (the same run continues: checkpoints may hold its progress), "restart"
        (the same run, interrupted without checkpoints: it starts again from step 0) or "complete" (nothing to do).
      marker: the run.json content as it is now.
      previous: the run.json found before this claim (None for a new directory).
    """

    def __init__(self, out: RunDir, identity: Dict, state: str, marker: Dict, locks: List[DirectoryLock],
                 previous: Optional[Dict] = None, checkpoint_dir: Optional[str] = None):
        self.out, self.identity, self.state, self.marker = out, identity, state, marker
        self.previous, self.checkpoint_dir, self._locks = previous, checkpoint_dir, locks

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if self.state != "complete" and self.marker.get("state") == "running":
            from hdml_tf.callbacks import TrainingInterrupted  # lazy: callbacks imports Keras
            interrupted = kind is not None and (issubclass(kind, (KeyboardInterrupt, TrainingInterrupted)))
            with contextlib.suppress(HDMLError, OSError):
                self.update(state="interrupted" if interrupted else "failed",
                            ended=time.strftime("%Y-%m-%d %H:%M:%S"),
                            error=(" ".join(str(value).split())[:300] if value is not None else None))
        self.release()
        return False

    @property
    def variant_results(self) -> Dict[str, Dict]:
        """Results of what already finished in an earlier start ({"raw_pixels": ..., "hdml": ...})."""
        return dict(self.marker.get("finished", {}))

    def update(self, **fields) -> None:
        """Rewrites run.json with `fields` changed (atomic)."""
        self.marker = {**self.marker, **fields}
        with atomic.guarded("the run record", self.out.marker):
            atomic.write_json(self.out.marker, self.marker)

    def finished(self, name: str, value) -> None:
        """Records a finished piece (an evaluation, a trained variant's test metrics) so a later start skips it."""
        self.update(finished={**self.marker.get("finished", {}), name: value})

    def complete(self) -> None:
        self.update(state="complete", ended=time.strftime("%Y-%m-%d %H:%M:%S"), error=None)

    def release(self) -> None:
        for lock in reversed(self._locks):
            lock.release()
        self._locks = []


def claim_run(output_dir, identity: Dict, *, checkpoint_dir: Optional[str] = None, overwrite: bool = False,
              command: Optional[Sequence[str]] = None, flag: str = "--output_dir") -> RunClaim:
    """Checks and claims a run directory before any work (README: "Runs, resuming, and what is never lost").

    1. `output_dir` (and `checkpoint_dir`) are created and test-written: a problem is one WriteError line.
    2. Both are locked: a second process is refused (HDMLError).
    3. Whose directory is it? run.json with the same identity: the same run, continued ("resume") or, when it is
       complete, left untouched ("complete"); another identity, or a run's files without run.json: refused with one
       line naming `--overwrite`, unless `overwrite` (then only the run's own files are removed). A checkpoint
       directory of another run is refused the same way.

    Returns:
      RunClaim (release it, or use it as a context manager: it marks the run interrupted or failed on the way out).
    Raises:
      WriteError, HDMLError: as above, always before anything was changed.
    """
    out = RunDir(output_dir)
    marker = out.read_marker()
    if (not overwrite and marker and marker.get("state") == "complete"
            and marker.get("fingerprint") == fingerprint(identity) and out.results.exists()):
        return RunClaim(out, identity, "complete", marker, [], marker, checkpoint_dir)  # read only: nothing changes
    atomic.check_writable_dir(out.path, flag)
    if checkpoint_dir:
        atomic.check_writable_dir(checkpoint_dir, "--checkpoint_dir")
    locks = [DirectoryLock(out.path, f"{flag}={out.path}").acquire()]
    try:
        if checkpoint_dir and Path(checkpoint_dir).resolve() != out.path.resolve():
            locks.append(DirectoryLock(checkpoint_dir, f"--checkpoint_dir={checkpoint_dir}").acquire())
        state, previous = _decide(out, identity, checkpoint_dir, overwrite, flag)
        if state == "complete":
            return RunClaim(out, identity, state, previous, locks, previous, checkpoint_dir)
        for lock in locks:
            lock.record_holder()
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        starts = list((previous or {}).get("starts", [])) if state in ("resume", "restart") else []
        starts.append({"started": now, "pid": os.getpid(), "host": socket.gethostname(),
                       "command": list(command if command is not None else sys.argv)})
        marker = {"format": MARKER_FORMAT, "state": "running", "fingerprint": fingerprint(identity),
                  "identity": identity, "output_dir": str(out.path.resolve()), "checkpoint_dir":
                  str(Path(checkpoint_dir).resolve()) if checkpoint_dir else None,
                  "created": (previous or {}).get("created", now) if state != "new" else now, "starts": starts,
                  "finished": (previous or {}).get("finished", {}) if state in ("resume", "restart") else {}}
        claim = RunClaim(out, identity, state, marker, locks, previous, checkpoint_dir)
        claim.update()
        if checkpoint_dir:
            owner = Path(checkpoint_dir) / OWNER
            with atomic.guarded("the checkpoint directory's owner record", owner):
                atomic.write_json(owner, {"format": MARKER_FORMAT, "fingerprint": fingerprint(identity),
                                          "output_dir": str(out.path.resolve()), "identity": identity})
        return claim
    except BaseException:
        for lock in reversed(locks):
            lock.release()
        raise


def _decide(out: RunDir, identity: Dict, checkpoint_dir: Optional[str], overwrite: bool,
            flag: str) -> Tuple[str, Optional[Dict]]:
    """("new" | "resume" | "restart" | "complete", the previous run.json) for a claim; removes another run's files
    when `overwrite`, refuses otherwise."""
    ours = fingerprint(identity)
    marker = out.read_marker()
    owner = _read_json(Path(checkpoint_dir) / OWNER) if checkpoint_dir else None
    checkpoints = _checkpoint_files(checkpoint_dir)
    hint = f"pass --overwrite to replace it, or choose another {flag}"
    if owner and owner.get("fingerprint") != ours and checkpoints:
        if not overwrite:
            raise HDMLError(f"--checkpoint_dir={checkpoint_dir} holds the checkpoints of another run (differs in "
                            f"{identity_differences(identity, owner.get('identity', {}))}); pass --overwrite to "
                            "replace them, or choose another --checkpoint_dir")
        _remove(checkpoints + [Path(checkpoint_dir) / OWNER])
        checkpoints = []
    if marker is None:
        leftovers = [p for p in out.owned_files() if p.name != LOCK]
        if leftovers:
            if not overwrite:
                raise HDMLError(f"{flag}={out.path} already holds files of another run ("
                                f"{', '.join(sorted(p.name for p in leftovers)[:4])}); {hint}")
            _remove(leftovers)
        return ("resume" if checkpoints else "new"), None
    if marker.get("fingerprint") != ours:
        if not overwrite:
            raise HDMLError(f"{flag}={out.path} holds another run (differs in "
                            f"{identity_differences(identity, marker.get('identity', {}))}); {hint}")
        _remove([p for p in out.owned_files() if p.name != LOCK])
        return ("resume" if checkpoints else "new"), None
    if overwrite:  # the same run, asked to start over
        _remove([p for p in out.owned_files() if p.name != LOCK] + checkpoints)
        return "new", None
    if marker.get("state") == "complete" and out.results.exists():
        return "complete", marker
    # (complete without results.json, removed by hand: continued below, which rebuilds it from the pieces the run
    # recorded as finished in run.json, without training them again)
    if checkpoints:
        return "resume", marker
    finished = marker.get("finished", {})
    for variant in VARIANTS:  # an interrupted start without checkpoints: its partial files would mislead
        if variant not in finished:
            _remove(out.training_files(variant))
    return "restart", marker


def _checkpoint_files(checkpoint_dir: Optional[str]) -> List[Path]:
    if not checkpoint_dir or not Path(checkpoint_dir).is_dir():
        return []
    found = []
    for variant in VARIANTS:
        folder = Path(checkpoint_dir) / variant
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.name.startswith(("ckpt-", "checkpoint.json"))]
    return found


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise atomic.WriteError(f"cannot remove {p}: {describe(e)}") from None


# -------------------------------------------------------------------------------------------- weights in memory
def weights_bytes(model) -> bytes:
    """The `.weights.h5` file of `model.save_weights`, built in memory (h5py never writes to the disk)."""
    from keras.src.saving import saving_lib  # noqa: the in-memory path of Keras' own save_weights
    _ensure_built(model)
    buffer = io.BytesIO()
    store = saving_lib.H5IOStore(buffer, mode="w")
    saving_lib._save_state(model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set())
    store.close()
    return buffer.getvalue()


def _ensure_built(model) -> None:
    """Keras saves only built models; an HDMLModel trained (or restored) without ever being called is complete but
    not marked built: one inference call on a zero image marks it."""
    if model.built:
        return
    backbone = getattr(model, "backbone", None)
    shape = tuple(backbone.input_shape[1:]) if backbone is not None else ()
    if len(shape) != 3 or None in shape:
        raise HDMLError("cannot save the weights of a model that is not built yet")
    import numpy as np
    model(np.zeros((1,) + shape, np.float32), training=False)


def write_weights(model, path, what: str = "the weights") -> Path:
    """`model.save_weights(path)`, atomic, and a full disk is one WriteError line (the file is made in memory,
    then written with plain file I/O: h5py never meets the full disk, which crashed the interpreter)."""
    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        raise HDMLError(f"{path}: a weights file must end with .weights.h5")
    data = weights_bytes(model)
    with atomic.guarded(what, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, data)
    return path


# -------------------------------------------------------------------------------------------- checkpoints
@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where the weights are (`kind` "keras" or "weights") and the run's results.json "run" / "method" ({}: none)."""

    path: str
    kind: str
    run: dict
    method: dict


def find_checkpoint(path: str, variant: str = "auto") -> Checkpoint:
    """Resolves a run directory, a `.keras` or a `.weights.h5` file to its weights plus the run's configuration
    (results.json of the directory the weights are in).

    Args:
      path: what the user named.
      variant: "hdml" or "baseline" in a run directory ("auto": hdml when present).
    Raises:
      HDMLError: nothing usable at `path` (one line saying what was expected).
    """
    if not path:
        raise HDMLError("a training run directory, a .keras or a .weights.h5 file is required")
    if not os.path.exists(path):
        raise HDMLError(f"checkpoint {path} not found; expected a training run directory, a .keras or a "
                        ".weights.h5 file")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "saved_model.pb")):
            raise HDMLError(f"{path} is already a SavedModel; use it directly (tools/embed.py --model={path})")
        run_dir = RunDir(path)
        for name in ([variant] if variant != "auto" else list(VARIANTS)):
            for candidate in (run_dir.keras(name), run_dir.weights(name)):
                if candidate.is_file():
                    return _with_run(str(candidate))
        found = sorted(glob.glob(os.path.join(path, "*.keras")) + glob.glob(os.path.join(path, "*.weights.h5")))
        if len(found) == 1 and variant == "auto":
            return _with_run(found[0])
        if not found:
            raise HDMLError(f"no .keras or .weights.h5 file in {path}; expected a training run directory")
        raise HDMLError(f"{path} holds {', '.join(os.path.basename(f) for f in found)}; pass one of them"
                        + (f" (no {variant}.* there)" if variant != "auto" else ""))
    if path.endswith(".keras") or path.endswith(".weights.h5"):
        return _with_run(path)
    raise HDMLError(f"checkpoint {path} is neither a .keras nor a .weights.h5 file nor a run directory")


def _with_run(path: str) -> Checkpoint:
    data = RunDir(os.path.dirname(os.path.abspath(path))).read_results()
    return Checkpoint(path=path, kind="keras" if path.endswith(".keras") else "weights",
                      run=data.get("run", {}), method=data.get("method", {}))


def run_geometry(run: dict) -> Tuple[str, int, int]:
    """(backbone, crop, resize) of a training run's results.json "run" section, by the one geometry rule."""
    from hdml_tf.data import datasets
    backbone = run.get("backbone", "inception_v1_slim")
    augment = datasets.geometry(run.get("dataset", "glyphs"), backbone, int(run.get("image_size", 0) or 0),
                                int(run.get("resize", 0) or 0))
    return backbone, augment.crop, augment.resize


def _weights_layout(path: str):
    """(num_classes or None, has_generator, embedding_size or None) read from an HDMLModel weights file.

    Keras stores the classifier under "classifier_net/..." and the metric head (BatchNorm + Dense) as the one
    Sequential under "layers/..."; its Dense kernel is [D, E].
    """
    import h5py

    def kernels(group):
        found = []
        group.visititems(lambda name, obj: found.append((name, obj.shape)) if getattr(obj, "ndim", 0) == 2 else None)
        return found

    try:
        with h5py.File(path, "r") as f:
            has_generator = "generator_net" in f
            classes = kernels(f["classifier_net"]) if "classifier_net" in f else []
            heads = kernels(f["layers"]) if "layers" in f else []
    except OSError as e:
        raise HDMLError(f"cannot read weights file {path} ({e})")
    return (classes[0][1][-1] if len(classes) == 1 else None), has_generator, (
        heads[0][1][-1] if len(heads) == 1 else None)


def load_checkpoint(ckpt: Checkpoint, backbone: Optional[str] = None, embedding_size: int = 0, image_size: int = 0,
                    resize: int = 0):
    """(HDMLModel with the checkpoint's weights, EmbeddingInfo) — the geometry is the file's, else the run's, else
    the one rule's; explicit arguments win.

    Raises:
      HDMLError: a `.weights.h5` without its run and without --backbone, or weights that do not fit.
    """
    import tensorflow as tf

    from hdml_tf.serving import _backbone_name, embedding_info
    run_backbone, run_crop, run_resize = run_geometry(ckpt.run) if ckpt.run else (None, 0, 0)
    if ckpt.kind == "keras":
        info, _ = read_keras_info(ckpt.path)
        model = load_keras(ckpt.path, compile=False)
        if backbone or (run_backbone and not info):
            model.backbone.backbone_name = backbone or run_backbone
        if info is None:  # a plain model.save: the geometry of the run, if known
            info_size, info_resize = run_crop, run_resize
        else:
            info_size, info_resize = info.image_size, info.resize
        size = image_size or info_size
        return model, embedding_info(model.embedder(), size or None,
                                     resize or (info_resize if size == info_size else 0) or None,
                                     _backbone_name(model))

    from hdml_tf.backbones import build_backbone, default_image_size
    from hdml_tf.config import HDMLConfig
    from hdml_tf.model import HDMLModel

    backbone = backbone or run_backbone
    if not backbone:
        raise HDMLError(f"{ckpt.path} has no results.json beside it; pass --backbone (and --embedding_size, "
                        "--image_size, --resize as in training)")
    image_size = image_size or run_crop or default_image_size(backbone)
    resize = resize or (run_resize if image_size == run_crop else 0)
    num_classes, has_generator, stored_size = _weights_layout(ckpt.path)
    known = {f.name for f in dataclasses.fields(HDMLConfig)}
    method = {k: v for k, v in ckpt.method.items() if k in known}
    if embedding_size or stored_size:
        method["embedding_size"] = embedding_size or stored_size
    method["hdml"] = has_generator
    config = HDMLConfig(**method)
    model = HDMLModel(build_backbone(backbone, image_size), num_classes or 2, config)
    model(tf.zeros([1, image_size, image_size, 3]), training=False)  # Keras loads weights into built models only
    try:
        model.load_weights(ckpt.path)
    except (ValueError, KeyError) as e:
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise HDMLError(f"{ckpt.path} does not fit a {backbone} HDMLModel with embedding size "
                        f"{config.embedding_size} (check --backbone and --embedding_size): {detail}")
    return model, embedding_info(model.embedder(), image_size, resize or None, backbone)


def load_embedder(path: str, variant: str = "auto"):
    """Any trained network as a callable uint8/float images [B, H, W, C] → L2-normalized embeddings [B, E], with the
    serving preprocessing: a SavedModel directory (tools/export.py), a run directory, a `.keras` or a `.weights.h5`
    (with its run beside it). The result has `.info` (EmbeddingInfo) and `.source`.

    Raises:
      HDMLError: nothing usable at `path`.
    """
    from hdml_tf.serving import ModelEmbedder, SavedModelEmbedder
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        return SavedModelEmbedder(path)
    if not os.path.exists(path):
        raise HDMLError(f"model {path} not found; expected a SavedModel directory (tools/export.py --output), a "
                        "training run directory, or a .keras file")
    ckpt = find_checkpoint(path, variant)
    model, info = load_checkpoint(ckpt)
    return ModelEmbedder(model, info, source=ckpt.path)


# -------------------------------------------------------------------------------------------- .keras files
def _check_keras_path(path: str) -> str:
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise HDMLError(f"{path}: a Keras model file must end with .keras")
    return path


def save_keras(model, path: str, *, image_size: Optional[int] = None, resize: Optional[int] = None,
               backbone: Optional[str] = None) -> str:
    """Saves an HDMLModel as one `.keras` file that `load_keras` turns back into a model that resumes training.

    Everything is saved: backbone, metric head, generator, classifier, running means (J_avg, J_gen, skipped steps)
    and, when compiled, the three optimizers' configurations (learning-rate schedules included) and state (step
    counter, Adam moments).

    Args:
      model: an HDMLModel.
      path: file name ending with .keras (replaced atomically).
      image_size, resize, backbone: geometry and backbone name recorded for export and the embed / search tools
        (defaults as in `export_saved_model`).

    Returns:
      path.
    """
    import keras

    from hdml_tf.serving import _backbone_name, embedding_info
    from hdml_tf.model import HDMLModel
    path = Path(_check_keras_path(path))
    if not isinstance(model, HDMLModel):
        raise HDMLError(f"save_keras saves an HDMLModel, got {type(model).__name__}; use model.save for others")
    info = embedding_info(model.embedder(), image_size, resize,
                          backbone if backbone is not None else _backbone_name(model))
    optimizers = {}
    if getattr(model, "optimizer", None) is not None:
        optimizers = {name: keras.saving.serialize_keras_object(getattr(model, attr))
                      for name, attr in zip(_OPTIMIZER_NAMES, ("optimizer", "generator_optimizer",
                                                               "classifier_optimizer"))
                      if getattr(model, attr, None) is not None}
    meta = {"format": "hdml_tf.keras/1", **info.to_dict(), "optimizers": optimizers}
    from keras.src.saving import saving_lib  # noqa: the file-object path of Keras' own save_model
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # HDMLModel's sub-networks are built when it is constructed, but Keras only marks the outer model built
        # after a __call__; saving is complete either way.
        warnings.filterwarnings("ignore", message=".*has not yet been built.*")
        _ensure_built(model)
        saving_lib.save_model(model, buffer)
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr(KERAS_METADATA_ENTRY, json.dumps(meta, indent=2, default=atomic._json_default))
    # Built in memory, written with plain file I/O: a full disk is one WriteError line, never an h5py crash.
    with atomic.guarded("the model", path):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, buffer.getvalue())
    return str(path)


def read_keras_info(path: str) -> Tuple[Optional[EmbeddingInfo], Dict]:
    """(EmbeddingInfo or None, optimizers' serialized configs by compile argument name) of a `.keras` file.

    From the hdml_tf.json entry `save_keras` adds; for a file written by plain `model.save` (a Keras callback), from
    Keras' own compile config when it names HDMLModel's three optimizers (HDMLModel.get_compile_config).
    """
    from hdml_tf.serving import EmbeddingInfo
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            meta = json.loads(archive.read(KERAS_METADATA_ENTRY)) if KERAS_METADATA_ENTRY in names else {}
            config = json.loads(archive.read("config.json")) if "config.json" in names else {}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise HDMLError(f"{path} is not a readable .keras file ({e})")
    info = EmbeddingInfo.from_dict(meta) if "image_size" in meta else None
    optimizers = meta.get("optimizers") or {}
    compiled = config.get("compile_config") or {}
    if not optimizers and compiled and set(compiled) <= set(_OPTIMIZER_NAMES):
        optimizers = {k: v for k, v in compiled.items() if v is not None}
    return info, optimizers


def load_keras(path: str, *, compile: bool = True):
    """Loads a `.keras` file written by `save_keras`; the model continues training exactly where it stopped.

    The model is rebuilt from its config, compiled with the saved optimizers (when it was saved compiled and
    `compile`), then every weight and optimizer variable is loaded. The backbone gets back its `backbone_name`.
    A `.keras` file written by plain `model.save` loads too: with its weights, running means and, when Keras' compile
    config names the three optimizers (`HDMLModel.get_compile_config`), compiled with their state; otherwise
    uncompiled (call `compile` yourself; optimizer state then starts afresh).

    Returns:
      HDMLModel.

    Raises:
      HDMLError: missing or unreadable file.
    """
    import keras
    import tensorflow as tf

    import hdml_tf.backbones  # noqa: F401  (registers the backbones' custom layers for deserialization)
    import hdml_tf.model  # noqa: F401  (registers HDMLModel)

    path = _check_keras_path(path)
    if not os.path.isfile(path):
        raise HDMLError(f"model file {path} not found")
    info, optimizer_configs = read_keras_info(path)
    try:
        model = keras.saving.load_model(path, compile=False)
    except (ValueError, TypeError, OSError, KeyError) as e:
        raise HDMLError(f"cannot load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if info is not None and info.backbone:
        model.backbone.backbone_name = info.backbone
    if info is not None:
        model.export_info = info
    if compile and optimizer_configs:
        model.compile(**{name: keras.saving.deserialize_keras_object(cfg)
                         for name, cfg in optimizer_configs.items()})
        if not model.built:  # Keras loads weights only into a built model; one inference call builds it
            side = info.image_size if info is not None else (model.backbone.input_shape[1] or 32)
            model(tf.zeros([1, side, side, 3]), training=False)
        # Loading the weights again, now that the optimizers exist, restores their state too.
        model.load_weights(path)
    return model


def keras_embedding_info(model) -> EmbeddingInfo:
    """The geometry recorded with a model loaded by `load_keras`, else the defaults for its input size."""
    from hdml_tf.serving import _backbone_name, embedding_info
    info = getattr(model, "export_info", None)
    if info is not None:
        return info
    return embedding_info(model.embedder(), backbone=_backbone_name(model))
