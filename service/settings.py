"""Service settings: pydantic-settings, every field from an ``LLMEMB_`` environment variable (or a keyword).

    LLMEMB_ARTIFACTS=artifacts LLMEMB_API_KEYS=key1,key2 llmemb serve

Auth policy (``check_auth``): with API keys configured, every route but /health, /ready (and /metrics unless
``LLMEMB_METRICS_REQUIRE_AUTH=true``) needs ``Authorization: Bearer <key>``. With no key configured the service
runs open only when it listens on a loopback address (127.0.0.1, ::1, localhost) or when
``LLMEMB_ALLOW_NO_AUTH=true`` says so explicitly; otherwise it refuses to start, so a container bound to 0.0.0.0
is never exposed without keys by accident.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

IndexKind = Literal["auto", "flat", "ivf", "hnsw"]
Device = Literal["auto", "cpu", "cuda"]
WorkerMode = Literal["auto", "thread", "process"]

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class SettingsError(ValueError):
    """The settings cannot run a service (e.g. no API key on a public address)."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# On CUDA the pools only serve faiss's catalog scan and the CPU side of the model: a few threads are plenty.
CUDA_SERVE_THREADS = 4


def serve_threads(device: str = "auto", processes: int = 1) -> int:
    """Intra-op threads for ``llmemb serve`` when LLMEMB_TORCH_THREADS is unset: the usable cores less one, and at
    most CUDA_SERVE_THREADS where the model runs on CUDA (``device`` "cuda", or "auto" with CUDA available).

    The server's event loop (HTTP, validation, the engine's bookkeeping) needs a core of its own: with every core
    in torch's and faiss's OpenMP pools, their threads spin-wait on the loop's core after each op. On the 2-core
    CPU machine one thread served recommend at 1 client with 3.4x less CPU per request (p99 1.7 vs 4.2 ms) and
    the same throughput at 64 clients, and embed at the same rate (bench/serve.py). On a 64-core H100 host, 62
    threads made the recommend worker burn ~49 cores on spin-waits: 4 threads served recommend 5.2x faster at 64
    clients (3,148 vs 611 req/s) with p99 at 1 client 4.5 instead of 20.9 ms, embed unchanged (docs/BENCHMARKS.md).
    With ``processes`` HTTP processes (``llmemb serve --processes N``) the cores less one are shared among them.
    """
    n = max(1, (usable_cores() - 1) // max(1, processes))
    if device.startswith("cuda") or device == "auto" and _cuda_available():
        return min(n, CUDA_SERVE_THREADS)
    return n


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything the service reads from the environment. Field ``x`` is ``LLMEMB_X``."""

    model_config = SettingsConfigDict(env_prefix="LLMEMB_", extra="forbid", validate_default=True)

    # --- what to serve -------------------------------------------------------------------------------------
    artifacts: Path = Field(Path("artifacts"), description="artifacts root: CURRENT, bundles/, overlays/")
    bundle: Path | None = Field(
        None, description="serve this bundle dir instead of the one named by <artifacts>/CURRENT"
    )
    overlays_dir: Path | None = Field(
        None, description="where registered items are kept; default <artifacts>/overlays"
    )
    llm_source: str | None = Field(
        None,
        description="override the bundle's base LLM source (alias, HF dir, .gguf) when its recorded path "
        "does not exist here, e.g. inside a container",
    )
    cache_dir: Path | None = Field(None, description="converted-model cache (default $LLMEMB_CACHE_DIR)")
    device: Device = "auto"
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch and faiss intra-op threads (default: torch's; `llmemb serve`: the cores less one, "
        "see serve_threads)",
    )
    warmup: bool = True
    embed_worker: WorkerMode = Field(
        "auto",
        description="where the LLM of /v1/items/embed, /v1/embeddings and registration runs: `thread` (a thread of "
        "the server process), `process` (a worker process of its own, service/worker.py), `auto` (process on CUDA, "
        "else thread; see embed_worker_mode)",
    )
    recommend_worker: WorkerMode = Field(
        "auto",
        description="where /v1/recommend's backbone + index run: `process` (a worker process of their own, "
        "service/worker.py), `thread` (a thread of the server process), `auto` (process with 2+ usable cores or "
        "on CUDA, else thread; see recommend_worker_mode)",
    )

    # --- network and auth ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="HTTP server processes on the one port (`llmemb serve`; uvicorn's workers). Each loads the "
        "bundle with worker processes of its own; items registered through one and reloads reach all of them "
        "(docs/API.md, Several HTTP processes)",
    )
    recommend_worker_shared: bool = Field(
        True,
        description="with processes > 1 and the recommend path in a worker process: one worker for all HTTP "
        "processes (one GPU context; batches from several processes run as one) instead of one each",
    )
    embed_worker_shared: bool = Field(
        False,
        description="with processes > 1 and the LLM in a worker process: one embed worker (one copy of the LLM) "
        "for all HTTP processes instead of one each; saves the memory of N-1 copies (a 7B LLM: ~14 GB each)",
    )
    group_dir: Path | None = Field(
        None,
        description="set by `llmemb serve` for its HTTP processes when processes > 1: the directory where they "
        "share the bundle being served and their /metrics numbers (not meant to be set by hand)",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer keys"
    )
    api_keys_file: Path | None = Field(None, description="file with one key per line (docker secrets)")
    allow_no_auth: bool = False
    metrics_require_auth: bool = False
    log_level: str = "info"
    access_log: bool = Field(
        True, description="uvicorn's line per request (at log level info): ~0.03 ms of event-loop CPU each"
    )

    # --- request limits ------------------------------------------------------------------------------------
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_items_per_request: int = Field(64, ge=1)
    max_attributes: int = Field(64, ge=1, description="attributes per item")
    max_attr_chars: int = Field(4096, ge=1, description="characters per attribute value (lists: joined)")
    max_text_chars: int = Field(16384, ge=1, description="characters per /v1/embeddings input")
    max_id_chars: int = Field(256, ge=1)
    max_k: int = Field(1000, ge=1)
    max_history: int = Field(
        10_000, ge=1, description="ids per /v1/recommend history; past the backbone's window we truncate"
    )

    # --- micro-batching ------------------------------------------------------------------------------------
    embed_max_batch_size: int = Field(32, ge=1)
    embed_max_batch_tokens: int = Field(8192, ge=1)
    embed_max_wait_ms: float = Field(5.0, ge=0)
    embed_max_queue: int = Field(1024, ge=1)
    embed_request_timeout_s: float = Field(30.0, gt=0)
    recommend_max_batch_size: int = Field(128, ge=1)
    recommend_max_batch_tokens: int = Field(65536, ge=1, description="history positions per batch")
    recommend_max_wait_ms: float = Field(0.0, ge=0)
    recommend_max_queue: int = Field(4096, ge=1)
    recommend_request_timeout_s: float = Field(10.0, gt=0)
    recommend_cuda_graphs: bool = Field(
        True,
        description="on CUDA: run the backbone's forward (SASRec, Bert4Rec) as captured CUDA graphs, one per "
        "padded batch shape, instead of launching its kernels one by one from Python",
    )

    # --- faiss index ---------------------------------------------------------------------------------------
    index_kind: IndexKind = "auto"
    index_approx_threshold: int = Field(
        100_000, ge=1, description="auto: exact up to this many items, approximate (index_approx_kind) above"
    )
    index_approx_kind: Literal["ivf", "hnsw"] = "ivf"
    index_ivf_nprobe: int = Field(32, ge=1)
    index_hnsw_m: int = Field(32, ge=4)
    index_hnsw_ef_search: int = Field(128, ge=1)
    index_scoring: Literal["auto", "faiss", "device"] = Field(
        "auto",
        description="where /v1/recommend's top-k runs: `faiss` (the faiss index, on the CPU), `device` (exact: "
        "one matmul + top-k over the item table on the backbone's device, the index not consulted), `auto` "
        "(device on CUDA where the index is exact, else faiss)",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            v = v.split(",")
        return [k.strip() for k in v if k and k.strip()]

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError("log_level must be one of critical, error, warning, info, debug, trace")
        return v

    @model_validator(mode="after")
    def _read_keys_file(self) -> Settings:
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise ValueError(f"api_keys_file {self.api_keys_file}: {e}") from e
            extra = [k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#")]
            self.api_keys = list(dict.fromkeys([*self.api_keys, *extra]))
        short = [k for k in self.api_keys if len(k) < 8]
        if short:
            raise ValueError("API keys must be at least 8 characters long")
        return self

    def recommend_worker_mode(self, cuda: bool) -> Literal["thread", "process"]:
        """``recommend_worker`` resolved for a server whose device is (``cuda``) or is not CUDA.

        ``auto`` is ``process`` where the event loop and the model can each have a core (2+ usable cores), and on
        CUDA (the model's Python there is kernel launches, which a GIL shared with the event loop delays); on one
        core a second process would only add a message round trip per batch and context switches."""
        if self.recommend_worker != "auto":
            return self.recommend_worker
        return "process" if cuda or usable_cores() >= 2 else "thread"

    def embed_worker_mode(self, cuda: bool) -> Literal["thread", "process"]:
        """``embed_worker`` resolved for a server whose device is (``cuda``) or is not CUDA.

        ``auto`` is ``process`` on CUDA: there the eager forward is Python launching kernels, and on the server's GIL
        it took turns with the event loop (an H100, 64 clients of one item each: 370 -> 740 req/s as a process,
        docs/BENCHMARKS.md). On the CPU the forward's kernels release the GIL and compute dominates: ``thread``."""
        if self.embed_worker != "auto":
            return self.embed_worker
        return "process" if cuda else "thread"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def overlays_root(self) -> Path:
        from models.bundle import OVERLAYS_DIR

        return self.overlays_dir if self.overlays_dir is not None else self.artifacts / OVERLAYS_DIR

    def check_auth(self) -> None:
        """Refuse an open service on a non-loopback address unless LLMEMB_ALLOW_NO_AUTH=true."""
        if self.auth_enabled or self.allow_no_auth or is_loopback(self.host):
            return
        raise SettingsError(
            f"no API key configured and host {self.host!r} is not loopback: set LLMEMB_API_KEYS (comma-separated) "
            "or LLMEMB_API_KEYS_FILE, or LLMEMB_ALLOW_NO_AUTH=true to serve without authentication"
        )
