"""lossd-client's big shared-memory answers handed back as views of their region ("lent" until the caller lets go),
against a real `lossd serve`, sync and async, gRPC and HTTP. Every answer is compared with the same call over the
wire (shared_memory=False): a lent region must never be written again while the caller holds its arrays, regions
must come back once they are let go, close() must leave held answers readable and nothing registered or in
/dev/shm, a region taken over must never give a stale answer, and a server's region limit must not break calls.
"""

from __future__ import annotations

import gc
import os

import httpx
import numpy as np
import pytest

from lossd_client import LossClient
from tests.client.test_shared_memory import Driver, boxes, hijack, same, status
from tests.conftest import start_server

N = 80_000  # LOSS + GRAD 1.6 MB: over the client's 1 MiB threshold for lending an answer


class Client(Driver):
    closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            super().close()


def _client(request, server):
    kind, asynchronous = request.param
    d = Client(server.http_url if kind == "http" else server.grpc_url, asynchronous)
    request.addfinalizer(d.close)
    return d


TRANSPORTS = dict(params=[("http", False), ("grpc", False), ("http", True), ("grpc", True)],
                  ids=["http", "grpc", "http-async", "grpc-async"])


@pytest.fixture(**TRANSPORTS)
def client(request, live_server):
    return _client(request, live_server)


@pytest.fixture(scope="module")
def inputs():
    return [boxes(N, seed) for seed in range(12)]


@pytest.fixture(scope="module")
def answers(live_server, inputs):
    """Each input's answer over the wire (computed once)."""
    with LossClient(live_server.http_url, shared_memory=False) as wire:
        return [wire.loss("ciou", p, t) for p, t in inputs]


def lent(result, region) -> bool:
    """Whether both arrays of an answer are views of the region's shared memory (not copies)."""
    whole = np.frombuffer(region.mem.buf, np.uint8)
    try:
        return (not result.loss.flags.owndata and not result.grad.flags.owndata
                and np.shares_memory(result.loss, whole) and np.shares_memory(result.grad, whole))
    finally:
        del whole


def copied(result, shm) -> bool:
    """Whether neither array of an answer shares memory with any region of the client's."""
    for region in shm.pool:
        whole = np.frombuffer(region.mem.buf, np.uint8)
        try:
            if np.shares_memory(result.loss, whole) or np.shares_memory(result.grad, whole):
                return False
        finally:
            del whole
    return True


def ours_registered(server, names) -> list[str]:
    return [r["name"] for r in status(server) if r["name"] in names]


def test_a_big_answer_is_a_view_of_shared_memory(client, inputs, answers):
    p, t = inputs[0]
    r = client.loss("ciou", p, t)
    assert client.shm.calls == 1
    same(r, answers[0])
    assert lent(r, client.shm.current) and client.shm.current.lent
    # a small answer is copied out, and leaves its region free
    small = client.loss("ciou", p[:20_000], t[:20_000])
    assert client.shm.calls == 2 and copied(small, client.shm)
    np.testing.assert_array_equal(small.loss, answers[0].loss[:20_000])


def test_kept_answers_are_never_overwritten_and_regions_come_back(client, live_server, inputs, answers):
    shm = client.shm
    seen = set()

    def call(i):
        r = client.loss("ciou", *inputs[i])
        seen.update(region.name for region in shm.pool)
        return r

    a, b, c = call(0), call(1), call(2)
    for got, i in ((a, 0), (b, 1), (c, 2)):
        same(got, answers[i])  # each call's answer, not a later call's written over it
    # a and b are lent; c took the last free region, which is never lent: its answer is copied out
    assert lent(a, shm.pool[0]) and lent(b, shm.pool[1]) and copied(c, shm)
    for i in range(3, 6):
        same(call(i), answers[i])
    for got, i in ((a, 0), (b, 1), (c, 2)):
        same(got, answers[i])  # still the answer to its own call after three more calls
    assert shm.calls == 6 and len(shm.pool) == 3 and len(seen) == 3
    assert len(ours_registered(live_server, seen)) == 3
    del a, b, c, got
    gc.collect()
    assert not any(region.lent for region in shm.pool)
    for k in range(10):
        r = call(6 + k % 6)
        same(r, answers[6 + k % 6])
        assert lent(r, shm.current)  # the regions came back: big answers are lent again
    assert shm.calls == 16 and len(seen) == 3 and len(ours_registered(live_server, seen)) <= 3


def test_a_loop_that_keeps_the_latest_answer(client, live_server, inputs, answers):
    seen = set()
    r = None
    for i in range(6):
        r = client.loss("ciou", *inputs[i])
        seen.update(region.name for region in client.shm.pool)
        same(r, answers[i])
        assert lent(r, client.shm.current)
    assert client.shm.calls == 6 and len(client.shm.pool) <= 3 and len(seen) <= 3
    assert len(ours_registered(live_server, seen)) <= 3


def test_close_while_holding_an_answer(client, live_server, inputs, answers):
    first = client.loss("ciou", *inputs[0])
    second = client.loss("ciou", *inputs[1])
    names = [region.name for region in client.shm.pool]
    objects = [region.mem.name for region in client.shm.pool]
    assert len(names) == 2 and all(os.path.exists(f"/dev/shm/{o}") for o in objects)
    assert sorted(ours_registered(live_server, names)) == sorted(names)
    client.close()
    assert ours_registered(live_server, names) == []
    assert [o for o in objects if os.path.exists(f"/dev/shm/{o}")] == []
    same(first, answers[0])  # the mapping lives while the arrays do
    same(second, answers[1])
    assert float(first.loss.sum() + second.grad.sum()) == pytest.approx(
        float(answers[0].loss.sum() + answers[1].grad.sum()), rel=1e-6)


def test_a_region_taken_over_while_lent_never_gives_a_stale_or_foreign_answer(client, live_server, inputs, answers):
    shm = client.shm
    held = client.loss("ciou", *inputs[0])
    theirs, taken = [], {shm.current.name}
    try:
        # the lent region's name taken over: the next call uses another region of ours and is right
        theirs.append(hijack(live_server, shm.current.name))
        nxt = client.loss("ciou", *inputs[1])
        same(nxt, answers[1])
        same(held, answers[0])
        del nxt
        gc.collect()
        # now the free region taken over too: the answer goes to their object, the client sees its sentinel
        # still in ours, forgets every region and retries in a fresh one
        for name in [region.name for region in shm.pool if region.name not in taken]:
            taken.add(name)
            theirs.append(hijack(live_server, name))
        replaced = shm.replaced
        for i in (2, 3, 4):
            r = client.loss("ciou", *inputs[i])
            same(r, answers[i])  # never the previous call's answer, never what their objects hold
        assert shm.replaced == replaced + 1 and shm.enabled and shm.calls == 5
        assert not taken & {region.name for region in shm.pool}
        same(held, answers[0])  # the forgotten region's mapping stays while its arrays do
    finally:
        for mem in theirs:
            mem.close()
            mem.unlink()
        httpx.post(f"{live_server.http_url}/v2/systemsharedmemory/unregister")


# ------------------------------------------------------------------- a server that allows two regions
@pytest.fixture(scope="module")
def small_server():
    srv = start_server({"LOSSD_MAX_SHM_REGIONS": "2"})
    yield srv
    srv.proc.terminate()
    srv.proc.wait(timeout=30)


@pytest.fixture(**TRANSPORTS)
def limited(request, small_server):
    assert httpx.post(f"{small_server.http_url}/v2/systemsharedmemory/unregister").status_code == 200
    return _client(request, small_server)


def test_the_servers_region_limit_reached_while_answers_are_held(limited, small_server, inputs, answers):
    shm = limited.shm
    kept = [limited.loss("ciou", *inputs[i]) for i in range(5)]
    for i, r in enumerate(kept):
        same(r, answers[i])
    # two regions registered and lent; the third was refused: those calls went over the wire, no error
    assert shm.calls == 2 and shm.enabled and shm.max_regions == 2 and len(shm.pool) == 2
    assert len(status(small_server)) == 2
    del kept, r
    gc.collect()
    for i in range(5, 9):
        same(limited.loss("ciou", *inputs[i]), answers[i])
    assert shm.calls == 6 and len(status(small_server)) == 2
