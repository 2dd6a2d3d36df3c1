"""CPU per request of the recommend worker process, without HTTP: the engine's real worker (``service.worker``,
started by the engine as ``llmemb serve`` starts it) sent back-to-back batches of Beauty-like requests from one
thread, as the recommend micro-batcher sends them (two in flight).

    .venv/bin/python bench/worker_batch.py --synthetic tiny --scoring device        # the Python around a tiny model
    python3 bench/worker_batch.py --synthetic beauty-smollm2 --device cuda          # the GPU machine

Why: with several HTTP processes sharing one recommend worker on a GPU, the worker's own CPU per request
(unpickling, window cuts, exclusion sets, input tensors, kernel launches, result packing) bounds the service
(docs/BENCHMARKS.md). With ``--synthetic tiny`` on a CPU the model costs little, so what is measured is mostly
that Python. Prints requests/s and the worker's and the sender's CPU microseconds per request (from /proc and
``time.thread_time``); ``--repeat`` runs the timed window that many times and reports each and the median.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.serve import SYNTHETIC, make_workload, proc_cpu_seconds, synthetic_root  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), default="tiny")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--scoring", choices=["auto", "faiss", "device"], default="auto")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="extra service setting, e.g. --set recommend_cuda_graphs=false",
    )
    args = p.parse_args(argv)

    from service.engine import Engine
    from service.settings import Settings

    with tempfile.TemporaryDirectory(prefix="llmemb-bench-worker-") as tmp:
        root = synthetic_root(args.synthetic, (args.workdir or Path(tmp) / "synthetic").resolve())
        work = make_workload(root, n_requests=4096, batch_items=1)
        settings = Settings(
            artifacts=root,
            overlays_dir=Path(tmp) / "overlays",
            device=args.device,
            torch_threads=1,
            recommend_worker="process",
            embed_worker="thread",
            index_scoring=args.scoring,
            warmup=False,
            **dict(item.split("=", 1) for item in args.set),
        )
        engine = Engine(settings)

        def measure() -> list[tuple[float, float, float]]:
            st = engine._state
            reqs = [([st.id_to_row[i] for i in h], 10, True) for h in work.histories]
            batches = [reqs[i : i + args.batch] for i in range(0, len(reqs) - args.batch + 1, args.batch)]
            worker = st.recommender
            out = []
            for _ in range(args.repeat):
                done = {"n": 0}
                stop = time.monotonic() + args.seconds

                def sender(offset: int) -> float:
                    t0 = time.thread_time()
                    j = offset
                    while time.monotonic() < stop:  # noqa: B023 - this window's deadline
                        b = batches[j % len(batches)]
                        worker.serve_batch(b)
                        done["n"] += len(b)  # noqa: B023
                        j += 2
                    return time.thread_time() - t0

                w0, t0 = proc_cpu_seconds(worker.pid), time.perf_counter()
                with ThreadPoolExecutor(2) as pool:  # two batches in flight, as the micro-batcher sends them
                    sent = sum(pool.map(sender, [0, 1]))
                wall, w1 = time.perf_counter() - t0, proc_cpu_seconds(worker.pid)
                n = done["n"]
                out.append((n / wall, 1e6 * (w1 - w0) / n, 1e6 * sent / n))
                print(
                    f"{out[-1][0]:,.0f} req/s; worker {out[-1][1]:.1f} us/req; sender {out[-1][2]:.1f} us/req"
                )
            return out

        async def run() -> tuple[list, str]:
            await engine.start()
            try:
                got = await asyncio.to_thread(measure)
                return got, engine._state.recommender.index_info()
            finally:
                await engine.stop()

        results, info = asyncio.run(run())
    med = [statistics.median(r[i] for r in results) for i in range(3)]
    print(
        f"\n{args.synthetic}, {args.device}, scoring {info.get('scoring')}, cuda graphs "
        f"{info.get('cuda_graphs')}, batch {args.batch}: "
        f"median {med[0]:,.0f} req/s, worker {med[1]:.1f} us/req, sender {med[2]:.1f} us/req"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
