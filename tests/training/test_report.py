"""Results / benchmark records: building, atomic merging, markdown, git sha."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from training.evaluate import paired_ttest
from training.report import (
    git_commit,
    markdown_table,
    merge_benchmarks,
    merge_records,
    results_records,
    ttest_table,
    ttest_vs_best_baseline,
)


def summary(h: float, n: float, tail: tuple[float, float] | None) -> dict:
    return {
        "overall": {"H@10": h, "N@10": n},
        "tail": None if tail is None else {"H@10": tail[0], "N@10": tail[1]},
        "head": {"H@10": 1.0, "N@10": 1.0},
        "n_users": 3,
    }


PER_SEED = {
    43: {"sampled100": summary(0.5, 0.3, (0.2, 0.1)), "full": summary(0.1, 0.05, (0.0, 0.0))},
    42: {"sampled100": summary(0.4, 0.2, (0.1, 0.05)), "full": summary(0.2, 0.15, None)},
}


def record(**kw) -> dict:
    base = {
        "dataset": "ml-100k",
        "backbone": "sasrec",
        "method": "None",
        "llm": None,
        "split": "overall",
        "protocol": "sampled100",
        "metric": "H@10",
        "mean": 0.5,
        "std": 0.01,
        "seeds": [42, 43, 44],
        "commit": "abc1234",
    }
    return base | kw


def test_results_records_aggregate_over_seeds() -> None:
    recs = results_records("ml-100k", "sasrec", None, None, PER_SEED, "abc1234")
    assert len(recs) == 2 * 2 * 2  # protocol x split x metric
    by = {(r["protocol"], r["split"], r["metric"]): r for r in recs}
    r = by["sampled100", "overall", "H@10"]
    assert r["method"] == "None" and r["llm"] is None and r["commit"] == "abc1234"
    assert r["mean"] == pytest.approx(0.45) and r["std"] == pytest.approx(math.sqrt(0.005))
    assert r["seeds"] == [42, 43]
    # seed 42 has an empty full/tail slice: left out of that record
    r = by["full", "tail", "N@10"]
    assert r["seeds"] == [43] and r["mean"] == 0.0 and r["std"] == 0.0
    assert [x["protocol"] for x in recs[:4]] == ["sampled100"] * 4
    llm = results_records("ml-100k", "sasrec", "LLMEmb", "smollm2", PER_SEED, "x")
    assert {x["method"] for x in llm} == {"LLMEmb"} and {x["llm"] for x in llm} == {"smollm2"}


def test_merge_replaces_by_key_keeps_others_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "results.json"
    merge_records(path, [record(), record(metric="N@10", mean=0.3), record(dataset="beauty")])
    first = path.read_bytes()
    merge_records(path, [record(), record(metric="N@10", mean=0.3)])
    assert path.read_bytes() == first  # same input, same bytes
    merged = merge_records(path, [record(mean=0.9, commit="def5678")])
    data = json.loads(path.read_text())
    assert data == merged and len(data) == 3
    assert [r["mean"] for r in data if r["dataset"] == "ml-100k" and r["metric"] == "H@10"] == [0.9]
    assert [r["dataset"] for r in data] == ["beauty", "ml-100k", "ml-100k"]  # sorted by key
    assert first.startswith(b'[\n {\n  "dataset"')  # indent=1
    # the llm is part of the key: an LLMEmb row with another LLM is a new record
    merge_records(path, [record(method="LLMEmb", llm="a"), record(method="LLMEmb", llm="b")])
    assert len(json.loads(path.read_text())) == 5


def test_merge_is_atomic_and_validates(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    merge_records(path, [record()])
    before = path.read_bytes()
    with pytest.raises(ValueError):
        merge_records(path, [record(mean=float("nan"))])  # not JSON: fails before touching the file
    with pytest.raises(ValueError, match="lacks fields"):
        merge_records(path, [{"dataset": "x"}])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp files left behind
    path.write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        merge_records(path, [record()])


def test_merge_benchmarks_keys_by_bench_variant_metric_machine(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.json"

    def bench(**kw) -> dict:
        base = {"bench": "embed", "variant": "bs32", "metric": "items/s", "value": 100.0, "unit": "1/s"}
        return base | {"machine": "h100", "commit": "abc"} | kw

    merge_benchmarks(path, [bench(), bench(machine="cpu", value=5.0)])
    merge_benchmarks(path, [bench(value=120.0)])
    data = json.loads(path.read_text())
    assert [(r["machine"], r["value"]) for r in data] == [("cpu", 5.0), ("h100", 120.0)]
    with pytest.raises(ValueError):
        merge_benchmarks(path, [{"bench": "x", "value": 1.0}])


def test_markdown_table_layout() -> None:
    recs = [
        record(method="LLMEmb", llm="smollm2", mean=0.61234, std=0.00123),
        record(mean=0.5, std=0.01),
        record(metric="N@10", mean=0.25, std=0.0),
        record(split="tail", protocol="full", metric="N@10", mean=None, std=None),
    ]
    assert markdown_table(recs) == (
        "| dataset | backbone | method | seeds | sampled100 overall H@10 | sampled100 overall N@10 | full tail N@10 |\n"
        "|---|---|---|---|---:|---:|---:|\n"
        "| ml-100k | sasrec | None | 42,43,44 | 0.5000 ± 0.0100 | 0.2500 ± 0.0000 | — |\n"
        "| ml-100k | sasrec | LLMEmb (smollm2) | 42,43,44 | 0.6123 ± 0.0012 | — | — |\n"
    )
    assert markdown_table([]) == ""


def test_git_commit(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"  # not a repository
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    env = os.environ | {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    sha = git("rev-parse", "--short", "HEAD")
    assert git_commit(tmp_path) == sha
    (tmp_path / "a.txt").write_text("2")
    assert git_commit(tmp_path) == sha + "-dirty"
    assert git_commit() != ""  # this checkout: a sha, or "unknown" when run outside git


def full_only(h: float) -> dict:
    return {"full": summary(h, h / 2, (h / 4, h / 8))}


def test_ttest_picks_the_best_baseline_per_column_and_pairs_by_seed() -> None:
    none = {42: full_only(0.10), 43: full_only(0.12), 44: full_only(0.11)}
    llm2x = {42: full_only(0.20), 43: full_only(0.21), 44: full_only(0.25)}
    method = {42: full_only(0.30), 43: full_only(0.28), 44: full_only(0.33), 45: full_only(0.9)}
    other_ds = {42: full_only(0.99), 43: full_only(0.99)}  # another dataset's baseline never counts
    groups = {
        ("ml-100k", "sasrec", "None", None): none,
        ("ml-100k", "sasrec", "LLM2X", "m"): llm2x,
        ("ml-100k", "sasrec", "LLMEmb", "m"): method,
        ("beauty", "sasrec", "LLM2X", "m"): other_ds,
    }
    tests = ttest_vs_best_baseline(groups)
    assert {t["method"] for t in tests} == {"LLMEmb"}  # baselines are not tested against themselves
    assert len(tests) == 4  # full x (overall, tail) x (H@10, N@10)
    t = next(t for t in tests if t["split"] == "overall" and t["metric"] == "H@10")
    assert t["baseline"] == "LLM2X" and t["baseline_llm"] == "m"
    assert t["seeds"] == [42, 43, 44]  # seed 45 has no partner
    assert t["mean"] == pytest.approx((0.30 + 0.28 + 0.33) / 3)
    assert t["delta"] == pytest.approx(t["mean"] - (0.20 + 0.21 + 0.25) / 3)
    assert (t["t"], t["p"]) == pytest.approx(paired_ttest([0.30, 0.28, 0.33], [0.20, 0.21, 0.25]))
    table = ttest_table(tests)
    assert "vs LLM2X (p " in table and "LLMEmb (m)" in table
    assert ("*" in table) == any(x["p"] < 0.05 for x in tests)
    # a baseline run with another LLM is named with its LLM
    other = ttest_table([{**t, "llm": "q"}])
    assert "vs LLM2X of m (p " in other and "LLMEmb (q)" in other


def test_ttest_needs_two_shared_seeds() -> None:
    groups = {
        ("d", "sasrec", "None", None): {42: full_only(0.1)},
        ("d", "sasrec", "LLMEmb", "m"): {42: full_only(0.2), 43: full_only(0.3)},
    }
    assert ttest_vs_best_baseline(groups) == []
    assert ttest_table([]) == ""
