"""The hand-written wire encoders against protobuf itself: the bytes must parse as the message protobuf would
have built, for every dtype, shape and field the client and server send."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lossd_client.wire import (_varint, encode_evaluate_request, encode_evaluate_response, from_tensor,
                                 oip_binary_request, oip_binary_response, to_param, to_tensor, wrap_field)
from lossd_client.wire import pb

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
    from lossd_client.wire import encode_message
    from lossd_client.wire import oip_pb

    blobs = [np.arange(n, dtype=np.uint8).tobytes() for n in sizes]
    head = oip_pb.ModelInferResponse(model_name="ciou", id="7",
                                     outputs=[oip_pb.ModelInferResponse.InferOutputTensor(name="LOSS", shape=[4])])
    encoded = encode_message(head, {}, (6, [memoryview(b) for b in blobs]))  # raw_output_contents
    want = oip_pb.ModelInferResponse()
    want.CopyFrom(head)
    want.raw_output_contents.extend(blobs)
    assert oip_pb.ModelInferResponse.FromString(encoded) == want


# ------------------------------------------------------------------------------------------- the decoder
TENSOR_FIELDS = {pb.EvaluateRequest: ("pred", "target", "weights"), pb.EvaluateResponse: ("loss", "grad"),
                 pb.MetricRequest: ("boxes1", "boxes2")}


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # what each side raises is compared by type and message
        return type(exc).__name__, str(exc)


def assert_decodes_like_protobuf(cls, data: bytes) -> None:
    """decode_with_tensors(cls, data) gives what protobuf's own parse gives: the same error, or the same arrays and
    the same other fields."""
    from google.protobuf.message import DecodeError

    from lossd_client.wire import decode_with_tensors

    try:
        want = cls.FromString(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            decode_with_tensors(cls, data)
        return
    got = decode_with_tensors(cls, data)
    for field in TENSOR_FIELDS[cls]:
        w = _outcome(lambda: from_tensor(getattr(want, field), field))
        g = _outcome(lambda: got.array(field, required=False))
        assert w[0] == g[0], field
        if w[0] == "ok" and w[1] is not None:
            assert g[1].dtype == w[1].dtype
            np.testing.assert_array_equal(g[1], w[1])
        else:
            assert g[1] is None if w[1] is None else g[1] == w[1]
        assert got.has(field) == want.HasField(field)
    rest = cls()
    rest.CopyFrom(want)
    for field in got.tensors:
        rest.ClearField(field)
    assert got.message == rest


tensors = st.one_of(
    st.none(),
    st.builds(lambda n, dt: to_tensor((np.arange(n * 4) * 1.5).astype(dt).reshape(n, 4)),
              st.integers(0, 6), st.sampled_from([np.float32, np.float64, np.int64])),
    st.builds(lambda n, dt: to_tensor((np.arange(n) * 0.5).astype(dt), typed=True),
              st.integers(0, 6), st.sampled_from([np.float32, np.float64, np.int64])),
    st.builds(lambda n: pb.Tensor(shape=[n, 4], dtype=pb.DTYPE_FLOAT32, raw=b"\x01" * (n * 8)),  # lies
              st.integers(1, 3)))


@st.composite
def requests(draw) -> bytes:
    fields = {}
    for name in ("pred", "target", "weights"):
        t = draw(tensors)
        if t is not None:
            fields[name] = t
    req = pb.EvaluateRequest(loss=draw(st.sampled_from(["ciou", "giou", ""])), reduction="sum",
                             params={"eps": to_param(draw(st.floats(0, 1)))}, **fields)
    if draw(st.booleans()):
        req.return_grad = draw(st.booleans())
    data = req.SerializeToString()
    if draw(st.booleans()):  # a second message appended: protobuf merges the two
        data += pb.EvaluateRequest(target=draw(tensors) or pb.Tensor(), request_id="second").SerializeToString()
    return data


@given(requests())
@settings(max_examples=300, deadline=None)
def test_decoder_reads_what_protobuf_reads(data):
    assert_decodes_like_protobuf(pb.EvaluateRequest, data)


@given(requests(), st.data())
@settings(max_examples=300, deadline=None)
def test_decoder_on_damaged_bytes(data, draw):
    damaged = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 3))):
        if damaged:
            damaged[draw.draw(st.integers(0, len(damaged) - 1))] = draw.draw(st.integers(0, 255))
    cut = draw.draw(st.integers(0, len(damaged)))
    assert_decodes_like_protobuf(pb.EvaluateRequest, bytes(damaged[:cut]))


def test_decoder_leaves_raw_data_in_place():
    from lossd_client.wire import decode_field, decode_with_tensors

    pred = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    data = encode_evaluate_request("ciou", pred, pred, None, box_format="xyxy", reduction="none", params={},
                                   return_grad=True)
    got = decode_with_tensors(pb.EvaluateRequest, data)
    arr = got.array("pred")
    assert set(got.tensors) == {"pred", "target"} and not got.message.HasField("pred")
    assert np.shares_memory(arr, np.frombuffer(data, np.uint8))  # a view of the received bytes, not a copy
    small = decode_with_tensors(pb.EvaluateRequest, data, min_bytes=len(data) + 1)  # parsed by protobuf whole
    assert small.tensors == {} and small.message.HasField("pred")
    np.testing.assert_array_equal(small.array("pred"), pred)
    assert not arr.flags.writeable
    np.testing.assert_array_equal(arr, pred)
    # the stream's wrapper: the request inside EvaluateStreamRequest.request
    inner = decode_field(pb.EvaluateRequest, 1, wrap_field(1, data), pb.EvaluateStreamRequest)
    np.testing.assert_array_equal(inner.array("target"), pred)
    assert inner.message.loss == "ciou"
    # a response and a metric request decode the same way
    resp = encode_evaluate_response(pred[:, 0].copy(), pred, "r")
    assert_decodes_like_protobuf(pb.EvaluateResponse, resp)
    metric = pb.MetricRequest(metric="iou", boxes1=to_tensor(pred), boxes2=to_tensor(pred[:3], typed=True))
    assert_decodes_like_protobuf(pb.MetricRequest, metric.SerializeToString())


@given(st.lists(st.binary(max_size=40), max_size=4), st.booleans(), st.data())
@settings(max_examples=200, deadline=None)
def test_repeated_bytes_left_in_place(blobs, damage, draw):
    from google.protobuf.message import DecodeError

    from lossd_client.wire import decode_with_tensors
    from lossd_client.wire import oip_pb

    inp = oip_pb.ModelInferRequest.InferInputTensor
    req = oip_pb.ModelInferRequest(model_name="ciou", id="7", inputs=[inp(name=f"I{i}", shape=[len(b)])
                                                                      for i, b in enumerate(blobs)],
                                   raw_input_contents=blobs)
    data = req.SerializeToString()
    if damage and data:
        cut = draw.draw(st.integers(0, len(data) - 1))
        data = data[:cut] + bytes([draw.draw(st.integers(0, 255))]) + data[cut + 1:]
    try:
        want = oip_pb.ModelInferRequest.FromString(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            decode_with_tensors(oip_pb.ModelInferRequest, data, blobs_field=7)
        return
    got = decode_with_tensors(oip_pb.ModelInferRequest, data, blobs_field=7)
    if got.blobs is None:  # fell back to protobuf whole
        assert got.message == want
        return
    assert [bytes(b) for b in got.blobs] == list(want.raw_input_contents)
    rest = oip_pb.ModelInferRequest()
    rest.CopyFrom(want)
    rest.ClearField("raw_input_contents")
    assert got.message == rest
