"""The HTTP API on a real uvicorn server (127.0.0.1, random free port): every endpoint, every auth case, every
bad-input case (never a 500), the OpenAI client, table downloads loaded into our SASRec and into
``nn.Embedding.from_pretrained`` giving the service's scores, overload (429), restart and reload. Registration,
recommendation, tables, overload, restart and reload run with the recommend path in the server process and in a
worker process (LLMEMB_RECOMMEND_WORKER)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from models.bundle import load_bundle
from models.srs import SRSConfig, build_backbone, pad_left
from models.srs.base import FrozenTableEncoder
from service.settings import SettingsError
from tests.service.helpers import (
    API_KEY,
    BUNDLE_A,
    BUNDLE_B,
    MAX_LEN,
    N_ITEMS,
    WORKER_MODES,
    assert_error,
    catalog,
    live_server,
    settings_for,
)

NEW = {"title": "bright wooden kite", "year": 1995, "genres": ["outdoor", "sport"]}


@pytest.fixture(scope="module")
def art(template, tmp_path_factory):
    dst = tmp_path_factory.mktemp("http") / "artifacts"
    shutil.copytree(template / "artifacts", dst)
    return dst


@pytest.fixture(scope="module")
def srv(art):
    with live_server(settings_for(art, api_keys=[API_KEY, "second-key-abcdef"])) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    with srv.client() as c:
        yield c


@pytest.fixture(scope="module", params=WORKER_MODES)
def rec_art(request, template, tmp_path_factory):
    """A private artifacts root per recommend worker mode (the tests register items into it)."""
    dst = tmp_path_factory.mktemp(f"http-{request.param}") / "artifacts"
    shutil.copytree(template / "artifacts", dst)
    return request.param, dst


@pytest.fixture(scope="module")
def rec_client(rec_art):
    """A client of a server whose recommend path runs in the server process, then in a worker process."""
    mode, art = rec_art
    with live_server(settings_for(art, api_keys=[API_KEY], recommend_worker=mode)) as s, s.client() as c:
        yield c


# --- auth -----------------------------------------------------------------------------------------------------


def test_health_ready_metrics_and_docs_are_open_everything_else_needs_a_key(srv):
    with srv.client(key=None) as anon:
        assert anon.get("/health").json() == {"status": "ok"}
        assert anon.get("/ready").json() == {"status": "ready", "bundle_id": BUNDLE_A}
        assert anon.get("/metrics").status_code == 200
        spec = anon.get("/openapi.json").json()
        assert anon.get("/docs").status_code == 200
        for path in ("/v1/info", "/v1/tables", "/v1/items/t1", "/no/such/route"):
            err = assert_error(anon.get(path), 401, "unauthorized")
            assert "Bearer" in err["message"]
        r = anon.post("/v1/recommend", json={"history": ["t1"]})
        assert_error(r, 401) and r.headers["www-authenticate"].startswith("Bearer")
        assert_error(anon.get("/v1/info", headers={"Authorization": "Basic dXNlcjpwYXNz"}), 401)
        assert_error(anon.get("/v1/info", headers={"Authorization": "Bearer"}), 401)
    with srv.client(key="wrong-key-000000") as bad:
        assert_error(bad.get("/v1/info"), 403, "forbidden")
        assert_error(bad.post("/v1/items/embed", content=b"{not json"), 403)  # auth before parsing
    with srv.client(key="second-key-abcdef") as other:
        assert other.get("/v1/info").status_code == 200
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/recommend"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in spec["paths"]["/health"]["get"]
    body = spec["paths"]["/v1/items/embed"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert spec["components"]["schemas"][body["$ref"].split("/")[-1]]["examples"]


# --- embeddings -----------------------------------------------------------------------------------------------


def test_items_embed_spaces_and_encodings(client, art):
    b = load_bundle(art / "bundles" / BUNDLE_A)
    attrs = [a for _, a in catalog()[:3]]
    for space in ("item", "pca", "llm"):
        r = client.post("/v1/items/embed", json={"items": attrs, "space": space})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (
            body["space"] == space
            and body["dim"] == b.table(space).shape[1]
            and body["bundle_id"] == BUNDLE_A
        )
        got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, b.table(space)[1:4].numpy(), rtol=1e-4, atol=1e-4)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    r = client.post("/v1/items/embed", json={"items": attrs, "encoding_format": "base64", "normalize": True})
    vecs = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]])
    want = b.table("item")[1:4].numpy()
    np.testing.assert_allclose(vecs, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)


def test_openai_client_against_the_running_server(srv):
    import openai

    oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0)
    res = oa.embeddings.create(
        model="llmemb", input=["red wooden kite", "blue metal car"]
    )  # client asks base64
    assert [d.index for d in res.data] == [0, 1] and len(res.data[0].embedding) == 32
    assert res.usage.prompt_tokens == res.usage.total_tokens > 0 and res.model == "llmemb"
    assert np.linalg.norm(res.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
    flt = oa.embeddings.create(model="llmemb", input="red wooden kite", encoding_format="float")
    np.testing.assert_allclose(flt.data[0].embedding, res.data[0].embedding, rtol=1e-5, atol=1e-6)
    short = oa.embeddings.create(model="llmemb-item", input="red wooden kite", dimensions=8)
    assert len(short.data[0].embedding) == 8 and np.linalg.norm(short.data[0].embedding) == pytest.approx(1.0)
    assert {m.id for m in oa.models.list().data} == {"llmemb", "llmemb-llm", "llmemb-pca", "llmemb-item"}
    with pytest.raises(openai.NotFoundError):
        oa.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.UnprocessableEntityError):
        oa.embeddings.create(model="llmemb-item", input="x", dimensions=17)
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong-key-000000", max_retries=0).embeddings.create(
            model="llmemb", input="x"
        )


# --- bad input: 413 / 422 / 404, never 500 -------------------------------------------------------------------


def test_oversize_bodies_are_413_with_or_without_content_length(client):
    big = json.dumps({"items": [{"title": "x" * 2_000_000}]}).encode()
    assert_error(
        client.post("/v1/items/embed", content=big, headers={"Content-Type": "application/json"}), 413
    )

    def chunks():
        for _ in range(40):
            yield b" " * 65536

    r = client.post("/v1/items/embed", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413, "payload_too_large")


BAD_REQUESTS = [
    ("/v1/items/embed", b"{not json", "validation_error"),
    ("/v1/items/embed", {}, "validation_error"),
    ("/v1/items/embed", {"items": []}, "validation_error"),
    ("/v1/items/embed", {"items": "title"}, "validation_error"),
    ("/v1/items/embed", {"items": [{"title": {"nested": 1}}]}, "validation_error"),
    ("/v1/items/embed", {"items": [{"title": "x"}], "space": "nope"}, "validation_error"),
    ("/v1/items/embed", {"items": [{"title": "x"}], "surprise": 1}, "validation_error"),
    ("/v1/items/embed", {"items": [{"title": "x"}] * 65}, "too_many_items"),
    ("/v1/items/embed", {"items": [{"title": "x" * 4097}]}, "attribute_too_long"),
    ("/v1/items/embed", [1, 2], "validation_error"),
    ("/v1/items/embed", b'{"items": [{"year": NaN}]}', "validation_error"),
    ("/v1/items/embed", b'{"items": [{"title": "\\ud800"}]}', "invalid_text"),
    ("/v1/embeddings", b'{"model": "llmemb", "input": "\\ud800"}', "invalid_text"),
    ("/v1/recommend", b'{"history": ["\\ud800"]}', "unknown_items"),
    ("/v1/embeddings", {"model": "llmemb"}, "validation_error"),
    ("/v1/embeddings", {"model": "llmemb", "input": [[1, 2, 3]]}, "validation_error"),
    ("/v1/embeddings", {"model": "llmemb", "input": ""}, "invalid_request"),
    ("/v1/embeddings", {"model": "llmemb", "input": "x", "dimensions": 0}, "validation_error"),
    ("/v1/embeddings", {"model": "llmemb", "input": "x", "dimensions": 33}, "dimensions_too_large"),
    ("/v1/embeddings", {"model": "llmemb", "input": "x", "encoding_format": "int8"}, "validation_error"),
    ("/v1/items", {"items": [{"id": "a"}]}, "validation_error"),
    ("/v1/items", {"items": [{"id": "", "attributes": {}}]}, "validation_error"),
    ("/v1/items", {"items": [{"id": "d", "attributes": {}}, {"id": "d", "attributes": {}}]}, "duplicate_ids"),
    ("/v1/items", {"items": [{"id": "x" * 300, "attributes": {}}]}, "invalid_id"),
    ("/v1/recommend", {"history": []}, "empty_history"),
    ("/v1/recommend", {"history": "t1"}, "validation_error"),
    ("/v1/recommend", {"history": [1, 2]}, "validation_error"),
    ("/v1/recommend", {"history": ["t1"], "k": 0}, "validation_error"),
    ("/v1/recommend", {"history": ["t1"], "k": 1001}, "invalid_k"),
    ("/v1/recommend", {"history": ["t1"], "k": "ten"}, "validation_error"),
    ("/v1/recommend", {"history": ["t1"] * 10_001}, "history_too_long"),
    ("/admin/reload", {"bundle": "x"}, "validation_error"),
]


@pytest.mark.parametrize("path,body,code", BAD_REQUESTS)
def test_schema_and_limit_violations_are_422_with_a_clear_message(client, path, body, code):
    kw = (
        {"content": body, "headers": {"Content-Type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    err = assert_error(client.post(path, **kw), 422, code)
    assert len(err["message"]) > 10


def test_unknown_ids_tables_models_and_routes(client):
    err = assert_error(
        client.post("/v1/recommend", json={"history": ["t1", "nope-1", "nope-2"]}), 422, "unknown_items"
    )
    assert err["details"] == {"unknown_ids": ["nope-1", "nope-2"]} and "nope-1" in err["message"]
    assert_error(client.get("/v1/items/nope"), 404, "unknown_item")
    assert_error(client.get("/v1/items/t1?space=nope"), 422, "validation_error")
    assert_error(client.get("/v1/tables/nope"), 404, "unknown_table")
    assert_error(client.get("/v1/tables/nope/ids"), 404, "unknown_table")
    assert_error(client.get("/v1/tables/item?format=csv"), 422, "invalid_format")
    assert_error(client.post("/v1/embeddings", json={"model": "gpt-4", "input": "x"}), 404, "model_not_found")
    assert_error(client.get("/v1/no-such-route"), 404, "not_found")
    assert_error(client.delete("/v1/recommend"), 405, "method_not_allowed")
    assert_error(client.post("/admin/reload", json={"bundle_id": "no-such-bundle"}), 404, "bundle_not_found")


# --- items, recommend, tables ---------------------------------------------------------------------------------


def test_register_get_and_recommend_a_new_item(rec_client):
    client = rec_client
    r = client.post("/v1/items", json={"items": [{"id": "kite-1", "attributes": NEW}]})
    assert r.status_code == 201 and r.json()["items"] == [
        {"id": "kite-1", "row": N_ITEMS + 1, "status": "created"}
    ]
    again = client.post("/v1/items", json={"items": [{"id": "kite-1", "attributes": NEW}]})
    assert again.status_code == 200 and again.json()["items"][0]["status"] == "unchanged"
    err = assert_error(
        client.post("/v1/items", json={"items": [{"id": "kite-1", "attributes": {"title": "other"}}]}), 409
    )
    assert err["code"] == "item_conflict" and err["details"][0]["id"] == "kite-1"
    assert_error(
        client.post(
            "/v1/items", json={"items": [{"id": "t2", "attributes": {"title": "x"}}], "upsert": True}
        ),
        409,
    )
    item = client.get("/v1/items/kite-1", params={"space": "item"}).json()
    assert item["source"] == "registered" and item["attributes"] == NEW and item["registered"].endswith("Z")
    embedded = client.post("/v1/items/embed", json={"items": [NEW]}).json()["data"][0]["embedding"]
    np.testing.assert_allclose(item["vector"]["embedding"], embedded, rtol=1e-5, atol=1e-6)
    assert client.get("/v1/items/t1").json()["source"] == "bundle"

    rec = client.post("/v1/recommend", json={"history": ["t1", "kite-1"], "k": 5}).json()
    assert len(rec["items"]) == 5 and not {"t1", "kite-1"} & {i["id"] for i in rec["items"]}
    assert rec["truncated"] is False and rec["history_used"] == 2 and rec["window"] == MAX_LEN
    long = client.post("/v1/recommend", json={"history": [f"t{i}" for i in range(1, 21)], "k": 3}).json()
    assert long["truncated"] is True and long["history_used"] == MAX_LEN and long["history_length"] == 20
    up = client.post(
        "/v1/items", json={"items": [{"id": "kite-1", "attributes": {"title": "x"}}], "upsert": True}
    )
    assert up.status_code == 200 and up.json()["items"][0]["status"] == "updated"
    client.post("/v1/items", json={"items": [{"id": "kite-1", "attributes": NEW}], "upsert": True})


def test_downloaded_tables_give_the_service_scores_in_our_sasrec_and_plain_torch(rec_client, rec_art):
    client, art = rec_client, rec_art[1]
    client.post("/v1/items", json={"items": [{"id": "kite-2", "attributes": NEW | {"year": 1991}}]})
    listing = client.get("/v1/tables").json()
    assert {t["name"] for t in listing["tables"]} == {"llm", "pca", "item"}
    item_entry = next(t for t in listing["tables"] if t["name"] == "item")
    assert (
        item_entry["registered_rows"] >= 1
        and item_entry["rows"] == N_ITEMS + 1 + item_entry["registered_rows"]
    )

    r = client.get("/v1/tables/item", params={"format": "safetensors"})
    assert r.status_code == 200 and r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
    assert r.headers["x-catalog-version"] and "attachment" in r.headers["content-disposition"]
    assert client.get("/v1/tables/item", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    table = load_safetensors(r.content)["weight"]
    ids_resp = client.get("/v1/tables/item/ids")
    ids = ids_resp.json()["ids"]
    assert ids_resp.headers["x-catalog-version"] == r.headers["x-catalog-version"]
    assert ids[0] is None and len(ids) == table.shape[0] == int(r.headers["x-table-rows"])
    row = {i: n for n, i in enumerate(ids) if i is not None}
    npy = np.load(io.BytesIO(client.get("/v1/tables/item?format=npy").content))
    np.testing.assert_array_equal(npy, table.numpy())
    import pyarrow.parquet as pq

    pt = pq.read_table(io.BytesIO(client.get("/v1/tables/item?format=parquet").content))
    assert pt.column("id").to_pylist() == ids

    history = ["t4", "kite-2", "t9"]
    served = client.post("/v1/recommend", json={"history": history, "k": 10}).json()["items"]

    # our SASRec: the bundle's backbone weights + the downloaded table as its (frozen) item encoder
    b = load_bundle(art / "bundles" / BUNDLE_A)
    model = build_backbone(
        "sasrec", SRSConfig(**{**b.srs_config, "n_items": table.shape[0] - 1}), FrozenTableEncoder(table)
    )
    state = {k: v for k, v in b.srs_state.items() if not k.startswith("item_encoder.")}
    model.load_state_dict(state, strict=False)
    rows = [row[i] for i in history]
    with torch.no_grad():
        user = model.eval()(pad_left([rows], MAX_LEN))
        scores = model.score(user, model.item_table())[0]
    scores[[0, *rows]] = float("-inf")
    top = torch.topk(scores, 10)
    assert [ids[i] for i in top.indices.tolist()] == [s["id"] for s in served]
    np.testing.assert_allclose(top.values.numpy(), [s["score"] for s in served], rtol=1e-4, atol=1e-5)

    # plain PyTorch: nn.Embedding.from_pretrained over the same bytes
    emb = torch.nn.Embedding.from_pretrained(torch.from_numpy(npy), freeze=True, padding_idx=0)
    plain = (user @ emb.weight.T)[0]
    np.testing.assert_allclose(
        plain[[row[s["id"]] for s in served]].numpy(), [s["score"] for s in served], rtol=1e-4, atol=1e-5
    )


def test_info_and_metrics(rec_client, rec_art):
    client, mode = rec_client, rec_art[0]
    info = client.get("/v1/info").json()
    assert (
        info["bundle_id"] == BUNDLE_A
        and info["bundle_items"] == N_ITEMS
        and info["srs"]["backbone"] == "sasrec"
    )
    assert (
        info["index"]["kind"] == "flat"
        and info["index"]["cuda_graphs"] is False
        and info["capabilities"]["recommend"]
    )
    worker = info["recommend_worker"]
    assert worker["mode"] == mode and worker["available"] and worker["restarts"] == 0
    assert worker["torch_threads"] == worker["faiss_threads"] == 1  # LLMEMB_TORCH_THREADS, where batches run
    assert (worker["pid"] == os.getpid()) == (mode == "thread")  # the test runs the server in this process
    client.post("/v1/recommend", json={"history": ["t1"], "k": 3})
    client.get("/v1/items/t1")  # a templated route, whatever ran before this test
    text = client.get("/metrics").text
    assert 'llmemb_http_requests_total{method="POST",route="/v1/recommend",status="200"}' in text
    assert (
        'llmemb_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/recommend"}' in text
    )
    assert 'route="/v1/items/{item_id:path}"' in text  # templates, not raw paths
    for name in (
        "llmemb_batch_size_bucket",
        'llmemb_queue_depth{queue="recommend"}',
        'llmemb_catalog_items{source="bundle"} 50.0',
        "llmemb_ready 1.0",
        f'llmemb_recommend_worker_up{{mode="{mode}"}} 1.0',
        "llmemb_recommend_worker_restarts_total 0.0",
    ):
        assert name in text, name


# --- overload, restart, reload, auth policy -------------------------------------------------------------------


def test_overload_is_429_with_retry_after_and_metrics_can_require_auth(artifacts, worker_mode):
    settings = settings_for(
        artifacts,
        recommend_worker=worker_mode,
        embed_worker=worker_mode,
        api_keys=[API_KEY],
        recommend_max_queue=1,
        recommend_max_batch_size=1,
        recommend_max_wait_ms=0,
        metrics_require_auth=True,
    )
    with live_server(settings) as srv, srv.client() as c:
        batcher = srv.app.state.engine._state.rec_batcher
        fast, gate = batcher.fn, threading.Event()

        def slow(items):  # the batch runs until the test opens the gate
            gate.wait(timeout=30)
            return fast(items)

        batcher.fn = slow
        results: list[httpx.Response] = []

        def call():
            with srv.client() as own:
                results.append(own.post("/v1/recommend", json={"history": ["t1"], "k": 3}))

        def wait_for(in_flight: int) -> None:
            deadline = time.monotonic() + 20
            while batcher.in_flight < in_flight:
                assert time.monotonic() < deadline, "requests did not reach the queue"
                time.sleep(0.01)

        # One batch computing (process mode: a second sent ahead to the worker, max_in_flight=2), one waiting in
        # the queue (max_queue=1).
        admitted = [threading.Thread(target=call) for _ in range(batcher.max_in_flight + 1)]
        for i, t in enumerate(admitted):
            t.start()
            wait_for(i + 1)
        for _ in range(2):  # the queue is full: refused at once, without waiting for the batch
            call()
        gate.set()
        for t in admitted:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes == [200] * len(admitted) + [429, 429], [r.text for r in results]
        rejected = next(r for r in results if r.status_code == 429)
        assert_error(rejected, 429, "overloaded") and int(rejected.headers["retry-after"]) >= 1
        batcher.fn = fast
        with srv.client(key=None) as anon:
            assert_error(anon.get("/metrics"), 401)
        assert 'llmemb_queue_rejected_total{queue="recommend"} 2.0' in c.get("/metrics").text


def test_registrations_survive_a_server_restart(artifacts, worker_mode):
    settings = settings_for(artifacts, api_keys=[API_KEY], recommend_worker=worker_mode)
    with live_server(settings) as srv, srv.client() as c:
        assert c.post("/v1/items", json={"items": [{"id": "kite-9", "attributes": NEW}]}).status_code == 201
        before = c.post("/v1/recommend", json={"history": ["kite-9", "t3"], "k": 5}).json()["items"]
        vec = c.get("/v1/items/kite-9?space=item").json()["vector"]["embedding"]
    with live_server(settings) as srv, srv.client() as c:
        item = c.get("/v1/items/kite-9?space=item").json()
        assert item["row"] == N_ITEMS + 1 and item["vector"]["embedding"] == vec
        assert c.post("/v1/recommend", json={"history": ["kite-9", "t3"], "k": 5}).json()["items"] == before
        assert (
            c.post("/v1/items", json={"items": [{"id": "kite-9", "attributes": NEW}]}).json()["items"][0][
                "status"
            ]
            == "unchanged"
        )


def test_reload_over_http_fails_no_in_flight_request(artifacts, worker_mode):
    settings = settings_for(
        artifacts,
        api_keys=[API_KEY],
        recommend_max_wait_ms=5.0,
        recommend_worker=worker_mode,
        embed_worker=worker_mode,
    )
    with live_server(settings) as srv, srv.client() as c:
        stop = threading.Event()
        seen: list[tuple[int, str | None]] = []

        def hammer():
            with srv.client() as own:
                while not stop.is_set():
                    r = own.post("/v1/recommend", json={"history": ["t1", "t2"], "k": 5})
                    seen.append((r.status_code, r.json().get("bundle_id")))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        r = c.post("/admin/reload", json={"bundle_id": BUNDLE_B})
        deadline = time.monotonic() + 20
        while sum(1 for _, b in seen if b == BUNDLE_B) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join()
        assert r.status_code == 200 and r.json()["previous"] == BUNDLE_A and r.json()["current"] == BUNDLE_B
        assert {code for code, _ in seen} == {200}
        assert seen[0][1] == BUNDLE_A and seen[-1][1] == BUNDLE_B
        assert c.get("/ready").json()["bundle_id"] == BUNDLE_B
        assert c.post("/admin/reload").json()["current"] == BUNDLE_A  # default: what CURRENT names


def test_auth_policy_and_an_id_only_bundle_without_keys(idonly_artifacts):
    from service.app import create_app

    with pytest.raises(SettingsError, match="LLMEMB_API_KEYS"):
        create_app(settings_for(idonly_artifacts, host="0.0.0.0"))
    create_app(settings_for(idonly_artifacts, host="0.0.0.0", allow_no_auth=True))
    with pytest.raises(ValueError, match="at least 8"):
        settings_for(idonly_artifacts, api_keys=["short"])
    with (
        live_server(settings_for(idonly_artifacts)) as srv,
        srv.client(key=None) as anon,
    ):  # loopback, no keys
        assert anon.post("/v1/recommend", json={"history": ["t1"], "k": 2}).status_code == 200
        assert_error(
            anon.post("/v1/items/embed", json={"items": [{"title": "x"}]}), 409, "embedding_unavailable"
        )
        assert_error(anon.post("/v1/embeddings", json={"model": "llmemb", "input": "x"}), 409)
        assert_error(anon.post("/v1/items", json={"items": [{"id": "n", "attributes": {}}]}), 409)
        assert anon.get("/v1/models").json()["data"] == []


def test_ready_reports_a_bundle_that_failed_to_load_and_reload_recovers(tmp_path, template):
    settings = settings_for(tmp_path / "nothing")
    with live_server(settings, wait_ready=False) as srv, srv.client(key=None) as anon:
        deadline = time.monotonic() + 10
        r = anon.get("/ready")
        while r.json()["error"]["code"] != "load_failed" and time.monotonic() < deadline:
            time.sleep(0.02)
            r = anon.get("/ready")
        err = assert_error(r, 503, "load_failed")
        assert "CURRENT is missing" in err["message"]
        assert anon.get("/health").status_code == 200
        assert_error(anon.post("/v1/recommend", json={"history": ["t1"]}), 503, "load_failed")
        shutil.copytree(
            template / "artifacts", tmp_path / "nothing"
        )  # the bundle arrives: reload picks it up
        assert anon.post("/admin/reload").json()["current"] == BUNDLE_A
        assert anon.get("/ready").json() == {"status": "ready", "bundle_id": BUNDLE_A}


def test_serve_command_refuses_nothing_to_serve_and_prints_examples(tmp_path, capsys, artifacts):
    from llmemb.cli import main
    from service.cli import curl_examples

    assert main(["serve", "--artifacts", str(tmp_path / "none")]) == 2
    assert "CURRENT is missing" in capsys.readouterr().err
    assert main(["serve", "--artifacts", str(artifacts), "--host", "0.0.0.0"]) == 2
    assert "LLMEMB_API_KEYS" in capsys.readouterr().err
    settings = settings_for(artifacts, api_keys=[API_KEY], port=8123)
    with live_server(settings) as srv:
        text = curl_examples(settings, srv.app.state.engine)
    for path in (
        "/v1/items/embed",
        "/v1/embeddings",
        "/v1/items",
        "/v1/recommend",
        "/v1/tables/item",
        "/admin/reload",
        "/metrics",
    ):
        assert f"127.0.0.1:8123{path}" in text
    assert "Authorization: Bearer $LLMEMB_API_KEY" in text and '"t1"' in text
