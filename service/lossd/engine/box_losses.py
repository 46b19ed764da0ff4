"""Box losses: ``pred``, ``target`` are [N, 4] xyxy boxes (the engine converts from the caller's format, so
gradients come back in that format). Each returns the per-sample loss [N]. Valid boxes have x1 <= x2, y1 <= y2;
zero-area boxes are valid and give finite values and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused as K
from . import metrics as M
from ._utils import DEFAULT_EPS, ciou_alpha, pair, safe_sqrt, stop_gradient
from .fastpath import BoxKernel
from .registry import Param, register_loss

EPS = M.EPS

# each loss's fused route (fastpath.BoxKernel): kernel kind, and (mode, p1, p2, p3) from the resolved params in
# fused.box_loss_grad's terms; None where a parameter value has no fused route
IOU_MODES = {"linear": K.LINEAR, "log": K.LOG, "square": K.SQUARE}
CIOU_ALPHA_RULES = {"torchvision": 0, "mmdet": 1}  # attached: the reference (alpha's own gradient)
WIOU_VERSIONS = {"v1": 0, "v2": 1, "v3": 2}
ALPHA_PENALTIES = {"none": 0, "giou": 1, "diou": 2, "ciou": 3}
INNER_BASES = {"iou": K.IOU, "giou": K.GIOU, "diou": K.DIOU, "ciou": K.CIOU}


@register_loss("iou", kind="box", inputs="boxes", reference="Yu et al., UnitBox, ACM MM 2016 (log mode); "
               "mmdetection IoULoss (modes)",
               kernel=BoxKernel(K.IOU, lambda kw: (IOU_MODES[kw["mode"]], 0.0, 0.0, 0.0)), params=(
                   Param("mode", "linear", "linear: 1 - IoU; log: -ln IoU (UnitBox); square: 1 - IoU^2",
                         type="choice", choices=("linear", "log", "square")), EPS))
def iou_loss(pred: Tensor, target: Tensor, mode: str = "linear", eps: float = DEFAULT_EPS) -> Tensor:
    """IoU loss: linear 1 - IoU | log -ln(max(IoU, eps)) | square 1 - IoU^2.

    Boxes that only touch (an overlap of exactly 0 along one axis) get no gradient through the intersection,
    as with torchvision's strict mask; a clamp(min=0), as in ultralytics and mmdetection, would pass a
    one-sided gradient there. Every IoU-family loss shares this intersection.

    The log form clamps IoU at eps (as mmdetection does) so disjoint boxes give -ln(eps) (16.1 for 1e-7) and a
    zero gradient rather than inf: UnitBox's loss is not differentiable at IoU = 0."""
    i = M.iou(pred, target, eps=eps)
    if mode == "log":
        return -torch.log(i.clamp(min=max(eps, 1e-12)))
    if mode == "square":
        return 1 - i * i
    return 1 - i


@register_loss("giou", kind="box", inputs="boxes", reference="Rezatofighi et al., CVPR 2019; "
               "torchvision.ops.generalized_box_iou_loss", params=(EPS,), kernel=BoxKernel(K.GIOU))
def giou_loss(pred: Tensor, target: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """GIoU loss = 1 - IoU + |C \\ (A ∪ B)| / |C|; in [0, 2]. Same eps placement as torchvision."""
    return 1 - M.giou(pred, target, eps=eps)


@register_loss("diou", kind="box", inputs="boxes", reference="Zheng et al., AAAI 2020; "
               "torchvision.ops.distance_box_iou_loss", params=(EPS,), kernel=BoxKernel(K.DIOU))
def diou_loss(pred: Tensor, target: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """DIoU loss = 1 - IoU + rho^2 / c^2; in [0, 2)."""
    return 1 - M.diou(pred, target, eps=eps)


ALPHA_RULE = Param("alpha_rule", "torchvision", "CIoU's alpha: torchvision (detached v/(1-IoU+v)), mmdet (detached, "
                   "0 where IoU <= 0.5), attached (gradient flows through alpha, mmdet 2.x)", type="choice",
                   choices=("torchvision", "mmdet", "attached"))


@register_loss("ciou", kind="box", inputs="boxes", reference="Zheng et al., AAAI 2020; "
               "torchvision.ops.complete_box_iou_loss", params=(EPS, ALPHA_RULE),
               kernel=BoxKernel(K.CIOU, lambda kw: (CIOU_ALPHA_RULES[kw["alpha_rule"]], 0.0, 0.0, 0.0)
                                if kw["alpha_rule"] in CIOU_ALPHA_RULES else None))
def ciou_loss(pred: Tensor, target: Tensor, eps: float = DEFAULT_EPS, alpha_rule: str = "torchvision") -> Tensor:
    """CIoU loss = 1 - IoU + rho^2 / c^2 + alpha v, v = 4/pi^2 (atan(w_gt/h_gt) - atan(w/h))^2,
    alpha = v / (1 - IoU + v + eps). eps is added to h in v's ratios (torchvision has none there, so h = 0 gives
    w/0); for ordinary boxes this changes v by less than 1e-7 relative.

    Default alpha is detached, as in torchvision, detectron2 and ultralytics: the gradient is that of the loss
    with alpha held constant. The DIoU paper's hand-written gradient (dropping 1/(w^2+h^2)) is not used; plain
    autograd on v is, like every maintained implementation."""
    p = pair(pred, target, eps)
    i = p.iou()
    v = p.aspect_v()
    return 1 - i + p.diou_penalty() + ciou_alpha(i, v, eps, alpha_rule) * v


@register_loss("eiou", kind="box", inputs="boxes", reference="Zhang et al., Focal and Efficient IoU Loss, "
               "Neurocomputing 2022 (arXiv 2101.08158)",
               kernel=BoxKernel(K.EIOU, lambda kw: (0, kw["gamma"], 0.0, 0.0)), params=(
                   EPS, Param("gamma", 0.0, "Focal-EIoU exponent on the IoU weight (0 = plain EIoU; paper uses 0.5)",
                              min=0.0, max=10.0)))
def eiou_loss(pred: Tensor, target: Tensor, eps: float = DEFAULT_EPS, gamma: float = 0.0) -> Tensor:
    """Focal-EIoU loss = IoU^gamma * (1 - IoU + rho^2/c^2 + (w - w_gt)^2 / cw^2 + (h - h_gt)^2 / ch^2).

    The IoU^gamma weight is detached (as the public implementations do): it re-weights samples, and its own
    gradient at IoU = 0 would be infinite for gamma < 1. This is Zhang et al.'s Efficient IoU, not
    mmdetection's EIoULoss (Extended IoU, Peng & Yu)."""
    p = pair(pred, target, eps)
    i = p.iou()
    base = 1 - i + M.eiou_penalty(p)
    if gamma == 0:
        return base
    return stop_gradient(i.clamp(min=0) ** gamma) * base


@register_loss("cdiou", kind="box", inputs="boxes", reference="Chen & Miao, Control Distance IoU, "
               "arXiv 2103.11696", params=(
                   EPS, Param("lambda", 1.0, "weight of the vertex-distance term (the authors' code uses 0.001)",
                              min=0.0, max=100.0, arg="lam")))
def cdiou_loss(pred: Tensor, target: Tensor, eps: float = DEFAULT_EPS, lam: float = 1.0) -> Tensor:
    """CDIoU loss = 1 - IoU + lambda * diou, diou = (AE + BF + CG + DH) / (4 WY): the summed distances between
    corresponding corners over four times the enclosing box's diagonal (the paper's formula; the authors' code
    divides by 16 instead of 4). Distances use a square root with a zero subgradient at 0."""
    p = pair(pred, target, eps)
    corners = [(p.x1, p.y1, p.X1, p.Y1), (p.x2, p.y1, p.X2, p.Y1), (p.x2, p.y2, p.X2, p.Y2), (p.x1, p.y2, p.X1, p.Y2)]
    dist = sum(safe_sqrt((a - A) ** 2 + (b - B) ** 2) for a, b, A, B in corners)
    cw, ch = p.enclosing_wh()
    diag = safe_sqrt(cw * cw + ch * ch)
    return 1 - p.iou() + lam * dist / (4 * diag + eps)


@register_loss("siou", kind="box", inputs="boxes", reference="Gevorgyan, SIoU Loss, arXiv 2205.12740; "
               "mmyolo IoULoss(iou_mode='siou')",
               kernel=BoxKernel(K.SIOU, lambda kw: (0, kw["theta"], 0.0, 0.0) if kw["distance_sign"] == "paper"
                                else None), params=(
                   EPS, M.THETA,
                   Param("distance_sign", "paper", "paper: distance cost 1 - exp(-gamma rho), rising with separation; "
                         "mmdet: mmdetection's neg_gamma=False default, which falls as boxes separate",
                         type="choice", choices=("paper", "mmdet"))))
def siou_loss(pred: Tensor, target: Tensor, eps: float = DEFAULT_EPS, theta: float = 4.0,
              distance_sign: str = "paper") -> Tensor:
    """SIoU loss = 1 - IoU + (Delta + Omega) / 2 (see the siou metric for Delta and Omega; its angle cost is
    the paper's sin(2 alpha), computed without eps, and 0 for coincident centres).

    No clamp to [-1, 1] (mmdetection clamps; that zeroes the gradient of far-apart boxes)."""
    p = pair(pred, target, eps)
    distance, shape = M.siou_costs(p, theta, distance_sign)
    return 1 - p.iou() + 0.5 * (distance + shape)


@register_loss("alpha_iou", kind="box", inputs="boxes", reference="He et al., Alpha-IoU, NeurIPS 2021 "
               "(arXiv 2110.13675)",
               kernel=BoxKernel(K.ALPHA, lambda kw: (ALPHA_PENALTIES[kw["penalty"]], kw["alpha"], 0.0, 0.0)), params=(
                   EPS, Param("alpha", 3.0, "power on IoU and on the penalty (the paper recommends 3)", min=1.0,
                              max=10.0),
                   Param("penalty", "none", "penalty term raised to alpha: none, giou, diou or ciou", type="choice",
                         choices=("none", "giou", "diou", "ciou"))))
def alpha_iou_loss(pred: Tensor, target: Tensor, eps: float = DEFAULT_EPS, alpha: float = 3.0,
                   penalty: str = "none") -> Tensor:
    """Alpha-IoU loss = 1 - IoU^alpha + R^alpha: R = 0 (none), |C \\ U| / |C| (giou), rho^2 / c^2 (diou), or
    rho^2 / c^2 and (beta v) with beta CIoU's detached alpha (ciou: 1 - IoU^a + (rho^2/c^2)^a + (beta v)^a).

    The paper's exact powers are used; the authors' code raises each axis separately for DIoU/CIoU, which is not
    (rho^2/c^2)^alpha. alpha >= 1 keeps the gradient of IoU^alpha finite at IoU = 0."""
    p = pair(pred, target, eps)
    inter, union = p.inter_union()
    i = inter / (union + eps)
    loss = 1 - i**alpha
    if penalty == "giou":
        cw, ch = p.enclosing_wh()
        area_c = cw * ch
        loss = loss + ((area_c - union) / (area_c + eps)).clamp(min=0) ** alpha
    elif penalty in ("diou", "ciou"):
        loss = loss + p.diou_penalty() ** alpha
        if penalty == "ciou":
            v = p.aspect_v()
            loss = loss + (ciou_alpha(i, v, eps, "torchvision") * v) ** alpha
    return loss


def _wiou_args(kw):
    version = WIOU_VERSIONS[kw["version"]]
    return version, kw["iou_mean"], kw["gamma"] if version == 1 else kw["alpha"], kw["delta"]


@register_loss("wiou", kind="box", inputs="boxes", reference="Tong et al., Wise-IoU, arXiv 2301.10051",
               kernel=BoxKernel(K.WIOU, _wiou_args), params=(
    EPS,
    Param("version", "v1", "v1: distance attention only; v2: monotonic focus; v3: non-monotonic focus", type="choice",
          choices=("v1", "v2", "v3")),
    Param("iou_mean", 1.0, "running mean of L_IoU = 1 - IoU, kept by the caller (the service is stateless); v2/v3",
          min=0.0, min_exclusive=True, max=1e6),
    Param("gamma", 0.5, "v2 focusing exponent", min=0.0, max=10.0),
    Param("alpha", 1.9, "v3 alpha", min=0.0, min_exclusive=True, max=100.0),
    Param("delta", 3.0, "v3 delta", min=0.0, min_exclusive=True, max=100.0)))
def wiou_loss(pred: Tensor, target: Tensor, eps: float = DEFAULT_EPS, version: str = "v1", iou_mean: float = 1.0,
              gamma: float = 0.5, alpha: float = 1.9, delta: float = 3.0) -> Tensor:
    """Wise-IoU. v1 = R * L_IoU, R = exp(rho^2 / (Wg^2 + Hg^2)*), * detached, Wg, Hg the enclosing box.
    v2 = (L_IoU* / iou_mean)^gamma * v1. v3 = r * v1, beta = L_IoU* / iou_mean, r = beta / (delta alpha^(beta - delta)).

    The reference code keeps iou_mean as a running buffer; here it is a parameter the caller updates.
    Defaults alpha=1.9, delta=3 follow the paper's v1 branch."""
    p = pair(pred, target, eps)
    l_iou = 1 - p.iou()
    cw, ch = p.enclosing_wh()
    dx, dy = p.centre_delta()
    loss = torch.exp((dx * dx + dy * dy) / (stop_gradient(cw * cw + ch * ch) + eps)) * l_iou
    if version == "v1":
        return loss
    beta = stop_gradient(l_iou) / iou_mean
    if version == "v2":
        return beta**gamma * loss
    return beta / (delta * alpha ** (beta - delta)) * loss


@register_loss("mpdiou", kind="box", inputs="boxes", reference="Ma & Xu, MPDIoU, arXiv 2307.07662",
               kernel=BoxKernel(K.MPDIOU, lambda kw: (int(kw["normalizer"] != "image"),
                                                      kw["image_width"] ** 2 + kw["image_height"] ** 2, 0.0, 0.0)),
               params=(
    EPS,
    Param("image_width", 640.0, "input image width (the paper's normaliser is the image's w^2 + h^2)", min=0.0,
          min_exclusive=True, max=1e7),
    Param("image_height", 640.0, "input image height", min=0.0, min_exclusive=True, max=1e7),
    Param("normalizer", "image", "image: w^2 + h^2 of the image (paper); enclosing: the enclosing box's squared "
          "diagonal (some forks)", type="choice", choices=("image", "enclosing"))))
def mpdiou_loss(pred: Tensor, target: Tensor, eps: float = DEFAULT_EPS, image_width: float = 640.0,
                image_height: float = 640.0, normalizer: str = "image") -> Tensor:
    """MPDIoU loss = 1 - IoU + d1^2 / (w^2 + h^2) + d2^2 / (w^2 + h^2), d1 and d2 the distances between the
    top-left and between the bottom-right corners, (w, h) the image size."""
    p = pair(pred, target, eps)
    d1 = (p.x1 - p.X1) ** 2 + (p.y1 - p.Y1) ** 2
    d2 = (p.x2 - p.X2) ** 2 + (p.y2 - p.Y2) ** 2
    if normalizer == "image":
        norm = image_width**2 + image_height**2
    else:
        cw, ch = p.enclosing_wh()
        norm = cw * cw + ch * ch + eps
    return 1 - p.iou() + (d1 + d2) / norm


@register_loss("inner_iou", kind="box", inputs="boxes", reference="Zhang, Xu & Zhang, Inner-IoU, arXiv 2311.02877",
               kernel=BoxKernel(K.INNER, lambda kw: (INNER_BASES[kw["base"]], kw["ratio"], 0.0, 0.0)),
               params=(EPS,
                       Param("ratio", 0.7, "scale of the auxiliary boxes around each centre (paper range 0.5-1.5)",
                             min=0.5, max=1.5),
                       Param("base", "iou", "loss the inner term is added to: iou (1 - IoU_inner), giou, diou, ciou",
                             type="choice", choices=("iou", "giou", "diou", "ciou"))))
def inner_iou_loss(pred: Tensor, target: Tensor, eps: float = DEFAULT_EPS, ratio: float = 0.7,
                   base: str = "iou") -> Tensor:
    """Inner-IoU: IoU_inner is the IoU of both boxes scaled by ratio about their centres;
    L_Inner-X = L_X + IoU - IoU_inner (for base iou this is 1 - IoU_inner)."""
    def scaled(b: Tensor) -> Tensor:
        c = 0.5 * (b[..., :2] + b[..., 2:])
        half = 0.5 * ratio * (b[..., 2:] - b[..., :2])
        return torch.cat((c - half, c + half), dim=-1)

    inner = M.iou(scaled(pred), scaled(target), eps=eps)
    if base == "iou":
        return 1 - inner
    base_loss = {"giou": giou_loss, "diou": diou_loss, "ciou": ciou_loss}[base](pred, target, eps=eps)
    return base_loss + M.iou(pred, target, eps=eps) - inner


@register_loss("nwd", kind="box", inputs="boxes", reference="Wang et al., NWD, arXiv 2110.13389", params=(M.NWD_C,))
def nwd_loss(pred: Tensor, target: Tensor, constant: float = 12.8) -> Tensor:
    """NWD loss = 1 - exp(-W2 / C) (see the nwd metric)."""
    return 1 - M.nwd(pred, target, constant=constant)


@register_loss("iou_aware", kind="box", inputs="boxes+logit", reference="Wu, Li & Wang, IoU-aware Single-stage "
               "Object Detector, arXiv 1912.05992; PaddleDetection IouAwareLoss", params=(EPS,))
def iou_aware_loss(pred: Tensor, target: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """IoU-aware loss = BCE-with-logits(z, IoU*(b, b_gt)): pred rows are (box, z) with z the predicted IoU logit.

    The IoU target is detached, so the gradient is with respect to z alone; the box columns of the gradient
    are zero."""
    with torch.no_grad():
        target_iou = M.iou(pred[..., :4], target, eps=eps)
    target_iou = stop_gradient(target_iou)
    return F.binary_cross_entropy_with_logits(pred[..., 4], target_iou, reduction="none")

