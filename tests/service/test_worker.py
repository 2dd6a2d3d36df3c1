"""The recommend worker process (LLMEMB_RECOMMEND_WORKER=process) when things go wrong: a worker killed with a
request in flight (503, /ready 503, restarted from the catalog with the items registered meanwhile), a hung
worker (the request's 504, then killed and restarted), and `llmemb serve` stopped with Ctrl-C leaving no process
behind. Its normal operation (recommend, register, reload) is tested in both modes by test_engine.py and
test_http.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import (
    API_KEY,
    BUNDLE_A,
    N_ITEMS,
    assert_error,
    live_server,
    process_gone,
    serve_env,
    settings_for,
)

ROOT = Path(__file__).resolve().parents[2]
KITE = {"title": "bright wooden kite", "year": 1995, "genres": ["outdoor", "sport"]}


def worker_status(client: httpx.Client) -> dict:
    return client.get("/v1/info").json()["recommend_worker"]


def wait_ready(client: httpx.Client, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (r := client.get("/ready")).status_code != 200:
        assert time.monotonic() < deadline, f"not ready again: {r.text}"
        time.sleep(0.05)


def wait_until(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_killed_worker_fails_its_requests_with_503_and_comes_back_with_the_catalog(artifacts):
    settings = settings_for(artifacts, api_keys=[API_KEY], recommend_worker="process")
    with live_server(settings) as srv, srv.client() as c:
        assert c.post("/v1/items", json={"items": [{"id": "kite-a", "attributes": KITE}]}).status_code == 201
        pid = worker_status(c)["pid"]
        batcher = srv.app.state.engine._state.rec_batcher
        results: dict[str, httpx.Response] = {}

        def call(name: str, path: str, body: dict) -> None:
            with srv.client() as own:
                results[name] = own.post(path, json=body)

        os.kill(pid, signal.SIGSTOP)  # it stops answering: the next batch stays in flight
        rec = threading.Thread(
            target=call, args=("recommend", "/v1/recommend", {"history": ["t1", "kite-a"], "k": 3})
        )
        rec.start()
        wait_until(lambda: batcher.in_flight == 1 and batcher.queue_depth == 0, "the batch was not sent")
        # A registration meanwhile: durable at once, its catalog update queued behind the batch in flight.
        new = {"items": [{"id": "kite-b", "attributes": {**KITE, "year": 1991}}]}
        reg = threading.Thread(target=call, args=("register", "/v1/items", new))
        reg.start()
        items = artifacts / "overlays" / BUNDLE_A / "items.jsonl"
        wait_until(lambda: "kite-b" in items.read_text(), "the registration did not reach the overlay")
        os.kill(pid, signal.SIGKILL)
        rec.join(timeout=30)
        reg.join(timeout=30)

        err = assert_error(results["recommend"], 503, "recommend_worker_unavailable")
        assert "SIGKILL" in err["message"] and results["recommend"].headers["retry-after"] == "1"
        assert results["register"].status_code == 201, results["register"].text
        # The replacement starts once the registration is done; a new process takes over a second to be ready.
        err = assert_error(c.get("/ready"), 503, "recommend_worker_unavailable")
        assert f"pid {pid}" in err["message"] and "restarted" in err["message"]
        assert_error(c.post("/v1/recommend", json={"history": ["t1"]}), 503, "recommend_worker_unavailable")
        assert c.get("/v1/items/kite-b").json()["row"] == N_ITEMS + 2  # the rest of the API keeps serving
        assert "llmemb_ready 0.0" in c.get("/metrics").text

        wait_ready(c)
        status = worker_status(c)
        assert status["available"] and status["restarts"] == 1 and status["pid"] not in (pid, None)
        assert process_gone(pid)
        rec = c.post(
            "/v1/recommend", json={"history": ["kite-b", "t2"], "k": N_ITEMS + 2, "exclude_seen": False}
        )
        assert rec.status_code == 200 and {"kite-a", "kite-b"} <= {i["id"] for i in rec.json()["items"]}
        metrics = c.get("/metrics").text
        assert "llmemb_recommend_worker_restarts_total 1.0" in metrics and "llmemb_ready 1.0" in metrics


def test_a_hung_worker_is_killed_once_its_batch_times_out_and_restarted(artifacts):
    settings = settings_for(
        artifacts, api_keys=[API_KEY], recommend_worker="process", recommend_request_timeout_s=1.0
    )
    with live_server(settings) as srv, srv.client() as c:
        pid = worker_status(c)["pid"]
        os.kill(pid, signal.SIGSTOP)
        assert_error(c.post("/v1/recommend", json={"history": ["t1"], "k": 3}), 504, "timeout")
        assert process_gone(pid)  # no answer within the request timeout: killed
        wait_ready(c)
        status = worker_status(c)
        assert status["restarts"] == 1 and status["pid"] != pid
        assert len(c.post("/v1/recommend", json={"history": ["t1"], "k": 3}).json()["items"]) == 3


def test_llmemb_serve_stopped_with_ctrl_c_leaves_no_process_behind(artifacts):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = serve_env(
        LLMEMB_RECOMMEND_WORKER="process",
        LLMEMB_DEVICE="cpu",
        LLMEMB_TORCH_THREADS="1",
        LLMEMB_LOG_LEVEL="warning",
    )
    argv = [sys.executable, "-m", "llmemb.cli", "serve", "--artifacts", str(artifacts), "--port", str(port)]
    # A session of its own: the Ctrl-C below reaches the server and its worker, as a terminal's would.
    server = subprocess.Popen(
        [*argv, "--no-examples"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            deadline = time.monotonic() + 90
            while True:
                assert server.poll() is None, server.stdout.read().decode(errors="replace")
                try:
                    if c.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "llmemb serve did not get ready"
                time.sleep(0.1)
            pid = worker_status(c)["pid"]
            assert c.post("/v1/recommend", json={"history": ["t1"], "k": 2}).status_code == 200
        os.killpg(server.pid, signal.SIGINT)
        out = server.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert server.returncode == 0, out
    assert "Traceback" not in out, out  # the worker ignored the Ctrl-C and was stopped by the server
    assert process_gone(pid)


def test_a_killed_embed_worker_fails_its_requests_with_503_and_comes_back(artifacts):
    settings = settings_for(artifacts, api_keys=[API_KEY], embed_worker="process")
    with live_server(settings) as srv, srv.client() as c:
        body = {"items": [KITE], "space": "item"}
        before = c.post("/v1/items/embed", json=body).json()["data"][0]["embedding"]
        pid = c.get("/v1/info").json()["embed_worker"]["pid"]
        batcher = srv.app.state.engine._state.embed_batcher
        results: dict[str, httpx.Response] = {}

        def call() -> None:
            with srv.client() as own:
                results["embed"] = own.post("/v1/items/embed", json=body)

        os.kill(pid, signal.SIGSTOP)  # it stops answering: the next batch stays in flight
        t = threading.Thread(target=call)
        t.start()
        wait_until(lambda: batcher.in_flight == 1, "the batch was not sent")
        os.kill(pid, signal.SIGKILL)
        t.join(timeout=30)
        err = assert_error(results["embed"], 503, "embed_worker_unavailable")
        assert "SIGKILL" in err["message"] and results["embed"].headers["retry-after"] == "1"
        # A new process takes a second or more to load the LLM: meanwhile /ready and embedding say why.
        err = assert_error(c.get("/ready"), 503, "embed_worker_unavailable")
        assert f"pid {pid}" in err["message"] and "restarted" in err["message"]
        assert_error(c.post("/v1/items/embed", json=body), 503, "embed_worker_unavailable")
        assert c.post("/v1/recommend", json={"history": ["t1"], "k": 3}).status_code == 200  # the rest serves

        wait_ready(c)
        status = c.get("/v1/info").json()["embed_worker"]
        assert status["available"] and status["restarts"] == 1 and status["pid"] not in (pid, None)
        assert process_gone(pid)
        after = c.post("/v1/items/embed", json=body).json()["data"][0]["embedding"]
        assert after == pytest.approx(before, abs=1e-5)
        metrics = c.get("/metrics").text
        assert "llmemb_embed_worker_restarts_total 1.0" in metrics and "llmemb_ready 1.0" in metrics
