"""Every catalog entry against a reference written here, from the papers, independently of the engine.

Nothing below imports the engine's loss code: each reference is the paper's formula in plain torch (float64),
its gradient is torch autograd of that formula, and the engine is called only through ``Engine.evaluate`` and
``Engine.metric``, on both routes (the fused kernels, fast="auto", and the autograd reference, fast="off").

Where the papers leave a choice open, the reference takes lossd's documented convention and says so in place:
  * eps placement is torchvision's (``inter / (union + eps)``, ``rho^2 / (c^2 + eps)``, ``(C - U) / (C + eps)``);
  * the intersection is torchvision's strict mask (``_loss_inter_union``: ``mask = (iy2 > iy1) & (ix2 > ix1)``):
    zero, with zero gradient, unless both overlaps are > 0, so boxes that touch along an edge or at a corner get
    no gradient through it;
  * min/max ties split the gradient (torch's rule, which torchvision inherits); |x| and sqrt have gradient 0 at 0;
  * clamp/max(0, .) pass the gradient at the boundary (torch.clamp's rule).
DEVIATIONS lists where lossd departs from a public library on purpose; a test checks the catalog states each.

Tolerances: values 1e-6 and gradients 1e-5 (absolute and relative), in both dtypes; float32 results are compared
with the float64 reference on the same float32-rounded input.
"""

from __future__ import annotations

import math

import pytest
import torch

from lossd.engine import LOSSES, METRICS, Engine, EngineError

F64 = torch.float64
FORMATS = ("xyxy", "xywh", "cxcywh")
TOL = {"float64": dict(values=1e-6, grads=1e-5), "float32": dict(values=1e-6, grads=1e-5)}


# ---------------------------------------------------------------------------------------------------------------
# box geometry, from torchvision's ops/_utils.py and the papers' definitions

def from_xyxy(b: torch.Tensor, fmt: str) -> torch.Tensor:
    x1, y1, x2, y2 = b.unbind(-1)
    if fmt == "xywh":
        return torch.stack((x1, y1, x2 - x1, y2 - y1), -1)
    if fmt == "cxcywh":
        return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), -1)
    return b


def to_xyxy(b: torch.Tensor, fmt: str) -> torch.Tensor:
    a, c, e, f = b.unbind(-1)
    if fmt == "xywh":
        return torch.stack((a, c, a + e, c + f), -1)
    if fmt == "cxcywh":
        return torch.stack((a - e / 2, c - f / 2, a + e / 2, c + f / 2), -1)
    return b


def sqrt0(x: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 at 0 (lossd's stated subgradient; the paper formulas are not differentiable there)."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


class Geo:
    """Pred box (x1, y1, x2, y2) against target box (gx1, gy1, gx2, gy2), both [N]."""

    def __init__(self, p: torch.Tensor, g: torch.Tensor, eps: float) -> None:
        self.eps = eps
        self.x1, self.y1, self.x2, self.y2 = p.unbind(-1)
        self.gx1, self.gy1, self.gx2, self.gy2 = g.unbind(-1)
        self.w, self.h = self.x2 - self.x1, self.y2 - self.y1
        self.gw, self.gh = self.gx2 - self.gx1, self.gy2 - self.gy1
        # torchvision's _loss_inter_union, verbatim in substance: a masked assignment
        ix1, iy1 = torch.max(self.x1, self.gx1), torch.max(self.y1, self.gy1)
        ix2, iy2 = torch.min(self.x2, self.gx2), torch.min(self.y2, self.gy2)
        inter = torch.zeros_like(self.x1)
        mask = (iy2 > iy1) & (ix2 > ix1)
        inter[mask] = (ix2[mask] - ix1[mask]) * (iy2[mask] - iy1[mask])
        self.inter = inter
        self.union = self.w * self.h + self.gw * self.gh - inter
        self.iou = inter / (self.union + eps)
        self.cw = torch.max(self.x2, self.gx2) - torch.min(self.x1, self.gx1)
        self.ch = torch.max(self.y2, self.gy2) - torch.min(self.y1, self.gy1)
        self.dx = (self.gx1 + self.gx2) / 2 - (self.x1 + self.x2) / 2
        self.dy = (self.gy1 + self.gy2) / 2 - (self.y1 + self.y2) / 2
        self.rho2 = self.dx**2 + self.dy**2
        self.c2 = self.cw**2 + self.ch**2 + eps

    def aspect_v(self) -> torch.Tensor:
        # Zheng et al.: v = 4/pi^2 (atan(w_gt/h_gt) - atan(w/h))^2; lossd adds eps to h (torchvision has none and
        # gives w/0 for a zero-height box)
        gt_angle = torch.atan(self.gw / (self.gh + self.eps))
        return 4 / math.pi**2 * (gt_angle - torch.atan(self.w / (self.h + self.eps))) ** 2

    def ciou_alpha(self, v: torch.Tensor, rule: str = "torchvision") -> torch.Tensor:
        a = v / (1 - self.iou + v + self.eps)
        if rule == "attached":  # mmdetection 2.x: the gradient flows through alpha
            return a
        a = a.detach()  # torchvision, detectron2, ultralytics
        if rule == "mmdet":  # CIoU-v2 (Zheng et al., TCYB): alpha = 0 unless IoU > 0.5
            a = a * (self.iou > 0.5).to(a.dtype)
        return a


# ---------------------------------------------------------------------------------------------------------------
# box losses and metrics, per sample

def r_iou(g: Geo, mode: str = "linear") -> torch.Tensor:
    if mode == "log":  # UnitBox -ln IoU, floored at eps as mmdetection floors it (finite for disjoint boxes)
        return -torch.log(torch.clamp(g.iou, min=max(g.eps, 1e-12)))
    if mode == "square":
        return 1 - g.iou**2
    return 1 - g.iou


def m_giou(g: Geo) -> torch.Tensor:  # Rezatofighi et al.: IoU - |C \ U| / |C|
    area_c = g.cw * g.ch
    return g.iou - (area_c - g.union) / (area_c + g.eps)


def m_diou(g: Geo) -> torch.Tensor:  # Zheng et al.: IoU - rho^2 / c^2
    return g.iou - g.rho2 / g.c2


def m_ciou(g: Geo, rule: str = "torchvision") -> torch.Tensor:
    v = g.aspect_v()
    return m_diou(g) - g.ciou_alpha(v, rule) * v


def m_eiou(g: Geo) -> torch.Tensor:  # Zhang et al. (Focal-EIoU): width and height terms over the enclosing sides
    return m_diou(g) - (g.w - g.gw) ** 2 / (g.cw**2 + g.eps) - (g.h - g.gh) ** 2 / (g.ch**2 + g.eps)


def siou_terms(g: Geo, theta: float, sign: str = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """Gevorgyan, SIoU: Lambda = 1 - 2 sin^2(arcsin(x) - pi/4), x = c_h / sigma, switched to c_w / sigma when
    x > sin(pi/4) (the paper's alpha vs beta = pi/2 - alpha); written here in the paper's arcsin form."""
    s2 = g.dx**2 + g.dy**2
    apart = s2 > 0
    sigma = torch.sqrt(torch.where(apart, s2, torch.ones_like(s2)))
    x = g.dy.abs() / sigma
    x = torch.where(x > math.sqrt(2) / 2, g.dx.abs() / sigma, x)
    x = torch.where(apart, x, torch.zeros_like(x))  # coincident centres: Lambda multiplies rho = 0
    lam = 1 - 2 * torch.sin(torch.arcsin(x) - math.pi / 4) ** 2
    gamma = 2 - lam
    rho_x = g.dx**2 / (g.cw**2 + g.eps)
    rho_y = g.dy**2 / (g.ch**2 + g.eps)
    if sign == "paper":
        delta = (1 - torch.exp(-gamma * rho_x)) + (1 - torch.exp(-gamma * rho_y))
    else:  # mmdetection's neg_gamma=False: Delta = 2 - e^(gamma rho_x) - e^(gamma rho_y)
        delta = 2 - torch.exp(gamma * rho_x) - torch.exp(gamma * rho_y)
    om_w = (g.w - g.gw).abs() / (torch.max(g.w, g.gw) + g.eps)
    om_h = (g.h - g.gh).abs() / (torch.max(g.h, g.gh) + g.eps)
    omega = (1 - torch.exp(-om_w)) ** theta + (1 - torch.exp(-om_h)) ** theta
    return delta, omega


def m_siou(g: Geo, theta: float = 4.0) -> torch.Tensor:
    delta, omega = siou_terms(g, theta)
    return g.iou - (delta + omega) / 2


def r_siou(g: Geo, theta: float = 4.0, distance_sign: str = "paper") -> torch.Tensor:
    delta, omega = siou_terms(g, theta, distance_sign)
    return 1 - g.iou + (delta + omega) / 2


def w2(g: Geo) -> torch.Tensor:
    """Wang et al.: W2 between N((cx, cy), diag(w^2/4, h^2/4)) and the target's."""
    return sqrt0(g.dx**2 + g.dy**2 + ((g.w - g.gw) / 2) ** 2 + ((g.h - g.gh) / 2) ** 2)


def r_eiou(g: Geo, gamma: float = 0.0) -> torch.Tensor:
    base = 1 - m_eiou(g)
    if gamma == 0:
        return base
    return torch.clamp(g.iou, min=0).detach() ** gamma * base  # IoU^gamma as a detached weight


def r_cdiou(g: Geo, lam: float = 1.0) -> torch.Tensor:
    """Chen & Miao: (AE + BF + CG + DH) / (4 WY), corresponding corners over 4x the enclosing diagonal."""
    pts = ((g.x1, g.y1, g.gx1, g.gy1), (g.x2, g.y1, g.gx2, g.gy1), (g.x2, g.y2, g.gx2, g.gy2),
           (g.x1, g.y2, g.gx1, g.gy2))
    dist = sum(sqrt0((a - c) ** 2 + (b - d) ** 2) for a, b, c, d in pts)
    return 1 - g.iou + lam * dist / (4 * sqrt0(g.cw**2 + g.ch**2) + g.eps)


def r_alpha_iou(g: Geo, alpha: float = 3.0, penalty: str = "none") -> torch.Tensor:
    """He et al.: 1 - IoU^a + R^a, the paper's exact powers."""
    loss = 1 - g.iou**alpha
    if penalty == "giou":
        area_c = g.cw * g.ch
        loss = loss + torch.clamp((area_c - g.union) / (area_c + g.eps), min=0) ** alpha
    elif penalty in ("diou", "ciou"):
        loss = loss + (g.rho2 / g.c2) ** alpha
        if penalty == "ciou":
            v = g.aspect_v()
            loss = loss + (g.ciou_alpha(v) * v) ** alpha
    return loss


def r_wiou(g: Geo, version: str = "v1", iou_mean: float = 1.0, gamma: float = 0.5, alpha: float = 1.9,
           delta: float = 3.0) -> torch.Tensor:
    """Tong et al.: v1 = exp(rho^2 / (Wg^2 + Hg^2)*) L_IoU; v2 = (L_IoU*/mean)^gamma v1; v3 = r v1."""
    l_iou = 1 - g.iou
    v1 = torch.exp(g.rho2 / ((g.cw**2 + g.ch**2).detach() + g.eps)) * l_iou
    beta = l_iou.detach() / iou_mean
    if version == "v2":
        return beta**gamma * v1
    if version == "v3":
        return beta / (delta * alpha ** (beta - delta)) * v1
    return v1


def r_mpdiou(g: Geo, image_width: float = 640.0, image_height: float = 640.0,
             normalizer: str = "image") -> torch.Tensor:
    """Ma & Xu: 1 - IoU + d1^2 / (w^2 + h^2) + d2^2 / (w^2 + h^2), (w, h) the image."""
    d1 = (g.x1 - g.gx1) ** 2 + (g.y1 - g.gy1) ** 2
    d2 = (g.x2 - g.gx2) ** 2 + (g.y2 - g.gy2) ** 2
    norm = image_width**2 + image_height**2 if normalizer == "image" else g.cw**2 + g.ch**2 + g.eps
    return 1 - g.iou + (d1 + d2) / norm


def inner_box(b: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zhang, Xu & Zhang: b_l = x_c - w ratio / 2, b_r = x_c + w ratio / 2 (and t/b alike)."""
    x1, y1, x2, y2 = b.unbind(-1)
    xc, yc, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    return torch.stack((xc - w * ratio / 2, yc - h * ratio / 2, xc + w * ratio / 2, yc + h * ratio / 2), -1)


def box_loss_ref(name: str):
    """pred, target xyxy [N, 4] -> per-sample loss [N]."""
    def ref(p, t, eps=1e-7, **kw):
        g = Geo(p, t, eps)
        if name == "iou":
            return r_iou(g, **kw)
        if name == "giou":
            return 1 - m_giou(g)
        if name == "diou":
            return 1 - m_diou(g)
        if name == "ciou":
            return 1 - m_ciou(g, kw.get("alpha_rule", "torchvision"))
        if name == "eiou":
            return r_eiou(g, **kw)
        if name == "cdiou":
            return r_cdiou(g, kw.get("lambda", 1.0))
        if name == "siou":
            return r_siou(g, **kw)
        if name == "alpha_iou":
            return r_alpha_iou(g, **kw)
        if name == "wiou":
            return r_wiou(g, **kw)
        if name == "mpdiou":
            return r_mpdiou(g, **kw)
        if name == "inner_iou":
            ratio, base = kw.get("ratio", 0.7), kw.get("base", "iou")
            inner = Geo(inner_box(p, ratio), inner_box(t, ratio), eps).iou
            if base == "iou":
                return 1 - inner
            base_loss = {"giou": 1 - m_giou(g), "diou": 1 - m_diou(g), "ciou": 1 - m_ciou(g)}[base]
            return base_loss + g.iou - inner
        raise AssertionError(name)
    return ref


def r_nwd(p, t, constant=12.8):
    return 1 - torch.exp(-w2(Geo(p, t, 0.0)) / constant)


def softplus(x):
    """log(1 + e^x), stable, and smooth at 0 (its derivative is sigmoid(x))."""
    return torch.logaddexp(torch.zeros_like(x), x)


def bce_logits(x, t, pos_weight=1.0):
    """-(w t log sigma(x) + (1 - t) log(1 - sigma(x))), with log sigma(x) = -softplus(-x)."""
    return pos_weight * t * softplus(-x) + (1 - t) * softplus(x)


def r_iou_aware(p, t, eps=1e-7):
    """Wu, Li & Wang: BCE(z, IoU*), the IoU target detached."""
    target_iou = Geo(p[:, :4], t, eps).iou.detach()
    return bce_logits(p[:, 4], target_iou)


BOX_LOSS_REFS = {n: box_loss_ref(n) for n in ("iou", "giou", "diou", "ciou", "eiou", "cdiou", "siou", "alpha_iou",
                                              "wiou", "mpdiou", "inner_iou")}
BOX_LOSS_REFS["nwd"] = r_nwd
BOX_LOSS_REFS["iou_aware"] = r_iou_aware

METRIC_REFS = {
    "iou": lambda a, b, eps=1e-7: Geo(a, b, eps).iou,
    "giou": lambda a, b, eps=1e-7: m_giou(Geo(a, b, eps)),
    "diou": lambda a, b, eps=1e-7: m_diou(Geo(a, b, eps)),
    "ciou": lambda a, b, eps=1e-7: m_ciou(Geo(a, b, eps)),
    "eiou": lambda a, b, eps=1e-7: m_eiou(Geo(a, b, eps)),
    "siou": lambda a, b, eps=1e-7, theta=4.0: m_siou(Geo(a, b, eps), theta),
    "nwd": lambda a, b, constant=12.8: torch.exp(-w2(Geo(a, b, 0.0)) / constant),
}


# ---------------------------------------------------------------------------------------------------------------
# regression and classification losses, per sample (summed over all but the first dimension)

def rowsum(x):
    return x.reshape(x.shape[0], -1).sum(1)


def log_softmax(x):
    return x - torch.logsumexp(x, dim=1, keepdim=True)


def r_smooth_l1(p, t, beta=1.0):
    a = (p - t).abs()
    if beta < 1e-5:  # fvcore's rule: L1 below 1e-5
        return rowsum(a)
    return rowsum(torch.where(a < beta, 0.5 * a**2 / beta, a - 0.5 * beta))


def r_balanced_l1(p, t, alpha=0.5, gamma=1.5, beta=1.0):
    """Pang et al. (Libra R-CNN), eq. 9: b = e^(gamma/alpha) - 1."""
    a = (p - t).abs()
    b = math.exp(gamma / alpha) - 1
    inner = alpha / b * (b * a + 1) * torch.log(b * a / beta + 1) - alpha * a
    return rowsum(torch.where(a < beta, inner, gamma * a + gamma / b - alpha * beta))


def r_cross_entropy(x, t, label_smoothing=0.0, ignore_index=-100, class_weights=None):
    c = x.shape[1]
    w = torch.ones(c, dtype=x.dtype) if class_weights is None else torch.tensor(class_weights, dtype=x.dtype)
    lp = log_softmax(x)
    if t.dtype.is_floating_point:  # soft targets q, smoothed toward uniform
        q = t * (1 - label_smoothing) + label_smoothing / c
        return -(q * w * lp).sum(1)
    keep = t != ignore_index
    idx = torch.where(keep, t, torch.zeros_like(t))
    nll = -w[idx] * lp.gather(1, idx[:, None])[:, 0]
    smooth = -(w * lp).sum(1) / c
    return torch.where(keep, (1 - label_smoothing) * nll + label_smoothing * smooth, torch.zeros_like(nll))


def r_nll(x, t, ignore_index=-100, class_weights=None):
    w = torch.ones(x.shape[1], dtype=x.dtype) if class_weights is None else torch.tensor(class_weights, dtype=x.dtype)
    keep = t != ignore_index
    idx = torch.where(keep, t, torch.zeros_like(t))
    return torch.where(keep, -w[idx] * x.gather(1, idx[:, None])[:, 0], torch.zeros(x.shape[0], dtype=x.dtype))


def r_bce(p, t):
    # torch (and so lossd) clamps each log at -100
    return rowsum(-(t * torch.clamp(torch.log(p), min=-100) + (1 - t) * torch.clamp(torch.log(1 - p), min=-100)))


def pow0(base, e):
    """base^e with gradient 0 at base 0 for every e > 0 (lossd's stated rule; (1 - p_t)^gamma at p_t = 1)."""
    if e == 0:
        return torch.ones_like(base)
    pos = base > 0
    return torch.where(pos, torch.where(pos, base, torch.ones_like(base)) ** e, torch.zeros_like(base))


def r_focal(x, t, alpha=0.25, gamma=2.0):
    """Lin et al.: alpha_t (1 - p_t)^gamma CE, p_t = p t + (1 - p)(1 - t)."""
    p = torch.sigmoid(x)
    one_minus_pt = 1 - (p * t + (1 - p) * (1 - t))
    loss = bce_logits(x, t) * pow0(one_minus_pt, gamma)
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return rowsum(loss)


def r_varifocal(x, q, alpha=0.75, gamma=2.0, iou_weighted=True):
    """Zhang et al. (VarifocalNet): BCE(x, q) weighted by q (q > 0) or alpha p^gamma (q = 0; |p - q| as mmdet)."""
    pos = (q > 0).to(x.dtype)
    w_pos = (q if iou_weighted else torch.ones_like(q)) * pos
    w = w_pos + alpha * pow0((torch.sigmoid(x) - q).abs(), gamma) * (1 - pos)
    return rowsum(bce_logits(x, q) * w)


def r_quality_focal(x, y, beta=2.0):
    """Li et al. (GFL): -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log sigma)."""
    return rowsum(bce_logits(x, y) * pow0((y - torch.sigmoid(x)).abs(), beta))


def r_distribution_focal(x, y):
    """Li et al. (GFL): -((y_r - y) log S_l + (y - y_l) log S_r); y = B - 1 uses the last two bins."""
    lp = log_softmax(x)
    left = torch.clamp(torch.floor(y), max=x.shape[1] - 2).long()
    right = left + 1
    return (-lp.gather(1, left[:, None])[:, 0] * (right.to(x.dtype) - y)
            - lp.gather(1, right[:, None])[:, 0] * (y - left.to(x.dtype)))


def r_dice(p, t, smooth=1.0):
    """Milletari et al.: 1 - (2 sum p t + s) / (sum p + sum t + s); a [N] input is N samples of one value."""
    p, t = p.reshape(p.shape[0], -1), t.reshape(t.shape[0], -1)
    return 1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def r_tversky(p, t, alpha=0.5, beta=0.5, smooth=1.0):
    """Salehi et al.: 1 - (TP + s) / (TP + alpha FP + beta FN + s)."""
    p, t = p.reshape(p.shape[0], -1), t.reshape(t.shape[0], -1)
    tp, fp, fn = (p * t).sum(1), (p * (1 - t)).sum(1), ((1 - p) * t).sum(1)
    return 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def signed(y):  # labels in {-1, +1}, 0 read as -1
    return torch.where(y > 0, torch.ones_like(y), -torch.ones_like(y))


OTHER_REFS = {
    "l1": lambda p, t: rowsum((p - t).abs()),
    "l2": lambda p, t: rowsum((p - t) ** 2 / 2),
    "mse": lambda p, t: rowsum((p - t) ** 2),
    "smooth_l1": r_smooth_l1,
    "huber": lambda p, t, delta=1.0: rowsum(torch.where((p - t).abs() <= delta, (p - t) ** 2 / 2,
                                                        delta * ((p - t).abs() - delta / 2))),
    "balanced_l1": r_balanced_l1,
    # Koenker & Bassett: q (y - yhat) if y >= yhat else (1 - q)(yhat - y), as max(q z, (q - 1) z)
    "quantile": lambda p, t, q=0.5: rowsum(torch.max(q * (t - p), (q - 1) * (t - p))),
    "cross_entropy": r_cross_entropy,
    "nll": r_nll,
    "bce": r_bce,
    "bce_with_logits": lambda x, t, pos_weight=1.0: rowsum(bce_logits(x, t, pos_weight)),
    # Kullback-Leibler: sum q (log q - log softmax x), 0 log 0 = 0
    "kl_div": lambda x, q: (torch.xlogy(q, q) - q * log_softmax(x)).sum(1),
    "focal": r_focal,
    "varifocal": r_varifocal,
    "quality_focal": r_quality_focal,
    "distribution_focal": r_distribution_focal,
    "dice": r_dice,
    "tversky": r_tversky,
    "hinge": lambda f, y, margin=1.0: rowsum(torch.clamp(margin - signed(y) * f, min=0)),
    "perceptron": lambda f, y: rowsum(torch.clamp(-signed(y) * f, min=0)),
    "exponential": lambda f, y: rowsum(torch.exp(-signed(y) * f)),
    "margin_ranking": lambda x, y, margin=0.0: torch.clamp(-y * (x[:, 0] - x[:, 1]) + margin, min=0),
    "hinge_embedding": lambda x, y, margin=1.0: rowsum(torch.where(y > 0, x, torch.clamp(margin - x, min=0))),
}

LOSS_REFS = {**BOX_LOSS_REFS, **OTHER_REFS}

# Deliberate departures from a public library: (entry, library and what it does, why lossd differs, a phrase the
# catalog entry's doc must contain so users read it there too).
DEVIATIONS = [
    ("iou", "ultralytics and mmdetection clamp each overlap at 0, which passes a one-sided gradient where boxes "
     "touch", "lossd follows torchvision's strict mask (checked against torchvision's numbers below)",
     "torchvision's strict mask"),
    ("iou", "mmdetection IoULoss(mode='log') floors IoU at its eps 1e-6", "lossd floors at the loss's own eps",
     "clamps IoU at eps"),
    ("ciou", "torchvision.ops.complete_box_iou_loss has no eps in atan(w/h)",
     "h = 0 gives w/0 there; with eps a zero-height box stays finite", "torchvision has none there"),
    ("siou", "mmdetection/mmyolo clamp the SIoU value to [-1, 1]", "the clamp zeroes far-apart boxes' gradient",
     "No clamp"),
    ("cdiou", "the authors' code divides the corner distances by 16", "the paper's formula (4) is used",
     "divides by 16"),
    ("alpha_iou", "the authors' code raises each axis separately for DIoU/CIoU",
     "that is not (rho^2/c^2)^alpha; the paper's exact power is used", "exact powers"),
    ("eiou", "mmdetection's EIoULoss is Extended-IoU (Peng & Yu), a different loss", "the name follows Zhang et al.",
     "not mmdetection's EIoULoss"),
]
METRIC_DEVIATIONS = [
    ("nwd", "public implementations add eps inside the square root", "a zero subgradient instead, so identical boxes "
     "give exactly 1", "zero subgradient"),
    ("siou", "mmdetection and YOLOv6 put eps inside the angle term", "eps shifted Lambda for small centre offsets "
     "(issue 19: 1.39917 instead of the paper's 1.39721)", "computed without eps"),
]


# ---------------------------------------------------------------------------------------------------------------
# inputs: the edge cases and random pixel pairs, in xyxy (converted to every format below)

EDGE_CASES = {  # name: (pred, target)
    "identical": ([0, 0, 10, 10], [0, 0, 10, 10]),
    "contained": ([2, 2, 6, 7], [0, 0, 10, 10]),
    "contains": ([0, 0, 10, 10], [3, 1, 8, 4]),
    "disjoint": ([0, 0, 4, 4], [10, 12, 15, 20]),
    "touching edge x": ([0, 0, 10, 10], [10, 0, 20, 10]),
    "touching edge y": ([0, 0, 10, 10], [2, 10, 12, 25]),
    "touching edge inside": ([0, 0, 10, 10], [3, 10, 7, 14]),
    "touching corner": ([0, 0, 10, 10], [10, 10, 20, 20]),
    "touching corner below": ([5, 5, 10, 10], [10, 0, 13, 5]),
    "same centre": ([0, 0, 10, 10], [2, 3, 8, 7]),
    "same centre cross": ([0, 3, 10, 7], [3, 0, 7, 10]),
    "very thin": ([0, 0, 1e-3, 10], [0, 0, 2e-3, 10]),
    "very flat": ([0, 0, 100, 0.01], [10, 0.005, 90, 0.02]),
    "huge": ([0, 0, 1e6, 1e6], [1e5, 2e5, 1.2e6, 9e5]),
    "tiny": ([0, 0, 1e-3, 1e-3], [5e-4, 2e-4, 1.4e-3, 1.1e-3]),
    "small offsets (issue 19)": ([0.001, 0.002, 0.002, 0.003], [0.004, 0.004, 0.005, 0.0055]),
    "same x centre": ([0, 0, 10, 10], [2, 4, 8, 20]),
}


def box_pairs(seed: int = 19, n_random: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pred = torch.tensor([p for p, _ in EDGE_CASES.values()], dtype=F64)
    target = torch.tensor([t for _, t in EDGE_CASES.values()], dtype=F64)
    # pixel coordinates: integer corners in a 64 px image, so exact ties (shared edges, touching) are common
    a = torch.randint(0, 64, (n_random, 2, 2), generator=gen).to(F64)
    b = torch.randint(0, 64, (n_random, 2, 2), generator=gen).to(F64)
    rp = torch.cat((a.min(1).values, a.max(1).values), 1)
    rt = torch.cat((b.min(1).values, b.max(1).values), 1)
    return torch.cat((pred, rp)), torch.cat((target, rt))


PRED, TARGET = box_pairs()
CASE_NAMES = list(EDGE_CASES) + [f"random pair {k}" for k in range(PRED.shape[0] - len(EDGE_CASES))]


def other_inputs(inputs: str, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pred, target) batches for the non-box input kinds: edge values first, then random ones."""
    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=F64)

    def r(*s):
        return torch.rand(*s, generator=gen, dtype=F64)

    if inputs == "regression":
        z = torch.tensor([[0.0, 1.0, -1.0, 0.5], [1e-6, -1e-6, 3.0, -7.0]], dtype=F64)
        return [(torch.cat((z, rn(8, 4) * 2)), torch.cat((torch.zeros(2, 4, dtype=F64), rn(8, 4)))),
                (rn(6) * 3, rn(6))]
    if inputs == "class_logits":
        return [(rn(10, 5) * 3, torch.tensor([0, 1, 2, 3, 4, 4, 3, 2, 1, 0])),
                (rn(6, 5), torch.softmax(rn(6, 5), 1))]  # soft targets (ignore_index does not apply: dropped)
    if inputs == "class_logprobs":
        return [(log_softmax(rn(10, 5) * 3), torch.tensor([0, 1, 2, 3, 4, 4, 3, 2, 1, 0]))]
    if inputs == "class_soft":
        q = torch.softmax(rn(8, 5) * 2, 1)
        q[0] = torch.tensor([1.0, 0, 0, 0, 0])  # a one-hot row: 0 log 0 terms
        return [(rn(8, 5) * 2, q)]
    if inputs == "probs":  # probabilities strictly inside (0, 1) for bce: see test docstring of r_bce's gradient
        return [(r(8, 5) * 0.98 + 0.01, (r(8, 5) < 0.4).to(F64)), (r(8, 5) * 0.98 + 0.01, r(8, 5)),
                (torch.tensor([0.2, 0.9], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))]
    if inputs in ("logits_binary", "logits_dense"):
        x = torch.cat((torch.tensor([[0.0, 8.0, -8.0, 20.0, -20.0]], dtype=F64), rn(8, 5) * 3))
        t = torch.cat((torch.tensor([[0.5, 1.0, 0.0, 1.0, 0.0]], dtype=F64), (r(8, 5) < 0.3).to(F64) * r(8, 5)))
        out = [(x, t), (rn(6) * 2, (r(6) < 0.5).to(F64))]
        if inputs == "logits_dense":  # class indices, C = background
            out.append((rn(6, 4), torch.tensor([0, 4, 2, 4, 3, 1])))
        return out
    if inputs == "distribution":
        return [(rn(7, 8) * 2, torch.tensor([0.0, 7.0, 3.5, 6.999, 1.25, 2.0, 0.001], dtype=F64))]
    if inputs == "signed":
        f = torch.cat((torch.tensor([[1.0, -1.0, 0.0]], dtype=F64), rn(7, 3) * 2))
        return [(f, torch.where(r(8, 3) < 0.5, -1.0, 1.0).to(F64)),
                (rn(5), torch.tensor([1.0, 0, -1, 1, 0], dtype=F64))]
    if inputs == "ranking":
        x = torch.cat((torch.tensor([[1.0, 1.0], [2.0, 1.0]], dtype=F64), rn(6, 2)))
        return [(x, torch.tensor([1.0, -1, 1, -1, 1, 1, -1, -1], dtype=F64))]
    raise AssertionError(inputs)


# ---------------------------------------------------------------------------------------------------------------
# parameters: the defaults ({}), and non-default values touching every parameter

VARIANTS = {
    "iou": [{}, {"mode": "log"}, {"mode": "square"}, {"eps": 1e-3}],
    "giou": [{}, {"eps": 1e-4}],
    "diou": [{}, {"eps": 1e-4}],
    "ciou": [{}, {"alpha_rule": "mmdet"}, {"alpha_rule": "attached", "eps": 1e-5}],
    "eiou": [{}, {"gamma": 0.5, "eps": 1e-5}],
    "cdiou": [{}, {"lambda": 0.001, "eps": 1e-6}],
    "siou": [{}, {"theta": 2.5, "eps": 1e-5}, {"distance_sign": "mmdet"}, {"eps": 0.0}],
    "alpha_iou": [{}, {"penalty": "giou"}, {"penalty": "diou", "alpha": 2.0}, {"penalty": "ciou", "alpha": 1.0},
                  {"eps": 1e-5, "alpha": 4.0, "penalty": "giou"}],
    "wiou": [{}, {"version": "v2", "iou_mean": 0.4, "gamma": 0.7}, {"version": "v3", "iou_mean": 0.3},
             {"version": "v3", "alpha": 2.5, "delta": 1.5, "eps": 1e-5}],
    "mpdiou": [{}, {"normalizer": "enclosing"}, {"image_width": 100.0, "image_height": 37.0, "eps": 1e-5}],
    "inner_iou": [{}, {"ratio": 1.3}, {"base": "giou"}, {"base": "diou", "ratio": 0.5},
                  {"base": "ciou", "ratio": 1.5, "eps": 1e-5}],
    "nwd": [{}, {"constant": 3.0}],
    "iou_aware": [{}, {"eps": 1e-4}],
    "l1": [{}], "l2": [{}], "mse": [{}], "perceptron": [{}], "exponential": [{}], "bce": [{}], "kl_div": [{}],
    "distribution_focal": [{}],
    "smooth_l1": [{}, {"beta": 0.3}, {"beta": 0.0}],
    "huber": [{}, {"delta": 2.0}],
    "balanced_l1": [{}, {"alpha": 0.3, "gamma": 2.0, "beta": 0.7}],
    "quantile": [{}, {"q": 0.9}],
    "cross_entropy": [{}, {"label_smoothing": 0.1, "class_weights": [1.0, 2.0, 0.5, 1.0, 3.0]},
                      {"ignore_index": 3}],
    "nll": [{}, {"class_weights": [1.0, 2.0, 0.5, 1.0, 3.0], "ignore_index": 1}],
    "bce_with_logits": [{}, {"pos_weight": 3.0}],
    "focal": [{}, {"alpha": -1.0, "gamma": 0.0}, {"alpha": 0.6, "gamma": 0.5}],
    "varifocal": [{}, {"alpha": 0.5, "gamma": 1.0, "iou_weighted": False}],
    "quality_focal": [{}, {"beta": 1.0}],
    "dice": [{}, {"smooth": 0.01}],
    "tversky": [{}, {"alpha": 0.7, "beta": 0.3, "smooth": 2.0}],
    "hinge": [{}, {"margin": 0.5}],
    "margin_ranking": [{}, {"margin": 0.5}],
    "hinge_embedding": [{}, {"margin": 2.0}],
}
METRIC_VARIANTS = {"iou": [{}, {"eps": 1e-4}], "giou": [{}, {"eps": 1e-4}], "diou": [{}, {"eps": 1e-4}],
                   "ciou": [{}, {"eps": 1e-5}], "eiou": [{}, {"eps": 1e-5}],
                   "siou": [{}, {"theta": 2.5, "eps": 1e-5}, {"eps": 0.0}], "nwd": [{}, {"constant": 3.0}]}


@pytest.fixture(scope="module")
def engines():
    return {"fused": Engine(device="cpu", fast="auto", warm=False), "reference": Engine(device="cpu", fast="off",
                                                                                         warm=False)}


def check(got, want, tol, what):
    torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _box_case(name, params, fmt, dtype):
    p_fmt = from_xyxy(PRED, fmt).to(getattr(torch, dtype)).to(F64)  # the engine's input, rounded to dtype
    t_fmt = from_xyxy(TARGET, fmt).to(getattr(torch, dtype)).to(F64)
    if name == "iou_aware":
        z = torch.linspace(-3, 3, p_fmt.shape[0], dtype=F64).to(getattr(torch, dtype)).to(F64)
        p_fmt = torch.cat((p_fmt, z[:, None]), 1)
    return p_fmt, t_fmt


def reference_loss(name, pred, target, fmt, params):
    leaf = pred.clone().requires_grad_(True)
    ref = LOSS_REFS[name]
    if name in BOX_LOSS_REFS:
        t = to_xyxy(target, fmt)
        if name == "iou_aware":
            p = torch.cat((to_xyxy(leaf[:, :4], fmt), leaf[:, 4:]), 1)
        else:
            p = to_xyxy(leaf, fmt)
        loss = ref(p, t, **params)
    else:
        if LOSSES[name].inputs == "logits_dense" and pred.dim() == 2 and target.dim() == 1:
            # class indices, index C the background: the one-hot rows mmdetection's sigmoid losses build
            target = (target[:, None] == torch.arange(pred.shape[1])[None, :]).to(F64)
        loss = ref(leaf, target, **params)
    (grad,) = torch.autograd.grad(loss.sum(), leaf, allow_unused=True)
    return loss.detach(), torch.zeros_like(leaf) if grad is None else grad


BOX_CASES = [(n, p, f) for n in BOX_LOSS_REFS for p in VARIANTS[n] for f in FORMATS]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,params,fmt", BOX_CASES, ids=[f"{n}{p or ''}-{f}" for n, p, f in BOX_CASES])
def test_box_losses_match_the_paper_references(engines, name, params, fmt, dtype):
    pred, target = _box_case(name, params, fmt, dtype)
    want_loss, want_grad = reference_loss(name, pred, target, fmt, params)
    assert bool(torch.isfinite(want_loss).all()) and bool(torch.isfinite(want_grad).all())
    for route, engine in engines.items():
        out = engine.evaluate(name, pred.to(getattr(torch, dtype)), target.to(getattr(torch, dtype)),
                              box_format=fmt, params=params, dtype=dtype)
        for i, case in enumerate(CASE_NAMES):
            what = f"{route} {name}{params} {fmt} {dtype} [{case}]"
            check(out.loss[i], want_loss[i], TOL[dtype]["values"], what + " value")
            check(out.grad[i], want_grad[i], TOL[dtype]["grads"], what + " gradient")


OTHER_CASES = [(n, p) for n in OTHER_REFS for p in VARIANTS[n]]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,params", OTHER_CASES, ids=[f"{n}{p or ''}" for n, p in OTHER_CASES])
def test_other_losses_match_the_paper_references(engines, name, params, dtype):
    gen = torch.Generator().manual_seed(7)
    for pred, target in other_inputs(LOSSES[name].inputs, gen):
        pred = pred.to(getattr(torch, dtype)).to(F64)
        if target.dtype.is_floating_point:
            target = target.to(getattr(torch, dtype)).to(F64)
        if target.dtype.is_floating_point and "ignore_index" in params and LOSSES[name].inputs == "class_logits":
            with pytest.raises(EngineError) as info:  # soft targets have no index to ignore: refused, by name
                engines["reference"].evaluate(name, pred, target, params=params)
            assert info.value.code == "invalid_param" and info.value.field == "params.ignore_index"
            continue
        want_loss, want_grad = reference_loss(name, pred, target, "xyxy", params)
        for route, engine in engines.items():
            out = engine.evaluate(name, pred.to(getattr(torch, dtype)), target, params=params, dtype=dtype)
            what = f"{route} {name}{params} {dtype} pred {list(pred.shape)}"
            check(out.loss, want_loss, TOL[dtype]["values"], what + " values")
            check(out.grad, want_grad, TOL[dtype]["grads"], what + " gradients")


METRIC_CASES = [(n, p, f) for n in METRIC_REFS for p in METRIC_VARIANTS[n] for f in FORMATS]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,params,fmt", METRIC_CASES, ids=[f"{n}{p or ''}-{f}" for n, p, f in METRIC_CASES])
def test_metrics_match_the_paper_references(engines, name, params, fmt, dtype):
    a, b = _box_case(name, params, fmt, dtype)
    want = METRIC_REFS[name](to_xyxy(a, fmt), to_xyxy(b, fmt), **params)
    n = 12  # pairwise over a slice: every pred box against every target box
    aa = to_xyxy(a[:n], fmt)[:, None, :].expand(n, n, 4).reshape(-1, 4)
    bb = to_xyxy(b[:n], fmt)[None, :, :].expand(n, n, 4).reshape(-1, 4)
    want_pairwise = METRIC_REFS[name](aa, bb, **params).reshape(n, n)
    cast = getattr(torch, dtype)
    for route, engine in engines.items():
        got = engine.metric(name, a.to(cast), b.to(cast), box_format=fmt, params=params, dtype=dtype)
        check(got, want, TOL[dtype]["values"], f"{route} {name}{params} {fmt} {dtype}")
        got = engine.metric(name, a[:n].to(cast), b[:n].to(cast), box_format=fmt, params=params, dtype=dtype,
                            pairwise=True)
        check(got, want_pairwise, TOL[dtype]["values"], f"{route} {name}{params} {fmt} {dtype} pairwise")


# ---------------------------------------------------------------------------------------------------------------
# the catalog cannot grow without a reference, and every parameter is exercised away from its default

def test_every_catalog_entry_has_a_paper_reference():
    assert set(LOSSES) == set(LOSS_REFS), ("losses without a reference here", set(LOSSES) ^ set(LOSS_REFS))
    assert set(METRICS) == set(METRIC_REFS), ("metrics without a reference here", set(METRICS) ^ set(METRIC_REFS))
    assert set(VARIANTS) == set(LOSSES) and set(METRIC_VARIANTS) == set(METRICS)


@pytest.mark.parametrize("catalog,variants", [(LOSSES, VARIANTS), (METRICS, METRIC_VARIANTS)],
                         ids=["losses", "metrics"])
def test_every_parameter_is_checked_away_from_its_default(catalog, variants):
    for name, spec in catalog.items():
        assert {} in variants[name], f"{name}: defaults not checked"
        for p in spec.params:
            moved = [v for v in variants[name] if p.name in v and v[p.name] != p.default]
            assert moved, f"{name}.{p.name} is never checked away from its default {p.default!r}"


@pytest.mark.parametrize("catalog,entry,library,why,phrase",
                         [(LOSSES, *d) for d in DEVIATIONS] + [(METRICS, *d) for d in METRIC_DEVIATIONS],
                         ids=[d[0] for d in DEVIATIONS + METRIC_DEVIATIONS])
def test_the_catalog_states_each_deliberate_deviation(catalog, entry, library, why, phrase):
    doc = " ".join(catalog[entry].doc.split())
    assert phrase in doc, f"{entry}: the catalog should say that {library}, and that {why}"


# ---------------------------------------------------------------------------------------------------------------
# torchvision's own numbers where boxes touch (torchvision is not installed here: derived by hand from its code)

# torchvision.ops (_utils._loss_inter_union, giou_loss, diou_loss, ciou_loss) on pred p, target g, eps = 1e-7.
# Touching means an overlap of exactly 0 in one axis, so torchvision's mask is False: inter = 0 with zero gradient,
# union = |p| + |g| and IoU = 0. What is left is the penalty's gradient:
#   giou: 1 + (C - U) / C  ->  d/dz = (U / C^2) dC/dz - (1 / C) dU/dz (eps dropped: < 1e-9 relative here)
#   diou: 1 + rho^2 / c^2  ->  d/dz = d(rho^2)/dz / c^2 - rho^2 / c^4 d(c^2)/dz
#   ciou: diou + alpha v with v = 0 for two squares (and alpha v's gradient 0 when w/h equals w_g/h_g)
# Case E (edge): p = [0, 0, 10, 10], g = [10, 0, 20, 10]: C = 20 x 10, U = 200, rho^2 = 100, c^2 = 500.
#   giou: loss 1 + 0 = 1; dC/dx2 = 0 (x2 is not on C's boundary: max(10, 20) = 20), dU/dx2 = h = 10;
#         C's y extent ties (min(0, 0), max(10, 10)): dC/dy1 = cw * -0.5 = -10, dC/dy2 = +10 ->
#         d/dx1 = (200/200^2)(-10 * 1) - (1/200)(-10) = 0, d/dy1 = (200/40000)(-10) - (1/200)(-10) = 0,
#         d/dx2 = -(1/200)(10) = -0.05, d/dy2 = (200/40000)(10) - (1/200)(10) = 0
#   diou: loss 1 + 100/500 = 1.2; rho^2 = (15 - cx)^2 + (5 - cy)^2, cx = (x1 + x2)/2; c^2 = cw^2 + ch^2, cw = 20
#         (min(x1, 10) = x1), ch = 10 (ties at y1 = 0 and y2 = 10 split 0.5/0.5 between boxes):
#         d/dx1 = -(15-5)/500 - 100/500^2 * 2*20*(-1) = -0.02 + 0.016 = -0.004
#         d/dx2 = -(10)/500 = -0.02 (x2 = 10 is not the enclosing max: no c^2 term)
#         d/dy1 = 0 - 100/250000 * 2*10*(-0.5) = 0.004, d/dy2 = -100/250000 * 2*10*(0.5) = -0.004
#   (lossd with a clamp, as before this test: diou d/dx2 -0.07 = -0.02 - 0.05, the intersection's one-sided term.)
# Case C (corner): p = [0, 0, 10, 10], g = [10, 10, 20, 20]: C = 20 x 20 = 400, U = 200, rho^2 = 200, c^2 = 800.
#   giou: loss 1 + 200/400 = 1.5; d/dx1 = (200/160000)(-20) - (1/400)(-10) = -0.025 + 0.025 = 0,
#         d/dx2 = -(1/400)(10) = -0.025, and by symmetry d/dy1 = 0, d/dy2 = -0.025
#   diou: loss 1 + 200/800 = 1.25; d/dx1 = -(10)/800 * 1 ... written out: d rho^2/dx1 = -(15 - 5) = -10,
#         d c^2/dx1 = 2*20*(-1) = -40 -> -10/800 + 200/640000 * 40 = -0.0125 + 0.0125 = 0;
#         d/dx2 = -10/800 = -0.0125 (no c^2 term); y alike: 0, -0.0125
# Case Y (the GIoU pair): p = [0, 0, 10, 10], g = [2, 10, 12, 25]: C = 12 x 25 = 300, U = 250.
#   giou: loss 1 + 50/300 = 1.166667; d/dx1 = (250/90000)(-25) - (1/300)(-10) = -0.0694444 + 0.0333333 = -0.0361111
#         d/dy1 = (250/90000)(-12) - (1/300)(-10) = -0.0333333 + 0.0333333 = 0,
#         d/dx2 = -(1/300)(10) = -0.0333333, d/dy2 = -(1/300)(10) = -0.0333333 (y2 = 10 < 25: not on C)
TORCHVISION_TOUCHING = {
    # (loss, pred, target): (value, d/d(x1, y1, x2, y2)) in xyxy
    ("iou", "E"): (1.0, [0.0, 0.0, 0.0, 0.0]),
    ("giou", "E"): (1.0, [0.0, 0.0, -0.05, 0.0]),
    ("diou", "E"): (1.2, [-0.004, 0.004, -0.02, -0.004]),
    ("ciou", "E"): (1.2, [-0.004, 0.004, -0.02, -0.004]),
    ("iou", "C"): (1.0, [0.0, 0.0, 0.0, 0.0]),
    ("giou", "C"): (1.5, [0.0, 0.0, -0.025, -0.025]),
    ("diou", "C"): (1.25, [0.0, 0.0, -0.0125, -0.0125]),
    ("ciou", "C"): (1.25, [0.0, 0.0, -0.0125, -0.0125]),
    ("giou", "Y"): (7 / 6, [-0.0361111111, 0.0, -0.0333333333, -0.0333333333]),
}
TOUCH_PAIRS = {"E": ([0, 0, 10, 10], [10, 0, 20, 10]), "C": ([0, 0, 10, 10], [10, 10, 20, 20]),
               "Y": ([0, 0, 10, 10], [2, 10, 12, 25])}


def _chain(grad_xyxy: list[float], fmt: str) -> list[float]:
    """d/d(caller's format) from d/d(x1, y1, x2, y2), by the chain rule of each conversion."""
    g0, g1, g2, g3 = grad_xyxy
    if fmt == "xywh":
        return [g0 + g2, g1 + g3, g2, g3]
    if fmt == "cxcywh":
        return [g0 + g2, g1 + g3, (g2 - g0) / 2, (g3 - g1) / 2]
    return [g0, g1, g2, g3]


@pytest.mark.parametrize("route", ["fused", "reference"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("key", sorted(TORCHVISION_TOUCHING), ids=lambda k: "-".join(k))
def test_touching_boxes_match_torchvision(engines, route, fmt, key):
    name, case = key
    value, grad = TORCHVISION_TOUCHING[key]
    p, t = (torch.tensor([b], dtype=F64) for b in TOUCH_PAIRS[case])
    out = engines[route].evaluate(name, from_xyxy(p, fmt), from_xyxy(t, fmt), box_format=fmt, dtype="float64")
    assert out.loss.item() == pytest.approx(value, abs=1e-6)
    assert out.grad[0].tolist() == pytest.approx(_chain(grad, fmt), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the hand-computed cases

def test_siou_angle_term_follows_the_paper_not_eps(engines):
    """Issue 19: the paper's sin(2 arcsin) angle, which the eps-in-denominator form shifted (1.39917)."""
    p, t = [[0.001, 0.002, 0.002, 0.003]], [[0.004, 0.004, 0.005, 0.0055]]
    for engine in engines.values():
        assert engine.evaluate("siou", p, t, dtype="float64").loss.item() == pytest.approx(1.39721, abs=5e-6)


def test_siou_with_zero_eps_is_finite_for_coincident_centres(engines):
    """Identical boxes: 0. Same centre, [0,0,10,10] vs [2,2,8,8]: distance 0, IoU 0.36, omega_w = omega_h = 0.4,
    loss = 1 - 0.36 + (1 - e^-0.4)^4 = 0.651813 (by hand)."""
    p, t = [[0, 0, 10, 10], [0, 0, 10, 10]], [[0, 0, 10, 10], [2, 2, 8, 8]]
    want = [0.0, 1 - 0.36 + (1 - math.exp(-0.4)) ** 4]
    for engine in engines.values():
        out = engine.evaluate("siou", p, t, params={"eps": 0.0}, dtype="float64")
        assert out.loss.tolist() == pytest.approx(want, abs=1e-9)
        assert bool(torch.isfinite(out.grad).all())
        assert engine.metric("siou", p, t, params={"eps": 0.0}, dtype="float64").tolist() == \
            pytest.approx([1 - w for w in want], abs=1e-9)


def test_dice_and_tversky_take_one_value_per_sample(engines):
    """Issue 19: [N] input. dice: 1 - 1/1.2 = 0.166667 and 1 - 2.8/2.9 = 0.034483; tversky (alpha = beta = 0.5):
    1 - 1/1.1 = 0.090909 and 1 - 1.9/1.95 = 0.025641."""
    for engine in engines.values():
        assert engine.evaluate("dice", [0.2, 0.9], [0, 1]).loss.tolist() == pytest.approx([1 / 6, 1 / 29], abs=1e-6)
        assert engine.evaluate("tversky", [0.2, 0.9], [0, 1]).loss.tolist() == \
            pytest.approx([1 / 11, 1 / 39], abs=1e-6)
