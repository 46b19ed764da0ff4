"""gRPC against a real `lossd serve`: LossService, the OIP GRPCInferenceService, health, reflection, shutdown."""

import signal

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lossd_client.wire import from_tensor, to_param, to_tensor
from lossd_client.wire import oip_pb as oip
from lossd_client.wire import oip_grpc
from lossd_client.wire import pb
from lossd_client.wire import pb_grpc

from ..conftest import start_server

PRED = np.array([[0, 0, 10, 10], [5, 5, 15, 20], [2, 3, 4, 9]], dtype=np.float32)
TARGET = np.array([[1, 1, 11, 11], [5, 5, 15, 15], [2, 2, 5, 8]], dtype=np.float32)


@pytest.fixture(scope="module")
def channel(live_server):
    ch = grpc.insecure_channel(live_server.grpc_target)
    yield ch
    ch.close()


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value


def test_evaluate(channel, engine):
    stub = pb_grpc.LossServiceStub(channel)
    resp = stub.Evaluate(pb.EvaluateRequest(loss="ciou", pred=to_tensor(PRED), target=to_tensor(TARGET),
                                            request_id="a1"))
    ref = engine.evaluate("ciou", PRED, TARGET)
    np.testing.assert_allclose(from_tensor(resp.loss, "loss"), ref.loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(from_tensor(resp.grad, "grad"), ref.grad.numpy(), rtol=1e-6)
    assert resp.request_id == "a1" and resp.loss.dtype == pb.DTYPE_FLOAT32


def test_evaluate_options(channel, engine):
    stub = pb_grpc.LossServiceStub(channel)
    xywh = np.concatenate([PRED[:, :2], PRED[:, 2:] - PRED[:, :2]], 1).astype(np.float64)
    txywh = np.concatenate([TARGET[:, :2], TARGET[:, 2:] - TARGET[:, :2]], 1).astype(np.float64)
    req = pb.EvaluateRequest(loss="alpha_iou", pred=to_tensor(xywh), target=to_tensor(txywh), box_format="xywh",
                             reduction="sum", weights=to_tensor(np.array([1.0, 0.5, 2.0])),
                             params={"alpha": to_param(2), "penalty": to_param("diou")}, typed_output=True)
    resp = stub.Evaluate(req)
    ref = engine.evaluate("alpha_iou", xywh, txywh, box_format="xywh", reduction="sum", weights=[1.0, 0.5, 2.0],
                          params={"alpha": 2, "penalty": "diou"})
    assert resp.loss.WhichOneof("data") == "doubles" and list(resp.loss.shape) == []
    assert from_tensor(resp.loss, "loss") == pytest.approx(ref.loss.item(), rel=1e-12)
    np.testing.assert_allclose(from_tensor(resp.grad, "grad"), ref.grad.numpy(), rtol=1e-12, atol=1e-15)
    nograd = stub.Evaluate(pb.EvaluateRequest(loss="giou", pred=to_tensor(PRED), target=to_tensor(TARGET),
                                              return_grad=False))
    assert not nograd.HasField("grad")
    ce = stub.Evaluate(pb.EvaluateRequest(
        loss="cross_entropy", pred=to_tensor(np.array([[2.0, 0.5], [0.0, 1.0]], np.float32)),
        target=to_tensor(np.array([0, 1], np.int64)), params={"class_weights": to_param([1.0, 3.0])}))
    assert from_tensor(ce.grad, "grad").shape == (2, 2)


def test_evaluate_errors(channel):
    stub = pb_grpc.LossServiceStub(channel)
    bad = PRED.copy()
    bad[1, 2] = 0  # x2 < x1
    err = rpc_error(stub.Evaluate, pb.EvaluateRequest(loss="giou", pred=to_tensor(bad), target=to_tensor(TARGET)))
    md = dict(err.trailing_metadata())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "row 1" in err.details()
    assert md["lossd-error-code"] == "inverted_box" and md["lossd-error-field"] == "pred"
    assert md["lossd-error-rows"] == "1"
    err = rpc_error(stub.Evaluate, pb.EvaluateRequest(loss="nope", pred=to_tensor(PRED), target=to_tensor(TARGET)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    lying = to_tensor(PRED)
    lying.raw = lying.raw[:-4]
    err = rpc_error(stub.Evaluate, pb.EvaluateRequest(loss="giou", pred=lying, target=to_tensor(TARGET)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "do not match shape" in err.details()
    err = rpc_error(stub.Evaluate, pb.EvaluateRequest(loss="giou", target=to_tensor(TARGET)))
    assert "pred is missing" in err.details()
    err = rpc_error(stub.Evaluate, pb.EvaluateRequest(loss="giou", pred=to_tensor(PRED), target=to_tensor(TARGET),
                                                      params={"eps": to_param(3)}))
    assert dict(err.trailing_metadata())["lossd-error-code"] == "param_out_of_range"
    nan = PRED.copy()
    nan[2, 0] = np.nan
    err = rpc_error(stub.Evaluate, pb.EvaluateRequest(loss="giou", pred=to_tensor(nan), target=to_tensor(TARGET)))
    assert dict(err.trailing_metadata())["lossd-error-code"] == "non_finite"
    for dtype in (pb.DTYPE_FLOAT16, pb.DTYPE_INT64, 77):  # a compute dtype the engine does not have is refused
        err = rpc_error(stub.Evaluate, pb.EvaluateRequest(loss="giou", pred=to_tensor(PRED), target=to_tensor(TARGET),
                                                          compute_dtype=dtype))
        md = dict(err.trailing_metadata())
        assert md["lossd-error-code"] == "unknown_dtype" and md["lossd-error-field"] == "compute_dtype", md
    # a malformed message (not a valid protobuf encoding) is the client's fault: INVALID_ARGUMENT, and the server
    # carries on
    raw = channel.unary_unary("/lossd.v1.LossService/Evaluate", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    err = rpc_error(raw, b"\xff\xff\xff\xff\x0f")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in err.details()
    assert stub.Evaluate(pb.EvaluateRequest(loss="giou", pred=to_tensor(PRED), target=to_tensor(TARGET)))


def test_metric_and_catalog(channel, engine):
    stub = pb_grpc.LossServiceStub(channel)
    resp = stub.Metric(pb.MetricRequest(metric="giou", boxes1=to_tensor(PRED), boxes2=to_tensor(TARGET[:2]),
                                        pairwise=True))
    np.testing.assert_allclose(from_tensor(resp.values, "values"),
                               engine.metric("giou", PRED, TARGET[:2], pairwise=True).numpy(), rtol=1e-6)
    err = rpc_error(stub.Metric, pb.MetricRequest(metric="giou", boxes1=to_tensor(PRED), boxes2=to_tensor(PRED[:1])))
    assert dict(err.trailing_metadata())["lossd-error-code"] == "length_mismatch"
    cat = stub.ListLosses(pb.ListLossesRequest())
    names = {e.name for e in cat.losses}
    assert names == {e["name"] for e in engine.losses()}
    ciou = next(e for e in cat.losses if e.name == "ciou")
    alpha = next(p for p in ciou.params if p.name == "alpha_rule")
    assert alpha.default_value.text == "torchvision" and list(alpha.choices) == ["torchvision", "mmdet", "attached"]
    assert {m.name for m in cat.metrics} == {"iou", "giou", "diou", "ciou", "eiou", "siou", "nwd"}
    # the same catalog facts as GET /v1/losses: weighted means and exclusive bounds
    by_name = {e.name: e for e in cat.losses}
    assert by_name["cross_entropy"].weighted_mean and not by_name["ciou"].weighted_mean
    dice_smooth = next(p for p in by_name["dice"].params if p.name == "smooth")
    assert dice_smooth.min_exclusive and dice_smooth.min == 0.0
    assert not next(p for p in ciou.params if p.name == "eps").min_exclusive


def test_stream_answers_in_order_with_errors_in_place(channel, engine):
    stub = pb_grpc.LossServiceStub(channel)
    bad = PRED.copy()
    bad[0, 3] = -5
    reqs = [pb.EvaluateRequest(loss="diou", pred=to_tensor(PRED * (i + 1)), target=to_tensor(TARGET * (i + 1)),
                               request_id=str(i)) for i in range(5)]
    reqs[2] = pb.EvaluateRequest(loss="diou", pred=to_tensor(bad), target=to_tensor(TARGET), request_id="2")
    answers = list(stub.EvaluateStream(pb.EvaluateStreamRequest(request=r) for r in reqs))
    assert len(answers) == 5
    assert answers[2].error.code == "inverted_box" and list(answers[2].error.rows) == [0]
    for i in (0, 1, 3, 4):
        assert answers[i].response.request_id == str(i)
        ref = engine.evaluate("diou", PRED * (i + 1), TARGET * (i + 1))
        np.testing.assert_allclose(from_tensor(answers[i].response.loss, "loss"), ref.loss.numpy(), rtol=1e-6)


def test_deadline_is_honoured(channel):
    stub = pb_grpc.LossServiceStub(channel)
    g = np.random.default_rng(0)
    a = g.random((3000, 4), dtype=np.float32) * 100
    a[:, 2:] += a[:, :2] + 1
    req = pb.MetricRequest(metric="ciou", boxes1=to_tensor(a), boxes2=to_tensor(a), pairwise=True)
    err = rpc_error(stub.Metric, req, timeout=0.001)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_open_inference_protocol_over_grpc(channel, engine):
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert meta.name == "lossd" and "binary_tensor_data" in meta.extensions
    assert stub.ModelReady(oip.ModelReadyRequest(name="ciou")).ready
    mm = stub.ModelMetadata(oip.ModelMetadataRequest(name="ciou"))
    assert [i.name for i in mm.inputs] == ["PRED", "TARGET", "WEIGHTS"] and list(mm.inputs[0].shape) == [-1, 4]
    assert rpc_error(stub.ModelMetadata, oip.ModelMetadataRequest(name="nope")).code() == grpc.StatusCode.NOT_FOUND
    inp = oip.ModelInferRequest.InferInputTensor
    req = oip.ModelInferRequest(model_name="siou", id="x", inputs=[
        inp(name="PRED", datatype="FP32", shape=[3, 4]), inp(name="TARGET", datatype="FP32", shape=[3, 4])],
        raw_input_contents=[PRED.tobytes(), TARGET.tobytes()],
        parameters={"theta": oip.InferParameter(double_param=2.0)})
    resp = stub.ModelInfer(req)
    out = {o.name: np.frombuffer(raw, "<f4").reshape(o.shape) for o, raw in zip(resp.outputs,
                                                                                  resp.raw_output_contents)}
    ref = engine.evaluate("siou", PRED, TARGET, params={"theta": 2.0})
    np.testing.assert_allclose(out["LOSS"], ref.loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["GRAD"], ref.grad.numpy(), rtol=1e-6)
    assert resp.id == "x" and resp.model_name == "siou"
    typed = oip.ModelInferRequest(model_name="giou", inputs=[
        inp(name="PRED", datatype="FP32", shape=[3, 4], contents=oip.InferTensorContents(fp32_contents=PRED.ravel())),
        inp(name="TARGET", datatype="FP32", shape=[3, 4],
            contents=oip.InferTensorContents(fp32_contents=TARGET.ravel()))],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="LOSS")])
    resp = stub.ModelInfer(typed)
    assert [o.name for o in resp.outputs] == ["LOSS"]
    np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], "<f4"),
                               engine.evaluate("giou", PRED, TARGET).loss.numpy(), rtol=1e-6)
    lying = oip.ModelInferRequest(model_name="giou", inputs=list(req.inputs),
                                  raw_input_contents=[PRED.tobytes()[:-4], TARGET.tobytes()])
    err = rpc_error(stub.ModelInfer, lying)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not match shape" in err.details()
    short = oip.ModelInferRequest(model_name="giou", inputs=list(req.inputs), raw_input_contents=[PRED.tobytes()])
    assert rpc_error(stub.ModelInfer, short).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_large_model_infer(channel, engine):
    """Over SMALL_MESSAGE: raw_input_contents are read in place of the received bytes; the answer is the same."""
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    g = np.random.default_rng(5)
    pred = (g.random((20_000, 4)) * 100).astype(np.float32)
    pred[:, 2:] += pred[:, :2] + 1
    target = pred + g.normal(size=pred.shape).astype(np.float32)
    target[:, 2:] = np.maximum(target[:, 2:], target[:, :2] + 0.5)
    inp = oip.ModelInferRequest.InferInputTensor
    inputs = [inp(name="PRED", datatype="FP32", shape=[20_000, 4]),
              inp(name="TARGET", datatype="FP32", shape=[20_000, 4])]
    resp = stub.ModelInfer(oip.ModelInferRequest(model_name="ciou", id="big", inputs=inputs,
                                                 raw_input_contents=[pred.tobytes(), target.tobytes()]))
    out = {o.name: np.frombuffer(raw, "<f4").reshape(o.shape) for o, raw in zip(resp.outputs,
                                                                                  resp.raw_output_contents)}
    ref = engine.evaluate("ciou", pred, target)
    np.testing.assert_allclose(out["LOSS"], ref.loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["GRAD"], ref.grad.numpy(), rtol=1e-6, atol=1e-12)
    assert resp.id == "big"
    bad = pred.copy()
    bad[12_345] = [5, 5, 1, 1]  # inverted
    err = rpc_error(stub.ModelInfer, oip.ModelInferRequest(model_name="ciou", inputs=inputs,
                                                           raw_input_contents=[bad.tobytes(), target.tobytes()]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "12345" in err.details()
    one = oip.ModelInferRequest(model_name="ciou", inputs=inputs, raw_input_contents=[pred.tobytes()])
    assert rpc_error(stub.ModelInfer, one).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lossd.v1.LossService", "inference.GRPCInferenceService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    names = {s.name for s in resp.list_services_response.service}
    assert {"lossd.v1.LossService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_sigterm_drains_in_flight_stream():
    server = start_server()
    try:
        ch = grpc.insecure_channel(server.grpc_target)
        stub = pb_grpc.LossServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        import queue
        q: queue.Queue = queue.Queue()

        def requests():
            while (item := q.get()) is not None:
                yield item

        req = pb.EvaluateStreamRequest(request=pb.EvaluateRequest(loss="giou", pred=to_tensor(PRED),
                                                                  target=to_tensor(TARGET)))
        answers = stub.EvaluateStream(requests())
        q.put(req)
        assert next(answers).response.loss.shape == [3]  # the call is in flight
        server.proc.send_signal(signal.SIGTERM)
        # readiness drops: health turns NOT_SERVING (or new calls are refused once the server stops taking them)
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                break
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
        q.put(req)  # the in-flight stream still answers after SIGTERM
        assert next(answers).response.loss.shape == [3]
        q.put(None)
        assert list(answers) == []
        # uvicorn re-raises the SIGTERM it handled once the shutdown has run, so the exit status is -15
        assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "lossd stopped: in-flight calls drained" in server.log()
        ch.close()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
