"""Retrieval and clustering metrics of deep metric learning on L2-normalized embeddings.

The paper (Zheng et al., "Hardness-Aware Deep Metric Learning", CVPR 2019, Tables 1-3) reports NMI, F1 and
Recall@K on the unseen test classes; the official code is `lib/evaluation.py` of github wzzheng/HDML. We add
MAP@R and R-Precision (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020).

Conventions shared by every function here:

* `embeddings` float [N, E], one row per image, L2-normalized (rows whose norm is off by more than 1e-4 are
  normalized here; zero rows stay zero). Similarity is the dot product, i.e. ranking by cosine similarity, which
  for unit vectors is the ranking by Euclidean distance used by the official code.
* `labels` int [N], any integer class ids.
* A query never counts itself: the other N-1 images are the gallery ("leave-one-out" retrieval).
* Queries whose class has no other image ("lone" queries, R = 0) are left out of Recall@K, MAP@R and
  R-Precision, as in pytorch-metric-learning's AccuracyCalculator (CUB, Cars and SOP have none).
* Ties are broken deterministically: higher similarity first, then LOWER gallery index first. Recall@K does not
  sort at all: it counts, per query, the images ranked ahead of its best positive under exactly this rule. For
  neighbour lists (MAP@R, `nearest_neighbors`) the order inside a list is fixed by a stable sort on
  (-similarity, index), and whenever an exact tie straddles the k-th place the tied images are chosen by lowest
  index from the full similarity row; so the rule does not depend on how `tf.math.top_k` breaks ties.
  All comparisons of a query use one float32 similarity row, so results are exactly reproducible for a given chunk
  size; between chunk sizes the matmul may round differently in the last bit (BLAS picks kernels by shape), which
  can only swap two gallery images whose similarities differ by ~1e-7.

Scale: similarities are computed in row chunks with TensorFlow (`tf.matmul`; one XLA-fused pass that counts
ranks and takes block maxima; a two-stage `tf.math.top_k` on the block maxima and then on the candidate blocks),
so memory is bounded whatever N is; see `nearest_neighbors` for the bound. At Stanford Online Products' size
(N = 60,502, E = 512, 11,316 classes) one pass gives Recall@{1,10,100,1000} + MAP@R + R-Precision; about half of
its cost is the float32 matmul (3.7 TFLOP). `tools/benchmark_eval.py` measures it against a full sort per query.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

# Memory for one float32 similarity chunk [chunk, N] when `chunk_size` is not given.
DEFAULT_CHUNK_BYTES = 256 * 2 ** 20

# Default K of Recall@K (the paper's CUB / Cars columns); each data set's list is `hdml_tf.data.datasets.recall_ks`.
PAPER_RECALL_KS = (1, 2, 4, 8)
KMEANS_MODES = ("auto", "full", "minibatch")
# "auto" uses full k-means up to this many clusters (CUB 100, Cars 98 test classes), mini-batch above (SOP 11,316).
AUTO_FULL_KMEANS_MAX_CLUSTERS = 1000
# The official protocol (lib/evaluation.py `evaluate_cluster`): sklearn.cluster.KMeans(n_clusters, random_state=1)
# with the scikit-learn default of its time, n_init=10 -- the best inertia of 10 k-means++ restarts.
OFFICIAL_KMEANS_RESTARTS = 10
OFFICIAL_KMEANS_SEED = 1


# ----------------------------------------------------------------------------------------------- input checks

def _check_inputs(embeddings, labels) -> Tuple[np.ndarray, np.ndarray]:
    """Validates and returns (float32 [N, E] unit rows, int64 [N] labels)."""
    x = np.asarray(embeddings)
    y = np.asarray(labels)
    if x.ndim != 2:
        raise ValueError(f"embeddings must have shape [N, E], got shape {x.shape}")
    if y.ndim != 1:
        raise ValueError(f"labels must have shape [N], got shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"embeddings and labels differ in length: {len(x)} embeddings, {len(y)} labels")
    if len(x) < 2:
        raise ValueError(f"need at least 2 embeddings to evaluate retrieval, got {len(x)}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"embeddings must be real numbers, got dtype {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.all(np.isfinite(x), axis=1)))
        raise ValueError(f"embeddings contain NaN or Inf in {bad} of {len(x)} rows")
    norms = np.linalg.norm(x, axis=1)
    off = (np.abs(norms - 1.0) > 1e-4) & (norms > 0)
    if np.any(off):
        x = x.copy()
        x[off] /= norms[off, None]
    return x, y.astype(np.int64, copy=False)


def _check_ks(ks, n: int) -> Tuple[int, ...]:
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    ks = tuple(ks)
    if not ks:
        raise ValueError("recall_ks is empty; give at least one K, e.g. (1, 2, 4, 8)")
    for k in ks:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"recall@K needs integer K >= 1, got {k!r}")
        if k > n - 1:
            raise ValueError(f"recall@{k} needs K <= N-1 = {n - 1} (a query never retrieves itself)")
    return tuple(int(k) for k in ks)


def _chunk_rows(n: int, chunk_size: Optional[int]) -> int:
    if chunk_size is None:
        return int(max(1, min(n, DEFAULT_CHUNK_BYTES // (4 * n))))
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(min(chunk_size, n))


def _class_tables(labels: np.ndarray):
    """Returns (class index [N], members [C, M] int32 sorted row indices padded with -1, class sizes [C])."""
    _, cls, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(cls, kind="stable")  # rows grouped by class, ascending index inside a class
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank_in_class = np.arange(len(labels)) - np.repeat(starts, sizes)
    members = np.full((len(sizes), int(sizes.max())), -1, dtype=np.int32)
    members[cls[order], rank_in_class] = order
    return cls.astype(np.int64), members, sizes


# ----------------------------------------------------------------------------------- chunked nearest neighbours

@tf.function(jit_compile=True, reduce_retracing=False)
def _scan_chunk(sims, rows, members, block: int, with_rank: bool, with_blocks: bool):
    """One fused pass (XLA) over a similarity chunk.

    Args:
      sims: float32 [c, N] similarities of c queries to the whole gallery.
      rows: int32 [c] gallery index of each query (its own column, which never counts).
      members: int32 [c, M] gallery indices of each query's class, padded with -1.
      block: block size B of the two-stage top-k (static).
    Returns:
      ahead: int32 [c], number of other gallery images ranked before the query's best positive (rule: higher
        similarity first, then lower index), or zeros where `with_rank` is False.
      block_max: float32 [c, ceil(N / B)] maximum similarity per block of B columns (the query itself included;
        `_top_k_chunk` fetches one block more for it), or an empty tensor where `with_blocks` is False.
    """
    n = sims.shape[1]
    if with_rank:
        valid = (members >= 0) & tf.not_equal(members, rows[:, None])
        pos = tf.where(valid, tf.gather(sims, tf.maximum(members, 0), batch_dims=1), -np.inf)
        best = tf.reduce_max(pos, axis=1)
        best_idx = tf.reduce_min(tf.where(valid & tf.equal(pos, best[:, None]), members, n), axis=1)
        col = tf.range(n, dtype=tf.int32)[None, :]
        before = (sims > best[:, None]) | (tf.equal(sims, best[:, None]) & (col < best_idx[:, None]))
        self_sim = tf.gather(sims, rows[:, None], batch_dims=1)[:, 0]
        self_before = (self_sim > best) | (tf.equal(self_sim, best) & (rows < best_idx))
        ahead = tf.reduce_sum(tf.cast(before, tf.int32), axis=1) - tf.cast(self_before, tf.int32)
    else:
        ahead = tf.zeros(tf.shape(rows), tf.int32)
    if with_blocks and block > 1:
        full = n // block
        block_max = tf.reduce_max(tf.reshape(sims[:, :full * block], [-1, full, block]), axis=2)
        if full * block < n:
            block_max = tf.concat([block_max, tf.reduce_max(sims[:, full * block:], axis=1, keepdims=True)], axis=1)
    elif with_blocks:
        col = tf.range(n, dtype=tf.int32)[None, :]
        block_max = tf.where(tf.equal(col, rows[:, None]), -np.inf, sims)  # B = 1: the row without the query
    else:
        block_max = tf.zeros([0, 0], tf.float32)
    return ahead, block_max


def _block_size(n: int, k: int) -> int:
    """B ~ sqrt(N / k) balances the two top-k stages (N / B block maxima, then k * B candidates)."""
    b = int(math.sqrt(n / max(k, 1)))
    return b if b >= 4 else 1


def _top_k_chunk(sims, rows_tf, block_max, block: int, k: int, rows: np.ndarray):
    """Exact top-k (each query's own column `rows[i]` excluded, none where it is -1) of a chunk with the
    deterministic tie rule; NumPy ([c, k] int64, [c, k] f32)."""
    n = int(sims.shape[1])
    available = n - 1 if np.any(rows >= 0) else n
    fetch = min(k + 1, available)  # one more than needed, to see whether a tie straddles the k-th place
    if block > 1:
        num_blocks = int(block_max.shape[1])
        # fetch + 1 blocks: the query's own block may take one place (its maximum is usually the query itself).
        _, top_blocks = tf.math.top_k(block_max, min(fetch + 1, num_blocks))
        top_blocks = tf.sort(top_blocks, axis=1)  # candidates in increasing gallery index
        cols = tf.reshape(top_blocks[:, :, None] * block + tf.range(block, dtype=tf.int32)[None, None, :],
                          [tf.shape(top_blocks)[0], -1])
        cand = tf.gather(sims, tf.minimum(cols, n - 1), batch_dims=1)
        cand = tf.where((cols < n) & tf.not_equal(cols, rows_tf[:, None]), cand, -np.inf)
        vals, pos = tf.math.top_k(cand, fetch)
        idx = tf.gather(cols, pos, batch_dims=1)
    else:
        vals, idx = tf.math.top_k(block_max, fetch)
    vals, idx = vals.numpy(), idx.numpy().astype(np.int64)
    order = np.lexsort((idx, -vals), axis=-1)  # stable: similarity descending, then index ascending
    vals = np.take_along_axis(vals, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    if fetch > k:
        tie = np.nonzero(vals[:, k - 1] == vals[:, k])[0]
        if len(tie):
            v = vals[tie, k - 1]
            greater = np.sum(vals[tie, :k] > v[:, None], axis=1)
            full = tf.gather(sims, tie).numpy()
            eq = full == v[:, None]
            own = rows[tie] >= 0  # the query's own column, where it has one in the gallery
            eq[np.arange(len(tie))[own], rows[tie][own]] = False
            rank = np.cumsum(eq, axis=1)
            r, c = np.nonzero(eq & (rank <= (k - greater)[:, None]))
            idx[tie[r], greater[r] + rank[r, c] - 1] = c
            vals[tie[r], greater[r] + rank[r, c] - 1] = v[r]
    return idx[:, :k], vals[:, :k]


def _scan(x: np.ndarray, labels: Optional[np.ndarray], k: int, with_rank: bool, chunk_size: Optional[int],
          queries: Optional[np.ndarray] = None, exclude: Optional[np.ndarray] = None):
    """Runs the chunked pass; yields (row slice, ahead [c] or None, neighbours [c, k] or None) per chunk.

    Queries are the gallery's own rows (each leaves itself out), or `queries` [Q, E] leaving out the gallery column
    `exclude[q]` (-1: none; ranks need the gallery's own rows)."""
    n = len(x)
    gallery = tf.constant(x)
    own = queries is None
    queries = gallery if own else tf.constant(queries)
    num_queries = int(queries.shape[0])
    chunk = _chunk_rows(n, chunk_size)
    if labels is not None:
        cls, members_table, _ = _class_tables(labels)
    block = _block_size(n, min(k + 1, n - 1)) if k > 0 else 1
    for start in range(0, num_queries, chunk):
        stop = min(num_queries, start + chunk)
        rows = np.arange(start, stop) if own else np.asarray(exclude[start:stop], np.int64)
        rows_tf = tf.constant(rows, tf.int32)
        members = tf.constant(members_table[cls[rows]] if with_rank else np.zeros((len(rows), 1), np.int32))
        sims = tf.matmul(queries[start:stop], gallery, transpose_b=True)
        ahead, block_max = _scan_chunk(sims, rows_tf, members, block, with_rank, k > 0)
        nbrs = _top_k_chunk(sims, rows_tf, block_max, block, k, rows) if k > 0 else None
        yield slice(start, stop), (ahead.numpy() if with_rank else None), nbrs


def nearest_neighbors(embeddings, k: int, *, queries=None, exclude=None,
                      chunk_size: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The k most similar other images of every image (or of each of `queries`), in chunks with bounded memory.

    The one nearest-neighbour search of the package: evaluation uses it leave-one-out, the retrieval index
    (`hdml_tf.retrieval.search`) with outside queries.

    Order: similarity descending, ties by lower index first (guaranteed, see the module docstring).

    Memory: per chunk of c query rows, one float32 similarity block c x N (4 c N bytes; `chunk_size=None` picks
    c = 256 MiB / (4 N), i.e. 1,109 rows for N = 60,502), plus c x N / B float32 block maxima and c x (k + 1) x B
    candidates for the two-stage top-k with B ~ sqrt(N / k) (for B = 1, when k is close to N, a second c x N
    float32 buffer), plus the k-lists. Total, ~ 4 c N bytes + O(c (N / B + k B)); the result is N x k.

    Args:
      embeddings: float [N, E], L2-normalized: the gallery.
      k: neighbours per query, 1 <= k <= N - 1 (N with outside queries that exclude nothing).
      queries: None (every gallery row queries the others), or float [Q, E] L2-normalized outside queries.
      exclude: with `queries`, int [Q]: a gallery row each query must not retrieve (its own entry), -1 for none.
      chunk_size: query rows per chunk; None sizes chunks to DEFAULT_CHUNK_BYTES.
    Returns:
      indices: int64 [Q, k] gallery indices (never the query itself / its excluded row).
      similarities: float32 [Q, k] dot products, non-increasing along each row.
    Raises:
      ValueError: bad shapes, non-finite values or k out of range.
    """
    x, _ = _check_inputs(embeddings, np.zeros(len(np.asarray(embeddings)), np.int64))
    q = None
    if queries is not None:
        q = np.asarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != x.shape[1] or not np.all(np.isfinite(q)):
            raise ValueError(f"queries must be finite [Q, {x.shape[1]}], got shape {q.shape}")
        exclude = np.full(len(q), -1, np.int64) if exclude is None else np.asarray(exclude, np.int64)
        if exclude.shape != (len(q),) or np.any(exclude >= len(x)):
            raise ValueError(f"exclude must be [Q] = [{len(q)}] gallery rows or -1, got {exclude}")
    limit = len(x) - 1 if q is None or np.any(exclude >= 0) else len(x)
    if not isinstance(k, (int, np.integer)) or k < 1 or k > limit:
        bound = "N-1" if limit < len(x) else "N"
        raise ValueError(f"nearest_neighbors needs 1 <= k <= {bound} = {limit}, got k={k!r}")
    count = len(x) if q is None else len(q)
    idx = np.empty((count, k), np.int64)
    sim = np.empty((count, k), np.float32)
    if count == 0:
        return idx, sim
    for rows, _, (i, s) in _scan(x, None, int(k), False, chunk_size, queries=q, exclude=exclude):
        idx[rows], sim[rows] = i, s
    return idx, sim


def _per_query(embeddings, labels, with_rank: bool, with_map: bool, chunk_size: Optional[int]):
    """Per-query retrieval results: dict of arrays [N] "rank" (1-based rank of the best positive), "ap" (AP@R),
    "rp" (R-Precision) and "keep" (R > 0), computed in one chunked pass."""
    x, y = _check_inputs(embeddings, labels)
    cls, _, sizes = _class_tables(y)
    r = sizes[cls] - 1  # R: the other images of the query's class
    keep = r > 0
    if not np.any(keep):
        raise ValueError(f"no class has 2 or more images among the {len(x)} embeddings; retrieval is undefined")
    m = int(r.max()) if with_map else 0
    out = {"keep": keep, "rank": np.zeros(len(x), np.int64), "ap": np.zeros(len(x)), "rp": np.zeros(len(x))}
    for rows, ahead, nbrs in _scan(x, y, m, with_rank, chunk_size):
        if with_rank:
            out["rank"][rows] = ahead + 1
        if with_map:
            idx, _ = nbrs
            r_rows = r[rows]
            rel = (y[idx] == y[rows][:, None]) & (np.arange(m)[None, :] < r_rows[:, None])  # [c, m]
            hits = np.cumsum(rel, axis=1)
            precision = hits / np.arange(1, m + 1)[None, :]
            denom = np.maximum(r_rows, 1)
            out["ap"][rows] = np.sum(precision * rel, axis=1) / denom  # Musgrave et al. 2020, MAP@R
            out["rp"][rows] = hits[np.arange(len(r_rows)), denom - 1] / denom
    return out


def _retrieval(embeddings, labels, ks: Sequence[int], with_map: bool, chunk_size: Optional[int]) -> Dict[str, float]:
    ks = _check_ks(ks, len(np.asarray(embeddings))) if ks else ()
    q = _per_query(embeddings, labels, bool(ks), with_map, chunk_size)
    keep = q["keep"]
    out = {f"recall@{k}": float(np.mean(q["rank"][keep] <= k)) for k in ks}
    if with_map:
        out["map@r"] = float(np.mean(q["ap"][keep]))
        out["r_precision"] = float(np.mean(q["rp"][keep]))
    return out


def recall_at_k(embeddings, labels, ks: Iterable[int] = PAPER_RECALL_KS, *,
                chunk_size: Optional[int] = None) -> Dict[int, float]:
    """Recall@K: fraction of queries with at least one same-class image among their K nearest other images.

    Official `evaluate_recall` / `compute_recall_at_K` (full argsort per query), computed here by counting: the
    rank of a query's best positive is 1 + the number of images ranked before it (higher similarity, or equal
    similarity and lower index), so every K comes from one chunked pass and no sort. Memory as in
    `nearest_neighbors` (one float32 chunk x N block).

    Example: points (1, 0), (cos 30, sin 30), (0, 1), (-1, 0) with labels [0, 0, 1, 1]: the best positive of
    query 2 ranks 3rd (after point 1 at similarity 0.5 and point 0, which ties with point 3 at 0 and has the
    lower index); the others rank 1st. So recall@1 = recall@2 = 0.75, recall@3 = 1.

    Args:
      embeddings: float [N, E], L2-normalized.
      labels: int [N].
      ks: the Ks, each in 1..N-1.
      chunk_size: query rows per chunk (None: DEFAULT_CHUNK_BYTES of similarities).
    Returns:
      {K: recall} in the order of `ks`, over queries whose class has another image.
    Raises:
      ValueError: mismatched lengths, non-finite values, K outside 1..N-1, or no class with 2 images.
    """
    res = _retrieval(embeddings, labels, tuple(ks), False, chunk_size)
    return {int(k.split("@")[1]): v for k, v in res.items()}


def map_at_r(embeddings, labels, *, chunk_size: Optional[int] = None) -> float:
    """MAP@R (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020).

    For a query with R other images of its class: MAP@R = (1/R) sum_{i=1..R} P(i) rel(i), where rel(i) says whether
    the i-th nearest neighbour is of the query's class and P(i) is the precision of the first i neighbours; the
    mean over queries. Example: neighbours (same, other, same) with R = 2 give (1/2)(1/1 + 0) = 0.5 (the second
    positive lies outside the first R).

    Args / Raises: as `recall_at_k`. Memory as `nearest_neighbors` with k = the largest R.
    """
    return _retrieval(embeddings, labels, (), True, chunk_size)["map@r"]


def r_precision(embeddings, labels, *, chunk_size: Optional[int] = None) -> float:
    """R-Precision (Musgrave et al. 2020): the fraction of same-class images among a query's R nearest neighbours,
    R being the number of other images of its class; the mean over queries.

    Args / Raises: as `recall_at_k`. Memory as `nearest_neighbors` with k = the largest R.
    """
    return _retrieval(embeddings, labels, (), True, chunk_size)["r_precision"]


def retrieval_metrics(embeddings, labels, ks: Iterable[int] = PAPER_RECALL_KS, *, with_map: bool = True,
                      chunk_size: Optional[int] = None) -> Dict[str, float]:
    """Recall@K for every K, MAP@R and R-Precision in ONE chunked pass.

    Returns:
      {"recall@K": ..., "map@r": ..., "r_precision": ...} (the last two only if `with_map`).
    """
    return _retrieval(embeddings, labels, tuple(ks), with_map, chunk_size)


# ------------------------------------------------------------------------------------------------- clustering

def _comb2(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.sum(x * (x - 1.0) / 2.0))


def pairwise_f1(labels, clusters) -> float:
    """F1 of the pairwise decisions "same cluster" vs "same class" (official `compute_clutering_metric`).

    With n_ij = images of class i in cluster j (contingency table), a_i = class sizes, b_j = cluster sizes:
    TP = sum C(n_ij, 2), TP + FP = sum C(b_j, 2), TP + FN = sum C(a_i, 2); P = TP / (TP + FP), R = TP / (TP + FN),
    F1 = 2PR / (P + R). O(N + number of non-empty cells), no pair loops. F1 = 0 when no pair is positive.

    Example: labels [0, 0, 1, 1], clusters [0, 0, 0, 1]: TP = 1, TP + FP = 3, TP + FN = 2, P = 1/3, R = 1/2,
    F1 = 0.4.
    """
    from sklearn.metrics.cluster import contingency_matrix

    labels, clusters = np.asarray(labels), np.asarray(clusters)
    if labels.shape != clusters.shape or labels.ndim != 1:
        raise ValueError(f"labels and clusters must be 1-D of equal length, got {labels.shape} and {clusters.shape}")
    table = contingency_matrix(labels, clusters, sparse=True)
    tp = _comb2(table.data)
    tp_fp = _comb2(np.asarray(table.sum(axis=0)).ravel())
    tp_fn = _comb2(np.asarray(table.sum(axis=1)).ravel())
    if tp == 0.0 or tp_fp == 0.0 or tp_fn == 0.0:
        return 0.0
    precision, recall = tp / tp_fp, tp / tp_fn
    return float(2.0 * precision * recall / (precision + recall))


def _kmeans_mode(kmeans: str, n_clusters: int) -> str:
    """"full" or "minibatch" for a `kmeans` setting ("auto" decides by the number of clusters)."""
    if kmeans not in KMEANS_MODES:
        raise ValueError(f"kmeans={kmeans!r} is unknown; expected one of {', '.join(KMEANS_MODES)}")
    if kmeans == "auto":
        return "full" if n_clusters <= AUTO_FULL_KMEANS_MAX_CLUSTERS else "minibatch"
    return kmeans


def cluster(embeddings, n_clusters: int, *, kmeans: str = "auto", seed: int = OFFICIAL_KMEANS_SEED,
            n_init: int = OFFICIAL_KMEANS_RESTARTS, batch_size: int = 4096) -> np.ndarray:
    """k-means cluster ids [N] of the embeddings (scikit-learn, seeded); by default the official protocol.

    Args:
      embeddings: float [N, E], L2-normalized.
      n_clusters: k, 1..N.
      kmeans: "auto" (default): "full" up to AUTO_FULL_KMEANS_MAX_CLUSTERS = 1000 clusters, else "minibatch".
        "full": `sklearn.cluster.KMeans` (Lloyd, k-means++ seeding) - the official choice; one run took ~8
        CPU-seconds at CUB size (5,924 x 512, k = 100), ten restarts take ten times that; its k-means++ seeding is
        sequential over the k centres, and one run did not finish within 10 minutes at SOP size (60,502 x 512,
        k = 11,316) on the 2-core development CPU.
        "minibatch": `MiniBatchKMeans` with random seeding (k-means++ seeding is as slow there), 44-100 s at SOP
        size on the same CPU depending on its load: the feasible setting (tools/benchmark_eval.py). Not the
        official algorithm; `clustering_protocol` says so under every table.
      seed: random_state (official: 1).
      n_init: restarts, the one with the lowest inertia is kept (official: 10, scikit-learn's default when the
        official code ran; since scikit-learn 1.4 the default is 1 for k-means++, hence the explicit value).
        Fewer restarts trade a biased-low, noisier NMI/F1 for time (see README "Evaluation").
      batch_size: mini-batch size for "minibatch".
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = np.asarray(embeddings, dtype=np.float32)
    if not isinstance(n_clusters, (int, np.integer)) or not 1 <= n_clusters <= len(x):
        raise ValueError(f"n_clusters must lie in 1..N = {len(x)}, got {n_clusters!r}")
    if isinstance(n_init, bool) or not isinstance(n_init, (int, np.integer)) or n_init < 1:
        raise ValueError(f"n_init (k-means restarts) must be an integer >= 1, got {n_init!r}")
    kmeans = _kmeans_mode(kmeans, n_clusters)
    if kmeans == "full":
        model = KMeans(n_clusters=int(n_clusters), n_init=n_init, random_state=seed)
    else:
        model = MiniBatchKMeans(n_clusters=int(n_clusters), init="random", n_init=n_init, random_state=seed,
                                batch_size=batch_size)
    return model.fit_predict(x).astype(np.int64)


def clustering_scores(labels, clusters) -> Tuple[float, float]:
    """(NMI, F1) of a clustering against the labels.

    NMI = I(labels; clusters) / mean(H(labels), H(clusters)) (scikit-learn `normalized_mutual_info_score`,
    arithmetic mean, as the official `compute_clutering_metric`: 2 I / (H_1 + H_2)); F1 as `pairwise_f1`.
    """
    from sklearn.metrics import normalized_mutual_info_score

    labels, clusters = np.asarray(labels), np.asarray(clusters)
    if labels.shape != clusters.shape or labels.ndim != 1:
        raise ValueError(f"labels and clusters must be 1-D of equal length, got {labels.shape} and {clusters.shape}")
    nmi = normalized_mutual_info_score(labels, clusters, average_method="arithmetic")
    return float(nmi), pairwise_f1(labels, clusters)


def nmi_f1(embeddings, labels, n_clusters: Optional[int] = None, seed: int = OFFICIAL_KMEANS_SEED, *,
           kmeans: str = "auto", n_init: int = OFFICIAL_KMEANS_RESTARTS) -> Tuple[float, float]:
    """NMI and F1 of k-means on the embeddings (paper Tables 1-3; official `evaluate_cluster`).

    Default: the official protocol, `KMeans(n_clusters=k, n_init=10, random_state=1)`, best inertia of 10 runs.
    k defaults to the number of classes among `labels` (the official code hard-codes 98, Cars196's test classes,
    for every data set). The official code then relabels each cluster by its member nearest to the centre, which
    renames clusters and changes neither NMI nor F1. On the 2-core development CPU, CUB/Cars size (~6-8k x 512,
    k ~ 100) takes seconds per restart with "full"; SOP size (60,502 x 512, k = 11,316) needs "minibatch" ("auto"
    picks it), see `cluster`.

    Args:
      embeddings: float [N, E], L2-normalized.
      labels: int [N].
      n_clusters: k; None = number of classes.
      seed: k-means random_state (official 1).
      kmeans: "auto", "full" or "minibatch" (see `cluster`).
      n_init: k-means restarts (official 10).
    Returns:
      (nmi, f1), floats in [0, 1].
    Raises:
      ValueError: mismatched lengths, non-finite values, fewer than 2 classes, bad k or kmeans mode.
    """
    x, y = _check_inputs(embeddings, labels)
    num_classes = len(np.unique(y))
    if num_classes < 2:
        raise ValueError(f"NMI/F1 need at least 2 classes, got {num_classes}")
    clusters = cluster(x, num_classes if n_clusters is None else n_clusters, kmeans=kmeans, seed=seed,
                       n_init=n_init)
    return clustering_scores(y, clusters)


# ----------------------------------------------------------------------------------------------------- evaluate

def evaluate(embeddings, labels, recall_ks: Iterable[int] = PAPER_RECALL_KS, *, clustering: bool = True,
             with_map: bool = True, kmeans: str = "auto", n_clusters: Optional[int] = None,
             seed: int = OFFICIAL_KMEANS_SEED, n_init: int = OFFICIAL_KMEANS_RESTARTS,
             chunk_size: Optional[int] = None) -> Dict[str, float]:
    """All metrics of a test (or validation) split as one flat dict.

    Args:
      embeddings: float [N, E], L2-normalized.
      labels: int [N].
      recall_ks: Ks of Recall@K (per data set: `hdml_tf.data.datasets.recall_ks`); each in 1..N-1.
      clustering: compute NMI and F1 (k-means; the slow part at SOP size).
      with_map: compute MAP@R and R-Precision.
      kmeans, n_clusters, seed, n_init: see `nmi_f1` (default: the official protocol, 10 restarts, random_state
        1, k = number of classes).
      chunk_size: query rows per similarity chunk.
    Returns:
      {"nmi", "f1", "recall@K" for each K, "map@r", "r_precision"}: floats in [0, 1] (fractions, not percent).
    Raises:
      ValueError: as `recall_at_k` and `nmi_f1`.
    """
    out: Dict[str, float] = {}
    if clustering:
        out["nmi"], out["f1"] = nmi_f1(embeddings, labels, n_clusters, seed, kmeans=kmeans, n_init=n_init)
    out.update(_retrieval(embeddings, labels, tuple(recall_ks), with_map, chunk_size))
    return out


def clustering_protocol(n_clusters: int, *, n_init: int = OFFICIAL_KMEANS_RESTARTS,
                        seed: int = OFFICIAL_KMEANS_SEED, kmeans: str = "auto") -> str:
    """The line under a results table that says how its NMI and F1 were computed.

    Example: clustering_protocol(66) == "NMI/F1: k-means, best of 10 restarts, random_state 1, k = 66 (official
    protocol)". Any other setting is named as such, with the official one beside it.
    """
    mode = _kmeans_mode(kmeans, n_clusters)
    algorithm = "k-means" if mode == "full" else "mini-batch k-means (random seeding)"
    runs = f"best of {n_init} restarts" if n_init > 1 else "1 run"
    official = mode == "full" and n_init == OFFICIAL_KMEANS_RESTARTS and seed == OFFICIAL_KMEANS_SEED
    note = ("official protocol" if official else
            f"not the official protocol: k-means, best of {OFFICIAL_KMEANS_RESTARTS} restarts, random_state "
            f"{OFFICIAL_KMEANS_SEED}")
    return f"NMI/F1: {algorithm}, {runs}, random_state {seed}, k = {n_clusters:,} ({note})"


@dataclasses.dataclass(frozen=True)
class EvaluationProtocol:
    """How a split is scored: which metrics, and how NMI/F1 cluster (the official protocol by default).

    Attributes:
      recall_ks: K of Recall@K (per data set: `hdml_tf.data.datasets.recall_ks`); each in 1..N-1.
      clustering: compute NMI and F1 (k-means; the slow part at SOP size).
      with_map: compute MAP@R and R-Precision.
      kmeans: "auto", "full" or "minibatch" (`cluster`).
      n_clusters: k; None = the number of classes among the labels (the official code hard-coded 98).
      kmeans_restarts: restarts, the best inertia kept (official 10).
      kmeans_seed: k-means random_state (official 1).
      chunk_size: query rows per similarity chunk (None: DEFAULT_CHUNK_BYTES of similarities).
    """

    recall_ks: Tuple[int, ...] = PAPER_RECALL_KS
    clustering: bool = True
    with_map: bool = True
    kmeans: str = "auto"
    n_clusters: Optional[int] = None
    kmeans_restarts: int = OFFICIAL_KMEANS_RESTARTS
    kmeans_seed: int = OFFICIAL_KMEANS_SEED
    chunk_size: Optional[int] = None

    def metric_names(self) -> Tuple[str, ...]:
        """The keys `evaluate` returns under this protocol."""
        return tuple((["nmi", "f1"] if self.clustering else []) + [f"recall@{k}" for k in self.recall_ks]
                     + (["map@r", "r_precision"] if self.with_map else []))

    def evaluate(self, embeddings, labels) -> Dict[str, float]:
        """`evaluate` of the module with this protocol's settings."""
        return evaluate(embeddings, labels, tuple(self.recall_ks), clustering=self.clustering,
                        with_map=self.with_map, kmeans=self.kmeans, n_clusters=self.n_clusters,
                        seed=self.kmeans_seed, n_init=self.kmeans_restarts, chunk_size=self.chunk_size)

    def describe(self, num_classes: int) -> Optional[str]:
        """The `clustering_protocol` line for a split of `num_classes` classes (None without clustering)."""
        if not self.clustering:
            return None
        return clustering_protocol(self.n_clusters or num_classes, n_init=self.kmeans_restarts,
                                   seed=self.kmeans_seed, kmeans=self.kmeans)


_COLUMN_TITLES = {"nmi": "NMI", "f1": "F1", "map@r": "MAP@R", "r_precision": "RP"}


def format_results(results: Mapping[str, Mapping[str, float]] | Mapping[str, float], *,
                   percent: bool = True, protocol: Optional[str] = None) -> str:
    """A paper-style table (values in %, like the paper) of one or several result dicts.

    Args:
      results: one dict from `evaluate`, or {row name: dict} for several rows (e.g. {"best": ..., "last": ...}).
      percent: print 100 x value with one decimal (the paper's tables), else 4 decimals.
      protocol: a line printed under the table, e.g. `clustering_protocol(k)`, so every table says how its NMI
        and F1 were computed.
    """
    if results and all(isinstance(v, (int, float, np.floating)) for v in results.values()):
        results = {"": results}
    keys = []
    for row in results.values():
        for key in row:
            if key not in keys and isinstance(row[key], (int, float, np.floating)):
                keys.append(key)
    order = ["nmi", "f1"] + sorted([k for k in keys if k.startswith("recall@")], key=lambda k: int(k[7:])) \
        + ["map@r", "r_precision"]
    keys = [k for k in order if k in keys] + [k for k in keys if k not in order]
    titles = [_COLUMN_TITLES.get(k, k.replace("recall@", "R@")) for k in keys]
    name_w = max([len(str(n)) for n in results] + [0])
    widths = [max(len(t), 6) for t in titles]
    lines = [" " * name_w + "".join(f"  {t:>{w}}" for t, w in zip(titles, widths))]
    for name, row in results.items():
        cells = []
        for k, w in zip(keys, widths):
            v = row.get(k)
            cells.append(f"  {'-':>{w}}" if v is None else
                         f"  {100 * v:>{w}.1f}" if percent else f"  {v:>{w}.4f}")
        lines.append(f"{str(name):<{name_w}}" + "".join(cells))
    if protocol:
        lines.append(protocol)
    return "\n".join(lines)
