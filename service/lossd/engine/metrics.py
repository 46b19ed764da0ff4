"""IoU-family similarities over broadcastable xyxy boxes ``[..., 4]`` (elementwise; pairwise by broadcasting).

Every function is a similarity: 1 for identical non-degenerate boxes, lower is worse. The box losses are built
from these, so a metric and its loss can never drift apart.
"""

from __future__ import annotations

from torch import Tensor
import torch

from . import fused as K
from ._utils import DEFAULT_EPS, ciou_alpha, pair, safe_sqrt
from .registry import Param, register_metric

EPS = Param("eps", DEFAULT_EPS, "added to denominators (union, enclosing diagonal); torchvision's placement",
            min=0.0, max=1e-2)


@register_metric("iou", reference="Jaccard index; torchvision.ops.box_iou", params=(EPS,), kernel=K.IOU)
def iou(boxes1: Tensor, boxes2: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Intersection over union: |A ∩ B| / (|A ∪ B| + eps). Disjoint or zero-area pairs give 0.

    The intersection is torchvision's strict mask: zero unless both overlaps are > 0 (touching boxes give 0)."""
    return pair(boxes1, boxes2, eps).iou()


@register_metric("giou", reference="Rezatofighi et al., Generalized IoU, CVPR 2019", params=(EPS,), kernel=K.GIOU)
def giou(boxes1: Tensor, boxes2: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """GIoU = IoU - |C \\ (A ∪ B)| / (|C| + eps), C the smallest enclosing box; in [-1, 1]."""
    p = pair(boxes1, boxes2, eps)
    inter, union = p.inter_union()
    cw, ch = p.enclosing_wh()
    area_c = cw * ch
    return inter / (union + eps) - (area_c - union) / (area_c + eps)


@register_metric("diou", reference="Zheng et al., Distance-IoU Loss, AAAI 2020", params=(EPS,), kernel=K.DIOU)
def diou(boxes1: Tensor, boxes2: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """DIoU = IoU - rho^2 / (c^2 + eps): rho the centre distance, c the enclosing box's diagonal."""
    p = pair(boxes1, boxes2, eps)
    return p.iou() - p.diou_penalty()


@register_metric("ciou", reference="Zheng et al., Distance-IoU Loss, AAAI 2020", params=(EPS,), kernel=K.CIOU)
def ciou(boxes1: Tensor, boxes2: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """CIoU = DIoU - alpha v, v = 4/pi^2 (atan(w2/h2) - atan(w1/h1))^2, alpha = v / (1 - IoU + v + eps)."""
    p = pair(boxes1, boxes2, eps)
    i = p.iou()
    v = p.aspect_v()
    return i - p.diou_penalty() - ciou_alpha(i, v, eps, "torchvision") * v


def eiou_penalty(p) -> Tensor:
    cw, ch = p.enclosing_wh()
    dw = p.w1 - p.w2
    dh = p.h1 - p.h2
    return p.diou_penalty() + dw * dw / (cw * cw + p.eps) + dh * dh / (ch * ch + p.eps)


@register_metric("eiou", reference="Zhang et al., Focal and Efficient IoU Loss, Neurocomputing 2022 "
                 "(arXiv 2101.08158)", params=(EPS,), kernel=K.EIOU)
def eiou(boxes1: Tensor, boxes2: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """EIoU = IoU - rho^2/c^2 - (w1 - w2)^2 / cw^2 - (h1 - h2)^2 / ch^2 (cw, ch the enclosing box's sides)."""
    p = pair(boxes1, boxes2, eps)
    return p.iou() - eiou_penalty(p)


def siou_costs(p, theta: float, distance_sign: str = "paper") -> tuple[Tensor, Tensor]:
    """SIoU's distance cost Delta (with its angle cost folded in) and shape cost Omega.

    Angle: Lambda = cos(2 asin(sin a) - pi/2) with sin a the smaller of |dx|/sigma, |dy|/sigma; this equals
    sin(2a) = 2 |dx| |dy| / sigma^2 exactly, computed without eps (so eps never shifts it). For coincident
    centres (sigma = 0), where the asin form divides 0 by 0 (YOLOv6 PR #582), Lambda is taken as 0: it multiplies
    rho = 0 there, so the value and gradient do not depend on it."""
    dx, dy = p.centre_delta()
    cw, ch = p.enclosing_wh()
    s2 = dx * dx + dy * dy
    apart = s2 > 0
    angle = torch.where(apart, 2 * dx.abs() * dy.abs() / torch.where(apart, s2, torch.ones_like(s2)),
                        torch.zeros_like(s2))
    gamma = 2 - angle
    rho_x = dx * dx / (cw * cw + p.eps)
    rho_y = dy * dy / (ch * ch + p.eps)
    if distance_sign == "paper":
        distance = (1 - torch.exp(-gamma * rho_x)) + (1 - torch.exp(-gamma * rho_y))
    else:  # mmdetection's neg_gamma=False default: Delta <= 0, so the cost falls as boxes separate
        distance = 2 - torch.exp(gamma * rho_x) - torch.exp(gamma * rho_y)
    w1, h1, w2, h2 = p.w1, p.h1, p.w2, p.h2
    omega_w = (w1 - w2).abs() / (torch.maximum(w1, w2) + p.eps)
    omega_h = (h1 - h2).abs() / (torch.maximum(h1, h2) + p.eps)
    shape = (1 - torch.exp(-omega_w)) ** theta + (1 - torch.exp(-omega_h)) ** theta
    return distance, shape


THETA = Param("theta", 4.0, "SIoU shape-cost exponent (the paper uses 4, range 2-6)", min=1.0, max=10.0)


@register_metric("siou", reference="Gevorgyan, SIoU Loss, arXiv 2205.12740", params=(EPS, THETA), kernel=K.SIOU)
def siou(boxes1: Tensor, boxes2: Tensor, eps: float = DEFAULT_EPS, theta: float = 4.0) -> Tensor:
    """SIoU = IoU - (Delta + Omega) / 2 with Delta = sum_t (1 - exp(-gamma rho_t)), gamma = 2 - Lambda,
    Omega = sum_t (1 - exp(-omega_t))^theta (the paper's form: the distance cost rises as boxes separate).

    The angle cost Lambda = sin(2 alpha) = 2 |dx| |dy| / sigma^2 is the paper's cos(2 arcsin(x) - pi/2) in closed
    form, computed without eps (mmdetection and YOLOv6 add eps inside it, which shifts it for small centre
    offsets); for coincident centres it is 0, where it multiplies a zero distance, so eps = 0 stays finite."""
    p = pair(boxes1, boxes2, eps)
    distance, shape = siou_costs(p, theta)
    return p.iou() - 0.5 * (distance + shape)


NWD_C = Param("constant", 12.8, "C, a dataset constant near the mean object size (12.8 for AI-TOD)",
              min=0.0, min_exclusive=True, max=1e6)


def wasserstein(p) -> Tensor:
    """W2 between the boxes' Gaussians N((cx, cy), diag(w^2/4, h^2/4))."""
    dx, dy = p.centre_delta()
    dw = 0.5 * (p.w1 - p.w2)
    dh = 0.5 * (p.h1 - p.h2)
    return safe_sqrt(dx * dx + dy * dy + dw * dw + dh * dh)


@register_metric("nwd", reference="Wang et al., Normalized Gaussian Wasserstein Distance, arXiv 2110.13389",
                 params=(NWD_C,))
def nwd(boxes1: Tensor, boxes2: Tensor, constant: float = 12.8) -> Tensor:
    """NWD = exp(-W2 / C), W2^2 = ||(cx1, cy1, w1/2, h1/2) - (cx2, cy2, w2/2, h2/2)||^2. The square root has a
    zero subgradient at W2 = 0 instead of adding eps inside it, so identical boxes give exactly 1."""
    return torch.exp(-wasserstein(pair(boxes1, boxes2, 0.0)) / constant)
