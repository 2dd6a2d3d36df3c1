"""k-core, chronological order with a stable tie-break, re-indexing, leave-one-out, stats and the prepare cache."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pytest

from training import split as split_mod
from training.data.dataset import PreparedDataset, RawDataset
from training.split import SplitConfig, build, format_stats, kcore_mask, prepare, tail_mask


def raw_of(rows: list[tuple[str, str, float]], items=None, name: str = "toy") -> RawDataset:
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]).astype({"ts": "float64"})
    return RawDataset(name, df, items or {})


def ext(ds: PreparedDataset, seq: np.ndarray) -> list[str]:
    return [ds.item_ids[i] for i in seq]


def test_config_validation():
    assert SplitConfig() == SplitConfig(user_core=5, item_core=5, max_users=None)
    for bad in ({"user_core": 2}, {"item_core": 0}, {"max_users": 0}):
        with pytest.raises(ValueError):
            SplitConfig(**bad)


def test_kcore_needs_several_passes():
    # user_core=3, item_core=2. Pass 1 drops U4 (2 rows); that leaves d and e with 1 user each, dropped in
    # pass 2; that leaves U3 with 2 rows, dropped in pass 3; pass 4 finds nothing. One pass would keep U3, d, e.
    seqs = {"U1": "abc", "U2": "abc", "U3": "abd", "U4": "de", "U5": "abce"}
    rows = [(u, i, float(t)) for u, s in seqs.items() for t, i in enumerate(s)]
    u, _ = pd.factorize(pd.Series([r[0] for r in rows]))
    i, _ = pd.factorize(pd.Series([r[1] for r in rows]))
    keep, passes = kcore_mask(u, i, user_core=3, item_core=2)
    kept = {(rows[k][0], rows[k][1]) for k in np.flatnonzero(keep)}
    assert kept == {(x, y) for x in ("U1", "U2", "U5") for y in "abc"}
    assert passes == 4

    ds = build(raw_of(rows), SplitConfig(user_core=3, item_core=2))
    assert ds.user_ids == ["U1", "U2", "U5"] and ds.item_ids == ["<pad>", "a", "b", "c"]
    assert ds.stats["kcore"]["removed"] == {"users": 2, "items": 2, "interactions": 6}
    assert ds.stats["raw"] == {"users": 5, "items": 5, "interactions": 15}


def test_chronological_order_stable_ties_and_ids():
    rows = [
        ("v", "z", 5.0),
        ("u", "c", 2.0),
        ("u", "a", 1.0),
        ("v", "y", 5.0),  # same ts as ("v","z"): source order z, y must be kept
        ("u", "b", 2.0),  # same ts as ("u","c"): c came first in the file
        ("v", "x", 1.0),
        ("u", "d", 9.0),
    ]
    ds = build(raw_of(rows), SplitConfig(user_core=3, item_core=1))
    assert ds.user_ids == ["v", "u"]  # users 0..U-1 in source order
    assert [ext(ds, s) for s in ds.sequences] == [["x", "z", "y"], ["a", "c", "b", "d"]]
    # items 1..n by first appearance in the sorted data; 0 is padding
    assert ds.item_ids == ["<pad>", "x", "z", "y", "a", "c", "b", "d"]
    assert [s.tolist() for s in ds.sequences] == [[1, 2, 3], [4, 5, 6, 7]]
    assert all(s.dtype == np.int64 for s in ds.sequences)
    # Rebuilding from a shuffled copy that keeps the relative order of tied rows gives the same result.
    again = build(raw_of([rows[i] for i in (5, 0, 2, 1, 3, 4, 6)]), SplitConfig(user_core=3, item_core=1))
    assert [ext(again, s) for s in again.sequences] == [["x", "z", "y"], ["a", "c", "b", "d"]]


def test_leave_one_out_and_attributes():
    rows = [("u", i, float(t)) for t, i in enumerate("abcde")] + [
        ("w", i, float(t)) for t, i in enumerate("cba")
    ]
    ds = build(raw_of(rows, items={"a": {"title": "A"}}), SplitConfig(user_core=3, item_core=1))
    inputs, targets = ds.split("valid")
    assert [ext(ds, s) for s in inputs] == [["a", "b", "c"], ["c"]] and ext(ds, targets) == ["d", "b"]
    inputs, targets = ds.split("test")
    assert [ext(ds, s) for s in inputs] == [["a", "b", "c", "d"], ["c", "b"]] and ext(ds, targets) == [
        "e",
        "a",
    ]
    assert [ext(ds, s) for s in ds.train_sequences()] == [["a", "b", "c"], ["c"]]
    assert (
        ds.attributes[0] == {}
        and ds.attributes[1] == {"title": "A"}
        and ds.stats["items_without_attributes"] == 4
    )


def test_tail_mask_and_stats():
    pop = np.array([0, 5, 1, 1, 9, 2, 0, 3, 1, 4, 7])  # 10 items
    tail = tail_mask(pop)
    assert not tail[0] and tail.sum() == 8
    assert set(np.flatnonzero(~tail[1:]) + 1) == {4, 10}  # the two most popular items are the head

    rows = [(f"u{k}", i, float(t)) for k in range(4) for t, i in enumerate("abcde")]
    ds = build(raw_of(rows), SplitConfig(user_core=3, item_core=1))
    s = ds.stats
    assert (s["users"], s["items"], s["interactions"]) == (4, 5, 20) and s["sparsity"] == 0.0
    assert s["seq_len"] == {
        "min": 5,
        "p25": 5.0,
        "p50": 5.0,
        "p75": 5.0,
        "p90": 5.0,
        "p99": 5.0,
        "max": 5,
        "mean": 5.0,
    }
    # training = first 3 of each sequence: a, b, c 4 times each; d, e never. Tail = 4 of 5 items.
    assert s["tail"] == {"item_share": 0.8, "items": 4, "train_interaction_share": pytest.approx(8 / 12)}
    text = format_stats(s)
    assert "4 users, 5 items, 20 interactions" in text and "hold 66.7% of training interactions" in text
    json.dumps(s)  # stats travel in meta.json and bundle manifests


def test_max_users_keeps_first_users_and_a_valid_core():
    rows = [(f"u{k}", i, float(t)) for k in range(5) for t, i in enumerate("abcd")]
    ds = build(raw_of(rows), SplitConfig(user_core=3, item_core=2, max_users=2))
    assert ds.user_ids == ["u0", "u1"] and ds.n_items == 4


def _write_canonical(d, n_users=6):
    d.mkdir(parents=True, exist_ok=True)
    lines = ["user_id,item_id,timestamp"] + [f"u{k},i{t},{t}" for k in range(n_users) for t in range(5)]
    (d / "interactions.csv").write_text("\n".join(lines) + "\n")
    (d / "items.jsonl").write_text('{"item_id": "i0", "title": "zero"}\n')


def test_prepare_cache_hit_and_miss(tmp_path, monkeypatch):
    src, cache = tmp_path / "shop", tmp_path / "cache"
    _write_canonical(src)
    built = []
    real_build = split_mod.build
    monkeypatch.setattr(split_mod, "build", lambda raw, cfg: built.append(cfg) or real_build(raw, cfg))

    first = prepare(src, SplitConfig(), cache_dir=cache)
    second = prepare(src, SplitConfig(), cache_dir=cache)
    assert len(built) == 1  # second call is a cache hit
    assert second.stats == first.stats and second.item_ids == first.item_ids
    assert [s.tolist() for s in second.sequences] == [s.tolist() for s in first.sequences]
    assert first.config["format"] == "canonical" and first.config["split"]["user_core"] == 5
    assert first.stats["name"] == "shop" and first.attributes[1] == {"title": "zero"}

    prepare(src, SplitConfig(item_core=3), cache_dir=cache)  # config change -> new key
    assert len(built) == 2 and len(list(cache.iterdir())) == 2

    _write_canonical(src, n_users=7)  # source change (size + mtime) -> new key
    later = time.time() + 5
    os.utime(src / "interactions.csv", (later, later))
    assert prepare(src, SplitConfig(), cache_dir=cache).n_users == 7 and len(built) == 3

    prepare(src, SplitConfig(), cache_dir=cache, refresh=True)
    assert len(built) == 4 and len(list(cache.iterdir())) == 3


def test_prepare_resolves_names_under_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMEMB_DATA_DIR", str(tmp_path))
    _write_canonical(tmp_path / "shop")
    ds = prepare("shop")
    assert ds.n_users == 6 and (tmp_path / "cache").is_dir()


def test_beauty_real(beauty_dir, tmp_path):
    ds = prepare(beauty_dir, SplitConfig(), cache_dir=tmp_path)
    assert (ds.n_users, ds.n_items, ds.stats["interactions"]) == (22_363, 12_101, 198_502)
    assert ds.stats["kcore"]["removed"] == {"users": 0, "items": 0, "interactions": 0}
    assert ds.instruction == "The beauty item has the following attributes: "
    assert ds.stats["items_without_attributes"] == 7
    # Internal id k+1 is line k of items.jsonl (= the S3-Rec/ICLRec Beauty.txt ids, per the data README).
    with open(beauty_dir / "items.jsonl", encoding="utf-8") as f:
        assert ds.item_ids[1:] == [json.loads(line)["item_id"] for line in f]
    again = PreparedDataset.load(next(tmp_path.iterdir()))
    assert again.n_users == ds.n_users and all(
        np.array_equal(a, b) for a, b in zip(again.sequences, ds.sequences)
    )


@pytest.mark.slow  # may download the recbole wheel
def test_ml100k_prepared(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMEMB_DATA_DIR", str(tmp_path))
    ds = prepare("ml-100k")
    assert ds.stats["raw"] == {"users": 943, "items": 1682, "interactions": 100_000}
    # Measured: the iterative 5-core drops 333 movies with < 5 ratings (713 rows) in 2 passes; every user has
    # >= 20 ratings, so all 943 stay. 1,349 items matches RecBole's figure for ml-100k with the same filter.
    assert (ds.n_users, ds.n_items, ds.stats["interactions"]) == (943, 1349, 99_287)
    assert ds.stats["kcore"]["passes"] == 2
