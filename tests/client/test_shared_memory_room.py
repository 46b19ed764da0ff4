"""lossd-client's shared memory when /dev/shm has no room for another region (a default Docker container gives it
64 MB): the client reserves each region's memory when it makes it, so a full /dev/shm is a refusal it can act on
(the call goes over the wire, earlier regions stay in use), never SIGBUS when the copy touches a page the object
cannot get. The refusal is simulated: posix_fallocate answers ENOSPC, as it does on a full tmpfs."""

import errno
import gc
import os

import numpy as np
import pytest

from lossd_client import LossClient, _shm

N = 80_000  # 1.6 MB of LOSS + GRAD: answers are lent (views of the region)


def boxes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n, 2))
    pred = np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32)
    target = np.concatenate([xy + 1, xy + 1 + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32)
    return pred, target


def in_region(arr: np.ndarray, region) -> bool:
    whole = np.frombuffer(region.mem.buf, dtype=np.uint8)
    try:
        return np.shares_memory(arr, whole)
    finally:
        del whole


@pytest.fixture
def full_after(monkeypatch):
    """full_after(k): the first k regions get their memory, later ones find /dev/shm full."""
    real = os.posix_fallocate
    made = []

    def fallocate(fd, offset, size):
        if len(made) >= limit[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        made.append(size)
        return real(fd, offset, size)

    limit = [0]
    monkeypatch.setattr(_shm.os, "posix_fallocate", fallocate)

    def set_limit(k: int) -> list:
        limit[0] = k
        return made
    return set_limit


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_no_room_for_any_region_goes_over_the_wire(live_server, full_after, kind):
    full_after(0)
    p, t = boxes(N, 1)
    url = live_server.grpc_url if kind == "grpc" else live_server.http_url
    with LossClient(url) as c, LossClient(live_server.http_url, shared_memory=False) as wire:
        got, want = c.loss("ciou", p, t), wire.loss("ciou", p, t)
        np.testing.assert_array_equal(got.loss, want.loss)
        np.testing.assert_array_equal(got.grad, want.grad)
        assert c.shared_memory_calls == 0 and not c._shm.enabled and c._shm.pool == []


def test_no_room_for_a_second_region_keeps_the_first(live_server, full_after):
    made = full_after(1)
    p1, t1 = boxes(N, 2)
    p2, t2 = boxes(N, 3)
    with LossClient(live_server.grpc_url) as c, LossClient(live_server.http_url, shared_memory=False) as wire:
        first = c.loss("ciou", p1, t1)  # lent: views of the only region
        assert in_region(first.loss, c._shm.pool[0]) and c._shm.pool[0].lent
        second = c.loss("ciou", p2, t2)  # no room for another region: over the wire
        np.testing.assert_array_equal(second.grad, wire.loss("ciou", p2, t2).grad)
        assert c.shared_memory_calls == 1 and c._shm.enabled and c._shm.max_regions == 1
        np.testing.assert_array_equal(first.grad, wire.loss("ciou", p1, t1).grad)  # not overwritten
        del first
        gc.collect()
        third = c.loss("ciou", p2, t2)  # the region is free again; its answer is copied out (the last free one)
        np.testing.assert_array_equal(third.loss, second.loss)
        assert c.shared_memory_calls == 2 and len(made) == 1 and len(c._shm.pool) == 1
        assert not in_region(third.loss, c._shm.pool[0]) and not c._shm.pool[0].lent
