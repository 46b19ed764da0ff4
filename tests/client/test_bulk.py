"""The http.client path for large binary requests: keep-alive connections the server has closed are replaced
at once, network failures become UnavailableError, and it stands aside wherever a proxy applies."""

import socket
import threading

import pytest

from lossd_client import UnavailableError
from lossd_client._bulk import BulkHTTP, usable


class OneShotServer:
    """Answers one request per connection with the body reversed, then closes the connection without saying so
    (what a server does to an idle keep-alive connection when its timeout passes)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, body = data.split(b"\r\n\r\n", 1)
                length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0]
                             .split(b":")[1])
                while len(body) < length:
                    body += conn.recv(65536)
                answer = body[::-1]
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: "
                             + str(len(answer)).encode() + b"\r\n\r\n" + answer)

    def close(self) -> None:
        self.sock.close()


def test_closed_keep_alive_connections_are_replaced():
    server = OneShotServer()
    bulk = BulkHTTP(f"http://127.0.0.1:{server.port}/prefix", timeout=10, headers={"x-api-key": "k"})
    try:
        for i in range(4):
            body = bytes(range(256)) * (1000 + i)
            resp = bulk.post("/v2/models/giou/infer", body, {"Content-Type": "application/octet-stream"})
            assert resp.status_code == 200 and resp.content == body[::-1]
        assert server.connections == 4  # each request after the first found its connection closed, and retried
    finally:
        bulk.close()
        server.close()


def test_network_failure_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    bulk = BulkHTTP(f"http://127.0.0.1:{port}", timeout=5, headers={})
    with pytest.raises(UnavailableError):
        bulk.post("/v2/models/giou/infer", b"x", {})


def test_stands_aside_where_a_proxy_applies(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy",
                "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert usable("http://10.1.2.3:8000")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert not usable("http://10.1.2.3:8000")
    assert usable("https://10.1.2.3:8000")  # the proxy is for http only
    monkeypatch.setenv("NO_PROXY", "10.1.2.3")
    assert usable("http://10.1.2.3:8000")
    assert not usable("grpc://10.1.2.3:50051")
