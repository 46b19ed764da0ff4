"""Invalid input raises EngineError with a stable code, the field, and the offending rows."""

import math

import numpy as np
import pytest
import torch

from lossd.engine import CODES, Engine, EngineError

GOOD = [[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 1, 1]]


def err(fn, *args, **kwargs) -> EngineError:
    with pytest.raises(EngineError) as info:
        fn(*args, **kwargs)
    assert info.value.code in CODES
    assert info.value.message
    return info.value


def test_unknown_names(engine):
    e = err(engine.evaluate, "cioux", GOOD, GOOD)
    assert e.code == "unknown_loss" and "ciou" in e.message  # lists the known ones
    assert err(engine.metric, "nope", GOOD, GOOD).code == "unknown_metric"
    e = err(engine.evaluate, "ciou", GOOD, GOOD, box_format="xyhw")
    assert (e.code, e.field) == ("unknown_format", "box_format")
    e = err(engine.evaluate, "ciou", GOOD, GOOD, reduction="xyz")
    assert (e.code, e.field) == ("unknown_reduction", "reduction")
    e = err(engine.evaluate, "ciou", GOOD, GOOD, params={"gama": 1})
    assert (e.code, e.field) == ("unknown_param", "params.gama")
    assert err(engine.evaluate, "ciou", GOOD, GOOD, dtype="int8").code == "unknown_dtype"


def test_params(engine):
    e = err(engine.evaluate, "smooth_l1", [1.0], [1.0], params={"beta": -1})
    assert (e.code, e.field) == ("param_out_of_range", "params.beta")
    assert err(engine.evaluate, "quantile", [1.0], [1.0], params={"q": 1.0}).code == "param_out_of_range"
    assert err(engine.evaluate, "iou", GOOD, GOOD, params={"mode": "cubic"}).code == "invalid_param"
    assert err(engine.evaluate, "giou", GOOD, GOOD, params={"eps": "small"}).code == "invalid_param"
    assert err(engine.evaluate, "giou", GOOD, GOOD, params={"eps": math.nan}).code == "invalid_param"
    assert err(engine.evaluate, "varifocal", [[0.0]], [[1.0]], params={"iou_weighted": 1}).code == "invalid_param"
    e = err(engine.evaluate, "cross_entropy", [[0.0, 1.0]], [1], params={"class_weights": [1, 2, 3]})
    assert (e.code, e.field) == ("invalid_param", "params.class_weights")
    assert err(engine.evaluate, "cross_entropy", [[0.0, 1.0]], [1], params={"ignore_index": 1.5}).code == \
        "invalid_param"


def test_shapes(engine):
    e = err(engine.evaluate, "giou", [[0, 0, 1]], [[0, 0, 1, 1]])
    assert (e.code, e.field) == ("invalid_shape", "pred")
    assert err(engine.evaluate, "giou", GOOD, [[0, 0, 1, 1, 5]] * 3).field == "target"
    assert err(engine.evaluate, "giou", [[0, 0, 1], [1, 2]], GOOD).code == "invalid_shape"  # ragged
    e = err(engine.evaluate, "giou", GOOD[:1] + [["a", "b", "c", "d"]], GOOD[:2])  # names the rows
    assert (e.code, e.field, e.rows) == ("invalid_value", "pred", [1])
    assert err(engine.evaluate, "giou", None, GOOD).code == "invalid_shape"
    e = err(engine.evaluate, "giou", GOOD, GOOD[:2])
    assert (e.code, e.field) == ("length_mismatch", "target")
    e = err(engine.evaluate, "giou", GOOD, GOOD, weights=[1, 2])
    assert (e.code, e.field) == ("length_mismatch", "weights")
    assert err(engine.evaluate, "giou", GOOD, GOOD, weights=[[1, 2, 3]]).code == "invalid_shape"
    assert err(engine.evaluate, "l1", [1.0, 2.0], [[1.0], [2.0]]).code == "invalid_shape"
    assert err(engine.evaluate, "margin_ranking", [[1.0, 2.0, 3.0]], [1]).code == "invalid_shape"
    assert err(engine.evaluate, "iou_aware", GOOD, GOOD).field == "pred"  # needs the logit column
    assert err(engine.metric, "iou", GOOD, GOOD[:2]).code == "length_mismatch"


def test_non_finite_names_rows(engine):
    pred = np.array(GOOD * 5, dtype=np.float64)
    pred[[2, 7, 11], 1] = np.nan
    pred[13, 3] = np.inf
    e = err(engine.evaluate, "ciou", pred, np.array(GOOD * 5, dtype=np.float64))
    assert (e.code, e.field, e.rows, e.n_rows) == ("non_finite", "pred", [2, 7, 11, 13], 4)
    assert "2, 7, 11, 13" in e.message
    e = err(engine.evaluate, "giou", GOOD, GOOD, weights=[1, math.inf, 1])
    assert (e.code, e.field, e.rows) == ("non_finite", "weights", [1])
    assert err(engine.metric, "iou", GOOD, [[0, 0, math.nan, 1]] * 3).field == "boxes2"


def test_inverted_boxes(engine):
    bad = [[0, 0, 2, 2], [3, 0, 1, 1], [0, 5, 1, 1]]
    e = err(engine.evaluate, "giou", bad, GOOD)
    assert (e.code, e.field, e.rows) == ("inverted_box", "pred", [1, 2])
    e = err(engine.evaluate, "giou", GOOD, [[0, 0, -1, 1]] * 3, box_format="xywh")
    assert (e.code, e.field, e.rows) == ("inverted_box", "target", [0, 1, 2])
    assert "negative width" in e.message
    assert err(engine.metric, "iou", bad, GOOD, pairwise=True).code == "inverted_box"
    # many bad rows: the message shows the first few and the count
    many = [[1, 0, 0, 1]] * 50
    e = err(engine.evaluate, "giou", many, many)
    assert len(e.rows) == 10 and e.n_rows == 50 and "(50 rows)" in e.message


def test_values_out_of_domain(engine):
    e = err(engine.evaluate, "bce", [0.5, 1.2], [0.0, 1.0])
    assert (e.code, e.field, e.rows) == ("invalid_value", "pred", [1])
    assert err(engine.evaluate, "bce_with_logits", [0.5, 1.2], [0.0, 2.0]).field == "target"
    e = err(engine.evaluate, "cross_entropy", [[0.0, 1.0]] * 3, [0, 2, 1])
    assert (e.code, e.rows) == ("invalid_value", [1])
    assert err(engine.evaluate, "cross_entropy", [[0.0, 1.0]], [0.5]).code == "invalid_value"  # not a whole number
    assert err(engine.evaluate, "nll", [[0.1, -1.0]], [0]).code == "invalid_value"  # log-prob > 0
    assert err(engine.evaluate, "distribution_focal", [[0.0, 1.0, 2.0]], [2.5]).code == "invalid_value"
    assert err(engine.evaluate, "hinge", [1.0], [2.0]).code == "invalid_value"
    assert err(engine.evaluate, "giou", GOOD, GOOD, weights=[1, -1, 1]).code == "invalid_value"
    e = err(engine.evaluate, "exponential", [100.0, 1.0], [-1.0, 1.0])
    assert (e.code, e.rows) == ("invalid_value", [0])
    assert math.isfinite(engine.evaluate("exponential", [100.0], [-1.0], dtype="float64").loss.item())


def test_pairwise_budget():
    small = Engine(device="cpu", warm=False, max_pairwise=100)
    e = err(small.metric, "iou", GOOD * 4, GOOD * 9, pairwise=True)
    assert e.code == "too_large" and "12 x 27" in e.message
    assert small.metric("iou", GOOD * 3, GOOD * 3, pairwise=True).shape == (9, 9)


def test_error_dict_is_serialisable(engine):
    e = err(engine.evaluate, "giou", [[1, 0, 0, 1]], [[0, 0, 1, 1]])
    d = e.to_dict()
    assert d == {"code": "inverted_box", "message": e.message, "details": {"field": "pred", "rows": [0], "n_rows": 1}}


def test_accepts_tensors_numpy_and_lists_alike(engine):
    t = torch.tensor(GOOD, dtype=torch.float32)
    a = engine.evaluate("ciou", t, t + 0.5).loss
    b = engine.evaluate("ciou", t.numpy(), (t + 0.5).numpy()).loss
    c = engine.evaluate("ciou", GOOD, (t + 0.5).tolist()).loss
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert engine.evaluate("ciou", t.double(), t.double()).loss.dtype == torch.float64
    assert engine.evaluate("ciou", t.to(torch.bfloat16), t).loss.dtype == torch.float32


def test_float32_overflow_and_ragged_rows_are_named_plainly(engine):
    with pytest.raises(EngineError) as info:
        engine.evaluate("ciou", [[0, 0, 1, 1], [0, 0, 1e300, 1e300]], [[0, 0, 1, 1]] * 2)
    assert info.value.code == "non_finite" and info.value.rows == [1]
    assert "float32's range" in info.value.message and "float64" in info.value.message
    with pytest.raises(EngineError) as info:
        engine.evaluate("ciou", [[0, 0, 1], [0, 0, 1, 1]], [[0, 0, 1, 1]] * 2)
    assert info.value.code == "invalid_shape" and "different lengths" in info.value.message
    assert "inhomogeneous" not in info.value.message  # numpy's own wording stays out
