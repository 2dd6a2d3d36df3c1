"""FastAPI dependencies: the engine and settings of the app serving the request.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request.
"""

from __future__ import annotations

import base64
import gc

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import JSONResponse

from service.engine import Engine
from service.errors import NotReady
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    if not engine.ready:
        if engine.load_error:
            raise NotReady(f"no bundle loaded: {engine.load_error}", code="load_failed")
        raise NotReady("the service is still loading its bundle")
    await engine.sync_catalog()  # items other HTTP processes registered (one stat when there are none)
    return engine


def encode(vectors: np.ndarray, fmt: str) -> list:
    """Rows as float32 arrays (``FastJSONResponse`` writes them as JSON numbers, each the shortest decimal that
    reads back as the same float32), or base64 of little-endian float32 bytes (what OpenAI's base64 format is)."""
    if fmt == "base64":
        return [
            base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vectors
        ]
    return list(np.ascontiguousarray(vectors, dtype=np.float32))


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson (numpy arrays included). The hot endpoints return one built from plain dicts
    (shaped as their ``response_model``, which stays declared for /docs): FastAPI then neither re-validates the
    result against the model nor encodes it a second time."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def settle_heap() -> None:
    """Exempt what is loaded now (the bundle's catalog, models, modules: ~0.5 M objects) from the cyclic GC.

    Called once a bundle is loaded and after a reload. Without it every full collection walks the whole heap
    (~0.3 s on the CPU machine, the event loop stopped meanwhile), and under load one comes every few thousand
    requests: a stall that shows in p99 latency and throughput. Frozen objects are still freed by reference
    counting; unfreezing first lets the collector reclaim a retired bundle's cycles.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
