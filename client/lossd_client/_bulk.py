"""Large binary POSTs (the OIP binary tensor extension) over the standard library's http.client.

For 1M box pairs (32 MB up, 20 MB down in 8 MiB requests, 4 in flight) httpx spent 37-42 ms of client CPU against
a server that did nothing with the bytes, http.client 13-15 ms: httpx hands the body through h11 in pieces, while
http.client sends it with one sendall and reads a Content-Length answer with one read. Through a real
`lossd serve` the 1M-pair call went from 83-104 ms to 74-76 ms on 2 cores. Everything else (JSON, small calls,
the async client) stays on httpx.

Used only where it behaves as httpx would: no proxy applies to the host (httpx honours HTTP(S)_PROXY, this does
not), and TLS trusts what httpx trusts (the given CA file, else certifi's bundle).
"""

from __future__ import annotations

import http.client
import queue
import ssl
import urllib.request
from urllib.parse import urlparse

import httpx

from ._errors import DeadlineExceededError, UnavailableError

# what a keep-alive connection the server has since closed raises on its next request; retried once at once on a
# new connection (the request never reached the server's handler)
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def usable(base_url: str) -> bool:
    """Whether http.client can stand in for httpx here: an http(s) URL that no proxy setting applies to."""
    u = urlparse(base_url)
    if u.scheme not in ("http", "https") or not u.hostname:
        return False
    proxies = urllib.request.getproxies()
    return not (proxies.get(u.scheme) or proxies.get("all")) or bool(urllib.request.proxy_bypass(u.hostname))


class BulkHTTP:
    """A small pool of keep-alive http.client connections for POSTs; thread-safe (one connection per call)."""

    def __init__(self, base_url: str, *, timeout: float, headers: dict, ca_cert: str | None = None,
                 connect_timeout: float | None = None) -> None:
        u = urlparse(base_url)
        self.https = u.scheme == "https"
        self.host, self.port = u.hostname, u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.headers = dict(headers)
        self._ssl: ssl.SSLContext | None = None
        if self.https:
            if ca_cert is None:
                import certifi  # httpx's own trust store

                ca_cert = certifi.where()
            self._ssl = ssl.create_default_context(cafile=ca_cert)
        self._idle: queue.SimpleQueue[http.client.HTTPConnection] = queue.SimpleQueue()

    def _connect(self) -> http.client.HTTPConnection:
        """A connected connection: ``connect_timeout`` for TCP and TLS, then ``timeout`` for each send and read.
        Failing to connect raises UnavailableError (retried); the request never left."""
        if self.https:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.connect_timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise UnavailableError("unavailable", f"could not connect to {self.base_url}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        conn.sock.settimeout(self.timeout)
        return conn

    def post(self, path: str, body: bytes, headers: dict) -> httpx.Response:
        """POST ``body``; the answer as an httpx.Response (whatever its status). Network failures raise
        UnavailableError."""
        all_headers = {**self.headers, **headers}
        try:
            conn, reused = self._idle.get_nowait(), True
        except queue.Empty:
            conn, reused = self._connect(), False
        try:
            try:
                return self._send(conn, path, body, all_headers)
            except STALE:
                if not reused:
                    raise
                self.close()  # the other idle connections waited as long: drop them too
                return self._send(self._connect(), path, body, all_headers)
        except TimeoutError as exc:
            # connected, but no answer in time: the server may still be computing it, so it is not retried
            raise DeadlineExceededError("deadline_exceeded", f"no answer within timeout={self.timeout:g} s; the "
                                        "server may still be computing it (not retried; raise timeout for larger "
                                        "calls)") from exc
        except http.client.BadStatusLine as exc:
            if isinstance(exc, http.client.RemoteDisconnected):
                raise UnavailableError("unavailable", f"{type(exc).__name__}: {exc}") from exc
            # its bytes are not quoted: a gRPC port answers HTTP/1.1 with binary HTTP/2 frames
            raise UnavailableError("not_http", f"the server at {self.base_url} did not answer HTTP; if this is "
                                   "lossd's gRPC port, use a grpc:// URL") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise UnavailableError("unavailable", f"{type(exc).__name__}: {exc}") from exc

    def _send(self, conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict) -> httpx.Response:
        try:
            try:
                conn.request("POST", self.prefix + path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError) as exc:
                # the server answered and closed before reading the whole body (an early refusal, or a gRPC port's
                # HTTP/2 preface): what it said explains the failure better than the broken pipe
                try:
                    resp = conn.getresponse()
                except http.client.BadStatusLine as answer:
                    if isinstance(answer, http.client.RemoteDisconnected):
                        raise exc from None
                    raise
                except (OSError, http.client.HTTPException):
                    raise exc from None
            else:
                resp = conn.getresponse()
            content = resp.read()
        except BaseException:
            conn.close()
            raise
        if resp.will_close:
            conn.close()
        else:
            self._idle.put(conn)
        return httpx.Response(resp.status, headers=resp.getheaders(), content=content,
                              request=httpx.Request("POST", self.base_url + path))

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
