"""Reference values from torchvision, detectron2, fvcore and torchmetrics tests (../shared/reference/box_losses.md),
and cases computed by hand from the papers' formulas."""

import math

import pytest
import torch

INT_BOXES = [[0, 0, 100, 100], [0, 0, 50, 50], [200, 200, 300, 300], [0, 0, 25, 25]]
INT_BOXES2 = [[0, 0, 100, 100], [0, 0, 50, 50], [200, 200, 300, 300]]
FLOAT_BOXES = [[285.3538, 185.5758, 1193.5110, 851.4551], [285.1472, 188.7374, 1192.4984, 851.0669],
               [279.2440, 197.9812, 1189.4746, 849.2019]]
FLOAT_IOU = [[1.0, 0.9933, 0.9673], [0.9933, 1.0, 0.9737], [0.9673, 0.9737, 1.0]]
INT_EXPECTED = {
    "iou": [[1.0, 0.25, 0.0], [0.25, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0625, 0.25, 0.0]],
    "giou": [[1.0, 0.25, -0.7778], [0.25, 1.0, -0.8611], [-0.7778, -0.8611, 1.0], [0.0625, 0.25, -0.8819]],
    "diou": [[1.0, 0.1875, -0.4444], [0.1875, 1.0, -0.5625], [-0.4444, -0.5625, 1.0], [-0.0781, 0.1875, -0.6267]],
}
INT_EXPECTED["ciou"] = INT_EXPECTED["diou"]  # all squares, so v = 0


@pytest.mark.parametrize("name", ["iou", "giou", "diou", "ciou"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torchvision_pairwise_vectors(engine, name, dtype):
    got = engine.metric(name, INT_BOXES, INT_BOXES2, pairwise=True, dtype=dtype)
    torch.testing.assert_close(got, torch.tensor(INT_EXPECTED[name], dtype=got.dtype), atol=1e-4, rtol=0)
    got = engine.metric(name, FLOAT_BOXES, FLOAT_BOXES, pairwise=True, dtype=dtype)
    torch.testing.assert_close(got, torch.tensor(FLOAT_IOU, dtype=got.dtype), atol=1e-3, rtol=0)


def test_int_and_half_inputs(engine):
    got = engine.metric("iou", torch.tensor(INT_BOXES, dtype=torch.int16), torch.tensor(INT_BOXES2), pairwise=True)
    torch.testing.assert_close(got, torch.tensor(INT_EXPECTED["iou"]), atol=1e-4, rtol=0)
    half = torch.tensor(FLOAT_BOXES, dtype=torch.float16)
    got = engine.metric("iou", half, half, pairwise=True, dtype="float16")
    assert got.dtype == torch.float32  # fp16 is computed in float32, as torchvision upcasts
    torch.testing.assert_close(got, torch.tensor(FLOAT_IOU), atol=2e-3, rtol=0)


BOX1, BOX2, BOX3, BOX4 = [-1, -1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 2], [1, 1, 2, 2]
TV_LOSSES = {
    # (b1,b1), (b1,b2), (b1,b3), (b1,b4), (b2,b3), (b2,b4); then mean and sum of [b2,b2] vs [b3,b4]
    "giou": ([(BOX1, BOX1, 0.0), (BOX1, BOX2, 0.75), (BOX1, BOX3, 1.1667), (BOX1, BOX4, 1.4444), (BOX2, BOX3, 1.0),
              (BOX2, BOX4, 1.5)], 1.25, 2.5),
    "diou": ([(BOX1, BOX1, 0.0), (BOX1, BOX2, 0.8125), (BOX1, BOX3, 1.1923), (BOX1, BOX4, 1.25)], 1.225, 2.45),
    "ciou": ([(BOX1, BOX1, 0.0), (BOX1, BOX2, 0.8125), (BOX1, BOX3, 1.1923), (BOX1, BOX4, 1.25)], 1.225, 2.45),
}


@pytest.mark.parametrize("name", sorted(TV_LOSSES))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_torchvision_loss_vectors(engine, name, dtype):
    cases, mean, total = TV_LOSSES[name]
    for a, b, want in cases:
        got = engine.evaluate(name, [a], [b], dtype=dtype).loss
        assert got.item() == pytest.approx(want, abs=1e-4), (a, b)
    pred, target = [BOX2, BOX2], [BOX3, BOX4]
    assert engine.evaluate(name, pred, target, reduction="mean").loss.item() == pytest.approx(mean, abs=1e-4)
    assert engine.evaluate(name, pred, target, reduction="sum").loss.item() == pytest.approx(total, abs=1e-4)


def test_detectron2_vectors(engine):
    a, b = [[-1, -1, 1, 1]], [[0, -1, 1, 1]]
    assert engine.evaluate("diou", a, b).loss.item() == pytest.approx(0.53125, abs=1e-4)
    assert engine.evaluate("ciou", a, b).loss.item() == pytest.approx(0.5345, abs=1e-4)
    for name in ("diou", "ciou"):
        assert engine.evaluate(name, [[0, 0, 1, 1]], [[1, 1, 2, 2]]).loss.item() == pytest.approx(1.25, abs=1e-4)
    pred, target = [[-1, -1, 1, 1], [0, 0, 1, 1]], [[0, -1, 1, 1], [1, 1, 2, 2]]
    for name, total in (("diou", 1.78125), ("ciou", 1.7845)):
        out = engine.evaluate(name, pred, target, reduction="sum").loss.item()
        assert out == pytest.approx(total, abs=1e-4)
        assert engine.evaluate(name, pred, target, reduction="mean").loss.item() == pytest.approx(total / 2, abs=1e-4)


def test_torchmetrics_iou_example(engine):
    pred = [[298.55, 98.96, 314.97, 151.79]]
    target = [[300, 100, 315, 150]]
    assert engine.metric("iou", pred, target).item() == pytest.approx(0.8614, abs=1e-4)


def test_fvcore_smooth_l1_vectors(engine):
    pred, target = [1.0, 2.0, 3.0], [1.1, 2.0, 4.5]
    got = engine.evaluate("smooth_l1", pred, target, params={"beta": 0.5}).loss
    torch.testing.assert_close(got, torch.tensor([0.5 * 0.1**2 / 0.5, 0, 1.5 - 0.25]), atol=1e-6, rtol=1e-5)
    got = engine.evaluate("smooth_l1", pred, target, params={"beta": 0.05}).loss
    torch.testing.assert_close(got, torch.tensor([0.1 - 0.025, 0, 1.5 - 0.025]), atol=1e-6, rtol=1e-5)


def test_empty_batch_like_torchvision(engine):
    for name in ("giou", "diou", "ciou", "siou", "l1", "focal"):
        out = engine.evaluate(name, torch.zeros(0, 4), torch.zeros(0, 4), reduction="mean")
        assert out.loss.item() == 0.0 and out.grad is not None and out.grad.shape == (0, 4)
        out = engine.evaluate(name, torch.zeros(0, 4), torch.zeros(0, 4), reduction="none")
        assert out.loss.numel() == 0


# ---- hand-computed from the papers' formulas -------------------------------------------------------------------
# A = [0,0,2,2], B = [1,1,3,3]: inter 1, union 7, enclosing 3x3 (c^2 = 18), centres 1 apart in x and y (rho^2 = 2)
A, B = [[0.0, 0.0, 2.0, 2.0]], [[1.0, 1.0, 3.0, 3.0]]
# C = [0,0,2,1], D = [0,0,1,2]: inter 1, union 3, enclosing 2x2 (c^2 = 8), rho^2 = 0.5, w/h 2 vs 1/2
C, D = [[0.0, 0.0, 2.0, 1.0]], [[0.0, 0.0, 1.0, 2.0]]
V_CD = 4 / math.pi**2 * (math.atan(0.5) - math.atan(2.0)) ** 2

HAND = [
    ("iou", A, B, {}, 1 - 1 / 7),
    ("iou", A, B, {"mode": "log"}, -math.log(1 / 7)),
    ("iou", A, B, {"mode": "square"}, 1 - 1 / 49),
    ("giou", A, B, {}, 1 - 1 / 7 + 2 / 9),
    ("diou", A, B, {}, 1 - 1 / 7 + 2 / 18),
    ("ciou", A, B, {}, 1 - 1 / 7 + 2 / 18),
    ("ciou", C, D, {}, 1 - 1 / 3 + 0.5 / 8 + V_CD**2 / (1 - 1 / 3 + V_CD)),
    ("ciou", C, D, {"alpha_rule": "mmdet"}, 1 - 1 / 3 + 0.5 / 8),  # IoU <= 0.5: alpha = 0
    ("eiou", A, B, {}, 1 - 1 / 7 + 2 / 18),
    ("eiou", C, D, {}, 1 - 1 / 3 + 0.5 / 8 + 1 / 4 + 1 / 4),
    ("eiou", C, D, {"gamma": 0.5}, (1 / 3) ** 0.5 * (1 - 1 / 3 + 0.5 / 8 + 1 / 4 + 1 / 4)),
    # SIoU: dx = dy = 1 -> Lambda = 1, gamma = 1, rho_x = rho_y = 1/9, same sizes -> Omega = 0
    ("siou", A, B, {}, 1 - 1 / 7 + (1 - math.exp(-1 / 9))),
    ("siou", C, D, {}, 1 - 1 / 3 + 0.5 * (2 * (1 - math.exp(-1 / 16)) + 2 * (1 - math.exp(-0.5)) ** 4)),
    ("cdiou", A, B, {}, 1 - 1 / 7 + 4 * math.sqrt(2) / (4 * math.sqrt(18))),
    ("cdiou", A, B, {"lambda": 0.001}, 1 - 1 / 7 + 0.001 / 3),
    ("alpha_iou", A, B, {}, 1 - (1 / 7) ** 3),
    ("alpha_iou", A, B, {"penalty": "diou", "alpha": 2}, 1 - (1 / 7) ** 2 + (2 / 18) ** 2),
    ("alpha_iou", A, B, {"penalty": "giou", "alpha": 2}, 1 - (1 / 7) ** 2 + (2 / 9) ** 2),
    ("wiou", A, B, {}, math.exp(2 / 18) * (1 - 1 / 7)),
    ("wiou", A, B, {"version": "v2", "iou_mean": 0.5}, ((6 / 7) / 0.5) ** 0.5 * math.exp(2 / 18) * (6 / 7)),
    ("wiou", A, B, {"version": "v3", "iou_mean": 0.5},
     (12 / 7) / (3 * 1.9 ** (12 / 7 - 3)) * math.exp(2 / 18) * (6 / 7)),
    ("mpdiou", A, B, {}, 1 - 1 / 7 + 4 / (2 * 640**2)),
    ("mpdiou", A, B, {"image_width": 10, "image_height": 20}, 1 - 1 / 7 + 4 / 500),
    ("mpdiou", A, B, {"normalizer": "enclosing"}, 1 - 1 / 7 + 4 / 18),
    ("inner_iou", A, B, {"ratio": 0.5}, 1.0),  # inner boxes [.5,1.5] and [1.5,2.5] only touch
    ("inner_iou", A, B, {"ratio": 1.5}, 1 - 4 / 14),
    ("inner_iou", A, B, {"ratio": 1.5, "base": "giou"}, (1 - 1 / 7 + 2 / 9) + 1 / 7 - 4 / 14),
    ("nwd", A, B, {}, 1 - math.exp(-math.sqrt(2) / 12.8)),
    ("nwd", A, A, {}, 0.0),
]


@pytest.mark.parametrize("name,pred,target,params,want", HAND, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND)])
def test_hand_computed(engine, name, pred, target, params, want):
    got = engine.evaluate(name, pred, target, params=params, dtype="float64").loss.item()
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_siou_rises_as_boxes_separate(engine):
    # the paper's sign: ../shared/reference/box_losses.md recomputes 1.224/1.257/1.294/1.338 for these shifts
    target = [[0.0, 0.0, 10.0, 10.0]] * 4
    pred = [[s, 0.0, s + 10.0, 10.0] for s in (12, 15, 20, 30)]
    got = engine.evaluate("siou", pred, target, dtype="float64").loss
    torch.testing.assert_close(got, torch.tensor([1.224, 1.257, 1.294, 1.338], dtype=got.dtype), atol=1e-3, rtol=0)
    mm = engine.evaluate("siou", pred, target, params={"distance_sign": "mmdet"}, dtype="float64").loss
    assert bool((mm[1:] < mm[:-1]).all())  # mmdetection's default falls instead


def test_iou_aware(engine):
    # IoU of A vs B is 1/7; BCE-with-logits(z, 1/7) = softplus(z) - z/7, gradient sigmoid(z) - 1/7 on z only
    z = 0.3
    out = engine.evaluate("iou_aware", [A[0] + [z]], B, dtype="float64")
    want = math.log1p(math.exp(z)) - z / 7
    assert out.loss.item() == pytest.approx(want, rel=1e-9)
    torch.testing.assert_close(out.grad, torch.tensor([[0, 0, 0, 0, 1 / (1 + math.exp(-z)) - 1 / 7]],
                                                      dtype=torch.float64))
