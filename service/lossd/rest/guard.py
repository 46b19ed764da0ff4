"""Web pages may not drive the server: the standard defence of a local HTTP service against cross-site requests
and DNS rebinding, before any route runs.

A browser lets any page send "simple" cross-origin requests (POST with ``content-type: text/plain``, no
preflight) to 127.0.0.1; lossd reads JSON whatever the content type, and the browser connects from loopback, so
without this a page could call every route, the local-only shared-memory ones included. Browsers mark such
requests with an ``Origin`` header, and a page that rebinds its own name to 127.0.0.1 still sends its own name
as ``Host``. So:

- a request that carries ``Origin`` is refused (403 ``forbidden``) unless that origin is listed in
  ``LOSSD_CORS_ORIGINS`` or is the server's own (same scheme, host and port as the request's ``Host``: the
  playground and the API docs the server serves call its API). Clients that are not browsers (curl, the Python
  client, tritonclient) send no ``Origin`` and are unaffected;
- an HTTP/1.1 request without ``Host`` is refused (400 ``invalid_http``, as RFC 9112 requires; HTTP/1.0 needs
  none);
- when the server is bound to a loopback address (the default 127.0.0.1), a request whose ``Host`` is not a
  loopback name (``localhost``, ``127.0.0.0/8``, ``[::1]``, any port) is refused (403 ``forbidden``) unless
  listed in ``LOSSD_ALLOWED_HOSTS`` (``*`` allows every name). Bound to any other address (0.0.0.0 in a
  container), ``Host`` is checked only when ``LOSSD_ALLOWED_HOSTS`` is set.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable
from urllib.parse import urlsplit

from ..errors import ServiceError, quote
from ..settings import Settings
from .errors import error_response

GOOD_HOSTS_KEPT = 64
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def split_host(value: str) -> tuple[str, int | None] | None:
    """'Host' header -> (lower-case name, port or None); None when it is not a host[:port]."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):  # [v6]:port
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else ""
    elif value.count(":") == 1:
        name, port_text = value.split(":")
    elif ":" in value:  # a bare IPv6 address is not a valid Host
        return None
    else:
        name, port_text = value, ""
    if port_text:
        if not (port_text.isdigit() and len(port_text) <= 5 and int(port_text) <= 65535):
            return None
        return name, int(port_text)
    return name, None


def is_loopback_name(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_rules(allowed: Iterable[str]) -> tuple[bool, set[tuple[str, int | None]], tuple[str, ...]]:
    """LOSSD_ALLOWED_HOSTS -> (any, exact (name, port) pairs, '.suffix'es); 'name' matches any port, 'name:port'
    that port, '*.example.com' any subdomain of example.com."""
    exact: set[tuple[str, int | None]] = set()
    suffixes: list[str] = []
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == "*":
            return True, set(), ()
        if entry.startswith("*."):
            suffixes.append(entry[1:])
            continue
        parsed = split_host(entry)
        if parsed is not None:
            exact.add(parsed)
    return False, exact, tuple(suffixes)


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """'scheme://host[:port]' -> (scheme, host, port with the scheme's default filled in)."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    return parts.scheme, parts.hostname, port if port is not None else DEFAULT_PORTS[parts.scheme]


def _on_socket(scope) -> bool:
    """Whether the request came over a TCP socket (uvicorn names its address); an in-process test client has no
    socket, and no browser can reach it."""
    server = scope.get("server")
    if not server:
        return False
    try:
        ipaddress.ip_address(str(server[0]).strip("[]"))
    except ValueError:
        return False
    return True


class OriginGuard:
    """Pure ASGI middleware; it reads headers only, never the body, and answers refusals through the error
    table (lossd.errors)."""

    def __init__(self, app, settings: Settings | None = None, *, bind_host: str = "127.0.0.1",
                 allowed_hosts: Iterable[str] = (), cors_origins: Iterable[str] = ()) -> None:
        self.app = app
        if settings is not None:
            bind_host, allowed_hosts, cors_origins = settings.host, settings.allowed_hosts, settings.cors_origins
        allowed_hosts = list(allowed_hosts)
        self.check_host = bool(allowed_hosts) or is_loopback_name(bind_host.strip("[]").lower())
        self.any_host, self.exact_hosts, self.host_suffixes = _host_rules(allowed_hosts)
        self.bind_host = bind_host
        origins = [o.strip() for o in cors_origins]
        self.any_origin = "*" in origins
        self.origins = {key for key in map(_origin_key, origins) if key is not None}
        # Host values already found allowed, as sent (a few: '127.0.0.1:8000', 'localhost:8000'), so most
        # requests are checked with one lookup; only allowed values are kept, at most GOOD_HOSTS_KEPT
        self._good_hosts: set[bytes] = set()

    def host_allowed(self, host: tuple[str, int | None]) -> bool:
        name, port = host
        if self.any_host or is_loopback_name(name):
            return True
        if (name, None) in self.exact_hosts or (name, port) in self.exact_hosts:
            return True
        return any(name.endswith(suffix) for suffix in self.host_suffixes)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host_raw = origin = None
        for name, value in scope.get("headers") or ():
            if name == b"host":
                host_raw = value
            elif name == b"origin":
                origin = value.decode("latin-1")
        if host_raw is None and scope.get("http_version") == "1.1" and _on_socket(scope):
            # RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host. Every client lossd
            # documents sends one (httpx, http.client, urllib, tritonclient, curl, kubelet probes); HTTP/1.0,
            # where Host is optional, is still answered
            return await self._refuse(send, scope, ServiceError(
                "an HTTP/1.1 request must carry a Host header (RFC 9112)", "invalid_http", field="host"))
        if origin is None and (not self.check_host or host_raw is None or host_raw in self._good_hosts):
            return await self.app(scope, receive, send)  # the common case: a client that is not a browser
        host_header = host_raw.decode("latin-1") if host_raw is not None else None
        host = split_host(host_header) if host_header is not None else None
        if self.check_host and host_header is not None and host_raw not in self._good_hosts and _on_socket(scope):
            if host is None or not self.host_allowed(host):
                return await self._refuse(send, scope, ServiceError(
                    f"Host {quote(host_header)} is not a name of this server, which is bound to {self.bind_host}; "
                    "a web page may have pointed its own name at this address (DNS rebinding). To allow the "
                    "name, add it to LOSSD_ALLOWED_HOSTS (comma-separated or a JSON list; '*' allows any)",
                    "forbidden", field="host"))
            if len(self._good_hosts) < GOOD_HOSTS_KEPT:
                self._good_hosts.add(host_raw)
        if origin is not None and not self.origin_allowed(origin, scope, host):
            return await self._refuse(send, scope, ServiceError(
                f"requests from web pages at origin {quote(origin)} are refused (a page must not drive this "
                "server); to allow that origin, add it to LOSSD_CORS_ORIGINS (comma-separated or a JSON list)",
                "forbidden", field="origin"))
        return await self.app(scope, receive, send)

    def origin_allowed(self, origin: str, scope, host: tuple[str, int | None] | None) -> bool:
        if self.any_origin:
            return True
        key = _origin_key(origin)
        if key is None:  # 'null' (sandboxed frames, file:// pages) and anything unreadable
            return False
        if key in self.origins:
            return True
        if host is None:
            return False
        scheme = scope.get("scheme", "http")
        scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        own = (scheme, host[0], host[1] if host[1] is not None else DEFAULT_PORTS.get(scheme, 80))
        return key == own

    @staticmethod
    async def _refuse(send, scope, exc: ServiceError) -> None:
        if scope["type"] == "websocket":  # no routes use them; closed before the handshake is accepted
            await send({"type": "websocket.close", "code": 1008})
            return
        resp = error_response(scope.get("path", ""), exc)
        await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})


class HeadAsGet:
    """HEAD on a GET route answers what GET would, without the body (RFC 9110: the same status and headers, so
    Content-Length is the GET body's): uptime monitors, load balancers and ``curl -I`` probe with it, and FastAPI's
    routes answer only the methods they declare."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: dict) -> None:
            if message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    await send({"type": "http.response.body", "body": b""})
                return
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)
