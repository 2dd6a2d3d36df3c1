"""Embedding tables: list, streamed download (npy | safetensors | parquet) with a sha256 ETag, and the id map."""

from __future__ import annotations

import hashlib
import json

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse

from service.api.deps import get_engine
from service.api.schemas import ERRORS, TableIdsResponse, TablesResponse
from service.engine import Engine

router = APIRouter(tags=["tables"])


def _etag_matches(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


@router.get(
    "/v1/tables", response_model=TablesResponse, responses=ERRORS, summary="The tables this bundle serves"
)
async def list_tables(engine: Engine = Depends(get_engine)) -> TablesResponse:
    info = engine.info()
    return TablesResponse(
        bundle_id=info["bundle_id"], catalog_version=info["catalog_version"], tables=engine.tables()
    )


@router.get(
    "/v1/tables/{name}",
    responses={
        **ERRORS,
        200: {"content": {"application/octet-stream": {}}, "description": "the table file, streamed"},
        304: {"description": "If-None-Match matched the ETag"},
    },
    response_class=Response,
    summary="Download a table",
    description="Rows 0..n: row 0 padding (zeros in `item`), rows 1..n_items the bundle's items, then registered "
    "items (for llm / pca / item). The id of row r is `/v1/tables/{name}/ids`'s `ids[r]` (parquet also has an "
    "`id` column). `ETag` is the sha256 of the bytes served; `X-Catalog-Version` matches the id map's.",
)
async def download(
    name: str,
    request: Request,
    format: str = Query("safetensors", description="npy | safetensors | parquet"),
    engine: Engine = Depends(get_engine),
):
    tf = await engine.table_file(name, format)
    etag = f'"{tf.sha256}"'
    headers = {
        "ETag": etag,
        "Cache-Control": "no-cache",
        "X-Bundle-Id": tf.bundle_id,
        "X-Catalog-Version": str(tf.catalog_version),
        "X-Table-Rows": str(tf.rows),
        "X-Table-Dim": str(tf.dim),
        "X-Content-SHA256": tf.sha256,
    }
    if _etag_matches(request, etag):
        return Response(status_code=304, headers=headers)
    return FileResponse(tf.path, media_type=tf.media_type, filename=tf.filename, headers=headers)


@router.get(
    "/v1/tables/{name}/ids",
    response_model=TableIdsResponse,
    responses={**ERRORS, 304: {"description": "If-None-Match matched the ETag"}},
    summary="The id map of a table: ids[r] is row r's item id",
)
async def table_ids(name: str, request: Request, engine: Engine = Depends(get_engine)):
    ids, version, bundle_id = engine.table_ids(name)
    body = TableIdsResponse(table=name, bundle_id=bundle_id, catalog_version=version, rows=len(ids), ids=ids)
    raw = json.dumps(body.model_dump(), separators=(",", ":"), ensure_ascii=False).encode()
    etag = f'"{hashlib.sha256(raw).hexdigest()}"'
    headers = {
        "ETag": etag,
        "Cache-Control": "no-cache",
        "X-Catalog-Version": str(version),
        "X-Bundle-Id": bundle_id,
    }
    if _etag_matches(request, etag):
        return Response(status_code=304, headers=headers)
    return Response(raw, media_type="application/json", headers=headers)
