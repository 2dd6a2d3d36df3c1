"""Bundle summary and hot reload."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from service.api.deps import get_engine, settle_heap
from service.api.schemas import ERRORS, ReloadRequest, ReloadResponse
from service.engine import Engine
from service.errors import NotReady

router = APIRouter(tags=["service"])


@router.get(
    "/v1/info", response_model=dict[str, Any], responses=ERRORS, summary="Summary of the served bundle"
)
async def info(engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    return engine.info()


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses=ERRORS,
    summary="Switch to another bundle atomically",
    description="Loads the bundle (default: the one <artifacts>/CURRENT names now) beside the current one, "
    "warms it up, and switches; requests already running finish on the old bundle, none fails. A bundle that "
    "does not load (422 bundle_invalid) leaves the current one serving.",
)
async def reload(request: Request, body: ReloadRequest | None = Body(None)) -> ReloadResponse:
    engine: Engine = request.app.state.engine
    if not engine.ready and engine.loading:
        raise NotReady("the service is still loading its first bundle")
    res = await engine.reload(body.bundle_id if body else None)
    settle_heap()
    return ReloadResponse(**res)
