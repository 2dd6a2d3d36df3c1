"""The FastAPI app: ``create_app(settings)``.

The lifespan starts loading the bundle in the background, so /health answers at once and /ready turns 200 once
the bundle is loaded and warmed up (503 before, or 503 ``load_failed`` with the reason if it could not load).
On shutdown the engine finishes what is queued before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from models import __version__
from service.api import errors
from service.api.deps import settle_heap
from service.api.fastpath import RecommendFastPath
from service.api.middleware import AuthMiddleware, BodyLimitMiddleware, MetricsMiddleware
from service.api.routes import ROUTERS, TAGS
from service.engine import Engine
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")

DESCRIPTION = """
LLMEmb item embeddings, embedding tables and next-item recommendations for sequential recommenders.

Authentication: `Authorization: Bearer <key>` on every route except `/health`, `/ready` (and `/metrics` unless
`LLMEMB_METRICS_REQUIRE_AUTH=true`) and these docs. Errors are always `{"error": {"code", "message", "details"}}`.
See docs/API.md for curl examples.
"""


def open_paths(settings: Settings) -> list[str]:
    paths = ["/health", "/ready", *DOC_PATHS]
    if not settings.metrics_require_auth:
        paths.append("/metrics")
    return paths


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    on_ready: Callable[[Engine], None] | None = None,
) -> FastAPI:
    """The service app. ``on_ready(engine)`` is called once the first bundle is loaded (e.g. to print examples)."""
    settings = settings or Settings()
    settings.check_auth()
    engine = engine or Engine(settings)
    multiprocess = settings.group_dir is not None and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    metrics = Metrics(engine.group_stats, multiprocess=multiprocess)
    engine.observer = metrics

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.auth_enabled:
            log.warning("no API key configured: authentication is OFF (host %s)", settings.host)

        async def load() -> None:
            try:
                await engine.start()
            except Exception:  # kept in engine.load_error and shown by /ready
                return
            settle_heap()
            if on_ready is not None:
                on_ready(engine)

        task = asyncio.create_task(load(), name="llmemb-load")
        try:
            yield
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await engine.stop()

    app = FastAPI(
        title="llmemb",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=TAGS,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)

    public = open_paths(settings)

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        if settings.auth_enabled:
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearerAuth"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "an API key from LLMEMB_API_KEYS",
            }
            for path, ops in schema.get("paths", {}).items():
                if path not in public:
                    for op in ops.values():
                        op["security"] = [{"bearerAuth": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    # Added innermost first: the body limit sees requests only after auth accepted them; the recommend fast path
    # (valid requests only, the rest goes on to the FastAPI route) only bodies within the limit.
    app.add_middleware(RecommendFastPath, engine=engine)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, keys=settings.api_keys, open_paths=public)
    app.add_middleware(MetricsMiddleware, observe=metrics.observe_request)
    return app


def group_app() -> FastAPI:
    """The app of one of ``llmemb serve --processes N``'s HTTP processes (uvicorn's factory): settings from the
    environment ``service.cli`` prepared; the first process to be ready prints the curl examples."""
    from service.cli import EXAMPLES_MARK, curl_examples

    settings = Settings()

    def ready(engine: Engine) -> None:
        try:
            os.close(os.open(settings.group_dir / EXAMPLES_MARK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # another process printed them
            return
        print("\n" + curl_examples(settings, engine) + "\n", flush=True)

    return create_app(settings, on_ready=ready)
