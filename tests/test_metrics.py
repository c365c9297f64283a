"""Metrics: hand-worked examples, brute-force references, chunking and tie handling."""
import math

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from hdml_tf.evaluation import metrics as M


def _circle(degrees, exact=None):
    """Unit vectors at the given angles; `exact` maps an index to exact coordinates (for exact ties)."""
    x = np.stack([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))], axis=1)
    for i, xy in (exact or {}).items():
        x[i] = xy
    return x.astype(np.float32)


def _brute_force(x, y, ks):
    """Leave-one-out retrieval with an explicit loop and a full sort per query (lower index first on ties)."""
    s = x.astype(np.float32) @ x.astype(np.float32).T
    hits = {k: [] for k in ks}
    aps, rps = [], []
    for i in range(len(x)):
        order = [j for j in sorted(range(len(x)), key=lambda j: (-s[i, j], j)) if j != i]
        r = int(np.sum(y == y[i])) - 1
        if r == 0:
            continue
        rel = [y[j] == y[i] for j in order]
        for k in ks:
            hits[k].append(any(rel[:k]))
        found, ap = 0, 0.0
        for p in range(r):
            if rel[p]:
                found += 1
                ap += found / (p + 1)
        aps.append(ap / r)
        rps.append(found / r)
    out = {f"recall@{k}": float(np.mean(v)) for k, v in hits.items()}
    out.update({"map@r": float(np.mean(aps)), "r_precision": float(np.mean(rps))})
    return out


def _random_unit(n, e, seed):
    x = np.random.default_rng(seed).standard_normal((n, e)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------ hand-worked

# Six points on the unit circle, classes A = {0, 1, 2}, B = {3, 4, 5}; R = 2 for every query.
#   q0 (0 deg, A):  1 A, 3 B, 2 A, 5 B, 4 B   -> first positive rank 1, AP@R = (1/1 + 0)/2 = 0.5,  RP = 1/2
#   q1 (20, A):     0 A, 3 B, 2 A, ...        -> rank 1, AP 0.5,  RP 1/2
#   q2 (90, A):     3 B, 1 A, 0 A, 4 B, 5 B   -> rank 2, AP (0 + 1/2)/2 = 0.25, RP 1/2
#   q3 (50, B):     1 A, 2 A, 0 A, 4 B, 5 B   -> rank 4, AP 0, RP 0
#   q4 (180, B):    5 B, 2 A, 3 B, 1 A, 0 A   -> rank 1, AP 0.5,  RP 1/2
#   q5 (200, B):    4 B, 2 A, 3 B, 0 A, 1 A   -> rank 1, AP 0.5,  RP 1/2
SIX = _circle([0, 20, 90, 50, 180, 200], exact={0: (1, 0), 2: (0, 1), 4: (-1, 0)})
SIX_LABELS = np.array([0, 0, 0, 1, 1, 1])


def test_recall_map_rp_hand_worked():
    assert M.recall_at_k(SIX, SIX_LABELS, (1, 2, 3, 4)) == pytest.approx({1: 4 / 6, 2: 5 / 6, 3: 5 / 6, 4: 1.0})
    assert M.map_at_r(SIX, SIX_LABELS) == pytest.approx((0.5 + 0.5 + 0.25 + 0 + 0.5 + 0.5) / 6)
    assert M.r_precision(SIX, SIX_LABELS) == pytest.approx(2.5 / 6)


def test_tie_between_positive_and_negative_goes_to_lower_index():
    # (1, 0), (cos 30, sin 30), (0, 1), (-1, 0), labels [0, 0, 1, 1]. Query 2 sees point 1 (0.5), then points 0 and
    # 3 tied at exactly 0: point 0 (lower index, wrong class) ranks 2nd, its positive 3 ranks 3rd.
    x = _circle([0, 30, 90, 180], exact={0: (1, 0), 2: (0, 1), 3: (-1, 0)})
    y = np.array([0, 0, 1, 1])
    assert M.recall_at_k(x, y, (1, 2, 3)) == pytest.approx({1: 0.75, 2: 0.75, 3: 1.0})
    assert M.map_at_r(x, y) == pytest.approx(0.75)
    assert M.r_precision(x, y) == pytest.approx(0.75)


def test_duplicates_ranked_by_index():
    # Points 0-2 identical at (1, 0), points 3-5 identical at (0, 1); labels [0, 1, 1, 0, 0, 1].
    #   q0: 1, 2, 3, 4, 5 -> rank 3, AP 0,    RP 0     q3: 4, 5, 0, 1, 2 -> rank 1, AP 0.5, RP 1/2
    #   q1: 0, 2, 3, 4, 5 -> rank 2, AP 0.25, RP 1/2   q4: 3, 5, 0, 1, 2 -> rank 1, AP 0.5, RP 1/2
    #   q2: 0, 1, 3, 4, 5 -> rank 2, AP 0.25, RP 1/2   q5: 3, 4, 0, 1, 2 -> rank 4, AP 0,   RP 0
    x = np.array([[1, 0]] * 3 + [[0, 1]] * 3, np.float32)
    y = np.array([0, 1, 1, 0, 0, 1])
    assert M.recall_at_k(x, y, (1, 2, 3, 4)) == pytest.approx({1: 2 / 6, 2: 4 / 6, 3: 5 / 6, 4: 1.0})
    assert M.map_at_r(x, y) == pytest.approx(1.5 / 6)
    assert M.r_precision(x, y) == pytest.approx(2 / 6)
    idx, sim = M.nearest_neighbors(x, 3)
    np.testing.assert_array_equal(idx, [[1, 2, 3], [0, 2, 3], [0, 1, 3], [4, 5, 0], [3, 5, 0], [3, 4, 0]])
    np.testing.assert_array_equal(sim, [[1, 1, 0]] * 6)


def test_nmi_f1_hand_worked():
    labels, clusters = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])
    # H(labels) = ln 2; H(clusters) = -(3/4 ln 3/4 + 1/4 ln 1/4); contingency [[2, 0], [1, 1]] (class x cluster):
    # I = 2/4 ln(4/3) + 1/4 ln(2/3) + 1/4 ln 2; NMI = 2 I / (H1 + H2).
    h1 = math.log(2)
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    # Pairs: TP = C(2,2) = 1; same cluster C(3,2) = 3; same class 2 x C(2,2) = 2 -> P = 1/3, R = 1/2, F1 = 0.4.
    nmi, f1 = M.clustering_scores(labels, clusters)
    assert nmi == pytest.approx(2 * mi / (h1 + h2))
    assert f1 == pytest.approx(0.4)
    assert M.clustering_scores(labels, np.array([5, 5, 7, 7])) == pytest.approx((1.0, 1.0))
    assert M.clustering_scores(labels, np.array([0, 1, 0, 1]))[0] == pytest.approx(0.0)
    assert M.pairwise_f1(labels, np.array([0, 1, 2, 3])) == 0.0  # no pair in a common cluster


def test_nmi_matches_sklearn_and_f1_matches_pair_loop():
    rng = np.random.default_rng(1)
    labels, clusters = rng.integers(0, 6, 80), rng.integers(0, 9, 80)
    nmi, f1 = M.clustering_scores(labels, clusters)
    assert nmi == pytest.approx(normalized_mutual_info_score(labels, clusters))
    tp = fp = fn = 0
    for i in range(80):
        for j in range(i + 1, 80):
            same_class, same_cluster = labels[i] == labels[j], clusters[i] == clusters[j]
            tp += same_class and same_cluster
            fp += same_cluster and not same_class
            fn += same_class and not same_cluster
    p, r = tp / (tp + fp), tp / (tp + fn)
    assert f1 == pytest.approx(2 * p * r / (p + r))


def test_nmi_f1_uses_seeded_kmeans_with_k_classes():
    x, y = _random_unit(90, 8, 2), np.repeat(np.arange(6), 15)
    clusters = KMeans(n_clusters=6, n_init=1, random_state=3).fit_predict(x)
    nmi, _ = M.nmi_f1(x, y, seed=3, n_init=1)
    assert nmi == pytest.approx(normalized_mutual_info_score(y, clusters))
    assert M.nmi_f1(x, y, seed=3) == M.nmi_f1(x, y, seed=3)
    nmi_mb, f1_mb = M.nmi_f1(x, y, seed=3, kmeans="minibatch")
    assert 0.0 <= nmi_mb <= 1.0 and 0.0 <= f1_mb <= 1.0


def _blobs():
    """12 overlapping Gaussian blobs in 8-d (fixed), L2-normalized float32 as the metrics see them: one k-means run
    from random_state 1 scores NMI 0.967 here, the best of 10 restarts recovers the blobs exactly (NMI 1)."""
    from sklearn.datasets import make_blobs
    x, y = make_blobs(n_samples=300, centers=12, n_features=8, cluster_std=2.0, random_state=0)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_default_nmi_f1_are_the_official_protocol_exactly():
    """Official evaluate_cluster: KMeans(n_clusters=k, random_state=1) with scikit-learn's n_init=10 of its time,
    k = the number of classes; the default here must give exactly what that gives."""
    x, y = _blobs()
    official = KMeans(n_clusters=12, n_init=10, random_state=1).fit_predict(x)
    nmi, f1 = M.nmi_f1(x, y)
    assert nmi == normalized_mutual_info_score(y, official)
    assert f1 == M.pairwise_f1(y, official)
    assert M.evaluate(x, y, (1,))["nmi"] == nmi and M.evaluate(x, y, (1,))["f1"] == f1
    # The option for fewer restarts is one run from the same random_state, and here it is worse (1 run: 0.967).
    one = KMeans(n_clusters=12, n_init=1, random_state=1).fit_predict(x)
    assert M.nmi_f1(x, y, n_init=1)[0] == normalized_mutual_info_score(y, one) < nmi
    with pytest.raises(ValueError, match="n_init .* must be an integer >= 1"):
        M.nmi_f1(x, y, n_init=0)


def test_every_table_can_say_its_protocol():
    assert M.clustering_protocol(66) == ("NMI/F1: k-means, best of 10 restarts, random_state 1, k = 66 (official "
                                         "protocol)")
    assert M.clustering_protocol(100, n_init=1) == (
        "NMI/F1: k-means, 1 run, random_state 1, k = 100 (not the official protocol: k-means, best of 10 restarts, "
        "random_state 1)")
    assert M.clustering_protocol(11316, n_init=3).startswith(
        "NMI/F1: mini-batch k-means (random seeding), best of 3 restarts, random_state 1, k = 11,316 (not the")
    x, y = _blobs()
    table = M.format_results({"ours": M.evaluate(x, y, (1,))}, protocol=M.clustering_protocol(12))
    assert table.splitlines()[-1] == M.clustering_protocol(12) and table.count("\n") == 2


# ------------------------------------------------------------------------------------------ references

def test_recall_map_match_brute_force_with_duplicates_and_lone_queries():
    x, y = _random_unit(150, 6, 0), np.random.default_rng(0).integers(0, 25, 150)
    x[[10, 40, 70]] = x[5]  # exact duplicates: ties
    y[149] = 999  # a lone query (no other image of its class) is left out
    expected = _brute_force(x, y, (1, 2, 4, 8))
    got = M.retrieval_metrics(x, y, (1, 2, 4, 8))
    assert got == pytest.approx(expected, abs=1e-12)


def test_chunked_equals_unchunked():
    x, y = _random_unit(120, 16, 4), np.random.default_rng(4).integers(0, 12, 120)
    reference = M.retrieval_metrics(x, y, (1, 5, 10), chunk_size=120)
    idx_ref, sim_ref = M.nearest_neighbors(x, 7, chunk_size=120)
    for chunk in (1, 17):
        assert M.retrieval_metrics(x, y, (1, 5, 10), chunk_size=chunk) == reference
        idx, sim = M.nearest_neighbors(x, 7, chunk_size=chunk)
        np.testing.assert_array_equal(idx, idx_ref)
        # A 1-row matmul may round differently from a 120-row one (BLAS kernels differ) in the last bit.
        np.testing.assert_allclose(sim, sim_ref, rtol=0, atol=1e-6)


def test_neighbours_deterministic_with_many_ties_in_two_stage_top_k():
    # 12 distinct vectors each repeated 20 times in shuffled order: ties straddle the k-th place in most rows and
    # the two-stage (block) top-k is used (N = 240, k = 5 -> blocks of 6).
    rng = np.random.default_rng(5)
    x = _random_unit(12, 4, 5)[rng.integers(0, 12, 240)]
    s = x @ x.T
    idx, _ = M.nearest_neighbors(x, 5, chunk_size=64)
    for i in range(len(x)):
        order = [j for j in np.lexsort((np.arange(len(x)), -s[i])) if j != i][:5]
        assert list(idx[i]) == order
    assert M._block_size(240, 6) > 1


def test_evaluate_flat_keys_and_defaults():
    x, y = _random_unit(60, 8, 6), np.repeat(np.arange(6), 10)
    res = M.evaluate(x, y, (1, 2, 4, 8))
    assert list(res) == ["nmi", "f1", "recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"]
    assert all(0.0 <= v <= 1.0 for v in res.values())
    from hdml_tf.data import datasets  # the one Recall@K table
    assert datasets.recall_ks("cub200") == (1, 2, 4, 8, 16, 32)
    assert datasets.recall_ks("Stanford-Online-Products") == (1, 10, 100, 1000)
    assert datasets.recall_ks("sop", num_images=500) == (1, 10, 100)
    assert datasets.recall_ks("glyphs") == (1, 2, 4, 8)
    table = M.format_results({"best": res, "last": res})
    assert "R@1" in table and "MAP@R" in table and table.count("\n") == 2


def test_unnormalized_rows_are_normalized():
    x, y = _random_unit(30, 5, 7), np.repeat(np.arange(6), 5)
    scaled = x * np.linspace(0.5, 3.0, 30)[:, None].astype(np.float32)
    assert M.retrieval_metrics(scaled, y, (1, 2)) == pytest.approx(M.retrieval_metrics(x, y, (1, 2)))


@pytest.mark.parametrize("call, message", [
    (lambda: M.recall_at_k(np.eye(3), [0, 1], (1,)), "differ in length"),
    (lambda: M.recall_at_k(np.eye(3), [0, 0, 1], (3,)), "K <= N-1"),
    (lambda: M.recall_at_k(np.eye(3), [0, 0, 1], (0,)), "K >= 1"),
    (lambda: M.recall_at_k(np.eye(3), [0, 1, 2], (1,)), "no class has 2"),
    (lambda: M.recall_at_k(np.full((3, 2), np.nan), [0, 0, 1], (1,)), "NaN"),
    (lambda: M.recall_at_k(np.ones(3), [0, 0, 1], (1,)), "[N, E]"),
    (lambda: M.nmi_f1(np.eye(3), [0, 0, 0]), "at least 2 classes"),
    (lambda: M.nmi_f1(np.eye(3), [0, 0, 1], kmeans="fast"), "kmeans="),
    (lambda: M.nearest_neighbors(np.eye(3), 3), "k <= N-1"),
    (lambda: M.retrieval_metrics(np.eye(3), [0, 0, 1], (1,), chunk_size=0), "chunk_size"),
])
def test_errors_are_one_line_value_errors(call, message):
    with pytest.raises(ValueError, match=None) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)
