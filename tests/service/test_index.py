"""The faiss index: recall@10 of the approximate kinds vs exact, exclusion correctness when k + excluded exceeds
what faiss returns first, upserts that leave no old vector, and row 0 never returned."""

from __future__ import annotations

import numpy as np
import pytest

from service.index import IndexConfig, ItemIndex, recall_at_k

N, D = 4000, 32


def clustered(n: int = N, d: int = D, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, d)).astype(np.float32)
    x = centers[rng.integers(0, 64, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return np.concatenate([np.zeros((1, d), np.float32), x])


def queries(items: np.ndarray, m: int = 200, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return items[rng.integers(1, len(items), (m, 4))].mean(1) + 0.2 * rng.standard_normal((m, items.shape[1]))


@pytest.fixture(scope="module")
def data():
    items = clustered()
    return items, queries(items).astype(np.float32)


@pytest.mark.parametrize("kind,floor", [("flat", 1.0), ("ivf", 0.9), ("hnsw", 0.9)])
def test_recall_at_10_against_exact(data, kind, floor):
    items, q = data
    index = ItemIndex(items, IndexConfig(kind=kind))
    assert index.kind == kind and index.size == N
    assert recall_at_k(index, q, 10) >= floor
    for res in index.search(q, 10):
        assert len(res.rows) == 10 and 0 not in res.rows and np.all(np.diff(res.scores) <= 1e-6)


def test_auto_picks_exact_below_the_threshold():
    items = clustered(500)
    assert ItemIndex(items, IndexConfig(kind="auto", approx_threshold=1000)).kind == "flat"
    assert ItemIndex(items, IndexConfig(kind="auto", approx_threshold=100, approx_kind="ivf")).kind == "ivf"


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_exclusion_stays_correct_when_most_top_results_are_excluded(data, kind):
    items, q = data
    index = ItemIndex(items, IndexConfig(kind=kind, ivf_nprobe=1, hnsw_ef_search=16))
    rng = np.random.default_rng(3)
    exact_top = index.search_exact(q[:20], 300)
    # exclude the 290 best rows of each query and 1500 random others: k + |excluded| >> what faiss returns first
    excl = [set(t.rows[:290].tolist()) | set(rng.integers(1, N + 1, 1500).tolist()) for t in exact_top]
    got = index.search(q[:20], 10, excl)
    want = index.search_exact(q[:20], 10, excl)
    for g, w, e in zip(got, want, excl):
        assert len(g.rows) == 10 and not set(g.rows.tolist()) & e and 0 not in g.rows
        if kind == "flat":
            assert g.rows.tolist() == w.rows.tolist()
            np.testing.assert_allclose(g.scores, w.scores, rtol=1e-5)
    # asking for more than is left returns everything that is left
    almost_all = set(range(1, N + 1)) - {5, 9, 11}
    res = index.search(q[:1], 10, [almost_all])[0]
    assert sorted(res.rows.tolist()) == [5, 9, 11]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_upsert_replaces_old_vectors_and_appends_rows(kind):
    items = clustered(600, seed=5)
    index = ItemIndex(items, IndexConfig(kind=kind, ivf_nprobe=64))
    far = np.full((1, D), 50.0, np.float32)
    index.upsert([7], far)  # row 7 moves far away
    assert index.search(far, 1)[0].rows.tolist() == [7]
    old_query = items[7:8]
    assert 7 not in index.search_exact(old_query, 5)[0].rows.tolist()
    new = np.full((2, D), -50.0, np.float32)
    new[1] *= 1.01
    index.upsert([601, 602], new)
    assert index.size == 602 and index.search(new[:1], 2)[0].rows.tolist() == [602, 601]
    index.upsert([602], items[1:2])  # back to an ordinary vector: the -50 vector must be gone
    top = index.search(new[:1], 3)[0].rows.tolist()
    assert top[0] == 601 and 602 not in top[:1]
    with pytest.raises(ValueError, match="continue"):
        index.upsert([700], far)
    with pytest.raises(ValueError, match="padding"):
        index.upsert([0], far)


def test_hnsw_rebuilds_after_many_stale_vectors():
    items = clustered(300, seed=7)
    index = ItemIndex(items, IndexConfig(kind="hnsw"))
    rng = np.random.default_rng(0)
    for _ in range(4):
        index.upsert(np.arange(1, 301), rng.standard_normal((300, D)).astype(np.float32))
    assert index.describe()["stale"] < 1000  # rebuilt
    assert recall_at_k(index, queries(index.vectors(), 50), 10) >= 0.9
