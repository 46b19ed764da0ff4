"""Pairwise answers are budgeted in bytes across requests (lossd.service.AnswerBudget) and big JSON answers are
sent slice by slice (rest/jsonio.SlicedJsonResponse): the budget's rules on their own, the JSON size bound it
relies on, and a real `lossd serve` answering big pairwise calls correctly, refusing one that alone is over the
budget (413) and one that finds no room in time (429 with Retry-After)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import numpy as np
import orjson
import pytest

from lossd.errors import Overloaded
from lossd.rest.jsonio import JSON_MAX_BYTES_PER_VALUE, OPTIONS, SlicedJsonResponse, sliced_json_bytes
from lossd.service import AnswerBudget, Service
from lossd.settings import Settings
from tests.conftest import start_server


# ------------------------------------------------------------------------------------------------ the budget
def run(coro):
    return asyncio.run(coro)


def test_reservations_add_up_and_release_once():
    async def go():
        b = AnswerBudget(100, wait=0.01, small=0)
        r1 = await b.reserve(60)
        r2 = await b.reserve(40)
        assert b.used == 100
        r1.shrink(10)
        assert b.used == 50
        r1.release(), r1.release(), r1.shrink(5)  # idempotent, never grows back
        assert b.used == 40
        r2.release()
        assert b.used == 0
    run(go())


def test_a_request_that_finds_no_room_waits_then_is_refused():
    async def go():
        b = AnswerBudget(100, wait=0.05, small=0)
        held = await b.reserve(80)
        with pytest.raises(Overloaded) as info:
            await b.reserve(30)
        assert info.value.retry_after == 1.0 and "LOSSD_MAX_ANSWER_BYTES_IN_FLIGHT" in info.value.message
        assert b.used == 80 and not b._waiters  # the refused one left nothing behind
        # one that is waiting gets its room as soon as it is freed
        waiter = asyncio.ensure_future(b.reserve(30))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        held.shrink(50)
        r = await asyncio.wait_for(waiter, 1)
        assert b.used == 80 and r.nbytes == 30
    run(go())


def test_first_come_first_served_and_small_answers_never_wait():
    async def go():
        b = AnswerBudget(100, wait=1.0, small=5)
        held = await b.reserve(90)
        big = asyncio.ensure_future(b.reserve(50))
        await asyncio.sleep(0)
        later = asyncio.ensure_future(b.reserve(10))  # would fit after 'big', not before it
        await asyncio.sleep(0.01)
        assert not big.done() and not later.done()
        small = await asyncio.wait_for(b.reserve(5), 0.1)  # an annotation tool's few boxes
        assert b.used == 95
        small.release()
        held.release()
        await asyncio.sleep(0.01)
        assert big.done() and later.done() and b.used == 60
    run(go())


def test_a_cancelled_waiter_leaves_the_queue():
    async def go():
        b = AnswerBudget(100, wait=5, small=0)
        held = await b.reserve(100)
        waiter = asyncio.ensure_future(b.reserve(50))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not b._waiters
        held.release()
        assert b.used == 0
    run(go())


def test_the_end_of_a_burst_is_reported_once():
    calls = []

    async def go():
        b = AnswerBudget(1000, wait=1, small=0, on_idle=lambda: calls.append(1), idle_after=100)
        r = await b.reserve(50)
        r.release()
        assert not calls  # a small peak: nothing to give back
        r1, r2 = await b.reserve(80), await b.reserve(80)
        r1.release()
        assert not calls
        r2.release()
        assert calls == [1]
    run(go())


# --------------------------------------------------------------------------------------------- JSON text bound
@pytest.mark.parametrize("dtype,bits", [("float32", np.uint32), ("float64", np.uint64)])
def test_json_bytes_per_value_bound_holds_for_any_finite_value(dtype, bits):
    """Negative values of every binary exponent (the longest texts), random mantissas, and extremes."""
    rng = np.random.default_rng(7)
    mbits, nexp, sign = (23, 256, 31) if dtype == "float32" else (52, 2048, 63)
    exps = np.repeat(np.arange(nexp - 1, dtype=bits), 300)
    mant = rng.integers(0, 2**mbits, size=exps.size, dtype=bits)
    values = ((bits(1) << bits(sign)) | (exps << bits(mbits)) | mant).view(dtype)
    extremes = np.array([np.finfo(dtype).min, np.finfo(dtype).smallest_normal * -1, -np.finfo(dtype).smallest_subnormal,
                         -0.0, 1 / 3, -2 / 3], dtype=dtype)
    for v in np.concatenate([values, extremes]):
        text = orjson.dumps(np.array([v]), option=OPTIONS)[1:-1]
        assert len(text) + 1 <= JSON_MAX_BYTES_PER_VALUE[dtype], (v, text)


def test_sliced_answer_is_the_same_json_and_holds_little_at_once():
    rng = np.random.default_rng(3)
    values = rng.standard_normal((2000, 1000)).astype(np.float32)
    done = []

    async def go():
        resp = SlicedJsonResponse({"values": values, "n": 3}, on_done=lambda: done.append(1))
        pieces = []

        async def send(msg):
            if msg["type"] == "http.response.body":
                pieces.append(msg["body"])
            else:
                assert not any(k == b"content-length" for k, _ in msg["headers"])
        await resp(None, None, send)
        return pieces
    pieces = run(go())
    body = b"".join(pieces)
    assert json.loads(body) == json.loads(orjson.dumps({"values": values, "n": 3}, option=OPTIONS))
    assert done == [1]
    # what the budget counts for the text bounds what is built at once, and is a small part of the whole text
    assert max(map(len, pieces)) * 3 <= sliced_json_bytes(values.shape, "float32") < len(body) / 5


# ------------------------------------------------------------------------------------------- a real server
def iou_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU in float64 numpy, written here from the definition."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def boxes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.hstack([rng.uniform(0, 100, (n, 2)), rng.uniform(100, 200, (n, 2))]).round(2)


def costs(n: int) -> tuple[int, int]:
    """(while computing, while sending) of an n x n float32 answer over REST, as the server counts them."""
    svc = Service.__new__(Service)
    svc.settings, svc.answers = Settings(), AnswerBudget(2**62, 0)
    return svc._check_pairwise(n, n, "float32", None, sliced_json_bytes)


@pytest.fixture(scope="module")
def server():
    # one 1500 x 1500 call fits (~177 MB while computing: its values and the engine's temporaries); a second
    # does not while the first is still being sent (~12 MB: its values and a slice of text)
    compute, held = costs(1500)
    srv = start_server({"LOSSD_MAX_ANSWER_BYTES_IN_FLIGHT": str(compute + held - 1),
                        "LOSSD_ANSWER_WAIT_SECONDS": "0.5", "LOSSD_SEND_STALL_SECONDS": "3"})
    yield srv
    srv.proc.terminate()
    try:
        srv.proc.wait(timeout=30)
    except Exception:
        srv.proc.kill()
    assert "Traceback" not in srv.log(), srv.log()[-5000:]


def test_big_pairwise_answers_are_right(server):
    a, b = boxes(700, 1), boxes(300, 2)
    resp = httpx.post(f"{server.http_url}/v1/metrics/iou", timeout=60,
                      json={"boxes1": a.tolist(), "boxes2": b.tolist(), "pairwise": True})
    assert resp.status_code == 200, resp.text
    assert "content-length" not in resp.headers  # sent in slices
    got = np.asarray(resp.json()["values"])
    assert got.shape == (700, 300)
    np.testing.assert_allclose(got, iou_reference(a, b), atol=2e-6)


def test_one_request_over_the_whole_budget_is_too_large(server):
    a = boxes(4000, 3)
    resp = httpx.post(f"{server.http_url}/v1/metrics/iou", timeout=60,
                      json={"boxes1": a.tolist(), "boxes2": a.tolist(), "pairwise": True})
    assert resp.status_code == 413, resp.text
    err = resp.json()["error"]
    assert err["code"] == "too_large" and err["details"]["field"] == "boxes2"
    assert "LOSSD_MAX_ANSWER_BYTES_IN_FLIGHT" in err["message"] and "split boxes1" in err["message"]


def test_no_room_in_time_is_429_and_room_again_once_read(server):
    a = boxes(1500, 4)
    payload = json.dumps({"boxes1": a.tolist(), "boxes2": a.tolist(), "pairwise": True}).encode()
    url = f"{server.http_url}/v1/metrics/iou"
    started, go_on = threading.Event(), threading.Event()
    first: dict = {}

    def slow_reader():
        with httpx.Client(timeout=60) as c, c.stream("POST", url, content=payload) as r:
            first["status"] = r.status_code
            chunks = r.iter_bytes(1 << 16)
            next(chunks)
            started.set()
            go_on.wait(60)  # the rest (~24 MB) waits in the server while this reader sleeps
            first["bytes"] = sum(len(c) for c in chunks) + (1 << 16)

    t = threading.Thread(target=slow_reader)
    t.start()
    try:
        assert started.wait(60)
        resp = httpx.post(url, content=payload, timeout=60)
        assert resp.status_code == 429, resp.text[:300]
        assert resp.json()["error"]["code"] == "overloaded" and resp.headers["retry-after"] == "1"
        # small calls are not held up
        small = httpx.post(url, json={"boxes1": [[0, 0, 2, 2]] * 3, "boxes2": [[1, 1, 3, 3]] * 3, "pairwise": True})
        assert small.status_code == 200
    finally:
        go_on.set()
        t.join(60)
    assert first["status"] == 200 and first["bytes"] > 20 * 2**20
    resp = httpx.post(url, content=payload, timeout=60)
    assert resp.status_code == 200


def test_a_reader_that_stops_is_dropped_and_its_room_freed(server):
    a = boxes(1500, 5)
    payload = json.dumps({"boxes1": a.tolist(), "boxes2": a.tolist(), "pairwise": True}).encode()
    url = f"{server.http_url}/v1/metrics/iou"
    with httpx.Client(timeout=60) as c, c.stream("POST", url, content=payload) as r:
        chunks = r.iter_bytes(1 << 16)
        next(chunks)
        t0 = time.monotonic()
        # while this reader sleeps, its answer holds the room a second one needs ...
        assert httpx.post(url, content=payload, timeout=60).status_code == 429
        # ... until LOSSD_SEND_STALL_SECONDS (3 s) pass without it taking anything: then it is dropped
        while time.monotonic() - t0 < 30:
            resp = httpx.post(url, content=payload, timeout=60)
            if resp.status_code == 200:
                break
        assert resp.status_code == 200 and time.monotonic() - t0 >= 3
        with pytest.raises(httpx.HTTPError):  # what was left of the stalled answer never comes
            for _ in chunks:
                pass
    assert "LOSSD_SEND_STALL_SECONDS" in server.log()
