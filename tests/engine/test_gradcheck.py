"""Every differentiable loss passes torch.autograd.gradcheck in float64, through each box format's conversion.

Detached terms (CIoU's alpha, the Focal-EIoU weight, Wise-IoU's denominator and focus, the IoU-aware target) are
held at their values at the base point with ``frozen_detached``: the autograd gradient of a loss with a stopped
term is the exact gradient of the loss with that term constant, and that is what the finite differences see.
"""

import pytest
import torch

from lossd.engine import LOSSES, frozen_detached, get_loss
from lossd.engine._utils import to_xyxy
from lossd.engine.inputs import VALIDATORS, example_inputs, random_boxes

VARIANTS = [(name, {}) for name in sorted(LOSSES)] + [
    ("iou", {"mode": "log"}), ("iou", {"mode": "square"}),
    ("ciou", {"alpha_rule": "mmdet"}), ("ciou", {"alpha_rule": "attached"}),
    ("eiou", {"gamma": 0.5}),
    ("siou", {"distance_sign": "mmdet"}), ("siou", {"theta": 2.0}),
    ("alpha_iou", {"penalty": "giou"}), ("alpha_iou", {"penalty": "diou"}), ("alpha_iou", {"penalty": "ciou"}),
    ("alpha_iou", {"alpha": 1.0}),
    ("wiou", {"version": "v2", "iou_mean": 0.3}), ("wiou", {"version": "v3", "iou_mean": 0.3}),
    ("mpdiou", {"normalizer": "enclosing"}),
    ("inner_iou", {"base": "giou", "ratio": 1.3}), ("inner_iou", {"base": "diou"}), ("inner_iou", {"base": "ciou"}),
    ("cross_entropy", {"label_smoothing": 0.1, "class_weights": [1, 2, 0.5, 1, 3]}),
    ("focal", {"alpha": -1, "gamma": 0.0}), ("focal", {"gamma": 0.5}),
    ("varifocal", {"iou_weighted": False}), ("bce_with_logits", {"pos_weight": 3.0}),
    ("tversky", {"alpha": 0.3, "beta": 0.7}), ("hinge", {"margin": 0.5}), ("margin_ranking", {"margin": 0.2}),
    ("smooth_l1", {"beta": 0.0}), ("huber", {"delta": 0.5}), ("quantile", {"q": 0.9}),
]


def _check(name: str, params: dict, pred: torch.Tensor, target, box_format: str = "xyxy") -> None:
    spec = get_loss(name)
    kwargs = spec.resolve(params)
    to_fn, tgt = VALIDATORS[spec.inputs](pred, target, box_format, kwargs, torch.float64)

    def f(x):
        return spec.fn(to_fn(x), tgt, **kwargs)

    x = pred.clone().requires_grad_(True)
    with frozen_detached() as replay:
        f(x)
        replay()
        assert torch.autograd.gradcheck(lambda y: (replay(), f(y))[1], (x,), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name,params", VARIANTS, ids=[f"{n}{p or ''}" for n, p in VARIANTS])
def test_gradcheck_random(name, params, gen):
    pred, target = example_inputs(get_loss(name).inputs, 6, gen, torch.float64)
    _check(name, params, pred, target)


def _from_xyxy(b: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "xywh":
        return torch.cat((b[:, :2], b[:, 2:] - b[:, :2]), 1)
    return torch.cat((0.5 * (b[:, :2] + b[:, 2:]), b[:, 2:] - b[:, :2]), 1)


BOX_LOSSES = sorted(n for n, s in LOSSES.items() if s.inputs == "boxes")


@pytest.mark.parametrize("box_format", ["xywh", "cxcywh"])
@pytest.mark.parametrize("name", BOX_LOSSES)
def test_gradcheck_through_formats(name, box_format, gen):
    pred_xyxy, target = example_inputs("boxes", 5, gen, torch.float64)
    pred, target = _from_xyxy(pred_xyxy, box_format), _from_xyxy(target, box_format)
    torch.testing.assert_close(to_xyxy(pred, box_format), pred_xyxy)
    _check(name, {}, pred, target, box_format)


def _edge_sets(gen):
    t = random_boxes(6, gen, torch.float64)
    wh = t[:, 2:] - t[:, :2]
    contained = torch.cat((t[:, :2] + 0.2 * wh, t[:, 2:] - 0.3 * wh), 1)
    far = t + 1e4
    tiny = torch.cat((t[:, :2], t[:, :2] + 1e-3 * (1 + torch.rand(6, 2, generator=gen, dtype=torch.float64))), 1)
    return {"contained": (contained, t), "contains": (t, contained), "disjoint_far": (far, t), "tiny": (tiny, t)}


@pytest.mark.parametrize("case", ["contained", "contains", "disjoint_far", "tiny"])
@pytest.mark.parametrize("name", BOX_LOSSES)
def test_gradcheck_edge_boxes(name, case, gen):
    pred, target = _edge_sets(gen)[case]
    _check(name, {}, pred, target)


def test_detached_terms_need_freezing(gen):
    # the check above is not vacuous: without holding alpha constant, CIoU's autograd gradient differs from
    # the finite differences of the full function
    spec = get_loss("ciou")
    pred, target = example_inputs("boxes", 6, gen, torch.float64)
    pred = torch.cat((pred[:, :2], pred[:, :2] + (pred[:, 2:] - pred[:, :2]) * torch.tensor([2.0, 0.5])), 1)
    x = pred.clone().requires_grad_(True)
    assert not torch.autograd.gradcheck(lambda y: spec.fn(y, target), (x,), atol=1e-6, rtol=1e-4,
                                        raise_exception=False)


def test_engine_gradient_is_autograd_of_its_loss(engine, gen):
    # the engine's grad for 'mean' with weights equals the numerical derivative of the returned scalar
    pred, target = example_inputs("boxes", 4, gen, torch.float64)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    out = engine.evaluate("giou", pred, target, weights=w, reduction="mean")
    h = 1e-6
    num = torch.zeros_like(pred)
    for i in range(4):
        for j in range(4):
            d = torch.zeros_like(pred)
            d[i, j] = h
            up = engine.evaluate("giou", pred + d, target, weights=w, reduction="mean", return_grad=False).loss
            dn = engine.evaluate("giou", pred - d, target, weights=w, reduction="mean", return_grad=False).loss
            num[i, j] = (up - dn) / (2 * h)
    torch.testing.assert_close(out.grad, num, atol=1e-7, rtol=1e-5)
    assert out.grad[3].abs().sum() == 0  # zero weight, zero gradient
