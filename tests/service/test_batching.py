"""Dynamic batching: coalesced requests get exactly what they would have got alone."""

import asyncio
import time

import numpy as np
import pytest
import torch

from lossd.batching import Batcher, DeadlineExpired
from lossd.engine import EngineError
from lossd.engine.inputs import example_inputs


def _requests(gen, n_requests=24):
    reqs = []
    for k in range(n_requests):
        pred, target = example_inputs("boxes", 1 + k % 5, gen)
        weights = None if k % 3 else np.linspace(0.5, 1.5, pred.shape[0])
        reqs.append(dict(pred=pred.numpy(), target=target.numpy(), reduction=("none", "mean", "sum")[k % 3],
                         weights=weights))
    return reqs


def test_coalesced_requests_equal_their_solo_answers(engine, gen):
    reqs = _requests(gen)

    async def run():
        # the first request waits 50 ms and the rest join it; inline=False is the GPU's behaviour (a lone small
        # CPU call would otherwise just run at once, see test_idle_small_cpu_call_runs_at_once)
        b = Batcher(engine, max_delay=0.05, inline=False)
        outs = await asyncio.gather(*(b.evaluate("ciou", r["pred"], r["target"], reduction=r["reduction"],
                                                 weights=r["weights"], params={"eps": 1e-7}, dtype="float64")
                                      for r in reqs))
        return b, outs

    b, outs = asyncio.run(run())
    assert b.batches >= 1 and b.batched_requests == len(reqs)  # all of them went through one engine call
    for r, out in zip(reqs, outs):
        solo = engine.evaluate("ciou", r["pred"], r["target"], reduction=r["reduction"], weights=r["weights"],
                               dtype="float64")
        torch.testing.assert_close(out.loss, solo.loss, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(out.grad, solo.grad, rtol=1e-12, atol=1e-15)


def test_a_bad_request_does_not_spoil_the_batch(engine, gen):
    reqs = _requests(gen, 6)
    reqs[2]["pred"] = reqs[2]["pred"].copy()
    reqs[2]["pred"][0, 2] = -1e6  # inverted

    async def run():
        b = Batcher(engine, max_delay=0.05, inline=False)
        return await asyncio.gather(*(b.evaluate("giou", r["pred"], r["target"], reduction=r["reduction"],
                                                 weights=r["weights"]) for r in reqs), return_exceptions=True)

    outs = asyncio.run(run())
    assert isinstance(outs[2], EngineError) and outs[2].code == "inverted_box" and outs[2].rows == [0]
    for i in (0, 1, 3, 4, 5):
        solo = engine.evaluate("giou", reqs[i]["pred"], reqs[i]["target"], reduction=reqs[i]["reduction"],
                               weights=reqs[i]["weights"])
        torch.testing.assert_close(outs[i].loss, solo.loss)


def test_expired_deadline_is_dropped_before_compute(engine, gen):
    pred, target = example_inputs("boxes", 3, gen)

    async def run(batching: bool):
        b = Batcher(engine, enabled=batching, max_delay=0.01, inline=False)
        if batching:
            with pytest.raises(DeadlineExpired):  # expires while it waits in the queue
                await b.evaluate("giou", pred.numpy(), target.numpy(), deadline=time.monotonic() + 0.001)
        with pytest.raises(DeadlineExpired):  # already past on arrival
            await b.evaluate("giou", pred.numpy(), target.numpy(), deadline=time.monotonic() - 1)
        ok = await b.evaluate("giou", pred.numpy(), target.numpy(), deadline=time.monotonic() + 30)
        return b, ok

    b, ok = asyncio.run(run(True))
    assert b.batched_requests == 0 and ok.loss.shape == (3,)  # the expired ones never reached the engine
    assert asyncio.run(run(False))[1].loss.shape == (3,)


def test_idle_small_cpu_call_runs_at_once(engine, gen):
    pred, target = example_inputs("boxes", 2, gen)

    async def run():
        b = Batcher(engine, max_delay=5.0)  # a long window that a queued request would have to wait out
        t0 = time.monotonic()
        out = await b.evaluate("ciou", pred.numpy(), target.numpy())
        return time.monotonic() - t0, b, out

    elapsed, b, out = asyncio.run(run())
    assert elapsed < 1.0 and b.batched_requests == 0
    torch.testing.assert_close(out.loss, engine.evaluate("ciou", pred, target).loss)


def test_unbatchable_requests_go_straight_through(engine, gen):
    logits, idx = example_inputs("class_logits", 4, gen)

    async def run():
        b = Batcher(engine, max_delay=0.01)
        out = await b.evaluate("cross_entropy", logits.numpy(), idx.numpy(), reduction="mean",
                               params={"class_weights": [1, 2, 3, 4, 5]})
        return b, out

    b, out = asyncio.run(run())
    assert b.batched_requests == 0
    assert out.loss.item() == pytest.approx(engine.evaluate("cross_entropy", logits, idx, reduction="mean",
                                                            params={"class_weights": [1, 2, 3, 4, 5]}).loss.item())


def test_timeout_header(client):
    body = {"pred": [[0, 0, 1, 1]], "target": [[0, 0, 1, 1]]}
    resp = client.post("/v1/losses/giou", json=body, headers={"lossd-timeout": "soon"})
    assert resp.status_code == 400 and "lossd-timeout" in resp.json()["error"]["message"]
    resp = client.post("/v1/losses/giou", json=body, headers={"lossd-timeout": "1e-9"})
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "deadline_exceeded"
    assert client.post("/v1/losses/giou", json=body, headers={"lossd-timeout": "30"}).status_code == 200
