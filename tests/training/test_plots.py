"""training/plots.py and `llmemb report figures`: popularity-group bars (Fig. 5) and 2-D item-table maps (Fig. 6)
from run directories written by the real writers."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from training.cli import write_run_metrics
from training.plots import (
    embedding_map_name,
    find_runs,
    group_bars_name,
    group_labels,
    plot_embedding_maps,
    popularity_r2,
    run_item_table,
    write_figures,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
D_LLM = 32


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_sane_png(path: Path) -> None:
    assert path.is_file(), f"{path} missing"
    w, h = png_size(path)
    assert 300 <= w <= 3000 and 200 <= h <= 2000, (w, h)
    assert path.stat().st_size > 5_000
    assert path.read_bytes()[-8:-4] == b"IEND"


def fake_test_metrics(rng: np.random.Generator, empty_group: int | None = None) -> dict:
    """Evaluator-shaped test metrics with random numbers: two protocols, overall / tail / head / group1..5."""
    out = {}
    for protocol in ("sampled100", "full"):
        summary: dict = {}
        for name in ("overall", "tail", "head", *(f"group{i}" for i in range(1, 6))):
            summary[name] = {"H@10": float(rng.uniform(0, 1)), "N@10": float(rng.uniform(0, 0.5))}
        if empty_group is not None:
            summary[f"group{empty_group}"] = None
        summary["n_users"] = 100
        summary["sizes"] = {"overall": 100}
        out[protocol] = summary
    return out


def write_fake_run(root: Path, method: str, llm: str | None, seed: int, test: dict) -> Path:
    out = root / "ds" / "sasrec" / method.lower().replace(" ", "-").replace("/", "") / f"seed{seed}"
    out.mkdir(parents=True)
    result = SimpleNamespace(best_epoch=3, best_val=0.1, seconds_per_epoch=0.5, history=[{}] * 4, test=test)
    write_run_metrics(out, "ds", "sasrec", method, llm, seed, result)
    return out


def test_group_bars_show_the_seed_means_of_the_metrics_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    plan = [("None", None, s) for s in (42, 43, 44)]
    plan += [("LLM2X", "minilm", s) for s in (42, 43)]
    plan += [("LLMEmb", "minilm", s) for s in (42, 43, 44)]
    plan += [("LLMEmb w/o align", "minilm", 42)]  # not selected by default
    for method, llm, seed in plan:
        empty = 2 if (method, seed) == ("LLMEmb", 44) else None  # a seed without users in group 2
        write_fake_run(tmp_path / "runs", method, llm, seed, fake_test_metrics(rng, empty))

    runs = find_runs([tmp_path / "runs"])
    assert len(runs) == len(plan)
    out = tmp_path / "fig"
    logs: list[str] = []
    written = write_figures(runs, out, maps=False, log=logs.append)

    names = sorted(p.name for p in written)
    assert names == [group_bars_name("ds", "sasrec", p) for p in ("full", "sampled100")]
    assert sorted(f.name for f in out.iterdir()) == names  # nothing else, no temp files left behind
    for p in written:
        assert_sane_png(p)

    # Expected numbers straight from the files on disk, independent of training/plots.py.
    files = [json.loads(f.read_text()) for f in sorted((tmp_path / "runs").rglob("metrics.json"))]
    for path, drawn in written.items():
        protocol = "full" if path.name.endswith("-full.png") else "sampled100"
        assert list(drawn) == [
            "None",
            "LLM2X (minilm)",
            "LLMEmb (minilm)",
        ]  # --methods order, w/o align left out
        for label, method in zip(drawn, ("None", "LLM2X", "LLMEmb")):
            mine = [m for m in files if m["method"] == method]
            for metric in ("H@10", "N@10"):
                for g in range(1, 6):
                    vals = [m["test"][protocol][f"group{g}"] for m in mine]
                    vals = [v[metric] for v in vals if v is not None]
                    mean = drawn[label][metric]["mean"][g - 1]
                    std = drawn[label][metric]["std"][g - 1]
                    assert mean == pytest.approx(np.mean(vals), abs=1e-12)
                    assert std == pytest.approx(np.std(vals, ddof=1), abs=1e-9)
                    want_seeds = sorted(
                        m["seed"] for m in mine if m["test"][protocol][f"group{g}"] is not None
                    )
                    assert drawn[label][metric]["seeds"][g - 1] == want_seeds
    assert written[out / group_bars_name("ds", "sasrec", "full")]["LLMEmb (minilm)"]["H@10"]["seeds"][1] == [
        42,
        43,
    ]

    # Same inputs, same bytes (deterministic names and pictures).
    before = {p: p.read_bytes() for p in written}
    write_figures(runs, out, maps=False, log=logs.append)
    assert {p: p.read_bytes() for p in written} == before


def test_group_labels_give_each_groups_count_range() -> None:
    pop = np.array([0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55])  # 10 items, 5 groups of 2
    assert group_labels(None, 5) == ["G1", "G2", "G3", "G4", "G5"]
    assert group_labels(pop, 5) == ["G1\n1–1", "G2\n2–3", "G3\n5–8", "G4\n13–21", "G5\n34–55"]


def test_popularity_r2() -> None:
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 100, size=400)
    coords = np.column_stack([np.log1p(counts), rng.normal(size=400)])
    assert popularity_r2(coords, counts) == pytest.approx(1.0)
    assert popularity_r2(rng.normal(size=(400, 2)), counts) < 0.05


def test_embedding_map_refuses_a_table_of_another_catalog(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected"):
        plot_embedding_maps({"x": torch.zeros(5, 4)}, np.ones(7, dtype=np.int64), tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """A toy dataset prepared through the cache and real 1-epoch None / LLM2X / LLMEmb SASRec runs (seed 42; None
    also seed 43), each saved with the writers `llmemb train srs / rat` use."""
    from training.rat import RATConfig, final_item_table, load_id_table, save_rat
    from training.rat import main as rat_main
    from training.split import SplitConfig, prepare
    from training.srs import SRSTrainConfig, save_checkpoint
    from training.srs import main as srs_main

    root = tmp_path_factory.mktemp("plots")
    ds = root / "toy"
    ds.mkdir()
    rng = np.random.default_rng(3)
    rows = ["user_id,item_id,timestamp"]
    for u in range(60):
        start = int(rng.integers(0, 120))
        rows += [f"u{u},i{start + t},{t}" for t in range(8)]
    (ds / "interactions.csv").write_text("\n".join(rows) + "\n")
    (ds / "items.jsonl").write_text(
        "".join(json.dumps({"item_id": f"i{i}", "title": f"t{i}"}) + "\n" for i in range(130))
    )
    cache = root / "cache"
    data = prepare(str(ds), SplitConfig(user_core=3, item_core=1), cache_dir=str(cache))
    llm_table = torch.randn(data.n_items + 1, D_LLM, generator=torch.Generator().manual_seed(1))
    llm_table[0] = 0
    runs = root / "runs"
    tables = {}

    def srs_cfg(seed: int) -> SRSTrainConfig:
        return SRSTrainConfig(
            max_epochs=1, batch_size=16, hidden=16, n_layers=1, n_heads=2, max_len=8, device="cpu", seed=seed
        )

    for seed in (42, 43):
        res = srs_main(srs_cfg(seed), data)
        out = runs / data.name / "sasrec" / f"seed{seed}"
        save_checkpoint(res.model, res.config, out, data=data)
        write_run_metrics(out, data.name, "sasrec", "None", None, seed, res)
        tables[("None", seed)] = res.model.item_table().detach().clone()
    id_table = load_id_table(runs / data.name / "sasrec" / "seed42")
    for method in ("LLM2X", "LLMEmb"):
        res = rat_main(RATConfig(srs=srs_cfg(42), method=method), data, llm_table, id_table)
        out = runs / data.name / "sasrec" / f"{method.lower()}-rand" / "seed42"
        save_rat(res, out, data=data, llm="rand")
        write_run_metrics(out, data.name, "sasrec", method, "rand", 42, res)
        tables[(method, 42)] = final_item_table(res.model)
    return SimpleNamespace(root=root, ds=ds, cache=cache, data=data, runs=runs, tables=tables)


def test_run_item_table_is_the_table_the_backbone_scored_with(trained_runs) -> None:
    t = trained_runs
    sub = t.runs / t.data.name / "sasrec"
    torch.testing.assert_close(run_item_table(sub / "seed42"), t.tables[("None", 42)], rtol=0, atol=0)
    torch.testing.assert_close(run_item_table(sub / "llm2x-rand" / "seed42"), t.tables[("LLM2X", 42)])
    # LLMEmb: the adapter output over the frozen PCA'd table, not the PCA'd LLM table itself.
    llmemb = run_item_table(sub / "llmemb-rand" / "seed42")
    torch.testing.assert_close(llmemb, t.tables[("LLMEmb", 42)])
    assert llmemb.shape == (t.data.n_items + 1, 16)


def test_cli_report_figures(trained_runs, tmp_path: Path, capsys) -> None:
    from llmemb.cli import main as cli_main

    t = trained_runs
    out = tmp_path / "figures"
    argv = [
        "report", "figures", str(t.runs), "--out", str(out), "--dataset", str(t.ds),
        "--user-core", "3", "--item-core", "1", "--cache-dir", str(t.cache),
    ]  # fmt: skip
    assert cli_main(argv) == 0
    name = t.data.name
    expected = [
        embedding_map_name(name, "sasrec"),
        group_bars_name(name, "sasrec", "full"),
        group_bars_name(name, "sasrec", "sampled100"),
    ]
    assert sorted(f.name for f in out.iterdir()) == sorted(expected)
    for f in out.iterdir():
        assert_sane_png(f)
    w, h = png_size(out / embedding_map_name(name, "sasrec"))
    assert w > 2 * h  # three panels side by side
    printed = capsys.readouterr().out
    assert all(f"wrote {out / n}" in printed for n in expected)

    # The same through the API: the bars are the seed means of the metrics files, the map has one panel a method.
    pop = t.data.item_popularity()
    written = write_figures(find_runs([t.runs]), tmp_path / "api", popularity={name: pop}, log=lambda _: None)
    bars = written[tmp_path / "api" / group_bars_name(name, "sasrec", "full")]
    files = [json.loads(f.read_text()) for f in t.runs.rglob("metrics.json")]
    none = [m["test"]["full"] for m in files if m["method"] == "None"]
    for g in range(1, 6):
        vals = [m[f"group{g}"]["H@10"] for m in none if m[f"group{g}"] is not None]
        assert bars["None"]["H@10"]["mean"][g - 1] == pytest.approx(np.mean(vals), abs=1e-12)
    maps = written[tmp_path / "api" / embedding_map_name(name, "sasrec")]
    assert list(maps) == ["None", "LLM2X (rand)", "LLMEmb (rand)"]
    for m in maps.values():
        assert m["coords"].shape == (t.data.n_items, 2)
        assert 0.0 <= m["r2_log_count"] <= 1.0 and 0.0 < m["explained"] <= 1.0
    assert not np.allclose(maps["None"]["coords"], maps["LLMEmb (rand)"]["coords"])

    # --map-seed picks that seed's table; a method without it is left out of the map.
    written = write_figures(
        find_runs([t.runs]), tmp_path / "s43", popularity={name: pop}, map_seed=43, log=lambda _: None
    )
    assert list(written[tmp_path / "s43" / embedding_map_name(name, "sasrec")]) == ["None"]


def test_cli_report_figures_without_runs(tmp_path: Path, capsys) -> None:
    from llmemb.cli import main as cli_main

    assert cli_main(["report", "figures", str(tmp_path), "--out", str(tmp_path / "f")]) == 1
    assert "no metrics.json" in capsys.readouterr().out
    assert not (tmp_path / "f").exists()
