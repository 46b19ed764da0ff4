"""REST edges a newcomer hit, against a real `lossd serve`: several API keys in one request (both transports),
compressed bodies, the playground under /playground/index.html, CORS and the lossd-error-* headers, and an
HTTP/1.1 request without Host."""

import gzip
import socket
from urllib.parse import urljoin

import grpc
import httpx
import pytest
from lossd_client.wire import pb, pb_grpc

from ..conftest import start_server

BODY = {"pred": [[0, 0, 10, 10]], "target": [[1, 1, 11, 11]]}
APP = "http://app.example"


@pytest.fixture(scope="module")
def keyed():
    server = start_server({"LOSSD_API_KEYS": "k1,k2", "LOSSD_CORS_ORIGINS": APP})
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=30)


def _status(url: str, headers: list[tuple[str, str]]) -> int:
    return httpx.post(f"{url}/v1/losses/ciou", json=BODY, headers=headers, timeout=60).status_code


@pytest.mark.parametrize("headers", [
    [("x-api-key", "k1"), ("authorization", "Bearer zz")],   # the Bearer key is wrong
    [("x-api-key", "zz"), ("authorization", "Bearer k1")],
    [("x-api-key", "k1"), ("authorization", "Bearer k2")],   # two good keys, but two
    [("authorization", "Bearer k1"), ("authorization", "Bearer k2")],
    [("x-api-key", "k1"), ("authorization", "Bearer")],       # an empty Bearer counts, as an empty x-api-key does
    [("x-api-key", ""), ("authorization", "Bearer k1")],
])
def test_several_keys_in_one_request_are_refused(keyed, headers):
    resp = httpx.post(f"{keyed.http_url}/v1/losses/ciou", json=BODY, headers=headers, timeout=60)
    assert resp.status_code == 401 and resp.headers["lossd-error-code"] == "unauthorized"
    channel = grpc.insecure_channel(keyed.grpc_target)
    try:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.LossServiceStub(channel).ListLosses(pb.ListLossesRequest(), metadata=headers, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()


def test_one_key_either_way_is_accepted_on_both_transports(keyed):
    for headers in ([("x-api-key", "k1")], [("authorization", "Bearer k2")]):
        assert _status(keyed.http_url, headers) == 200
        channel = grpc.insecure_channel(keyed.grpc_target)
        try:
            assert pb_grpc.LossServiceStub(channel).ListLosses(pb.ListLossesRequest(), metadata=headers,
                                                               timeout=30).losses
        finally:
            channel.close()
    assert _status(keyed.http_url, []) == 401


def test_cors_exposes_the_error_headers(keyed):
    resp = httpx.post(f"{keyed.http_url}/v1/losses/ciou", json={"pred": [[5, 5, 1, 1]], "target": [[0, 0, 1, 1]]},
                      headers={"origin": APP, "x-api-key": "k1"}, timeout=60)
    assert resp.status_code == 422 and resp.headers["access-control-allow-origin"] == APP
    exposed = {h.strip().lower() for h in resp.headers["access-control-expose-headers"].split(",")}
    assert {"lossd-error-code", "lossd-error-field", "lossd-error-rows", "retry-after"} <= exposed, exposed
    assert resp.headers["lossd-error-code"] == "inverted_box"


@pytest.mark.parametrize("path", ["/v1/losses/ciou", "/v2/models/ciou/infer"])
def test_compressed_body_is_refused_naming_the_header(live_server, path):
    body = b'{"pred": [[0, 0, 10, 10]], "target": [[1, 1, 11, 11]]}' if path.startswith("/v1") else (
        b'{"inputs": [{"name": "PRED", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 10, 10]}, '
        b'{"name": "TARGET", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 11, 11]}]}')
    resp = httpx.post(live_server.http_url + path, content=gzip.compress(body), timeout=60,
                      headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert resp.status_code == 415, (resp.status_code, resp.text)
    assert resp.headers["lossd-error-field"] == "content-encoding"
    assert "Content-Encoding" in resp.text and "gzip" in resp.text
    # identity is no encoding at all
    resp = httpx.post(live_server.http_url + path, content=body, timeout=60,
                      headers={"content-type": "application/json", "content-encoding": "identity"})
    assert resp.status_code == 200, resp.text


def test_playground_index_html_leads_to_a_page_whose_assets_load(live_server):
    url = f"{live_server.http_url}/playground/index.html"
    resp = httpx.get(url, timeout=30)
    assert resp.status_code in (301, 308), resp.status_code
    page = httpx.get(urljoin(url, resp.headers["location"]), timeout=30)
    assert page.status_code == 200 and "<script" in page.text
    for asset in ("playground/app.js", "playground/playground.css"):
        assert asset in page.text
        assert httpx.get(urljoin(str(page.url), asset), timeout=30).status_code == 200


def _raw(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_http11_without_host_is_400_and_http10_is_answered(live_server):
    out = _raw(live_server.http_url, b"GET /v1/losses/ciou HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert b"lossd-error-field: host" in out.lower() and b"Host" in out
    out = _raw(live_server.http_url, b"GET /v1/losses/ciou HTTP/1.0\r\n\r\n")
    assert out.split(b"\r\n", 1)[0].endswith(b" 200 OK"), out[:200]
    out = _raw(live_server.http_url, b"GET /v1/losses/ciou HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
