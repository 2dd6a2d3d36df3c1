"""The service's speed-ups change no result: recommend batches grouped by history length (``length_groups``)
give the scores of one request at a time."""

from __future__ import annotations

import asyncio
import random

import pytest

from service import engine as engine_module
from service.engine import Engine, length_groups
from tests.service.helpers import MAX_LEN, N_ITEMS, run, settings_for


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
    monkeypatch.setattr(engine_module, "_GROUP_CALL_COST_CPU", 0)

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
