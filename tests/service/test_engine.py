"""The engine in-process, no HTTP: loading, embedding in every space, registration (idempotent, conflicts, upsert,
durable across a restart), recommendation (exclusion, truncation, unknown ids, same scores as our SASRec on the
bundle's table), table files, reload without failed requests, ID-only and corrupt bundles. Recommendation,
registration and reload run with the recommend path in this process and in a worker process (``worker_mode``);
recommendation also with top-k by faiss and on the backbone's device (``index_scoring``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.bundle import load_bundle
from models.prompts import PromptConfig, build_prompt
from models.srs import SRSConfig, build_backbone, pad_left
from models.srs.base import FrozenTableEncoder
from service.engine import Engine, EngineLoadError
from service.errors import Conflict, InvalidInput, NotFound, NotReady
from tests.service.helpers import (
    BUNDLE_A,
    BUNDLE_B,
    MAX_LEN,
    N_ITEMS,
    catalog,
    process_gone,
    run,
    settings_for,
)
from tests.tiny_llm import INSTRUCTION

NEW_ATTRS = {"title": "bright wooden kite", "year": 1995, "genres": ["outdoor"]}


def served_scores(bundle_dir, table: torch.Tensor, history_rows: list[int]) -> torch.Tensor:
    """Scores of every row for a history, by our SASRec loaded from the bundle with ``table`` as its items."""
    b = load_bundle(bundle_dir)
    cfg = SRSConfig(**{**b.srs_config, "n_items": table.shape[0] - 1})
    model = build_backbone("sasrec", cfg, FrozenTableEncoder(table))
    state = {k: v for k, v in b.srs_state.items() if not k.startswith("item_encoder.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["item_encoder.weight"] and not unexpected
    with torch.no_grad():
        user = model.eval()(pad_left([history_rows], MAX_LEN))
        return model.score(user, table)[0]


@pytest.mark.parametrize("embed_worker", ["thread", "process"])
def test_embed_matches_the_bundle_tables(artifacts, embed_worker):
    async def go():
        engine = Engine(settings_for(artifacts, embed_worker=embed_worker))
        await engine.start()
        try:
            worker = engine.info()["embed_worker"]
            if embed_worker == "process":
                assert worker["mode"] == "process" and worker["available"] and worker["pid"] != os.getpid()
                assert engine._state.embedder.model is None  # this process only tokenizes
            else:
                assert worker is None and engine._state.embed_model is not None
            b = load_bundle(artifacts)
            attrs = [a for _, a in catalog()[:5]]
            for space in ("llm", "pca", "item"):
                res = await engine.embed(attrs, space=space)
                want = b.table(space)[1:6].numpy()
                np.testing.assert_allclose(res.vectors, want, rtol=1e-4, atol=1e-4)
                assert res.space == space and res.bundle_id == BUNDLE_A and all(t > 5 for t in res.tokens)
            unit = await engine.embed(attrs, space="item", normalize=True)
            np.testing.assert_allclose(np.linalg.norm(unit.vectors, axis=1), 1.0, rtol=1e-5)
            prompt = build_prompt(attrs[0], PromptConfig(instruction=INSTRUCTION))
            text = await engine.embed_texts([prompt], space="llm", normalize=False)
            np.testing.assert_allclose(text.vectors[0], b.table("llm")[1].numpy(), rtol=1e-4, atol=1e-4)
            info = engine.info()
            assert info["consistency"]["llm_table_min_cosine"] > 0.9999
            assert info["item_space"] == "adapter(pca(llm(prompt)))"
            assert info["capabilities"] == {"embed": True, "register": True, "recommend": True}
            assert info["llm"]["lora"] and info["llm"]["prompt_config"] == "bundle"
            with pytest.raises(InvalidInput, match="too many items"):
                await engine.embed([{"title": "x"}] * 65)
            with pytest.raises(InvalidInput, match="characters"):
                await engine.embed([{"title": "x" * 5000}])
            with pytest.raises(InvalidInput, match="unknown space"):
                await engine.embed(attrs, space="nope")
        finally:
            await engine.stop()

    run(go())


@pytest.mark.parametrize("scoring", ["faiss", "device"])
def test_recommend_scores_exclusion_truncation_and_errors(artifacts, worker_mode, scoring):
    async def go():
        engine = Engine(settings_for(artifacts, recommend_worker=worker_mode, index_scoring=scoring))
        await engine.start()
        try:
            assert engine.info()["index"]["scoring"] == scoring
            history = [f"t{i}" for i in (3, 7, 7, 12)]
            rec = await engine.recommend(history, k=10, exclude_seen=True)
            assert len(rec.items) == 10 and not rec.truncated and rec.history_used == 4 and rec.excluded == 3
            assert not {"t3", "t7", "t12"} & {i for i, _ in rec.items}
            b = load_bundle(artifacts)
            scores = served_scores(artifacts, b.table("item"), [3, 7, 7, 12])
            for item_id, score in rec.items:
                assert score == pytest.approx(float(scores[int(item_id[1:])]), abs=1e-4)
            masked = scores.clone()
            masked[[0, 3, 7, 12]] = float("-inf")
            assert [i for i, _ in rec.items] == [f"t{r}" for r in torch.topk(masked, 10).indices.tolist()]

            seen = await engine.recommend(history, k=N_ITEMS, exclude_seen=False)
            assert len(seen.items) == N_ITEMS and seen.excluded == 0
            everything_but_two = [f"t{i}" for i in range(1, N_ITEMS - 1)]
            rest = await engine.recommend(everything_but_two, k=10)
            assert rest.truncated and rest.history_used == MAX_LEN and rest.history_length == N_ITEMS - 2
            assert {i for i, _ in rest.items} == {f"t{N_ITEMS - 1}", f"t{N_ITEMS}"}  # k > what is left

            with pytest.raises(InvalidInput, match=r"2 unknown item id\(s\)") as e:
                await engine.recommend(["t1", "nope", "zzz", "nope"], k=5)
            assert e.value.details == {"unknown_ids": ["nope", "zzz"]} and e.value.code == "unknown_items"
            with pytest.raises(InvalidInput, match="at least one"):
                await engine.recommend([], k=5)
            with pytest.raises(InvalidInput, match="k must be"):
                await engine.recommend(["t1"], k=1001)
        finally:
            await engine.stop()

    run(go())


def test_register_is_idempotent_conflicts_upserts_and_survives_restart(artifacts, worker_mode):
    settings = settings_for(artifacts, recommend_worker=worker_mode, embed_worker=worker_mode)

    async def first():
        engine = Engine(settings)
        await engine.start()
        try:
            res = await engine.register([("new-1", NEW_ATTRS), ("new-2", {"title": "dark metal drum"})])
            assert [(o.id, o.row, o.status) for o in res.items] == [
                ("new-1", N_ITEMS + 1, "created"),
                ("new-2", N_ITEMS + 2, "created"),
            ]
            again = await engine.register([("new-1", dict(reversed(list(NEW_ATTRS.items()))))])
            assert again.items[0].status == "unchanged" and again.n_items == N_ITEMS + 2
            with pytest.raises(Conflict, match="other attributes") as e:
                await engine.register([("new-1", {"title": "something else"})])
            assert e.value.details[0]["id"] == "new-1"
            with pytest.raises(Conflict, match="other attributes"):
                await engine.register([("t1", {"title": "renamed"})])
            with pytest.raises(Conflict):
                await engine.register(
                    [("t1", {"title": "renamed"})], upsert=True
                )  # bundle items are immutable
            assert (await engine.register([("t1", dict(catalog()[0][1]))])).items[0].status == "unchanged"
            with pytest.raises(InvalidInput, match="duplicate"):
                await engine.register([("x", {}), ("x", {})])
            with pytest.raises(InvalidInput, match="invalid item ids"):
                await engine.register([(" padded ", {})])

            # the new item's item-space vector is adapter(pca(llm(prompt))), the same as /embed gives
            emb = await engine.embed([NEW_ATTRS])
            np.testing.assert_allclose(
                engine.item_vector("new-1", "item"), emb.vectors[0], rtol=1e-5, atol=1e-6
            )
            rec = await engine.recommend(["t1", "new-1"], k=N_ITEMS + 2, exclude_seen=False)
            assert {"new-1", "new-2"} <= {i for i, _ in rec.items}
            up = await engine.register([("new-2", {"title": "round soft bear"})], upsert=True)
            assert up.items[0].status == "updated" and up.items[0].row == N_ITEMS + 2
            upd = await engine.embed([{"title": "round soft bear"}])
            np.testing.assert_allclose(
                engine.item_vector("new-2", "item"), upd.vectors[0], rtol=1e-5, atol=1e-6
            )
            return engine.item_vector("new-2", "item"), (
                await engine.recommend(["new-1", "new-2"], k=5)
            ).items
        finally:
            await engine.stop()

    vec, recs = run(first())
    lines = (artifacts / "overlays" / BUNDLE_A / "items.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["new-1", "new-2", "new-2"]

    async def second():  # a new process: the overlay is replayed from disk
        engine = Engine(settings)
        await engine.start()
        try:
            item = engine.get_item("new-2")
            assert (item.row, item.source, item.attributes) == (
                N_ITEMS + 2,
                "registered",
                {"title": "round soft bear"},
            )
            np.testing.assert_allclose(engine.item_vector("new-2", "item"), vec, rtol=1e-5, atol=1e-6)
            again = await engine.recommend(["new-1", "new-2"], k=5)
            assert [i for i, _ in again.items] == [i for i, _ in recs]
            np.testing.assert_allclose([s for _, s in again.items], [s for _, s in recs], rtol=1e-5)
            assert engine.get_item("t1").source == "bundle"
            with pytest.raises(NotFound):
                engine.get_item("never")
        finally:
            await engine.stop()

    run(second())
    # a lost vector cache is recomputed from items.jsonl; a torn last line (crash mid-append) is cut off
    (artifacts / "overlays" / BUNDLE_A / "vectors.bin").unlink()
    with open(artifacts / "overlays" / BUNDLE_A / "items.jsonl", "a") as f:
        f.write('{"row": 53, "id": "torn')
    run(second())
    assert (artifacts / "overlays" / BUNDLE_A / "vectors.bin").is_file()


def test_table_files_in_every_format(artifacts):
    async def go():
        engine = Engine(settings_for(artifacts))
        await engine.start()
        try:
            b = load_bundle(artifacts)
            tf = await engine.table_file("item", "safetensors")
            assert (
                tf.path == b.table_path("item")
                and tf.sha256 == b.manifest.files["tables/item.safetensors"].sha256
            )
            await engine.register([("new-1", NEW_ATTRS)])
            ids, version, _ = engine.table_ids("item")
            assert ids[0] is None and ids[-1] == "new-1" and len(ids) == N_ITEMS + 2 and version >= 1
            want = np.concatenate([b.table("item").numpy(), engine.item_vector("new-1", "item")[None]])
            st = await engine.table_file("item", "safetensors")
            assert st.rows == N_ITEMS + 2 and st.path != b.table_path("item")
            np.testing.assert_array_equal(load_file(str(st.path))["weight"].numpy(), want)
            np.testing.assert_array_equal(np.load((await engine.table_file("item", "npy")).path), want)
            import pyarrow.parquet as pq

            t = pq.read_table((await engine.table_file("item", "parquet")).path)
            assert t.column("id").to_pylist() == ids and t.column("row").to_pylist() == list(
                range(N_ITEMS + 2)
            )
            np.testing.assert_array_equal(np.array(t.column("embedding").to_pylist(), dtype=np.float32), want)
            assert (await engine.table_file("item", "npy")).sha256 == (
                await engine.table_file("item", "npy")
            ).sha256
            with pytest.raises(NotFound):
                await engine.table_file("nope", "npy")
            with pytest.raises(InvalidInput):
                await engine.table_file("item", "csv")
        finally:
            await engine.stop()

    run(go())


def test_reload_switches_bundles_without_failing_in_flight_requests(artifacts, worker_mode):
    async def go():
        engine = Engine(
            settings_for(
                artifacts, recommend_max_wait_ms=5.0, recommend_worker=worker_mode, embed_worker=worker_mode
            )
        )
        await engine.start()
        try:
            first = engine.info()["recommend_worker"]
            assert first["mode"] == worker_mode and first["available"]
            before = (await engine.recommend(["t1", "t2"], k=5)).items
            stop = asyncio.Event()
            seen: list[str] = []

            async def client():
                while not stop.is_set():
                    r = await engine.recommend(["t1", "t2"], k=5)
                    seen.append(r.bundle_id)

            clients = [asyncio.create_task(client()) for _ in range(8)]
            await asyncio.sleep(0.05)
            res = await engine.reload(BUNDLE_B)
            for _ in range(500):  # let every client finish at least one request on the new bundle
                if seen.count(BUNDLE_B) >= 8:
                    break
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*clients)  # any failed request would raise here
            assert res["previous"] == BUNDLE_A and res["current"] == BUNDLE_B
            assert seen[0] == BUNDLE_A and seen[-1] == BUNDLE_B
            after = (await engine.recommend(["t1", "t2"], k=5)).items
            assert after != before and engine.bundle_id == BUNDLE_B
            with pytest.raises(NotFound):
                await engine.reload("no-such-bundle")
            assert engine.bundle_id == BUNDLE_B
            if worker_mode == "process":  # the old bundle's worker went with it; the new one has its own
                new_pid = engine.info()["recommend_worker"]["pid"]
                assert new_pid != first["pid"] and process_gone(first["pid"])
        finally:
            await engine.stop()
        if worker_mode == "process":
            assert process_gone(new_pid)

    run(go())


def test_id_only_bundle_recommends_but_cannot_embed(idonly_artifacts, worker_mode):
    async def go():
        engine = Engine(settings_for(idonly_artifacts, recommend_worker=worker_mode))
        await engine.start()
        try:
            rec = await engine.recommend(["t1", "t2"], k=3)
            assert len(rec.items) == 3
            with pytest.raises(Conflict) as e:
                await engine.embed([{"title": "x"}])
            assert e.value.code == "embedding_unavailable"
            with pytest.raises(Conflict) as e:
                await engine.register([("n", {"title": "x"})])
            assert e.value.code == "registration_unavailable"
            assert engine.info()["capabilities"] == {"embed": False, "register": False, "recommend": True}
        finally:
            await engine.stop()

    run(go())


def test_corrupt_or_missing_bundle_is_refused(artifacts, tmp_path):
    p = artifacts / "bundles" / BUNDLE_A / "tables" / "item.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(EngineLoadError, match=r"tables/item\.safetensors: sha256 mismatch"):
        run(Engine(settings_for(artifacts)).start())
    with pytest.raises(EngineLoadError, match="CURRENT is missing"):
        run(Engine(settings_for(tmp_path / "empty")).start())


@contextlib.asynccontextmanager
async def two_engines(artifacts):
    """Two engines on one artifacts dir, as two HTTP processes of `llmemb serve --processes 2` are."""
    one, two = Engine(settings_for(artifacts)), Engine(settings_for(artifacts))
    await one.start()
    await two.start()
    try:
        yield one, two
    finally:
        await one.stop()
        await two.stop()


def test_processes_sharing_an_overlay_see_each_others_items(artifacts):
    """Two engines on one artifacts dir (as the HTTP processes of `llmemb serve --processes 2` are): rows never
    collide, and each picks up the other's registrations and upserts before it reads the catalog."""

    async def go():
        async with two_engines(artifacts) as (one, two):
            await one.register([("from-one", NEW_ATTRS)])
            # two has not read one's line yet: its registration picks it up first and takes the next row
            res = await two.register([("from-two", {"title": "dark metal drum"})])
            assert [(o.row, o.status) for o in res.items] == [(N_ITEMS + 2, "created")]
            assert res.n_items == N_ITEMS + 2
            assert two.get_item("from-one").row == N_ITEMS + 1
            with pytest.raises(NotFound):
                one.get_item("from-two")  # not read yet ...
            rec = await one.recommend(["from-two", "t1"], k=3)  # ... but a request naming it reads it first
            assert rec.history_length == 2
            assert one.get_item("from-two").row == N_ITEMS + 2
            np.testing.assert_array_equal(
                one.item_vector("from-two", "item"), two.item_vector("from-two", "item")
            )
            # an id the other registered: same attributes are unchanged, others a conflict, upsert reaches both
            res = await one.register([("from-two", {"title": "dark metal drum"})])
            assert res.items[0].status == "unchanged"
            with pytest.raises(Conflict):
                await one.register([("from-one", {"title": "something else"})])
            await two.register([("from-one", {"title": "bright brass bell"})], upsert=True)
            await one.sync_catalog()
            assert one.get_item("from-one").attributes == {"title": "bright brass bell"}
            np.testing.assert_array_equal(
                one.item_vector("from-one", "item"), two.item_vector("from-one", "item")
            )
            # both indexes hold the same rows: the same scores for every item, registered ones included
            a = await one.recommend(["t1", "t2"], k=N_ITEMS + 2, exclude_seen=False)
            b = await two.recommend(["t1", "t2"], k=N_ITEMS + 2, exclude_seen=False)
            assert [i for i, _ in a.items] == [i for i, _ in b.items]
            assert {"from-one", "from-two"} <= {i for i, _ in a.items}
            np.testing.assert_allclose([s for _, s in a.items], [s for _, s in b.items], rtol=1e-5, atol=1e-6)
            # registrations at the same time through both get distinct rows
            r1, r2 = await asyncio.gather(
                one.register([("both-1", {"title": "green glass bottle"})]),
                two.register([("both-2", {"title": "blue paper lamp"})]),
            )
            assert {r1.items[0].row, r2.items[0].row} == {N_ITEMS + 3, N_ITEMS + 4}
            for e in (one, two):
                await e.sync_catalog()
                assert e.info()["n_items"] == N_ITEMS + 4

    run(go())
    lines = [
        json.loads(x) for x in (artifacts / "overlays" / BUNDLE_A / "items.jsonl").read_text().splitlines()
    ]
    assert [x["seq"] for x in lines] == list(range(1, len(lines) + 1))  # one sequence across both writers


def test_items_another_process_registered_without_cached_vectors_are_embedded_again(artifacts):
    async def go():
        async with two_engines(artifacts) as (one, two):
            await one.register([("from-one", NEW_ATTRS)])
            (artifacts / "overlays" / BUNDLE_A / "vectors.bin").unlink()  # the cache is lost, the line is not
            rec = await two.recommend(["from-one"], k=3)
            assert rec.history_length == 1
            np.testing.assert_allclose(
                two.item_vector("from-one", "item"), one.item_vector("from-one", "item"), atol=1e-5
            )

    run(go())


def test_a_damaged_overlay_line_from_outside_is_a_503_not_a_500(artifacts):
    async def go():
        engine = Engine(settings_for(artifacts))
        await engine.start()
        try:
            await engine.register([("kite", NEW_ATTRS)])
            line = {
                "row": N_ITEMS + 7,
                "id": "bad",
                "attributes": {"title": "x"},
                "seq": 2,
                "registered": "now",
            }
            with open(artifacts / "overlays" / BUNDLE_A / "items.jsonl", "a") as f:  # a row that skips six
                f.write(json.dumps(line) + "\n")
            with pytest.raises(NotReady) as e:
                await engine.recommend(["kite"], k=3)
            assert e.value.code == "overlay_inconsistent" and "expected" in e.value.message
        finally:
            await engine.stop()

    run(go())
