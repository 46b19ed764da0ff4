"""HTTP limits that hold against slow, careless or hostile clients, before any route runs:

- the request head (request line + headers) must arrive within LOSSD_HEADER_TIMEOUT_SECONDS and stay under
  LOSSD_MAX_HEADER_BYTES (else 431 and the connection is closed): ``GuardedHttpToolsProtocol``;
- the body must arrive whole within LOSSD_BODY_TIMEOUT_SECONDS of the head (else 408, connection closed), stay
  under LOSSD_MAX_BODY_BYTES (else 413, refused unread when Content-Length says so) and come uncompressed
  (a Content-Encoding other than identity: 415, unread): ``BodyLimitMiddleware``.

A request takes an admission slot only once its body is here (lossd.service), so slow senders hold a connection
and a coroutine each, never a slot that legitimate calls need.
"""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..errors import TABLE, ServiceError, quote
from .errors import error_response


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap on each request head. (httptools itself has
    neither: an endless header line keeps a core busy and grows memory.)"""

    max_header_bytes = 64 * 1024
    header_timeout = 10.0
    max_connections = 4096

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._in_head = True
        self._opened = self.loop.time()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)
        if len(self.connections) > self.max_connections:
            self._evict_one()

    def _evict_one(self) -> None:
        """Past LOSSD_MAX_CONNECTIONS a new connection closes the oldest one that holds no request: idle, or still
        sending its head. Connections that only hold sockets cannot lock others out; those in a request are
        bounded by the body deadline."""
        idle = [c for c in self.connections if c is not self and getattr(c, "_in_head", False)
                and (c.cycle is None or c.cycle.response_complete) and not c.transport.is_closing()]
        if idle:
            min(idle, key=lambda c: c._opened).transport.close()

    def _start_asgi_task(self, cycle, app) -> None:  # type: ignore[override]
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        # uvicorn marks only the newest request of the connection as disconnected; with pipelined requests the
        # one being answered is an older one, whose answer would then be written to the closed transport (a
        # RuntimeError logged as an internal error, per request, for a client that merely hung up)
        running = getattr(self, "_running", None)
        if running is not None and running is not self.cycle and not running.response_complete:
            running.disconnected = True
            running.message_event.set()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._refuse("header_too_large", f"the request head exceeds {self.max_header_bytes} bytes "
                         "(LOSSD_MAX_HEADER_BYTES)")

    def send_400_response(self, msg: str) -> None:
        """Bytes the HTTP parser cannot read: lossd's error shape and code, like every other error."""
        self._refuse("invalid_http", f"not a valid HTTP/1.1 request ({msg.rstrip('.')})")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._head_size = getattr(self, "_head_size", 0) + len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size = getattr(self, "_head_size", 0) + len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        if getattr(self, "_head_size", 0) > self.max_header_bytes:  # a whole head that came in one read
            self._refuse("header_too_large", f"the request head exceeds {self.max_header_bytes} bytes "
                         "(LOSSD_MAX_HEADER_BYTES)")
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.transport.is_closing():  # refused in its head: what follows in the same read is dropped
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self.transport.is_closing():
            super().on_message_complete()
            if getattr(self, "_head_after_body", False):
                self._head_after_body = False
                self._in_head = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body:
            # answered before its body was all here (e.g. a 404 for an unknown name): the rest of the body is
            # this request's, read and dropped by uvicorn, not the next request's head
            self._head_after_body = True
        else:
            self._in_head = True  # the next request's head is timed from its first byte

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._in_head and self._head_bytes and not self.transport.is_closing():
            self._refuse("request_timeout", f"the request head did not arrive within {self.header_timeout:g} s "
                         "(LOSSD_HEADER_TIMEOUT_SECONDS)")
        elif self._in_head and self.cycle is None and not self.transport.is_closing():
            self.transport.close()  # connected and silent since: nothing to answer

    def _refuse(self, code: str, message: str) -> None:
        """Answers before the request exists (no path yet): lossd's own error shape, the table's status."""
        self._cancel_head_timer()
        status = TABLE[code].v1
        body = orjson.dumps({"error": {"code": code, "message": message, "details": {}}})
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"lossd-error-code: %s\r\nconnection: close\r\n\r\n"
                             % (status, HTTPStatus(status).phrase.encode(), len(body), code.encode()) + body)
        self.transport.close()


def guarded_protocol(max_header_bytes: int, header_timeout: float,
                     max_connections: int) -> type[GuardedHttpToolsProtocol]:
    return type("GuardedHttpTools", (GuardedHttpToolsProtocol,),
                {"max_header_bytes": max_header_bytes, "header_timeout": header_timeout,
                 "max_connections": max_connections})


class BodyLimitMiddleware:
    """Pure ASGI. A declared Content-Length over the cap is refused at once, unread; a body without one
    (chunked) is read only up to the cap, then refused. Every receive of the body shares one deadline."""

    def __init__(self, app, max_bytes: int, timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        declared = None
        encoding = b"identity"
        for name, value in scope.get("headers") or ():
            if name == b"content-length":
                declared = value
            elif name == b"content-encoding" and value.strip().lower() != b"identity":
                encoding = value
        if encoding != b"identity":
            # lossd reads bodies as sent; a compressed one would reach the JSON parser as bytes that are not
            # JSON (and inflating it would put the body limit on the wrong size)
            return await self._send(send, path, ServiceError(
                f"Content-Encoding {quote(encoding.decode('latin-1'))} is not supported: send the body "
                "uncompressed (or Content-Encoding: identity)", "unsupported_encoding", field="content-encoding"))
        if declared is not None and not (declared.isdigit() and len(declared) <= 19):
            return await self._send(send, path, ServiceError("Content-Length must be a whole number",
                                                             "invalid_header", field="content-length"))
        if declared is not None and int(declared) > self.max_bytes:
            return await self._send(send, path, self._too_large(f"{int(declared)} bytes"))
        deadline = time.monotonic() + self.timeout
        seen = 0
        started = False
        timed_out = False

        async def limited_receive():
            nonlocal seen, timed_out
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                timed_out = True
                raise ServiceError(f"the request body did not arrive within {self.timeout:g} s "
                                   "(LOSSD_BODY_TIMEOUT_SECONDS)", "request_timeout") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large(f"more than {self.max_bytes} bytes")
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if timed_out and (b"connection", b"close") not in headers:
                    message = dict(message, headers=headers + [(b"connection", b"close")])
            await send(message)

        await self.app(scope, limited_receive, tracked_send)

    def _too_large(self, size: str) -> ServiceError:
        return ServiceError(f"request body of {size} exceeds the limit of {self.max_bytes} bytes "
                            "(LOSSD_MAX_BODY_BYTES)", "too_large")

    @staticmethod
    async def _send(send, path: str, exc: ServiceError) -> None:
        resp = error_response(path, exc)
        await send({"type": "http.response.start", "status": resp.status_code,
                    "headers": resp.raw_headers + [(b"connection", b"close")]})
        await send({"type": "http.response.body", "body": resp.body})
