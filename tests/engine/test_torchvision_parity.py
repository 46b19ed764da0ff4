"""lossd against torchvision's own code: its box losses, pairwise IoU-family metrics and sigmoid focal loss, values
and autograd gradients in float64, on random, disjoint, nested and touching boxes.

torchvision is not a dependency (its PyPI wheels need CUDA torch): bench/torchvision_ops.py imports it when it is
installed, and otherwise runs torchvision.ops from the matching PyPI wheel (downloaded once into bench/.cache,
without its compiled extension, which these functions never use). Where neither is possible (no network) the
module is skipped, with the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lossd.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

try:
    from torchvision_ops import load

    TV = {name: load(name)[0] for name in (
        "generalized_box_iou_loss", "distance_box_iou_loss", "complete_box_iou_loss", "box_iou",
        "generalized_box_iou", "distance_box_iou", "complete_box_iou", "sigmoid_focal_loss")}
except Exception as exc:  # noqa: BLE001 - no torchvision and no way to fetch its wheel here
    pytest.skip(f"torchvision's code is not available: {exc}", allow_module_level=True)

F64 = torch.float64
# lossd's one departure here (documented in the catalog and in test_paper_references.DEVIATIONS): CIoU's aspect
# term is atan(w / (h + eps)), so a zero-height box stays finite; torchvision's is atan(w / h). For these boxes
# (heights 0.5-40) that moves CIoU by at most ~1e-8; everything else agrees to float64 rounding.
TOL = {"ciou": dict(rtol=1e-6, atol=1e-7)}
EXACT = dict(rtol=1e-9, atol=1e-12)
LOSS_OF = {"giou": "generalized_box_iou_loss", "diou": "distance_box_iou_loss", "ciou": "complete_box_iou_loss"}
METRIC_OF = {"iou": "box_iou", "giou": "generalized_box_iou", "diou": "distance_box_iou", "ciou": "complete_box_iou"}


def cases(n: int = 3000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """xyxy pairs: a quarter each overlapping, disjoint, one inside the other, and sharing an edge."""
    g = np.random.default_rng(seed)
    xy = g.uniform(0, 100, (n, 2))
    wh = g.uniform(0.5, 40, (n, 2))
    pred = np.concatenate([xy, xy + wh], 1)
    q = n // 4
    txy = xy + g.uniform(-20, 20, (n, 2))
    twh = g.uniform(0.5, 40, (n, 2))
    target = np.concatenate([txy, txy + twh], 1)
    target[q:2 * q, :2] = pred[q:2 * q, 2:] + g.uniform(1, 30, (q, 2))  # disjoint: right of and below pred
    target[q:2 * q, 2:] = target[q:2 * q, :2] + twh[q:2 * q]
    inner = g.uniform(0.1, 0.4, (q, 2)) * wh[2 * q:3 * q]  # nested: target inside pred
    target[2 * q:3 * q] = np.concatenate([pred[2 * q:3 * q, :2] + inner, pred[2 * q:3 * q, 2:] - inner], 1)
    target[3 * q:, 0] = pred[3 * q:, 2]  # touching: target's left edge on pred's right edge
    target[3 * q:, 2] = target[3 * q:, 0] + twh[3 * q:, 0]
    return torch.tensor(pred, dtype=F64), torch.tensor(target, dtype=F64)


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu", warm=False)


@pytest.mark.parametrize("fast", ["auto", "off"])
@pytest.mark.parametrize("name", sorted(LOSS_OF))
def test_box_losses_match_torchvision(name, fast):
    pred, target = cases()
    x = pred.clone().requires_grad_(True)
    want = TV[LOSS_OF[name]](x, target, reduction="none", eps=1e-7)
    want.sum().backward()
    got = Engine(device="cpu", warm=False, fast=fast).evaluate(name, pred, target, reduction="none",
                                                              return_grad=True, dtype="float64")
    np.testing.assert_allclose(got.loss.numpy(), want.detach().numpy(), **TOL.get(name, EXACT))
    np.testing.assert_allclose(got.grad.numpy(), x.grad.numpy(), **TOL.get(name, dict(rtol=1e-7, atol=1e-10)))


@pytest.mark.parametrize("name", sorted(METRIC_OF))
def test_pairwise_metrics_match_torchvision(engine, name):
    a, b = cases(300, seed=1)
    want = TV[METRIC_OF[name]](a, b).numpy()  # [N, M]
    got = engine.metric(name, a, b, pairwise=True, dtype="float64").numpy()
    np.testing.assert_allclose(got, want, **TOL.get(name, dict(rtol=1e-7, atol=1e-9)))


def test_sigmoid_focal_loss_matches_torchvision(engine):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(500, 7, generator=g, dtype=F64) * 4
    targets = (torch.rand(500, 7, generator=g, dtype=F64) > 0.8).to(F64)
    x = logits.clone().requires_grad_(True)
    want = TV["sigmoid_focal_loss"](x, targets, alpha=0.25, gamma=2.0, reduction="none").sum(1)  # lossd: per row
    want.sum().backward()
    got = engine.evaluate("focal", logits, targets, reduction="none", return_grad=True, dtype="float64")
    np.testing.assert_allclose(got.loss.numpy(), want.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.grad.numpy(), x.grad.numpy(), rtol=1e-8, atol=1e-12)
