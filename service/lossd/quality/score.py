"""Scoring one shard of images: match label boxes to reference boxes, give every box a score and an issue.

Per image:
1. Class-aware optimal assignment (Hungarian, scipy's linear_sum_assignment) between labels and *confident*
   reference boxes (score >= conf) of the same class, on cost 1 - IoU, keeping pairs with IoU >= match_iou.
2. A matched label scores ``1 - s (1 - IoU)`` (s the reference's confidence; a second annotator has s = 1, so the
   score is the IoU); it is ``ok`` when IoU >= ok_iou, else ``badly_located``.
3. An unmatched label that a confident reference of *another* class overlaps (IoU >= wrong_class_iou; the
   class-agnostic step) is ``wrong_class``, scored ``1 - s IoU``.
4. Any other unmatched label is ``spurious`` (no confident reference box near it), scored by the best
   ``s IoU`` over same-class references of any confidence (0 when nothing overlaps it).
5. A reference with score >= missing_conf that no label overlaps (IoU < match_iou with every label) and that
   was not used in step 3 becomes a ``missing`` row, scored ``1 - s``.
An image scores the minimum of its boxes' scores (1 with no boxes). Compared with cleanlab's ObjectLab
(../shared/reference/label_quality.md): the same three signals, but on scale-free IoU rather than pixel
distances, with optimal rather than max-similarity matching, and spurious boxes that no prediction overlaps are
flagged (ObjectLab scores them clean).

The IoU, GIoU, DIoU, CIoU and the chosen loss of every matched pair come from the loss engine (in-process or a
server), in one batched call per shard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from scipy.optimize import linear_sum_assignment

from .readers import BoxSet

ISSUES = ("ok", "badly_located", "spurious", "wrong_class", "missing")
METRICS = ("iou", "giou", "diou", "ciou")


@dataclass(frozen=True)
class Thresholds:
    conf: float = 0.5  # references below this confidence are not trusted to match or to flag
    match_iou: float = 0.1  # a label and a same-class reference can be matched from this IoU up
    ok_iou: float = 0.7  # a matched label is ok from this IoU up, badly located below it
    wrong_class_iou: float = 0.5  # an other-class confident reference this close makes a label wrong_class
    missing_conf: float = 0.8  # an unlabelled reference this confident is a missing box
    loss: str = "ciou"  # the loss kept for every matched pair

    def as_dict(self) -> dict:
        return asdict(self)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[L, R] IoU of xyxy boxes, the same formula as the engine's (eps 1e-7)."""
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-7)


def group(image: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): rows of image i are order[starts[i]:starts[i + 1]]."""
    order = np.argsort(image, kind="stable")
    starts = np.searchsorted(image[order], np.arange(n_images + 1))
    return order, starts


# Evaluator: (pred [K,4], target [K,4], loss name) -> {"iou", "giou", "diou", "ciou", "loss": [K]} float64
Evaluator = Callable[[np.ndarray, np.ndarray, str], dict]


def score_images(labels: BoxSet, ref: BoxSet, images: np.ndarray, th: Thresholds, evaluate: Evaluator,
                 lab_groups: tuple, ref_groups: tuple) -> dict[str, np.ndarray]:
    """The box rows (labels, then missing references) of the given image indices, as columns."""
    lo, ls = lab_groups
    ro, rs = ref_groups
    out_kind, out_row, out_partner, out_partner_score, out_score, out_issue = [], [], [], [], [], []
    for img in images:
        L = lo[ls[img]:ls[img + 1]]
        R = ro[rs[img]:rs[img + 1]]
        lab_cls = labels.category[L]
        ref_cls, ref_s = ref.category[R], ref.score[R]
        iou = pairwise_iou(labels.box[L], ref.box[R]) if len(L) and len(R) else np.zeros((len(L), len(R)))
        confident = ref_s >= th.conf
        same = lab_cls[:, None] == ref_cls[None, :]
        match_of_label = np.full(len(L), -1)
        used = np.zeros(len(R), dtype=bool)
        if len(L) and len(R):
            ok_pair = same & confident[None, :] & (iou >= th.match_iou)
            if ok_pair.any():
                rows, cols = linear_sum_assignment(np.where(ok_pair, 1.0 - iou, 2.0))
                keep = ok_pair[rows, cols]
                match_of_label[rows[keep]] = cols[keep]
                used[cols[keep]] = True
        for j in range(len(L)):
            m = match_of_label[j]
            if m >= 0:
                q, s = iou[j, m], ref_s[m]
                out_kind.append(0), out_row.append(L[j]), out_partner.append(R[m]), out_partner_score.append(s)
                out_score.append(1.0 - s * (1.0 - q))
                out_issue.append("ok" if q >= th.ok_iou else "badly_located")
                continue
            if len(R):
                other = (~same[j]) & confident & ~used & (iou[j] >= th.wrong_class_iou)
                if other.any():
                    cand = np.flatnonzero(other)
                    k = cand[np.argmax(ref_s[cand] * iou[j, cand])]
                    used[k] = True
                    out_kind.append(0), out_row.append(L[j]), out_partner.append(R[k])
                    out_partner_score.append(ref_s[k])
                    out_score.append(1.0 - ref_s[k] * iou[j, k])
                    out_issue.append("wrong_class")
                    continue
                near = same[j] & (iou[j] > 0)
            else:
                near = np.zeros(0, dtype=bool)
            out_kind.append(0), out_row.append(L[j]), out_issue.append("spurious")
            if near.any():
                cand = np.flatnonzero(near)
                k = cand[np.argmax(ref_s[cand] * iou[j, cand])]
                out_partner.append(R[k]), out_partner_score.append(ref_s[k])
                out_score.append(min(ref_s[k] * iou[j, k], th.conf))
            else:
                out_partner.append(-1), out_partner_score.append(np.nan), out_score.append(0.0)
        if len(R):
            overlapped = (iou >= th.match_iou).any(axis=0) if len(L) else np.zeros(len(R), dtype=bool)
            for k in np.flatnonzero((ref_s >= th.missing_conf) & ~used & ~overlapped):
                out_kind.append(1), out_row.append(R[k]), out_partner.append(-1)
                out_partner_score.append(np.nan), out_score.append(1.0 - ref_s[k]), out_issue.append("missing")
    kind = np.asarray(out_kind, dtype=np.int8)
    row = np.asarray(out_row, dtype=np.int64)
    partner = np.asarray(out_partner, dtype=np.int64)
    cols = {"kind": kind, "row": row, "partner": partner,
            "partner_score": np.asarray(out_partner_score, dtype=np.float64),
            "score": np.clip(np.asarray(out_score, dtype=np.float64), 0.0, 1.0),
            "issue": np.asarray(out_issue, dtype=object)}
    # metrics of every label paired with a reference, through the loss engine in one call per metric
    paired = (kind == 0) & (partner >= 0)
    for name in METRICS + ("loss",):
        cols[name] = np.full(len(kind), np.nan)
    if paired.any():
        got = evaluate(labels.box[row[paired]], ref.box[partner[paired]], th.loss)
        for name in METRICS + ("loss",):
            cols[name][paired] = got[name]
    return cols
