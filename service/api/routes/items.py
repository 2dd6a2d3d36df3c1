"""Catalog items: register new ones (``POST /v1/items``) and look one up (``GET /v1/items/{item_id}``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response

from service.api.deps import get_engine
from service.api.schemas import ERRORS, ItemResponse, RegisterRequest, RegisterResponse, Space
from service.engine import Engine

router = APIRouter(tags=["items"])


@router.post(
    "/v1/items",
    response_model=RegisterResponse,
    responses={**ERRORS, 201: {"model": RegisterResponse, "description": "at least one item was created"}},
    summary="Register items (id + attributes)",
    description="Each item is embedded, appended durably to the bundle's catalog overlay (it survives a restart) "
    "and added to the index and the backbone's item table: recommendable at once. Re-sending an item with the "
    "same attributes changes nothing; other attributes for a registered id are a 409 unless `upsert` is true. "
    "Items of the bundle itself cannot be changed. All-or-nothing: on any error nothing is registered.",
)
async def register(body: RegisterRequest, response: Response, engine: Engine = Depends(get_engine)):
    res = await engine.register([(it.id, it.attributes) for it in body.items], upsert=body.upsert)
    if any(o.status == "created" for o in res.items):
        response.status_code = 201
    return RegisterResponse(
        bundle_id=res.bundle_id,
        n_items=res.n_items,
        items=[{"id": o.id, "row": o.row, "status": o.status} for o in res.items],
    )


@router.get(
    "/v1/items/{item_id:path}",
    response_model=ItemResponse,
    responses=ERRORS,
    summary="One catalog item (bundle or registered)",
)
async def get_item(
    item_id: str,
    space: Space | None = Query(None, description="also return the item's vector in this space"),
    engine: Engine = Depends(get_engine),
) -> ItemResponse:
    rec = engine.get_item(item_id)
    vector = None
    if space is not None:
        vector = {"space": space, "embedding": engine.item_vector(item_id, space).tolist()}
    return ItemResponse(
        id=rec.id,
        row=rec.row,
        source=rec.source,
        attributes=rec.attributes,
        registered=rec.registered,
        bundle_id=rec.bundle_id,
        vector=vector,
    )
