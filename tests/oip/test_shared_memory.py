"""Triton's system shared-memory extension against a real `lossd serve`: tritonclient's own flow over HTTP and
gRPC (in a subprocess: its `inference.*` protobuf messages would clash with lossd's in one process), lossd's
client with and without shared memory, and every refusal. Expected values come from a float64 torch autograd of
the CIoU formula written here from the paper (Zheng et al. 2020), not from the engine."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
import uuid
from multiprocessing import shared_memory

import grpc
import httpx
import numpy as np
import pytest
import torch

from lossd.errors import ServiceError
from tests.conftest import start_server

# find_spec, not importorskip: importing tritonclient here would load its protobuf messages into this process
needs_tritonclient = pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                                        reason="tritonclient is in the test extra")


def ciou_reference(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CIoU loss and its gradient wrt pred, float64 autograd of the paper's formula (alpha detached)."""
    p = torch.tensor(pred, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(target, dtype=torch.float64)
    eps = 1e-7
    x1, y1, x2, y2 = p.unbind(-1)
    a1, b1, a2, b2 = t.unbind(-1)
    iw = (torch.min(x2, a2) - torch.max(x1, a1)).clamp(min=0)
    ih = (torch.min(y2, b2) - torch.max(y1, b1)).clamp(min=0)
    inter = iw * ih
    union = (x2 - x1) * (y2 - y1) + (a2 - a1) * (b2 - b1) - inter
    iou = inter / (union + eps)
    cw = torch.max(x2, a2) - torch.min(x1, a1)
    ch = torch.max(y2, b2) - torch.min(y1, b1)
    c2 = cw ** 2 + ch ** 2 + eps
    rho2 = ((x1 + x2 - a1 - a2) ** 2 + (y1 + y2 - b1 - b2) ** 2) / 4
    v = (4 / math.pi ** 2) * (torch.atan((a2 - a1) / (b2 - b1)) - torch.atan((x2 - x1) / (y2 - y1))) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    loss = 1 - iou + rho2 / c2 + alpha * v
    loss.sum().backward()
    return loss.detach().numpy(), p.grad.numpy()


def boxes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n, 2))
    pred = np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32)
    txy = xy + rng.uniform(-10, 10, (n, 2))
    target = np.concatenate([txy, txy + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32)
    return pred, target


TRITON = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as tg
    import tritonclient.http as th
    import tritonclient.utils.shared_memory as shm

    http_url, grpc_target, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 100, (n, 2))
    pred = np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32)
    txy = xy + rng.uniform(-10, 10, (n, 2))
    target = np.concatenate([txy, txy + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32)
    out = {"pred": pred.tolist(), "target": target.tolist()}
    for name, mod, url in (("http", th, http_url), ("grpc", tg, grpc_target)):
        c = mod.InferenceServerClient(url)
        c.unregister_system_shared_memory()
        in_bytes, loss_bytes, grad_bytes = pred.nbytes, n * 4, pred.nbytes
        ih = shm.create_shared_memory_region("in_" + name, f"/lossd_in_{tag}_{name}", 2 * in_bytes)
        oh = shm.create_shared_memory_region("out_" + name, f"/lossd_out_{tag}_{name}", loss_bytes + grad_bytes)
        shm.set_shared_memory_region(ih, [pred, target])
        c.register_system_shared_memory("in_" + name, f"/lossd_in_{tag}_{name}", 2 * in_bytes)
        c.register_system_shared_memory("out_" + name, f"/lossd_out_{tag}_{name}", loss_bytes + grad_bytes)
        kw = {"as_json": True} if name == "grpc" else {}
        status = c.get_system_shared_memory_status(**kw)
        inputs = [mod.InferInput("PRED", [n, 4], "FP32"), mod.InferInput("TARGET", [n, 4], "FP32")]
        inputs[0].set_shared_memory("in_" + name, in_bytes)
        inputs[1].set_shared_memory("in_" + name, in_bytes, offset=in_bytes)
        outputs = [mod.InferRequestedOutput("LOSS"), mod.InferRequestedOutput("GRAD")]
        outputs[0].set_shared_memory("out_" + name, loss_bytes)
        outputs[1].set_shared_memory("out_" + name, grad_bytes, offset=loss_bytes)
        res = c.infer("ciou", inputs, outputs=outputs)
        lo, go = res.get_output("LOSS"), res.get_output("GRAD")
        if name == "grpc":
            lshape, gshape = list(lo.shape), list(go.shape)
        else:
            lshape, gshape = lo["shape"], go["shape"]
        loss = shm.get_contents_as_numpy(oh, np.float32, lshape).copy()
        grad = shm.get_contents_as_numpy(oh, np.float32, gshape, offset=loss_bytes).copy()
        errors = {}
        # a region too small for its tensor, then one that is not registered
        bad = [mod.InferInput("PRED", [n, 4], "FP32"), mod.InferInput("TARGET", [n, 4], "FP32")]
        bad[0].set_shared_memory("in_" + name, in_bytes - 4)
        bad[1].set_shared_memory("in_" + name, in_bytes, offset=in_bytes)
        for case, ins in (("size", bad),):
            try:
                c.infer("ciou", ins)
                errors[case] = "no error"
            except Exception as exc:
                errors[case] = str(exc)[:300]
        c.unregister_system_shared_memory("in_" + name)
        try:
            c.infer("ciou", inputs)
            errors["unregistered"] = "no error"
        except Exception as exc:
            errors["unregistered"] = str(exc)[:300]
        after = c.get_system_shared_memory_status(**kw)
        c.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(ih)
        shm.destroy_shared_memory_region(oh)
        out[name] = {"loss": loss.tolist(), "grad": grad.tolist(), "status": status, "after": after,
                     "errors": errors, "lshape": lshape, "gshape": gshape}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def server():
    srv = start_server({"LOSSD_MAX_SHM_REGIONS": "4"})
    yield srv
    srv.proc.terminate()
    srv.proc.wait(timeout=30)


@needs_tritonclient
def test_tritonclient_shared_memory_flow_http_and_grpc(server):
    n = 257
    proc = subprocess.run([sys.executable, "-c", TRITON, server.http_url.removeprefix("http://"),
                           server.grpc_target, uuid.uuid4().hex[:8], str(n)], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    want_loss, want_grad = ciou_reference(np.array(out["pred"], np.float32), np.array(out["target"], np.float32))
    for transport in ("http", "grpc"):
        got = out[transport]
        assert [int(s) for s in got["lshape"]] == [n] and [int(s) for s in got["gshape"]] == [n, 4]
        np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["grad"], want_grad, rtol=1e-3, atol=1e-5)
        status = got["status"]
        regions = status if isinstance(status, list) else list(status["regions"].values())
        assert {r["name"] for r in regions} == {f"in_{transport}", f"out_{transport}"}
        assert {int(r["byte_size"]) for r in regions} == {2 * n * 16, n * 4 + n * 16}
        after = got["after"]
        after = after if isinstance(after, list) else list(after.get("regions", {}).values())
        assert [r["name"] for r in after] == [f"out_{transport}"]
        assert "input PRED" in got["errors"]["size"] and "does not match" in got["errors"]["size"]
        assert "no shared-memory region named 'in_" in got["errors"]["unregistered"]


# ------------------------------------------------------------------------------------------ the HTTP API
class Region:
    def __init__(self, size: int):
        self.key = "lossd_test_" + uuid.uuid4().hex[:12]
        self.mem = shared_memory.SharedMemory(self.key, create=True, size=size)

    def close(self):
        self.mem.close()
        self.mem.unlink()


@pytest.fixture
def region():
    regions = []

    def make(size):
        r = Region(size)
        regions.append(r)
        return r

    yield make
    for r in regions:
        r.close()


def _post(server, path, body=None):
    return httpx.post(f"{server.http_url}/v2/systemsharedmemory{path}", json=body, timeout=30)


def _infer(server, inputs, outputs=None):
    body = {"inputs": inputs}
    if outputs is not None:
        body["outputs"] = outputs
    return httpx.post(f"{server.http_url}/v2/models/ciou/infer", json=body, timeout=60)


def _shm_input(name, n, region, offset=0, size=None):
    params = {"shared_memory_region": region, "shared_memory_byte_size": n * 16 if size is None else size}
    if offset:
        params["shared_memory_offset"] = offset
    return {"name": name, "datatype": "FP32", "shape": [n, 4], "parameters": params}


@pytest.fixture
def clean(server):
    assert _post(server, "/unregister").status_code == 200
    yield
    _post(server, "/unregister")


def test_errors_name_the_tensor_and_the_region(server, region, clean):
    n = 8
    pred, target = boxes(n, 1)
    r = region(2 * n * 16)
    np.frombuffer(r.mem.buf, np.float32)[:] = np.concatenate([pred.ravel(), target.ravel()])
    assert _post(server, "/region/inp/register", {"key": "/" + r.key, "byte_size": 2 * n * 16}).status_code == 200
    ok = _infer(server, [_shm_input("PRED", n, "inp"), _shm_input("TARGET", n, "inp", offset=n * 16)])
    assert ok.status_code == 200, ok.text
    want, _ = ciou_reference(pred, target)
    np.testing.assert_allclose(ok.json()["outputs"][0]["data"], want, rtol=1e-4, atol=1e-5)

    cases = {
        # past the region's end
        "bounds": ([_shm_input("PRED", n, "inp"), _shm_input("TARGET", n, "inp", offset=n * 16 + 4)],
                   None, "inputs.TARGET", "runs past the end"),
        # byte size disagrees with shape x dtype
        "size": ([_shm_input("PRED", n, "inp", size=n * 16 - 4), _shm_input("TARGET", n, "inp", offset=n * 16)],
                 None, "inputs.PRED", "does not match shape"),
        "unknown": ([_shm_input("PRED", n, "nope"), _shm_input("TARGET", n, "inp", offset=n * 16)],
                    None, "inputs.PRED", "no shared-memory region named 'nope'"),
        "bad name": ([_shm_input("PRED", n, "../etc"), _shm_input("TARGET", n, "inp", offset=n * 16)],
                     None, "inputs.PRED", "is not a region name"),
        "no size": ([{"name": "PRED", "datatype": "FP32", "shape": [n, 4],
                      "parameters": {"shared_memory_region": "inp"}}, _shm_input("TARGET", n, "inp")],
                    None, "inputs.PRED", "shared_memory_byte_size"),
        "negative offset": ([_shm_input("PRED", n, "inp", offset=-16), _shm_input("TARGET", n, "inp")],
                            None, "inputs.PRED.shared_memory_offset", "non-negative"),
        "output too small": ([_shm_input("PRED", n, "inp"), _shm_input("TARGET", n, "inp", offset=n * 16)],
                             [{"name": "GRAD", "parameters": {"shared_memory_region": "inp",
                                                              "shared_memory_byte_size": n * 16 - 4}}],
                             "outputs.GRAD", "too small"),
        "output past end": ([_shm_input("PRED", n, "inp"), _shm_input("TARGET", n, "inp", offset=n * 16)],
                            [{"name": "LOSS", "parameters": {"shared_memory_region": "inp",
                                                             "shared_memory_offset": 2 * n * 16 - 4,
                                                             "shared_memory_byte_size": n * 4}}],
                            "outputs.LOSS", "runs past the end"),
    }
    for case, (inputs, outputs, field, text) in cases.items():
        resp = _infer(server, inputs, outputs)
        assert resp.status_code == 400, (case, resp.status_code, resp.text)
        assert resp.headers["lossd-error-field"] == field, (case, resp.headers.get("lossd-error-field"))
        assert text in resp.json()["error"], (case, resp.text)


def test_register_refusals(server, region, clean):
    r = region(4096)
    refusals = {
        "no such key": ("/region/a/register", {"key": "/lossd_no_such_" + uuid.uuid4().hex, "byte_size": 16},
                        "key", "cannot open"),
        "path in key": ("/region/a/register", {"key": "/../etc/passwd", "byte_size": 16}, "key", "POSIX"),
        "past the end": ("/region/a/register", {"key": r.key, "offset": 4000, "byte_size": 200}, "byte_size",
                         "runs past the end"),
        "zero size": ("/region/a/register", {"key": r.key, "byte_size": 0}, "byte_size", "at least 1"),
        "bad size": ("/region/a/register", {"key": r.key, "byte_size": "16"}, "byte_size", "whole number"),
        "bad name": ("/region/a%20b/register", {"key": r.key, "byte_size": 16}, "name", "region name"),
        "unknown status": ("/region/zzz/status", None, "name", "no shared-memory region"),
        "unknown unregister": ("/region/zzz/unregister", None, "name", "no shared-memory region"),
    }
    for case, (path, body, field, text) in refusals.items():
        resp = _post(server, path, body)
        assert resp.status_code == 400, (case, resp.status_code, resp.text)
        assert resp.headers["lossd-error-field"] == field, case
        assert text in resp.json()["error"], (case, resp.text)
    # a name is registered once
    assert _post(server, "/region/a/register", {"key": r.key, "byte_size": 16}).status_code == 200
    again = _post(server, "/region/a/register", {"key": r.key, "byte_size": 16})
    assert again.status_code == 400 and "already registered" in again.json()["error"]
    # at most LOSSD_MAX_SHM_REGIONS (4 on this server) regions at once
    for i in range(3):
        assert _post(server, f"/region/b{i}/register", {"key": r.key, "byte_size": 16}).status_code == 200
    full = _post(server, "/region/c/register", {"key": r.key, "byte_size": 16})
    assert full.status_code == 429 and "at most 4" in full.json()["error"], full.text
    status = httpx.get(f"{server.http_url}/v2/systemsharedmemory/status").json()
    assert sorted(s["name"] for s in status) == ["a", "b0", "b1", "b2"]
    assert _post(server, "/region/b0/unregister").status_code == 200
    assert _post(server, "/region/c/register", {"key": r.key, "byte_size": 16}).status_code == 200


def test_grpc_register_refusals_are_invalid_argument(server, region, clean):
    from lossd_client.wire import oip_grpc, oip_pb

    r = region(64)
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.SystemSharedMemoryRegister(oip_pb.SystemSharedMemoryRegisterRequest(name="g", key=r.key,
                                                                                     byte_size=65))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "runs past" in err.value.details()
        stub.SystemSharedMemoryRegister(oip_pb.SystemSharedMemoryRegisterRequest(name="g", key=r.key, byte_size=64))
        status = stub.SystemSharedMemoryStatus(oip_pb.SystemSharedMemoryStatusRequest())
        assert dict(status.regions)["g"].byte_size == 64 and dict(status.regions)["g"].key == r.key
        with pytest.raises(grpc.RpcError) as err:
            stub.SystemSharedMemoryUnregister(oip_pb.SystemSharedMemoryUnregisterRequest(name="nope"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_input_in_a_region_and_in_contents_is_refused(server, region, clean):
    """gRPC read the region and dropped the contents unseen; over HTTP region + data was already refused."""
    from lossd_client.wire import oip_grpc, oip_pb

    pred, target = boxes(1, 3)
    r = region(32)
    np.frombuffer(r.mem.buf, np.float32)[:] = np.concatenate([pred.ravel(), target.ravel()])
    assert _post(server, "/region/both/register", {"key": "/" + r.key, "byte_size": 32}).status_code == 200
    inp = oip_pb.ModelInferRequest.InferInputTensor

    def shm(offset):
        return {"shared_memory_region": oip_pb.InferParameter(string_param="both"),
                "shared_memory_byte_size": oip_pb.InferParameter(int64_param=16),
                "shared_memory_offset": oip_pb.InferParameter(int64_param=offset)}

    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        pred_in = inp(name="PRED", datatype="FP32", shape=[1, 4], parameters=shm(0))
        target_in = inp(name="TARGET", datatype="FP32", shape=[1, 4], parameters=shm(16))
        ok = stub.ModelInfer(oip_pb.ModelInferRequest(model_name="ciou", inputs=[pred_in, target_in]), timeout=60)
        np.testing.assert_allclose(np.frombuffer(ok.raw_output_contents[0], "<f4"), ciou_reference(pred, target)[0],
                                   rtol=1e-4)
        both = inp(name="PRED", datatype="FP32", shape=[1, 4], parameters=shm(0),
                   contents=oip_pb.InferTensorContents(fp32_contents=[50, 50, 60, 70]))
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(oip_pb.ModelInferRequest(model_name="ciou", inputs=[both, target_in]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "PRED" in err.value.details() and "not both" in err.value.details()


@pytest.mark.parametrize("writable_by_others", [False, True])
def test_unregistered_mid_call_keeps_the_region_and_refuses_the_output(engine, writable_by_others):
    """In-process: a region unregistered between a call's parse and its write is refused by name, and its
    object stays open (and mapped) until the call lets go. An object only this user can write is mapped and
    float inputs are read in place; one that others can write is copied out (pread), so the client's later
    writes change nothing the call reads."""
    import gc
    import os

    from lossd import oip
    from lossd.shm import SharedMemory

    n = 4
    pred, target = boxes(n, 3)
    mem = shared_memory.SharedMemory("lossd_test_" + uuid.uuid4().hex[:12], create=True, size=2 * n * 16 + n * 4)
    if writable_by_others:
        os.chmod("/dev/shm/" + mem.name, 0o666)
    try:
        np.frombuffer(mem.buf, np.float32)[:8 * n] = np.concatenate([pred.ravel(), target.ravel()])
        table = SharedMemory(2)
        table.register("r", mem.name, 0, 2 * n * 16 + n * 4)
        assert (table.regions["r"].mm is None) == writable_by_others
        req = {"inputs": [_shm_input("PRED", n, "r"), _shm_input("TARGET", n, "r", offset=n * 16)],
               "outputs": [{"name": "LOSS", "parameters": {"shared_memory_region": "r",
                                                          "shared_memory_offset": 2 * n * 16,
                                                          "shared_memory_byte_size": n * 4}}]}
        with table.call() as call_shm:
            call = oip.prepare_infer("ciou", req, memoryview(b""), shm=call_shm)
            assert call.shm_inputs == ("PRED", "TARGET")
            assert oip.shm_input_bytes(call) == (2 * n * 16 if writable_by_others else 0)  # what is copied
            oip.read_shm_inputs(call)
            np.testing.assert_array_equal(call.kwargs["pred"], pred)
            np.frombuffer(mem.buf, np.float32)[:4] = -1
            if writable_by_others:  # the server's own copy
                np.testing.assert_array_equal(call.kwargs["pred"], pred)
            else:  # read in place
                np.testing.assert_array_equal(call.kwargs["pred"][0], [-1, -1, -1, -1])
                np.frombuffer(mem.buf, np.float32)[:4] = pred[0]
            table.unregister("r")
            assert table.status() == []
            region = call_shm.pinned["r"]
            out = engine.evaluate("ciou", call.kwargs["pred"], call.kwargs["target"])
            with pytest.raises(ServiceError) as err:
                oip.finish_infer(call, out)
            assert "unregistered during the call" in err.value.message and err.value.field == "outputs.LOSS"
            assert not region.closed  # still open while the call holds it
            del call, out, err
            gc.collect()
        assert region.closed  # the call let go: the unregistered region's object is closed
    finally:
        mem.close()
        mem.unlink()


def test_an_object_others_can_truncate_gives_an_error_not_a_crash(server, clean):
    """A local client that shrinks the object behind a registered region (ftruncate) while the server uses it
    would kill a server that maps it (SIGBUS). An object that other users can write is never mapped: inputs are
    read with pread, outputs written with pwrite, and a truncated object is a 400 naming the tensor."""
    import os

    n = 1000
    pred, target = boxes(n, 5)
    want_loss, _ = ciou_reference(pred, target)
    name = "lossd_test_" + uuid.uuid4().hex[:12]
    mem = shared_memory.SharedMemory(name, create=True, size=n * 36)
    path = "/dev/shm/" + name
    os.chmod(path, 0o666)
    try:
        np.frombuffer(mem.buf, np.float32)[:8 * n] = np.concatenate([pred.ravel(), target.ravel()])
        mem.close()  # no mapping of our own: the object can be truncated now
        assert _post(server, "/region/trunc/register", {"key": "/" + name, "offset": 0,
                                                         "byte_size": n * 36}).status_code == 200
        inputs = [_shm_input("PRED", n, "trunc"), _shm_input("TARGET", n, "trunc", offset=n * 16)]
        out = [{"name": "LOSS", "parameters": {"shared_memory_region": "trunc", "shared_memory_offset": n * 32,
                                                "shared_memory_byte_size": n * 4}}]
        ok = _infer(server, inputs, out)
        assert ok.status_code == 200, ok.text
        with open(path, "rb") as f:
            f.seek(n * 32)
            np.testing.assert_allclose(np.frombuffer(f.read(n * 4), np.float32), want_loss, rtol=2e-5, atol=2e-6)
        os.truncate(path, n * 20)  # PRED still whole, TARGET cut short
        r = _infer(server, inputs, out)
        assert r.status_code == 400, r.text
        err = r.json()
        assert "truncated" in err["error"] and "inputs.TARGET" in err["error"], err
        os.truncate(path, n * 32)  # the inputs whole, no room left for LOSS
        r = _infer(server, inputs, out)
        assert r.status_code == 400 and "outputs.LOSS" in r.json()["error"] and "truncated" in r.json()["error"]
        os.truncate(path, 0)
        r = _infer(server, inputs, out)
        assert r.status_code == 400 and "inputs.PRED" in r.json()["error"]
        assert httpx.get(f"{server.http_url}/v2/health/live", timeout=10).status_code == 200
    finally:
        os.unlink(path)


def test_remote_peers_are_refused_and_keys_are_required(engine):
    import asyncio

    from fastapi.testclient import TestClient

    from lossd.rest.app import create_app
    from lossd.service import Service
    from lossd.settings import Settings
    from lossd.shm import is_local

    assert is_local("127.0.0.1") and is_local("::1") and is_local("ipv4:127.0.0.1:5000")
    assert is_local("ipv6:[::1]:5000") and is_local("unix:/tmp/x.sock") and is_local(None)
    assert not is_local("10.0.0.2") and not is_local("ipv4:192.168.1.3:1") and not is_local("testclient")
    assert not is_local("ipv6:[2001:db8::1]:5000") and not is_local("remote")

    service = Service(engine, Settings(max_shm_regions=2))
    with pytest.raises(ServiceError) as err:
        service.shm_register("ipv4:10.0.0.2:4000", "a", "/k", 0, 16)
    assert err.value.code == "forbidden"
    req = {"inputs": [_shm_input("PRED", 2, "a"), _shm_input("TARGET", 2, "a")]}
    with pytest.raises(ServiceError) as err:
        asyncio.run(service.infer("ciou", lambda: (req, memoryview(b"")), size=0, peer="10.0.0.2"))
    assert err.value.code == "forbidden"

    # over HTTP: no key -> 401; with a key, TestClient's peer ('testclient') is not on this host -> 403
    with TestClient(create_app(engine=engine, settings=Settings(api_keys=["sekret"]))) as client:
        body = {"key": "/k", "byte_size": 16}
        assert client.post("/v2/systemsharedmemory/region/a/register", json=body).status_code == 401
        assert client.get("/v2/systemsharedmemory/status").status_code == 401
        resp = client.post("/v2/systemsharedmemory/region/a/register", json=body, headers={"x-api-key": "sekret"})
        assert resp.status_code == 403 and "server's host" in resp.json()["error"]
        resp = client.post("/v2/models/ciou/infer", json=req, headers={"x-api-key": "sekret"})
        assert resp.status_code == 403, resp.text


# ------------------------------------------------------------------------------------------ lossd's client
@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_lossd_client_uses_shared_memory_on_the_same_host(server, transport, clean):
    from lossd_client import LossClient

    url = server.http_url if transport == "http" else server.grpc_url
    pred, target = boxes(20_000, 11)  # 640 KB of inputs: over the client's shared-memory threshold
    want_loss, want_grad = ciou_reference(pred, target)
    with LossClient(url) as shm_client, LossClient(url, shared_memory=False) as wire_client:
        by_shm = shm_client.loss("ciou", pred, target)
        assert shm_client.shared_memory_calls == 1
        names = [r["name"] for r in httpx.get(f"{server.http_url}/v2/systemsharedmemory/status").json()]
        assert len(names) == 1 and names[0].startswith("lossd_client_")
        by_wire = wire_client.loss("ciou", pred, target)
        assert wire_client.shared_memory_calls == 0
        np.testing.assert_array_equal(by_shm.loss, by_wire.loss)
        np.testing.assert_array_equal(by_shm.grad, by_wire.grad)
        np.testing.assert_allclose(by_shm.loss, want_loss, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(by_shm.grad, want_grad, rtol=1e-3, atol=1e-5)
        # reductions, float64, no gradient, a larger call that grows the region
        mean = shm_client.loss("ciou", pred, target, reduction="mean")
        assert mean.loss == pytest.approx(float(want_loss.mean()), rel=1e-5)
        np.testing.assert_allclose(mean.grad, want_grad / len(pred), rtol=1e-3, atol=1e-8)
        p64, t64 = pred.astype(np.float64), target.astype(np.float64)
        f64 = shm_client.loss("ciou", p64, t64, return_grad=False)
        assert f64.grad is None and f64.loss.dtype == np.float64
        np.testing.assert_allclose(f64.loss, want_loss, rtol=1e-6)
        big_p, big_t = boxes(100_000, 12)
        big = shm_client.loss("ciou", big_p, big_t)
        np.testing.assert_array_equal(big.loss, wire_client.loss("ciou", big_p, big_t).loss)
        assert shm_client.shared_memory_calls == 4
        # bad input is refused with the same typed error as over the wire
        bad = pred.copy()
        bad[5] = [10, 10, 0, 0]
        from lossd_client import InvalidInputError
        with pytest.raises(InvalidInputError) as err:
            shm_client.loss("ciou", bad, target)
        assert 5 in (err.value.rows or [])
    # closing unregisters the region and removes it
    assert httpx.get(f"{server.http_url}/v2/systemsharedmemory/status").json() == []


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_async_client_uses_shared_memory_too(server, transport, clean):
    import asyncio

    from lossd_client import AsyncLossClient, LossClient

    url = server.http_url if transport == "http" else server.grpc_url
    pred, target = boxes(30_000, 21)

    async def go():
        async with AsyncLossClient(url) as client:
            out = await client.loss("ciou", pred, target, reduction="sum")
            return out, client.shared_memory_calls

    out, calls = asyncio.run(go())
    assert calls == 1
    with LossClient(url, shared_memory=False) as wire:
        want = wire.loss("ciou", pred, target, reduction="sum")
    assert out.loss == want.loss
    np.testing.assert_array_equal(out.grad, want.grad)
    assert httpx.get(f"{server.http_url}/v2/systemsharedmemory/status").json() == []


def test_lossd_client_falls_back_to_the_wire(server, region, clean):
    from lossd_client import LossClient

    r = region(64)
    for i in range(4):  # this server's LOSSD_MAX_SHM_REGIONS: the client's region is refused
        assert _post(server, f"/region/full{i}/register", {"key": r.key, "byte_size": 64}).status_code == 200
    pred, target = boxes(20_000, 13)
    want_loss, _ = ciou_reference(pred, target)
    with LossClient(server.grpc_url) as client:
        out = client.loss("ciou", pred, target)
        out2 = client.loss("ciou", pred, target)
        assert client.shared_memory_calls == 0 and client._shm.enabled is False
    np.testing.assert_allclose(out.loss, want_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out.loss, out2.loss)
    # a remote URL never tries
    assert LossClient("http://10.1.2.3:8000")._shm is None
    assert LossClient("http://127.0.0.1:1,http://127.0.0.1:2")._shm is None


def test_grpc_shared_memory_rpcs_need_a_key_when_keys_are_on():
    """The gRPC interceptor's open set (health, liveness, readiness, metadata) leaves the shared-memory RPCs keyed,
    as REST's keyed router does (checked over HTTP above)."""
    from lossd.grpc_server.server import OIP_SERVICE, ApiKeyInterceptor

    for method in ("SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "SystemSharedMemoryStatus",
                   "ModelInfer"):
        assert not (OIP_SERVICE + method).startswith(ApiKeyInterceptor.OPEN), method


def test_regions_whose_object_is_gone_do_not_hold_the_limit():
    """A client that exits without unregistering leaves a region whose shared-memory object its owner removed:
    when the table is full, such regions make room (live ones never do)."""
    from lossd.shm import SharedMemory

    table = SharedMemory(2)
    keep = shared_memory.SharedMemory("lossd_test_" + uuid.uuid4().hex[:12], create=True, size=64)
    gone = shared_memory.SharedMemory("lossd_test_" + uuid.uuid4().hex[:12], create=True, size=64)
    new = shared_memory.SharedMemory("lossd_test_" + uuid.uuid4().hex[:12], create=True, size=64)
    try:
        table.register("keep", keep.name, 0, 64)
        table.register("gone", gone.name, 0, 64)
        with pytest.raises(ServiceError) as err:
            table.register("new", new.name, 0, 64)
        assert err.value.code == "too_many_regions"
        gone.close()
        gone.unlink()
        table.register("new", new.name, 0, 64)
        assert sorted(r["name"] for r in table.status()) == ["keep", "new"]
        with pytest.raises(ServiceError) as err:  # live regions are never evicted
            table.register("more", new.name, 0, 64)
        assert err.value.code == "too_many_regions"
    finally:
        table.close()
        for m in (keep, new):
            m.close()
            m.unlink()


def test_a_mapped_object_truncated_between_calls_is_an_error_not_a_crash(server, clean):
    """An object only the server's user can write is mapped; a client that shrinks it after registering (here
    between two calls) gets a 400 naming the tensor, instead of killing the server with SIGBUS."""
    import os

    n = 1000
    pred, target = boxes(n, 6)
    mem = shared_memory.SharedMemory("lossd_test_" + uuid.uuid4().hex[:12], create=True, size=n * 36)
    path = "/dev/shm/" + mem.name
    try:
        assert (os.stat(path).st_mode & 0o777) == 0o600  # mapped by the server (its own user's, private)
        np.frombuffer(mem.buf, np.float32)[:8 * n] = np.concatenate([pred.ravel(), target.ravel()])
        mem.close()
        assert _post(server, "/region/mapped/register", {"key": "/" + mem.name, "offset": 0,
                                                          "byte_size": n * 36}).status_code == 200
        inputs = [_shm_input("PRED", n, "mapped"), _shm_input("TARGET", n, "mapped", offset=n * 16)]
        out = [{"name": "LOSS", "parameters": {"shared_memory_region": "mapped", "shared_memory_offset": n * 32,
                                                "shared_memory_byte_size": n * 4}}]
        assert _infer(server, inputs, out).status_code == 200
        os.truncate(path, n * 8)
        r = _infer(server, inputs, out)
        assert r.status_code == 400, r.text
        assert "truncated" in r.json()["error"] and "inputs.PRED" in r.json()["error"]
        assert r.headers["lossd-error-code"] == "region_truncated"
        assert httpx.get(f"{server.http_url}/v2/health/live", timeout=10).status_code == 200
        unknown = _infer(server, [_shm_input("PRED", n, "nope"), _shm_input("TARGET", n, "nope")])
        assert unknown.status_code == 400 and unknown.headers["lossd-error-code"] == "unknown_region"
    finally:
        os.unlink(path)


def test_regions_of_a_killed_client_are_dropped_once_idle(monkeypatch):
    """A client killed before it unregistered leaves a region whose object its owner's exit removed: after
    GONE_IDLE_S without use it is dropped (its mapping freed) by the next register or status, even when the
    table is far from full; a region whose object still exists is kept however long it is idle."""
    from lossd import shm as shm_mod

    table = shm_mod.SharedMemory(8)
    live = shared_memory.SharedMemory("lossd_test_" + uuid.uuid4().hex[:12], create=True, size=64)
    gone = shared_memory.SharedMemory("lossd_test_" + uuid.uuid4().hex[:12], create=True, size=64)
    try:
        table.register("live", live.name, 0, 64)
        table.register("gone", gone.name, 0, 64)
        region = table.regions["gone"]
        gone.close()
        gone.unlink()
        assert sorted(r["name"] for r in table.status()) == ["gone", "live"]  # used just now: kept
        clock = [shm_mod.time.monotonic() + table.GONE_IDLE_S + 1]
        monkeypatch.setattr(shm_mod.time, "monotonic", lambda: clock[0])
        assert [r["name"] for r in table.status()] == ["live"]
        assert region.closed
    finally:
        table.close()
        live.close()
        live.unlink()
