"""``llmemb serve``: start the HTTP service with uvicorn. Flags override the LLMEMB_* environment.

llmemb serve                                   # artifacts/CURRENT on 127.0.0.1:8000
LLMEMB_API_KEYS=$(openssl rand -hex 16) llmemb serve --host 0.0.0.0 --port 8080
llmemb serve --processes 4                     # 4 HTTP processes on one port (a GPU host with many cores)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the training commands share this parser and must not need the service's dependencies
    from service.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve embeddings, tables and recommendations over HTTP",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", default=None, help="artifacts root (LLMEMB_ARTIFACTS, default artifacts)")
    p.add_argument("--bundle", default=None, help="serve this bundle dir instead of <artifacts>/CURRENT")
    p.add_argument("--host", default=None, help="LLMEMB_HOST, default 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="LLMEMB_PORT, default 8000")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        help="HTTP server processes on the one port (LLMEMB_PROCESSES, default 1); each holds the bundle and "
        "worker processes of its own",
    )
    p.add_argument("--log-level", default=None)
    p.add_argument("--no-examples", action="store_true", help="do not print curl examples once ready")
    p.set_defaults(func=serve)


def curl_examples(settings: Settings, engine) -> str:
    """Ready-to-paste curl commands for every endpoint, using real ids from the served catalog."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{host}:{settings.port}"
    auth = ' -H "Authorization: Bearer $LLMEMB_API_KEY"' if settings.auth_enabled else ""
    info = engine.info()
    ids, _, _ = engine.table_ids("item") if "item" in info["tables"] else ([None], 0, "")
    sample = [i for i in ids[1:4] if i] or ["<item id>"]
    attrs = {"title": "Hydrating rose face mist", "categories": ["Beauty", "Skin Care"]}

    def post(path: str, body: dict) -> str:
        return f"curl -s{auth} -H 'Content-Type: application/json' {base}{path} -d {shlex.quote(json.dumps(body))}"

    lines = [
        f"llmemb is serving bundle {info['bundle_id']} ({info['n_items']} items) on {base}",
        *(["export LLMEMB_API_KEY=<one of LLMEMB_API_KEYS>"] if settings.auth_enabled else []),
        f"curl -s {base}/health",
        f"curl -s {base}/ready",
        f"curl -s{auth if settings.metrics_require_auth else ''} {base}/metrics",
        f"curl -s{auth} {base}/v1/info",
    ]
    caps = info["capabilities"]
    if caps["embed"]:
        lines += [
            post("/v1/items/embed", {"items": [attrs], "space": "item"}),
            post("/v1/embeddings", {"model": "llmemb", "input": ["rose face mist"]}),
        ]
    if caps["register"]:
        lines += [post("/v1/items", {"items": [{"id": "new-item-1", "attributes": attrs}]})]
    lines += [f"curl -s{auth} {base}/v1/items/{sample[0]}"]
    if caps["recommend"]:
        lines += [post("/v1/recommend", {"history": sample, "k": 10, "exclude_seen": True})]
    lines += [
        f"curl -s{auth} {base}/v1/tables",
        f"curl -s{auth} -o item.safetensors '{base}/v1/tables/item?format=safetensors'",
        f"curl -s{auth} {base}/v1/tables/item/ids",
        f"curl -s{auth} -X POST {base}/admin/reload",
        f"open {base}/docs",
    ]
    return "\n".join(lines)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.engine import Engine, EngineLoadError
    from service.settings import Settings, SettingsError, serve_threads

    overrides = {
        k: v
        for k, v in {
            "artifacts": args.artifacts,
            "bundle": args.bundle,
            "host": args.host,
            "port": args.port,
            "device": args.device,
            "processes": args.processes,
            "log_level": args.log_level,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
        if settings.torch_threads is None:  # leave the event loop a core (settings.serve_threads)
            threads = serve_threads(settings.device, settings.processes)
            settings = settings.model_copy(update={"torch_threads": threads})
        settings.check_auth()
        Engine(settings).bundle_path()  # fail now, with the reason, when there is nothing to serve
    except (SettingsError, EngineLoadError, ValueError) as e:
        print(f"llmemb serve: {e}", file=sys.stderr)
        return 2

    run = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": 30,
    }
    if settings.processes > 1:
        return _serve_group(settings, {**overrides, "torch_threads": settings.torch_threads}, args, run)

    def ready(engine) -> None:
        if not args.no_examples:
            print("\n" + curl_examples(settings, engine) + "\n", flush=True)

    uvicorn.run(create_app(settings, on_ready=ready), **run)
    return 0


EXAMPLES_MARK = "examples-printed"


def _serve_group(settings: Settings, overrides: dict, args: argparse.Namespace, run: dict) -> int:
    """``settings.processes`` HTTP processes on one listening socket (uvicorn's supervisor: it restarts one that
    dies). They read their settings from the environment (``service.app.group_app``) and share a temporary
    ``group_dir``: the bundle being served (reloads) and the metrics of every process."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    import uvicorn

    group = Path(tempfile.mkdtemp(prefix="llmemb-serve-"))
    (group / "metrics").mkdir()
    if args.no_examples:
        (group / EXAMPLES_MARK).touch()
    os.environ.update({f"LLMEMB_{k.upper()}": str(v) for k, v in overrides.items() if v is not None})
    os.environ["LLMEMB_GROUP_DIR"] = str(group)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(
        group / "metrics"
    )  # read by the processes' prometheus_client
    try:
        uvicorn.run("service.app:group_app", factory=True, workers=settings.processes, **run)
    finally:
        shutil.rmtree(group, ignore_errors=True)
    return 0
