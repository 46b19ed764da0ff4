"""HEAD answers what GET would, without a body (monitors, load balancers and `curl -I` probe with it; every route
answered 405 before). Against a real `lossd serve`, also with HEAD and GET pipelined on one connection."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx
import pytest


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/v2", "/v1/losses", "/v1/losses/ciou",
                                  "/v2/models/ciou", "/metrics", "/playground", "/no/such/page",
                                  "/v2/models/ciou/infer"])
def test_head_is_get_without_the_body(live_server, path):
    with httpx.Client(base_url=live_server.http_url, timeout=10) as c:
        head, get = c.head(path), c.get(path)
    assert head.status_code == get.status_code
    assert head.content == b""
    if get.status_code == 200:
        assert int(head.headers["content-length"]) == len(get.content) > 0
        assert head.headers["content-type"] == get.headers["content-type"]


def test_head_then_get_on_one_connection(live_server):
    u = urlsplit(live_server.http_url)
    host = f"{u.hostname}:{u.port}"
    with socket.create_connection((u.hostname, u.port), timeout=10) as so:
        so.sendall(f"HEAD /v2/health/live HTTP/1.1\r\nHost: {host}\r\n\r\n"
                   f"GET /v2/health/live HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
            chunk = so.recv(65536)
            assert chunk, data
            data += chunk
    first, second = data.split(b"HTTP/1.1 200")[1:]
    assert first.endswith(b"\r\n\r\n")  # headers only
    assert second.split(b"\r\n\r\n", 1)[1] == httpx.get(f"{live_server.http_url}/v2/health/live").content
