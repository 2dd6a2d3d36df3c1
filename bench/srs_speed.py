"""SASRec seconds per training epoch on ml-100k: llmemb vs RecBole 1.2.1, same data, same CPU, one invocation.

    bash bench/setup_recbole_venv.sh                  # once: RecBole's own venv at .bench/recbole-venv
    .venv/bin/python bench/srs_speed.py               # both libraries, sequentially; writes docs/benchmarks.json
    .venv/bin/python bench/srs_speed.py --skip-recbole --epochs 5 --dry-run   # quick check of our side only

Runs in the PROJECT venv. Our side is `training.srs.main` on `training.split.prepare("ml-100k")`; RecBole's side
is bench/recbole_sasrec.py in the RecBole venv (a subprocess, started after ours has finished, so the two never
share the CPU). Both use the same hyper-parameters and `torch.set_num_threads(--threads)`.

An "epoch" is one pass over each library's own training data, which is NOT the same amount of compute:
ours trains all positions of each user's sequence in one row (943 rows/epoch), RecBole turns every prefix into its
own row (~96k rows/epoch, each padded to MAX_ITEM_LIST_LENGTH). Both see each training target about once per
epoch. That is why time-to-best-validation is reported next to seconds/epoch; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/srs_speed.py` puts bench/ on the path, not the repo root
    sys.path.insert(0, str(ROOT))

BENCH = "srs_epoch_ml100k"
OURS, THEIRS = "llmemb-sasrec", "recbole-1.2.1-sasrec"
RECBOLE_PY = ROOT / ".bench" / "recbole-venv" / "bin" / "python"
GOAL_SPEEDUP = 3.0

# Shared hyper-parameters (the LLMEmb reference's SASRec). RecBole gets them translated in recbole_args().
HP = {
    "hidden": 128,
    "n_layers": 2,
    "n_heads": 1,
    "dropout": 0.5,
    "max_len": 200,
    "batch_size": 128,
    "lr": 1e-3,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=200, help="our max epochs (early stopping on valid N@10)")
    p.add_argument("--patience", type=int, default=20, help="our early-stopping patience, in epochs")
    p.add_argument(
        "--recbole-epochs",
        type=int,
        default=20,
        help="RecBole max epochs; each is ~100x our epoch's compute (every prefix is a sample), see README",
    )
    p.add_argument(
        "--recbole-stopping-step", type=int, default=10, help="RecBole's stopping_step (its default)"
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both libraries")
    p.add_argument("--skip-recbole", action="store_true", help="run only our side (quick check)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.json")
    p.add_argument("--dry-run", action="store_true", help="print the table, write no records")
    p.add_argument(
        "--raw-out",
        type=Path,
        default=ROOT / ".bench" / "srs_speed_last.json",
        help="both runs' full details (per-epoch history) as JSON",
    )
    p.add_argument("--recbole-log", type=Path, default=ROOT / ".bench" / "recbole_sasrec.log")
    return p.parse_args(argv)


def machine() -> str:
    """CPU model (from /proc/cpuinfo) and logical core count, e.g. 'AMD EPYC (family 25 model 17), 2 cores'."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break  # the first processor's block is enough
    except OSError:
        pass
    name = fields.get("model name", "unknown CPU")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return f"{name}, {os.cpu_count()} cores"


def epoch_stats(history: list[dict[str, Any]], best_epoch: int) -> dict[str, float]:
    secs = [float(h["seconds"]) for h in history]
    return {
        "seconds_per_epoch_mean": statistics.fmean(secs),
        "seconds_per_epoch_median": statistics.median(secs),
        # the least-disturbed epoch: on a shared machine other jobs only ever add time
        "seconds_per_epoch_min": min(secs),
        "epochs_run": len(secs),
        "seconds_to_best": sum(float(h["seconds"]) for h in history if h["epoch"] <= best_epoch),
    }


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Train our SASRec once; return the numbers the table needs plus the per-epoch history."""
    import torch

    from training.split import prepare
    from training.srs import SRSTrainConfig, main

    torch.set_num_threads(args.threads)
    data = prepare("ml-100k")
    cfg = SRSTrainConfig(
        backbone="sasrec",
        seed=args.seed,
        lr=HP["lr"],
        batch_size=HP["batch_size"],
        max_epochs=args.epochs,
        patience=args.patience,
        device="cpu",
        num_threads=args.threads,
        val_protocol="full",
        hidden=HP["hidden"],
        n_layers=HP["n_layers"],
        n_heads=HP["n_heads"],
        dropout=HP["dropout"],
        max_len=HP["max_len"],
    )
    # What one epoch trains on: one row per user with >= 2 training items, all of its (most recent max_len)
    # positions supervised at once — the same rows training.srs builds.
    train = data.train_sequences()
    rows = [s[-(cfg.max_len + 1) :] for s in train if len(s) >= 2]
    load0, cpu0, t0 = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    res = main(cfg, data)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    test_full = res.test.get("full", {}).get("overall", {})
    return {
        "variant": OURS,
        "threads": torch.get_num_threads(),
        "n_users": data.n_users,
        "n_items": data.n_items,
        "rows_per_epoch": len(rows),
        "targets_per_epoch": int(sum(len(r) - 1 for r in rows)),
        "batches_per_epoch": -(-len(rows) // cfg.batch_size),
        "best_val_N@10": float(res.best_val),
        "best_epoch": int(res.best_epoch),
        **epoch_stats(res.history, res.best_epoch),
        "test_N@10": test_full.get("N@10"),
        "test_H@10": test_full.get("H@10"),
        "wall_seconds": wall,
        "cpu_seconds": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
        "loadavg_1m_before_after": [load0, os.getloadavg()[0]],
        "history": res.history,
    }


def recbole_args(args: argparse.Namespace) -> list[str]:
    return [
        "--epochs", str(args.recbole_epochs),
        "--stopping-step", str(args.recbole_stopping_step),
        "--seed", str(args.seed),
        "--threads", str(args.threads),
        "--hidden", str(HP["hidden"]),
        "--inner", str(HP["hidden"]),  # our FFN is hidden -> hidden (the reference SASRec's)
        "--layers", str(HP["n_layers"]),
        "--heads", str(HP["n_heads"]),
        "--dropout", str(HP["dropout"]),
        "--act", "relu",
        "--layer-norm-eps", "1e-8",
        "--max-len", str(HP["max_len"]),
        "--batch-size", str(HP["batch_size"]),
        "--lr", str(HP["lr"]),
        "--loss", "BPR",  # one uniform negative per target: the closest RecBole has to our BCE with one negative
    ]  # fmt: skip


def run_recbole(args: argparse.Namespace) -> dict[str, Any]:
    """Run bench/recbole_sasrec.py in the RecBole venv; its last stdout line is the result JSON."""
    if not RECBOLE_PY.exists():
        raise SystemExit(f"{RECBOLE_PY} not found: run `bash bench/setup_recbole_venv.sh` first")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    args.recbole_log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(RECBOLE_PY), str(ROOT / "bench" / "recbole_sasrec.py"), *recbole_args(args)]
    print(f"[recbole] {' '.join(cmd)}\n[recbole] log: {args.recbole_log}", file=sys.stderr, flush=True)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with open(args.recbole_log, "w") as log:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        # Ctrl-C reaches the child too (same process group) and makes it stop early but still report the
        # epochs it finished; SIGTERM to us is passed on the same way. Either way we wait for its JSON.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        try:
            stdout, _ = child.communicate()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    wall = time.perf_counter() - t0
    if child.returncode != 0 or not stdout.strip():
        tail = args.recbole_log.read_text().splitlines()[-30:]
        raise SystemExit(f"RecBole run failed (rc {child.returncode}); last log lines:\n" + "\n".join(tail))
    r = json.loads(stdout.strip().splitlines()[-1])
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "variant": THEIRS,
        "threads": r["threads"],
        "n_users": r["n_users"],
        "n_items": r["n_items"],
        "rows_per_epoch": r["train_samples_per_epoch"],
        "targets_per_epoch": r["train_samples_per_epoch"],  # one target per prefix sample
        "batches_per_epoch": r["batches_per_epoch"],
        "best_val_N@10": r["best_val_N@10"],
        "best_epoch": r["best_epoch"],
        **epoch_stats(r["history"], r["best_epoch"]),
        "test_N@10": r["test_N@10"],
        "test_H@10": r["test_H@10"],
        "wall_seconds": wall,
        "cpu_seconds": kids.ru_utime + kids.ru_stime,
        "loadavg_1m_before_after": [load0, os.getloadavg()[0]],
        "stopped_by_signal": r.get("stopped_by_signal"),
        "history": r["history"],
        "raw": {k: v for k, v in r.items() if k != "history"},
    }


def _f(v: Any, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def table(runs: list[dict[str, Any]]) -> str:
    head = [
        "variant", "s/epoch mean", "s/epoch median", "s/epoch min", "epochs run", "best val N@10 (full)", "epoch of best",
        "train s to best", "test N@10", "test H@10", "rows/epoch", "targets/epoch", "batches/epoch",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in runs:
        cells = [
            r["variant"],
            _f(r["seconds_per_epoch_mean"], ".2f"),
            _f(r["seconds_per_epoch_median"], ".2f"),
            _f(r["seconds_per_epoch_min"], ".2f"),
            str(r["epochs_run"]),
            _f(r["best_val_N@10"], ".4f"),
            str(r["best_epoch"]),
            _f(r["seconds_to_best"], ".1f"),
            _f(r["test_N@10"], ".4f"),
            _f(r["test_H@10"], ".4f"),
            str(r["rows_per_epoch"]),
            str(r["targets_per_epoch"]),
            str(r["batches_per_epoch"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    speedup = theirs["seconds_per_epoch_mean"] / ours["seconds_per_epoch_mean"]
    return {
        "speedup_per_epoch": speedup,
        "speedup_per_epoch_median": theirs["seconds_per_epoch_median"] / ours["seconds_per_epoch_median"],
        "speedup_per_epoch_min": theirs["seconds_per_epoch_min"] / ours["seconds_per_epoch_min"],
        "speedup_time_to_best": theirs["seconds_to_best"] / ours["seconds_to_best"],
        "val_delta": ours["best_val_N@10"] - theirs["best_val_N@10"],
        "goal_met": speedup >= GOAL_SPEEDUP and ours["best_val_N@10"] >= theirs["best_val_N@10"],
        # RecBole's best at its last epoch means it was still improving when its epoch budget ran out.
        "recbole_still_improving": theirs["best_epoch"] == theirs["epochs_run"],
    }


def records(runs: list[dict[str, Any]], cmp: dict[str, Any] | None, where: str, commit: str) -> list[dict]:
    out = []

    def rec(variant: str, metric: str, value: float, unit: str) -> None:
        out.append(
            {"bench": BENCH, "variant": variant, "metric": metric, "value": value, "unit": unit,
             "machine": where, "commit": commit}
        )  # fmt: skip

    for r in runs:
        rec(r["variant"], "seconds_per_epoch", round(r["seconds_per_epoch_mean"], 4), "s")
        rec(r["variant"], "best_val_N@10", round(r["best_val_N@10"], 4), "N@10")
        rec(r["variant"], "epochs_to_best", r["best_epoch"], "epochs")
        rec(r["variant"], "seconds_to_best", round(r["seconds_to_best"], 2), "s")
    if cmp is not None:
        rec(OURS, "speedup_vs_recbole", round(cmp["speedup_per_epoch"], 2), "x")
        rec(OURS, "speedup_to_best_vs_recbole", round(cmp["speedup_time_to_best"], 2), "x")
    return out


def save_raw(args: argparse.Namespace, where: str, runs: list[dict], cmp: dict | None) -> str:
    """Write every number of every run (per-epoch histories included) to --raw-out; returns the commit."""
    from training.report import git_commit

    commit = git_commit(ROOT)
    raw = {"machine": where, "commit": commit, "args": {k: str(v) for k, v in vars(args).items()},
           "runs": runs, "comparison": cmp}  # fmt: skip
    args.raw_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.raw_out.with_name(args.raw_out.name + ".tmp")
    tmp.write_text(json.dumps(raw, indent=1, default=str) + "\n")
    os.replace(tmp, args.raw_out)
    return commit


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    where = machine()
    print(f"machine: {where}; torch threads: {args.threads}", file=sys.stderr, flush=True)

    runs = [run_ours(args)]
    save_raw(args, where, runs, None)  # RecBole takes hours: keep our side even if that run is lost
    if not args.skip_recbole:
        runs.append(run_recbole(args))  # strictly after ours: the two never share the CPU
    cmp = comparison(runs[0], runs[1]) if len(runs) == 2 else None

    print(f"\nSASRec on ml-100k, {where}, torch threads = {args.threads}\n")
    print(table(runs))
    if cmp is not None:
        print(
            f"speedup per epoch (RecBole mean s/epoch / ours): {cmp['speedup_per_epoch']:.1f}x "
            f"(medians: {cmp['speedup_per_epoch_median']:.1f}x, fastest epochs: {cmp['speedup_per_epoch_min']:.1f}x); "
            f"time to best validation: {cmp['speedup_time_to_best']:.1f}x; "
            f"val N@10 ours - RecBole: {cmp['val_delta']:+.4f}"
        )
        print(f"goal (>= {GOAL_SPEEDUP:.0f}x per epoch at equal or better val N@10): "
              f"{'MET' if cmp['goal_met'] else 'NOT MET'}")  # fmt: skip
        if runs[1].get("stopped_by_signal"):
            print(f"caveat: RecBole was stopped early ({runs[1]['stopped_by_signal']}) after "
                  f"{runs[1]['epochs_run']} epochs; its numbers cover those epochs only.")  # fmt: skip
        if cmp["recbole_still_improving"]:
            print(
                f"caveat: RecBole's best validation came at its last epoch ({runs[1]['epochs_run']}): it may "
                "still have been improving; raise --recbole-epochs for a converged comparison."
            )
    for r in runs:
        load = r["loadavg_1m_before_after"]
        print(f"{r['variant']}: wall {r['wall_seconds']:.0f}s, cpu {r['cpu_seconds']:.0f}s, "
              f"1-min load before/after {load[0]:.1f}/{load[1]:.1f}")  # fmt: skip

    from training.report import merge_benchmarks

    commit = save_raw(args, where, runs, cmp)
    if not args.dry_run:
        merge_benchmarks(args.out, records(runs, cmp, where, commit))
        print(f"records merged into {args.out}; details in {args.raw_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
