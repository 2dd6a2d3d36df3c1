"""Memory of ``llmemb serve`` with several HTTP processes: the proportional set size (PSS, shared pages split among
the processes that map them) of the whole process tree once it is ready, for each setting given.

    .venv/bin/python bench/group_memory.py --synthetic beauty-smollm2 \
        --config p1: --config p2:embed_worker=process \
        --config p2-shared:embed_worker=process,embed_worker_shared=true   # merges docs/benchmarks.json

A config is ``LABEL:FIELD=VALUE,...`` (``LLMEMB_`` settings of the server; ``processes`` is taken from a label
``pN...`` unless given). Each starts the real server (``bench/serve.py``'s ``Server``, the same launcher and
environment), waits for /ready, waits ``--settle`` seconds, reads /proc/<pid>/smaps_rollup of the server and every
descendant, then stops it. GPU memory is not measured here (the device's own tools say it per process).
Records: ``{bench: "group_memory", variant: "<source>:<label>", metric: "pss_mib" | "processes", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.serve import (  # noqa: E402 - after the path set-up, as a script
    SYNTHETIC,
    Server,
    child_env,
    commit_of_tree,
    descendants,
    machine,
    merge_records,
    synthetic_root,
)


def pss_mib(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else 0.0


def parse_config(text: str) -> tuple[str, dict[str, str]]:
    label, _, rest = text.partition(":")
    settings = dict(kv.split("=", 1) for kv in rest.split(",") if kv.strip())
    m = re.match(r"p(\d+)", label)
    if m and "processes" not in settings:
        settings["processes"] = m.group(1)
    return label, settings


def measure(root: Path, settings: dict[str, str], device: str, settle_s: float, log: Path) -> dict:
    key = "bench-" + secrets.token_hex(16)
    env = {
        "LLMEMB_DEVICE": device,
        "LLMEMB_API_KEYS": key,
        "LLMEMB_LOG_LEVEL": "warning",
        "LLMEMB_OVERLAYS_DIR": str(log.parent / "overlays"),
        ("LLMEMB_BUNDLE" if (root / "manifest.json").is_file() else "LLMEMB_ARTIFACTS"): str(root),
        **{f"LLMEMB_{k.strip().upper()}": v for k, v in settings.items()},
    }
    server = Server(child_env(env), None, log)
    try:
        asyncio.run(server.wait_ready(timeout=600))
        time.sleep(settle_s)
        pids = [server.proc.pid, *descendants(server.proc.pid)]
        return {"pss_mib": sum(pss_mib(p) for p in pids), "processes": len(pids)}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), default="beauty-smollm2")
    p.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the synthetic bundle here")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--config", action="append", required=True, help="LABEL:FIELD=VALUE,... (repeatable)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after /ready before reading memory")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.json")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    where, commit = machine(args.device), args.commit or commit_of_tree()
    with tempfile.TemporaryDirectory(prefix="llmemb-bench-mem-") as tmp:
        root = synthetic_root(args.synthetic, (args.workdir or Path(tmp) / "synthetic").resolve())
        rows, records = [], []
        for text in args.config:
            label, settings = parse_config(text)
            got = measure(root, settings, args.device, args.settle, Path(tmp) / f"{label}.log")
            rows.append((label, settings, got))
            for metric, unit in (("pss_mib", "MiB"), ("processes", "processes")):
                records.append(
                    {
                        "bench": "group_memory",
                        "variant": f"synthetic-{args.synthetic}:{label}",
                        "metric": metric,
                        "value": round(float(got[metric]), 1),
                        "unit": unit,
                        "machine": where,
                        "commit": commit,
                    }
                )
    if not args.dry_run:
        merge_records(args.out, records)
    print(f"\nmachine: {where}; device {args.device}; commit {commit}")
    print(f"{'config':<14} {'processes':>9} {'PSS MiB':>9}  settings")
    for label, settings, got in rows:
        print(f"{label:<14} {got['processes']:>9} {got['pss_mib']:>9.0f}  {settings}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
