"""Request and response bodies (pydantic), with the examples shown at /docs.

Request models forbid unknown fields (a typo is a 422, not a silently ignored option), except the OpenAI-
compatible ``EmbeddingsRequest``, which ignores fields OpenAI defines that we do not use (e.g. ``user``).
Limits that depend on the settings (items per request, characters per attribute, k, history length) are
checked by the engine and answered with 422 in the same error shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Scalar = StrictStr | StrictBool | StrictInt | FiniteFloat | None
AttrValue = Scalar | list[Scalar]
Attributes = dict[str, AttrValue]
Space = Literal["item", "pca", "llm"]
EncodingFormat = Literal["float", "base64"]

_ATTRS_EXAMPLE = {
    "title": "Hydrating rose face mist",
    "brand": "Petal & Co",
    "categories": ["Beauty", "Skin Care"],
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors ---------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(examples=["unknown_items"])
    message: str = Field(examples=["2 unknown item id(s) in history: ['x1', 'x2']"])
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (401, 403, 404, 409, 413, 422, 429, 503, 504)
}


# --- embeddings -----------------------------------------------------------------------------------------------


class EmbedItemsRequest(_Request):
    items: list[Attributes] = Field(min_length=1, description="one attribute map per item")
    space: Space = Field("item", description="item = SRS item space (adapter(pca(llm))), or pca, or llm")
    normalize: bool = Field(False, description="L2-normalise every vector")
    encoding_format: EncodingFormat = Field("float", description="base64 = little-endian float32 bytes")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"items": [_ATTRS_EXAMPLE], "space": "item", "normalize": False}]},
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbedItemsResponse(BaseModel):
    object: Literal["list"] = "list"
    bundle_id: str
    space: Space
    dim: int
    data: list[Embedding]
    usage: Usage


class EmbeddingsRequest(BaseModel):
    """OpenAI's ``POST /v1/embeddings`` body."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "llmemb", "input": ["rose face mist", "matte lipstick"]}]},
    )

    input: str | list[str] = Field(
        description="a string or a list of strings (token arrays are not supported)"
    )
    model: str = Field("llmemb", description="llmemb (= llmemb-llm), llmemb-llm, llmemb-pca or llmemb-item")
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = Field(None, ge=1, description="keep the first n dims, then re-normalise")
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _no_tokens(cls, v):
        if (
            isinstance(v, list)
            and v
            and all(isinstance(x, int | list) and not isinstance(x, bool) for x in v)
        ):
            raise ValueError(
                "token-id arrays are not supported: send the text (a string or a list of strings)"
            )
        return v


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmemb"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# --- items ----------------------------------------------------------------------------------------------------


class NewItem(_Request):
    id: str = Field(min_length=1, examples=["sku-10001"])
    attributes: Attributes = Field(examples=[_ATTRS_EXAMPLE])


class RegisterRequest(_Request):
    items: list[NewItem] = Field(min_length=1)
    upsert: bool = Field(False, description="replace a registered item whose attributes differ (else 409)")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"items": [{"id": "sku-10001", "attributes": _ATTRS_EXAMPLE}]}]},
    )


class RegisteredItem(BaseModel):
    id: str
    row: int
    status: Literal["created", "updated", "unchanged"]


class RegisterResponse(BaseModel):
    bundle_id: str
    n_items: int = Field(description="catalog size after the call")
    items: list[RegisteredItem]


class ItemVector(BaseModel):
    space: Space
    embedding: list[float]


class ItemResponse(BaseModel):
    id: str
    row: int
    source: Literal["bundle", "registered"]
    attributes: dict[str, Any]
    registered: str | None = None
    bundle_id: str
    vector: ItemVector | None = None


# --- recommend ------------------------------------------------------------------------------------------------


class RecommendRequest(_Request):
    history: list[StrictStr] = Field(description="item ids, oldest first; registered items allowed")
    k: StrictInt = Field(10, ge=1, description="how many items (at most LLMEMB_MAX_K)")
    exclude_seen: StrictBool = Field(True, description="leave the history's items out of the results")

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"history": ["B0001", "B0002"], "k": 10}]}
    )


class Scored(BaseModel):
    id: str
    score: float


class RecommendResponse(BaseModel):
    bundle_id: str
    items: list[Scored]
    k: int
    history_length: int = Field(description="ids given")
    history_used: int = Field(description="ids the backbone saw: the most recent `window`")
    truncated: bool = Field(description="true when the history was longer than the backbone's window")
    window: int
    excluded: int = Field(description="distinct items left out as already seen")


# --- tables ---------------------------------------------------------------------------------------------------


class BundleFile(BaseModel):
    path: str
    sha256: str | None
    bytes: int | None
    dtype: str


class TableEntry(BaseModel):
    name: str
    rows: int
    dim: int
    dtype: str
    bundle_rows: int
    registered_rows: int
    formats: list[str]
    bundle_file: BundleFile


class TablesResponse(BaseModel):
    bundle_id: str
    catalog_version: int
    tables: list[TableEntry]


class TableIdsResponse(BaseModel):
    table: str
    bundle_id: str
    catalog_version: int
    rows: int
    ids: list[str | None] = Field(description="ids[r] is the item of row r; ids[0] is null (padding)")


# --- service --------------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    bundle_id: str


class ReloadRequest(_Request):
    bundle_id: str | None = Field(
        None, description="a bundle under <artifacts>/bundles; default: the one CURRENT names now"
    )


class ReloadResponse(BaseModel):
    previous: str | None
    current: str
    seconds: float
