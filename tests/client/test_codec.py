"""The hand-written wire encoders against protobuf itself: the bytes must parse as the message protobuf would
have built, for every dtype, shape and field the client and server send."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lossd_client._codec import (_varint, encode_evaluate_request, encode_evaluate_response, from_tensor,
                                 oip_binary_request, oip_binary_response, to_param, to_tensor, wrap_field)
from lossd_client._proto.lossd.v1 import lossd_pb2 as pb

DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32]


def reference_request(name, pred, target, weights, **kw) -> pb.EvaluateRequest:
    req = pb.EvaluateRequest(loss=name, pred=to_tensor(pred), target=to_tensor(target), box_format=kw["box_format"],
                             reduction=kw["reduction"], return_grad=kw["return_grad"],
                             params={k: to_param(v) for k, v in kw["params"].items()},
                             request_id=kw.get("request_id", ""))
    if weights is not None:
        req.weights.CopyFrom(to_tensor(weights))
    return req


@given(n=st.sampled_from([0, 1, 3, 1000]), width=st.sampled_from([4, 5]), dtype=st.sampled_from(DTYPES),
       with_weights=st.booleans(), return_grad=st.booleans(), int_target=st.booleans(),
       params=st.dictionaries(st.sampled_from(["eps", "mode", "flag", "levels"]),
                              st.one_of(st.floats(allow_nan=False), st.text(max_size=5), st.booleans(),
                                        st.lists(st.floats(allow_nan=False), max_size=3)), max_size=3))
@settings(max_examples=150, deadline=None)
def test_request_parses_as_protobufs_own(n, width, dtype, with_weights, return_grad, int_target, params):
    g = np.random.default_rng(n)
    pred = (g.random((n, width)) * 100).astype(dtype)
    target = g.integers(0, 5, n).astype(np.int64) if int_target else (g.random((n, 4)) * 100).astype(dtype)
    weights = g.random(n).astype(dtype) if with_weights else None
    kw = dict(box_format="cxcywh", reduction="sum", params=params, return_grad=return_grad, request_id="r-1")
    encoded = encode_evaluate_request("ciou", pred, target, weights, **kw)
    parsed = pb.EvaluateRequest.FromString(encoded)
    assert parsed == reference_request("ciou", pred, target, weights, **kw)
    np.testing.assert_array_equal(from_tensor(parsed.pred, "pred"), pred)
    assert parsed.HasField("return_grad")  # optional field: False must still be sent


def test_request_from_views_and_foreign_byte_order():
    base = np.arange(48, dtype=np.float32).reshape(12, 4)
    strided, big = base[::3], base.astype(">f8")
    encoded = encode_evaluate_request("giou", strided, big, None, box_format="xyxy", reduction="none", params={},
                                      return_grad=True)
    parsed = pb.EvaluateRequest.FromString(encoded)
    np.testing.assert_array_equal(from_tensor(parsed.pred, "pred"), strided)
    target = from_tensor(parsed.target, "target")
    assert target.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(target, base)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 7])
@pytest.mark.parametrize("reduced", [False, True])
@pytest.mark.parametrize("with_grad", [False, True])
def test_response_parses_as_protobufs_own(dtype, n, reduced, with_grad):
    g = np.random.default_rng(n)
    loss = np.asarray(g.random(n).sum(), dtype=dtype) if reduced else g.random(n).astype(dtype)
    grad = g.random((n, 4)).astype(dtype) if with_grad else None
    encoded = encode_evaluate_response(loss, grad, "id-7")
    want = pb.EvaluateResponse(loss=to_tensor(loss), request_id="id-7")
    if grad is not None:
        want.grad.CopyFrom(to_tensor(grad))
    assert pb.EvaluateResponse.FromString(encoded) == want
    stream = pb.EvaluateStreamResponse.FromString(wrap_field(1, encoded))
    assert stream == pb.EvaluateStreamResponse(response=want)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**14, 2**21 - 1, 2**35 + 5, 2**63 - 1])
def test_varint_matches_protobuf(value):
    # Error.rows is field 4, packed int64s: tag 0x22, the payload's length (one byte here), the varint
    wire = pb.Error(rows=[value]).SerializeToString()
    assert wire[:1] == b"\x22" and wire[1] == len(wire) - 2
    assert wire[2:] == _varint(value)


def test_oip_binary_request_round_trip():
    pred = np.arange(24, dtype=np.float32).reshape(6, 4)[::2]  # a strided view goes in as its values
    target = np.ones((3, 4), dtype=np.float64)
    body, headers = oip_binary_request({"PRED": pred, "TARGET": target, "EMPTY": np.zeros((0, 4), np.float32)},
                                       {"reduction": "none"})
    n = int(headers["Inference-Header-Content-Length"])
    assert len(body) == n + pred.nbytes + target.nbytes
    np.testing.assert_array_equal(np.frombuffer(body, np.float32, 12, n).reshape(3, 4), pred)
    np.testing.assert_array_equal(np.frombuffer(body, np.float64, 12, n + pred.nbytes).reshape(3, 4), target)
    # the same framing read back by the response decoder (outputs instead of inputs)
    head = body[:n].replace(b'"inputs"', b'"outputs"')
    out = oip_binary_response(head + body[n:], str(len(head)))
    np.testing.assert_array_equal(out["PRED"], pred)
    np.testing.assert_array_equal(out["TARGET"], target)
    assert out["EMPTY"].shape == (0, 4)


@pytest.mark.parametrize("sizes", [[], [0], [16, 64], [3, 0, 5]])
def test_repeated_bytes_field_parses_as_protobufs_own(sizes):
    from lossd_client._codec import encode_message
    from lossd_client._proto.inference import grpc_predict_v2_pb2 as oip_pb

    blobs = [np.arange(n, dtype=np.uint8).tobytes() for n in sizes]
    head = oip_pb.ModelInferResponse(model_name="ciou", id="7",
                                     outputs=[oip_pb.ModelInferResponse.InferOutputTensor(name="LOSS", shape=[4])])
    encoded = encode_message(head, {}, (6, [memoryview(b) for b in blobs]))  # raw_output_contents
    want = oip_pb.ModelInferResponse()
    want.CopyFrom(head)
    want.raw_output_contents.extend(blobs)
    assert oip_pb.ModelInferResponse.FromString(encoded) == want
