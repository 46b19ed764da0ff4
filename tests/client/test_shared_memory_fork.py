"""lossd-client's shared memory across fork (multiprocessing's default start method on Linux). A forked child
inherits the parent's answers that are views of a region as shared pages, not copies on write: the parent must
never write those regions again, or the child's arrays would change under it. A child that calls the parent's
client must use regions of its own (the parent's are the parent's), and its big copies must not wait on the
parent's copy thread, which did not come along."""

import gc
import multiprocessing as mp

import httpx
import numpy as np
import pytest

from lossd_client import LossClient

N = 150_000  # 4.8 MB of inputs (the client's copies go to its helper thread) and 3 MB of answers (lent)


def boxes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n, 2))
    pred = np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32)
    target = np.concatenate([xy + 1, xy + 1 + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32)
    return pred, target


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_a_forked_childs_answer_never_changes(live_server, kind):
    p1, t1 = boxes(N, 1)
    p2, t2 = boxes(N, 2)
    ctx = mp.get_context("fork")
    url = live_server.http_url if kind == "http" else live_server.grpc_url
    with LossClient(url) as c, LossClient(live_server.http_url, shared_memory=False) as wire:
        answer = c.loss("ciou", p1, t1)
        lent = c._shm.current
        assert lent.lent and np.shares_memory(answer.loss, np.frombuffer(lent.mem.buf, np.uint8))
        want = wire.loss("ciou", p1, t1)
        go, done = ctx.Event(), ctx.Queue()
        held = [answer]  # the child's copy of this list keeps the answer; the parent empties its own

        def child():
            go.wait(60)  # the parent has dropped its answer and called again meanwhile
            mine = held[0]
            done.put(bool(np.array_equal(mine.loss, want.loss) and np.array_equal(mine.grad, want.grad)))

        proc = ctx.Process(target=child)
        proc.start()
        try:
            held.clear()
            del answer
            gc.collect()
            for _ in range(3):  # not one of these may reuse the region the child still reads
                again = c.loss("ciou", p2, t2)
                assert again.loss.sum() != 0
            del again
            go.set()
            assert done.get(timeout=60) is True
        finally:
            proc.join(60)
        assert proc.exitcode == 0
        assert lent not in c._shm.pool  # retired at the fork
        # the retired region was unregistered at the parent's next call
        listed = {r["name"] for r in httpx.get(f"{live_server.http_url}/v2/systemsharedmemory/status").json()}
        assert lent.name not in listed and c._shm.retired == []


def test_a_forked_child_calls_through_regions_of_its_own(live_server):
    p, t = boxes(N, 3)
    ctx = mp.get_context("fork")
    with LossClient(live_server.http_url) as c, LossClient(live_server.http_url, shared_memory=False) as wire:
        c.loss("ciou", p, t)  # the parent's region, and its copy thread, exist before the fork
        parents = {r.name for r in c._shm.pool}
        out = ctx.Queue()

        def child():
            got = c.loss("ciou", p, t)
            names = {r.name for r in c._shm.pool}
            out.put((got.loss.copy(), got.grad.copy(), c._shm.calls, sorted(names)))
            c.close()  # the child's own regions go with it

        proc = ctx.Process(target=child)
        proc.start()
        try:
            loss, grad, calls, names = out.get(timeout=60)  # was: waiting forever on the parent's copy thread
        finally:
            proc.join(60)
        assert proc.exitcode == 0
        want = wire.loss("ciou", p, t)
        np.testing.assert_array_equal(loss, want.loss)
        np.testing.assert_array_equal(grad, want.grad)
        assert calls == 2 and names and not set(names) & parents
        # the parent's regions are untouched by the child (its close() only removed its own)
        np.testing.assert_array_equal(c.loss("ciou", p, t).grad, want.grad)
        assert {r.name for r in c._shm.pool} >= parents
        listed = {r["name"] for r in httpx.get(f"{live_server.http_url}/v2/systemsharedmemory/status").json()}
        assert parents <= listed and not set(names) & listed
