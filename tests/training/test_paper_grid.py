"""scripts/paper_grid.py's scheduler: dependencies, skipping finished jobs, sharing ID runs across grids."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def grid(monkeypatch):
    spec = importlib.util.spec_from_file_location("paper_grid", ROOT / "scripts" / "paper_grid.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "paper_grid", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod.subprocess, "run", lambda *a, **k: None)  # the final `report collect`
    real_sleep = mod.time.sleep
    monkeypatch.setattr(mod.time, "sleep", lambda s: real_sleep(min(s, 0.05)))  # poll fast
    return mod


def fake_jobs(mod, work: Path) -> list:
    """An ID job and a job that needs it; each writes its metrics.json and a line into a shared ledger."""

    def job(name: str, deps: list[str]) -> object:
        out = work / "jobs" / name / "run" / "metrics.json"
        code = (
            "import os, pathlib, sys; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(parents=True, exist_ok=True); "
            "p.write_text('{}'); open(sys.argv[2], 'a').write(sys.argv[3] + '\\n'); "
            "pathlib.Path(sys.argv[2] + '-' + sys.argv[3]).write_text(os.environ.get('CUDA_VISIBLE_DEVICES', '-'))"
        )
        argv = [sys.executable, "-c", code, str(out), str(work / "ledger"), name]
        return mod.Job(name, argv, "**/metrics.json", deps)

    return [job("id-d-s42", []), job("d-sasrec-LLMEmb-s42", ["id-d-s42"])]


def run(mod, monkeypatch, work: Path, *extra: str) -> None:
    monkeypatch.setattr(mod, "build_jobs", lambda args: fake_jobs(mod, args.work))
    argv = ["--work", str(work), "--dataset", "d", "--llm", "x", "--llm-name", "x", "--parallel", "2", *extra]
    assert mod.main(argv) == 0


def ledger(work: Path) -> list[str]:
    f = work / "ledger"
    return f.read_text().split() if f.exists() else []


def test_dependencies_run_in_order_and_finished_jobs_are_skipped(grid, monkeypatch, tmp_path: Path) -> None:
    work = tmp_path / "a"
    run(grid, monkeypatch, work)
    assert ledger(work) == ["id-d-s42", "d-sasrec-LLMEmb-s42"]
    run(grid, monkeypatch, work)  # a second sitting finds everything done
    assert ledger(work) == ["id-d-s42", "d-sasrec-LLMEmb-s42"]


def test_reuse_ids_links_the_other_grids_id_runs(grid, monkeypatch, tmp_path: Path) -> None:
    first, second = tmp_path / "smollm2", tmp_path / "minilm"
    run(grid, monkeypatch, first)
    run(grid, monkeypatch, second, "--reuse-ids", str(first))
    assert ledger(second) == ["d-sasrec-LLMEmb-s42"]  # the ID job ran only in the first grid
    link = second / "jobs" / "id-d-s42"
    assert link.is_symlink() and link.resolve() == (first / "jobs" / "id-d-s42").resolve()
    assert (link / "run" / "metrics.json").is_file()


def test_skip_leaves_jobs_out(grid, monkeypatch, tmp_path: Path) -> None:
    work = tmp_path / "s"
    run(grid, monkeypatch, work, "--skip", "LLMEmb")
    assert ledger(work) == ["id-d-s42"]


@pytest.mark.parametrize(
    "gpus,cards",
    [(None, ["-", "-"]), ("1", ["-", "-"]), ("2", ["1", "0"]), ("3,5", ["5", "3"]), ("4,", ["4", "4"])],
)
def test_gpus_spreads_jobs_over_a_count_or_a_list_of_cards(
    grid, monkeypatch, tmp_path: Path, gpus, cards
) -> None:
    work = tmp_path / "g"
    run(grid, monkeypatch, work, *(["--gpus", gpus] if gpus else []))
    names = ledger(work)
    assert [(work / f"ledger-{n}").read_text() for n in names] == cards


def test_gpus_rejects_what_is_not_a_count_or_card_ids(grid) -> None:
    with pytest.raises(SystemExit):
        grid.main(["--work", "w", "--dataset", "d", "--llm", "x", "--llm-name", "x", "--gpus", "cuda:1"])
