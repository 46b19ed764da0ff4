"""A call on a closed client is ClientClosedError (a LossdError, code client_closed) on every transport and path,
sync and async, raised before anything is sent: the transports' own errors for a closed channel differed
(ValueError, grpc's UsageError, RuntimeError), and the HTTP client's pooled bulk connection even opened again and
answered. Closing twice is harmless."""

import asyncio

import httpx
import numpy as np
import pytest

from lossd_client import AsyncLossClient, ClientClosedError, LossClient, LossdError

SMALL = 8
BIG = 40_000  # over the client's shared-memory threshold (256 KiB of inputs)


def _boxes(n):
    rng = np.random.default_rng(n)
    p = rng.uniform(0, 50, (n, 4)).astype(np.float32)
    p[:, 2:] += p[:, :2] + 2
    return p, p + rng.uniform(-0.5, 0.5, (n, 4)).astype(np.float32)


def _requests(server) -> float:
    """Every request the server has counted (lossd_requests_total over all endpoints and outcomes)."""
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("lossd_requests_total{"))


def _calls(n):
    p, t = _boxes(n)
    return {"loss": lambda c: c.loss("ciou", p, t),
            "metric": lambda c: c.metric("iou", p, t),
            "losses": lambda c: c.losses(),
            "stream": lambda c: c.stream([{"name": "giou", "pred": p, "target": t}])}


@pytest.mark.parametrize("n", [SMALL, BIG])
@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_sync_calls_after_close_are_refused_before_sending(live_server, kind, n):
    url = live_server.http_url if kind == "http" else live_server.grpc_url
    c = LossClient(url)
    calls = _calls(n)
    calls["loss"](c)  # opens the connection (and, for BIG, the shared-memory region)
    c.close()
    before = _requests(live_server)
    for name, call in calls.items():
        with pytest.raises(ClientClosedError) as err:
            call(c)
        assert err.value.code == "client_closed", name
        assert isinstance(err.value, LossdError)
        assert "closed" in str(err.value)
    assert _requests(live_server) == before  # nothing reached the server
    c.close()  # twice: harmless


@pytest.mark.parametrize("n", [SMALL, BIG])
@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_async_calls_after_close_are_refused_before_sending(live_server, kind, n):
    url = live_server.http_url if kind == "http" else live_server.grpc_url

    async def main():
        c = AsyncLossClient(url)
        calls = _calls(n)
        await calls["loss"](c)
        await c.close()
        before = _requests(live_server)
        for name, call in calls.items():
            with pytest.raises(ClientClosedError):
                await call(c)
        assert _requests(live_server) == before
        await c.close()

    asyncio.run(main())


def test_the_with_block_closes_and_the_error_pickles(live_server):
    import pickle

    with LossClient(live_server.grpc_url) as c:
        p, t = _boxes(SMALL)
        assert c.loss("iou", p, t).loss.shape == (SMALL,)
    with pytest.raises(ClientClosedError) as err:
        c.loss("iou", p, t)
    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is ClientClosedError and again.code == "client_closed" and again.message == err.value.message
