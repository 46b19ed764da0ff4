"""Pieces shared by the box losses and metrics: format conversion, intersection/union, enclosing box,
safe square root, and the stop-gradient used for every documented detached term."""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
DEFAULT_EPS = 1e-7  # torchvision's eps for its IoU-family losses


def overflow_bound(dtype_max: float) -> float:
    """Inputs with |v| up to this cannot overflow any loss's squares, products or sums of four squares in a dtype
    whose largest value is dtype_max: a non-finite result from them can only be a division by zero (eps = 0)."""
    return math.sqrt(dtype_max) / 8


def to_xyxy(boxes: Tensor, box_format: str) -> Tensor:
    """Convert [..., 4] boxes to (x1, y1, x2, y2); differentiable, so gradients come back in the caller's format."""
    if box_format == "xyxy":
        return boxes
    a, b, c, d = boxes.unbind(-1)
    if box_format == "xywh":  # left, top, width, height (COCO)
        return torch.stack((a, b, a + c, b + d), dim=-1)
    if box_format == "cxcywh":  # centre, width, height (YOLO)
        return torch.stack((a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d), dim=-1)
    raise AssertionError(box_format)


# ---------------------------------------------------------------------------------------------------------------
# stop-gradient with record/replay, so a test can hold a detached term constant while it differentiates numerically

@dataclass
class _Frozen:
    mode: str  # "record" | "replay"
    values: list = field(default_factory=list)
    i: int = 0


_FROZEN: contextvars.ContextVar[_Frozen | None] = contextvars.ContextVar("lossd_frozen", default=None)


def stop_gradient(t: Tensor) -> Tensor:
    """``t.detach()``. Inside ``frozen_detached()`` the first call of each detached term records its value and
    later calls replay it, so finite differences see the same constant that autograd treats as constant."""
    if torch.compiler.is_compiling():  # never frozen there, and ContextVar.get would break the compiled graph
        return t.detach()
    store = _FROZEN.get()
    if store is None:
        return t.detach()
    if store.mode == "record":
        store.values.append(t.detach().clone())
        return t.detach()
    value = store.values[store.i]
    store.i += 1
    return value


@contextlib.contextmanager
def frozen_detached() -> Iterator[callable]:
    """Record the detached terms of the first evaluation; replay them on every later one.

        with frozen_detached() as fresh:
            f(x0)            # records alpha(x0)
            gradcheck(f, x0) # every call uses alpha(x0)
    """
    store = _Frozen("record")
    token = _FROZEN.set(store)
    try:
        def replay_next() -> None:
            store.mode = "replay"
            store.i = 0
        yield replay_next
    finally:
        _FROZEN.reset(token)


def per_sample_sum(x: Tensor) -> Tensor:
    """Sum over all but the first dimension: [N, ...] -> [N] ([N] stays as it is)."""
    return x.flatten(1).sum(dim=1) if x.dim() > 1 else x


def safe_sqrt(x: Tensor) -> Tensor:
    """sqrt(x) for x >= 0 whose gradient at x == 0 is 0 rather than inf (a subgradient of the norm)."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------------------------
# geometry of two broadcastable sets of xyxy boxes

@dataclass
class Pair:
    """Intermediate quantities of boxes1 vs boxes2 (broadcast), computed once and shared by the IoU family."""

    x1: Tensor
    y1: Tensor
    x2: Tensor
    y2: Tensor
    X1: Tensor
    Y1: Tensor
    X2: Tensor
    Y2: Tensor
    eps: float

    @property
    def w1(self) -> Tensor:
        return self.x2 - self.x1

    @property
    def h1(self) -> Tensor:
        return self.y2 - self.y1

    @property
    def w2(self) -> Tensor:
        return self.X2 - self.X1

    @property
    def h2(self) -> Tensor:
        return self.Y2 - self.Y1

    def inter_union(self) -> tuple[Tensor, Tensor]:
        # torchvision's strict mask (ops/_utils.py, _loss_inter_union): the intersection and its gradient are zero
        # unless both overlaps are > 0. A clamp(min=0) agrees for disjoint boxes but lets a one-sided gradient
        # through where boxes touch along an edge (overlap exactly 0); the mask gives zero there.
        iw = torch.minimum(self.x2, self.X2) - torch.maximum(self.x1, self.X1)
        ih = torch.minimum(self.y2, self.Y2) - torch.maximum(self.y1, self.Y1)
        overlap = (iw > 0) & (ih > 0)
        inter = torch.where(overlap, iw * ih, torch.zeros_like(iw))
        union = self.w1 * self.h1 + self.w2 * self.h2 - inter
        return inter, union

    def iou(self) -> Tensor:
        inter, union = self.inter_union()
        return inter / (union + self.eps)

    def enclosing_wh(self) -> tuple[Tensor, Tensor]:
        cw = torch.maximum(self.x2, self.X2) - torch.minimum(self.x1, self.X1)
        ch = torch.maximum(self.y2, self.Y2) - torch.minimum(self.y1, self.Y1)
        return cw, ch

    def centre_delta(self) -> tuple[Tensor, Tensor]:
        """(target centre - pred centre) in x and y."""
        dx = 0.5 * ((self.X1 + self.X2) - (self.x1 + self.x2))
        dy = 0.5 * ((self.Y1 + self.Y2) - (self.y1 + self.y2))
        return dx, dy

    def diou_penalty(self) -> Tensor:
        """rho^2 / (c^2 + eps): squared centre distance over the enclosing box's squared diagonal."""
        cw, ch = self.enclosing_wh()
        dx, dy = self.centre_delta()
        return (dx * dx + dy * dy) / (cw * cw + ch * ch + self.eps)

    def aspect_v(self) -> Tensor:
        """v = 4/pi^2 (atan(w2/h2) - atan(w1/h1))^2.

        eps sits in the ratio's denominator only: torchvision has none there and gives w/0 for h == 0; with it a
        zero-height box has atan -> pi/2 and stays finite. For ordinary boxes the change is below 1e-7 relative."""
        a1 = torch.atan(self.w1 / (self.h1 + self.eps))
        a2 = torch.atan(self.w2 / (self.h2 + self.eps))
        return (4 / math.pi**2) * (a2 - a1) ** 2


def pair(boxes1: Tensor, boxes2: Tensor, eps: float) -> Pair:
    x1, y1, x2, y2 = boxes1.unbind(-1)
    X1, Y1, X2, Y2 = boxes2.unbind(-1)
    return Pair(x1, y1, x2, y2, X1, Y1, X2, Y2, eps)


def ciou_alpha(iou: Tensor, v: Tensor, eps: float, rule: str) -> Tensor:
    """CIoU's trade-off weight alpha = v / (1 - IoU + v), under one of the published conventions:
    "torchvision": detached, eps in the denominator (torchvision, detectron2, ultralytics);
    "mmdet": detached and zero where IoU <= 0.5 (CIoU-v2, Zheng et al. TCYB; mmdetection 3.x);
    "attached": not detached, so the gradient also flows through alpha (mmdetection 2.x)."""
    # 0 where v = 0 (alpha v -> 0 there on every path; the quotient is 0/0 for identical boxes when eps = 0);
    # the denominator is made safe first so the branch not taken gives no NaN gradient either
    some = v > 0
    quotient = v / torch.where(some, 1 - iou + v + eps, torch.ones_like(v))
    if rule == "attached":
        return torch.where(some, quotient, torch.zeros_like(v))
    alpha = stop_gradient(torch.where(some, quotient, torch.zeros_like(v)))
    if rule == "mmdet":
        alpha = alpha * stop_gradient((iou > 0.5).to(alpha.dtype))
    return alpha
