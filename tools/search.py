#!/usr/bin/env python
"""Find the images of an index (tools/embed.py) nearest to query images.

    python tools/search.py --index=photos.npz --query=cat.jpg --k=5
    python tools/search.py --index=photos.npz --query=queries/ --k=8 --grid=results.png

Queries are image files or folders (all their files); they are embedded with --model (default: the model that built
the index). Neighbours are ranked by the Euclidean distance between the L2-normalized embeddings,
d = ||q - x|| = sqrt(2 - 2 cos(q, x)) in [0, 2] (the same ranking as cosine similarity); both d and cos are printed.
A query that is itself in the index is not returned as its own neighbour (--noexclude_self keeps it). --grid writes
a PNG: one row per query, the query first, then its neighbours (`plot_retrieval_grid`: green / red frames for the
same / another class and cosine similarities, when the queries' classes are known; else unframed, with d).
Unreadable query files are skipped with a warning listed at the end. Errors print as one line `error: ...` on stderr
with exit code 2.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

from common_flags import check_model_path, quiet_tensorflow  # noqa: E402
from hdml_tf.errors import HDMLError  # noqa: E402

DISTANCE_NOTE = "d: Euclidean distance of the L2-normalized embeddings, sqrt(2 - 2 cos), 0 to 2; cos: cosine"


def define_flags():
    """Flags of this tool; defined only when run as a program, so importing it has no side effects."""
    flags.DEFINE_string("index", None, "Index file written by tools/embed.py (.npz).")
    flags.DEFINE_list("query", [], "Query image files and/or folders (comma-separated).")
    flags.DEFINE_string("model", None, "SavedModel directory or .keras file; default: the index's model.")
    flags.DEFINE_integer("k", 5, "Neighbours per query.")
    flags.DEFINE_string("grid", None, "Also write a PNG grid (query, then its k neighbours) to this path.")
    flags.DEFINE_bool("exclude_self", True, "Leave a query's own index entry out of its neighbours.")
    flags.DEFINE_integer("batch_size", 64, "Query images per forward pass.")


@dataclasses.dataclass
class Hit:
    rank: int
    index: int
    distance: float
    cosine: float
    path: str
    label: str


@dataclasses.dataclass
class QueryResult:
    path: str
    label: str
    hits: List[Hit]


def query_files(queries) -> List[str]:
    """Query paths: files as given, folders expanded to their files; HDMLError when one is missing or all empty."""
    from hdml_tf.retrieval import list_files
    if not queries:
        raise HDMLError("--query is required (image files or folders)")
    found = []
    for q in queries:
        if os.path.isdir(q):
            found += [os.path.join(q, p) for p in list_files(q)]
        elif os.path.isfile(q):
            found.append(q)
        else:
            raise HDMLError(f"query {q} not found")
    if not found:
        raise HDMLError(f"no files in query folder(s) {', '.join(queries)}")
    return found


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _label_in_index(path: str, index) -> str:
    """The class of a query that lies inside the index's root in a class folder, else ""."""
    if index.labels is None or not index.root:
        return ""
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(index.root))
    parts = rel.replace(os.sep, "/").split("/")
    return parts[0] if len(parts) >= 2 and parts[0] != ".." and parts[0] in index.class_names else ""


def search(index_path: str, queries, model: Optional[str] = None, k: int = 5, exclude_self: bool = True,
           batch_size: int = 64):
    """Embeds the queries and returns (list of QueryResult, skipped "path: reason" lines, ImageIndex)."""
    if k <= 0:
        raise HDMLError(f"--k={k} must be > 0")
    if not index_path or not os.path.isfile(index_path):  # before the slow TensorFlow import
        raise HDMLError(f"index file {index_path} not found; write one with tools/embed.py")

    import numpy as np

    from hdml_tf.retrieval import embed_files, load_index
    from hdml_tf.retrieval import search as search_index
    from hdml_tf.rundir import load_embedder

    index = load_index(index_path)
    files = query_files(queries)
    model = model or index.model
    if not model:
        raise HDMLError(f"{index_path} records no model; pass --model")
    check_model_path(model)
    embedder = load_embedder(model)
    if embedder.info.embedding_size != index.embeddings.shape[1]:
        raise HDMLError(f"model {model} gives {embedder.info.embedding_size}-d embeddings but {index_path} holds "
                        f"{index.embeddings.shape[1]}-d ones; use the model that built the index")
    embeddings, kept, report = embed_files(embedder, files, batch_size=batch_size, verbose=0)
    skipped = [f"{b.path}: {b.reason}" for b in report.bad]
    if not len(kept):
        raise HDMLError(f"none of the {len(files)} query files could be read as an image (first: {skipped[0]})")
    kept_files = [files[i] for i in kept]
    exclude = None
    if exclude_self:
        where = {os.path.realpath(index.full_path(i)): i for i in range(len(index))}
        exclude = np.array([where.get(os.path.realpath(f), -1) for f in kept_files])
    order, dist, cos = search_index(index, embeddings, k, exclude)
    if order.shape[1] == 0:
        raise HDMLError(f"{index_path} holds no image other than the query itself (--noexclude_self keeps it)")
    results = []
    for qi, f in enumerate(kept_files):
        hits = [Hit(rank=r + 1, index=int(j), distance=float(dist[qi, r]), cosine=float(cos[qi, r]),
                    path=index.paths[j], label=index.class_of(j)) for r, j in enumerate(order[qi])]
        results.append(QueryResult(path=f, label=_label_in_index(f, index), hits=hits))
    return results, skipped, index


#: Widest class column of the text results; longer names are cut with "..." (the path beside them is complete).
CLASS_COLUMN = 28


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def format_results(results, index, index_path: str) -> List[str]:
    classes = f", {len(index.class_names)} classes" if index.labels is not None else ""
    lines = [f"index: {index_path} ({len(index):,} images{classes}, {index.embeddings.shape[1]}-d)", DISTANCE_NOTE]
    for result in results:
        lines.append("")
        lines.append(f"query: {result.path}" + (f" (class {result.label})" if result.label else ""))
        width = min(CLASS_COLUMN, max([len("class")] + [len(h.label) for h in result.hits]))
        lines.append(f"  {'rank':>4}  {'d':>7}  {'cos':>7}  " + (f"{'class':<{width}}  " if index.labels is not None
                                                                  else "") + "path")
        for h in result.hits:
            label = f"{_cut(h.label, width):<{width}}  " if index.labels is not None else ""
            lines.append(f"  {h.rank:>4}  {h.distance:7.4f}  {h.cosine:7.4f}  {label}{h.path}")
    return lines


def _read_rgb(path: str):
    import tensorflow as tf

    from hdml_tf.data.images import decode_rgb
    return decode_rgb(tf.io.read_file(path)).numpy()


def plot_grid(results, index, path: str) -> str:
    """PNG: one row per query, the query then its neighbours.

    When every query's class is known (queries taken from the indexed class folders) this is
    `hdml_tf.evaluation.plots.plot_retrieval_grid`: green / red frames for neighbours of the same / another class,
    cosine similarity under each. Otherwise the frames would claim a correctness nobody knows, so neighbours are
    drawn unframed with their distance d.
    """
    queries = [_read_rgb(r.path) for r in results]
    neighbours = [[_read_rgb(index.full_path(h.index)) for h in r.hits] for r in results]
    if all(r.label for r in results) and all(h.label for r in results for h in r.hits):
        from hdml_tf.evaluation.plots import plot_retrieval_grid
        mask = [[h.label == r.label for h in r.hits] for r in results]
        cosines = [[h.cosine for h in r.hits] for r in results]
        return plot_retrieval_grid(queries, neighbours, mask, path, query_labels=[r.label for r in results],
                                   similarities=cosines, title="nearest neighbours (cosine similarity)",
                                   result_labels=[[h.label for h in r.hits] for r in results])
    return _plot_unlabelled(results, queries, neighbours, path)


def write_grid(results, index, path: str) -> str:
    """`plot_grid` written atomically: a failed write (full disk) is one line and leaves the previous file."""
    from hdml_tf import atomic
    with atomic.guarded("the grid", path), atomic.atomic_path(path) as temp:
        plot_grid(results, index, str(temp))
    return path


def _plot_unlabelled(results, queries, neighbours, path: str) -> str:
    """The grid without frames (nobody knows which neighbours are right): captions give the rank, d and class."""
    from hdml_tf.evaluation.plots import plot_image_grid

    rows = []
    for result, query, row in zip(results, queries, neighbours):
        cells = [(query, "query: " + (result.label or os.path.basename(result.path)), None)]
        cells += [(image, f"{hit.rank}. d={hit.distance:.3f}" + (f" {hit.label}" if hit.label else ""), None)
                  for hit, image in zip(result.hits, row)]
        rows.append(cells)
    return plot_image_grid(rows, path, title="nearest neighbours (d = distance)")


def main(argv):
    quiet_tensorflow()
    FLAGS = flags.FLAGS
    queries = list(FLAGS.query) + list(argv[1:])  # query files may also follow the flags
    if FLAGS.grid and not FLAGS.grid.lower().endswith(".png"):
        raise HDMLError(f"--grid={FLAGS.grid} must end with .png")
    if not FLAGS.index:
        raise HDMLError("--index is required (an index written by tools/embed.py)")
    if FLAGS.grid:
        from hdml_tf.atomic import check_writable_file
        check_writable_file(FLAGS.grid, "--grid")  # before the queries are embedded
    results, skipped, index = search(FLAGS.index, queries, FLAGS.model, FLAGS.k, FLAGS.exclude_self,
                                     FLAGS.batch_size)
    print("\n".join(format_results(results, index, FLAGS.index)))
    if FLAGS.grid:
        print(f"\ngrid: {write_grid(results, index, FLAGS.grid)}")
    if skipped:
        print(f"warning: skipped {len(skipped)} query files that are not readable images:", file=sys.stderr)
        for line in skipped:
            print(f"  {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    import common_flags
    define_flags()
    common_flags.define_verbose_flag()
    app.run(common_flags.run_main(main), flags_parser=common_flags.parse_flags)
