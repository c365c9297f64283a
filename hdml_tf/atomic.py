"""Writes that cannot half-happen: a temporary file in the same directory, fsync, then rename over the target.

A reader (or a later run) sees the previous file or the new one, never a truncated one under the final name; a
failed write (full disk, killed process) leaves the previous file untouched and removes its temporary file.
Temporary names are hidden and end with the target's own suffix (`.weights.h5`, `.keras`, `.npz`, ...), because
Keras and NumPy choose their format from it: `hdml.keras` is written as `.hdml.keras.tmp-<pid>-<n>.keras`.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]
_COUNTER = itertools.count()
#: Suffixes kept at the end of temporary names (readers/writers choose their format from them).
_KEPT_SUFFIXES = (".weights.h5", ".keras", ".h5", ".npz", ".json", ".csv", ".png", ".txt")


def fsync_dir(directory: PathLike) -> None:
    """Flushes a directory entry (a rename) to disk where the platform allows it."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def temporary_name(target: PathLike) -> Path:
    """A unique temporary path beside `target`, hidden, ending with the target's format suffix."""
    target = Path(target)
    suffix = next((s for s in _KEPT_SUFFIXES if target.name.endswith(s)), "")
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{next(_COUNTER)}{suffix}")


@contextlib.contextmanager
def atomic_path(target: PathLike) -> Iterator[Path]:
    """Context manager: write to the yielded temporary path; on success it is fsync'ed and renamed to `target`.

    On any exception the temporary file is removed, `target` is left as it was, and the exception propagates.
    """
    target = Path(target)
    temp = temporary_name(target)
    try:
        yield temp
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_dir(target.parent)


def write_text(target: PathLike, text: str) -> Path:
    """Atomically writes `text` (UTF-8) to `target`."""
    with atomic_path(target) as temp:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
    return Path(target)


def write_json(target: PathLike, data, **kwargs) -> Path:
    """Atomically writes `data` as JSON (indent 2 unless given; NumPy scalars become numbers)."""
    kwargs.setdefault("indent", 2)
    kwargs.setdefault("default", _json_default)
    return write_text(target, json.dumps(data, **kwargs) + "\n")


def _json_default(value):
    import numpy as np
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
