"""Properties of the IoU family and of every loss: symmetry, scale invariance, ranges, zeros, limits,
degenerate-but-valid boxes, float32 vs float64, box formats, empty batches, pairwise vs elementwise."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lossd.engine.engine as engine_mod
from lossd.engine import LOSSES, METRICS, get_loss
from lossd.engine.inputs import example_inputs, random_boxes

BOX_LOSSES = sorted(n for n, s in LOSSES.items() if s.inputs == "boxes")
SCALE_FREE = ["iou", "giou", "diou", "ciou", "eiou", "siou"]  # nwd has the constant C, mpdiou the image size


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metrics_symmetric(engine, name, gen):
    a, b = example_inputs("boxes", 50, gen)
    torch.testing.assert_close(engine.metric(name, a, b), engine.metric(name, b, a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SCALE_FREE)
def test_metrics_scale_invariant(engine, name, gen):
    a, b = example_inputs("boxes", 50, gen)
    torch.testing.assert_close(engine.metric(name, a * 7.3, b * 7.3), engine.metric(name, a, b), rtol=1e-7, atol=1e-9)


def test_ranges(engine, gen):
    a = random_boxes(400, gen)
    b = random_boxes(400, gen)
    iou = engine.metric("iou", a, b)
    assert bool(((iou >= 0) & (iou <= 1)).all())
    giou = engine.metric("giou", a, b)
    assert bool(((giou >= -1) & (giou <= iou)).all())
    diou = engine.metric("diou", a, b)
    assert bool(((diou > -1) & (diou <= iou)).all())
    assert bool((engine.metric("ciou", a, b) <= diou + 1e-12).all())
    nwd = engine.metric("nwd", a, b)
    assert bool(((nwd > 0) & (nwd <= 1)).all())


def test_seed_limits(engine):
    # GIoU and DIoU tend to -1 as disjoint boxes move infinitely far apart; IoU stays 0
    a = [[0.0, 0.0, 1.0, 1.0]]
    far = [[1e7, 1e7, 1e7 + 1, 1e7 + 1]]
    assert engine.metric("giou", a, far, dtype="float64").item() == pytest.approx(-1, abs=1e-6)
    assert engine.metric("diou", a, far, dtype="float64").item() == pytest.approx(-1, abs=1e-6)
    assert engine.metric("iou", a, far).item() == 0.0
    # the GIoU loss lies in [0, 2] and the IoU log loss goes to 0 as IoU -> 1
    assert engine.evaluate("giou", a, far, dtype="float64").loss.item() == pytest.approx(2, abs=1e-6)
    assert engine.evaluate("iou", a, [[0, 0, 1, 1.0001]], params={"mode": "log"}).loss.item() < 1e-3


@pytest.mark.parametrize("name", BOX_LOSSES)
def test_zero_for_identical_boxes(engine, name, gen):
    a = random_boxes(20, gen)
    out = engine.evaluate(name, a, a, dtype="float64")
    torch.testing.assert_close(out.loss, torch.zeros(20, dtype=torch.float64), atol=1e-6, rtol=0)
    assert bool(torch.isfinite(out.grad).all())


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metric_one_for_identical_boxes(engine, name, gen):
    a = random_boxes(20, gen)
    torch.testing.assert_close(engine.metric(name, a, a), torch.ones(20, dtype=torch.float64), atol=1e-6, rtol=0)


DEGENERATE = {
    "identical": ([1, 2, 5, 7], [1, 2, 5, 7]),
    "zero_area_identical": ([3, 3, 3, 3], [3, 3, 3, 3]),
    "zero_area_point_vs_box": ([3, 3, 3, 3], [0, 0, 10, 10]),
    "zero_height": ([0, 0, 4, 0], [0, 0, 4, 2]),
    "zero_height_both": ([0, 1, 4, 1], [1, 1, 5, 1]),
    "zero_width": ([2, 0, 2, 5], [0, 0, 4, 5]),
    "coincident_centres": ([0, 0, 10, 10], [3, 3, 7, 7]),
    "coincident_centres_same_size": ([0, 0, 10, 4], [3, -3, 7, 7]),
    "contained": ([2, 2, 3, 3], [0, 0, 10, 10]),
    "disjoint_far": ([0, 0, 1, 1], [1e5, 1e5, 1e5 + 2, 1e5 + 2]),
    "touching": ([0, 0, 1, 1], [1, 0, 2, 1]),
    "huge": ([0, 0, 1e6, 1e6], [1, 1, 1e6 + 1, 1e6 + 1]),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", BOX_LOSSES + ["iou_aware"])
def test_degenerate_but_valid_boxes_stay_finite(engine, name, dtype):
    pred = torch.tensor([p for p, _ in DEGENERATE.values()], dtype=torch.float64)
    target = torch.tensor([t for _, t in DEGENERATE.values()], dtype=torch.float64)
    for a, b in ((pred, target), (target, pred)):
        if name == "iou_aware":
            a = torch.cat((a, torch.zeros(len(a), 1, dtype=a.dtype)), 1)
        out = engine.evaluate(name, a, b, dtype=dtype)
        bad = [k for k, ok in zip(DEGENERATE, torch.isfinite(out.loss)) if not ok]
        assert not bad, f"non-finite loss for {bad}"
        bad = [k for k, ok in zip(DEGENERATE, torch.isfinite(out.grad).all(1)) if not ok]
        assert not bad, f"non-finite gradient for {bad}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(METRICS))
def test_degenerate_metrics_finite(engine, name, dtype):
    pred = [p for p, _ in DEGENERATE.values()]
    target = [t for _, t in DEGENERATE.values()]
    assert bool(torch.isfinite(engine.metric(name, pred, target, dtype=dtype)).all())
    assert bool(torch.isfinite(engine.metric(name, pred, target, pairwise=True, dtype=dtype)).all())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float32_agrees_with_float64(engine, name, gen):
    pred, target = example_inputs(get_loss(name).inputs, 200, gen)
    pred = pred.float().double()  # the same numbers in both precisions
    if target.dtype.is_floating_point:
        target = target.float().double()
    lo = engine.evaluate(name, pred, target, dtype="float32")
    hi = engine.evaluate(name, pred, target, dtype="float64")
    torch.testing.assert_close(lo.loss.double(), hi.loss, rtol=1e-5, atol=1e-6)
    scale = hi.grad.abs().max().clamp(min=1e-3)
    torch.testing.assert_close(lo.grad.double() / scale, hi.grad / scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", BOX_LOSSES)
def test_box_formats_and_chain_rule(engine, name, gen):
    pred, target = example_inputs("boxes", 30, gen)
    ref = engine.evaluate(name, pred, target, dtype="float64")
    g = ref.grad  # d/d(x1, y1, x2, y2)

    xywh = lambda b: torch.cat((b[:, :2], b[:, 2:] - b[:, :2]), 1)  # noqa: E731
    cxcywh = lambda b: torch.cat((0.5 * (b[:, :2] + b[:, 2:]), b[:, 2:] - b[:, :2]), 1)  # noqa: E731
    out = engine.evaluate(name, xywh(pred), xywh(target), box_format="xywh", dtype="float64")
    torch.testing.assert_close(out.loss, ref.loss)
    # x2 = x + w: d/dx = d/dx1 + d/dx2, d/dw = d/dx2
    torch.testing.assert_close(out.grad, torch.cat((g[:, :2] + g[:, 2:], g[:, 2:]), 1))
    out = engine.evaluate(name, cxcywh(pred), cxcywh(target), box_format="cxcywh", dtype="float64")
    torch.testing.assert_close(out.loss, ref.loss)
    # x1 = cx - w/2, x2 = cx + w/2: d/dcx = g1 + g2, d/dw = (g2 - g1) / 2
    torch.testing.assert_close(out.grad, torch.cat((g[:, :2] + g[:, 2:], 0.5 * (g[:, 2:] - g[:, :2])), 1))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_empty_batch(engine, name, gen):
    pred, target = example_inputs(get_loss(name).inputs, 0, gen)
    for reduction in ("none", "mean", "sum"):
        out = engine.evaluate(name, pred, target, reduction=reduction)
        assert out.grad.shape == pred.shape
        if reduction == "none":
            assert out.loss.shape == (0,)
        else:
            assert out.loss.item() == 0.0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_reductions_and_weights(engine, name, gen):
    pred, target = example_inputs(get_loss(name).inputs, 7, gen)
    w = torch.rand(7, generator=gen, dtype=torch.float64)
    none = engine.evaluate(name, pred, target, weights=w).loss
    total = engine.evaluate(name, pred, target, weights=w, reduction="sum")
    assert total.loss.item() == pytest.approx(none.sum().item(), rel=1e-6)
    unweighted = engine.evaluate(name, pred, target).loss
    torch.testing.assert_close(none, unweighted * w.to(none.dtype))
    if get_loss(name).mean_weight is None:
        mean = engine.evaluate(name, pred, target, weights=w, reduction="mean").loss.item()
        assert mean == pytest.approx(none.sum().item() / 7, rel=1e-6)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_pairwise_matches_loop_and_chunks(engine, name, gen, monkeypatch):
    a, b = random_boxes(13, gen), random_boxes(9, gen)
    loop = torch.stack([torch.stack([engine.metric(name, a[i:i + 1], b[j:j + 1])[0] for j in range(9)])
                        for i in range(13)])
    torch.testing.assert_close(engine.metric(name, a, b, pairwise=True), loop)
    monkeypatch.setattr(engine_mod, "PAIRWISE_CHUNK_ELEMS", 20)  # 2 rows per chunk, the last one short
    torch.testing.assert_close(engine.metric(name, a, b, pairwise=True), loop)
    assert engine.metric(name, a[:0], b, pairwise=True).shape == (0, 9)


box_coord = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)
box_size = st.floats(min_value=0, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)
box = st.tuples(box_coord, box_coord, box_size, box_size).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(box, box), min_size=1, max_size=6), st.sampled_from(BOX_LOSSES))
def test_valid_boxes_never_give_nan_or_inf(engine, pairs, name):
    pred = [p for p, _ in pairs]
    target = [t for _, t in pairs]
    out = engine.evaluate(name, pred, target)
    assert bool(torch.isfinite(out.loss).all()) and bool(torch.isfinite(out.grad).all()), (name, pairs)

