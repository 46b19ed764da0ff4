"""LOSS and GRAD computed straight into a client's shared-memory region (a mapped object: the server's user's,
0600), against a real `lossd serve`, and every case where the server must compute elsewhere and copy instead: an
output overlapping an input read in place (also through another region name on the same object), outputs
overlapping each other, an output offset not aligned to its dtype, a reduced loss, an output too small, an object
others can write. Expected values: float64 autograd of the paper's CIoU (tests.oip.test_shared_memory) and the
in-process engine without shared memory."""

from __future__ import annotations

import os
import uuid
from multiprocessing import shared_memory

import httpx
import numpy as np
import pytest

from tests.conftest import start_server
from tests.oip.test_shared_memory import Region, _infer, _post, _shm_input, boxes, ciou_reference

F = 4  # bytes of an FP32


@pytest.fixture(scope="module")
def server():
    srv = start_server({"LOSSD_MAX_SHM_REGIONS": "8"})
    yield srv
    srv.proc.terminate()
    srv.proc.wait(timeout=30)


@pytest.fixture
def region(server):
    """Regions of our own (0600: the server maps them); every region unregistered before and after."""
    assert _post(server, "/unregister").status_code == 200
    made = []

    def make(size):
        r = Region(size)
        made.append(r)
        return r

    yield make
    _post(server, "/unregister")
    for r in made:
        r.close()


def _out(name, region, offset, size):
    return {"name": name, "parameters": {"shared_memory_region": region, "shared_memory_offset": offset,
                                         "shared_memory_byte_size": size}}


def _f32(mem, offset, count):
    """count FP32 values at a byte offset of a region (any alignment), copied."""
    return np.frombuffer(bytes(mem.buf[offset:offset + count * F]), np.float32).copy()


def _fill(mem, pred, target, n):
    """PRED at 0, TARGET at n*16, the rest of the region a sentinel (so unwritten bytes show)."""
    buf = np.frombuffer(mem.buf, np.uint8)
    buf[:] = 0xAB
    np.frombuffer(mem.buf, np.float32, count=8 * n)[:] = np.concatenate([pred.ravel(), target.ravel()])


def _register(server, name, key, size, offset=0):
    resp = _post(server, f"/region/{name}/register", {"key": "/" + key, "offset": offset, "byte_size": size})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("n", [1000, 20_000])
def test_outputs_computed_in_the_region_are_exact(server, region, engine, n):
    pred, target = boxes(n, 1)
    size = 2 * n * 16 + n * F + n * 16
    r = region(size)
    _fill(r.mem, pred, target, n)
    _register(server, "r", r.key, size)
    inputs = [_shm_input("PRED", n, "r"), _shm_input("TARGET", n, "r", offset=n * 16)]
    loss_at, grad_at = 2 * n * 16, 2 * n * 16 + n * F
    resp = _infer(server, inputs, [_out("LOSS", "r", loss_at, n * F), _out("GRAD", "r", grad_at, n * 16)])
    assert resp.status_code == 200, resp.text
    assert [o["shape"] for o in resp.json()["outputs"]] == [[n], [n, 4]]
    loss, grad = _f32(r.mem, loss_at, n), _f32(r.mem, grad_at, 4 * n).reshape(n, 4)
    plain = engine.evaluate("ciou", pred, target)
    np.testing.assert_array_equal(loss, plain.loss.numpy())
    np.testing.assert_array_equal(grad, plain.grad.numpy())
    want_loss, want_grad = ciou_reference(pred, target)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-3, atol=1e-5)
    # the inputs, read in place, are left as they were
    np.testing.assert_array_equal(_f32(r.mem, 0, 4 * n).reshape(n, 4), pred)
    np.testing.assert_array_equal(_f32(r.mem, n * 16, 4 * n).reshape(n, 4), target)


def _overlap_case(server, r, n, two_names, grad_at, loss_at):
    """PRED, TARGET at 0 and n*16 of the object; outputs at the given object offsets, through region "r" or, with
    two_names, through "o", registered on the same object 16 bytes in."""
    if two_names:
        _register(server, "o", r.key, r.mem.size - 16, offset=16)
        out_region, shift = "o", 16
    else:
        out_region, shift = "r", 0
    inputs = [_shm_input("PRED", n, "r"), _shm_input("TARGET", n, "r", offset=n * 16)]
    return _infer(server, inputs, [_out("LOSS", out_region, loss_at - shift, n * F),
                                   _out("GRAD", out_region, grad_at - shift, n * 16)])


# (GRAD's object offset, LOSS's object offset) as functions of n: each output lands on input rows not read yet
OVERLAPS = {
    "grad over pred, one row on": (lambda n: 16, lambda n: 2 * n * 16 + 64),
    "grad over target, one row on": (lambda n: n * 16 + 16, lambda n: 2 * n * 16 + 64),
    "loss over target, one row on": (lambda n: 2 * n * 16 + 64, lambda n: n * 16 + 16),
}


@pytest.mark.parametrize("two_names", [False, True], ids=["one name", "two names, one object"])
@pytest.mark.parametrize("case", list(OVERLAPS))
def test_an_output_over_an_input_read_in_place_gives_the_exact_answer(server, region, engine, case, two_names):
    """Computed in place, an output over input rows still to be read would feed the kernel its own answers; the
    server computes such an output elsewhere, then copies it over the inputs."""
    n = 1000
    pred, target = boxes(n, 2)
    size = 2 * n * 16 + 64 + n * 16 + 64
    r = region(size)
    _fill(r.mem, pred, target, n)
    _register(server, "r", r.key, size)
    grad_at, loss_at = (f(n) for f in OVERLAPS[case])
    resp = _overlap_case(server, r, n, two_names, grad_at, loss_at)
    assert resp.status_code == 200, resp.text
    plain = engine.evaluate("ciou", pred, target)
    np.testing.assert_array_equal(_f32(r.mem, grad_at, 4 * n).reshape(n, 4), plain.grad.numpy())
    np.testing.assert_array_equal(_f32(r.mem, loss_at, n), plain.loss.numpy())
    want_loss, _ = ciou_reference(pred, target)
    np.testing.assert_allclose(_f32(r.mem, loss_at, n), want_loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["LOSS", "GRAD", "both"])
def test_a_misaligned_output_offset_gives_the_exact_answer(server, region, engine, which):
    n = 1000
    pred, target = boxes(n, 3)
    size = 2 * n * 16 + n * F + 64 + n * 16 + 64
    r = region(size)
    _fill(r.mem, pred, target, n)
    _register(server, "r", r.key, size)
    loss_at = 2 * n * 16 + (2 if which in ("LOSS", "both") else 0)
    grad_at = 2 * n * 16 + n * F + 64 + (2 if which in ("GRAD", "both") else 0)
    inputs = [_shm_input("PRED", n, "r"), _shm_input("TARGET", n, "r", offset=n * 16)]
    resp = _infer(server, inputs, [_out("LOSS", "r", loss_at, n * F), _out("GRAD", "r", grad_at, n * 16)])
    assert resp.status_code == 200, resp.text
    plain = engine.evaluate("ciou", pred, target)
    np.testing.assert_array_equal(_f32(r.mem, loss_at, n), plain.loss.numpy())
    np.testing.assert_array_equal(_f32(r.mem, grad_at, 4 * n).reshape(n, 4), plain.grad.numpy())


@pytest.mark.parametrize("layout", ["grad starts inside loss", "loss starts inside grad", "through two names",
                                    "loss asked for twice"])
def test_outputs_overlapping_each_other_are_refused(server, region, layout):
    """Two outputs given bytes of one object (also through two region names), or one output asked for twice:
    each would overwrite the other, so the call is a 400 naming the output, and nothing is written."""
    n = 1000
    pred, target = boxes(n, 4)
    base = 2 * n * 16
    size = base + n * F + n * 16 + 64
    r = region(size)
    _fill(r.mem, pred, target, n)
    _register(server, "r", r.key, size)
    if layout == "grad starts inside loss":
        loss_at, grad_at = base, base + 8 * F
    elif layout == "loss starts inside grad":
        loss_at, grad_at = base + 16 * F, base
    else:
        loss_at, grad_at = base, base + n * F + 64
    inputs = [_shm_input("PRED", n, "r"), _shm_input("TARGET", n, "r", offset=n * 16)]
    outputs = [_out("LOSS", "r", loss_at, n * F), _out("GRAD", "r", grad_at, n * 16)]
    if layout == "through two names":
        _register(server, "r2", r.key, size - base, offset=base)
        outputs = [_out("LOSS", "r", loss_at, n * F), _out("GRAD", "r2", 8 * F, n * 16)]
    if layout == "loss asked for twice":
        outputs = [_out("LOSS", "r", loss_at, n * F), _out("LOSS", "r", grad_at, n * F)]
    before = bytes(r.mem.buf[:size])
    resp = _infer(server, inputs, outputs)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    if layout == "loss asked for twice":
        assert "LOSS asked for twice" in err
    else:
        assert resp.headers["lossd-error-field"] == "outputs.GRAD" and "overlaps outputs.LOSS" in err
    assert bytes(r.mem.buf[:size]) == before


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduced_losses_into_shared_memory(server, region, reduction):
    n = 1000
    pred, target = boxes(n, 5)
    base = 2 * n * 16
    size = base + n * F + n * 16
    r = region(size)
    _fill(r.mem, pred, target, n)
    _register(server, "r", r.key, size)
    body = {"inputs": [_shm_input("PRED", n, "r"), _shm_input("TARGET", n, "r", offset=n * 16)],
            "outputs": [_out("LOSS", "r", base, n * F), _out("GRAD", "r", base + n * F, n * 16)],
            "parameters": {"reduction": reduction}}
    resp = httpx.post(f"{server.http_url}/v2/models/ciou/infer", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    outs = {o["name"]: o for o in resp.json()["outputs"]}
    assert outs["LOSS"]["parameters"]["shared_memory_byte_size"] == F
    want_loss, want_grad = ciou_reference(pred, target)
    scale = 1 / n if reduction == "mean" else 1.0
    assert float(_f32(r.mem, base, 1)[0]) == pytest.approx(want_loss.sum() * scale, rel=1e-5)
    assert bytes(r.mem.buf[base + F:base + n * F]) == b"\xab" * ((n - 1) * F)  # one value written, no more
    np.testing.assert_allclose(_f32(r.mem, base + n * F, 4 * n).reshape(n, 4), want_grad * scale, rtol=1e-3,
                               atol=1e-7)


@pytest.mark.parametrize("short", ["GRAD", "LOSS"])
def test_an_output_too_small_is_a_400_naming_it(server, region, short):
    n = 1000
    pred, target = boxes(n, 6)
    base = 2 * n * 16
    size = base + n * F + n * 16
    r = region(size)
    _fill(r.mem, pred, target, n)
    _register(server, "r", r.key, size)
    inputs = [_shm_input("PRED", n, "r"), _shm_input("TARGET", n, "r", offset=n * 16)]
    loss_size = n * F - (F if short == "LOSS" else 0)
    grad_size = n * 16 - (F if short == "GRAD" else 0)
    resp = _infer(server, inputs, [_out("LOSS", "r", base, loss_size), _out("GRAD", "r", base + n * F, grad_size)])
    assert resp.status_code == 400, resp.text
    assert resp.headers["lossd-error-field"] == f"outputs.{short}"
    assert "too small" in resp.json()["error"]
    assert httpx.get(f"{server.http_url}/v2/health/ready", timeout=10).status_code == 200
    ok = _infer(server, inputs, [_out("LOSS", "r", base, n * F), _out("GRAD", "r", base + n * F, n * 16)])
    assert ok.status_code == 200, ok.text


def test_an_object_others_can_write_is_written_by_copy(server, engine):
    """Group/world-writable: never mapped (read with pread, written with pwrite); the answer is the same."""
    n = 1000
    pred, target = boxes(n, 7)
    base = 2 * n * 16
    size = base + n * F + n * 16
    mem = shared_memory.SharedMemory("lossd_test_" + uuid.uuid4().hex[:12], create=True, size=size)
    os.chmod("/dev/shm/" + mem.name, 0o666)
    assert _post(server, "/unregister").status_code == 200
    try:
        _fill(mem, pred, target, n)
        _register(server, "w", mem.name, size)
        inputs = [_shm_input("PRED", n, "w"), _shm_input("TARGET", n, "w", offset=n * 16)]
        resp = _infer(server, inputs, [_out("LOSS", "w", base, n * F), _out("GRAD", "w", base + n * F, n * 16)])
        assert resp.status_code == 200, resp.text
        plain = engine.evaluate("ciou", pred, target)
        np.testing.assert_array_equal(_f32(mem, base, n), plain.loss.numpy())
        np.testing.assert_array_equal(_f32(mem, base + n * F, 4 * n).reshape(n, 4), plain.grad.numpy())
    finally:
        _post(server, "/unregister")
        mem.close()
        mem.unlink()


# ---------------------------------------------------------------------- in process: where the engine writes
# (LOSS offset, GRAD offset, second name's offset into the object or None, (LOSS in place, GRAD in place))
TARGETS = {
    "apart": (lambda n: 2 * n * 16, lambda n: 2 * n * 16 + n * F, None, (True, True)),
    "grad over pred": (lambda n: 2 * n * 16, lambda n: 16, None, (True, False)),
    "grad over pred via another name": (lambda n: 2 * n * 16, lambda n: 16, 16, (True, False)),
    "loss over target": (lambda n: n * 16, lambda n: 2 * n * 16 + n * F, None, (False, None)),
    "grad misaligned": (lambda n: 2 * n * 16, lambda n: 2 * n * 16 + n * F + 2, None, (True, False)),
    "loss misaligned": (lambda n: 2 * n * 16 + 2, lambda n: 2 * n * 16 + n * F + 4, None, (False, None)),
}


@pytest.mark.parametrize("case", list(TARGETS))
def test_which_outputs_the_engine_computes_in_the_region(engine, case):
    """oip.shm_targets in process: an output is computed in place only when it overlaps nothing read or written
    in place; then the engine's answer *is* the object's bytes (seen through another mapping of it)."""
    from lossd import oip
    from lossd.shm import SharedMemory

    n = 64
    pred, target = boxes(n, 8)
    size = 2 * n * 16 + n * F + n * 16 + 64
    mem = shared_memory.SharedMemory("lossd_test_" + uuid.uuid4().hex[:12], create=True, size=size)
    table = SharedMemory(4)
    try:
        _fill(mem, pred, target, n)
        loss_f, grad_f, other, (loss_in, grad_in) = TARGETS[case]
        table.register("r", mem.name, 0, size)
        out_region, shift = "r", 0
        if other is not None:
            table.register("o", mem.name, other, size - other)
            out_region, shift = "o", other
        req = {"inputs": [_shm_input("PRED", n, "r"), _shm_input("TARGET", n, "r", offset=n * 16)],
               "outputs": [_out("LOSS", out_region, loss_f(n) - shift, n * F),
                           _out("GRAD", out_region, grad_f(n) - shift, n * 16)]}
        with table.call() as call_shm:
            call = oip.prepare_infer("ciou", req, memoryview(b""), shm=call_shm)
            oip.read_shm_inputs(call)
            target_out = oip.shm_targets(call)
            if not loss_in:
                assert target_out is None
                return
            assert target_out.loss is not None and (target_out.grad is not None) == grad_in
            res = engine.evaluate("ciou", call.kwargs["pred"], call.kwargs["target"], out=target_out)
            assert res.loss.data_ptr() == target_out.loss.ctypes.data
            plain = engine.evaluate("ciou", pred, target)
            np.testing.assert_array_equal(_f32(mem, loss_f(n), n), plain.loss.numpy())
            if grad_in:
                np.testing.assert_array_equal(_f32(mem, grad_f(n), 4 * n).reshape(n, 4), plain.grad.numpy())
            del call, res, target_out
    finally:
        table.close()
        mem.close()
        mem.unlink()
