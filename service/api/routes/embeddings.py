"""Embedding endpoints: attribute maps (``/v1/items/embed``) and OpenAI-compatible text (``/v1/embeddings``)."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends

from service.api.deps import FastJSONResponse, encode, get_engine
from service.api.schemas import (
    ERRORS,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedItemsRequest,
    EmbedItemsResponse,
    Model,
    ModelList,
)
from service.engine import Engine
from service.errors import InvalidInput, NotFound

router = APIRouter(tags=["embeddings"])

# OpenAI "model" names -> space. "llmemb" is the fine-tuned LLM's own space.
MODELS = {
    "llmemb": "llm",
    "llmemb-llm": "llm",
    "llmemb-pca": "pca",
    "llmemb-item": "item",
    "llm": "llm",
    "pca": "pca",
    "item": "item",
}


@router.post(
    "/v1/items/embed",
    response_model=EmbedItemsResponse,
    responses=ERRORS,
    summary="Embed items given as attribute maps",
    description="Each attribute map becomes the bundle's prompt (instruction + 'attr is value; ...') and is "
    "embedded in the `item` space (what the SRS backbone uses: adapter(PCA(LLM))), or `pca` / `llm`.",
)
async def embed_items(body: EmbedItemsRequest, engine: Engine = Depends(get_engine)):
    res = await engine.embed(body.items, space=body.space, normalize=body.normalize)
    data = [
        {"object": "embedding", "index": i, "embedding": e}
        for i, e in enumerate(encode(res.vectors, body.encoding_format))
    ]
    tokens = sum(res.tokens)
    return FastJSONResponse(
        {
            "object": "list",
            "bundle_id": res.bundle_id,
            "space": res.space,
            "dim": int(res.vectors.shape[1]),
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    responses=ERRORS,
    summary="OpenAI-compatible embeddings",
    description="The text is embedded as is (it is the prompt). Vectors are L2-normalised, like OpenAI's; "
    "`dimensions` keeps the first n and re-normalises. Inputs longer than the LLM's max_length tokens are cut "
    "there, as in training; `usage` counts the tokens used.",
)
async def embeddings(body: EmbeddingsRequest, engine: Engine = Depends(get_engine)):
    space = MODELS.get(body.model)
    if space is None:
        raise NotFound(
            f"model {body.model!r} does not exist; use one of {sorted(MODELS)}",
            code="model_not_found",
            details={"models": sorted(MODELS)},
        )
    texts = [body.input] if isinstance(body.input, str) else body.input
    res = await engine.embed_texts(texts, space=space, normalize=True)
    vecs = res.vectors
    if body.dimensions is not None:
        if body.dimensions > vecs.shape[1]:
            raise InvalidInput(
                f"dimensions={body.dimensions} is larger than the {space} space ({vecs.shape[1]})",
                code="dimensions_too_large",
                details={"available": int(vecs.shape[1])},
            )
        vecs = vecs[:, : body.dimensions]
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    data = [
        {"object": "embedding", "index": i, "embedding": e}
        for i, e in enumerate(encode(vecs, body.encoding_format))
    ]
    tokens = sum(res.tokens)
    name = body.model if body.model.startswith("llmemb") else f"llmemb-{space}"
    return FastJSONResponse(
        {
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


@router.get("/v1/models", response_model=ModelList, responses=ERRORS, summary="OpenAI-compatible model list")
async def models(engine: Engine = Depends(get_engine)) -> ModelList:
    info = engine.info()
    created = int(np.datetime64(info["created"].rstrip("Z"), "s").astype(int))
    names = (["llmemb"] if "llm" in info["spaces"] else []) + [f"llmemb-{s}" for s in info["spaces"]]
    return ModelList(data=[Model(id=n, created=created) for n in names])
