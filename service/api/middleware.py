"""Pure ASGI middleware, outermost first: request metrics, bearer auth, request-body size limit.

Auth runs before anything reads the body, so an unauthenticated client gets 401/403 and never a 413 or 422.
The body limit reads the body as it streams (with or without Content-Length) and answers 413 as soon as it
passes ``max_bytes``, before any JSON parsing; the app then gets the buffered body.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, observe: Callable[[str, str, int, float], None]) -> None:
        self.app, self.observe = app, observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or scope.get("llmemb.route") or "<unmatched>"
            self.observe(scope["method"], template, status, time.perf_counter() - start)


class AuthMiddleware:
    """``Authorization: Bearer <key>`` on every path but ``open_paths``: 401 without a key, 403 with a wrong one.

    The key is compared with every configured key in constant time (``hmac.compare_digest``, no early exit).
    """

    def __init__(self, app: ASGIApp, keys: Iterable[str], open_paths: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = frozenset(open_paths)

    def _valid(self, token: bytes) -> bool:
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if not header or scheme.lower() != b"bearer" or not token.strip():
            scope["llmemb.route"] = "<unauthenticated>"
            response = error_response(
                401,
                "unauthorized",
                "missing API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": 'Bearer realm="llmemb"'},
            )
        elif not self._valid(token.strip()):
            scope["llmemb.route"] = "<unauthenticated>"
            response = error_response(403, "forbidden", "invalid API key")
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, scope: Scope) -> Callable:
        scope["llmemb.route"] = "<too large>"
        return error_response(
            413,
            "payload_too_large",
            f"request body larger than {self.max_bytes} bytes",
            {"max_bytes": self.max_bytes},
            headers={"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    response = error_response(400, "bad_request", "invalid Content-Length header")
                    await response(scope, receive, send)
                    return
                if declared > self.max_bytes:
                    await self._too_large(scope)(scope, receive, send)
                    return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before sending its body
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._too_large(scope)(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": buffered, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
