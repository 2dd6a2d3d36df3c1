"""Prometheus metrics of one app (its own registry, so several apps in one process never collide).

llmemb_http_requests_total{method,route,status}        counter; route = the route template, e.g. /v1/items/{item_id}
llmemb_http_request_duration_seconds{method,route}     histogram
llmemb_batch_size{queue} / llmemb_batch_cost{queue}    histograms of items / cost (tokens, history ids) per batch
llmemb_batch_duration_seconds{queue}                   histogram of one batch's compute time
llmemb_queue_rejected_total{queue}                     requests refused with 429 (queue full)
llmemb_queue_timeouts_total{queue}                     requests that hit the per-request timeout
llmemb_queue_depth{queue} / llmemb_queue_in_flight{queue}   gauges at scrape time (autoscaling signal)
llmemb_catalog_items{source="bundle"|"registered"}     gauge
llmemb_ready, llmemb_bundle_info{bundle_id}, llmemb_index_recall_at_10{kind}
llmemb_recommend_worker_up{mode="thread"|"process"}   gauge: 0 while the recommend worker process is down
llmemb_recommend_worker_restarts_total                 worker processes restarted after dying
llmemb_embed_worker_up{mode="process"}, llmemb_embed_worker_restarts_total   the same for the embed worker process
                                                       (LLMEMB_EMBED_WORKER=process only)
llmemb_http_processes                                  HTTP processes serving (``llmemb serve --processes N``)

With several HTTP processes (``llmemb serve --processes N``) any of them answers a scrape with the numbers of all:
counters and histograms through prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by
``llmemb serve`` in the group's directory), the gauges above from every process's stats (``Engine.group_stats``):
queue depths, in-flight counts and worker restarts summed, ``llmemb_ready`` and ``*_worker_up`` 1 only when every
process is, catalog and bundle as the answering process sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``Engine.stats()`` of several HTTP processes as one (the first is the answering process's)."""
    out = dict(stats[0])
    out["ready"] = all(s.get("ready") for s in stats)
    queues: dict[str, dict[str, int]] = {}
    for s in stats:
        for name, q in s.get("queues", {}).items():
            tot = queues.setdefault(name, {"depth": 0, "in_flight": 0})
            tot["depth"] += q["depth"]
            tot["in_flight"] += q["in_flight"]
    out["queues"] = queues
    for kind in ("recommend_worker", "embed_worker"):
        if out.get(kind):
            workers = [s[kind] for s in stats if s.get(kind)]
            out[kind] = {
                **out[kind],
                "available": all(w["available"] for w in workers),
                "restarts": sum(w["restarts"] for w in workers),
            }
    out["processes"] = len(stats)
    return out


class _EngineCollector:
    def __init__(self, stats: Callable[[], list[dict[str, Any]]]) -> None:
        self.stats = stats

    def describe(self):
        return []

    def collect(self):
        s = merge_stats(self.stats())
        procs = GaugeMetricFamily("llmemb_http_processes", "HTTP processes serving")
        procs.add_metric([], s["processes"])
        yield procs
        ready = GaugeMetricFamily("llmemb_ready", "1 while /ready answers 200")
        ready.add_metric([], 1.0 if s.get("ready") else 0.0)
        yield ready
        depth = GaugeMetricFamily(
            "llmemb_queue_depth", "requests waiting in a micro-batch queue", labels=["queue"]
        )
        flight = GaugeMetricFamily(
            "llmemb_queue_in_flight", "requests queued or being computed", labels=["queue"]
        )
        for name, q in s.get("queues", {}).items():
            depth.add_metric([name], q["depth"])
            flight.add_metric([name], q["in_flight"])
        yield depth
        yield flight
        if s.get("bundle_id"):
            items = GaugeMetricFamily("llmemb_catalog_items", "items in the catalog", labels=["source"])
            items.add_metric(["bundle"], s["bundle_items"])
            items.add_metric(["registered"], s["registered_items"])
            yield items
            info = GaugeMetricFamily("llmemb_bundle_info", "the bundle being served", labels=["bundle_id"])
            info.add_metric([s["bundle_id"]], 1.0)
            yield info
        for kind in ("recommend", "embed"):
            worker = s.get(f"{kind}_worker")
            if not worker:
                continue
            up = GaugeMetricFamily(
                f"llmemb_{kind}_worker_up",
                f"1 while the {kind} path can serve (its worker process is running)",
                labels=["mode"],
            )
            up.add_metric([worker["mode"]], 1.0 if worker["available"] else 0.0)
            yield up
            restarts = CounterMetricFamily(
                f"llmemb_{kind}_worker_restarts", f"{kind} worker processes restarted after dying"
            )
            restarts.add_metric([], worker["restarts"])
            yield restarts
        index = s.get("index")
        if index and index.get("recall_at_10") is not None:
            rec = GaugeMetricFamily(
                "llmemb_index_recall_at_10", "approximate index recall@10 vs exact", labels=["kind"]
            )
            rec.add_metric([index["kind"]], index["recall_at_10"])
            yield rec


class Metrics:
    """The app's metrics; also the engine's batch observer."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, stats: Callable[[], list[dict[str, Any]]], multiprocess: bool = False) -> None:
        """``stats()``: the engine stats of every HTTP process (``Engine.group_stats``). ``multiprocess``: the
        counters and histograms are prometheus_client's multiprocess files, rendered for all processes."""
        self.multiprocess = multiprocess
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "llmemb_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "llmemb_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "llmemb_batch_size", "items per micro-batch", ["queue"], buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_cost = Histogram(
            "llmemb_batch_cost",
            "cost per micro-batch (tokens for embed, history ids for recommend)",
            ["queue"],
            buckets=(16, 64, 256, 1024, 4096, 16384, 65536),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "llmemb_batch_duration_seconds",
            "compute time of one micro-batch",
            ["queue"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "llmemb_queue_rejected", "requests refused: queue full", ["queue"], registry=r
        )
        self.timeouts = Counter("llmemb_queue_timeouts", "requests that timed out", ["queue"], registry=r)
        self.engine_collector = _EngineCollector(stats)
        r.register(self.engine_collector)

    # BatchObserver
    def on_batch(self, name: str, size: int, cost: int, seconds: float) -> None:
        self.batch_size.labels(name).observe(size)
        self.batch_cost.labels(name).observe(cost)
        self.batch_seconds.labels(name).observe(seconds)

    def on_reject(self, name: str) -> None:
        self.rejected.labels(name).inc()

    def on_timeout(self, name: str) -> None:
        self.timeouts.labels(name).inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(registry)
        registry.register(self.engine_collector)
        return generate_latest(registry)
