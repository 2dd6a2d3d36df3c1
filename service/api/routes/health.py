"""Liveness, readiness and Prometheus metrics (open unless LLMEMB_METRICS_REQUIRE_AUTH)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.errors import error_response
from service.api.schemas import ErrorResponse, Health, Ready

router = APIRouter(tags=["service"])


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
async def health() -> Health:
    return Health()


@router.get(
    "/ready",
    response_model=Ready,
    responses={
        503: {
            "model": ErrorResponse,
            "description": "still loading, the bundle failed to load, or the recommend worker process is being "
            "restarted",
        }
    },
    summary="Readiness: a bundle is loaded and warmed up, its recommend worker running",
)
async def ready(request: Request):
    engine = request.app.state.engine
    if engine.ready:
        down = engine.unavailable()
        if down is None:
            return Ready(bundle_id=engine.bundle_id)
        return error_response(503, *down, headers={"Retry-After": "1"})
    if engine.load_error:
        return error_response(
            503, "load_failed", f"no bundle loaded: {engine.load_error}", headers={"Retry-After": "5"}
        )
    return error_response(503, "not_ready", "loading the bundle", headers={"Retry-After": "1"})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}},
)
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)
