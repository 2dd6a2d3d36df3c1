"""Next-item recommendation: the SRS backbone over the history, then faiss top-k with seen-item exclusion."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import FastJSONResponse, get_engine
from service.api.schemas import ERRORS, RecommendRequest, RecommendResponse
from service.engine import Engine

router = APIRouter(tags=["recommend"])


@router.post(
    "/v1/recommend",
    response_model=RecommendResponse,
    responses=ERRORS,
    summary="Top-k next items for a history of item ids",
    description="Scores are inner products between the backbone's user state and the `item` table rows (the "
    "table served at /v1/tables/item). A history longer than the backbone's window is cut to its most recent "
    "items (`truncated`); with `exclude_seen` every item of the full history is left out.",
)
async def recommend(body: RecommendRequest, engine: Engine = Depends(get_engine)):
    rec = await engine.recommend(body.history, k=body.k, exclude_seen=body.exclude_seen)
    return FastJSONResponse(
        {
            "bundle_id": rec.bundle_id,
            "items": [{"id": i, "score": s} for i, s in rec.items],
            "k": body.k,
            "history_length": rec.history_length,
            "history_used": rec.history_used,
            "truncated": rec.truncated,
            "window": rec.window,
            "excluded": rec.excluded,
        }
    )
