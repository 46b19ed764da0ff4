"""Web pages may not drive the server (rest/guard.py), against real `lossd serve` processes on loopback.

The attack a page can make without any preflight: POSTs with ``content-type: text/plain`` (a "simple" request)
that (1) drop every shared-memory region, (2) register a region on an existing /dev/shm object and (3) run an
inference whose output is written into it. A browser marks them with its page's ``Origin``; a page that rebinds
its own name to 127.0.0.1 sends that name as ``Host``. Both must be refused and change nothing (the object's
bytes included); clients without ``Origin`` (curl, the Python client), the server's own pages and origins allowed
by LOSSD_CORS_ORIGINS keep working."""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from multiprocessing import shared_memory

import httpx
import numpy as np
import pytest

from lossd.rest.guard import OriginGuard, split_host
from tests.conftest import start_server

from .test_playground import in_browser

TEXT = {"content-type": "text/plain"}
VICTIM = bytes(range(64))
# an l1 inference whose 8 losses (32 bytes) go into a shared-memory region
INFER = {"inputs": [{"name": "PRED", "shape": [8], "datatype": "FP32", "data": [1.0] * 8},
                    {"name": "TARGET", "shape": [8], "datatype": "FP32", "data": [0.0] * 8}],
         "parameters": {"return_grad": False}}


def infer_into(region: str) -> str:
    return json.dumps(dict(INFER, outputs=[{"name": "LOSS", "parameters": {
        "shared_memory_region": region, "shared_memory_byte_size": 32}}]))


def stop(server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=30)
    except Exception:
        server.proc.kill()


@pytest.fixture(scope="module")
def server():
    srv = start_server()
    yield srv
    stop(srv)


@pytest.fixture(scope="module")
def open_server():
    """Allows one web origin (a JSON list) and extra host names (comma-separated)."""
    srv = start_server({"LOSSD_CORS_ORIGINS": '["https://annotate.example"]',
                        "LOSSD_ALLOWED_HOSTS": "lossd.internal, *.corp.example"})
    yield srv
    stop(srv)


@pytest.fixture
def victim():
    """A /dev/shm object another program owns, and a region a legitimate local client registered on it."""
    shm = shared_memory.SharedMemory(name=f"lossd-victim-{uuid.uuid4().hex[:8]}", create=True, size=64)
    shm.buf[:64] = VICTIM
    yield shm
    shm.close()
    shm.unlink()


def regions(url: str) -> set[str]:
    resp = httpx.get(f"{url}/v2/systemsharedmemory/status")
    assert resp.status_code == 200, resp.text
    return {r["name"] for r in resp.json()}


def attack(url: str, key: str, headers: dict) -> list[httpx.Response]:
    """The page's three requests, as its browser sends them."""
    h = dict(TEXT, **headers)
    with httpx.Client(base_url=url, headers=h, timeout=30) as c:
        return [c.post("/v2/systemsharedmemory/unregister"),
                c.post("/v2/systemsharedmemory/region/pwn/register",
                       content=json.dumps({"key": key, "offset": 0, "byte_size": 64})),
                c.post("/v2/models/l1/infer", content=infer_into("pwn")),
                c.post("/v2/models/l1/infer", content=infer_into("legit")),  # the legitimate client's own region
                c.post("/v1/metrics/iou", content=json.dumps({"boxes1": [[0, 0, 1, 1]], "boxes2": [[0, 0, 1, 1]]}))]


def register_legit(url: str, key: str) -> None:
    resp = httpx.post(f"{url}/v2/systemsharedmemory/region/legit/register",
                      json={"key": key, "offset": 0, "byte_size": 64})
    assert resp.status_code == 200, resp.text


def assert_refused(responses: list[httpx.Response], field: str) -> None:
    for resp in responses:
        assert resp.status_code == 403, (resp.request.url, resp.status_code, resp.text)
        assert resp.headers["lossd-error-code"] == "forbidden"
        assert resp.headers["lossd-error-field"] == field
    v1 = responses[-1].json()["error"]
    assert v1["code"] == "forbidden" and ("LOSSD_CORS_ORIGINS" if field == "origin" else "LOSSD_ALLOWED_HOSTS") \
        in v1["message"]


def test_a_cross_origin_page_changes_nothing(server, victim):
    register_legit(server.http_url, victim.name)
    try:
        assert_refused(attack(server.http_url, victim.name, {"Origin": "http://evil.example"}), "origin")
        assert_refused(attack(server.http_url, victim.name, {"Origin": "null"}), "origin")  # sandboxed frames
        # a page on another port of this very host is another origin too
        port = int(server.http_url.rsplit(":", 1)[1])
        assert_refused(attack(server.http_url, victim.name, {"Origin": f"http://127.0.0.1:{port + 1}"}), "origin")
        assert bytes(victim.buf[:64]) == VICTIM
        assert regions(server.http_url) == {"legit"}
    finally:
        httpx.post(f"{server.http_url}/v2/systemsharedmemory/unregister")


def test_a_rebound_name_changes_nothing(server, victim):
    """DNS rebinding: the page's own origin (so same-origin to the browser), its own name as Host."""
    port = server.http_url.rsplit(":", 1)[1]
    register_legit(server.http_url, victim.name)
    try:
        for headers in ({"Host": f"attacker.example:{port}", "Origin": f"http://attacker.example:{port}"},
                        {"Host": f"attacker.example:{port}"},   # a GET-like request carries no Origin
                        {"Host": "127.0.0.1.attacker.example"}, {"Host": "localhost.attacker.example"}):
            assert_refused(attack(server.http_url, victim.name, headers), "host")
        assert bytes(victim.buf[:64]) == VICTIM
        assert regions(server.http_url) == {"legit"}
        # and it cannot read answers either
        assert httpx.get(f"{server.http_url}/v1/losses", headers={"Host": "attacker.example"}).status_code == 403
    finally:
        httpx.post(f"{server.http_url}/v2/systemsharedmemory/unregister")


def test_clients_without_a_browser_and_the_servers_own_pages_work(server, victim):
    url = server.http_url
    port = url.rsplit(":", 1)[1]
    # curl-like: no Origin, text/plain or JSON, loopback names in Host with any port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "127.0.0.2:1", "[::1]:80", "LOCALHOST"):
        resp = httpx.post(f"{url}/v1/metrics/iou", headers=dict(TEXT, Host=host),
                          content=json.dumps({"boxes1": [[0, 0, 2, 2]], "boxes2": [[1, 1, 3, 3]]}))
        assert resp.status_code == 200, (host, resp.text)
        assert resp.json()["values"] == pytest.approx([1 / 7])
    # the local client writing into its own region still works
    register_legit(url, victim.name)
    try:
        resp = httpx.post(f"{url}/v2/models/l1/infer", content=infer_into("legit"))
        assert resp.status_code == 200, resp.text
        assert np.frombuffer(bytes(victim.buf[:32]), "<f4").tolist() == [1.0] * 8
    finally:
        httpx.post(f"{url}/v2/systemsharedmemory/unregister")
    # same origin (the playground and /docs call their own server): allowed, default port spelled or not
    for origin, host in ((f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"),
                         (f"http://localhost:{port}", f"localhost:{port}"),
                         ("http://localhost", "localhost:80"), ("http://localhost:80", "localhost")):
        resp = httpx.post(f"{url}/v1/metrics/iou", headers={"Origin": origin, "Host": host},
                          json={"boxes1": [[0, 0, 2, 2]], "boxes2": [[0, 0, 2, 2]]})
        assert resp.status_code == 200, (origin, host, resp.text)
    # https page calling an http server on the same host:port is another origin
    resp = httpx.post(f"{url}/v1/metrics/iou", headers={"Origin": f"https://127.0.0.1:{port}"},
                      json={"boxes1": [[0, 0, 2, 2]], "boxes2": [[0, 0, 2, 2]]})
    assert resp.status_code == 403


def test_allowed_origins_and_hosts(open_server):
    url = open_server.http_url
    body = {"boxes1": [[0, 0, 2, 2]], "boxes2": [[1, 1, 3, 3]]}
    pre = httpx.options(f"{url}/v1/metrics/iou", headers={"Origin": "https://annotate.example",
                                                          "Access-Control-Request-Method": "POST",
                                                          "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://annotate.example"
    resp = httpx.post(f"{url}/v1/metrics/iou", headers={"Origin": "https://annotate.example"}, json=body)
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "https://annotate.example"
    assert resp.json()["values"] == pytest.approx([1 / 7])
    # any other origin, preflight or not, is refused
    pre = httpx.options(f"{url}/v1/metrics/iou", headers={"Origin": "https://evil.example",
                                                          "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 403 and "access-control-allow-origin" not in pre.headers
    assert httpx.post(f"{url}/v1/metrics/iou", headers={"Origin": "https://evil.example"},
                      json=body).status_code == 403
    # LOSSD_ALLOWED_HOSTS: the listed names (any port) and subdomains; others still refused
    for host, status in (("lossd.internal", 200), ("lossd.internal:8443", 200), ("a.corp.example", 200),
                         ("corp.example", 403), ("attacker.example", 403), ("lossd.internal.evil", 403)):
        assert httpx.post(f"{url}/v1/metrics/iou", headers={"Host": host}, json=body).status_code == status, host


def test_host_header_parsing():
    assert split_host("LocalHost:8000") == ("localhost", 8000)
    assert split_host("[::1]:80") == ("::1", 80)
    assert split_host("[::1]") == ("::1", None)
    assert split_host("example.com") == ("example.com", None)
    for bad in ("", "::1", "a:b", "a:99999", "[::1", "[::1]x", "a:1:2"):
        assert split_host(bad) is None, bad
    # bound anywhere but loopback, Host is checked only when LOSSD_ALLOWED_HOSTS is set
    assert not OriginGuard(None, bind_host="0.0.0.0").check_host
    assert OriginGuard(None, bind_host="0.0.0.0", allowed_hosts=["x"]).check_host
    assert OriginGuard(None, bind_host="::1").check_host and OriginGuard(None, bind_host="localhost").check_host


class _EvilPage(http.server.SimpleHTTPRequestHandler):
    page = b""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args):
        pass


@in_browser
def test_a_page_in_a_real_browser_cannot_write_shared_memory(server, victim):
    """The attacker's page, served from another port, run by headless chromium: its no-cors text/plain POSTs
    reach the server and are refused; the /dev/shm object keeps its bytes."""
    from playwright.sync_api import sync_playwright

    from .test_playground import ARGS, CHROMIUM

    script = f"""<html><body><script>
const B = '{server.http_url}';
(async () => {{
  const o = {{method: 'POST', mode: 'no-cors', headers: {{'content-type': 'text/plain'}}}};
  await fetch(B + '/v2/systemsharedmemory/unregister', o);
  await fetch(B + '/v2/systemsharedmemory/region/pwn/register',
              {{...o, body: JSON.stringify({{key: '{victim.name}', offset: 0, byte_size: 64}})}});
  await fetch(B + '/v2/models/l1/infer', {{...o, body: {json.dumps(infer_into("pwn"))}}});
  await fetch(B + '/v2/models/l1/infer', {{...o, body: {json.dumps(infer_into("legit"))}}});
  document.title = 'done';
}})();
</script></body></html>"""
    B = server.http_url  # noqa: N806
    _EvilPage.page = script.encode()
    page_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EvilPage)
    threading.Thread(target=page_server.serve_forever, daemon=True).start()
    register_legit(server.http_url, victim.name)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                pg = browser.new_page()
                seen = []
                pg.on("response", lambda r: seen.append((r.url, r.status)) if r.url.startswith(B) else None)
                pg.goto(f"http://127.0.0.1:{page_server.server_address[1]}/")
                pg.wait_for_function("() => document.title === 'done'", timeout=30_000)
            finally:
                browser.close()
        assert bytes(victim.buf[:64]) == VICTIM
        # all four requests reached the server and were refused there
        assert len(seen) == 4 and all(status == 403 for _, status in seen), seen
        assert regions(server.http_url) == {"legit"}
        assert "Traceback" not in server.log()
    finally:
        page_server.shutdown()
        httpx.post(f"{server.http_url}/v2/systemsharedmemory/unregister")
