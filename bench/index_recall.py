"""Recall@10 and query time of the service's faiss index kinds (flat, ivf, hnsw) on synthetic catalogs.

    .venv/bin/python bench/index_recall.py                       # Beauty-sized (12,101 items) and 200k, d=128
    .venv/bin/python bench/index_recall.py --sizes 12101 --queries 500 --threads 1

The catalog is a mixture of Gaussians (items cluster by category, as real embedding tables do; pure isotropic noise
would be the worst case for any approximate index), queries are noisy means of a few items (like an SRS user
state). Recall@10 is measured against exact search over the same vectors (``service.index.recall_at_k``). Query
time is per query, one query at a time (the service's concurrency-1 case) and in batches of 64.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.index import IndexConfig, ItemIndex, recall_at_k  # noqa: E402


def synthetic_catalog(n: int, d: int, seed: int = 0, clusters: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    labels = rng.integers(0, clusters, size=n)
    items = centers[labels] + 0.7 * rng.standard_normal((n, d)).astype(np.float32)
    return np.concatenate([np.zeros((1, d), np.float32), items]).astype(np.float32)


def synthetic_queries(items: np.ndarray, m: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = rng.integers(1, items.shape[0], size=(m, 5))
    q = items[picks].mean(axis=1) + 0.3 * rng.standard_normal((m, items.shape[1])).astype(np.float32)
    return np.ascontiguousarray(q, dtype=np.float32)


def time_queries(index: ItemIndex, q: np.ndarray, batch: int) -> float:
    """Mean milliseconds per query."""
    start = time.perf_counter()
    for i in range(0, len(q), batch):
        index.search(q[i : i + batch], 10)
    return (time.perf_counter() - start) * 1000 / len(q)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[12101, 200_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw"])
    p.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default: faiss's)")
    p.add_argument("--json", type=Path, default=None, help="also write the records here")
    args = p.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    records = []
    print(f"{'items':>8} {'kind':>5} {'build s':>8} {'recall@10':>9} {'ms/q b=1':>9} {'ms/q b=64':>9}")
    for n in args.sizes:
        items = synthetic_catalog(n, args.dim)
        q = synthetic_queries(items, args.queries)
        for kind in args.kinds:
            index = ItemIndex(items, IndexConfig(kind=kind))
            recall = recall_at_k(index, q, 10)
            single = time_queries(index, q[: min(len(q), 300)], 1)
            batched = time_queries(index, q, 64)
            rec = {
                "items": n,
                "dim": args.dim,
                "kind": kind,
                "build_s": round(index.build_seconds, 3),
                "recall_at_10": round(recall, 4),
                "ms_per_query_b1": round(single, 4),
                "ms_per_query_b64": round(batched, 4),
                **{
                    k: v
                    for k, v in index.describe().items()
                    if k not in ("kind", "items", "dim", "build_seconds")
                },
            }
            records.append(rec)
            print(
                f"{n:>8} {kind:>5} {index.build_seconds:>8.2f} {recall:>9.4f} {single:>9.3f} {batched:>9.3f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
