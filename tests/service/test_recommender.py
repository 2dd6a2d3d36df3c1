"""The recommend path without the engine: exact top-k on the backbone's device (``scoring="device"``) returns what
the faiss index returns, with exclusion, k past what is left, and rows appended or overwritten by apply_rows; and
``auto`` picks the device only on CUDA with an exact index; user vectors of a batch split into length groups come
back in the batch's order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.srs import SRSConfig, build_backbone, pad_left
from service.index import IndexConfig
from service.recommender import Recommender, RecommenderSpec, left_padded, resolve_scoring

N_ITEMS, DIM, MAX_LEN = 300, 16, 12


def spec(
    scoring: str,
    backbone: str = "sasrec",
    kind: str = "flat",
    max_len: int = MAX_LEN,
    device: str = "cpu",
    cuda_graphs: bool = True,
) -> RecommenderSpec:
    torch.manual_seed(0)
    cfg = SRSConfig(n_items=N_ITEMS, hidden=DIM, n_layers=1, dropout=0.0, max_len=max_len)
    body = {
        k: v
        for k, v in build_backbone(backbone, cfg).state_dict().items()
        if not k.startswith("item_encoder.")
    }
    table = np.random.default_rng(0).standard_normal((N_ITEMS + 1, DIM)).astype(np.float32)
    table[0] = 0.0
    return RecommenderSpec(
        bundle_id="t",
        backbone=backbone,
        srs_config=cfg,
        srs_body=body,
        table=table,
        index=IndexConfig(kind=kind, scoring=scoring),
        device=device,
        threads=None,
        cuda_graphs=cuda_graphs,
    )


def requests(rng: np.random.Generator, n: int, top: int = N_ITEMS) -> list:
    out = []
    for _ in range(n):
        rows = rng.integers(1, top + 1, size=int(rng.integers(1, 3 * MAX_LEN))).tolist()
        out.append((rows, int(rng.choice([1, 5, 10, 40, top])), bool(rng.integers(0, 2))))
    return out


def assert_near(got, want, tol: float = 1e-4) -> None:
    """``assert_same`` for results computed in another order of sums (e.g. another padded width on a GPU):
    scores equal within ``tol``, and rows equal except where two rows' scores tie within ``tol``."""
    assert len(got) == len(want)
    for (g_rows, g_scores, g_n), (w_rows, w_scores, w_n) in zip(got, want):
        assert len(g_rows) == len(w_rows) and g_n == w_n
        np.testing.assert_allclose(g_scores, w_scores, rtol=0, atol=tol)
        for i, (g, w) in enumerate(zip(g_rows, w_rows)):
            if g != w:  # a near-tie ordered the other way, or swapped across the k boundary
                j = w_rows.index(g) if g in w_rows else len(w_rows) - 1
                assert abs(w_scores[j] - w_scores[i]) <= 2 * tol, (i, g, w)


def assert_same(got, want) -> None:
    assert len(got) == len(want)
    for (g_rows, g_scores, g_n), (w_rows, w_scores, w_n) in zip(got, want):
        assert g_rows == w_rows and g_n == w_n
        np.testing.assert_allclose(g_scores, w_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_device_scoring_returns_what_the_faiss_index_returns(backbone):
    faiss_rec, device_rec = Recommender(spec("faiss", backbone)), Recommender(spec("device", backbone))
    assert (faiss_rec.scoring, device_rec.scoring) == ("faiss", "device")
    assert device_rec.index_info()["scoring"] == "device"
    rng = np.random.default_rng(1)
    for _ in range(5):
        batch = requests(rng, 24)
        got, want = device_rec.serve_batch(batch), faiss_rec.serve_batch(batch)
        assert_same(got, want)
        for (rows, k, exclude), (r_rows, _, excluded) in zip(batch, got):
            seen = set(rows) if exclude else set()
            assert excluded == len(seen) and not seen & set(r_rows) and 0 not in r_rows
            assert len(r_rows) == min(k, N_ITEMS - len(seen))  # k past what is left: all that is left

    # Rows overwritten and appended between batches: both paths read the new vectors at once.
    new = np.random.default_rng(2).standard_normal((6, DIM)).astype(np.float32)
    rows = [5, 17, N_ITEMS + 1, N_ITEMS + 2, N_ITEMS + 3, 5]  # row 5 twice: the last one wins
    for rec in (faiss_rec, device_rec):
        rec.apply_rows(rows, new)
    batch = requests(rng, 32, top=N_ITEMS + 3) + [([N_ITEMS + 2], N_ITEMS + 3, True)]
    got = device_rec.serve_batch(batch)
    assert_same(got, faiss_rec.serve_batch(batch))
    assert len(got[-1][0]) == N_ITEMS + 2 and N_ITEMS + 2 not in got[-1][0]
    assert N_ITEMS + 3 in got[-1][0]


def test_auto_scoring_picks_the_device_only_on_cuda_with_an_exact_index():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_scoring("auto", cuda, exact=True) == "device"
    assert resolve_scoring("auto", cuda, exact=False) == "faiss"
    assert resolve_scoring("auto", cpu, exact=True) == "faiss"
    assert resolve_scoring("device", cpu, exact=False) == "device"
    assert resolve_scoring("faiss", cuda, exact=True) == "faiss"
    assert Recommender(spec("auto")).scoring == "faiss"  # this machine's CPU
    # Device scoring over an approximate kind is exact and skips the recall measurement.
    rec = Recommender(spec("device", kind="hnsw"))
    assert rec.index_info()["kind"] == "hnsw" and rec.index_info()["recall_at_10"] is None
    with pytest.raises(ValueError, match="scoring must be"):
        IndexConfig(scoring="gpu")


def test_a_forward_that_cannot_be_captured_runs_eagerly_from_then_on(caplog):
    rec = Recommender(spec("device"))
    want = rec.serve_batch(requests(np.random.default_rng(9), 8))

    class Uncapturable:
        def users(self, *args):
            raise RuntimeError("operation not permitted when stream is capturing")

    rec.graphs = Uncapturable()  # what a failed capture on a GPU looks like to the recommender
    with caplog.at_level("WARNING", logger="service.recommender"):
        got = rec.serve_batch(requests(np.random.default_rng(9), 8))
    assert rec.graphs is None and "CUDA graphs off" in caplog.text
    assert_same(got, want)
    assert rec.index_info()["cuda_graphs"] is False


def test_left_padded_is_pad_left_with_room_to_spare():
    rng = np.random.default_rng(8)
    seqs = [rng.integers(1, 99, size=n).tolist() for n in (3, 1, 7, 0, 7, 2)]
    want = pad_left(seqs, max_len=0).numpy()
    np.testing.assert_array_equal(left_padded(seqs), want)
    wide = left_padded(seqs, width=10, rows=8)  # a CUDA graph's padded shape
    assert wide.shape == (8, 10) and not wide[6:].any() and not wide[:, :3].any()
    np.testing.assert_array_equal(wide[:6, 3:], want)


def test_histories_of_very_different_lengths_run_as_groups_and_come_back_in_order():
    rec = Recommender(spec("faiss", max_len=200))
    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, N_ITEMS + 1, size=n).tolist() for n in (2, 180, 3, 150, 1, 200)]
    batched = rec.users(seqs)  # on the CPU: one backbone call per group of similar lengths
    alone = torch.cat([rec.users([s]) for s in seqs])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


def grown(s: RecommenderSpec, rows: list[int], vectors: np.ndarray) -> RecommenderSpec:
    """``s`` with ``vectors`` written at ``rows`` of its table (appended past its end): a fresh build's input."""
    table = np.zeros((max(len(s.table), max(rows) + 1), s.table.shape[1]), dtype=np.float32)
    table[: len(s.table)] = s.table
    table[rows] = vectors
    return dataclasses.replace(s, table=table)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "bert4rec"])
def test_a_catalog_grown_in_place_answers_as_a_recommender_built_on_the_grown_table(backbone):
    """apply_rows appends rows without rebuilding the backbone (``items_grew``): Bert4Rec's [mask] id moves past
    the new items, so a history holding the old [mask] id (now an item) reads that item's vector."""
    base = spec("device", backbone)
    rec = Recommender(base)
    model = rec.model
    rng = np.random.default_rng(4)
    new = rng.standard_normal((300, DIM)).astype(np.float32)  # past _Rows' spare capacity: the storage moves
    rows = list(range(N_ITEMS + 1, N_ITEMS + 301))
    for i in range(0, 300, 100):
        rec.apply_rows(rows[i : i + 100], new[i : i + 100])
    assert rec.model is model and rec.model.item_encoder.n_items == N_ITEMS + 300
    fresh = Recommender(grown(base, rows, new))
    batch = requests(rng, 40, top=N_ITEMS + 300) + [
        ([N_ITEMS + 1], 10, False),
        ([3, N_ITEMS + 1, 7], 10, True),
    ]
    assert_same(rec.serve_batch(batch), fresh.serve_batch(batch))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_cuda_graph_replays_answer_as_the_eager_forward(backbone):
    """Batches of every bucket (and past the largest, in parts), before and after rows are appended within the
    table's capacity (no new capture) and past it (the storage moves: captured again), and Bert4Rec's [mask] id
    change: the graphed forward gives the eager one's users and recommendations."""
    graphed = Recommender(spec("device", backbone, max_len=50, device="cuda"))
    eager = Recommender(spec("device", backbone, max_len=50, device="cuda", cuda_graphs=False))
    assert graphed.graphs is not None and eager.graphs is None and graphed.index_info()["cuda_graphs"]
    graphed.graphs.max_batch = 64

    def check(top: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for n in (1, 3, 17, 64, 150):
            batch = requests(rng, n, top=top)
            seqs = [tuple(r[-graphed.window :]) for r, _, _ in batch]
            torch.testing.assert_close(graphed.users(seqs), eager.users(seqs), rtol=1e-4, atol=1e-4)
            assert_near(graphed.serve_batch(batch), eager.serve_batch(batch))

    check(N_ITEMS, 5)
    captured = graphed.graphs.captures
    assert captured > 0
    check(N_ITEMS, 5)
    assert graphed.graphs.captures == captured  # the same batches again: replays only
    new = np.random.default_rng(6).standard_normal((300, DIM)).astype(np.float32)
    for rows, part in (
        ([N_ITEMS + 1, N_ITEMS + 2], new[:2]),
        (list(range(N_ITEMS + 3, N_ITEMS + 301)), new[2:]),
    ):
        for rec in (graphed, eager):
            rec.apply_rows(rows, part)
        check(rows[-1], 7)
    assert graphed.graphs.captures > captured
