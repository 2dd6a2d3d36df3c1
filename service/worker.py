"""Worker processes of the server: the recommend path (``LLMEMB_RECOMMEND_WORKER=process``: SRS backbone + item
table + faiss index, ``service.recommender.Recommender``) and the embed path (``LLMEMB_EMBED_WORKER=process``: the
LLM + PCA + adapter, ``service.embedder.EmbedModel``), each in a process of its own (``ProcessWorker``, with
``RecommendWorker`` and ``EmbedWorker`` as the server's side; ``python -m service.worker --kind recommend|embed``).
What follows describes the recommend worker; the embed worker works the same way with the ops ``load`` (an
``EmbedSpec``), ``embed`` (token ids per prompt -> one float32 array per space) and ``stop``, and, having no state
of its own, is restarted from the same spec. With several HTTP processes (``llmemb serve --processes N``) one
recommend worker serves them all (``SharedRecommendWorker``: ``--listen`` a Unix socket, ``hello`` for the processes
that join it, batches arriving together run as one).

Why. In one process the server's event loop (HTTP, validation, bookkeeping) and the recommend batch function (the
backbone's and the index's Python between GIL-free kernels) take turns on one GIL. Here the model has its own
interpreter; the server still groups concurrent requests (``service.batching``) and sends one message per batch.

    worker = RecommendWorker(spec_source=state.spec, lock=state.register_lock, batch_timeout_s=10)
    await worker.start(spec)               # spawn `python -m service.worker`, build the Recommender there
    worker.serve_batch(batch)              # on the micro-batcher's thread: one message out, one back
    worker.apply_rows(rows, vectors)       # likewise, between batches; returns once the worker has applied them
    await worker.close()                   # stop message; killed if it does not exit in time

Wire. A socketpair, each end wrapped in a ``multiprocessing.connection.Connection``. Every message is one pickled
``(op, payload)`` and every call waits for its reply (``("ok", value)`` or ``("error", text)``). The worker answers
messages one at a time in the order they arrive, so calls are strictly ordered: a catalog update sent between two
batches is applied between them. Several threads may call at once (the recommend micro-batcher sends the next
batch while one is in flight, ``max_in_flight=2``, so the worker never waits for it): each sends under a lock and
reads its reply in the order the calls were sent (``_Channel``). ops: ``load`` (a
``RecommenderSpec``), ``recommend`` (the batch as a list of ``(rows, k, exclude_seen)``: pickle's C code writes
small int lists faster than they can be packed into arrays here), ``apply`` (rows + an array of ``item``
vectors), ``stop``. A batch's results come back as four flat numpy arrays (rows, scores, results per request,
excluded per request), decoded once per batch. Calls run on the micro-batcher's threads, which wait on the socket
with the GIL released; the event loop never touches the socket.

Failure. A waiter thread per process notices its exit. The batches in flight then fail with ``WorkerUnavailable``
(the API's 503), and so does every recommend request until a new worker is up; /ready answers 503 meanwhile. The
worker is restarted at once (a worker that dies within a minute of its start is restarted after 1, 2, 4 ... 30 s),
built from the catalog as it is then, registered items included; registrations wait for it (``lock``). A batch
with no answer after ``batch_timeout_s`` (every request in it has had its 504 by then) is taken for a hung worker,
which is killed and restarted the same way. The worker ignores SIGINT and SIGTERM, which a Ctrl-C or a group-wide
stop delivers to it too: the server drains its requests first and then stops it. It exits when the server closes
the socket, so it does not outlive the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from service.embedder import EmbedModel, EmbedSpec
from service.recommender import Recommender, RecommenderSpec, Request, Result, apply_threads, unpack

log = logging.getLogger(__name__)

_OK, _ERROR = "ok", "error"
_HEALTHY_AFTER_S = 60.0  # a worker that ran this long restarts at once when it dies
_MAX_BACKOFF_S = 30.0
_STOP_TIMEOUT_S = 10.0


class WorkerUnavailable(RuntimeError):
    """A worker process is not running (it died, is being restarted, or the service is stopping). ``code``: the
    API error code, the worker's ``unavailable_code``."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class WorkerCallError(RuntimeError):
    """The worker ran the call and it raised; the message is the worker's ``Type: message``."""


_GONE = "gone"  # what _Remote.wait returns: the process exited, its exit code is its parent's to know


def _exit_text(code: int | str | None) -> str:
    if code is None:
        return "stopped answering"
    if code == _GONE:
        return "exited"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _exit_code(proc: subprocess.Popen) -> int | None:
    try:
        return proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return None


def _kill(proc: subprocess.Popen | _Remote) -> None:
    with contextlib.suppress(OSError):
        proc.kill()


class _Remote:
    """A shared worker process started by another HTTP process (not our child): what ``_Channel`` and the waiter
    thread need of a ``Popen``, through a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.pidfd_open(pid)

    def wait(self, timeout: float | None = None) -> str:
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        return _GONE

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


class _Channel:
    """One worker process and its socket. ``call`` may run on several threads at once: calls are sent one at a time
    and each reads its reply in the order the calls were sent (the worker answers in that order)."""

    def __init__(self, proc: subprocess.Popen, conn: Connection) -> None:
        self.proc, self.conn = proc, conn
        self._send_lock = threading.Lock()
        self._turn = threading.Condition()
        self._sent = 0  # calls sent
        self._done = 0  # calls whose reply was read (or given up)

    def call(self, op: str, payload: Any, timeout: float | None) -> Any:
        """One request and its reply, within ``timeout`` s of sending it. EOFError / OSError: the worker is gone;
        TimeoutError: no reply in time."""
        data = pickle.dumps((op, payload), protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.conn.send_bytes(data)
            ticket = self._sent
            self._sent += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._turn:
            while self._done != ticket:
                self._turn.wait()
        try:
            if deadline is not None and not self.conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(op)
            raw = self.conn.recv_bytes()
        finally:
            with self._turn:
                self._done += 1
                self._turn.notify_all()
        status, value = pickle.loads(raw)
        if status == _ERROR:
            raise WorkerCallError(value)
        return value

    def close(self) -> None:
        """Close the socket once the calls in flight on it (if any) have their reply or have seen its end."""
        with self._send_lock, self._turn:
            while self._done != self._sent:
                self._turn.wait()
            self.conn.close()


def pack_results(rec: Recommender, batch: Sequence[Request]) -> tuple[np.ndarray, ...]:
    """``Recommender.serve_batch`` as four flat arrays: per-request counts, rows, scores, excluded counts."""
    prepared, excluded = rec.prepare(batch)
    return (*rec.recommend_batch(prepared), np.asarray(excluded, dtype=np.int32))


def split_packed(packed: tuple[np.ndarray, ...], sizes: Sequence[int]) -> list[tuple[np.ndarray, ...]]:
    """``pack_results`` of several batches run as one -> one packed tuple per batch (``sizes`` requests each)."""
    counts, rows, scores, excluded = packed
    out, req, at = [], 0, 0
    for n in sizes:
        c = counts[req : req + n]
        m = int(c.sum())
        out.append((c, rows[at : at + m], scores[at : at + m], excluded[req : req + n]))
        req, at = req + n, at + m
    return out


class ProcessWorker:
    """The server's side of one worker process of ``kind`` (and of its replacements after a crash).

    ``spec_source()`` builds the spec to load (called in a thread, under ``lock``, for a restart). The calls block
    the calling thread and are meant for a micro-batcher's worker thread; everything else runs on the event loop.
    """

    mode = "process"
    kind: str  # "recommend" | "embed": names it in messages, logs and `python -m service.worker --kind`
    unavailable_code: str  # the API error code (503) while it is down

    def __init__(
        self,
        *,
        spec_source: Callable[[], Any],
        lock: asyncio.Lock,
        batch_timeout_s: float,
        log_level: str = "info",
    ) -> None:
        self._spec_source = spec_source
        self._lock = lock
        self._batch_timeout_s = batch_timeout_s
        self._log_level = log_level
        self._current: _Channel | None = None
        self._launching: subprocess.Popen | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._closed: asyncio.Event | None = None
        self._restart_task: asyncio.Task | None = None
        self._reason: str | None = f"the {self.kind} worker is not started"
        self._started_at = 0.0
        self._quick_deaths = 0
        self._threads: dict[str, int] = {}
        self.restarts = 0

    # ----- state, read on the event loop -----

    @property
    def available(self) -> bool:
        return self._current is not None and not self._closing

    @property
    def unavailable_reason(self) -> str | None:
        return None if self.available else self._reason

    @property
    def pid(self) -> int | None:
        cur = self._current
        return cur.proc.pid if cur is not None else None

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "pid": self.pid,
            "available": self.available,
            "reason": self.unavailable_reason,
            "restarts": self.restarts,
            **self._threads,
        }

    # ----- lifecycle (event loop) -----

    async def start(self, spec: Any = None) -> None:
        """Start the worker and build its model there (from ``spec``, else from ``spec_source``, as a restart
        does). ``WorkerCallError``: the build failed there (the message says why); ``WorkerUnavailable``: the
        process died while loading."""
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        if spec is None:
            await self._start_one()
        else:
            await self._launch(spec)

    async def _start_one(self) -> None:
        """(Re)start from the catalog as it is now (``lock`` held)."""
        spec = await asyncio.to_thread(self._spec_source)
        await self._launch(spec)

    async def close(self) -> None:
        """Stop the worker (and any restart in progress); wait until the process has exited."""
        if self._closing:
            return
        self._closing = True
        self._reason = "the service is stopping"
        if self._closed is not None:
            self._closed.set()
        if self._launching is not None:
            _kill(self._launching)
        if self._restart_task is not None:
            self._restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._restart_task
        current, self._current = self._current, None
        if current is not None:
            await asyncio.to_thread(self._shutdown, current)

    def _spawn(self, extra: Sequence[str] = (), keep_fds: Sequence[int] = ()) -> _Channel:
        """``python -m service.worker`` with one end of a socketpair; a waiter thread reaps it when it exits."""
        parent, child = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
        argv = [sys.executable, "-m", "service.worker", "--kind", self.kind, "--fd", str(child.fileno())]
        try:
            proc = subprocess.Popen(
                [*argv, "--log-level", self._log_level, *extra],
                pass_fds=(child.fileno(), *keep_fds),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._watch(proc)
        return _Channel(proc, Connection(parent.detach()))

    def _watch(self, proc: subprocess.Popen | _Remote) -> None:
        threading.Thread(
            target=self._wait, args=(proc,), name=f"{self.kind}-worker-{proc.pid}", daemon=True
        ).start()

    def _loaded(self, info: dict[str, Any]) -> None:
        """What the worker's ``load`` answered (its thread counts, and what a subclass reads)."""
        self._threads = {k: info[k] for k in ("torch_threads", "faiss_threads") if k in info}

    def _open(self) -> _Channel:
        return self._spawn()

    def _abandon(self, channel: _Channel) -> None:
        """A load that failed or was cancelled: the process goes (the waiter thread reaps it)."""
        _kill(channel.proc)

    async def _launch(self, spec: Any) -> None:
        channel = await asyncio.to_thread(self._open)
        proc = channel.proc
        self._launching = proc
        try:
            info = await asyncio.to_thread(self._load, channel, spec)
        except BaseException:
            self._abandon(channel)
            raise
        finally:
            self._launching = None
        if self._closing:
            await asyncio.to_thread(self._shutdown, channel)
            raise WorkerUnavailable("the service is stopping", self.unavailable_code)
        self._loaded(info)
        self._started_at = time.monotonic()
        self._reason = None
        self._current = channel
        log.info(
            "%s worker pid %d ready in %.1f s (%s)", self.kind, proc.pid, info["load_seconds"], self._threads
        )

    def _greet(self, channel: _Channel, spec: Any) -> dict[str, Any]:
        """The first call on a new channel: build the model from ``spec``; what ``_loaded`` reads."""
        return channel.call("load", spec, None)

    def _load(self, channel: _Channel, spec: Any) -> dict[str, Any]:
        try:
            return self._greet(channel, spec)
        except (EOFError, OSError) as e:
            channel.close()
            proc = channel.proc
            raise WorkerUnavailable(
                f"the {self.kind} worker process (pid {proc.pid}) {_exit_text(_exit_code(proc))} while loading",
                self.unavailable_code,
            ) from e
        except BaseException:
            channel.close()
            raise

    def _shutdown(self, channel: _Channel) -> None:
        self._leave(channel)
        proc = channel.proc
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s worker pid %d did not exit after 'stop': killing it", self.kind, proc.pid)
            _kill(proc)
            proc.wait()

    def _leave(self, channel: _Channel) -> None:
        """Say 'stop' (the worker exits once its last server has) and close our end."""
        with contextlib.suppress(TimeoutError, EOFError, OSError, WorkerCallError):
            channel.call("stop", None, _STOP_TIMEOUT_S)
        channel.close()

    # ----- death and restart -----

    def _wait(self, proc: subprocess.Popen) -> None:
        code = proc.wait()
        loop = self._loop
        if loop is not None and not self._closing:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the service is gone
                loop.call_soon_threadsafe(self._on_exit, proc, code)

    def _on_exit(self, proc: subprocess.Popen, code: int) -> None:
        current = self._current
        if self._closing or current is None or current.proc is not proc:
            return  # a stopped, replaced or never published process
        self._current = None
        if time.monotonic() - self._started_at >= _HEALTHY_AFTER_S:
            self._quick_deaths = 0
        delay = 0.0 if self._quick_deaths == 0 else min(_MAX_BACKOFF_S, 2.0 ** (self._quick_deaths - 1))
        self._quick_deaths += 1
        self._reason = (
            f"the {self.kind} worker process (pid {proc.pid}) {_exit_text(code)}; it is being restarted"
        )
        log.error("%s%s", self._reason, f" in {delay:g} s" if delay else "")
        self._restart_task = self._loop.create_task(
            self._restart(current, delay), name=f"{self.kind}-worker-restart"
        )

    async def _restart(self, old: _Channel, delay: float) -> None:
        await asyncio.to_thread(old.close)
        while not self._closing:
            if delay:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), delay)
                if self._closing:
                    return
            try:
                async with self._lock:  # no registration between the catalog snapshot and the new worker
                    if self._closing:
                        return
                    await self._start_one()
            except Exception as e:  # noqa: BLE001 - kept in the reason /ready shows, retried with backoff
                if self._closing:
                    return
                delay = min(_MAX_BACKOFF_S, max(1.0, 2 * delay))
                self._reason = f"the {self.kind} worker could not be restarted ({e}); retrying in {delay:g} s"
                log.exception("%s worker restart failed", self.kind)
                continue
            self.restarts += 1
            log.warning("%s worker restarted: pid %s", self.kind, self.pid)
            return

    # ----- calls (the micro-batcher's thread) -----

    def _request(self, op: str, payload: Any, timeout: float | None) -> Any:
        current = self._current
        if current is None or self._closing:
            raise WorkerUnavailable(
                self._reason or f"the {self.kind} worker is not running", self.unavailable_code
            )
        proc = current.proc
        try:
            return current.call(op, payload, timeout)
        except TimeoutError:
            log.error("%s worker pid %d did not answer within %g s: killing it", self.kind, proc.pid, timeout)
            _kill(proc)
            raise WorkerUnavailable(
                f"the {self.kind} worker process (pid {proc.pid}) did not answer within {timeout:g} s and "
                "was killed; it is being restarted",
                self.unavailable_code,
            ) from None
        except (EOFError, OSError):
            raise WorkerUnavailable(
                f"the {self.kind} worker process (pid {proc.pid}) {_exit_text(_exit_code(proc))}; "
                "it is being restarted",
                self.unavailable_code,
            ) from None


class RecommendWorker(ProcessWorker):
    """The recommend worker process: the recommend path (``Recommender``) built from a ``RecommenderSpec`` of the
    catalog as it is now. ``serve_batch`` and ``apply_rows`` are for the recommend micro-batcher's thread."""

    kind = "recommend"
    unavailable_code = "recommend_worker_unavailable"

    def __init__(self, *, spec_source: Callable[[], RecommenderSpec], **kw: Any) -> None:
        super().__init__(spec_source=spec_source, **kw)
        self._index_info: dict[str, Any] = {}

    def _loaded(self, info: dict[str, Any]) -> None:
        super()._loaded(info)
        self._index_info = info["index"]

    def index_info(self) -> dict[str, Any]:
        return dict(self._index_info)

    def serve_batch(self, batch: Sequence[Request]) -> list[Result]:
        """The micro-batcher's batch function: the batch goes to the worker, its results come back."""
        return unpack(*self._request("recommend", batch, self._batch_timeout_s))

    def apply_rows(self, rows: Sequence[int], item: np.ndarray) -> None:
        """``Recommender.apply_rows`` in the worker; returns once it is applied there."""
        payload = (list(rows), np.ascontiguousarray(item, dtype=np.float32))
        self._index_info = self._request("apply", payload, None)


class _Shared:
    """What makes a ``ProcessWorker`` one worker process for all HTTP processes of ``llmemb serve --processes N``
    (per bundle and kind): ``SharedRecommendWorker``, ``SharedEmbedWorker``.

    ``address``: the Unix socket path without suffix (in the group's directory). The HTTP process that takes the
    lock ``<address>.lock`` starts the worker, which inherits the lock (held until it exits) and listens on
    ``<address>.sock``; the others connect there (``hello`` instead of ``load``, then ``_joined``). The worker
    answers every connection and exits when the last one closes; when it dies, each HTTP process restarts its side
    as usual, and one of them starts the new worker. ``guard()`` (optional): an async context manager held around
    each start. ``start()`` builds the spec inside the guard (no spec is passed).
    """

    kind: str
    unavailable_code: str

    def _share(
        self,
        address: Path,
        guard: Callable[[], contextlib.AbstractAsyncContextManager] | None = None,
        connect_timeout_s: float = 120.0,
    ) -> None:
        self._address = address
        self._guard = guard
        self._connect_timeout_s = connect_timeout_s
        self._owner = False

    async def _start_one(self) -> None:
        async with self._guard() if self._guard is not None else contextlib.nullcontext():
            spec = await asyncio.to_thread(self._spec_source)
            await self._launch(spec)

    def status(self) -> dict[str, Any]:
        return {**super().status(), "shared": True, "started_here": self._owner}

    def _open(self) -> _Channel:
        sock_path = f"{self._address}.sock"
        deadline = time.monotonic() + self._connect_timeout_s
        while True:
            lock = open(f"{self._address}.lock", "a+b")  # noqa: SIM115 - handed to the worker or closed
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()  # a worker runs (or is starting): join it
            else:
                try:
                    self._owner = True
                    extra = ["--listen", sock_path, "--lock-fd", str(lock.fileno())]
                    return self._spawn(extra, keep_fds=(lock.fileno(),))
                finally:
                    lock.close()  # the worker's copy keeps the lock
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(sock_path)
            except OSError:
                conn.close()
                if time.monotonic() > deadline:
                    raise WorkerUnavailable(
                        f"no shared {self.kind} worker answered at {sock_path}", self.unavailable_code
                    ) from None
                time.sleep(0.05)
                continue
            pid, _, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            proc = _Remote(pid)
            self._owner = False
            self._watch(proc)
            return _Channel(proc, Connection(conn.detach()))

    def _greet(self, channel: _Channel, spec: Any) -> dict[str, Any]:
        if self._owner:
            return super()._greet(channel, spec)
        return self._joined(channel, channel.call("hello", None, None))

    def _joined(self, channel: _Channel, info: dict[str, Any]) -> dict[str, Any]:
        """After ``hello`` from a process that joined the worker (a thread); returns what ``_loaded`` reads."""
        return info

    def _abandon(self, channel: _Channel) -> None:
        if self._owner:
            super()._abandon(channel)
        else:
            channel.close()  # other processes may be using it

    def _shutdown(self, channel: _Channel) -> None:
        """Leave the worker, not waiting for it: other HTTP processes may still use it (our waiter thread reaps it
        if it is our child)."""
        self._leave(channel)


class SharedRecommendWorker(_Shared, RecommendWorker):
    """One recommend worker for all HTTP processes (``LLMEMB_RECOMMEND_WORKER_SHARED``), so that one GPU context
    runs every batch (workers of their own time-slice the GPU and got slower with each one added); the batches
    that reach it together run as one. ``guard``: the engine holds the overlay lock in it and reads the other
    processes' registrations first, so the worker is built from, and a joining process re-applies
    (``registered()``: all registered rows and their ``item`` vectors), the catalog as it is on disk, with no
    registration in between."""

    def __init__(
        self,
        *,
        address: Path,
        guard: Callable[[], contextlib.AbstractAsyncContextManager],
        registered: Callable[[], tuple[list[int], np.ndarray]],
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self._share(address, guard)
        self._registered = registered

    def _joined(self, channel: _Channel, info: dict[str, Any]) -> dict[str, Any]:
        rows, vectors = self._registered()
        if rows:  # what this process knows may be newer than the catalog the worker was built from
            info["index"] = channel.call("apply", (rows, vectors), None)
        return info


class EmbedWorker(ProcessWorker):
    """The embed worker process (``LLMEMB_EMBED_WORKER=process``): the LLM + PCA + adapter (``EmbedModel``) built
    from an ``EmbedSpec``, so that the model's Python (kernel launches on CUDA) and the server's event loop do not
    take turns on one GIL. ``embed_tokens`` is for the embed micro-batcher's thread."""

    kind = "embed"
    unavailable_code = "embed_worker_unavailable"

    def __init__(self, *, spec_source: Callable[[], EmbedSpec], **kw: Any) -> None:
        super().__init__(spec_source=spec_source, **kw)
        self.dtype: str | None = None

    def _loaded(self, info: dict[str, Any]) -> None:
        super()._loaded(info)
        self.dtype = info["dtype"]

    def embed_tokens(self, batch: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """``EmbedModel.embed_tokens`` in the worker."""
        return self._request("embed", [list(t) for t in batch], self._batch_timeout_s)


class SharedEmbedWorker(_Shared, EmbedWorker):
    """One embed worker (one copy of the LLM) for all HTTP processes (``LLMEMB_EMBED_WORKER_SHARED``); it has no
    state beyond its spec, so a joining process only says ``hello``."""

    def __init__(self, *, address: Path, **kw: Any) -> None:
        super().__init__(**kw)
        self._share(address)


# --- the worker process ---------------------------------------------------------------------------------------


def _load(kind: str, spec: Any) -> tuple[Any, dict[str, Any]]:
    """Build a worker's model from its spec; (model, what ``load`` answers, with the worker's pid)."""
    start = time.perf_counter()
    if kind == "embed":
        info: dict[str, Any] = {"torch_threads": apply_threads(spec.threads)["torch_threads"]}
        model: Any = EmbedModel(spec)
        info["dtype"] = model.dtype
    else:
        info = apply_threads(spec.threads)  # before the build: IVF training uses them
        model = Recommender(spec)
        info["index"] = model.index_info()
    gc.collect()
    gc.freeze()  # what is loaded stays out of the cyclic GC's full passes
    return model, {**info, "load_seconds": time.perf_counter() - start, "pid": os.getpid()}


def _handle(kind: str, rec: Any, op: str, payload: Any) -> Any:
    """One call's value (raises what the caller gets as ``WorkerCallError``)."""
    ops = {"recommend": ("recommend", "apply"), "embed": ("embed",)}[kind]
    if op not in ops:
        raise ValueError(f"unknown op {op!r} for a {kind} worker")
    if rec is None:
        raise RuntimeError(f"{op!r} before 'load'")
    if op == "embed":
        return rec.embed_tokens(payload)
    if op == "recommend":
        return pack_results(rec, payload)
    rec.apply_rows(*payload)
    return rec.index_info()


def _serve(conn: Connection, kind: str = "recommend", listener: socket.socket | None = None) -> int:
    """Answer calls until every connection is gone. One connection (the server's) unless ``listener``: a shared
    recommend worker (several HTTP processes, ``SharedRecommendWorker``) accepts more there. Calls are answered
    in the order each connection sent them; recommend batches that arrived together from several connections run
    as one batch."""
    rec: Any = None  # a Recommender or an EmbedModel
    loaded: dict[str, Any] = {}
    conns = [conn]

    def send(c: Connection, reply: tuple) -> None:
        try:
            c.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            drop(c)

    def drop(c: Connection) -> None:
        if c in conns:
            conns.remove(c)
            c.close()

    while conns:
        ready = wait([*conns, listener] if listener is not None else conns)
        batches: list[tuple[Connection, Any]] = []
        for c in ready:
            if c is listener:
                s, _ = listener.accept()
                conns.append(Connection(s.detach()))
                continue
            try:
                op, payload = pickle.loads(c.recv_bytes())
            except (EOFError, OSError):
                drop(c)  # that server closed its end, or is gone
                continue
            if op == "recommend" and rec is not None:
                batches.append((c, payload))
                continue
            try:
                if op == "stop":
                    send(c, (_OK, None))
                    drop(c)
                    continue
                if op == "load":
                    rec, loaded = _load(kind, payload)
                    value: Any = loaded
                elif op == "hello":  # a shared worker's later client: what 'load' answered, as it is now
                    if rec is None:
                        raise RuntimeError("'hello' before 'load'")
                    value = {**loaded, "index": rec.index_info()} if kind == "recommend" else loaded
                else:
                    value = _handle(kind, rec, op, payload)
                reply = (_OK, value)
            except Exception as e:  # noqa: BLE001 - the server raises it as WorkerCallError
                log.exception("%s failed", op)
                reply = (_ERROR, f"{type(e).__name__}: {e}")
            send(c, reply)
        if batches:
            try:
                packed = pack_results(rec, [r for _, b in batches for r in b])
                replies = [(_OK, v) for v in split_packed(packed, [len(b) for _, b in batches])]
            except Exception as e:  # noqa: BLE001
                log.exception("recommend failed")
                replies = [(_ERROR, f"{type(e).__name__}: {e}")] * len(batches)
            for (c, _), reply in zip(batches, replies):
                send(c, reply)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m service.worker",
        description="A worker process of the server: the recommend path (LLMEMB_RECOMMEND_WORKER=process) or the "
        "embed model (LLMEMB_EMBED_WORKER=process).",
    )
    p.add_argument("--kind", choices=["recommend", "embed"], default="recommend")
    p.add_argument("--fd", type=int, required=True, help="the server's socket (inherited file descriptor)")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--listen",
        default=None,
        help="a recommend worker shared by several HTTP processes: accept their connections on this Unix socket",
    )
    p.add_argument(
        "--lock-fd",
        type=int,
        default=None,
        help="the shared worker's lock file (held until the worker exits)",
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    level = args.log_level.upper()
    logging.basicConfig(
        level=logging.DEBUG if level == "TRACE" else getattr(logging, level, logging.INFO),
        format=f"%(levelname)s:     {args.kind} worker [%(process)d] %(message)s",
    )
    listener = None
    if args.listen:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.listen)  # a dead worker's socket (its lock, now ours, says nobody serves it)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.listen)
        listener.listen(64)
    return _serve(Connection(args.fd), args.kind, listener)


if __name__ == "__main__":
    sys.exit(main())
