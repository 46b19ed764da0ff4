"""Open Inference Protocol requests that used to be answered wrongly without an error, against a real
`lossd serve`: an input with two data sources, outputs asked for in ways lossd cannot answer, parameters that are
not booleans, and ModelReady for a model that does not exist (Triton: ready false, not an error)."""

import json

import grpc
import httpx
import numpy as np
import pytest
from lossd_client.wire import oip_grpc
from lossd_client.wire import oip_pb as oip

PRED = np.array([[0, 0, 10, 10]], dtype=np.float32)
TARGET = np.array([[1, 1, 11, 11]], dtype=np.float32)
OTHER = np.array([[50, 50, 60, 70]], dtype=np.float32)  # a different box: which source was read shows in the loss


def _json_input(name: str, arr: np.ndarray, **extra) -> dict:
    return {"name": name, "shape": list(arr.shape), "datatype": "FP32", "data": arr.reshape(-1).tolist(), **extra}


def _post(url: str, body: dict, blob: bytes = b"") -> httpx.Response:
    head = json.dumps(body).encode()
    headers = {"content-type": "application/octet-stream" if blob else "application/json"}
    if blob:
        headers["Inference-Header-Content-Length"] = str(len(head))
    return httpx.post(f"{url}/v2/models/ciou/infer", content=head + blob, headers=headers, timeout=60)


def _refused(resp: httpx.Response, *words: str) -> str:
    assert resp.status_code == 400, (resp.status_code, resp.text)
    message = resp.json()["error"]
    for word in words:
        assert word in message, (word, message)
    return message


def test_http_input_with_data_and_binary_part_is_refused(live_server):
    # PRED's JSON data says one box, its binary part another: lossd read the binary part and dropped the data
    body = {"inputs": [_json_input("PRED", OTHER, parameters={"binary_data_size": 16}), _json_input("TARGET", TARGET)]}
    resp = _post(live_server.http_url, body, PRED.tobytes())
    _refused(resp, "PRED", "data", "binary_data_size")
    assert resp.headers["lossd-error-field"] == "inputs.PRED"
    # each source alone is answered (the refusal is about the pair, not either source)
    binary_pred = {"name": "PRED", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
    alone = {"inputs": [binary_pred, _json_input("TARGET", TARGET)]}
    assert _post(live_server.http_url, alone, PRED.tobytes()).status_code == 200
    assert _post(live_server.http_url, {"inputs": [_json_input("PRED", PRED), _json_input("TARGET", TARGET)]}
                 ).status_code == 200


@pytest.fixture(scope="module")
def oip_stub(live_server):
    ch = grpc.insecure_channel(live_server.grpc_target)
    yield oip_grpc.GRPCInferenceServiceStub(ch)
    ch.close()


def test_grpc_input_with_contents_and_raw_input_contents_is_refused(oip_stub):
    inp = oip.ModelInferRequest.InferInputTensor
    req = oip.ModelInferRequest(model_name="ciou", inputs=[
        inp(name="PRED", datatype="FP32", shape=[1, 4], contents=oip.InferTensorContents(fp32_contents=OTHER.ravel())),
        inp(name="TARGET", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[PRED.tobytes(), TARGET.tobytes()])
    with pytest.raises(grpc.RpcError) as info:
        oip_stub.ModelInfer(req, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "PRED" in info.value.details() and "contents" in info.value.details()
    assert dict(info.value.trailing_metadata())["lossd-error-field"] == "inputs.PRED"
    # raw alone and contents alone are answered, and agree with each other
    raw = oip.ModelInferRequest(model_name="ciou", inputs=[inp(name="PRED", datatype="FP32", shape=[1, 4]),
                                                          inp(name="TARGET", datatype="FP32", shape=[1, 4])],
                                raw_input_contents=[PRED.tobytes(), TARGET.tobytes()])
    typed = oip.ModelInferRequest(model_name="ciou", inputs=[
        inp(name=n, datatype="FP32", shape=[1, 4], contents=oip.InferTensorContents(fp32_contents=a.ravel()))
        for n, a in (("PRED", PRED), ("TARGET", TARGET))])
    losses = [np.frombuffer(oip_stub.ModelInfer(r, timeout=60).raw_output_contents[0], "<f4") for r in (raw, typed)]
    # hand value: IoU 81/119, rho^2 = 2, c^2 = 242, aspect ratios equal -> 1 - 81/119 + 2/242
    np.testing.assert_allclose(losses[0], [1 - 81 / 119 + 2 / 242], rtol=1e-6)
    np.testing.assert_allclose(losses[1], losses[0], rtol=0)


OK_INPUTS = [_json_input("PRED", PRED), _json_input("TARGET", TARGET)]


def test_grad_asked_for_with_return_grad_false_is_refused(live_server):
    resp = _post(live_server.http_url, {"inputs": OK_INPUTS, "outputs": [{"name": "GRAD"}],
                                        "parameters": {"return_grad": False}})
    _refused(resp, "GRAD", "return_grad")
    # without GRAD among the outputs, return_grad false is fine and only LOSS comes back
    resp = _post(live_server.http_url, {"inputs": OK_INPUTS, "outputs": [{"name": "LOSS"}],
                                        "parameters": {"return_grad": False}})
    assert resp.status_code == 200 and [o["name"] for o in resp.json()["outputs"]] == ["LOSS"]


@pytest.mark.parametrize("where, body, words", [
    ("output", {"outputs": [{"name": "LOSS", "parameters": {"binary_data": "yes"}}]},
     ("outputs.LOSS.parameters.binary_data", "true or false")),
    ("output", {"outputs": [{"name": "LOSS", "parameters": {"binary_data": 1}}]},
     ("outputs.LOSS.parameters.binary_data", "true or false")),
    ("request", {"parameters": {"binary_data_output": "false"}}, ("parameters.binary_data_output", "true or false")),
    ("classification", {"outputs": [{"name": "LOSS", "parameters": {"classification": 2}}]},
     ("LOSS", "classification")),
])
def test_output_parameters_lossd_cannot_honour_are_refused(live_server, where, body, words):
    resp = _post(live_server.http_url, {"inputs": OK_INPUTS, **body})
    _refused(resp, *words)


def test_grpc_output_classification_is_refused(oip_stub):
    inp = oip.ModelInferRequest.InferInputTensor
    req = oip.ModelInferRequest(model_name="ciou", inputs=[
        inp(name="PRED", datatype="FP32", shape=[1, 4]), inp(name="TARGET", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[PRED.tobytes(), TARGET.tobytes()],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(
            name="LOSS", parameters={"classification": oip.InferParameter(int64_param=2)})])
    with pytest.raises(grpc.RpcError) as info:
        oip_stub.ModelInfer(req, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "classification" in info.value.details()


def test_model_ready_for_an_unknown_model_is_false_on_both_transports(live_server, oip_stub):
    # Triton (server.cc ModelIsReady) answers ready=false with status OK over gRPC, and a 4xx over HTTP
    assert oip_stub.ModelReady(oip.ModelReadyRequest(name="nope"), timeout=30).ready is False
    assert oip_stub.ModelReady(oip.ModelReadyRequest(name="ciou", version="7"), timeout=30).ready is False
    assert oip_stub.ModelReady(oip.ModelReadyRequest(name="ciou"), timeout=30).ready is True
    resp = httpx.get(f"{live_server.http_url}/v2/models/nope/ready", timeout=30)
    assert 400 <= resp.status_code < 500
    assert httpx.get(f"{live_server.http_url}/v2/models/ciou/ready", timeout=30).status_code == 200


def test_bool_datatype_inputs_are_refused(live_server):
    """datatype BOOL let true/false in as box coordinates (read as 1 and 0) on every path; the models take numbers."""
    body = {"inputs": [{"name": "PRED", "shape": [1, 4], "datatype": "BOOL", "data": [True, False, True, True]},
                       _json_input("TARGET", TARGET)]}
    _refused(_post(live_server.http_url, body), "input PRED", "BOOL")
    blob = np.array([True, False, True, True]).tobytes() + TARGET.tobytes()
    body = {"inputs": [{"name": "PRED", "shape": [1, 4], "datatype": "BOOL", "parameters": {"binary_data_size": 4}},
                       {"name": "TARGET", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}
    _refused(_post(live_server.http_url, body, blob), "input PRED", "BOOL")
