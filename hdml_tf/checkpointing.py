"""Atomic training checkpoints: a run killed at any moment resumes from its last complete checkpoint.

A checkpoint holds everything a training step reads or writes, so a resumed run continues exactly where the saved
one was:

- every model variable (`model.variables`): backbone, metric head, generator, classifier, BatchNorm moving
  statistics, the running means J_avg / J_gen (`WindowedMean` state), the skipped-step counters, the RNG state of
  any Dropout layer;
- every variable of the optimizers (`model.optimizer`, and for HDML `model.generator_optimizer` and
  `model.classifier_optimizer`): Adam moments and `iterations`, which the learning-rate schedule reads;
- the global step, i.e. the number of batches consumed, which is the sampler's position (`make_train_dataset(...,
  start_step=step)` yields batch `step` next, a pure function of (seed, step));
- the running means of the current epoch's logged quantities (`model.metrics_variables`, group "metrics"), so a
  run resumed mid-epoch reports that epoch as the uninterrupted run does (`restored_metrics`; optional when
  reading: checkpoints written before it existed restore everything else).

On disk, `DIR/ckpt-<step>.npz` (NumPy zip; every array carries a CRC-32 that is checked when it is read) and the
manifest `DIR/checkpoint.json` listing the kept checkpoints with their SHA-256. Writing is crash-safe:

1. the arrays go to a temporary file `DIR/.ckpt-<step>.npz.tmp-<pid>`, flushed and fsync'ed;
2. `os.replace` publishes it under its final name (atomic on POSIX), then the directory is fsync'ed;
3. the manifest is written the same way (temporary file, fsync, `os.replace`), last;
4. only then are checkpoints beyond the `keep` newest deleted.

A crash (SIGKILL, power loss, full disk) at any point leaves the previous checkpoints and a valid manifest; a
leftover temporary file is ignored and removed by the next run. Restoring tries the newest checkpoint first; one
that cannot be read (truncated, bit-flipped, checksum mismatch) is renamed `*.corrupt` with a warning and the
previous one is used. A checkpoint of a differently shaped model is an error, not a fallback.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import time
import zipfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from hdml_tf.atomic import fsync_dir
from hdml_tf.errors import HDMLError

log = logging.getLogger(__name__)

FORMAT = "hdml_tf-checkpoint-1"
MANIFEST = "checkpoint.json"
_NAME = re.compile(r"^ckpt-(\d+)\.npz$")
_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")
#: Optimizer attributes of HDMLModel, in the order they are saved.
OPTIMIZER_ATTRIBUTES = ("optimizer", "generator_optimizer", "classifier_optimizer")
#: What a read of a damaged file raises (zip structure, CRC, truncated member, JSON meta).
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


class CheckpointError(HDMLError):
    """The checkpoint directory cannot be used (no readable checkpoint, or one of a different model)."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One published checkpoint: its global step and file; sha256/size as recorded in the manifest (if any)."""

    step: int
    path: Path
    sha256: Optional[str] = None
    size: Optional[int] = None


#: Checkpoint groups that a checkpoint may lack (older files): restored when present, never required.
OPTIONAL_GROUPS = ("metrics",)


def checkpoint_groups(model) -> Dict[str, list]:
    """Named lists of the variables a checkpoint holds: "model" and each optimizer the model has."""
    groups = {"model": list(model.variables)}
    for attr in OPTIMIZER_ATTRIBUTES:
        opt = getattr(model, attr, None)
        if opt is not None:
            groups[attr] = list(opt.variables)
    return groups


def _metric_variables(model) -> list:
    return list(getattr(model, "metrics_variables", []) or [])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's live process
        return True
    return True


def write_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """Writes `arrays` as an uncompressed .npz to `path`, flushed and fsync'ed (the one place bytes are written)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: Path, text: str) -> None:
    """Writes `text` to `path`, flushed and fsync'ed."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class CheckpointManager:
    """Saves and restores the full training state of an `HDMLModel` in `directory`, keeping the `keep` newest.

    Args:
      directory: created if missing.
      keep: number of newest checkpoints kept (>= 1).

    `save(model, step)` never raises on a write failure (full disk, I/O error): it logs what failed, removes its
    temporary file and returns None, leaving the previous checkpoints as they were. `restore(model)` returns the
    restored global step, or None when the directory holds no checkpoint (a fresh start).
    """

    def __init__(self, directory, keep: int = 3):
        if keep < 1:
            raise CheckpointError(f"keep_checkpoints={keep} must be >= 1")
        #: The epoch means (`model.metrics_variables`) the last `restore` read, or None (see ContinueEpochMeans).
        self.restored_metrics: Optional[List[np.ndarray]] = None
        self.directory = Path(directory)
        self.keep = int(keep)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create the checkpoint directory {self.directory}: "
                                  f"{e.strerror or e}") from None
        self.last_error: Optional[str] = None

    # ------------------------------------------------------------------------------------------ listing
    def _manifest(self) -> Optional[List[CheckpointInfo]]:
        """Entries of the manifest, oldest first; None if it is missing or unreadable."""
        path = self.directory / MANIFEST
        if not path.exists():
            return None
        try:
            meta = json.loads(path.read_text())
            return [CheckpointInfo(int(e["step"]), self.directory / e["file"], e.get("sha256"), e.get("bytes"))
                    for e in meta["checkpoints"]]
        except (*_UNREADABLE, TypeError) as e:
            log.warning("checkpoint manifest %s is unreadable (%s); using the checkpoint files found beside it",
                        path, e)
            return None

    def checkpoints(self) -> List[CheckpointInfo]:
        """Published checkpoints, oldest first: the manifest's entries plus any complete file it does not list yet
        (a crash between publishing a file and rewriting the manifest)."""
        found = {}
        try:
            names = [p for p in self.directory.iterdir()]
        except OSError:
            names = []
        for p in names:
            m = _NAME.match(p.name)
            if m and p.is_file():
                found[int(m.group(1))] = CheckpointInfo(int(m.group(1)), p)
        for info in self._manifest() or []:
            if info.path.exists():
                found[info.step] = info
        return [found[s] for s in sorted(found)]

    @property
    def latest_step(self) -> Optional[int]:
        entries = self.checkpoints()
        return entries[-1].step if entries else None

    def _path(self, step: int) -> Path:
        return self.directory / f"ckpt-{step:08d}.npz"

    def remove_stale_temporaries(self) -> List[Path]:
        """Deletes temporary files left by dead processes (killed while saving); returns what was removed."""
        removed = []
        for p in self.directory.iterdir():
            m = _TEMP.match(p.name)
            if m and not _pid_alive(int(m.group(1))):
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
        if removed:
            log.warning("removed %d partial checkpoint file(s) left by an interrupted save: %s", len(removed),
                        ", ".join(p.name for p in removed))
        return removed

    # ------------------------------------------------------------------------------------------ saving
    def save(self, model, step: int) -> Optional[Path]:
        """Writes the full training state at global `step`; returns its path, or None if the write failed."""
        step = int(step)
        target = self._path(step)
        temp = self.directory / f".{target.name}.tmp-{os.getpid()}"
        start = time.time()
        try:
            arrays = _collect(model, step)
            write_npz(temp, arrays)
            sha, size = _sha256(temp), temp.stat().st_size
            os.replace(temp, target)
            fsync_dir(self.directory)
            kept = self._publish(CheckpointInfo(step, target, sha, size))
        except OSError as e:
            _unlink_quietly(temp)
            previous = [c for c in self.checkpoints() if c.step != step]
            keep_note = (f"the previous checkpoint (step {previous[-1].step}) is intact" if previous
                         else "no earlier checkpoint exists")
            reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            self.last_error = (f"could not write the checkpoint of step {step} to {self.directory}: {reason}; "
                               f"{keep_note}")
            log.error("%s; training goes on and the next save tries again", self.last_error)
            return None
        self.last_error = None
        log.info("saved checkpoint %s (step %d, %.1f MB, %.1f s); keeping %s", target.name, step,
                 size / 1e6, time.time() - start, ", ".join(str(c.step) for c in kept))
        return target

    def _publish(self, new: CheckpointInfo) -> List[CheckpointInfo]:
        """Rewrites the manifest with `new` as the newest entry, then deletes checkpoints beyond `keep`."""
        entries = [c for c in self.checkpoints() if c.step < new.step] + [new]
        kept, dropped = entries[-self.keep:], entries[:-self.keep]
        manifest = {"format": FORMAT, "latest": new.step,
                    "checkpoints": [{"step": c.step, "file": c.path.name, "sha256": c.sha256, "bytes": c.size}
                                    for c in kept]}
        temp = self.directory / f".{MANIFEST}.tmp-{os.getpid()}"
        try:
            write_text(temp, json.dumps(manifest, indent=1))
            os.replace(temp, self.directory / MANIFEST)
        except OSError:
            _unlink_quietly(temp)
            raise
        fsync_dir(self.directory)
        # Entries newer than `new` can only be left from a run that was rolled back (e.g. after a corrupt file).
        stale = dropped + [c for c in self.checkpoints() if c.step > new.step]
        for c in stale:
            _unlink_quietly(c.path)
        return kept

    # ------------------------------------------------------------------------------------------ restoring
    def restore(self, model) -> Optional[int]:
        """Loads the newest readable checkpoint into `model` and its optimizers; returns its step (None if none).

        Raises:
          CheckpointError: checkpoints exist but none is readable, or they belong to a different model.
        """
        self.remove_stale_temporaries()
        entries = self.checkpoints()
        if not entries:
            return None
        groups = checkpoint_groups(model)
        failures = []
        for info in reversed(entries):
            try:
                arrays, meta = _read(info)
                _assign(groups, arrays, meta, info)
                saved = meta["groups"].get("metrics")
                self.restored_metrics = ([arrays[f"metrics.{i:04d}"] for i in range(len(saved))]
                                         if saved is not None else None)
            except CheckpointError:
                raise
            except _UNREADABLE as e:
                failures.append(f"{info.path.name}: {e}")
                aside = _move_aside(info.path)
                older = [c.step for c in entries if c.step < info.step]
                log.warning("checkpoint %s (step %d) is unreadable (%s); moved it to %s and %s", info.path,
                            info.step, e, aside.name if aside else "left it in place",
                            f"falling back to step {older[-1]}" if older else "no older checkpoint is left")
                continue
            log.info("resumed from checkpoint %s (step %d)", info.path, info.step)
            return int(meta["step"])
        raise CheckpointError(f"no readable checkpoint in {self.directory} ({'; '.join(failures)}); move the "
                              f"directory away to start from scratch")


def _collect(model, step: int) -> Dict[str, np.ndarray]:
    """The arrays of a checkpoint: one entry per variable ("<group>.<index>") and "__meta__" (JSON)."""
    arrays, meta = {}, {"format": FORMAT, "step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "groups": {}}
    groups = checkpoint_groups(model)
    if _metric_variables(model):
        groups["metrics"] = _metric_variables(model)
    for group, variables in groups.items():
        meta["groups"][group] = [[v.path, list(v.shape)] for v in variables]
        for i, v in enumerate(variables):
            arrays[f"{group}.{i:04d}"] = np.asarray(v.numpy())
    arrays["__meta__"] = np.array(json.dumps(meta))
    return arrays


def _read(info: CheckpointInfo) -> Tuple[Dict[str, np.ndarray], dict]:
    """Reads and verifies a checkpoint file (SHA-256 if recorded, every member's CRC); raises on damage."""
    if info.sha256 is not None:
        actual = _sha256(info.path)
        if actual != info.sha256:
            raise ValueError(f"SHA-256 {actual[:12]}… does not match the manifest's {info.sha256[:12]}…")
    with np.load(info.path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}  # reading each member checks its CRC-32
    meta = json.loads(str(arrays.pop("__meta__")))
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r} is not {FORMAT!r}")
    if int(meta["step"]) != info.step:
        raise ValueError(f"it records step {meta['step']}, its name says {info.step}")
    return arrays, meta


def _assign(groups: Dict[str, list], arrays: Dict[str, np.ndarray], meta: dict, info: CheckpointInfo) -> None:
    """Checks that the checkpoint has exactly this model's variables (count and shapes), then assigns them all."""
    saved_groups = {k: v for k, v in meta["groups"].items() if k not in OPTIONAL_GROUPS}
    where = f"checkpoint {info.path}"
    if set(saved_groups) != set(groups):
        raise CheckpointError(f"{where} holds {', '.join(sorted(saved_groups))} but this model has "
                              f"{', '.join(sorted(groups))} (HDML vs baseline?); use another checkpoint_dir")
    plan = []  # everything is checked before the first variable changes
    for group, variables in groups.items():
        saved = saved_groups[group]
        if len(saved) != len(variables):
            raise CheckpointError(f"{where} has {len(saved)} {group} variables, this model {len(variables)}: it "
                                  f"was written by a different model or configuration; use another checkpoint_dir")
        for i, (v, (path, shape)) in enumerate(zip(variables, saved)):
            value = arrays[f"{group}.{i:04d}"]
            if tuple(value.shape) != tuple(v.shape):
                raise CheckpointError(f"{where}: {group} variable {path} has shape {tuple(value.shape)}, this "
                                      f"model's {v.path} {tuple(v.shape)}; use another checkpoint_dir")
            plan.append((v, value))
    for v, value in plan:
        v.assign(value)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _move_aside(path: Path) -> Optional[Path]:
    aside = path.with_name(path.name + ".corrupt")
    try:
        os.replace(path, aside)
        return aside
    except OSError:
        return None


def read_checkpoint(path) -> Tuple[int, Dict[str, np.ndarray]]:
    """(step, {"<group>.<index>": array}) of one checkpoint file, verified as `restore` does (for tools, tests)."""
    path = Path(path)
    m = _NAME.match(path.name)
    if not m:
        raise CheckpointError(f"{path} is not a checkpoint file (expected ckpt-<step>.npz)")
    arrays, meta = _read(CheckpointInfo(int(m.group(1)), path))
    return int(meta["step"]), arrays
