"""Results and benchmark records: build them from evaluations, merge them into JSON files, render markdown.

docs/results.json is a list of records, one number per (dataset, backbone, method, llm, split, protocol, metric):

    {"dataset": "ml-100k", "backbone": "sasrec", "method": "LLMEmb", "llm": "smollm2-135m", "split": "tail",
     "protocol": "sampled100", "metric": "N@10", "mean": 0.0412, "std": 0.0021, "seeds": [42, 43, 44],
     "commit": "ca73e57-dirty"}

method "None" is the ID-only backbone (llm None). Benchmarks follow the same pattern, keyed by
(bench, variant, metric, machine). Merges replace records by key and keep the rest; files are written
atomically (temp file in the same directory, fsync, os.replace) under an flock on the directory, and sorted,
so re-running a job rewrites the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from training.evaluate import aggregate

RESULT_KEY = ("dataset", "backbone", "method", "llm", "split", "protocol", "metric")
RESULT_FIELDS = (*RESULT_KEY, "mean", "std", "seeds", "commit")
BENCH_KEY = ("bench", "variant", "metric", "machine")
BENCH_FIELDS = (*BENCH_KEY, "value", "unit", "commit")

# Canonical column / row order; anything else sorts after these, alphabetically.
_PROTOCOL_ORDER = ("sampled100", "full")
_SPLIT_ORDER = ("overall", "tail", "head")
_METRIC_ORDER = ("H@10", "N@10")


def results_records(
    dataset: str,
    backbone: str,
    method: str | None,
    llm: str | None,
    per_seed: Mapping[int, Mapping[str, Any]],
    commit: str,
    splits: Iterable[str] = ("overall", "tail"),
) -> list[dict]:
    """One record per (split, protocol, metric) from per-seed `Evaluator.evaluate` results.

    Protocols are those every seed evaluated; metrics are those of the "overall" summary. Seeds whose slice is
    empty (None) are left out of that record's mean/std and its "seeds"; if all are, mean and std are None.
    """
    if not per_seed:
        raise ValueError("per_seed is empty")
    seeds = sorted(per_seed)
    protocols = sorted(set.intersection(*(set(per_seed[s]) for s in seeds)), key=_order(_PROTOCOL_ORDER))
    out = []
    for protocol in protocols:
        metrics = sorted(per_seed[seeds[0]][protocol]["overall"], key=_order(_METRIC_ORDER))
        for split in splits:
            for metric in metrics:
                used = [s for s in seeds if per_seed[s][protocol].get(split) is not None]
                values = [per_seed[s][protocol][split][metric] for s in used]
                mean, std = aggregate(values) if values else (None, None)
                out.append(
                    {
                        "dataset": dataset,
                        "backbone": backbone,
                        "method": "None" if method is None else method,
                        "llm": llm,
                        "split": split,
                        "protocol": protocol,
                        "metric": metric,
                        "mean": mean,
                        "std": std,
                        "seeds": used,
                        "commit": commit,
                    }
                )
    return out


def merge_records(path: str | Path, records: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Merge results records into the JSON list at `path` (created if absent); returns the merged list."""
    return _merge(path, records, RESULT_KEY, RESULT_FIELDS)


def merge_benchmarks(path: str | Path, records: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Merge benchmark records {bench, variant, metric, value, unit, machine, commit} into `path`."""
    return _merge(path, records, BENCH_KEY, BENCH_FIELDS)


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """The distinct (protocol, split, metric) of records, in the canonical column order."""
    return sorted(
        {(r["protocol"], r["split"], r["metric"]) for r in rows},
        key=lambda c: (
            _order(_PROTOCOL_ORDER)(c[0]),
            _order(_SPLIT_ORDER)(c[1]),
            _order(_METRIC_ORDER)(c[2]),
        ),
    )


def markdown_table(records: Iterable[Mapping[str, Any]]) -> str:
    """A markdown table: one row per (dataset, backbone, method[, llm]) with the seeds it has, one column per
    protocol × split × metric.

    Cells read "0.1234 ± 0.0012"; a missing number is "—". The ID-only row ("None") comes first in each block.
    Returns "" for no records.
    """
    records = list(records)
    if not records:
        return ""
    cols = _columns(records)
    cells: dict[tuple, dict[tuple, str]] = {}
    seeds: dict[tuple, set[int]] = {}
    for r in records:
        row = (r["dataset"], r["backbone"], r["method"], r.get("llm"))
        cells.setdefault(row, {})[(r["protocol"], r["split"], r["metric"])] = _cell(
            r.get("mean"), r.get("std")
        )
        seeds.setdefault(row, set()).update(r.get("seeds") or ())
    rows = sorted(cells, key=lambda row: (row[0], row[1], row[2] != "None", row[2], row[3] or ""))
    head = ["dataset", "backbone", "method", "seeds", *(" ".join(c) for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * len(cols)) + "|"]
    for row in rows:
        method = row[2] if row[3] is None else f"{row[2]} ({row[3]})"
        values = [cells[row].get(c, "—") for c in cols]
        used = ",".join(str(x) for x in sorted(seeds[row])) or "—"
        lines.append("| " + " | ".join([row[0], row[1], method, used, *values]) + " |")
    return "\n".join(lines) + "\n"


def git_commit(cwd: str | Path | None = None) -> str:
    """Short sha of HEAD, "-dirty" if tracked files changed or untracked (non-ignored) files exist.

    Looks at the repository holding this file unless `cwd` is given; "unknown" outside git.
    """
    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=where, capture_output=True, text=True, check=True, timeout=30
        )
        return done.stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


# ---- internals --------------------------------------------------------------------------------------------------
def _order(known: tuple[str, ...]):
    return lambda v: (known.index(v), "") if v in known else (len(known), str(v))


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _key(record: Mapping[str, Any], key: tuple[str, ...]) -> tuple:
    return tuple(record[f] for f in key)


def _sort_key(record: Mapping[str, Any], key: tuple[str, ...]) -> tuple:
    return tuple("" if record[f] is None else str(record[f]) for f in key)


def _merge(
    path: str | Path, records: Iterable[Mapping[str, Any]], key: tuple[str, ...], fields: tuple[str, ...]
) -> list[dict]:
    path = Path(path)
    new: dict[tuple, dict] = {}
    for r in records:
        missing = [f for f in fields if f not in r]
        if missing:
            raise ValueError(f"record {dict(r)} lacks fields {missing}")
        new[_key(r, key)] = dict(r)  # within one call the last record of a key wins
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
        existing = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
        if not isinstance(existing, list):
            raise ValueError(f"{path} does not hold a JSON list")
        merged = [r for r in existing if _key(r, key) not in new] + list(new.values())
        merged.sort(key=lambda r: _sort_key(r, key))
        _write_json_atomic(path, merged)
    return merged


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Exclusive flock on the directory, so concurrent jobs' read-modify-write merges don't lose records."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the write is still atomic
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_json_atomic(path: Path, obj: Any) -> None:
    # Serialise first: a NaN or an unserialisable value fails before anything touches the disk.
    text = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False, default=_json_default) + "\n"
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# ---- significance against the best baseline (the paper's Table 1 stars) ----------------------------------------
PAPER_BASELINES = ("None", "LLM2X")


def ttest_vs_best_baseline(
    groups: Mapping[tuple, Mapping[int, Mapping[str, Any]]],
    baselines: Iterable[str] = PAPER_BASELINES,
    splits: Iterable[str] = ("overall", "tail"),
    metrics: Iterable[str] = ("H@10", "N@10"),
) -> list[dict]:
    """Paired two-sided t-tests over seeds of every non-baseline method against the best baseline, per column.

    `groups`: {(dataset, backbone, method, llm): {seed: Evaluator.evaluate result}} (`collect_runs`). Within one
    (dataset, backbone), for each (protocol, split, metric) the best baseline is the baseline method with the
    highest mean over the seeds it shares with the method (a baseline run with another LLM counts too: "None"
    has none). Pairs are seeds: the same seed means the same evaluation negatives and, for the aligned methods,
    the ID-SASRec of that seed. Returns one record per (dataset, backbone, method, llm, protocol, split, metric):
    {..., "baseline", "baseline_llm", "seeds", "mean", "baseline_mean", "delta", "t", "p"}; columns with fewer
    than two shared seeds are left out.
    """
    from training.evaluate import paired_ttest

    baselines = tuple(baselines)
    splits, metrics = tuple(splits), tuple(metrics)
    out: list[dict] = []
    for (ds, bb, method, llm), runs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if method in baselines:
            continue
        candidates = [(k, v) for k, v in groups.items() if k[0] == ds and k[1] == bb and k[2] in baselines]
        protocols = set.intersection(*(set(r) for r in runs.values()))
        for protocol in sorted(protocols, key=_order(_PROTOCOL_ORDER)):
            for split in splits:
                for metric in metrics:
                    best = None
                    for key, base in candidates:
                        seeds = sorted(
                            s
                            for s in set(runs) & set(base)
                            if protocol in base[s]
                            and base[s][protocol].get(split) is not None
                            and runs[s][protocol].get(split) is not None
                        )
                        if len(seeds) < 2:
                            continue
                        b = [base[s][protocol][split][metric] for s in seeds]
                        if best is None or sum(b) / len(b) > best[2]:
                            best = (key, seeds, sum(b) / len(b), b)
                    if best is None:
                        continue
                    key, seeds, base_mean, b = best
                    a = [runs[s][protocol][split][metric] for s in seeds]
                    t, p = paired_ttest(a, b)
                    mean = sum(a) / len(a)
                    out.append(
                        {
                            "dataset": ds,
                            "backbone": bb,
                            "method": method,
                            "llm": llm,
                            "protocol": protocol,
                            "split": split,
                            "metric": metric,
                            "baseline": key[2],
                            "baseline_llm": key[3],
                            "seeds": seeds,
                            "mean": mean,
                            "baseline_mean": base_mean,
                            "delta": mean - base_mean,
                            "t": t,
                            "p": p,
                        }
                    )
    return out


def ttest_table(tests: Iterable[Mapping[str, Any]], alpha: float = 0.05) -> str:
    """Markdown: one row per method, one column per (protocol, split, metric); a cell reads "+0.0123 vs LLM2X
    (p 0.012)*" (difference of means to the best baseline, "*" where p < alpha; "vs LLM2X of <llm>" where the best
    baseline run used another LLM than the row). "" for no tests."""
    tests = list(tests)
    if not tests:
        return ""
    cols = _columns(tests)
    cells: dict[tuple, dict[tuple, str]] = {}
    for t in tests:
        row = (t["dataset"], t["backbone"], t["method"], t.get("llm"))
        star = "*" if t["p"] < alpha else ""
        base, base_llm = t["baseline"], t.get("baseline_llm")
        if base_llm is not None and base_llm != t.get("llm"):  # another LLM's baseline run was the best
            base = f"{base} of {base_llm}"
        cells.setdefault(row, {})[(t["protocol"], t["split"], t["metric"])] = (
            f"{t['delta']:+.4f} vs {base} (p {t['p']:.3f}){star}"
        )
    head = ["dataset", "backbone", "method", *(" ".join(c) for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(cols)) + "|"]
    for row in sorted(cells, key=lambda r: (r[0], r[1], r[2], r[3] or "")):
        method = row[2] if row[3] is None else f"{row[2]} ({row[3]})"
        lines.append(
            "| " + " | ".join([row[0], row[1], method, *(cells[row].get(c, "—") for c in cols)]) + " |"
        )
    return "\n".join(lines) + "\n"
