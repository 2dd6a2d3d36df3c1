"""FastAPI dependencies: the engine and settings of the app serving the request.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request.
"""

from __future__ import annotations

import base64

import numpy as np
from fastapi import Request

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
    return engine


def encode(vectors: np.ndarray, fmt: str) -> list:
    """Rows as JSON float lists, or base64 of little-endian float32 bytes (what OpenAI's base64 format is)."""
    if fmt == "base64":
        return [
            base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vectors
        ]
    return vectors.astype(np.float32).tolist()
