"""An asyncio micro-batcher: concurrent requests are grouped into one call of a synchronous batch function.

    batcher = MicroBatcher(embed_batch, name="embed", max_batch_size=32, max_batch_cost=8192,
                           max_wait_ms=5, max_queue=1024, timeout_s=30, cost=len)
    await batcher.start()
    vec = await batcher.submit(token_ids)        # -> embed_batch([..., token_ids, ...])[i]
    await batcher.stop()                         # refuses new work, finishes what was queued

Batching policy. When the worker is free and an item is queued, the batch is closed as soon as it holds
``max_batch_size`` items or ``max_batch_cost`` cost (e.g. tokens), or ``max_wait_ms`` after its first item was
queued, whichever comes first; items that queue up while a batch runs form the next one. ``max_wait_ms=0`` is
"take whatever is queued", which adds no latency to a lone request and still batches under load.

The batch function runs OFF the event loop on one dedicated worker thread (``run_exclusive`` runs other work on
that same thread, between batches, e.g. a catalog update that must not race a forward pass). It gets a list of
items and must return a list of results of the same length, in order. If it raises, every request of the batch
gets the exception (logged with its traceback, except the ``expected_errors`` the batch function raises by
design, e.g. when the process it sends batches to is gone: one line each).

Sending ahead (``max_in_flight`` > 1), for a batch function that hands its batch to another process and waits
(``service.worker``): the next batch may start while earlier ones are still running, so that process finds it
queued when it finishes the one before instead of idling while results travel back and the next batch is
gathered. A batch starts ahead only when it is full or at least as large as the batch started last (so sending
ahead never splits the work into smaller batches), and at most ``max_in_flight`` run at once. The batch function
then runs on that many threads, called in batch order, and must be safe to call concurrently; ``run_exclusive``
runs ``fn`` on one of those threads once a thread is free, after the batches already started, possibly while
they still run (the batch function's own ordering, e.g. one socket, keeps it between batches).

Back-pressure: at most ``max_queue`` items wait; past that ``submit`` raises ``Overloaded`` with a
``retry_after`` estimate (seconds) from the recent batch durations, which the API turns into 429 + Retry-After.
``submit`` raises ``BatchTimeout`` after ``timeout_s`` (a queued item that timed out is dropped, not run).

``length_groups`` splits a batch into runs of similar lengths for a batch function that pads (one model call per
run: the LLM for embed, the SRS backbone for recommend).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchError(Exception):
    """Base of the batcher's own errors."""


class Overloaded(BatchError):
    """The queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, name: str, depth: int, retry_after: float) -> None:
        self.name, self.depth, self.retry_after = name, depth, retry_after
        super().__init__(f"{name} queue is full ({depth} waiting); retry after {retry_after:.2f} s")


class BatchTimeout(BatchError):
    def __init__(self, name: str, timeout_s: float) -> None:
        self.name, self.timeout_s = name, timeout_s
        super().__init__(f"{name} request did not complete within {timeout_s:g} s")


class BatcherClosed(BatchError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"{name} batcher is stopped")


class BatchObserver(Protocol):
    """Metrics hooks; every method is called on the event loop."""

    def on_batch(self, name: str, size: int, cost: int, seconds: float) -> None: ...

    def on_reject(self, name: str) -> None: ...

    def on_timeout(self, name: str) -> None: ...


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    rejected: int = 0
    timeouts: int = 0
    max_batch_seen: int = 0
    sizes: collections.Counter = field(default_factory=collections.Counter)  # batch size -> count


@dataclass
class _Entry:
    item: Any
    cost: int
    future: asyncio.Future
    queued_at: float


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        name: str,
        max_batch_size: int = 32,
        max_batch_cost: int | None = None,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        timeout_s: float | None = 30.0,
        cost: Callable[[T], int] | None = None,
        observer: BatchObserver | None = None,
        expected_errors: tuple[type[BaseException], ...] = (),
        max_in_flight: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_in_flight < 1:
            raise ValueError("max_batch_size, max_queue and max_in_flight must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        self.fn, self.name = fn, name
        self.max_batch_size, self.max_batch_cost = max_batch_size, max_batch_cost
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self.cost = cost or (lambda _item: 1)
        self.observer = observer
        self.expected_errors = expected_errors  # logged in one line, without a traceback
        self.max_in_flight = max_in_flight
        self.stats = BatcherStats()
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queued_cost = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._running_batch = 0  # items in the batches being computed
        self._running: set[asyncio.Task] = set()  # batches started ahead (max_in_flight > 1), until they end
        self._in_flight_batches = 0
        self._last_size = 0  # items of the batch started last
        self._last_end = 0.0  # perf_counter when the last batch ended
        self._batch_seconds = 0.01  # EWMA of batch durations, for Retry-After
        self._thread_ids: set[int] = set()

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=self.max_in_flight,
            thread_name_prefix=f"batch-{self.name}",
            initializer=lambda: self._thread_ids.add(threading.get_ident()),
        )
        self._executor.submit(int).result()  # the first thread is up
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self, drain: bool = True) -> None:
        """Refuse new items; run what is queued (``drain``) or fail it with ``BatcherClosed``; wait for the end."""
        self._closing = True
        if not drain:
            while self._queue:
                e = self._queue.popleft()
                self._queued_cost -= e.cost
                if not e.future.done():
                    e.future.set_exception(BatcherClosed(self.name))
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._closing

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Items queued or being computed."""
        return len(self._queue) + self._running_batch

    def on_worker_thread(self) -> bool:
        return threading.get_ident() in self._thread_ids

    # --- submitting ---------------------------------------------------------------------------------------

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained enough to take a new item."""
        batches_ahead = math.ceil((len(self._queue) + 1) / self.max_batch_size) + self._in_flight_batches
        return max(0.05, batches_ahead * self._batch_seconds)

    async def submit(self, item: T, timeout_s: float | None = None) -> R:
        """Queue ``item``; return its result once its batch has run."""
        if self._closing or self._task is None:
            raise BatcherClosed(self.name)
        if len(self._queue) >= self.max_queue:
            self.stats.rejected += 1
            if self.observer:
                self.observer.on_reject(self.name)
            raise Overloaded(self.name, len(self._queue), self.retry_after())
        loop = asyncio.get_running_loop()
        entry = _Entry(item, max(1, int(self.cost(item))), loop.create_future(), time.monotonic())
        self._queue.append(entry)
        self._queued_cost += entry.cost
        self._wakeup.set()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        # A timer that fails the entry's future, rather than wait_for + shield: two futures, a task wake-up and
        # their callbacks less per request. A cancelled caller cancels the future it awaits. Either way the
        # future is done: a queued item is then dropped by the worker, a running one finishes unobserved.
        timer = loop.call_later(timeout, self._expire, entry, timeout) if timeout is not None else None
        try:
            return await entry.future
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, entry: _Entry, timeout: float) -> None:
        if entry.future.done():
            return
        entry.future.set_exception(BatchTimeout(self.name, timeout))
        self.stats.timeouts += 1
        if self.observer:
            self.observer.on_timeout(self.name)

    async def run_exclusive(self, fn: Callable[[], R]) -> R:
        """Run ``fn()`` on the worker thread, between batches (never concurrently with the batch function)."""
        if self._executor is None:
            raise BatcherClosed(self.name)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # --- the worker ---------------------------------------------------------------------------------------

    def _take_batch(self) -> list[_Entry]:
        batch: list[_Entry] = []
        cost = 0
        while self._queue and len(batch) < self.max_batch_size:
            e = self._queue[0]
            if e.future.done():  # timed out or cancelled while queued
                self._queue.popleft()
                self._queued_cost -= e.cost
                continue
            if batch and self.max_batch_cost is not None and cost + e.cost > self.max_batch_cost:
                break
            self._queue.popleft()
            self._queued_cost -= e.cost
            batch.append(e)
            cost += e.cost
        return batch

    def _batch_full(self) -> bool:
        if len(self._queue) >= self.max_batch_size:
            return True
        return self.max_batch_cost is not None and self._queued_cost >= self.max_batch_cost

    def _may_start(self) -> bool:
        """Whether a batch may start now: always with none in flight; with some (``max_in_flight`` > 1) only a
        batch that is full or at least as large as the one started last."""
        if not self._in_flight_batches:
            return True
        if self._in_flight_batches >= self.max_in_flight:
            return False
        return self._batch_full() or len(self._queue) >= self._last_size

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue or not self._may_start():
                if self._closing and not self._queue:
                    if self._running:
                        await asyncio.gather(*self._running)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            if not self._in_flight_batches:
                # Wait for the batch to fill, at most max_wait after its first item was queued.
                deadline = self._queue[0].queued_at + self.max_wait_s
                while not self._closing and not self._batch_full():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
            batch = self._take_batch()
            if not batch:
                continue
            self._in_flight_batches += 1
            self._running_batch += len(batch)
            self._last_size = len(batch)
            if self.max_in_flight == 1:
                await self._run_batch(loop, batch)
            else:
                task = loop.create_task(self._run_batch(loop, batch), name=f"batch-{self.name}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Entry]) -> None:
        """Run one batch on the executor and hand its results (or its error) to the waiting requests."""
        started = time.perf_counter()
        try:
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [e.item for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"{self.name} batch function returned {len(results)} results for {len(batch)} items"
                    )
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                if isinstance(exc, self.expected_errors):
                    log.warning("%s batch of %d failed: %s", self.name, len(batch), exc)
                else:
                    log.exception("%s batch of %d failed", self.name, len(batch))
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(exc)
            else:
                for e, r in zip(batch, results):
                    if not e.future.done():
                        e.future.set_result(r)
            finally:
                self._running_batch -= len(batch)
                self._in_flight_batches -= 1
            # A batch started ahead waited for the one before it: its own time starts when that one ended.
            end = time.perf_counter()
            seconds = end - max(started, self._last_end)
            self._last_end = end
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            cost = sum(e.cost for e in batch)
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.sizes[len(batch)] += 1
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(batch))
            if self.observer:
                self.observer.on_batch(self.name, len(batch), cost, seconds)
        finally:
            if self.max_in_flight > 1:
                self._wakeup.set()  # the next batch may start now


# --- helpers for batch functions -----------------------------------------------------------------------


def length_groups(lengths: Sequence[int], call_cost: int) -> list[list[int]]:
    """Indices of a batch grouped by length (recommend: history ids; embed: prompt tokens), one model call per
    group.

    A batch padded to its longest history spends most of its time on padding: Beauty histories have a median of 6
    ids, and a batch of 64 usually holds one of 50+. Groups are runs of the batch sorted by length, chosen to
    minimise sum(group size x its longest history + call_cost) (dynamic programming over the distinct lengths).
    The backbones' positions are right-aligned, so a user's state does not depend on its group's width.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    values: list[int] = []
    ends: list[int] = []  # ends[j]: number of sorted indices with length <= values[j]
    for n, i in enumerate(order):
        if values and lengths[i] == values[-1]:
            ends[-1] = n + 1
        else:
            values.append(lengths[i])
            ends.append(n + 1)
    m = len(values)
    best = [0.0] + [math.inf] * m
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        width = values[j - 1]
        for i in range(j):
            cost = best[i] + (ends[j - 1] - (ends[i - 1] if i else 0)) * width + call_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = m
    while j > 0:
        i = cut[j]
        groups.append(order[(ends[i - 1] if i else 0) : ends[j - 1]])
        j = i
    return groups[::-1]
