"""LossClient.shared_inputs(): input arrays built in a region shared with a real `lossd serve`, sync and async,
gRPC and HTTP. A call on them (or on a contiguous part) must copy nothing in and give the wire's answer; anything
else (a copy of the arrays, a strided view, both answer places held, the region unregistered or taken over by
another process, a forked child) must still give the right answer, through the ordinary path; bad boxes in the
region are the caller's error with its rows; close() and the client's close() unregister the region and leave the
arrays readable."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os

import httpx
import numpy as np
import pytest

from lossd_client import InvalidInputError, LossClient, SharedInputs
from lossd_client import _shm
from tests.client.test_shared_memory import boxes, hijack, same, status
from tests.client.test_shared_memory_lent import TRANSPORTS, _client

N = 80_000  # LOSS + GRAD 1.6 MB: answers are lent (views of the region)


@pytest.fixture(**TRANSPORTS)
def client(request, live_server):
    return _client(request, live_server)


@pytest.fixture
def wire(live_server):
    with LossClient(live_server.http_url, shared_memory=False) as c:
        yield c


@pytest.fixture
def copies(monkeypatch):
    """Counts the calls whose inputs were copied into a region (the ordinary shared-memory path)."""
    made = []
    real = _shm.ShmPath._write

    def write(region, call, layout, marks):
        made.append(call.pred.shape)
        return real(region, call, layout, marks)

    monkeypatch.setattr(_shm.ShmPath, "_write", staticmethod(write))
    return made


def filled(client, n: int, seed: int, **kw) -> SharedInputs:
    bufs = client.client.shared_inputs((n, 4), **kw)
    bufs.pred[...], bufs.target[...] = boxes(n, seed)
    return bufs


def in_region(arr: np.ndarray, bufs: SharedInputs) -> bool:
    whole = np.frombuffer(bufs.region.mem.buf, np.uint8)
    try:
        return np.shares_memory(arr, whole)
    finally:
        del whole


def mine(server) -> list[str]:
    return [r["name"] for r in status(server) if r["name"].startswith("lossd_client_")]


def test_a_call_on_shared_inputs_copies_nothing_and_gives_the_wires_answer(client, wire, copies, live_server):
    bufs = filled(client, N, 1)
    assert bufs.shared and bufs.pred.shape == (N, 4) and bufs.pred.dtype == np.float32
    out = client.loss("ciou", bufs.pred, bufs.target)
    same(out, wire.loss("ciou", bufs.pred.copy(), bufs.target.copy()))
    assert copies == [] and client.shm.calls == 1
    assert in_region(out.loss, bufs) and in_region(out.grad, bufs)  # the answer too: nothing copied out
    assert bufs.region.name in mine(live_server)
    # the caller refills the same arrays: the next answer is the new inputs', and the held one is unchanged
    before = np.array(out.grad)
    bufs.pred[...], bufs.target[...] = boxes(N, 2)
    again = client.loss("giou", bufs.pred, bufs.target, reduction="sum", return_grad=False)
    assert again.loss == pytest.approx(wire.loss("giou", *boxes(N, 2), reduction="sum").loss, rel=1e-6)
    np.testing.assert_array_equal(out.grad, before)
    assert copies == [] and client.shm.calls == 2


def test_parts_weights_and_float64(client, wire, copies):
    bufs = filled(client, N, 3, weights=True)
    bufs.weights[...] = np.random.default_rng(3).uniform(0.1, 2, N)
    p, t, w = bufs.pred.copy(), bufs.target.copy(), bufs.weights.copy()
    for part in (slice(0, 5000), slice(1234, 71234)):  # a leading part, and one from the middle
        got = client.loss("diou", bufs.pred[part], bufs.target[part], weights=bufs.weights[part], reduction="mean")
        want = wire.loss("diou", p[part], t[part], weights=w[part], reduction="mean")
        assert got.loss == pytest.approx(want.loss, rel=1e-6)
        np.testing.assert_allclose(got.grad, want.grad, rtol=1e-6, atol=1e-12)
    wide = client.client.shared_inputs(N // 4, dtype="float64")  # N // 4 boxes
    wide.pred[...], wide.target[...] = p[:N // 4], t[:N // 4]
    got = client.loss("ciou", wide.pred, wide.target)
    want = wire.loss("ciou", p[:N // 4].astype(np.float64), t[:N // 4].astype(np.float64))
    assert got.loss.dtype == np.float64 and got.grad.dtype == np.float64
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(got.grad, want.grad, rtol=1e-12, atol=1e-16)
    assert copies == [] and client.shm.calls == 3


def test_class_labels(client, wire, copies):
    rng = np.random.default_rng(4)
    bufs = client.client.shared_inputs((N, 5), (N,), target_dtype="int64")
    bufs.pred[...] = rng.normal(size=(N, 5))
    bufs.target[...] = rng.integers(0, 5, N)
    got = client.loss("cross_entropy", bufs.pred, bufs.target)
    same(got, wire.loss("cross_entropy", bufs.pred.copy(), bufs.target.copy()))
    assert copies == []


def test_arrays_outside_the_inputs_are_copied_as_before(client, wire, copies):
    bufs = filled(client, N, 5)
    p, t = bufs.pred.copy(), bufs.target.copy()
    same(client.loss("ciou", p, t), wire.loss("ciou", p, t))  # copies of them
    same(client.loss("ciou", bufs.pred[::2], bufs.target[::2]), wire.loss("ciou", p[::2], t[::2]))  # strided
    same(client.loss("ciou", bufs.pred, t), wire.loss("ciou", p, t))  # only one of them in the region
    assert len(copies) == 3


def test_with_both_answer_places_held_calls_take_the_ordinary_path(client, wire, copies):
    bufs = filled(client, N, 6)
    p, t = bufs.pred.copy(), bufs.target.copy()
    want = wire.loss("ciou", p, t)
    held = [client.loss("ciou", bufs.pred, bufs.target) for _ in range(3)]
    assert len(copies) == 1  # the third: both places held
    assert in_region(held[0].loss, bufs) and in_region(held[1].loss, bufs) and not in_region(held[2].loss, bufs)
    for out in held:
        same(out, want)
    del held[0]
    gc.collect()
    again = client.loss("ciou", bufs.pred, bufs.target)  # a place came back
    assert len(copies) == 1 and in_region(again.loss, bufs)
    for out in held + [again]:
        same(out, want)


def test_a_region_unregistered_by_another_client_is_registered_again(client, wire, copies, live_server):
    bufs = filled(client, N, 7)
    first = client.loss("ciou", bufs.pred, bufs.target)
    old = bufs.region.name
    assert httpx.post(f"{live_server.http_url}/v2/systemsharedmemory/unregister").status_code == 200
    bufs.pred[...], bufs.target[...] = boxes(N, 8)
    same(client.loss("ciou", bufs.pred, bufs.target), wire.loss("ciou", *boxes(N, 8)))
    assert len(copies) == 1  # this call through the ordinary path
    out = client.loss("ciou", bufs.pred, bufs.target)  # and the next in place again, under a fresh name
    same(out, wire.loss("ciou", *boxes(N, 8)))
    assert len(copies) == 1 and in_region(out.loss, bufs)
    assert bufs.region.name != old and bufs.region.name in mine(live_server)
    same(first, wire.loss("ciou", *boxes(N, 7)))


def test_a_region_taken_over_never_gives_their_answer(client, wire, copies, live_server):
    bufs = filled(client, N, 9)
    client.loss("ciou", bufs.pred, bufs.target)
    theirs = hijack(live_server, bufs.region.name)
    try:
        bufs.pred[...], bufs.target[...] = boxes(N, 10)
        want = wire.loss("ciou", *boxes(N, 10))
        same(client.loss("ciou", bufs.pred, bufs.target), want)
        assert len(copies) == 1 and client.shm.replaced == 1
        out = client.loss("ciou", bufs.pred, bufs.target)
        same(out, want)
        assert len(copies) == 1 and in_region(out.loss, bufs) and bufs.region.name != theirs.name
    finally:
        theirs.close()
        theirs.unlink()
        httpx.post(f"{live_server.http_url}/v2/systemsharedmemory/unregister")


def test_bad_boxes_in_the_region_are_the_callers_error(client, copies, live_server):
    bufs = filled(client, N, 11)
    client.loss("ciou", bufs.pred, bufs.target)
    name = bufs.region.name
    bufs.pred[17] = [10, 10, 0, 0]
    with pytest.raises(InvalidInputError) as err:
        client.loss("ciou", bufs.pred, bufs.target)
    assert err.value.code == "inverted_box" and err.value.rows == [17]
    # the region is still ours under its name: not registered again, nothing copied
    assert bufs.region.name == name and mine(live_server).count(name) == 1 and copies == []
    assert client.shm.replaced == 0


def test_close_unregisters_and_leaves_the_arrays_readable(client, live_server):
    bufs = filled(client, N, 12)
    out = client.loss("ciou", bufs.pred, bufs.target)
    name, key = bufs.region.name, bufs.region.mem.name
    pred = bufs.pred
    bufs.close()
    bufs.close()
    assert not bufs.shared and not os.path.exists(f"/dev/shm/{key}")
    assert pred[3].tolist() == boxes(N, 12)[0][3].tolist() and np.isfinite(out.grad).all()
    client.loss("ciou", pred.copy(), bufs.target.copy())  # the next call unregisters the closed region's name
    assert name not in mine(live_server)
    # the client's close() unregisters the ones still open
    other = filled(client, N, 13)
    client.loss("ciou", other.pred, other.target)
    assert other.region.name in mine(live_server)
    client.close()
    assert other.region.name not in mine(live_server) and not other.shared
    assert other.pred[5].tolist() == boxes(N, 13)[0][5].tolist()


def test_dropped_shared_inputs_are_unregistered(client, live_server):
    bufs = filled(client, N, 14)
    client.loss("ciou", bufs.pred, bufs.target, reduction="sum")
    name = bufs.region.name
    del bufs
    gc.collect()
    client.loss("ciou", *boxes(N, 14), reduction="sum")
    assert name not in mine(live_server)


def test_without_shared_memory_they_are_ordinary_arrays(live_server, wire):
    for url, kw in ((live_server.grpc_url, {"shared_memory": False}), ("http://10.255.255.1:9", {})):
        with LossClient(url, **kw) as c:
            bufs = c.shared_inputs(1000)
            assert not bufs.shared and bufs.pred.shape == (1000, 4) and bufs.pred.flags.owndata
            if url == live_server.grpc_url:
                bufs.pred[...], bufs.target[...] = boxes(1000, 15)
                same(c.loss("ciou", bufs.pred, bufs.target), wire.loss("ciou", *boxes(1000, 15)))
            bufs.close()


@pytest.mark.parametrize("args, kw, field", [
    (("1000",), {}, "pred_shape"), (((10, -4),), {}, "pred_shape"), (((),), {}, "pred_shape"),
    (((10, 4.0),), {}, "pred_shape"), ((10,), {"dtype": "int32"}, "dtype"), ((10,), {"dtype": ">f4"}, "dtype"),
    ((10, (10,)), {"target_dtype": "float16"}, "target_dtype"), ((10,), {"weights": "yes"}, "weights")])
def test_bad_arguments_name_their_field(live_server, args, kw, field):
    with LossClient(live_server.grpc_url) as c:
        with pytest.raises(InvalidInputError) as err:
            c.shared_inputs(*args, **kw)
        assert err.value.field == field


def test_a_forked_child_uses_its_own_regions_and_its_answer_never_changes(live_server, wire):
    """The child inherits the answer it sees as shared pages: once the parent drops its own reference, the
    parent must still never write that answer place again."""
    ctx = mp.get_context("fork")
    with LossClient(live_server.grpc_url) as c:
        bufs = c.shared_inputs(N)
        bufs.pred[...], bufs.target[...] = boxes(N, 16)
        held = [c.loss("ciou", bufs.pred, bufs.target)]
        assert in_region(held[0].loss, bufs)
        want = wire.loss("ciou", *boxes(N, 16))
        go, called, done = ctx.Event(), ctx.Event(), ctx.Queue()

        def child():
            # the parent's region is not the child's to register or write: the call copies, into its own region
            before = c._shm.calls
            out = c.loss("ciou", bufs.pred, bufs.target)
            ok = bool(np.array_equal(out.loss, want.loss) and not in_region(out.loss, bufs)
                      and c._shm.calls == before + 1)
            called.set()
            go.wait(60)  # meanwhile the parent dropped its answer and called on new inputs
            mine = held[0]
            done.put(ok and bool(np.array_equal(mine.loss, want.loss) and np.array_equal(mine.grad, want.grad)))

        proc = ctx.Process(target=child)
        proc.start()
        try:
            held.clear()
            gc.collect()
            assert called.wait(120)  # (the arrays are shared: not refilled before the child has read them)
            bufs.pred[...], bufs.target[...] = boxes(N, 17)
            other = wire.loss("ciou", *boxes(N, 17))
            for _ in range(3):  # through the place the child does not hold, never the one it does
                again = c.loss("ciou", bufs.pred, bufs.target)
                same(again, other)
                assert in_region(again.loss, bufs)
                del again
            go.set()
            assert done.get(timeout=120) is True
        finally:
            proc.join(60)
        assert proc.exitcode == 0


def test_an_object_truncated_to_its_inputs_after_registering_is_copied_not_a_crash(client, wire, copies):
    """Another process of our user shrinks the object to just its inputs part after the region was registered:
    the arrays the caller filled stay readable, and the call must take the ordinary path (docs: a truncated object
    is always copied), not write the sentinel into the answer place past the object's end (SIGBUS)."""
    bufs = filled(client, N, 20)
    client.loss("ciou", bufs.pred, bufs.target)  # registers the region
    assert bufs.region.registered
    fd = os.open(f"/dev/shm/{bufs.region.mem.name}", os.O_RDWR)
    try:
        os.ftruncate(fd, bufs.inputs_bytes)
    finally:
        os.close(fd)
    ours = client.loss("ciou", bufs.pred, bufs.target)
    same(ours, wire.loss("ciou", *boxes(N, 20)))
    assert copies and not bufs.shared


def test_closing_the_inputs_while_a_call_on_them_runs_still_answers(client, wire, monkeypatch):
    """bufs.close() from another thread while loss() on bufs is at the server: the call gives the right answer
    (the region stays mapped while the call uses it), not a TypeError from a closed SharedMemory."""
    bufs = filled(client, N, 21)
    endpoint = client.client._shm.endpoint
    real = endpoint.shm_infer

    def closing(*args):  # the close lands while the server reads and writes the region
        bufs.close()
        return real(*args)

    async def aclosing(*args):
        bufs.close()
        return await real(*args)

    monkeypatch.setattr(endpoint, "shm_infer", aclosing if client.loop is not None else closing)
    ours = client.loss("ciou", bufs.pred, bufs.target)
    monkeypatch.setattr(endpoint, "shm_infer", real)
    same(ours, wire.loss("ciou", *boxes(N, 21)))
    assert not bufs.shared


@pytest.mark.parametrize("args", [((2**62, 4),), ((3, 2**62),), ((2**61, 8),), ((4, 4), (2**62, 4))])
def test_sizes_past_what_can_be_mapped_are_the_callers_error_and_leave_nothing(live_server, args):
    """Byte counts past int64 (np.prod wrapped around, ftruncate raised OverflowError out of SharedMemory) were an
    untyped OverflowError / ValueError and left an empty object in /dev/shm each time."""
    before = set(os.listdir("/dev/shm"))
    with LossClient(live_server.grpc_url) as c:
        with pytest.raises(InvalidInputError) as info:
            c.shared_inputs(*args)
    assert info.value.field == ("target_shape" if len(args) > 1 else "pred_shape")
    assert not [f for f in set(os.listdir("/dev/shm")) - before if f.startswith("lossd_client_")]


@pytest.mark.parametrize("own", [True, False], ids=["shared-inputs", "pool-region"])
def test_our_name_registered_again_on_our_object_at_another_offset_is_a_lost_region(client, wire, live_server, own):
    """Another process registers our region's name again on our own object, 64 bytes in: the outputs no longer
    fit, and the refusal used to stand as the caller's error (the takeover check compared only the key)."""
    if own:
        bufs = filled(client, N, 22)
        args = (bufs.pred, bufs.target)
        client.loss("ciou", *args)
        region = bufs.region
    else:
        args = boxes(N, 22)
        client.loss("ciou", *args)
        region = client.shm.current
    base = f"{live_server.http_url}/v2/systemsharedmemory/region/{region.name}"
    assert httpx.post(f"{base}/unregister").status_code == 200
    assert httpx.post(f"{base}/register", json={"key": region.key, "offset": 64,
                                                "byte_size": region.mem.size - 64}).status_code == 200
    try:
        same(client.loss("ciou", *args), wire.loss("ciou", *boxes(N, 22)))
        assert client.shm.replaced == 1
    finally:
        httpx.post(f"{base}/unregister")


def test_a_full_dev_shm_when_a_call_must_copy_leaves_the_inputs_in_place(client, wire, monkeypatch):
    """Both answer places held, so a call needs a pool region, and /dev/shm is full just then (posix_fallocate
    answers ENOSPC, as on a full tmpfs): that call goes over the wire, and calls on the inputs stay in place
    (shared memory was turned off for the whole client, while bufs.shared still said True)."""
    import errno

    bufs = filled(client, N, 23)
    want = wire.loss("ciou", *boxes(N, 23))
    held = [client.loss("ciou", bufs.pred, bufs.target) for _ in range(2)]

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_shm.os, "posix_fallocate", full)
    same(client.loss("ciou", bufs.pred, bufs.target), want)  # over the wire
    monkeypatch.undo()
    del held
    gc.collect()
    calls = client.shm.calls
    out = client.loss("ciou", bufs.pred, bufs.target)
    same(out, want)
    assert bufs.shared and client.shm.calls == calls + 1 and in_region(out.loss, bufs)
