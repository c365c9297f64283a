"""A retrieval index: the embeddings of a folder of images, saved as one `.npz`, and nearest-neighbour search in it.

`tools/embed.py` builds an `ImageIndex` (`embed_files` over `list_files` of a folder, labels from first-level
class folders when every image is in one) and `save_index`es it; `tools/search.py` `load_index`es it and `search`es
it with query images. The search is `hdml_tf.evaluation.metrics.nearest_neighbors`, the same exact, chunked search
(ties to the lower index) that evaluation uses.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from typing import Optional, Tuple

import numpy as np

from hdml_tf import atomic
from hdml_tf.errors import HDMLError
from hdml_tf.serving import EmbeddingInfo


@dataclasses.dataclass(frozen=True)
class ImageIndex:
    """Embeddings of a folder tree (what tools/embed.py writes and tools/search.py reads, as one .npz).

    Attributes:
      embeddings: float32 [N, E], L2-normalized.
      paths: N file paths relative to `root`.
      root: the embedded folder (absolute).
      labels: int32 [N] class of each image (its first-level subfolder) or None when the images are not all in
        class subfolders.
      class_names: C subfolder names, label i is class_names[i] (empty without labels).
      info: the embedding model's EmbeddingInfo.
      model: path of the model that computed the embeddings.
      skipped: "path: reason" of each unreadable file left out.
    """

    embeddings: np.ndarray
    paths: Tuple[str, ...]
    root: str
    labels: Optional[np.ndarray]
    class_names: Tuple[str, ...]
    info: EmbeddingInfo
    model: str = ""
    skipped: Tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def full_path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def class_of(self, i: int) -> str:
        return self.class_names[int(self.labels[i])] if self.labels is not None else ""


def list_files(folder: str, exclude: Tuple[str, ...] = ()) -> Tuple[str, ...]:
    """Every regular file under `folder` (recursive, sorted, hidden files and folders left out), relative paths.

    Nothing is filtered by extension: a file that is not an image is reported by the decoder, not silently dropped.
    """
    excluded = {os.path.abspath(e) for e in exclude}
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(parent, name)
            if name.startswith(".") or os.path.abspath(full) in excluded or not os.path.isfile(full):
                continue
            found.append(os.path.relpath(full, folder))
    return tuple(found)


def folder_labels(paths) -> Tuple[Optional[np.ndarray], Tuple[str, ...]]:
    """(labels int32 [N], class names) from first-level subfolders, or (None, ()) unless every file is in one."""
    parts = [p.replace(os.sep, "/").split("/") for p in paths]
    if not parts or any(len(p) < 2 for p in parts):
        return None, ()
    names = tuple(sorted({p[0] for p in parts}))
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[p[0]] for p in parts], np.int32), names


def embed_files(embedder, paths, *, batch_size: int = 64, name: str = "", verbose: int = 1):
    """Embeds image files, leaving out the ones that cannot be decoded.

    `embedder` is what `hdml_tf.rundir.load_embedder` returns (a callable uint8 images → embeddings with `.info`).
    Files are read, decoded (`decode_rgb`: gray, RGBA and CMYK become RGB) and resized to the model's `resize` in a
    parallel tf.data map (`hdml_tf.data.images.decode_files`, progress bar when verbose), then embedded in batches
    of `batch_size` (center crop and normalization inside the model).

    Returns:
      (embeddings float32 [N', E], kept int64 [N'] positions in `paths` of the readable files, ImageScanReport
      naming the others).
    """
    from hdml_tf.data.images import decode_files
    if batch_size <= 0:
        raise HDMLError(f"batch_size={batch_size} must be > 0")
    paths = [os.fspath(p) for p in paths]
    out = np.zeros((len(paths), embedder.info.embedding_size), np.float32)

    def sink(index, images):
        for start in range(0, len(index), batch_size):
            out[index[start:start + batch_size]] = embedder(images[start:start + batch_size])

    report = decode_files(paths, embedder.info.resize, name=name, verbose=verbose, sink=sink)
    kept = np.setdiff1d(np.arange(len(paths)), np.asarray(report.bad_index, np.int64))
    return out[kept], kept, report


def save_index(path: str, index: ImageIndex) -> str:
    """Writes an ImageIndex as .npz (no pickled objects: strings are stored as unicode arrays), atomically.

    Raises:
      WriteError: the file could not be written (one line; the previous index, if any, is unchanged).
    """
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise HDMLError(f"index file {path} must end with .npz")
    arrays = {"embeddings": np.asarray(index.embeddings, np.float32), "paths": np.array(index.paths, dtype=str),
              "root": np.array(index.root), "class_names": np.array(index.class_names, dtype=str),
              "info": np.array(json.dumps(index.info.to_dict())), "model": np.array(index.model),
              "skipped": np.array(index.skipped, dtype=str)}
    if index.labels is not None:
        arrays["labels"] = np.asarray(index.labels, np.int32)
    buffer = io.BytesIO()  # built in memory, written with plain file I/O: a full disk leaves no partial file
    np.savez(buffer, **arrays)
    with atomic.guarded("the index", path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic.write_bytes(path, buffer.getvalue())
    return path


def load_index(path: str) -> ImageIndex:
    """Reads an index written by `save_index` (tools/embed.py)."""
    if not os.path.isfile(path):
        raise HDMLError(f"index file {path} not found; write one with tools/embed.py")
    try:
        with np.load(path, allow_pickle=False) as f:
            d = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise HDMLError(f"{path} is not an index written by tools/embed.py ({e})")
    if "embeddings" not in d or "paths" not in d:
        raise HDMLError(f"{path} has no embeddings/paths arrays; expected an index written by tools/embed.py")
    return ImageIndex(embeddings=d["embeddings"].astype(np.float32), paths=tuple(str(p) for p in d["paths"]),
                      root=str(d.get("root", "")), labels=d.get("labels"),
                      class_names=tuple(str(c) for c in d.get("class_names", ())),
                      info=EmbeddingInfo.from_dict(json.loads(str(d["info"]))), model=str(d.get("model", "")),
                      skipped=tuple(str(s) for s in d.get("skipped", ())))


def search(index: ImageIndex, queries: np.ndarray, k: int, exclude=None):
    """The k nearest index images of each query by Euclidean distance between unit vectors.

    For unit vectors ||q - x|| = sqrt(2 - 2 cos(q, x)), so the ranking is the cosine ranking; both are returned.

    Args:
      index: the ImageIndex searched.
      queries: float [Q, E] L2-normalized.
      k: neighbours per query; more than the index offers is cut to what it has.
      exclude: optional int [Q], an index row to leave out for each query (its own entry), -1 for none.

    Returns:
      (indices int64 [Q, k'], distances float32 [Q, k'], cosines float32 [Q, k']), nearest first.
    """
    from hdml_tf.evaluation.metrics import nearest_neighbors
    queries = np.asarray(queries, np.float32).reshape(-1, index.embeddings.shape[1])
    exclude = None if exclude is None else np.asarray(exclude, np.int64)
    limit = len(index) - (1 if exclude is not None and np.any(exclude >= 0) else 0)
    k = max(0, min(int(k), limit))
    if k == 0 or len(queries) == 0:
        empty = np.zeros((len(queries), 0))
        return empty.astype(np.int64), empty.astype(np.float32), empty.astype(np.float32)
    order, top = nearest_neighbors(index.embeddings, k, queries=queries, exclude=exclude)
    top = np.clip(top, -1.0, 1.0)
    dist = np.sqrt(np.maximum(2.0 - 2.0 * top, 0.0))
    return order, dist.astype(np.float32), top.astype(np.float32)


__all__ = ["ImageIndex", "list_files", "folder_labels", "embed_files", "save_index", "load_index", "search"]
