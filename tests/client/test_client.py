"""lossd-client against a real server, both transports, sync and async."""

import asyncio
import importlib.metadata
import json
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest

from lossd_client import AsyncLossClient, InvalidInputError, LossClient, NotFoundError, UnavailableError
from lossd_client.wire import oip_binary_request

PRED = np.array([[0, 0, 10, 10], [5, 5, 15, 20], [2, 3, 4, 9]], dtype=np.float32)
TARGET = np.array([[1, 1, 11, 11], [5, 5, 15, 15], [2, 2, 5, 8]], dtype=np.float32)


@pytest.fixture(params=["http", "grpc"])
def url(request, live_server):
    return live_server.http_url if request.param == "http" else live_server.grpc_url


def random_boxes(n: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    b = g.random((n, 4), dtype=np.float32) * 100
    b[:, 2:] += b[:, :2] + 1
    return b


def test_loss_and_metric_match_engine(url, engine):
    with LossClient(url) as c:
        loss, grad = c.loss("ciou", PRED, TARGET)
        ref = engine.evaluate("ciou", PRED, TARGET)
        np.testing.assert_allclose(loss, ref.loss.numpy(), rtol=1e-6)
        np.testing.assert_allclose(grad, ref.grad.numpy(), rtol=1e-6)
        xywh = np.concatenate([PRED[:, :2], PRED[:, 2:] - PRED[:, :2]], 1)
        txywh = np.concatenate([TARGET[:, :2], TARGET[:, 2:] - TARGET[:, :2]], 1)
        loss, grad = c.loss("siou", xywh, txywh, box_format="xywh", reduction="mean", weights=[1, 2, 3],
                            params={"theta": 3})
        ref = engine.evaluate("siou", xywh, txywh, box_format="xywh", reduction="mean", weights=[1, 2, 3],
                              params={"theta": 3})
        assert isinstance(loss, float) and loss == pytest.approx(ref.loss.item(), rel=1e-6)
        np.testing.assert_allclose(grad, ref.grad.numpy(), rtol=1e-6)
        logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        loss, grad = c.loss("cross_entropy", logits, [0, 2], params={"class_weights": [1, 2, 3]})
        ref = engine.evaluate("cross_entropy", logits, [0, 2], params={"class_weights": [1, 2, 3]})
        assert loss.dtype == np.float64  # float64 in, float64 out
        np.testing.assert_allclose(loss, ref.loss.numpy(), rtol=1e-12)
        ious = c.metric("iou", PRED, TARGET[:2], pairwise=True)
        np.testing.assert_allclose(ious, engine.metric("iou", PRED, TARGET[:2], pairwise=True).numpy(), rtol=1e-6)
        assert c.loss("giou", PRED, TARGET, return_grad=False).grad is None


def test_chunking_stitches_in_order(url, engine):
    pred, target = random_boxes(1000, 1), random_boxes(1000, 2)
    w = np.linspace(0, 2, 1000)
    with LossClient(url, max_request_bytes=10_000) as c:  # ~300 rows per request
        for reduction in ("none", "sum", "mean"):
            loss, grad = c.loss("giou", pred, target, weights=w, reduction=reduction)
            ref = engine.evaluate("giou", pred, target, weights=w, reduction=reduction)
            np.testing.assert_allclose(loss, ref.loss.numpy(), rtol=1e-5)
            np.testing.assert_allclose(grad, ref.grad.numpy(), rtol=1e-5, atol=1e-9)
        vals = c.metric("diou", pred[:200], target[:50], pairwise=True)
        np.testing.assert_allclose(vals, engine.metric("diou", pred[:200], target[:50], pairwise=True).numpy(),
                                   rtol=1e-5, atol=1e-7)
        vals = c.metric("iou", pred, target)
        np.testing.assert_allclose(vals, engine.metric("iou", pred, target).numpy(), rtol=1e-5, atol=1e-7)
        with pytest.raises(ValueError, match="cannot be split"):
            c.loss("cross_entropy", np.zeros((1000, 3)), np.zeros(1000, dtype=np.int64), reduction="mean")


def test_large_requests_match_the_engine(url, engine):
    """Messages over SMALL_MESSAGE: on gRPC their raw tensors are decoded in place on both sides."""
    pred, target = random_boxes(20_000, 3), random_boxes(20_000, 4)  # 640 kB of boxes, one request
    with LossClient(url) as c:
        loss, grad = c.loss("ciou", pred, target)
        ref = engine.evaluate("ciou", pred, target)
        np.testing.assert_allclose(loss, ref.loss.numpy(), rtol=1e-6)
        np.testing.assert_allclose(grad, ref.grad.numpy(), rtol=1e-6, atol=1e-12)
        vals = c.metric("giou", pred, target)
        np.testing.assert_allclose(vals, engine.metric("giou", pred, target).numpy(), rtol=1e-6)
        if c.transport == "grpc":
            out = c.stream([dict(name="diou", pred=pred, target=target), dict(name="l1", pred=pred, target=target)])
            np.testing.assert_allclose(out[0].loss, engine.evaluate("diou", pred, target).loss.numpy(), rtol=1e-6)
            np.testing.assert_allclose(out[1].grad, engine.evaluate("l1", pred, target).grad.numpy(), rtol=1e-6)
        bad = pred.copy()
        bad[15_001, 2] = np.nan
        with pytest.raises(InvalidInputError) as err:
            c.loss("ciou", bad, target)
        assert err.value.details.get("rows") == [15_001] and err.value.details.get("field") == "pred"


def test_typed_errors(url):
    with LossClient(url) as c:
        bad = PRED.copy()
        bad[[0, 2], 2] = -1
        with pytest.raises(InvalidInputError) as info:
            c.loss("giou", bad, TARGET)
        assert (info.value.code, info.value.field, info.value.rows) == ("inverted_box", "pred", [0, 2])
        with pytest.raises(NotFoundError) as info:
            c.loss("cioux", PRED, TARGET)
        assert info.value.code == "unknown_loss"
        with pytest.raises(InvalidInputError) as info:
            c.loss("giou", PRED, TARGET, params={"eps": 3})
        assert info.value.code == "param_out_of_range"


def test_catalog_is_the_same_over_both_transports(live_server):
    with LossClient(live_server.http_url) as h, LossClient(live_server.grpc_url) as g:
        http_cat, grpc_cat = h.losses(), g.losses()
    assert [e["name"] for e in http_cat] == [e["name"] for e in grpc_cat]
    for a, b in zip(http_cat, grpc_cat):
        assert a["kind"] == b["kind"] and a["params"].keys() == b["params"].keys()
        for name in a["params"]:
            pa, pb = a["params"][name], b["params"][name]
            assert pa["default"] == pytest.approx(pb["default"]) if isinstance(pa["default"], float) else \
                pa["default"] == pb["default"]
            # every other key alike (gRPC's lacked "exclusive": balanced_l1's alpha is > 0, not >= 0)
            assert {k: v for k, v in pa.items() if k != "default"} == {k: v for k, v in pb.items() if k != "default"}
    exclusive = {e["name"]: e["params"] for e in grpc_cat}["balanced_l1"]["alpha"]["exclusive"]
    assert exclusive == {"min": True, "max": False}


def test_async_client(url, engine):
    async def run():
        async with AsyncLossClient(url, max_request_bytes=2_000) as c:
            results = await asyncio.gather(*(c.loss("diou", PRED * k, TARGET * k) for k in (1, 2, 3)))
            vals = await c.metric("giou", PRED, TARGET, pairwise=True)
            cat = await c.losses()
            with pytest.raises(InvalidInputError):
                await c.loss("giou", PRED[:, :3], TARGET)
            return results, vals, cat

    results, vals, cat = asyncio.run(run())
    for k, (loss, grad) in zip((1, 2, 3), results):
        np.testing.assert_allclose(loss, engine.evaluate("diou", PRED * k, TARGET * k).loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(vals, engine.metric("giou", PRED, TARGET, pairwise=True).numpy(), rtol=1e-6)
    assert len(cat) == len(engine.losses())


def test_unreachable_server_is_retried_then_unavailable():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    for url in (f"http://127.0.0.1:{port}", f"grpc://127.0.0.1:{port}"):
        with LossClient(url, retries=2, backoff=0.01, timeout=2) as c:
            with pytest.raises(UnavailableError):
                c.loss("giou", PRED, TARGET)


def test_retry_after_is_honoured():
    """503 and 429 with Retry-After are retried, then the real answer comes through."""
    calls, waits = [], []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            return httpx.Response(503, headers={"retry-after": "0.05"}, json={"error": "draining"})
        if len(calls) == 2:
            return httpx.Response(429, headers={"retry-after": "0.02"}, json={"error": {"code": "overloaded",
                                                                                       "message": "busy"}})
        body, headers = oip_binary_request({"LOSS": np.array([0.5], np.float32),
                                            "GRAD": np.zeros((1, 4), np.float32)}, {})
        head_len = int(headers["Inference-Header-Content-Length"])
        head = json.loads(body[:head_len])
        out = {"model_name": "giou", "outputs": [dict(i, parameters=i["parameters"]) for i in head["inputs"]]}
        out_head = json.dumps(out).encode()
        return httpx.Response(200, content=out_head + body[head_len:],
                              headers={"Inference-Header-Content-Length": str(len(out_head))})

    c = LossClient("http://lossd.test", retries=3, backoff=5.0)
    ep = c._endpoints[0]
    ep._http = httpx.Client(base_url="http://lossd.test", transport=httpx.MockTransport(handler))
    ep._bulk = None  # binary requests through httpx too, so the mock answers them (the retry loop is shared)
    import lossd_client._client as impl

    real_sleep = impl.time.sleep
    impl.time.sleep = waits.append
    try:
        loss, grad = c.loss("giou", PRED[:1], TARGET[:1])
    finally:
        impl.time.sleep = real_sleep
    assert len(calls) == 3 and waits == [0.05, 0.02]  # Retry-After, not the 5 s backoff
    assert loss.tolist() == [0.5] and grad.shape == (1, 4)


def test_installed_client_needs_no_torch(tmp_path):
    code = ("import sys, lossd_client; from lossd_client._proto.lossd.v1 import lossd_pb2_grpc; "
            "assert 'torch' not in sys.modules; print(lossd_client.__file__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    requires = importlib.metadata.requires("lossd-client")
    names = sorted(re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requires)
    assert names == ["certifi", "grpcio", "httpx", "numpy", "protobuf"]


def dead_url(kind: str) -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    return f"{kind}://127.0.0.1:{port}"


def test_endpoints_are_parsed():
    from lossd_client._transport import parse_endpoints

    assert parse_endpoints("http://a:1, http://b:2/") == ("http", ["http://a:1", "http://b:2"], False)
    assert parse_endpoints(["grpcs://a:1", "grpcs://b:2,grpcs://c:3"]) == ("grpc", ["a:1", "b:2", "c:3"], True)
    assert parse_endpoints("dns:///lossd-headless:50051") == ("grpc", ["dns:///lossd-headless:50051"], False)
    assert parse_endpoints("dns:///lossd-headless:50051", tls=True).tls
    for bad in ("http://a:1,grpc://b:2", "grpc://a:1,grpcs://b:2", "ftp://a", " , "):
        with pytest.raises(ValueError, match="url"):
            parse_endpoints(bad)


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_chunks_fail_over_to_a_live_replica(kind, live_server, engine):
    """Two of three endpoints refuse connections: every chunk still arrives once, in order, with no retry round
    (retries=0), so the failover is to the next replica, not a retry of the same one."""
    live = live_server.http_url if kind == "http" else live_server.grpc_url
    urls = [dead_url(kind), live, dead_url(kind)]
    pred, target = random_boxes(3000, 5), random_boxes(3000, 6)
    ref = engine.evaluate("giou", pred, target)
    with LossClient(urls, retries=0, max_request_bytes=8_000) as c:  # 12 chunks
        loss, grad = c.loss("giou", pred, target)
        vals = c.metric("iou", pred, target)
        streamed = c.stream([dict(name="giou", pred=pred[:10], target=target[:10])] * 3)
        assert c.stream([]) == []
    np.testing.assert_array_equal(loss, ref.loss.numpy())
    np.testing.assert_array_equal(grad, ref.grad.numpy())
    np.testing.assert_allclose(vals, engine.metric("iou", pred, target).numpy(), rtol=1e-6)
    assert len(streamed) == 3 and all(np.array_equal(s.loss, loss[:10]) for s in streamed)

    async def run():
        async with AsyncLossClient(",".join(urls), retries=0, max_request_bytes=8_000) as ac:
            return await ac.loss("giou", pred, target), await ac.stream([dict(name="giou", pred=pred, target=target)])

    (aloss, agrad), astreamed = asyncio.run(run())
    np.testing.assert_array_equal(aloss, loss)
    np.testing.assert_array_equal(astreamed[0].loss, loss)
    with LossClient([dead_url(kind), dead_url(kind)], retries=1, backoff=0.01, timeout=2) as c:
        with pytest.raises(UnavailableError):
            c.loss("giou", pred[:5], target[:5])


def test_weighted_mean_comes_from_the_catalog():
    """A catalog that marks losses with weighted_mean decides which means cannot be split; one that does not
    say leaves the built-in list."""
    catalog = [{"name": "giou", "weighted_mean": True}, {"name": "cross_entropy", "weighted_mean": False}]

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/losses"
        return httpx.Response(200, json={"losses": catalog})

    c = LossClient("http://lossd.test", max_request_bytes=1_000)
    c._endpoints[0]._http = httpx.Client(base_url="http://lossd.test", transport=httpx.MockTransport(handler))
    with pytest.raises(ValueError, match="giou with reduction='mean'"):
        c.loss("giou", random_boxes(200), random_boxes(200), reduction="mean")
    assert c._weighted_mean() == {"giou"}
    catalog = [{"name": "giou"}, {"name": "cross_entropy"}]
    c._weighted = None
    assert c._weighted_mean() == {"cross_entropy", "nll"}


def test_dns_target_balances_with_round_robin(live_server, engine):
    """dns:/// (a headless Service's name in a cluster) resolves here to the one loopback replica; the channel is
    built with the round_robin policy and answers as grpc:// does."""
    port = live_server.grpc_target.rsplit(":", 1)[1]
    with LossClient(f"dns:///localhost:{port}") as c:
        assert c.transport == "grpc" and c.endpoints == [f"dns:///localhost:{port}"]
        loss, _ = c.loss("giou", PRED, TARGET)
    np.testing.assert_allclose(loss, engine.evaluate("giou", PRED, TARGET).loss.numpy(), rtol=1e-6)


@pytest.mark.parametrize("url", ["grpc://127.0.0.1:99999", "http://127.0.0.1:70000", "https://h:-1"])
def test_a_port_out_of_range_is_refused_not_wrapped(url):
    with pytest.raises(ValueError, match="port"):
        LossClient(url)


# ------------------------------------------------------------------------------------------ errors of split calls
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_errors_of_split_calls_name_the_callers_rows(url, asynchronous):
    """A call split into ~312-row requests: a bad row deep in it is named by its row in the caller's arrays."""
    pred, target = random_boxes(10_000, 5), random_boxes(10_000, 6)
    bad = pred.copy()
    bad[9_001, 0] = np.nan
    inverted = pred.copy()
    inverted[[7_000, 7_005], 2] = -1
    nan_boxes = pred[:2_000].copy()
    nan_boxes[1_500, 2] = -1
    inf_boxes = pred[:2_000].copy()
    inf_boxes[[1_700, 1_705], 1] = np.inf  # JSON cannot carry it: refused as the server would, not a ValueError

    async def calls(c):
        out = []
        for fn in (lambda: c.loss("ciou", bad, target), lambda: c.loss("giou", inverted, target, reduction="sum"),
                   lambda: c.metric("iou", nan_boxes, target[:2_000]),
                   lambda: c.metric("giou", target[:2_000], inf_boxes)):
            with pytest.raises(InvalidInputError) as err:
                res = fn()
                if asyncio.iscoroutine(res):
                    await res
            out.append(err.value)
        return out

    kw = dict(max_request_bytes=10_000, shared_memory=False)
    if asynchronous:
        async def run():
            async with AsyncLossClient(url, **kw) as c:
                return await calls(c)
        errors = asyncio.run(run())
    else:
        with LossClient(url, **kw) as c:
            errors = asyncio.run(calls(c))
    nan, inv, metric, inf = errors
    assert (inf.code, inf.field, inf.rows) == ("non_finite", "boxes2", [1_700, 1_705])
    assert "rows 1700, 1705" in str(inf)
    assert (nan.code, nan.field, nan.rows) == ("non_finite", "pred", [9_001])
    assert "row 9001" in str(nan) and "row 9001" in nan.message
    assert (inv.code, inv.rows) == ("inverted_box", [7_000, 7_005])
    assert "rows 7000, 7005" in str(inv)
    assert metric.rows == [1_500] and "row 1500" in str(metric)


# ------------------------------------------------------------------------------------------ wrong port, stalled server
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_an_http_url_on_the_grpc_port_says_so(live_server, asynchronous):
    url = "http://" + live_server.grpc_target
    small, large = PRED, random_boxes(20_000, 7)  # JSON through httpx; binary through http.client

    async def calls(c):
        out = []
        for fn in (lambda: c.losses(), lambda: c.loss("giou", small, small),
                   lambda: c.loss("giou", large, large)):
            with pytest.raises(UnavailableError) as err:
                res = fn()
                if asyncio.iscoroutine(res):
                    await res
            out.append(err.value)
        return out

    kw = dict(retries=0, shared_memory=False)
    if asynchronous:
        async def run():
            async with AsyncLossClient(url, **kw) as c:
                return await calls(c)
        errors = asyncio.run(run())
    else:
        with LossClient(url, **kw) as c:
            errors = asyncio.run(calls(c))
    for e in errors:
        assert e.code == "not_http" and "did not answer HTTP" in str(e) and "grpc://" in str(e)
        assert str(e).isascii() and str(e).isprintable(), repr(str(e))


@pytest.fixture
def stalled():
    """A server that accepts connections and never answers; counts the connections it accepted."""
    import socket
    import threading

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(s.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield s.getsockname()[1], accepted
    s.close()
    for c in accepted:
        c.close()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_stalled_server_is_a_deadline_not_retried_over_http(stalled, asynchronous):
    """Connected, no answer within timeout: DeadlineExceededError after one try (the server may be computing the
    call; retrying would pile the same work on it), as gRPC's deadline does."""
    from lossd_client import DeadlineExceededError

    port, accepted = stalled
    url = f"http://127.0.0.1:{port}"
    kw = dict(timeout=0.5, retries=3, backoff=0.01, shared_memory=False)

    async def calls(c):
        for fn in (lambda: c.loss("giou", PRED, TARGET), lambda: c.losses()):
            with pytest.raises(DeadlineExceededError, match="timeout=0.5 s"):
                res = fn()
                if asyncio.iscoroutine(res):
                    await res

    if asynchronous:
        async def run():
            async with AsyncLossClient(url, **kw) as c:
                await calls(c)
        asyncio.run(run())
    else:
        with LossClient(url, **kw) as c:
            asyncio.run(calls(c))
    assert 1 <= len(accepted) <= 2  # one connection per call at most: no retries


def test_a_stalled_grpc_server_fails_in_the_connect_timeout(stalled):
    """gRPC's handshake never completes: the connect timeout (not gRPC's 20 s default) bounds each try."""
    import time

    port, _ = stalled
    with LossClient(f"grpc://127.0.0.1:{port}", connect_timeout=0.5, timeout=60, retries=1, backoff=0.01) as c:
        start = time.monotonic()
        with pytest.raises(UnavailableError):
            c.loss("giou", PRED, TARGET)
        assert time.monotonic() - start < 15  # 20 s per connection attempt before connect_timeout was honoured


def test_timeouts_reach_the_transports():
    with LossClient("http://127.0.0.1:1", timeout=7, connect_timeout=3) as c:
        t = c._endpoints[0]._http.timeout
        assert (t.connect, t.read, t.write) == (3, 7, 7)
        assert (c._endpoints[0]._bulk.connect_timeout, c._endpoints[0]._bulk.timeout) == (3, 7)
