"""Next-item recommendation: the SRS backbone over the history, then faiss top-k with seen-item exclusion."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import FastJSONResponse, get_engine
from service.api.fastpath import recommend_body
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
    # Valid requests are answered by service.api.fastpath before they get here; this serves the rest (and /docs).
    rec = await engine.recommend(body.history, k=body.k, exclude_seen=body.exclude_seen)
    return FastJSONResponse(recommend_body(rec, body.k))
