"""The recommend path: the SRS backbone over a growing item table, and the faiss index over the same rows.

    rec = Recommender(spec)                        # spec: RecommenderSpec (item table, backbone state, index config)
    rec.serve_batch([([3, 7, 12], 10, True)])      # -> [([row, ...], [score, ...], excluded)] per request
    rec.apply_rows([51], vectors)                  # a registered (or upserted) item's ``item`` vector

A ``Recommender`` runs where the recommend batches run: on the recommend micro-batcher's worker thread in the
server process (``LLMEMB_RECOMMEND_WORKER=thread``), or in the recommend worker process (``service.worker``), which
builds it from the same picklable ``RecommenderSpec``. The engine talks to either through the same methods
(``serve_batch``, ``apply_rows``, ``available``, ``status``, ``index_info``, ``close``); ``service.worker``'s
``RecommendWorker`` is the process-side twin.

A request is ``(history rows, oldest first, k, exclude_seen)``. The backbone sees the last ``window`` rows; with
``exclude_seen`` every distinct row of the full history is excluded from the top k. ``recommend_batch`` is the
model and index work alone, on requests already cut to the window (what bench/serve.py times as "offline").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import faiss
import numpy as np
import torch
from torch.nn import functional as F

from models.srs import SRSConfig, build_backbone
from models.srs.base import ItemEncoder
from service.batching import length_groups
from service.index import IndexConfig, ItemIndex, SearchResult, recall_at_k

log = logging.getLogger(__name__)

# One backbone call's fixed cost in history positions (padding included): what a separate call for a group of
# histories must save in padding to pay for itself. CPU: ~0.5 ms a call, ~7 us a position (SASRec, hidden 128, 2
# blocks). CUDA: the positions are nearly free and every call is a round of kernel launches, so one call.
_GROUP_CALL_COST_CPU = 64
_GROUP_CALL_COST_CUDA = 1 << 20

# (history rows, k, exclude_seen) -> (rows best first, their scores, distinct rows excluded)
Request = tuple[Sequence[int], int, bool]
Result = tuple[list[int], list[float], int]
# A batch's results as flat arrays: per-request counts (B,) int32, then every request's rows (int64) and scores
# (float32) one after the other, best first. What recommend_batch returns and the worker process sends back.
Packed = tuple[np.ndarray, np.ndarray, np.ndarray]


def pack(results: Sequence[SearchResult]) -> Packed:
    """Per-request ``SearchResult``s (the faiss index's answer) -> ``Packed``."""
    counts = np.fromiter((len(r.rows) for r in results), dtype=np.int32, count=len(results))
    rows = np.concatenate([np.zeros(0, np.int64), *(r.rows for r in results)])
    scores = np.concatenate([np.zeros(0, np.float32), *(r.scores for r in results)])
    return counts, rows, scores


def unpack(counts: np.ndarray, rows: np.ndarray, scores: np.ndarray, excluded: np.ndarray) -> list[Result]:
    """``Packed`` + per-request excluded counts -> one ``Result`` per request."""
    rows_l, scores_l = rows.tolist(), scores.tolist()
    out: list[Result] = []
    at = 0
    for n, ex in zip(counts.tolist(), excluded.tolist()):
        out.append((rows_l[at : at + n], scores_l[at : at + n], ex))
        at += n
    return out


class RecommenderLoadError(RuntimeError):
    """The backbone's state does not fit its config (the message says how)."""


def apply_threads(threads: int | None) -> dict[str, int]:
    """Set torch's and faiss's intra-op threads (None: leave the libraries' defaults) and return the counts in
    effect. OpenMP thread counts are per calling thread: call it on the thread that runs the batches."""
    if threads:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    return {"torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads()}


def resolve_scoring(scoring: str, device: torch.device, exact: bool) -> str:
    """``IndexConfig.scoring`` for a backbone on ``device`` over an index that is (``exact``) or is not exact:
    "device" (exact top-k by matmul on the device) or "faiss". Auto picks the device on CUDA where the index is
    exact anyway: the item table is already there, and faiss's exact search would run on the host's cores."""
    if scoring == "auto":
        return "device" if device.type == "cuda" and exact else "faiss"
    return scoring


def history_window(backbone: str, config: SRSConfig) -> int:
    """History ids a backbone reads: ``max_len`` (Bert4Rec: ``max_len - 1``, its last position is the mask)."""
    return config.max_len - 1 if backbone == "bert4rec" else config.max_len


@dataclass
class RecommenderSpec:
    """Everything a ``Recommender`` is built from. Picklable: the worker process receives it."""

    bundle_id: str
    backbone: str  # "sasrec" | "gru4rec" | "bert4rec"
    srs_config: SRSConfig  # n_items: the bundle's items (the table may hold more rows)
    srs_body: dict[str, torch.Tensor]  # the backbone's state dict without its item encoder
    table: np.ndarray  # (rows, dim) float32: row 0 padding (zeros), bundle rows, then registered rows
    index: IndexConfig
    device: str  # "cpu" | "cuda" | "cuda:N"
    threads: int | None  # torch and faiss intra-op threads (None: the libraries' defaults)
    cuda_graphs: bool = True  # on CUDA: replay captured backbone forwards (``ForwardGraphs``)


def left_padded(
    seqs: Sequence[Sequence[int]], width: int | None = None, rows: int | None = None
) -> np.ndarray:
    """``models.srs.pad_left`` for histories already cut to the window, in numpy with no loop over the batch:
    (``rows`` or B, ``width`` or the longest) int64, each history at the right end of its row, zeros before it
    and in the rows past B."""
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    width = int(lens.max()) if width is None else width
    out = np.zeros((len(seqs) if rows is None else rows, width), dtype=np.int64)
    total = int(lens.sum())
    if total:
        ids = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=total)
        ends = np.cumsum(lens)
        # flat position of each id: its row's end of line, less how many ids of its history come after it
        pos = np.repeat(np.arange(len(seqs), dtype=np.int64) * width + width - ends, lens) + np.arange(total)
        out.reshape(-1)[pos] = ids
    return out


def _pad_rows(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """``left_padded`` as a tensor for the backbone (one tensor for the batch, not one per history)."""
    return torch.from_numpy(left_padded(seqs))


class CatalogEncoder(ItemEncoder):
    """The served backbone's item encoder: a view of the growing item table (bundle + registered rows).
    Not a parameter or buffer, so it is not part of the backbone's state dict and is never copied."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.n_items, self.dim = table.shape[0] - 1, table.shape[1]
        self.weight = table

    def table(self) -> torch.Tensor:
        return self.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _bucket(n: int, floor: int = 1) -> int:
    """The power of two at or above ``max(n, floor)``."""
    return 1 << (max(n, floor) - 1).bit_length()


class ForwardGraphs:
    """The backbone's forward on CUDA as captured CUDA graphs, one per padded shape (batch rounded up to a power
    of two, history width to a power of two from 8, capped at the window), captured on first use and replayed.

    Why: a backbone call is a few dozen small kernels, and on a GPU their launches from Python, not the
    arithmetic, are what a batch costs (docs/BENCHMARKS.md); a replay launches them all at once. The rows past the
    batch are all padding and their states are dropped; positions are right-aligned, so a user's state does not
    depend on the width it was padded to.

    A graph holds the addresses it was captured with: the parameters (the backbone is never rebuilt while served,
    see ``SRSBackbone.items_grew``) and the item table's storage, captured whole (``_Rows.data``, spare rows
    included) so that rows appended within its capacity need no new capture. Captures are dropped and redone
    lazily when the storage moves (capacity grew) or what the forward bakes in changes (Bert4Rec's [mask] id,
    which follows the item count). Batches past ``max_batch`` run in parts.
    """

    MIN_WIDTH = 8

    def __init__(self, model: torch.nn.Module, window: int, max_batch: int = 512) -> None:
        self.model, self.window, self.max_batch = model, window, max_batch
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.key: tuple | None = None
        self.pool = None
        self.captures = 0

    def _capture(self, data: torch.Tensor, b: int, w: int):
        model, enc = self.model, self.model.item_encoder
        view, enc.weight = enc.weight, data  # the whole storage: appended rows are read without a new capture
        try:
            static_in = torch.zeros(b, w, dtype=torch.long, device=data.device)
            side = torch.cuda.Stream(data.device)
            side.wait_stream(torch.cuda.current_stream(data.device))
            with torch.cuda.stream(side):  # warm-up off the capture: lazy initialisation, kernel selection
                for _ in range(2):
                    model(static_in)
            torch.cuda.current_stream(data.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                static_out = model(static_in)
        finally:
            enc.weight = view
        self.captures += 1
        return graph, static_in, static_out

    @torch.inference_mode()
    def users(self, data: torch.Tensor, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """``Recommender.users`` by graph replay, ``data`` the item table's whole storage: (B, dim) float32 on the
        device."""
        if len(seqs) > self.max_batch:
            m = self.max_batch
            return torch.cat([self.users(data, seqs[i : i + m]) for i in range(0, len(seqs), m)])
        key = (data.data_ptr(), data.shape[0], getattr(self.model, "mask_id", None))
        if key != self.key:
            self.graphs.clear()  # frees the old captures' memory with their pool
            self.key, self.pool = key, torch.cuda.graph_pool_handle()
        b = _bucket(len(seqs))
        w = min(self.window, _bucket(max(len(s) for s in seqs), self.MIN_WIDTH))
        entry = self.graphs.get((b, w))
        if entry is None:
            entry = self.graphs[(b, w)] = self._capture(data, b, w)
        graph, static_in, static_out = entry
        static_in.copy_(torch.from_numpy(left_padded(seqs, w, b)))
        graph.replay()
        return static_out[: len(seqs)].to(torch.float32, copy=True)  # the next replay overwrites static_out


class _Rows:
    """A growable float32 matrix (capacity doubling); ``view()`` is rows [0, n)."""

    def __init__(self, initial: torch.Tensor, device: torch.device, spare: int = 256) -> None:
        self.n, self.dim = initial.shape
        self.data = torch.zeros(self.n + spare, self.dim, dtype=torch.float32, device=device)
        self.data[: self.n] = initial.to(device=device, dtype=torch.float32)

    def view(self) -> torch.Tensor:
        return self.data[: self.n]

    def set(self, rows: Sequence[int], vectors: torch.Tensor) -> bool:
        """Write rows (existing ones overwritten, new ones appended in order). True if the storage moved."""
        moved = False
        top = max(rows) + 1
        if top > self.data.shape[0]:
            grown = torch.zeros(
                max(top, int(self.data.shape[0] * 1.5) + 256), self.dim, device=self.data.device
            )
            grown[: self.n] = self.data[: self.n]
            self.data, moved = grown, True
        self.data[torch.as_tensor(list(rows), device=self.data.device)] = vectors.to(self.data)
        self.n = max(self.n, top)
        return moved


class Recommender:
    """The backbone, the item table it reads and the faiss index, built from a ``RecommenderSpec``. Not
    thread-safe: every method but ``status`` and ``index_info`` runs on the one thread that runs the batches."""

    mode = "thread"

    def __init__(self, spec: RecommenderSpec) -> None:
        start = time.perf_counter()
        self.bundle_id = spec.bundle_id
        self.backbone = spec.backbone
        self.srs_config = spec.srs_config
        self.srs_body = spec.srs_body
        self.window = history_window(spec.backbone, spec.srs_config)
        self.device = torch.device(spec.device)
        self.thread_counts: dict[str, int] = {}  # apply_threads() on the batch thread (the engine sets it)
        table = np.ascontiguousarray(spec.table, dtype=np.float32)
        self.item_rows = _Rows(torch.from_numpy(table), self.device)
        try:
            self.model = self._build_model()
        except (RuntimeError, ValueError) as e:
            raise RecommenderLoadError(f"srs/{self.backbone}.safetensors does not fit its config: {e}") from e
        # GRU4Rec packs its sequences by length on the host: not capturable, it runs eagerly.
        self.graphs = (
            ForwardGraphs(self.model, self.window)
            if spec.cuda_graphs and self.device.type == "cuda" and spec.backbone != "gru4rec"
            else None
        )
        self.index = ItemIndex(table, spec.index)
        self.scoring = resolve_scoring(spec.index.scoring, self.device, self.index.exact)
        self.index_recall: float | None = None
        # What approximation costs on this catalog (device scoring is exact: nothing to measure).
        if self.scoring == "faiss" and not self.index.exact:
            rng = np.random.default_rng(0)
            picks = rng.integers(1, self.index.n_rows, size=min(200, self.index.size))
            self.index_recall = recall_at_k(self.index, self.index.vectors()[picks], 10)
            log.info("%s index recall@10 vs exact: %.4f", self.index.kind, self.index_recall)
        self.load_seconds = time.perf_counter() - start

    def _build_model(self) -> torch.nn.Module:
        view = self.item_rows.view()
        cfg = dataclasses.replace(self.srs_config, n_items=view.shape[0] - 1)
        model = build_backbone(self.backbone, cfg, CatalogEncoder(view))
        model.load_state_dict(self.srs_body, strict=True)
        return model.to(self.device).eval().requires_grad_(False)

    # ----- what the engine reads -----

    @property
    def available(self) -> bool:
        return True

    @property
    def unavailable_reason(self) -> str | None:
        return None

    def index_info(self) -> dict[str, Any]:
        return {
            **self.index.describe(),
            "scoring": self.scoring,
            "recall_at_10": self.index_recall,
            # The backbone's forward, the recommend path's other half.
            "cuda_graphs": self.graphs is not None,
        }

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "pid": os.getpid(),  # the process that runs the batches: the server's
            "available": True,
            "reason": None,
            "restarts": 0,
            **self.thread_counts,
        }

    async def close(self) -> None:
        """Nothing to release: the batcher's thread and this object go with the bundle's state."""

    # ----- on the batch thread -----

    def prepare(
        self, batch: Sequence[Request]
    ) -> tuple[list[tuple[tuple[int, ...], int, frozenset[int]]], list[int]]:
        """Requests -> (``recommend_batch``'s input: the window's rows, k, the rows to exclude; excluded counts)."""
        w = self.window
        prepared = []
        excluded = []
        for rows, k, exclude_seen in batch:
            seen = frozenset(rows) if exclude_seen else frozenset()
            prepared.append((tuple(rows[-w:]), k, seen))
            excluded.append(len(seen))
        return prepared, excluded

    def serve_batch(self, batch: Sequence[Request]) -> list[Result]:
        """The micro-batcher's batch function: one ``Result`` per request, in order."""
        prepared, excluded = self.prepare(batch)
        return unpack(*self.recommend_batch(prepared), np.asarray(excluded, dtype=np.int32))

    def recommend_batch(self, batch: list[tuple[tuple[int, ...], int, frozenset[int]]]) -> Packed:
        """Backbone forward (one call per group of similar history lengths) + top-k with exclusion."""
        return self.search(self.users([b[0] for b in batch]), batch)

    @torch.inference_mode()
    def users(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, dim) float32 on the backbone's device: the user vector of each history (already cut to the window)."""
        if self.graphs is not None:
            try:
                return self.graphs.users(self.item_rows.data, seqs)
            except RuntimeError as e:  # a forward this GPU or torch build cannot capture: eager from now on
                log.warning("CUDA graphs off for this bundle's backbone (%s); running it eagerly", e)
                self.graphs = None
        call_cost = _GROUP_CALL_COST_CUDA if self.device.type == "cuda" else _GROUP_CALL_COST_CPU
        groups = length_groups([len(s) for s in seqs], call_cost)
        if len(groups) == 1:
            return self.model(_pad_rows(seqs).to(self.device)).float()
        parts = [self.model(_pad_rows([seqs[i] for i in idx]).to(self.device)).float() for idx in groups]
        order = np.argsort(np.fromiter((i for g in groups for i in g), dtype=np.int64, count=len(seqs)))
        return torch.cat(parts)[torch.from_numpy(order).to(self.device)]

    def search(
        self, users: torch.Tensor, batch: Sequence[tuple[Sequence[int], int, Collection[int]]]
    ) -> Packed:
        """Top-k rows per user vector, each request's excluded rows skipped (``batch``: (_, k, exclude))."""
        if self.scoring == "device":
            return self._search_table(users, batch)
        return pack(self.index.search(users.cpu().numpy(), [b[1] for b in batch], [b[2] for b in batch]))

    @torch.inference_mode()
    def _search_table(
        self, users: torch.Tensor, batch: Sequence[tuple[Sequence[int], int, Collection[int]]]
    ) -> Packed:
        """Exact top-k on the backbone's device: scores against every row of the item table, padding row 0 and
        each request's excluded rows set to -inf, one ``topk`` for the batch; only (B, k) goes to the host. The
        exclusion and the per-request cuts are array operations over the whole batch."""
        table = self.item_rows.view()
        n_rows = table.shape[0]
        scores = users @ table.T  # (B, rows), contiguous
        scores[:, 0] = -math.inf
        lens = [len(b[2]) for b in batch]
        total = sum(lens)
        if total:
            hit = np.fromiter(chain.from_iterable(b[2] for b in batch), dtype=np.int64, count=total)
            flat = np.repeat(np.arange(len(batch), dtype=np.int64) * n_rows, lens) + hit
            flat = flat[(hit > 0) & (hit < n_rows)]
            scores.view(-1).index_fill_(0, torch.from_numpy(flat).to(self.device), -math.inf)
        ks = np.fromiter((b[1] for b in batch), dtype=np.int64, count=len(batch))
        want = min(int(ks.max()), n_rows - 1)
        top_s, top_r = torch.topk(scores, want, dim=1)
        top_s, top_r = top_s.cpu().numpy(), top_r.cpu().numpy()
        keep = (np.arange(want) < ks[:, None]) & (top_s > -np.inf)  # each request's k; no excluded row
        return keep.sum(axis=1, dtype=np.int32), top_r[keep].astype(np.int64), top_s[keep].astype(np.float32)

    def apply_rows(self, rows: Sequence[int], item: np.ndarray) -> None:
        """Set the ``item`` vectors of ``rows`` (new rows continue the numbering) in the table the backbone reads
        and in the index. Runs between batches, so no forward pass sees a half-applied update."""
        last: dict[int, int] = {r: i for i, r in enumerate(rows)}  # a row given twice: the last one wins
        rows = list(last)
        item = np.ascontiguousarray(np.asarray(item, dtype=np.float32)[[last[r] for r in rows]])
        self.item_rows.set(rows, torch.from_numpy(item))
        view = self.item_rows.view()
        enc = self.model.item_encoder
        enc.weight = view
        if view.shape[0] - 1 != enc.n_items:  # rows appended: the backbone goes on with the longer table
            enc.n_items = view.shape[0] - 1
            self.model.items_grew(enc.n_items)
        self.index.upsert(rows, item)
