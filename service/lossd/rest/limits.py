"""Request-body cap: 413 before an oversized body is read whole."""

from __future__ import annotations

import json


class BodyLimitMiddleware:
    """Pure ASGI. A declared Content-Length over the cap is refused at once, unread; a body without one
    (chunked) is read only up to the cap, then refused, or else replayed to the app."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                return await self._reject(scope, send, f"{int(declared)} bytes")
            return await self.app(scope, receive, send)  # the server enforces Content-Length framing
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_bytes:
                return await self._reject(scope, send, f"more than {self.max_bytes} bytes")
            chunks.append(body)
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        await self.app(scope, replay_receive, send)

    async def _reject(self, scope, send, size: str) -> None:
        message = f"request body of {size} exceeds the limit of {self.max_bytes} bytes (LOSSD_MAX_BODY_BYTES)"
        if scope.get("path", "").startswith("/v2"):
            body = {"error": message}
        else:
            body = {"error": {"code": "too_large", "message": message, "details": {"limit": self.max_bytes}}}
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})
