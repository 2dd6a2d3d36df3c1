"""The micro-batcher: grouping, size and cost limits, max wait, back-pressure, timeouts, errors (and how they
are logged), draining stop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.batching import BatcherClosed, BatchTimeout, MicroBatcher, Overloaded


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list] = []
        self.threads: set[int] = set()
        self.delay = delay

    def __call__(self, items):
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        if self.delay:
            time.sleep(self.delay)
        return [x * 10 for x in items]


def test_concurrent_requests_share_a_batch_off_the_event_loop():
    fn = Recorder()

    async def go():
        b = MicroBatcher(fn, name="t", max_batch_size=8, max_wait_ms=50)
        await b.start()
        out = await asyncio.gather(*(b.submit(i) for i in range(20)))
        await b.stop()
        return out

    assert asyncio.run(go()) == [i * 10 for i in range(20)]
    assert [len(x) for x in fn.batches] == [8, 8, 4]  # full batches close at once; the rest after max wait
    assert [x for batch in fn.batches for x in batch] == list(range(20))
    assert threading.get_ident() not in fn.threads and len(fn.threads) == 1


def test_cost_budget_and_max_wait():
    fn = Recorder()

    async def lone(max_wait_ms: float) -> float:
        b = MicroBatcher(
            fn, name="t", max_batch_size=100, max_batch_cost=10, max_wait_ms=max_wait_ms, cost=lambda x: x
        )
        await b.start()
        await asyncio.gather(*(b.submit(x) for x in [4, 4, 4, 30, 1]))
        start = time.perf_counter()
        await b.submit(1)
        seconds = time.perf_counter() - start
        await b.stop()
        return seconds

    greedy, waiting = asyncio.run(lone(0)), asyncio.run(lone(400))
    assert greedy < 0.35 <= waiting  # a lone request waits max_wait_ms for company, or not at all with 0
    # cost <= 10 per batch, an oversize item runs alone; max_wait_ms=0 never waits for company
    assert fn.batches[:5] == [[4, 4], [4], [30], [1], [1]]


def test_full_queue_raises_overloaded_with_retry_after():
    fn = Recorder(delay=0.2)

    async def go():
        b = MicroBatcher(fn, name="t", max_batch_size=1, max_wait_ms=0, max_queue=1)
        await b.start()
        first = asyncio.create_task(b.submit(1))  # runs (slowly)
        await asyncio.sleep(0.05)
        second = asyncio.create_task(b.submit(2))  # waits in the queue
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as e:
            await b.submit(3)
        assert e.value.retry_after > 0 and b.stats.rejected == 1
        assert await first == 10 and await second == 20
        await b.stop()

    asyncio.run(go())


def test_timeout_drops_a_queued_item_and_errors_reach_every_caller():
    fn = Recorder(delay=0.3)

    async def go():
        b = MicroBatcher(fn, name="t", max_batch_size=1, max_wait_ms=0, timeout_s=0.1)
        await b.start()
        running = asyncio.create_task(b.submit(1, timeout_s=5))
        await asyncio.sleep(0.02)
        with pytest.raises(BatchTimeout):
            await b.submit(2)  # still queued behind the slow batch after 0.1 s: dropped
        assert await running == 10
        await b.stop()

        def boom(items):
            raise ValueError("bad batch")

        bad = MicroBatcher(boom, name="bad", max_batch_size=4, max_wait_ms=20)
        await bad.start()
        results = await asyncio.gather(*(bad.submit(i) for i in range(3)), return_exceptions=True)
        await bad.stop()
        return results

    results = asyncio.run(go())
    assert [b for batch in fn.batches for b in batch] == [1]  # item 2 was never computed
    assert all(isinstance(r, ValueError) for r in results)


def test_expected_errors_are_logged_in_one_line_others_with_their_traceback(caplog):
    class Gone(RuntimeError):
        pass

    def fail(items):
        raise (Gone if items[0] == "gone" else ValueError)(f"failed on {items[0]}")

    async def go():
        b = MicroBatcher(fail, name="q", max_wait_ms=0, expected_errors=(Gone,))
        await b.start()
        with pytest.raises(Gone):
            await b.submit("gone")
        with pytest.raises(ValueError):
            await b.submit("bug")
        await b.stop()

    asyncio.run(go())
    gone, bug = (r for r in caplog.records if r.name == "service.batching")
    assert gone.levelname == "WARNING" and gone.exc_info is None and "failed on gone" in gone.getMessage()
    assert bug.levelname == "ERROR" and bug.exc_info is not None and bug.exc_info[0] is ValueError


def test_stop_drains_queued_work_then_refuses_new_items():
    fn = Recorder(delay=0.05)

    async def go():
        b = MicroBatcher(fn, name="t", max_batch_size=2, max_wait_ms=0)
        await b.start()
        pending = [asyncio.create_task(b.submit(i)) for i in range(6)]
        await asyncio.sleep(0)
        await b.stop()
        assert await asyncio.gather(*pending) == [0, 10, 20, 30, 40, 50]
        with pytest.raises(BatcherClosed):
            await b.submit(9)

    asyncio.run(go())


def test_run_exclusive_runs_on_the_worker_between_batches():
    fn = Recorder()

    async def go():
        b = MicroBatcher(fn, name="t", max_batch_size=4, max_wait_ms=0)
        await b.start()
        await b.submit(1)
        tid = await b.run_exclusive(threading.get_ident)
        await b.stop()
        return tid

    assert asyncio.run(go()) in fn.threads


def test_max_in_flight_sends_a_batch_ahead_only_once_it_is_as_large_as_the_one_running():
    release = threading.Event()
    started: list[list[int]] = []
    running = threading.Semaphore(0)

    def fn(items):
        started.append(list(items))
        running.release()
        if items[0] < 6:
            release.wait(10)  # the first two batches run until the test lets them go
        return [x * 10 for x in items]

    async def go():
        b = MicroBatcher(fn, name="t", max_batch_size=8, max_wait_ms=0, max_in_flight=2)
        await b.start()
        first = [asyncio.create_task(b.submit(i)) for i in range(3)]
        await asyncio.to_thread(running.acquire)  # batch [0, 1, 2] is running
        later = [asyncio.create_task(b.submit(i)) for i in range(3, 5)]
        await asyncio.sleep(0.05)
        assert started == [[0, 1, 2]]  # two queued < three running: not sent ahead
        later.append(asyncio.create_task(b.submit(5)))
        await asyncio.to_thread(running.acquire)  # three queued: sent ahead, beside the first
        assert started == [[0, 1, 2], [3, 4, 5]] and b.in_flight == 6
        more = [asyncio.create_task(b.submit(i)) for i in range(6, 9)]
        await asyncio.sleep(0.05)
        assert len(started) == 2 and b.queue_depth == 3  # two in flight: the third batch waits
        release.set()
        out = await asyncio.gather(*first, *later, *more)
        await b.stop()
        return out

    assert asyncio.run(go()) == [i * 10 for i in range(9)]
    assert started == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
