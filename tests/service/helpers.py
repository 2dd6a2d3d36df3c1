"""Helpers for the service tests: real bundles built in-process with ``models.bundle.save_bundle``, and a live
uvicorn server. (Fixtures are in conftest.py; pytest's importlib mode cannot import a conftest.)

Bundles:

A tiny random LLaMA (tests/tiny_llm.py) with a random (non-zero) LoRA, the catalog embedded through it (``llm``
table), a fitted PCA (``pca`` table), a random Eq. 6 adapter (``item`` table = adapter(pca)), and a SASRec
backbone whose item encoder is the cached ``item`` table - the layout docs/ARTIFACTS.md describes. Built once per
session into a template dir (conftest.py); each test gets its own copy (overlays are written beside the bundles).

Also: a uvicorn server on 127.0.0.1 (random free port) in a thread, for the HTTP tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from models.bundle import BundleParts, untrained_parts
from models.llm import LLMConfig, LLMEmbedder, LoraSettings, random_lora
from models.prompts import PromptConfig, build_prompt
from models.srs import SRSConfig, build_backbone
from models.srs.base import FrozenTableEncoder
from tests.tiny_llm import GENRES, INSTRUCTION, KINDS, TITLES

N_ITEMS = 50
D_M = 16  # PCA size
HIDDEN = 16  # SRS hidden = item dim
MAX_LEN = 8
API_KEY = "test-key-0123456789"
BUNDLE_A, BUNDLE_B, BUNDLE_ID_ONLY = "bundle-a", "bundle-b", "bundle-idonly"


def catalog(n: int = N_ITEMS, seed: int = 0) -> list[tuple[str, dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(1, n + 1):
        title = f"{rng.choice(TITLES)} {rng.choice(TITLES)} {rng.choice(KINDS)}"
        genres = [str(g) for g in rng.choice(GENRES, size=int(rng.integers(1, 3)), replace=False)]
        out.append((f"t{i}", {"title": title, "year": int(rng.integers(1990, 2000)), "genres": genres}))
    return out


def srs_config(n_items: int = N_ITEMS) -> SRSConfig:
    return SRSConfig(n_items=n_items, hidden=HIDDEN, n_layers=1, n_heads=2, dropout=0.0, max_len=MAX_LEN)


def make_parts(workdir: Path, llm_dir: Path, seed: int, with_llm: bool = True) -> BundleParts:
    """The pieces of one bundle; ``seed`` changes the LoRA, adapter and backbone (not the catalog)."""
    torch.manual_seed(seed)
    items = catalog()
    prompt = PromptConfig(instruction=INSTRUCTION)
    cfg = srs_config()
    if not with_llm:  # an ID-only bundle: item table + backbone, nothing to embed new items with
        table = torch.randn(N_ITEMS + 1, HIDDEN) * 0.5
        table[0] = 0
        model = build_backbone("sasrec", cfg, FrozenTableEncoder(table)).eval()
        return BundleParts(
            items=items,
            tables={"item": table},
            srs_backbone="sasrec",
            srs_state=model.state_dict(),
            srs_config=dataclasses.asdict(cfg),
            dataset={"name": "toys"},
            git_sha="test",
        )
    llm_cfg = LLMConfig(source=str(llm_dir), max_length=48, device="cpu")
    embedder = LLMEmbedder(llm_cfg)
    lora_dir = workdir / f"lora-{seed}"
    embedder.model = random_lora(embedder.model, LoraSettings(r=4, alpha=8, dropout=0.0), 0.5, lora_dir)
    llm = torch.zeros(N_ITEMS + 1, embedder.hidden_size)
    llm[1:] = embedder.embed([build_prompt(a, prompt) for _, a in items])
    return untrained_parts(
        items,
        llm,
        pca_k=D_M,
        srs_config=cfg,
        lora_dir=lora_dir,
        configs={
            "prompt": dataclasses.asdict(prompt),
            "llm": {"source": str(llm_dir), "max_length": 48, "dtype": "auto", "pooling": "mean"},
            "lora": {"r": 4, "alpha": 8},
        },
        dataset={"name": "toys", "n_users": 10},
        metrics={"test": {"ndcg@10": 0.1}},
        base_llm={"source": str(llm_dir), "hidden_size": embedder.hidden_size},
        git_sha="test",
    )


# LLMEMB_RECOMMEND_WORKER values. Tests that recommend, register or reload run in both (the ``worker_mode``
# fixture); the others keep the recommend path in the server process, which starts ~2 s faster (no worker
# process importing torch).
WORKER_MODES = ("thread", "process")


def settings_for(artifacts: Path, **kw):
    from service.settings import Settings

    base = {
        "artifacts": artifacts,
        "device": "cpu",
        "torch_threads": 1,
        "embed_max_wait_ms": 2.0,
        "recommend_worker": "thread",
    }
    return Settings(**{**base, **kw})


def serve_env(**settings: str) -> dict[str, str]:
    """The environment for a ``python -m llmemb.cli serve`` child: this one without LLMEMB_* and PROMETHEUS_*
    settings, plus ``settings``, with the repository ahead of whatever PYTHONPATH already holds."""
    root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMEMB_", "PROMETHEUS_"))}
    env.update(settings)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """The response is an error of the API's one shape, with this status (and code); returns its body."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def process_gone(pid: int, timeout: float = 15.0) -> bool:
    """True once process ``pid`` has exited and been reaped (a zombie still counts as there), within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def run(coro):
    """Run a coroutine on a fresh event loop (each engine test owns its loop)."""
    return asyncio.run(coro)


# --- a real uvicorn server in a thread ---------------------------------------------------------------------


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        if wait_ready:
            while True:
                r = httpx.get(f"{self.url}/ready", timeout=5)
                if r.status_code == 200:
                    break
                if r.json()["error"]["code"] == "load_failed" or time.monotonic() > deadline:
                    raise RuntimeError(f"service not ready: {r.text}")
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        with contextlib.suppress(OSError):
            self.sock.close()

    def client(self, key: str | None = API_KEY, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)


@contextlib.contextmanager
def live_server(settings, wait_ready: bool = True):
    from service.app import create_app

    srv = LiveServer(create_app(settings)).start(wait_ready=wait_ready)
    try:
        yield srv
    finally:
        srv.stop()
