"""Writes that cannot half-happen: a temporary file in the same directory, fsync, then rename over the target.

A reader (or a later run) sees the previous file or the new one, never a truncated one under the final name; a
failed write (full disk, killed process) leaves the previous file untouched and removes its temporary file.
Temporary names are hidden and end with the target's own suffix (`.weights.h5`, `.keras`, `.npz`, ...), because
Keras and NumPy choose their format from it: `hdml.keras` is written as `.hdml.keras.tmp-<pid>-<n>.keras`.

`guarded(what, target)` turns a failed write into one `WriteError` line that says what could not be written, why
(the disk is full, permission denied, ...) and that the previous file is unchanged; `check_writable_dir` creates a
directory and test-writes into it before any long work starts.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Union

from hdml_tf.errors import HDMLError

PathLike = Union[str, os.PathLike]
_COUNTER = itertools.count()
#: Suffixes kept at the end of temporary names (readers/writers choose their format from them).
_KEPT_SUFFIXES = (".weights.h5", ".keras", ".h5", ".npz", ".json", ".csv", ".png", ".txt")
#: errno values that mean "no room": a full disk, a full quota, the process's file size limit (RLIMIT_FSIZE).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class WriteError(HDMLError):
    """A file or directory could not be written (full disk, permissions, read-only file system, ...)."""


def describe_os_error(e: BaseException) -> str:
    """A few words for the user: why a write failed ("the disk is full", "permission denied", ...)."""
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full" if code == errno.ENOSPC else "the disk quota is exhausted"
    if code == errno.EFBIG:
        return "the file is larger than this process may write (file size limit)"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.EROFS:
        return "the file system is read-only"
    if code == errno.ENOTDIR:
        return "a part of the path is a file, not a directory"
    if code == errno.ENOENT:
        return "a part of the path does not exist and cannot be created there"
    text = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return " ".join(str(text).split())[:200]


def _first_file_in(path: Path) -> Optional[Path]:
    """The deepest existing ancestor of `path` when it is a file (why a directory cannot be created there)."""
    for parent in [path] + list(path.parents):
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_writable_dir(path: PathLike, what: str) -> Path:
    """Creates directory `path` (with its parents) and test-writes a file into it; one `WriteError` line if either
    fails, naming `what` (e.g. "--output_dir") and the reason. Call it before hours of work, not after.

    Returns:
      the directory as a Path.
    """
    path = Path(path)
    where = f"{what}={path}" if what.startswith("--") else f"{what} {path}"
    blocker = _first_file_in(path)
    if blocker is not None:
        raise WriteError(f"cannot use {where}: {blocker} is a file, not a directory; expected a writable directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot create {where}: {describe_os_error(e)}; expected a writable directory") from None
    probe = path / f".write-test-{os.getpid()}-{next(_COUNTER)}"
    try:
        with open(probe, "wb") as f:
            f.write(b"hdml_tf write test\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(f"cannot write into {where}: {describe_os_error(e)}; expected a writable directory") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return path


def check_writable_file(path: PathLike, what: str) -> Path:
    """Before the work that produces it: the file `path` can be written (its directory is created and
    test-written); one `WriteError` line naming `what` (e.g. "--output") otherwise. Nothing is left behind."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"{what}={path} is a directory; expected a file name")
    try:
        check_writable_dir(path.parent, "the directory")
    except WriteError as e:
        raise WriteError(f"cannot write {what}={path}: {str(e).split(': ', 1)[-1]}") from None
    return path


@contextlib.contextmanager
def guarded(what: str, target: PathLike) -> Iterator[None]:
    """Turns a failed write inside the block into one `WriteError` line: what, where, why, and what is left.

    Any OSError (h5py's failed writes are OSErrors too) becomes
    `could not write <what> <target>: <reason>; the previous <name> is unchanged` (or "nothing was written under
    that name"). Use it around an `atomic_path` write, which has already removed its temporary file.
    """
    target = Path(target)
    existed = target.exists()
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        left = (f"the previous {target.name} is unchanged" if existed and target.exists()
                else "nothing was written under that name")
        raise WriteError(f"could not write {what} {target}: {describe_os_error(e)}; {left}") from None


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


def write_bytes(target: PathLike, data: bytes) -> Path:
    """Atomically writes `data` to `target` (plain file I/O: a full disk is a clean OSError)."""
    with atomic_path(target) as temp:
        _write_file(temp, data)
    return Path(target)


def _write_file(path: Path, data: bytes) -> None:
    """The one place `write_bytes` / `write_text` put bytes on disk (tests inject a full disk here)."""
    with open(path, "wb") as f:
        f.write(data)


def write_text(target: PathLike, text: str) -> Path:
    """Atomically writes `text` (UTF-8) to `target`."""
    return write_bytes(target, text.encode("utf-8"))


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
