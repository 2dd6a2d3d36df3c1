"""faiss inner-product index over the catalog's item rows, with per-query exclusion of seen items.

Row ids are bundle rows (1..n_items, then registered items); row 0 is padding and is never indexed or returned.

Kinds (``IndexConfig.kind``):
  "flat"  exact ``IndexFlatIP`` behind an ``IndexIDMap2`` (faiss ids = rows, so an upsert removes the old vector);
  "ivf"   ``IndexIVFFlat`` (inner product), nlist ~ 4 sqrt(n), searched with ``nprobe`` lists;
  "hnsw"  ``IndexHNSWFlat`` (inner product). HNSW cannot delete, so an upsert adds the new vector and marks the
          old one stale (filtered out of results); the graph is rebuilt once stale vectors pass 10 %;
  "auto"  flat up to ``approx_threshold`` rows, ``approx_kind`` above (chosen when the index is built).

Exclusion. ``search(q, k, exclude)`` asks faiss for k + |exclude| candidates, drops excluded rows and keeps the
best k. For the exact index that is always enough. An approximate index may return fewer (IVF lists too short,
HNSW beam too narrow); those queries are retried with a wider search (x4 candidates, nprobe / efSearch x4), and a
query still short of k after that is answered exactly by brute force over the stored vectors. So a query always
gets min(k, indexable rows - excluded) results, none excluded, sorted by decreasing score.

``recall_at_k`` measures an approximate index against exact search on the same vectors (bench/index_recall.py).
The index keeps a float32 copy of every vector (for exact fallback, rebuilds and the recall measurement).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import faiss
import numpy as np

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "hnsw")
_STALE_REBUILD_SHARE = 0.1
_WIDEN = 4


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"
    approx_threshold: int = 100_000  # auto: exact up to this many indexed rows
    approx_kind: str = "ivf"  # what auto picks above the threshold (bench/index_recall.py: IVF wins on IP)
    ivf_nlist: int | None = None  # None: ~4 sqrt(n), at least 39 training points per list
    ivf_nprobe: int = 32
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    train_sample: int = 100_000  # IVF k-means training rows (a random sample)
    seed: int = 0
    scoring: str = (
        "auto"  # exact top-k by "faiss", or on the backbone's "device" (service.recommender); "auto"
    )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        if self.approx_kind not in ("ivf", "hnsw"):
            raise ValueError(f"approx_kind must be 'ivf' or 'hnsw', got {self.approx_kind!r}")
        if self.scoring not in ("auto", "faiss", "device"):
            raise ValueError(f"scoring must be 'auto', 'faiss' or 'device', got {self.scoring!r}")

    def resolve(self, n: int) -> str:
        """The concrete kind for an index of n rows."""
        if self.kind != "auto":
            return self.kind
        return "flat" if n <= self.approx_threshold else self.approx_kind


@dataclass
class SearchResult:
    rows: np.ndarray  # (m,) int64, m <= k, best first
    scores: np.ndarray  # (m,) float32 inner products


def _as_matrix(x: np.ndarray, d: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or (d is not None and x.shape[1] != d):
        raise ValueError(f"expected vectors of shape (n, {d}), got {x.shape}")
    return x


class ItemIndex:
    """Inner-product top-k over rows 1..n_rows-1. Thread-safe (one lock around searches and updates)."""

    def __init__(self, vectors: np.ndarray, config: IndexConfig = IndexConfig()) -> None:
        """``vectors``: (n_rows, d), row 0 padding (ignored); every other row is indexed."""
        vectors = _as_matrix(vectors)
        if vectors.shape[0] < 2:
            raise ValueError("an index needs at least one item row besides padding row 0")
        self.config = config
        self.dim = vectors.shape[1]
        self._lock = threading.RLock()
        self._vecs = vectors.copy()
        self._n_rows = vectors.shape[0]
        self.kind = config.resolve(self._n_rows - 1)
        self.build_seconds = 0.0
        self._build()

    # --- building -------------------------------------------------------------------------------------------

    def _build(self) -> None:
        start = time.perf_counter()
        n, d = self._n_rows - 1, self.dim
        data = self._vecs[1 : self._n_rows]
        rows = np.arange(1, self._n_rows, dtype=np.int64)
        self._stale = 0
        self._quantizer = None
        if self.kind == "flat":
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
            self._index.add_with_ids(data, rows)
        elif self.kind == "ivf":
            nlist = self.config.ivf_nlist or int(4 * math.sqrt(n))
            self.nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))
            self._quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(self._quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(self.config.seed)
            sample = min(n, self.config.train_sample, max(self.nlist * 256, 10_000))
            pick = np.sort(rng.choice(n, size=sample, replace=False)) if sample < n else slice(None)
            index.train(np.ascontiguousarray(data[pick]))
            index.add_with_ids(data, rows)
            self._index = index
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.config.hnsw_ef_construction
            index.add(data)
            self._index = index
            # internal id -> row, and row -> its live internal id (-1: none)
            self._internal_rows = rows.copy()
            self._row_internal = np.full(self._vecs.shape[0], -1, dtype=np.int64)
            self._row_internal[1 : self._n_rows] = np.arange(n, dtype=np.int64)
        else:  # pragma: no cover - resolve() only returns the kinds above
            raise ValueError(self.kind)
        self.build_seconds = time.perf_counter() - start

    @property
    def n_rows(self) -> int:
        """Rows including padding row 0."""
        return self._n_rows

    @property
    def size(self) -> int:
        """Indexed items (rows - 1)."""
        return self._n_rows - 1

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    def vectors(self) -> np.ndarray:
        """The stored vectors, (n_rows, d), row 0 padding (a view: do not modify)."""
        return self._vecs[: self._n_rows]

    def describe(self) -> dict:
        out = {
            "kind": self.kind,
            "items": self.size,
            "dim": self.dim,
            "build_seconds": round(self.build_seconds, 3),
        }
        if self.kind == "ivf":
            out.update(nlist=self.nlist, nprobe=self.config.ivf_nprobe)
        elif self.kind == "hnsw":
            out.update(m=self.config.hnsw_m, ef_search=self.config.hnsw_ef_search, stale=self._stale)
        return out

    # --- updates --------------------------------------------------------------------------------------------

    def upsert(self, rows: Sequence[int] | np.ndarray, vectors: np.ndarray) -> None:
        """Set the vectors of ``rows``: existing rows are replaced (the old vector is gone), rows >= n_rows must
        continue the row numbering (n_rows, n_rows + 1, ... in the order given)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        vectors = _as_matrix(vectors, self.dim)
        if len(rows) != len(vectors):
            raise ValueError(f"{len(rows)} rows but {len(vectors)} vectors")
        if len(rows) == 0:
            return
        if (rows < 1).any():
            raise ValueError("row 0 is padding and cannot be indexed")
        if len(np.unique(rows)) != len(rows):
            raise ValueError("rows must be distinct")
        with self._lock:
            new = rows[rows >= self._n_rows]
            if len(new) and not np.array_equal(new, np.arange(self._n_rows, self._n_rows + len(new))):
                raise ValueError(f"new rows must continue from {self._n_rows} in order, got {new.tolist()}")
            old = rows[rows < self._n_rows]
            self._reserve(self._n_rows + len(new))
            self._vecs[rows] = vectors
            self._n_rows += len(new)
            if self.kind in ("flat", "ivf"):
                if len(old):
                    self._index.remove_ids(old)
                self._index.add_with_ids(vectors, rows)
            else:
                first = self._index.ntotal
                self._index.add(vectors)
                internal = np.arange(first, first + len(rows), dtype=np.int64)
                self._internal_rows = np.concatenate([self._internal_rows, rows])
                if len(self._row_internal) < self._vecs.shape[0]:
                    grown = np.full(self._vecs.shape[0], -1, dtype=np.int64)
                    grown[: len(self._row_internal)] = self._row_internal
                    self._row_internal = grown
                self._stale += int((self._row_internal[old] >= 0).sum())
                self._row_internal[rows] = internal
                if self._stale > max(1000, _STALE_REBUILD_SHARE * self.size):
                    log.info("rebuilding the HNSW index (%d stale vectors)", self._stale)
                    self._build()

    def _reserve(self, n_rows: int) -> None:
        if n_rows <= self._vecs.shape[0]:
            return
        cap = max(n_rows, int(self._vecs.shape[0] * 1.5) + 16)
        grown = np.zeros((cap, self.dim), dtype=np.float32)
        grown[: self._n_rows] = self._vecs[: self._n_rows]
        self._vecs = grown

    # --- search ---------------------------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int | Sequence[int],
        exclude: Sequence[Collection[int]] | None = None,
    ) -> list[SearchResult]:
        """Top-k rows per query by inner product, skipping each query's ``exclude`` rows (see module doc)."""
        q = _as_matrix(queries, self.dim)
        ks, excl = self._normalise_args(len(q), k, exclude)
        out: list[SearchResult | None] = [None] * len(q)
        with self._lock:
            pending = list(range(len(q)))
            for attempt in range(3 if not self.exact else 1):
                if not pending:
                    break
                # One faiss call per power-of-two candidate count: a query with a long history (many
                # exclusions) does not make every query of the batch fetch thousands of candidates.
                groups: dict[int, list[int]] = {}
                for i in pending:
                    groups.setdefault(1 << max(4, (ks[i] + len(excl[i]) - 1).bit_length()), []).append(i)
                still = []
                for need, members in groups.items():
                    want = min(self.size, need * (_WIDEN**attempt))
                    scores, rows = self._raw_search(q[members], want, attempt)
                    for j, i in enumerate(members):
                        res = self._filter(rows[j], scores[j], ks[i], excl[i])
                        enough = len(res.rows) >= ks[i] or (self.exact and want >= self.size)
                        if enough or self._available(excl[i]) <= len(res.rows):
                            out[i] = res
                        else:
                            still.append(i)
                pending = still
            for i in pending:  # approximate search could not fill k: answer exactly
                out[i] = self._exact_one(q[i], ks[i], excl[i])
        return out  # type: ignore[return-value]

    def search_exact(
        self,
        queries: np.ndarray,
        k: int | Sequence[int],
        exclude: Sequence[Collection[int]] | None = None,
    ) -> list[SearchResult]:
        """Brute-force top-k over the stored vectors (the reference for recall)."""
        q = _as_matrix(queries, self.dim)
        ks, excl = self._normalise_args(len(q), k, exclude)
        with self._lock:
            return [self._exact_one(q[i], ks[i], excl[i]) for i in range(len(q))]

    def _normalise_args(self, n, k, exclude) -> tuple[list[int], list[Collection[int]]]:
        ks = [int(k)] * n if isinstance(k, int | np.integer) else [int(x) for x in k]
        if len(ks) != n:
            raise ValueError(f"{len(ks)} k values for {n} queries")
        if any(x < 1 for x in ks):
            raise ValueError("k must be >= 1")
        if exclude is None:
            excl = [set() for _ in range(n)]
        else:
            if len(exclude) != n:
                raise ValueError(f"{len(exclude)} exclusion sets for {n} queries")
            excl = [e if isinstance(e, set | frozenset) else set(e) for e in exclude]
        return ks, excl

    def _available(self, excl: Collection[int]) -> int:
        return self.size - sum(1 for r in excl if 1 <= r < self._n_rows)

    def _raw_search(self, q: np.ndarray, want: int, attempt: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of shape (B, want); rows -1 where faiss had nothing (or the vector is stale)."""
        want = max(1, want)
        if self.kind == "flat":
            return self._index.search(q, want)
        if self.kind == "ivf":
            nprobe = min(self.nlist, self.config.ivf_nprobe * (_WIDEN**attempt))
            return self._index.search(q, want, params=faiss.SearchParametersIVF(nprobe=nprobe))
        ef = max(want, self.config.hnsw_ef_search * (_WIDEN**attempt))
        scores, internal = self._index.search(q, want, params=faiss.SearchParametersHNSW(efSearch=ef))
        rows = np.where(internal >= 0, self._internal_rows[np.maximum(internal, 0)], -1)
        if self._stale:
            live = rows >= 0
            rows = np.where(live & (self._row_internal[np.maximum(rows, 0)] == internal), rows, -1)
        return scores, rows

    @staticmethod
    def _filter(rows: np.ndarray, scores: np.ndarray, k: int, excl: Collection[int]) -> SearchResult:
        keep_rows, keep_scores = [], []
        for r, s in zip(rows.tolist(), scores.tolist()):
            if r < 1 or r in excl:
                continue
            keep_rows.append(r)
            keep_scores.append(s)
            if len(keep_rows) == k:
                break
        return SearchResult(np.asarray(keep_rows, dtype=np.int64), np.asarray(keep_scores, dtype=np.float32))

    def _exact_one(self, q: np.ndarray, k: int, excl: Collection[int]) -> SearchResult:
        scores = self._vecs[1 : self._n_rows] @ q  # (n,) for rows 1..n
        if excl:
            idx = np.fromiter((r - 1 for r in excl if 1 <= r < self._n_rows), dtype=np.int64)
            scores[idx] = -np.inf
        m = min(k, self._available(excl))
        if m <= 0:
            return SearchResult(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        top = np.argpartition(-scores, m - 1)[:m] if m < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]  # by score, ties by row
        return SearchResult((top + 1).astype(np.int64), scores[top].astype(np.float32))


def recall_at_k(index: ItemIndex, queries: np.ndarray, k: int = 10) -> float:
    """Share of the exact top-k (brute force over the same vectors) that ``index.search`` returns."""
    approx = index.search(queries, k)
    exact = index.search_exact(queries, k)
    hits = sum(len(set(a.rows.tolist()) & set(e.rows.tolist())) for a, e in zip(approx, exact))
    total = sum(len(e.rows) for e in exact)
    return hits / total if total else 1.0
