"""The service's speed-ups change no result: recommend batches grouped by history length (``length_groups``)
give the scores of one request at a time; the recommend fast path answers as the FastAPI route does."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest

from service import embedder as embedder_module
from service import recommender as recommender_module
from service.api import fastpath
from service.api.routes import recommend as recommend_route  # binds recommend_body before any patch
from service.batching import length_groups
from service.engine import Engine
from tests.service.helpers import API_KEY, MAX_LEN, N_ITEMS, live_server, run, settings_for


def test_length_groups_cover_the_batch_once_in_length_runs():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([1, 2, 3, 5, 8, 40, 200]) for _ in range(rng.randint(1, 130))]
        for cost in (0, 1, 64, 1 << 20):
            groups = length_groups(lengths, cost)
            assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
            for a, b in zip(groups, groups[1:]):  # runs of the length order
                assert max(lengths[i] for i in a) <= min(lengths[i] for i in b)
    assert length_groups([5, 5, 200], 1 << 20) == [[0, 1, 2]]  # expensive calls: one group
    assert length_groups([5] * 32 + [200], 64) == [list(range(32)), [32]]  # padding 32 rows to 200: split
    assert length_groups([7], 64) == [[0]]


def test_grouped_batch_scores_equal_single_requests(artifacts, monkeypatch):
    """Histories of different lengths in one batch (forced by a wait), one group per length, score as alone."""
    monkeypatch.setattr(recommender_module, "_GROUP_CALL_COST_CPU", 0)  # in-process: the default thread mode

    async def go():
        engine = Engine(settings_for(artifacts, recommend_max_wait_ms=200.0))
        await engine.start()
        try:
            rng = random.Random(1)
            histories = [
                [f"t{rng.randint(1, N_ITEMS)}" for _ in range(rng.choice([1, 2, 3, MAX_LEN, 3 * MAX_LEN]))]
                for _ in range(24)
            ]
            together = await asyncio.gather(*(engine.recommend(h, k=5) for h in histories))
            assert engine._state.rec_batcher.stats.max_batch_seen > 1
            for h, got in zip(histories, together):
                alone = await engine.recommend(h, k=5)
                assert [i for i, _ in got.items] == [i for i, _ in alone.items]
                assert [s for _, s in got.items] == pytest.approx([s for _, s in alone.items], abs=1e-5)
        finally:
            await engine.stop()

    run(go())


def test_recommend_fast_path_answers_as_the_route(artifacts, monkeypatch):
    """service.api.fastpath answers valid application/json recommend requests; another JSON content type goes to
    the FastAPI route. Both give the same bodies, errors included, and the same metrics route label."""
    answered = []

    def counted(rec, k):
        answered.append(k)
        return fastpath.recommend_body.__wrapped__(rec, k)

    counted.__wrapped__ = fastpath.recommend_body
    monkeypatch.setattr(fastpath, "recommend_body", counted)
    with live_server(settings_for(artifacts, api_keys=[API_KEY])) as srv, srv.client() as c:
        cases = [
            {"history": ["t3", "t7", "t7", "t12"], "k": 10},
            {"history": [f"t{i}" for i in range(1, 21)], "k": 3, "exclude_seen": False},
            {"history": ["t1", "nope", "zzz"]},  # engine error: 422 unknown_items
            {"history": ["t1"], "k": 1001},  # engine error: 422 invalid_k
            {"history": ["t1"], "k": 0},  # validation error: the route's 422 either way
            {"history": "t1"},
        ]
        for body in cases:
            raw = json.dumps(body)
            fast = c.post("/v1/recommend", content=raw, headers={"Content-Type": "application/json"})
            route = c.post("/v1/recommend", content=raw, headers={"Content-Type": "application/vnd.x+json"})
            assert fast.status_code == route.status_code, body
            assert fast.json() == route.json(), body
            assert fast.headers["content-type"] == route.headers["content-type"]
        assert c.post("/v1/recommend", json=cases[0]).status_code == 200
        assert answered == [10, 3, 10]  # the valid requests, and only those sent as application/json
        assert recommend_route.recommend_body is counted.__wrapped__
        text = c.get("/metrics").text
        assert 'llmemb_http_requests_total{method="POST",route="/v1/recommend",status="200"} 5.0' in text
        assert 'llmemb_http_requests_total{method="POST",route="/v1/recommend",status="422"} 8.0' in text


def test_grouped_embed_batch_equals_single_items(artifacts, monkeypatch):
    """Prompts of different lengths in one embed batch, one LLM call per length, embed as they do alone."""
    monkeypatch.setattr(embedder_module, "_CALL_COST_CPU", 0)

    async def go():
        engine = Engine(settings_for(artifacts, embed_max_wait_ms=200.0))
        await engine.start()
        try:
            items = [
                {"title": "red kite"},
                {"title": "small wooden train", "year": 1995, "genres": ["outdoor", "baby"]},
                {"title": "bright dark round square soft fast slow old new ball", "genres": ["music"]},
                {"title": "doll"},
            ]
            together = await asyncio.gather(*(engine.embed([a], space="llm") for a in items))
            assert engine._state.embed_batcher.stats.max_batch_seen > 1
            batch = await engine.embed(items, space="item")
            for a, got, row in zip(items, together, batch.vectors):
                alone = await engine.embed([a], space="llm")
                np.testing.assert_allclose(got.vectors, alone.vectors, rtol=1e-5, atol=1e-5)
                single = await engine.embed([a], space="item")
                np.testing.assert_allclose(row, single.vectors[0], rtol=1e-5, atol=1e-5)
        finally:
            await engine.stop()

    run(go())
