"""A direct path for ``POST /v1/recommend``, the endpoint with a latency and throughput target.

FastAPI's request handling (its middleware layers, routing, body parsing, dependency solving) costs more event-loop
CPU per request than the rest of a recommendation's Python (bench/serve.py). This ASGI middleware answers a
*valid* recommend request itself, the way the route does: the body parsed as JSON and validated by the same
pydantic model (``RecommendRequest``, python mode, as FastAPI validates it), the same engine call, the same
response. Everything else is passed on untouched to the FastAPI route, so every error keeps its one shape and
code path: a body that is not JSON or does not validate, another content type, an engine that is not ready.
Errors the engine raises (unknown ids, k out of range, overload, timeout) are rendered by ``error_response``,
as the route's exception handler renders them. It sits inside the auth, body-limit and metrics middlewares.

The route in ``routes/recommend.py`` stays: it documents the endpoint at /docs and serves whatever this passes on.
"""

from __future__ import annotations

import orjson
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import FastJSONResponse
from service.api.errors import error_response
from service.api.schemas import RecommendRequest
from service.engine import Engine
from service.errors import ServiceError

PATH = "/v1/recommend"


def recommend_body(rec, k: int) -> dict:
    """The /v1/recommend response (``RecommendResponse``'s fields) for an engine ``Recommendation``."""
    return {
        "bundle_id": rec.bundle_id,
        "items": [{"id": i, "score": s} for i, s in rec.items],
        "k": k,
        "history_length": rec.history_length,
        "history_used": rec.history_used,
        "truncated": rec.truncated,
        "window": rec.window,
        "excluded": rec.excluded,
    }


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


class RecommendFastPath:
    def __init__(self, app: ASGIApp, engine: Engine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or not self.engine.ready
            or not _is_json(scope)
        ):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            req = RecommendRequest.model_validate(orjson.loads(body))
        except (orjson.JSONDecodeError, ValidationError):
            await self.app(scope, _replay(body, receive), send)  # the route answers, with its 422
            return
        scope["llmemb.route"] = PATH
        try:
            rec = await self.engine.recommend(req.history, k=req.k, exclude_seen=req.exclude_seen)
        except ServiceError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.details, exc.headers())
        else:
            response = FastJSONResponse(recommend_body(rec, req.k))
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
