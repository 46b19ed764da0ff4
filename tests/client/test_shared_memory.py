"""lossd-client's shared-memory path when its region is lost or taken over, against a real `lossd serve`:
every region unregistered by another client (as after a server restart, or Triton's example clients at start),
the server restarted, the region's name registered again on another process's object, the object truncated.
Each call must give the right answer (never the previous call's), through a fresh region or else over the wire.
"""

import asyncio
import inspect
import os
import subprocess
import sys
import time
from multiprocessing import shared_memory

import httpx
import numpy as np
import pytest

from lossd_client import AsyncLossClient, InvalidInputError, LossClient
from tests.conftest import free_port


def boxes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n, 2))
    pred = np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32)
    txy = xy + rng.uniform(-10, 10, (n, 2))
    target = np.concatenate([txy, txy + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32)
    return pred, target


N = 20_000  # 640 KB of inputs: over the client's 256 KiB shared-memory threshold


class Driver:
    """LossClient or AsyncLossClient behind one blocking face (the async one on its own event loop)."""

    def __init__(self, url: str, asynchronous: bool, **kw) -> None:
        self.loop = asyncio.new_event_loop() if asynchronous else None
        if self.loop is not None:
            async def make():
                return AsyncLossClient(url, **kw)
            self.client = self.loop.run_until_complete(make())
        else:
            self.client = LossClient(url, **kw)

    def _wait(self, value):
        return self.loop.run_until_complete(value) if inspect.isawaitable(value) else value

    def loss(self, *args, **kw):
        return self._wait(self.client.loss(*args, **kw))

    @property
    def shm(self):
        return self.client._shm

    def close(self) -> None:
        self._wait(self.client.close())
        if self.loop is not None:
            self.loop.close()


@pytest.fixture(params=[("http", False), ("grpc", False), ("http", True), ("grpc", True)],
                ids=["http", "grpc", "http-async", "grpc-async"])
def client(request, live_server):
    kind, asynchronous = request.param
    url = live_server.http_url if kind == "http" else live_server.grpc_url
    d = Driver(url, asynchronous)
    yield d
    d.close()


@pytest.fixture
def wire(live_server):
    with LossClient(live_server.http_url, shared_memory=False) as c:
        yield c


def status(server) -> list[dict]:
    return httpx.get(f"{server.http_url}/v2/systemsharedmemory/status").json()


def same(a, b) -> None:
    np.testing.assert_array_equal(a.loss, b.loss)
    if a.grad is None or b.grad is None:
        assert a.grad is None and b.grad is None
    else:
        np.testing.assert_array_equal(a.grad, b.grad)


def test_every_region_unregistered_by_another_client(client, wire, live_server):
    p1, t1 = boxes(N, 1)
    p2, t2 = boxes(N, 2)
    first = client.loss("ciou", p1, t1)
    assert client.shm.calls == 1
    old = client.shm.name
    assert httpx.post(f"{live_server.http_url}/v2/systemsharedmemory/unregister").status_code == 200
    second = client.loss("ciou", p2, t2)  # was: InvalidInputError unknown_region, on every later call
    same(second, wire.loss("ciou", p2, t2))
    assert client.shm.calls == 2 and client.shm.replaced == 1 and client.shm.enabled
    mine = [r for r in status(live_server) if r["name"].startswith("lossd_client_")]
    assert [r["name"] for r in mine] == [client.shm.name] and client.shm.name != old
    third = client.loss("ciou", p1, t1, reduction="sum")
    assert client.shm.calls == 3 and third.loss == wire.loss("ciou", p1, t1, reduction="sum").loss
    same(client.loss("ciou", p1, t1), first)


def hijack(server, name: str) -> shared_memory.SharedMemory:
    """Another local process takes the region's name: unregisters it and registers it on its own object."""
    size = next(r["byte_size"] for r in status(server) if r["name"] == name)
    theirs = shared_memory.SharedMemory(create=True, size=size)
    base = f"{server.http_url}/v2/systemsharedmemory/region/{name}"
    assert httpx.post(f"{base}/unregister").status_code == 200
    assert httpx.post(f"{base}/register", json={"key": "/" + theirs.name, "byte_size": size}).status_code == 200
    return theirs


@pytest.mark.parametrize("reduction, return_grad", [("none", True), ("sum", False), ("mean", True)])
def test_a_region_taken_over_never_gives_a_stale_answer(client, wire, live_server, reduction, return_grad):
    p1, t1 = boxes(N, 3)
    p2, t2 = boxes(N, 4)
    first = client.loss("ciou", p1, t1, reduction=reduction, return_grad=return_grad)
    theirs = hijack(live_server, client.shm.name)
    try:
        second = client.loss("ciou", p2, t2, reduction=reduction, return_grad=return_grad)
        want = wire.loss("ciou", p2, t2, reduction=reduction, return_grad=return_grad)
        same(second, want)  # was: the first call's answer, returned again
        assert not np.array_equal(np.asarray(second.loss), np.asarray(first.loss))
        # the retry went through a fresh region under a fresh name, not the one taken over
        assert client.shm.calls == 2 and client.shm.replaced == 1
        assert client.shm.name != theirs.name and client.shm.name in [r["name"] for r in status(live_server)]
    finally:
        theirs.close()
        theirs.unlink()
        httpx.post(f"{live_server.http_url}/v2/systemsharedmemory/unregister")


def test_a_region_taken_over_with_bad_boxes_gives_the_callers_answer_not_their_error(client, wire, live_server):
    """The other object holds inverted boxes: the server refuses *their* tensors. The client sees that the region
    under its name is not its own, and retries through a fresh one; a genuine input error still stands."""
    p, t = boxes(N, 9)
    client.loss("ciou", p, t)
    theirs = hijack(live_server, client.shm.name)
    try:
        rows = theirs.size // 16
        theirs.buf[:rows * 16] = np.tile(np.float32([10, 10, 0, 0]), rows).tobytes()  # x2 < x1 in every row
        same(client.loss("ciou", p, t), wire.loss("ciou", p, t))
        assert client.shm.calls == 2 and client.shm.replaced == 1
        bad = p.copy()
        bad[7] = [10, 10, 0, 0]
        with pytest.raises(InvalidInputError) as err:
            client.loss("ciou", bad, t)
        assert err.value.code == "inverted_box" and err.value.rows == [7] and client.shm.replaced == 1
        assert client.shm.enabled
    finally:
        theirs.close()
        theirs.unlink()
        httpx.post(f"{live_server.http_url}/v2/systemsharedmemory/unregister")


def test_a_region_lost_on_every_try_falls_back_to_the_wire(client, wire, live_server):
    """Lost again on the retry: shared memory goes off for this client and the call goes over the wire."""
    p, t = boxes(N, 5)
    ep = client.shm.endpoint
    real = ep.shm_infer
    tries = []

    def steal():
        tries.append(1)
        httpx.post(f"{live_server.http_url}/v2/systemsharedmemory/unregister")

    if inspect.iscoroutinefunction(real):
        async def infer(*a, **kw):
            steal()
            return await real(*a, **kw)
    else:
        def infer(*a, **kw):
            steal()
            return real(*a, **kw)
    ep.shm_infer = infer
    out = client.loss("ciou", p, t)
    same(out, wire.loss("ciou", p, t))
    assert len(tries) == 2 and client.shm.calls == 0 and not client.shm.enabled
    client.loss("ciou", p, t)
    assert len(tries) == 2  # off for good: no more tries


def test_a_truncated_object_is_replaced(client, wire, live_server):
    """Our object shrunk after the inputs were written: the server answers region_truncated, the client
    replaces the region and retries."""
    p, t = boxes(N, 6)
    client.loss("ciou", p, t)
    ep = client.shm.endpoint
    real = ep.shm_infer
    once = []

    def shrink():
        if not once:
            once.append(1)
            os.truncate(f"/dev/shm/{client.shm.mem.name}", 4096)

    if inspect.iscoroutinefunction(real):
        async def infer(*a, **kw):
            shrink()
            return await real(*a, **kw)
    else:
        def infer(*a, **kw):
            shrink()
            return real(*a, **kw)
    ep.shm_infer = infer
    same(client.loss("ciou", p, t), wire.loss("ciou", p, t))
    assert client.shm.calls == 2 and client.shm.replaced == 1 and client.shm.enabled


def test_an_object_truncated_between_calls_does_not_kill_the_client(live_server, wire):
    """Writing the next call's inputs into a mapping past its object's end would be SIGBUS here."""
    p, t = boxes(N, 7)
    with LossClient(live_server.grpc_url) as c:
        c.loss("ciou", p, t)
        os.truncate(f"/dev/shm/{c._shm.mem.name}", 4096)
        same(c.loss("ciou", p, t), wire.loss("ciou", p, t))
        assert c._shm.calls == 2 and c._shm.replaced == 1


def test_a_restarted_server_gets_a_new_region(tmp_path):
    """The server restarts on the same ports between two calls: the client registers again and carries on."""
    http_port, grpc_port = free_port(), free_port()
    env = dict(os.environ, LOSSD_DEVICE="cpu", PYTHONUNBUFFERED="1")

    def serve() -> subprocess.Popen:
        log = open(tmp_path / "serve.log", "a")
        proc = subprocess.Popen([sys.executable, "-m", "lossd.cli", "serve", "--http-port", str(http_port),
                                 "--grpc-port", str(grpc_port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "lossd serve did not become ready"
            time.sleep(0.05)

    p, t = boxes(N, 8)
    proc = serve()
    try:
        with LossClient(f"grpc://127.0.0.1:{grpc_port}") as c, \
                LossClient(f"http://127.0.0.1:{http_port}") as h:
            before, before_h = c.loss("ciou", p, t), h.loss("ciou", p, t)
            proc.terminate()
            proc.wait(timeout=60)
            proc = serve()
            same(c.loss("ciou", p, t), before)
            same(h.loss("ciou", p, t), before_h)
            assert (c._shm.calls, c._shm.replaced, h._shm.calls, h._shm.replaced) == (2, 1, 2, 1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
