"""Faults and access control: out-of-memory on one batch, request-size limits, API keys, TLS."""

import asyncio
import ssl

import httpx
import pytest
import torch

from lossd.batching import Batcher
from lossd.engine import Engine
from lossd.engine.inputs import example_inputs
from lossd_client import LossClient, LossdError, TooLargeError, UnavailableError

from ..conftest import self_signed_cert, start_server

BOX = [[0, 0, 10, 10]]


class OOMEngine(Engine):
    """A CPU engine that fails like a GPU out of memory whenever one call holds more than `limit` rows."""

    def __init__(self, limit: int) -> None:
        super().__init__(device="cpu", warm=False)
        self.limit = limit
        self.calls: list[int] = []

    def evaluate(self, loss_name, pred, target, **kw):
        n = len(pred)
        self.calls.append(n)
        if n > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected, {n} rows)")
        return super().evaluate(loss_name, pred, target, **kw)


def test_oom_splits_a_batch_and_every_request_is_answered(gen):
    engine = OOMEngine(limit=6)
    reqs = [example_inputs("boxes", 2, gen) for _ in range(8)]

    async def run():
        b = Batcher(engine, max_delay=0.05, inline=False)
        return await asyncio.gather(*(b.evaluate("giou", p.numpy(), t.numpy()) for p, t in reqs))

    outs = asyncio.run(run())
    # 16 rows fail, each half of 8 fails again, its quarters of 4 rows succeed: every row computed exactly once
    assert engine.calls == [16, 8, 4, 4, 8, 4, 4]
    assert sum(n for n in engine.calls if n <= engine.limit) == 16
    ref = Engine(device="cpu", warm=False)
    for (p, t), out in zip(reqs, outs):
        torch.testing.assert_close(out.loss, ref.evaluate("giou", p, t).loss)


def test_oom_on_one_request_is_a_clear_503_and_the_server_carries_on(make_client):
    client = make_client()
    client.app.state.batcher.engine = OOMEngine(limit=3)
    client.app.state.batcher.allow_inline = False
    resp = client.post("/v1/losses/giou", json={"pred": BOX * 5, "target": BOX * 5})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "resource_exhausted"
    assert "ran out of memory" in resp.json()["error"]["message"] and resp.headers["retry-after"] == "1"
    assert client.post("/v1/losses/giou", json={"pred": BOX * 2, "target": BOX * 2}).status_code == 200


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """A server with API keys, TLS on both transports, and a small row limit."""
    key, cert = self_signed_cert(tmp_path_factory.mktemp("tls"))
    server = start_server({"LOSSD_API_KEYS": '["s3cret", "other"]', "LOSSD_TLS_CERT": str(cert),
                           "LOSSD_TLS_KEY": str(key), "LOSSD_MAX_ROWS": "1000"}, https=True, ca=str(cert))
    yield server, str(cert)
    server.proc.terminate()
    server.proc.wait(timeout=30)


def test_api_keys_and_tls_over_rest(guarded_server):
    server, ca = guarded_server
    url = server.http_url.replace("http://", "https://")
    with httpx.Client(verify=ssl.create_default_context(cafile=ca)) as h:
        assert h.get(f"{url}/v2/health/ready").status_code == 200  # health stays open
        body = {"pred": BOX, "target": BOX}
        r = h.post(f"{url}/v1/losses/giou", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert h.post(f"{url}/v1/losses/giou", json=body, headers={"x-api-key": "wrong"}).status_code == 401
        assert h.post(f"{url}/v1/losses/giou", json=body, headers={"x-api-key": "s3cret"}).status_code == 200
        assert h.post(f"{url}/v1/losses/giou", json=body, headers={"authorization": "Bearer other"}).status_code \
            == 200
        assert h.post(f"{url}/v2/models/giou/infer", json={"inputs": []}).status_code == 401
        # two keys, a right one among them: refused (which one counts must not depend on who reads the headers)
        for pair in ([("x-api-key", "wrong"), ("x-api-key", "s3cret")], [("x-api-key", "s3cret"), ("x-api-key", "wrong")]):
            assert h.post(f"{url}/v1/losses/giou", json=body, headers=pair).status_code == 401
    with pytest.raises(httpx.ConnectError):  # plain HTTP or an unknown CA does not get through
        httpx.get(f"{url}/v2/health/ready", verify=True)


def test_api_keys_and_tls_over_grpc(guarded_server):
    server, ca = guarded_server
    target = server.grpc_target.replace("127.0.0.1", "localhost")
    with LossClient(f"grpcs://{target}", api_key="s3cret", ca_cert=ca) as c:
        loss, _ = c.loss("giou", BOX, BOX)
        assert loss.tolist() == [pytest.approx(0.0, abs=1e-6)]
        with pytest.raises(TooLargeError) as info:  # over LOSSD_MAX_ROWS
            c.loss("giou", BOX * 1001, BOX * 1001, return_grad=False)
        assert info.value.code == "too_large"
    with LossClient(f"grpcs://{target}", ca_cert=ca, retries=0) as c:
        with pytest.raises(Exception) as info:
            c.loss("giou", BOX, BOX)
        assert "UNAUTHENTICATED" in str(info.value.status) or "api key" in str(info.value).lower()
    import grpc

    from lossd_client.wire import pb, pb_grpc
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(f.read())
    with grpc.secure_channel(target, creds) as ch:
        stub = pb_grpc.LossServiceStub(ch)
        for keys in (["wrong", "s3cret"], ["s3cret", "wrong"]):
            with pytest.raises(grpc.RpcError) as info:
                stub.ListLosses(pb.ListLossesRequest(), metadata=[("x-api-key", k) for k in keys], timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ListLosses(pb.ListLossesRequest(), metadata=[("x-api-key", "s3cret")], timeout=30).losses


def test_client_over_https_with_a_key(guarded_server):
    server, ca = guarded_server
    url = server.http_url.replace("http://", "https://").replace("127.0.0.1", "localhost")
    with LossClient(url, api_key="s3cret", ca_cert=ca) as c:
        assert c._endpoints[0]._bulk is not None  # binary requests take the http.client path, with the same trust and key
        loss, grad = c.loss("giou", BOX, BOX)
        assert loss.tolist() == [pytest.approx(0.0, abs=1e-6)] and grad.shape == (1, 4)
    with LossClient(url, ca_cert=ca, retries=0) as c:
        with pytest.raises(LossdError) as info:
            c.loss("giou", BOX, BOX)
        assert info.value.code == "unauthorized"
    with LossClient(url, api_key="s3cret", retries=0) as c:  # the server's CA is not trusted by default
        with pytest.raises(UnavailableError):
            c.loss("giou", BOX, BOX)


def test_row_limit_over_rest(guarded_server):
    server, ca = guarded_server
    url = server.http_url.replace("http://", "https://")
    r = httpx.post(f"{url}/v1/metrics/iou", json={"boxes1": BOX * 1001, "boxes2": BOX * 1001},
                   headers={"x-api-key": "s3cret"}, verify=ssl.create_default_context(cafile=ca))
    assert r.status_code == 413 and "at most 1000" in r.json()["error"]["message"]


