"""Coordinate regression losses on z = pred - target, summed over all but the first dimension per sample
(over the 4 box coordinates, as in Fast R-CNN). pred/target are [N], [N, D] or [N, 4] numbers in whatever
parameterisation the caller regresses (box_format is not applied: the coordinates are compared as sent)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import fused as K
from ._utils import per_sample_sum
from .fastpath import CoordKernel
from .registry import Param, register_loss


FAST_RCNN = "Girshick, Fast R-CNN, ICCV 2015 (per-sample sum over coordinates)"


@register_loss("l1", kind="regression", inputs="regression", reference=FAST_RCNN, kernel=CoordKernel(K.L1))
def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1 = sum |z|. Gradient sign(z) (0 at z = 0)."""
    return per_sample_sum((pred - target).abs())


@register_loss("l2", kind="regression", inputs="regression", reference=FAST_RCNN, kernel=CoordKernel(K.L2))
def l2_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L2 = sum z^2 / 2. Gradient z."""
    z = pred - target
    return per_sample_sum(0.5 * z * z)


@register_loss("mse", kind="regression", inputs="regression", reference="squared error; torch.nn.MSELoss",
               kernel=CoordKernel(K.MSE))
def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """MSE = sum z^2 per sample (reduction 'mean' then averages samples, not elements)."""
    z = pred - target
    return per_sample_sum(z * z)


@register_loss("smooth_l1", kind="regression", inputs="regression", reference=FAST_RCNN + "; fvcore smooth_l1_loss",
               kernel=CoordKernel(K.SMOOTH_L1, beta="beta"),
               params=(Param("beta", 1.0, "where the quadratic part hands over to the linear part; < 1e-5 is L1",
                             min=0.0, max=1e6),))
def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    """Smooth L1 = sum (0.5 z^2 / beta if |z| < beta else |z| - 0.5 beta).

    beta < 1e-5 is computed as L1 (fvcore's rule), since 0.5 z^2 / beta would give NaN gradients at beta = 0."""
    a = (pred - target).abs()
    if beta < 1e-5:
        return per_sample_sum(a)
    return per_sample_sum(torch.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta))


@register_loss("huber", kind="regression", inputs="regression", reference="Huber, 1964; torch.nn.HuberLoss",
               kernel=CoordKernel(K.HUBER, beta="delta"),
               params=(Param("delta", 1.0, "where the quadratic part hands over to the linear part", min=0.0,
                             min_exclusive=True, max=1e6),))
def huber_loss(pred: Tensor, target: Tensor, delta: float = 1.0) -> Tensor:
    """Huber = sum (0.5 z^2 if |z| <= delta else delta (|z| - 0.5 delta)); equals beta * smooth_l1 at beta = delta."""
    a = (pred - target).abs()
    return per_sample_sum(torch.where(a <= delta, 0.5 * a * a, delta * (a - 0.5 * delta)))


@register_loss("balanced_l1", kind="regression", inputs="regression", reference="Pang et al., Libra R-CNN, CVPR 2019; "
               "mmdetection balanced_l1_loss", params=(
                   Param("alpha", 0.5, "gradient promotion of inliers", min=0.0, min_exclusive=True, max=10.0),
                   Param("gamma", 1.5, "upper bound of the gradient (outliers)", min=0.0, min_exclusive=True,
                         max=10.0),
                   Param("beta", 1.0, "inlier/outlier boundary", min=0.0, min_exclusive=True, max=1e6)))
def balanced_l1_loss(pred: Tensor, target: Tensor, alpha: float = 0.5, gamma: float = 1.5,
                     beta: float = 1.0) -> Tensor:
    """Balanced L1 = sum of: alpha/b (b|z| + 1) ln(b|z|/beta + 1) - alpha |z| if |z| < beta,
    else gamma |z| + gamma/b - alpha beta; b = e^(gamma/alpha) - 1 (continuous at |z| = beta)."""
    a = (pred - target).abs()
    b = math.exp(gamma / alpha) - 1
    inner = alpha / b * (b * a + 1) * torch.log(b * a / beta + 1) - alpha * a
    outer = gamma * a + gamma / b - alpha * beta
    return per_sample_sum(torch.where(a < beta, inner, outer))


@register_loss("quantile", kind="regression", inputs="regression", reference="Koenker & Bassett, Regression "
               "Quantiles, 1978 (pinball loss)", params=(
                   Param("q", 0.5, "the quantile; 0.5 is half the L1 loss", min=0.0, max=1.0, min_exclusive=True,
                         max_exclusive=True),))
def quantile_loss(pred: Tensor, target: Tensor, q: float = 0.5) -> Tensor:
    """Quantile (pinball) = sum (q (y - y_hat) if y >= y_hat else (1 - q)(y_hat - y)): under-estimates cost q,
    over-estimates 1 - q."""
    z = target - pred
    return per_sample_sum(torch.maximum(q * z, (q - 1) * z))
