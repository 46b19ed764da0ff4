"""Classification and quality losses. Each returns the per-sample loss [N]; where pred is [N, C] the per-sample
value is the sum over classes (as detection heads sum per anchor), so 'mean' averages samples, not elements.
Which of pred/target are logits, probabilities or indices is stated per loss and enforced by inputs.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import EngineError, rows_phrase
from ._utils import per_sample_sum
from .registry import Param, register_loss


def _pow(base: Tensor, exponent: float) -> Tensor:
    """base ** exponent for base >= 0 with a finite (zero) gradient at base == 0 for any exponent > 0."""
    if exponent == 0:
        return torch.ones_like(base)
    if exponent == 1:
        return base
    pos = base > 0
    return torch.where(pos, torch.where(pos, base, torch.ones_like(base)) ** exponent, torch.zeros_like(base))


def _class_weight(class_weights: list[float] | None, n_classes: int, like: Tensor) -> Tensor | None:
    if class_weights is None:
        return None
    if len(class_weights) != n_classes:
        raise EngineError("invalid_param", f"params.class_weights has {len(class_weights)} entries but pred has "
                          f"{n_classes} classes", field="params.class_weights")
    return torch.tensor(class_weights, dtype=like.dtype, device=like.device)


def _index_mean_weight(pred: Tensor, target: Tensor, ignore_index: int = -100,
                       class_weights: list[float] | None = None, **_: object) -> Tensor:
    """torch's 'mean' denominator for index targets: the class weight of each counted row, 0 for ignored rows."""
    if target.dtype.is_floating_point:  # soft targets: every row counts once
        return torch.ones(pred.shape[0], dtype=pred.dtype, device=pred.device)
    keep = target != ignore_index
    w = _class_weight(class_weights, pred.shape[1], pred)
    if w is None:
        return keep.to(pred.dtype)
    return torch.where(keep, w[target.clamp(min=0, max=pred.shape[1] - 1)], torch.zeros_like(pred[:, 0]))


IGNORE = Param("ignore_index", -100, "target index whose rows count for nothing (loss 0, left out of 'mean')",
               type="int", min=-(2**31), max=2**31 - 1)
CLASS_WEIGHTS = Param("class_weights", None, "one weight per class (length C), as torch's weight=", type="floats",
                      min=0.0)


@register_loss("cross_entropy", kind="classification", inputs="class_logits", reference="torch.nn.functional."
               "cross_entropy; Szegedy et al. 2016 (label smoothing)", mean_weight=_index_mean_weight, params=(
                   Param("label_smoothing", 0.0, "mass spread uniformly over the classes", min=0.0, max=1.0),
                   IGNORE, CLASS_WEIGHTS))
def cross_entropy_loss(pred: Tensor, target: Tensor, label_smoothing: float = 0.0, ignore_index: int = -100,
                       class_weights: list[float] | None = None) -> Tensor:
    """Cross-entropy = -sum_c q_c log softmax(x)_c, q the (smoothed) one-hot or soft target.

    'mean' divides by the summed class weights of the counted rows, as torch does."""
    w = _class_weight(class_weights, pred.shape[1], pred)
    if target.dtype.is_floating_point:
        if ignore_index != -100:
            raise EngineError("invalid_param", "params.ignore_index applies to [N] class-index targets; target is "
                              "[N, C] class probabilities", field="params.ignore_index")
        return F.cross_entropy(pred, target, weight=w, reduction="none", label_smoothing=label_smoothing)
    return F.cross_entropy(pred, target, weight=w, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)


@register_loss("nll", kind="classification", inputs="class_logprobs", reference="torch.nn.functional.nll_loss",
               mean_weight=_index_mean_weight, params=(IGNORE, CLASS_WEIGHTS))
def nll_loss(pred: Tensor, target: Tensor, ignore_index: int = -100, class_weights: list[float] | None = None) -> Tensor:
    """Negative log-likelihood = -w_y log p_y, pred given as log-probabilities."""
    w = _class_weight(class_weights, pred.shape[1], pred)
    return F.nll_loss(pred, target, weight=w, ignore_index=ignore_index, reduction="none")


@register_loss("bce", kind="classification", inputs="probs", reference="torch.nn.functional.binary_cross_entropy")
def bce_loss(pred: Tensor, target: Tensor) -> Tensor:
    """BCE = -sum (t log p + (1 - t) log(1 - p)), p probabilities (torch clamps each log at -100)."""
    return per_sample_sum(F.binary_cross_entropy(pred, target, reduction="none"))


@register_loss("bce_with_logits", kind="classification", inputs="logits_binary",
               reference="torch.nn.functional.binary_cross_entropy_with_logits", params=(
                   Param("pos_weight", 1.0, "weight of the positive term (recall vs precision)", min=0.0, max=1e6),))
def bce_with_logits_loss(pred: Tensor, target: Tensor, pos_weight: float = 1.0) -> Tensor:
    """BCE with logits = -sum (w_pos t log sigma(x) + (1 - t) log(1 - sigma(x))), computed stably."""
    pw = None if pos_weight == 1.0 else torch.tensor(pos_weight, dtype=pred.dtype, device=pred.device)
    return per_sample_sum(F.binary_cross_entropy_with_logits(pred, target, reduction="none", pos_weight=pw))


@register_loss("kl_div", kind="classification", inputs="class_soft", reference="Kullback & Leibler 1951; "
               "torch.nn.functional.kl_div")
def kl_div_loss(pred: Tensor, target: Tensor) -> Tensor:
    """KL(q || softmax(x)) = sum_c q_c (log q_c - log softmax(x)_c), pred logits, target probabilities
    (0 log 0 = 0). 'mean' over samples is torch's 'batchmean'."""
    return per_sample_sum(F.kl_div(F.log_softmax(pred, dim=-1), target, reduction="none"))


@register_loss("focal", kind="classification", inputs="logits_dense", reference="Lin et al., Focal Loss, ICCV 2017; "
               "torchvision.ops.sigmoid_focal_loss (defaults)", params=(
                   Param("alpha", 0.25, "weight of positives, 1 - alpha of negatives; < 0 disables (fvcore's default "
                         "is -1)", min=-1.0, max=1.0),
                   Param("gamma", 2.0, "focusing exponent on (1 - p_t)", min=0.0, max=10.0)))
def focal_loss(pred: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss = sum alpha_t (1 - p_t)^gamma BCE(x, t), p_t = p t + (1 - p)(1 - t),
    alpha_t = alpha t + (1 - alpha)(1 - t). 1 - p_t is formed as sigmoid(x)(1 - t) + sigmoid(-x) t, which is
    exact where 1 - sigmoid(x) would round to 0."""
    ce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    one_minus_pt = torch.sigmoid(pred) * (1 - target) + torch.sigmoid(-pred) * target
    loss = ce * _pow(one_minus_pt, gamma)
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return per_sample_sum(loss)


@register_loss("varifocal", kind="classification", inputs="logits_dense", reference="Zhang et al., VarifocalNet, "
               "CVPR 2021; mmdetection VarifocalLoss", params=(
                   Param("alpha", 0.75, "weight of the negatives' focal term", min=0.0, max=10.0),
                   Param("gamma", 2.0, "focusing exponent on negatives", min=0.0, max=10.0),
                   Param("iou_weighted", True, "weight positives by their target q (else by 1)", type="bool")))
def varifocal_loss(pred: Tensor, target: Tensor, alpha: float = 0.75, gamma: float = 2.0,
                   iou_weighted: bool = True) -> Tensor:
    """Varifocal = sum BCE(x, q) * (q if q > 0 else alpha |sigma(x) - q|^gamma); q the IoU-aware target score.
    The weight is not detached (as in mmdetection)."""
    pos = (target > 0).to(pred.dtype)
    pos_weight = target * pos if iou_weighted else pos
    weight = pos_weight + alpha * _pow((torch.sigmoid(pred) - target).abs(), gamma) * (1 - pos)
    return per_sample_sum(F.binary_cross_entropy_with_logits(pred, target, reduction="none") * weight)


@register_loss("quality_focal", kind="classification", inputs="logits_dense", reference="Li et al., Generalized Focal "
               "Loss, NeurIPS 2020; mmdetection QualityFocalLoss", params=(
                   Param("beta", 2.0, "exponent on |y - sigma(x)|", min=0.0, max=10.0),))
def quality_focal_loss(pred: Tensor, target: Tensor, beta: float = 2.0) -> Tensor:
    """QFL = -sum |y - sigma(x)|^beta ((1 - y) log(1 - sigma(x)) + y log sigma(x)), y the quality (IoU) target,
    0 on negatives."""
    ce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    return per_sample_sum(ce * _pow((target - torch.sigmoid(pred)).abs(), beta))


@register_loss("distribution_focal", kind="classification", inputs="distribution", reference="Li et al., "
               "Generalized Focal Loss, NeurIPS 2020; mmdetection DistributionFocalLoss")
def distribution_focal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """DFL = CE(x, y_l) (y_r - y) + CE(x, y_r) (y - y_l), y_l = floor(y), y_r = y_l + 1 (y = B - 1 uses the last
    two bins, weight 1 on the last)."""
    left = target.floor().clamp(max=pred.shape[1] - 2).long()
    right = left + 1
    w_left = right.to(pred.dtype) - target
    w_right = target - left.to(pred.dtype)
    return (F.cross_entropy(pred, left, reduction="none") * w_left
            + F.cross_entropy(pred, right, reduction="none") * w_right)


def _per_sample_values(x: Tensor) -> Tensor:
    """[N, ...] as [N, D]; an [N] input is N samples of one value each."""
    return x.flatten(1) if x.dim() > 1 else x[:, None]


SMOOTH = Param("smooth", 1.0, "added to numerator and denominator (Laplace smoothing)", min=0.0, min_exclusive=True,
               max=1e6)


@register_loss("dice", kind="classification", inputs="probs", reference="Milletari et al., V-Net, 3DV 2016",
               params=(SMOOTH,))
def dice_loss(pred: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Dice = 1 - (2 sum p t + s) / (sum p + sum t + s), per sample over its D values."""
    p, t = _per_sample_values(pred), _per_sample_values(target)
    return 1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


@register_loss("tversky", kind="classification", inputs="probs", reference="Salehi et al., Tversky loss, MLMI 2017",
               params=(Param("alpha", 0.5, "weight of false positives", min=0.0, max=10.0),
                       Param("beta", 0.5, "weight of false negatives (raise for recall)", min=0.0, max=10.0), SMOOTH))
def tversky_loss(pred: Tensor, target: Tensor, alpha: float = 0.5, beta: float = 0.5, smooth: float = 1.0) -> Tensor:
    """Tversky = 1 - (TP + s) / (TP + alpha FP + beta FN + s), TP = sum p t, FP = sum p (1 - t),
    FN = sum (1 - p) t. alpha = beta = 0.5 is Dice; alpha = beta = 1 is 1 - Jaccard."""
    p, t = _per_sample_values(pred), _per_sample_values(target)
    tp = (p * t).sum(1)
    fp = (p * (1 - t)).sum(1)
    fn = ((1 - p) * t).sum(1)
    return 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


MARGIN = Param("margin", 1.0, "margin", min=0.0, max=1e6)


@register_loss("hinge", kind="classification", inputs="signed", reference="Cortes & Vapnik 1995 (SVM)",
               params=(MARGIN,))
def hinge_loss(pred: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """Hinge = sum max(0, margin - y f), y in {-1, +1}."""
    return per_sample_sum(torch.clamp(margin - target * pred, min=0))


@register_loss("perceptron", kind="classification", inputs="signed", reference="Rosenblatt 1958")
def perceptron_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Perceptron = sum max(0, -y f): zero for any correct sign, whatever the margin."""
    return per_sample_sum(torch.clamp(-target * pred, min=0))


@register_loss("exponential", kind="classification", inputs="signed", reference="Freund & Schapire 1997 (AdaBoost)")
def exponential_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Exponential = sum exp(-y f). Rows where -y f would overflow the dtype are refused, not returned as inf."""
    margin = -target * pred
    limit = math.log(torch.finfo(pred.dtype).max)
    bad = (margin > limit).flatten(1).any(1) if margin.dim() > 1 else margin > limit
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise EngineError("invalid_value", f"pred: exp(-y f) overflows {pred.dtype} for {rows_phrase(rows, len(rows))} "
                          f"(-y f > {limit:.1f}); send float64 or smaller scores", field="pred", rows=rows)
    return per_sample_sum(torch.exp(margin))


@register_loss("margin_ranking", kind="classification", inputs="ranking",
               reference="torch.nn.functional.margin_ranking_loss", params=(
                   Param("margin", 0.0, "required score gap", min=0.0, max=1e6),))
def margin_ranking_loss(pred: Tensor, target: Tensor, margin: float = 0.0) -> Tensor:
    """Margin ranking = max(0, -y (x1 - x2) + margin), pred rows (x1, x2)."""
    return torch.clamp(-target * (pred[:, 0] - pred[:, 1]) + margin, min=0)


@register_loss("hinge_embedding", kind="classification", inputs="signed",
               reference="torch.nn.functional.hinge_embedding_loss", params=(MARGIN,))
def hinge_embedding_loss(pred: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """Hinge embedding = sum (x if y = 1 else max(0, margin - x)), x a distance."""
    return per_sample_sum(torch.where(target > 0, pred, torch.clamp(margin - pred, min=0)))
