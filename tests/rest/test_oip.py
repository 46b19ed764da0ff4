"""The Open Inference Protocol over HTTP: metadata, health, JSON and binary tensors, and their errors."""

import json

import numpy as np
import pytest

from lossd.engine import LOSSES

from .conftest import binary_request, parse_binary_response

PRED = np.array([[0, 0, 10, 10], [5, 5, 15, 20], [2, 3, 4, 9]], dtype=np.float32)
TARGET = np.array([[1, 1, 11, 11], [5, 5, 15, 15], [2, 2, 5, 8]], dtype=np.float32)


def oip_error(resp, status: int, contains: str) -> str:
    assert resp.status_code == status, resp.text
    msg = resp.json()["error"]
    assert isinstance(msg, str) and contains in msg, msg
    return msg


def test_server_and_model_metadata(client):
    meta = client.get("/v2").json()
    assert meta["name"] == "lossd" and "binary_tensor_data" in meta["extensions"]
    assert "system_shared_memory" in meta["extensions"]
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    for name in LOSSES:
        m = client.get(f"/v2/models/{name}").json()
        assert m["name"] == name and [i["name"] for i in m["inputs"]] == ["PRED", "TARGET", "WEIGHTS"]
        assert [o["name"] for o in m["outputs"]] == ["LOSS", "GRAD"]
    assert client.get("/v2/models/ciou").json()["inputs"][0]["shape"] == [-1, 4]
    assert client.get("/v2/models/ciou/versions/1").status_code == 200
    assert client.get("/v2/models/ciou/ready").json() == {"name": "ciou", "ready": True}
    oip_error(client.get("/v2/models/nope"), 404, "unknown loss")
    oip_error(client.get("/v2/models/nope/ready"), 404, "unknown loss")
    oip_error(client.get("/v2/models/ciou/versions/7"), 404, "version")


def test_infer_json(client, engine):
    body = {"id": "r1", "parameters": {"box_format": "xyxy"},
            "inputs": [{"name": "PRED", "shape": [3, 4], "datatype": "FP32", "data": PRED.tolist()},  # nested
                       {"name": "TARGET", "shape": [3, 4], "datatype": "FP32", "data": TARGET.ravel().tolist()}]}
    resp = client.post("/v2/models/ciou/infer", json=body).json()
    assert resp["model_name"] == "ciou" and resp["id"] == "r1"
    out = {o["name"]: o for o in resp["outputs"]}
    ref = engine.evaluate("ciou", PRED, TARGET)
    assert out["LOSS"]["shape"] == [3] and out["GRAD"]["shape"] == [3, 4] and out["GRAD"]["datatype"] == "FP32"
    np.testing.assert_allclose(out["LOSS"]["data"], ref.loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.reshape(out["GRAD"]["data"], (3, 4)), ref.grad.numpy(), rtol=1e-6)


def test_infer_binary_roundtrip(client, engine):
    w = np.array([1.0, 0.5, 2.0], dtype=np.float32)
    body, headers = binary_request({"PRED": PRED, "TARGET": TARGET, "WEIGHTS": w},
                                   {"binary_data_output": True, "reduction": "sum", "eps": 1e-6})
    resp = client.post("/v2/models/diou/infer", content=body, headers=headers)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/octet-stream"
    out = parse_binary_response(resp)
    ref = engine.evaluate("diou", PRED, TARGET, weights=w, reduction="sum", params={"eps": 1e-6})
    np.testing.assert_allclose(out["LOSS"], [ref.loss.item()], rtol=1e-6)
    np.testing.assert_allclose(out["GRAD"], ref.grad.numpy(), rtol=1e-6)


def test_infer_fp64_and_selected_binary_output(client, engine):
    body, headers = binary_request({"PRED": PRED.astype(np.float64), "TARGET": TARGET.astype(np.float64)},
                                   outputs=[{"name": "GRAD", "parameters": {"binary_data": True}}])
    resp = client.post("/v2/models/siou/infer", content=body, headers=headers)
    out = parse_binary_response(resp)
    assert list(out) == ["GRAD"] and out["GRAD"].dtype == np.float64
    ref = engine.evaluate("siou", PRED.astype(np.float64), TARGET.astype(np.float64))
    np.testing.assert_allclose(out["GRAD"], ref.grad.numpy(), rtol=1e-12)


def test_infer_classification_with_int_targets(client):
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    body, headers = binary_request({"PRED": logits, "TARGET": np.array([0, 2], dtype=np.int64)},
                                   {"label_smoothing": 0.1, "binary_data_output": True})
    out = parse_binary_response(client.post("/v2/models/cross_entropy/infer", content=body, headers=headers))
    assert out["LOSS"].shape == (2,) and out["GRAD"].shape == (2, 3)


def test_empty_batch_over_oip(client):
    body, headers = binary_request({"PRED": np.zeros((0, 4), np.float32), "TARGET": np.zeros((0, 4), np.float32)},
                                   {"binary_data_output": True})
    out = parse_binary_response(client.post("/v2/models/giou/infer", content=body, headers=headers))
    assert out["LOSS"].shape == (0,) and out["GRAD"].shape == (0, 4)


def _tamper(body: bytes, headers: dict, fn) -> tuple[bytes, dict]:
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    fn(head)
    new = json.dumps(head).encode()
    return new + body[n:], dict(headers, **{"Inference-Header-Content-Length": str(len(new))})


def test_binary_sizes_that_do_not_add_up(client):
    body, headers = binary_request({"PRED": PRED, "TARGET": TARGET})
    resp = client.post("/v2/models/giou/infer", content=body[:-4], headers=headers)
    oip_error(resp, 400, "needs 48 bytes")
    resp = client.post("/v2/models/giou/infer", content=body + b"\0" * 8, headers=headers)
    oip_error(resp, 400, "add up to 96")

    def lie(head):
        head["inputs"][0]["parameters"]["binary_data_size"] = 40
    oip_error(client.post("/v2/models/giou/infer", content=b"".join([_tamper(body, headers, lie)[0]]),
                          headers=_tamper(body, headers, lie)[1]), 400, "does not match shape")
    oip_error(client.post("/v2/models/giou/infer", content=body, headers=dict(headers, **{
        "Inference-Header-Content-Length": "99999"})), 400, "no larger than the body")
    oip_error(client.post("/v2/models/giou/infer", content=body, headers=dict(headers, **{
        "Inference-Header-Content-Length": "abc"})), 400, "whole number")
    oip_error(client.post("/v2/models/giou/infer", content=body, headers=dict(headers, **{
        "Inference-Header-Content-Length": "10"})), 400, "not valid JSON")


@pytest.mark.parametrize("mutate,status,text", [
    (lambda b: b["inputs"].pop(), 400, "missing input TARGET"),
    (lambda b: b["inputs"].append({"name": "EXTRA", "shape": [1], "datatype": "FP32", "data": [1]}), 400,
     "unknown input"),
    (lambda b: b["inputs"][0].update(datatype="FP8"), 400, "datatype"),
    (lambda b: b["inputs"][0].update(shape=[3, 5]), 400, "needs 15"),
    (lambda b: b["inputs"][0].update(shape=[-3, 4]), 400, "non-negative"),
    (lambda b: b["inputs"][0].pop("data"), 400, "neither"),
    (lambda b: b["inputs"][0].update(data=[[1, 2, 3, 4], [1, 2, "a", 4], [1, 2, 3, 4]]), 400,
     "not a number (a string, null or object) at row 1"),
    (lambda b: b["inputs"][0].update(data=[1, 2, 3, 4, 1, 2, 3, 4, None, 2, 3, 4]), 400,
     "not a number (a string, null or object) at row 2"),
    (lambda b: b["inputs"][0].update(data=[[{"x": 1}] * 4] * 3), 400, "at rows 0, 1, 2"),
    (lambda b: b.update(outputs=[{"name": "SCORE"}]), 400, "unknown output"),
    (lambda b: b.update(parameters={"return_grad": "yes"}), 400, "return_grad"),
    (lambda b: b.update(parameters={"box_format": "yolo"}), 400, "box_format"),
    (lambda b: b.update(parameters={"gamma": 2}), 400, "no parameter 'gamma'"),
    (lambda b: b["inputs"][0].update(data=[[1, 0, 0, 1]] * 3), 400, "rows 0, 1, 2"),
    (lambda b: b.pop("inputs"), 400, "'inputs' list"),
])
def test_infer_errors(client, mutate, status, text):
    body = {"inputs": [{"name": "PRED", "shape": [3, 4], "datatype": "FP32", "data": PRED.tolist()},
                       {"name": "TARGET", "shape": [3, 4], "datatype": "FP32", "data": TARGET.tolist()}]}
    mutate(body)
    oip_error(client.post("/v2/models/giou/infer", json=body), status, text)


def test_infer_nan_names_rows_and_bad_json(client):
    raw = ('{"inputs": [{"name": "PRED", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, NaN, 1]},'
           '{"name": "TARGET", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 1, 1]}]}')
    oip_error(client.post("/v2/models/giou/infer", content=raw), 400, "NaN or inf at row 0")
    oip_error(client.post("/v2/models/giou/infer", content=b"\xff\xfe"), 400, "the request body is not valid JSON")
    # a shape error names the tensor in lossd-error-field too
    body = {"inputs": [{"name": "PRED", "shape": [3, 5], "datatype": "FP32", "data": [0] * 12},
                       {"name": "TARGET", "shape": [3, 4], "datatype": "FP32", "data": [0] * 12}]}
    resp = client.post("/v2/models/giou/infer", json=body)
    assert resp.status_code == 400 and resp.headers["lossd-error-field"] == "inputs.PRED"
    oip_error(client.post("/v2/models/nope/infer", json={"inputs": []}), 404, "unknown loss")


def test_shared_memory_off_is_not_listed_and_refuses_registering(make_client):
    """LOSSD_MAX_SHM_REGIONS=0 turns the extension off: /v2 does not list it (it did), and registering says that
    shared memory is off rather than that 0 regions are held."""
    from lossd.errors import ServiceError
    from lossd.shm import SharedMemory

    off = make_client(max_shm_regions=0)
    meta = off.get("/v2").json()
    assert "system_shared_memory" not in meta["extensions"] and "binary_tensor_data" in meta["extensions"]
    with pytest.raises(ServiceError) as err:
        SharedMemory(0).register("r", "/lossd_never_made", 0, 16)
    assert err.value.code == "too_many_regions" and "shared memory is off" in str(err.value)
