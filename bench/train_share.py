"""Training speed of RAT runs sharing one GPU, and the host syncs per training step, for one or more code trees.

A paper grid runs many small training processes per GPU (`scripts/paper_grid.py --parallel`). Without MPS their
kernels take turns on the GPU, so every device-to-host sync in a training step (`.item()`, boolean indexing,
`torch.unique`) waits behind the other processes' work. This bench measures, for each code tree given:

  syncs/step     one process alone, one epoch, under `torch.cuda.set_sync_debug_mode("warn")` switched on only
                 while the training batches are consumed (validation excluded); also its seconds per epoch;
  shared         `--procs` processes at once on the same GPU, `--epochs` epochs each: the median seconds per epoch
                 of each process (epochs after the first), their mean, and the epochs per second of all together.

The item side is random (an LLM table of width --d-llm and an ID-SASRec target table): speed does not depend on
the values. Each code tree is imported in its own worker processes (PYTHONPATH), one tree after the other.

    python bench/train_share.py --dataset /data/amazon-beauty --code /tmp/before --code /tmp/after \
        --label before --label after --procs 8 --epochs 3 --method LLMEmb --gpu 3 --out /tmp/share.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from training import srs
    from training.rat import RATConfig
    from training.rat import main as rat_main
    from training.split import prepare

    data = prepare(args.dataset)
    gen = torch.Generator().manual_seed(args.seed)
    llm = torch.randn(data.n_items + 1, args.d_llm, generator=gen)
    ids = torch.randn(data.n_items + 1, args.hidden, generator=gen) * 0.1
    cfg = RATConfig(
        srs=srs.SRSTrainConfig(
            backbone=args.backbone,
            seed=args.seed,
            max_epochs=args.epochs,
            patience=args.epochs + 1,
            device=args.device,
            hidden=args.hidden,
            loss=args.loss,
        ),
        method=args.method,
        gamma=0.1,
    )
    if args.count_syncs:
        original = srs.TrainBatches.__iter__

        def counted(self):  # sync warnings only while training batches are consumed
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield from original(self)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        srs.TrainBatches.__iter__ = counted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = rat_main(cfg, data, llm, ids)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
    steps = len(srs.TrainBatches(data, res.model.objective, cfg.srs, np.random.default_rng(0))) * len(
        res.history
    )
    print(
        json.dumps(
            {
                "seconds": [h["seconds"] for h in res.history],
                "steps": steps,
                "syncs": len(syncs),
                "sync_sites": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})[:20],
            }
        )
    )


def run_workers(args: argparse.Namespace, code: str, n: int, epochs: int, count: bool) -> list[dict]:
    env = dict(
        os.environ,
        PYTHONPATH=code,
        CUDA_VISIBLE_DEVICES=str(args.gpu),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TQDM_DISABLE="1",
    )
    base = [sys.executable, __file__, "--worker", "--dataset", args.dataset, "--method", args.method]
    base += ["--loss", args.loss, "--backbone", args.backbone, "--d-llm", str(args.d_llm)]
    base += ["--hidden", str(args.hidden), "--epochs", str(epochs), "--device", args.device]
    base += ["--count-syncs"] if count and args.device == "cuda" else []
    prefix = ["taskset", "-c", args.cores] if args.cores else []
    procs = [
        subprocess.Popen(prefix + base + ["--seed", str(42 + i)], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(n)
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed ({p.returncode}) for {code}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--code", action="append", help="a code tree (repo root) to measure; repeatable")
    p.add_argument("--label", action="append", help="a name per --code")
    p.add_argument("--procs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--method", default="LLMEmb")
    p.add_argument("--loss", default="bce")
    p.add_argument("--backbone", default="sasrec")
    p.add_argument("--d-llm", type=int, default=576, help="LLM table width (SmolLM2-135M: 576)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--cores", default=None, help="taskset core list for the workers")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (no sync count)")
    p.add_argument("--out", default=None, help="write the table as JSON here too")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--count-syncs", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    labels = args.label or [Path(c).name for c in args.code]
    rows = []
    for code, label in zip(args.code, labels, strict=True):
        alone = run_workers(args, code, 1, 1, count=True)[0]
        t0 = time.perf_counter()
        shared = run_workers(args, code, args.procs, args.epochs, count=False)
        wall = time.perf_counter() - t0
        per_proc = [statistics.median(r["seconds"][1:] or r["seconds"]) for r in shared]
        rows.append(
            {
                "label": label,
                "method": args.method,
                "loss": args.loss,
                "backbone": args.backbone,
                "syncs_per_step": round(alone["syncs"] / max(alone["steps"], 1), 2),
                "sync_sites": alone["sync_sites"],
                "alone_s_per_epoch": round(alone["seconds"][0], 2),
                "procs": args.procs,
                "shared_s_per_epoch": round(statistics.mean(per_proc), 2),
                "shared_epochs_per_s": round(sum(1 / s for s in per_proc), 3),
                "wall_s": round(wall, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    import torch

    card = torch.cuda.get_device_name(args.gpu) if torch.cuda.is_available() else "no GPU"
    print(f"\n{card}, {args.method} ({args.loss}) {args.backbone}, {args.procs} processes on one GPU")
    print(f"{'code':<10} {'syncs/step':>10} {'alone s/ep':>10} {'shared s/ep':>11} {'epochs/s':>9}")
    for r in rows:
        print(
            f"{r['label']:<10} {r['syncs_per_step']:>10} {r['alone_s_per_epoch']:>10} "
            f"{r['shared_s_per_epoch']:>11} {r['shared_epochs_per_s']:>9}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"card": card, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
