"""``llmemb serve --processes 2``: two HTTP processes on one port, started as a user starts them. An item
registered through one is at once visible to, and recommendable through, the other; a reload through one
reaches the other; /metrics counts the requests of both; Ctrl-C stops everything. With the recommend path in a
worker process, the two share one worker, which is restarted with every registered item when it dies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import API_KEY, BUNDLE_A, BUNDLE_B, N_ITEMS, assert_error, process_gone, serve_env

ROOT = Path(__file__).resolve().parents[2]
KITE = {"title": "bright wooden kite", "year": 1995, "genres": ["outdoor"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid(c: httpx.Client) -> int:
    r = c.get("/v1/info")
    assert r.status_code == 200, r.text
    return r.json()["process"]["pid"]


def _clients_of_each_process(
    base: str, n: int, deadline: float, skip: set[int] = frozenset()
) -> dict[int, httpx.Client]:
    """One keep-alive client per HTTP process but those in ``skip`` (the kernel hands each new connection to one of
    them)."""
    found: dict[int, httpx.Client] = {}
    while len(found) < n:
        assert time.monotonic() < deadline, f"only {sorted(found)} of {n} processes answered"
        c = httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"})
        try:
            pid = _pid(c)
        except (httpx.TransportError, AssertionError):
            c.close()
            time.sleep(0.2)
            continue
        if pid in found or pid in skip:
            c.close()
        else:
            found[pid] = c
    return found


def _worker(c: httpx.Client) -> dict:
    return c.get("/v1/info").json()["recommend_worker"]


@pytest.mark.parametrize("worker_mode", ["thread", "process"])
def test_two_http_processes_share_registrations_reloads_and_metrics(artifacts, worker_mode):
    port = _free_port()
    env = serve_env(
        LLMEMB_API_KEYS=API_KEY,
        LLMEMB_DEVICE="cpu",
        LLMEMB_TORCH_THREADS="1",
        LLMEMB_RECOMMEND_WORKER=worker_mode,
        LLMEMB_EMBED_WORKER=worker_mode,
        LLMEMB_EMBED_WORKER_SHARED="true",  # in process mode: one LLM copy for both
        LLMEMB_EMBED_MAX_WAIT_MS="2",
        LLMEMB_LOG_LEVEL="warning",
    )
    argv = [sys.executable, "-m", "llmemb.cli", "serve", "--artifacts", str(artifacts), "--port", str(port)]
    server = subprocess.Popen(
        [*argv, "--processes", "2", "--no-examples"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    clients: dict[int, httpx.Client] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode(errors="replace")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llmemb serve did not get ready"
            time.sleep(0.2)
        clients = _clients_of_each_process(f"http://127.0.0.1:{port}", 2, deadline)
        (pa, a), (pb, b) = clients.items()
        assert pa != pb and a.get("/v1/info").json()["process"]["processes"] == 2

        # registered through a: b knows it, recommends after it, and ranks it like a does
        r = a.post("/v1/items", json={"items": [{"id": "kite-1", "attributes": KITE}]})
        assert r.status_code == 201 and r.json()["items"][0]["row"] == N_ITEMS + 1
        item = b.get("/v1/items/kite-1", params={"space": "item"}).json()
        assert item["row"] == N_ITEMS + 1 and item["source"] == "registered"
        assert (
            item["vector"]["embedding"]
            == a.get("/v1/items/kite-1", params={"space": "item"}).json()["vector"]["embedding"]
        )
        body = {"history": ["t1", "kite-1"], "k": N_ITEMS + 1, "exclude_seen": False}
        ra, rb = a.post("/v1/recommend", json=body).json(), b.post("/v1/recommend", json=body).json()
        assert rb["history_length"] == 2 and "kite-1" in [x["id"] for x in rb["items"]]
        assert [x["id"] for x in ra["items"]] == [x["id"] for x in rb["items"]]
        assert [x["score"] for x in ra["items"]] == pytest.approx([x["score"] for x in rb["items"]], abs=1e-5)
        # the other process's rows are taken: b's registration gets the next one; a conflict is a conflict
        r = b.post(
            "/v1/items", json={"items": [{"id": "drum-1", "attributes": {"title": "dark metal drum"}}]}
        )
        assert r.status_code == 201 and r.json()["items"][0]["row"] == N_ITEMS + 2
        assert_error(
            a.post("/v1/items", json={"items": [{"id": "drum-1", "attributes": {"title": "other"}}]}),
            409,
            "item_conflict",
        )
        ids = a.get("/v1/tables/item/ids").json()
        assert ids["rows"] == N_ITEMS + 3 and ids["ids"][-2:] == ["kite-1", "drum-1"]

        if (
            worker_mode == "process"
        ):  # one recommend worker and one embed worker for both, each started by one
            wa, wb = _worker(a), _worker(b)
            assert wa["shared"] and wa["pid"] == wb["pid"] not in (pa, pb)
            assert wa["started_here"] != wb["started_here"]
            ea, eb = (c.get("/v1/info").json()["embed_worker"] for c in (a, b))
            assert ea["shared"] and ea["pid"] == eb["pid"] not in (pa, pb, wa["pid"])
            assert ea["started_here"] != eb["started_here"]
            emb = {"items": [KITE], "space": "item"}
            va, vb = (c.post("/v1/items/embed", json=emb).json()["data"][0]["embedding"] for c in (a, b))
            assert va == vb and va == pytest.approx(item["vector"]["embedding"], abs=1e-6)
            os.kill(wa["pid"], signal.SIGKILL)
            assert process_gone(wa["pid"])
            wait = time.monotonic() + 90
            while True:  # both restart their side; one starts the new worker, the other joins it
                ws = [_worker(c) for c in (a, b)]
                if all(w["available"] for w in ws) and ws[0]["pid"] == ws[1]["pid"] != wa["pid"]:
                    break
                assert time.monotonic() < wait, f"the shared worker did not come back: {ws}"
                time.sleep(0.2)
            assert all(w["restarts"] == 1 for w in ws)
            for c in (a, b):  # built from the catalog with both processes' registrations
                got = c.post("/v1/recommend", json={**body, "history": ["kite-1", "drum-1"]}).json()
                assert {"kite-1", "drum-1"} <= {x["id"] for x in got["items"]}

        # /metrics of either process counts both processes' requests
        for c in (a, b):
            text = c.get("/metrics").text
            assert "llmemb_http_processes 2.0" in text
            assert 'llmemb_http_requests_total{method="POST",route="/v1/items",status="201"} 2.0' in text

        # an HTTP process that dies is replaced (uvicorn's supervisor); the new one serves the catalog as it is,
        # and joins the shared worker, which outlived its starter if that was the one killed
        shared = _worker(a)["pid"] if worker_mode == "process" else None
        os.kill(pb, signal.SIGKILL)
        clients.pop(pb).close()
        assert process_gone(pb)
        wait = time.monotonic() + 120
        found = _clients_of_each_process(f"http://127.0.0.1:{port}", 1, wait, skip={pa})
        ((pc, b),) = found.items()
        clients[pc] = b
        while (r := b.get("/ready")).status_code != 200:  # every process serving again
            assert r.json()["error"]["code"] in ("processes_not_ready", "not_ready"), r.text
            assert time.monotonic() < wait, r.text
            time.sleep(0.2)
        assert b.get("/v1/items/drum-1").json()["row"] == N_ITEMS + 2
        got = b.post("/v1/recommend", json={**body, "history": ["kite-1", "drum-1"]}).json()
        assert {"kite-1", "drum-1"} <= {x["id"] for x in got["items"]}
        if shared is not None:
            assert _worker(b)["pid"] == _worker(a)["pid"] == shared and not _worker(b)["started_here"]
            assert b.get("/v1/info").json()["embed_worker"]["pid"] == ea["pid"]  # the embed worker too
            assert b.post("/v1/items/embed", json=emb).json()["data"][0]["embedding"] == va

        # a reload through a reaches b
        old_worker = _worker(a)["pid"]
        r = a.post("/admin/reload", json={"bundle_id": BUNDLE_B})
        assert r.status_code == 200 and r.json()["previous"] == BUNDLE_A and r.json()["current"] == BUNDLE_B
        wait = time.monotonic() + 60
        while b.get("/v1/info").json()["bundle_id"] != BUNDLE_B:
            assert time.monotonic() < wait, "the other process did not follow the reload"
            time.sleep(0.2)
        assert b.post("/v1/recommend", json={"history": ["t1"], "k": 3}).json()["bundle_id"] == BUNDLE_B
        if (
            worker_mode == "process"
        ):  # the new bundle's worker is shared too; the old one left with its bundle
            wa, wb = _worker(a), _worker(b)
            assert wa["pid"] == wb["pid"] != old_worker
            assert process_gone(old_worker)
            clients[wa["pid"]] = httpx.Client()  # checked to be gone at the end
    finally:
        for c in clients.values():
            c.close()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
        try:
            out = server.communicate(timeout=60)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            out = server.communicate()[0].decode(errors="replace")
    assert server.returncode == 0, out
    assert "Traceback" not in out, out
    for pid in clients:
        assert process_gone(pid)
