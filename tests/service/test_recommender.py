"""The recommend path without the engine: exact top-k on the backbone's device (``scoring="device"``) returns what
the faiss index returns, with exclusion, k past what is left, and rows appended or overwritten by apply_rows; and
``auto`` picks the device only on CUDA with an exact index; user vectors of a batch split into length groups come
back in the batch's order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.srs import SRSConfig, build_backbone
from service.index import IndexConfig
from service.recommender import Recommender, RecommenderSpec, resolve_scoring

N_ITEMS, DIM, MAX_LEN = 300, 16, 12


def spec(
    scoring: str, backbone: str = "sasrec", kind: str = "flat", max_len: int = MAX_LEN
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
        device="cpu",
        threads=None,
    )


def requests(rng: np.random.Generator, n: int, top: int = N_ITEMS) -> list:
    out = []
    for _ in range(n):
        rows = rng.integers(1, top + 1, size=int(rng.integers(1, 3 * MAX_LEN))).tolist()
        out.append((rows, int(rng.choice([1, 5, 10, 40, top])), bool(rng.integers(0, 2))))
    return out


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


def test_histories_of_very_different_lengths_run_as_groups_and_come_back_in_order():
    rec = Recommender(spec("faiss", max_len=200))
    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, N_ITEMS + 1, size=n).tolist() for n in (2, 180, 3, 150, 1, 200)]
    batched = rec.users(seqs)  # on the CPU: one backbone call per group of similar lengths
    alone = torch.cat([rec.users([s]) for s in seqs])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
