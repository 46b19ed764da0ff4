"""Finite input whose result overflows is refused with the rows named (issue 12), on both routes; the one
documented exception, eps = 0 on a pair with a zero denominator, still gives NaN for that row."""

import pytest
import torch

from lossd.engine import LOSSES, METRICS, Engine, EngineError
from lossd.engine.inputs import example_inputs

BOX_LOSSES = sorted(n for n, s in LOSSES.items() if s.inputs == "boxes")


@pytest.fixture(scope="module", params=["auto", "off"])
def engine(request):
    return Engine(device="cpu", fast=request.param, warm=False)


def _refusal(call) -> EngineError:
    with pytest.raises(EngineError) as info:
        call()
    return info.value


@pytest.mark.parametrize("name", BOX_LOSSES)
def test_boxes_near_the_float64_limit_are_refused_naming_the_rows(engine, name):
    pred = [[0, 0, 10, 10], [-1e308, -1e308, 1e308, 1e308], [1, 1, 4, 5], [0, 0, 1e308, 1e308]]
    target = [[1, 1, 11, 11], [0, 0, 1e308, 1e308], [1, 1, 4, 5], [0, 0, 1e308, 1e308]]
    err = _refusal(lambda: engine.evaluate(name, pred, target, dtype="float64"))
    assert err.code == "non_finite" and err.field == "pred"
    assert 1 in err.rows and not {0, 2} & set(err.rows), err.rows
    assert "row" in err.message and "float64" in err.message
    # the same rows without the huge ones are answered, finite
    out = engine.evaluate(name, [pred[0], pred[2]], [target[0], target[2]], dtype="float64")
    assert bool(torch.isfinite(out.loss).all()) and bool(torch.isfinite(out.grad).all())


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_float32_overflow_is_refused_whatever_the_reduction(engine, reduction):
    pred = [[0, 0, 10, 10]] * 3 + [[0, 0, 3e19, 3e19]]
    target = [[1, 1, 11, 11]] * 3 + [[1e19, 0, 3e19, 2e19]]
    wide = engine.evaluate("ciou", pred, target, reduction=reduction, dtype="float64")  # float64 holds these
    assert bool(torch.isfinite(wide.loss).all())
    try:
        out = engine.evaluate("ciou", pred, target, reduction=reduction, dtype="float32")
    except EngineError as err:
        assert err.code == "non_finite" and err.rows == [3]
    else:  # the fused kernels carry float32 rows through float64 arithmetic: a right answer is fine too
        torch.testing.assert_close(out.loss, wide.loss.float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.grad, wide.grad.float(), rtol=1e-5, atol=1e-5)


def test_regression_overflow_is_refused(engine):
    err = _refusal(lambda: engine.evaluate("mse", [[1.0, 2.0], [1e200, 0.0]], [[0.0, 0.0], [-1e200, 0.0]],
                                           dtype="float64"))
    assert err.code == "non_finite" and err.rows == [1]


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize("pairwise", [False, True])
def test_metric_overflow_is_refused(engine, name, pairwise):
    a = [[0, 0, 10, 10], [-1e308, 0, 1e308, 1e308]]
    b = [[1, 1, 11, 11], [0, 0, 1e308, 1e308]]
    if name == "nwd":  # exp(-W2 / C) of a huge distance is 0, a finite value
        assert bool(torch.isfinite(engine.metric(name, a, b, pairwise=pairwise, dtype="float64")).all())
        return
    err = _refusal(lambda: engine.metric(name, a, b, pairwise=pairwise, dtype="float64"))
    assert err.code == "non_finite" and err.field == "boxes1" and 1 in err.rows


def test_zero_eps_division_by_zero_stays_the_documented_nan(engine):
    """eps = 0 on an empty union has no IoU: NaN for that row, the others answered (docs/numerics.md)."""
    out = engine.evaluate("giou", [[0, 0, 2, 0], [0, 0, 1, 1]], [[0, 0, 0, 5], [0, 0, 1, 2]], params={"eps": 0.0},
                          dtype="float64")
    assert torch.isnan(out.loss[0]) and bool(torch.isfinite(out.loss[1]))


def test_ordinary_inputs_are_never_refused(engine, gen):
    for name, spec in LOSSES.items():
        pred, target = example_inputs(spec.inputs, 16, gen, torch.float32)
        out = engine.evaluate(name, pred, target)
        assert bool(torch.isfinite(out.loss).all()), name


@pytest.mark.parametrize("fast", ["auto", "off"])
@pytest.mark.parametrize("name, params", [("ciou", {}), ("ciou", {"alpha_rule": "attached"}),
                                          ("ciou", {"alpha_rule": "mmdet"}), ("alpha_iou", {"penalty": "ciou"})])
def test_zero_eps_identical_boxes_are_a_perfect_fit_not_nan(name, params, fast):
    """CIoU's alpha = v / (1 - IoU + v + eps) is 0/0 for identical boxes when eps = 0, but alpha v -> 0 on every
    path there: the loss is 0 with gradient 0 (as with any eps > 0), on the fused and the autograd route."""
    from lossd.engine import Engine

    eng = Engine(device="cpu", warm=False, fast=fast)
    boxes = [[0.0, 0.0, 10.0, 10.0], [2.0, 3.0, 5.0, 11.0]]
    for dtype in ("float32", "float64"):
        out = eng.evaluate(name, boxes, boxes, params={"eps": 0.0, **params}, dtype=dtype)
        assert out.loss.tolist() == [0.0, 0.0], (dtype, out.loss)
        assert bool((out.grad == 0).all()), (dtype, out.grad)
    near = eng.evaluate(name, [[0.0, 0.0, 10.0, 10.0]], [[0.0, 0.0, 10.0, 10.5]], params={"eps": 0.0, **params},
                        dtype="float64")
    assert bool(torch.isfinite(near.loss).all()) and float(near.loss[0]) > 0


def test_zero_eps_identical_boxes_ciou_metric_is_one(engine):
    boxes = [[0.0, 0.0, 10.0, 10.0], [2.0, 3.0, 5.0, 11.0]]
    assert engine.metric("ciou", boxes, boxes, params={"eps": 0.0}, dtype="float64").tolist() == [1.0, 1.0]
    pair = engine.metric("ciou", boxes, boxes, pairwise=True, params={"eps": 0.0}, dtype="float64")
    assert pair.diagonal().tolist() == [1.0, 1.0] and bool(torch.isfinite(pair).all())
