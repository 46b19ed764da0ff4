"""Scoring: match label boxes to reference boxes, give every label three per-type scores and every reference a
missing score, and name the most likely issue of each.

The work is split in two steps, each over a whole shard at once (no per-image Python loop except for the few
images whose matching is ambiguous):

``match(labels, ref, images, th, cal, evaluator)``
    Every label/reference pair of the same image whose boxes overlap, with its IoU from the loss engine
    (``1 - iou loss``, float64, in-process or on a server). A class-aware optimal assignment between labels and
    *trusted* references (confidence >= ``conf`` of the reference's class) of the same class, on pairs with
    IoU >= ``match_iou``; it maximises the number of matched pairs, then their summed IoU (Hungarian,
    scipy's ``linear_sum_assignment``, run only on images where a label or a reference has two candidates).

``classify(labels, ref, pairs, th, cal)``
    Scores (all in [0, 1]; lower = more likely that issue) and issues. With s a reference's confidence, q an IoU,
    n = ``ok_iou`` of the label's class and t = ``conf`` of a reference's class:

    - ``score_badly_located`` = n + w (q - n), w = min(1, s / t), with the matched reference (unmatched: with
      the same-class reference of any confidence with the largest s q, if it overlaps at IoU >= 0.3);
      n (no evidence) without either. A trusted reference or a second annotator gives the IoU itself; a doubtful
      one pulls the score towards the boundary n.
    - ``score_wrong_class`` = (1 + support - against) / 2, support = s q of the matched reference (else the best
      s q over same-class references of any confidence), against = the best s q over trusted other-class
      references that no label matched. 0.5 means no evidence either way.
    - ``score_spurious`` = the best min(1, s / t) q over references of any class and confidence: evidence that
      an object is there. A low-confidence reference on the box is evidence against spurious.
    - ``score`` = the lowest of the three.
    - ``score_missing`` (every reference) = 1 - s (1 - e), e = min(1, u / support_iou), u the best IoU with
      any label: a confident reference that no label explains scores near 0.

    Issues: a matched label is ``ok`` (q >= n) or ``badly_located``; an unmatched one is ``wrong_class`` when a
    trusted other-class reference that no label matched overlaps it at IoU >= ``wrong_class_iou``, else
    ``unconfirmed`` when some reference (of any confidence) overlaps it at IoU >= ``support_iou`` (the reference
    saw the object, but not confidently enough to confirm the label), else ``spurious``. A reference with
    confidence >= ``missing_conf`` of its class that overlaps no label (IoU < ``match_iou``) is ``missing``.

Thresholds left unset are calibrated per class from the data (``calibrate``), see docs/quality.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from .readers import BoxSet

ISSUES = ("ok", "badly_located", "wrong_class", "spurious", "unconfirmed", "missing")
# severity for ordering: the larger, the more a user wants to see it first
SEVERITY = {"ok": 0, "unconfirmed": 1, "badly_located": 2, "missing": 3, "spurious": 4, "wrong_class": 5}
METRICS = ("iou", "giou", "diou", "ciou")
WEAK_MATCH_IOU = 0.3  # an untrusted same-class reference informs score_badly_located of an unmatched label from here
MIN_CLASS = 10  # fewer samples than this in a class: its threshold is the pooled one


@dataclass(frozen=True)
class Thresholds:
    """Matching and flagging thresholds. ``None`` = calibrated per class from the data."""

    conf: float | None = None  # references from this confidence up are trusted to match and to flag
    ok_iou: float | None = None  # a matched label is ok from this IoU up, badly located below it
    missing_conf: float | None = None  # an unlabelled reference from this confidence up is a missing box
    match_iou: float = 0.1  # a label and a trusted same-class reference can be matched from this IoU up
    wrong_class_iou: float = 0.5  # a trusted other-class reference this close makes a label wrong_class
    support_iou: float = 0.5  # a reference this close (any confidence) shows an object is there
    loss: str = "ciou"  # the loss kept for every label/reference pair

    def __post_init__(self) -> None:
        # as the CLI's options: a confidence or IoU outside [0, 1] (or NaN) would flag everything or nothing
        for name in ("conf", "ok_iou", "missing_conf", "match_iou", "wrong_class_iou", "support_iou"):
            value = getattr(self, name)
            if value is None and name in ("conf", "ok_iou", "missing_conf"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1]" + (" or None (calibrated per class)" if name
                                 in ("conf", "ok_iou", "missing_conf") else "") + f", got {value!r}")

    def as_dict(self) -> dict:
        return asdict(self)


class Evaluator(Protocol):
    """Per-pair losses from the loss engine (in-process, on a server, on a Ray worker)."""

    def losses(self, pred: np.ndarray, target: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """{name: [K] float64 loss of row k of pred against row k of target} for each catalog loss name."""

    def close(self) -> None:
        """Release connections or devices."""


@dataclass
class Calibration:
    """Per-class thresholds (arrays indexed like ``labels.categories``) and the pooled values behind them."""

    conf: np.ndarray
    ok_iou: np.ndarray
    missing_conf: np.ndarray
    pooled: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # per threshold: "given", or "calibrated"

    def as_dict(self, categories: list[str]) -> dict:
        return {"rule": CALIBRATION_RULE, "source": self.source, "pooled": self.pooled,
                "per_class": {c: {"conf": round(float(self.conf[i]), 4), "ok_iou": round(float(self.ok_iou[i]), 4),
                                  "missing_conf": round(float(self.missing_conf[i]), 4)}
                              for i, c in enumerate(categories)}}


CALIBRATION_RULE = (
    "A reference is confirmed when a same-class label overlaps it at IoU >= support_iou. Per class: conf = the "
    "confidence that best separates confirmed from unconfirmed references (maximum of TPR - FPR, Youden); "
    "ok_iou = median - 3 * 1.4826 * MAD of the best same-class label IoU of trusted references (IoU >= "
    "match_iou), clipped to [0.3, 0.95]; missing_conf = max(conf, median confidence of confirmed references). "
    f"A class with fewer than {MIN_CLASS} samples for a rule takes the value pooled over all classes.")


# ------------------------------------------------------------------------------------------------ pairs
def group(image: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): rows of image i are order[starts[i]:starts[i + 1]]."""
    order = np.argsort(image, kind="stable")
    starts = np.searchsorted(image[order], np.arange(n_images + 1))
    return order, starts


def _rows_of(groups: tuple, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order, starts = groups
    n = starts[images + 1] - starts[images]
    idx = np.repeat(starts[images] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
    return order[idx], n


def overlapping_pairs(labels: BoxSet, ref: BoxSet, images: np.ndarray, lab_groups: tuple,
                      ref_groups: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(label row, reference row) of every same-image pair whose boxes intersect with positive area."""
    images = np.asarray(images, dtype=np.int64)
    lab_rows, n_l = _rows_of(lab_groups, images)
    ref_rows, n_r = _rows_of(ref_groups, images)
    per_label = np.repeat(n_r, n_l)  # references in each label's image
    total = int(per_label.sum())
    pair_lab = np.repeat(lab_rows, per_label)
    first_ref = np.repeat(np.cumsum(n_r) - n_r, n_l)
    pos = np.repeat(first_ref - (np.cumsum(per_label) - per_label), per_label) + np.arange(total)
    pair_ref = ref_rows[pos]
    a, b = labels.box[pair_lab], ref.box[pair_ref]
    # only an overlap test here; the IoU itself comes from the engine
    hit = ((np.minimum(a[:, 2], b[:, 2]) > np.maximum(a[:, 0], b[:, 0]))
           & (np.minimum(a[:, 3], b[:, 3]) > np.maximum(a[:, 1], b[:, 1])))
    return pair_lab[hit], pair_ref[hit]


def pair_iou(evaluator: Evaluator, labels: BoxSet, ref: BoxSet, pl: np.ndarray, pr: np.ndarray) -> np.ndarray:
    if len(pl) == 0:
        return np.zeros(0)
    return 1.0 - evaluator.losses(labels.box[pl], ref.box[pr], ("iou",))["iou"]


def _max_by(key: np.ndarray, value: np.ndarray, n: int, fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(max value per key, index of the pair that attains it or -1), over keys 0..n-1."""
    best = np.full(n, fill)
    arg = np.full(n, -1, dtype=np.int64)
    if len(key):
        order = np.lexsort((-value, key))  # by key, largest value first
        k = key[order]
        first = np.ones(len(k), dtype=bool)
        first[1:] = k[1:] != k[:-1]
        sel = order[first]
        keep = value[sel] > fill
        best[key[sel[keep]]] = value[sel[keep]]
        arg[key[sel[keep]]] = sel[keep]
    return best, arg


def gather(values: np.ndarray, idx: np.ndarray, fill) -> np.ndarray:
    """values[idx] where idx >= 0, else fill (also when values is empty)."""
    out = np.full((len(idx),) + values.shape[1:], fill, dtype=np.result_type(values.dtype, np.asarray(fill).dtype))
    ok = idx >= 0
    out[ok] = values[idx[ok]]
    return out


def _lift(subset: np.ndarray, arg: np.ndarray) -> np.ndarray:
    """Indices into a subset of the pairs (from ``_max_by`` on that subset) as indices into all pairs; -1 stays."""
    where = np.flatnonzero(subset)
    if len(where) == 0:
        return np.full(len(arg), -1, dtype=np.int64)
    return np.where(arg >= 0, where[np.maximum(arg, 0)], -1)


# ------------------------------------------------------------------------------------------------ calibration
def _youden(scores: np.ndarray, positive: np.ndarray) -> float | None:
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos < MIN_CLASS or 0 < n_neg < MIN_CLASS:
        return None
    if n_neg == 0:
        return float(scores[positive].min())
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positive[order]
    tpr = np.cumsum(p) / n_pos
    fpr = np.cumsum(~p) / n_neg
    last = np.r_[s[1:] != s[:-1], True]  # a threshold includes every reference at its value
    j = np.flatnonzero(last)[np.argmax((tpr - fpr)[last])]
    return float(s[j])


def _robust_low(v: np.ndarray) -> float | None:
    if len(v) < MIN_CLASS:
        return None
    med = np.median(v)
    return float(np.clip(med - 3 * 1.4826 * np.median(np.abs(v - med)), 0.3, 0.95))


def calibrate(labels: BoxSet, ref: BoxSet, th: Thresholds, pl: np.ndarray, pr: np.ndarray,
              iou: np.ndarray) -> Calibration:
    """Per-class thresholds from the overlapping pairs of the whole dataset (see CALIBRATION_RULE)."""
    n_cls = len(labels.categories)
    same = labels.category[pl] == ref.category[pr]
    best_same, _ = _max_by(pr[same], iou[same], len(ref))
    confirmed = best_same >= th.support_iou
    conf_s = ref.score
    pooled_conf = _youden(conf_s, confirmed)
    pooled_conf = 0.5 if pooled_conf is None else pooled_conf
    conf = np.full(n_cls, pooled_conf)
    for c in range(n_cls):
        m = ref.category == c
        v = _youden(conf_s[m], confirmed[m])
        conf[c] = pooled_conf if v is None else v
    if th.conf is not None:
        conf[:] = th.conf
    trusted = (conf_s >= conf[ref.category]) & (best_same >= th.match_iou)
    pooled_ok = _robust_low(best_same[trusted])
    pooled_ok = 0.7 if pooled_ok is None else pooled_ok
    ok = np.full(n_cls, pooled_ok)
    med_conf = np.full(n_cls, np.nan)
    pooled_med = float(np.median(conf_s[confirmed])) if confirmed.sum() >= MIN_CLASS else 0.8
    for c in range(n_cls):
        m = ref.category == c
        v = _robust_low(best_same[trusted & m])
        ok[c] = pooled_ok if v is None else v
        cc = confirmed & m
        med_conf[c] = float(np.median(conf_s[cc])) if cc.sum() >= MIN_CLASS else pooled_med
    if th.ok_iou is not None:
        ok[:] = th.ok_iou
    missing = np.maximum(conf, med_conf)
    if th.missing_conf is not None:
        missing[:] = th.missing_conf
    source = {k: "given" if getattr(th, k) is not None else "calibrated" for k in ("conf", "ok_iou", "missing_conf")}
    pooled = {"conf": round(th.conf if th.conf is not None else pooled_conf, 4),
              "ok_iou": round(th.ok_iou if th.ok_iou is not None else pooled_ok, 4),
              "missing_conf": round(th.missing_conf if th.missing_conf is not None
                                    else max(pooled_conf, pooled_med), 4)}
    return Calibration(conf, ok, missing, pooled, source)


def calibrate_all(labels: BoxSet, ref: BoxSet, th: Thresholds, evaluator: Evaluator, groups: tuple) -> Calibration:
    pl, pr = overlapping_pairs(labels, ref, np.arange(len(labels.images)), *groups)
    return calibrate(labels, ref, th, pl, pr, pair_iou(evaluator, labels, ref, pl, pr))


# ------------------------------------------------------------------------------------------------ matching
@dataclass
class Pairs:
    """The overlapping label/reference pairs of a shard and the assignment found on them."""

    lab_rows: np.ndarray  # label rows of the shard
    ref_rows: np.ndarray  # reference rows of the shard
    pl: np.ndarray  # per pair: label row
    pr: np.ndarray  # per pair: reference row
    iou: np.ndarray  # per pair: IoU (engine)
    matched: np.ndarray  # per pair: in the assignment


def match(labels: BoxSet, ref: BoxSet, images: np.ndarray, th: Thresholds, cal: Calibration, evaluator: Evaluator,
          lab_groups: tuple, ref_groups: tuple) -> Pairs:
    images = np.asarray(images, dtype=np.int64)
    lab_rows, _ = _rows_of(lab_groups, images)
    ref_rows, _ = _rows_of(ref_groups, images)
    pl, pr = overlapping_pairs(labels, ref, images, lab_groups, ref_groups)
    iou = pair_iou(evaluator, labels, ref, pl, pr)
    edge = ((labels.category[pl] == ref.category[pr]) & (ref.score[pr] >= cal.conf[ref.category[pr]])
            & (iou >= th.match_iou))
    matched = np.zeros(len(pl), dtype=bool)
    e = np.flatnonzero(edge)
    if len(e):
        deg_l = np.bincount(pl[e], minlength=len(labels))
        deg_r = np.bincount(pr[e], minlength=len(ref))
        simple = (deg_l[pl[e]] == 1) & (deg_r[pr[e]] == 1)  # a component of one edge is always in the optimum
        matched[e[simple]] = True
        rest = e[~simple]
        if len(rest):
            img = labels.image[pl[rest]]
            order = np.argsort(img, kind="stable")
            rest, img = rest[order], img[order]
            cuts = np.flatnonzero(np.r_[True, img[1:] != img[:-1], True])
            for a, b in zip(cuts[:-1], cuts[1:]):
                sub = rest[a:b]
                li, lj = np.unique(pl[sub], return_inverse=True)
                ri, rj = np.unique(pr[sub], return_inverse=True)
                w = np.zeros((len(li), len(ri)))
                w[lj, rj] = 1.0 + iou[sub]  # more matches first, then more IoU
                rows, cols = linear_sum_assignment(w, maximize=True)
                keep = w[rows, cols] > 0
                pick = np.zeros((len(li), len(ri)), dtype=bool)
                pick[rows[keep], cols[keep]] = True
                matched[sub[pick[lj, rj]]] = True
    return Pairs(lab_rows, ref_rows, pl, pr, iou, matched)


# ------------------------------------------------------------------------------------------------ classifying
def classify(labels: BoxSet, ref: BoxSet, p: Pairs, th: Thresholds, cal: Calibration) -> dict[str, dict]:
    """Per-label and per-reference columns of a shard (rows in ``p.lab_rows`` / ``p.ref_rows`` order)."""
    nl, nr = len(labels), len(ref)
    pl, pr, iou = p.pl, p.pr, p.iou
    s = ref.score[pr]
    same = labels.category[pl] == ref.category[pr]
    trusted = s >= cal.conf[ref.category[pr]]
    m = p.matched
    ref_used = np.zeros(nr, dtype=bool)
    ref_used[pr[m]] = True
    # matched pair of each label
    m_iou, m_arg = _max_by(pl[m], iou[m], nl, fill=-1.0)
    m_arg = _lift(m, m_arg)
    is_m = m_arg >= 0
    n_ok = cal.ok_iou[labels.category]
    m_s = gather(s, m_arg, 0.0)
    q = gather(iou, m_arg, 0.0)
    # wrong class: trusted other-class references that no label matched
    other = ~same & trusted & ~ref_used[pr]
    against, _ = _max_by(pl[other], (s * iou)[other], nl)
    other_close = other & (iou >= th.wrong_class_iou)
    _, wc_arg = _max_by(pl[other_close], (s * iou)[other_close], nl)
    wc_arg = _lift(other_close, wc_arg)
    sup_same, ss_arg = _max_by(pl[same], (s * iou)[same], nl)
    ss_arg = _lift(same, ss_arg)
    # unmatched: the best same-class reference of any confidence still tells, weighted by its confidence
    near = ~is_m & (gather(iou, ss_arg, 0.0) >= max(th.match_iou, WEAK_MATCH_IOU))
    loc = np.where(is_m, m_arg, np.where(near, ss_arg, -1))
    trust_w = np.minimum(1.0, s / np.maximum(cal.conf[ref.category[pr]], 1e-9))
    l_s, l_q = gather(trust_w, loc, 0.0), gather(iou, loc, 0.0)
    score_bl = np.where(loc >= 0, n_ok + l_s * (l_q - n_ok), n_ok)
    support = np.where(is_m, m_s * q, sup_same)
    score_wc = np.clip(0.5 * (1.0 + support - against), 0.0, 1.0)
    # spurious: any reference, of any class and confidence, on the box
    evidence = np.minimum(1.0, s / np.maximum(cal.conf[ref.category[pr]], 1e-9)) * iou
    score_sp, ev_arg = _max_by(pl, evidence, nl)
    ev_arg = np.where(ev_arg >= 0, ev_arg, -1)
    best_any, _ = _max_by(pl, iou, nl)
    issue = np.where(is_m, np.where(q >= n_ok, "ok", "badly_located"),
                     np.where(wc_arg >= 0, "wrong_class",
                              np.where(best_any >= th.support_iou, "unconfirmed", "spurious"))).astype(object)
    # the reference each label was compared with: its match, the other-class box, else the best support
    partner = np.where(is_m, m_arg, np.where(wc_arg >= 0, wc_arg, np.where(ss_arg >= 0, ss_arg, ev_arg)))
    partner = np.where(partner >= 0, partner, -1)
    rows = p.lab_rows
    lab = {"issue": issue[rows], "score_badly_located": score_bl[rows], "score_wrong_class": score_wc[rows],
           "score_spurious": score_sp[rows], "partner_pair": partner[rows]}
    lab["score"] = np.minimum(np.minimum(lab["score_badly_located"], lab["score_wrong_class"]), lab["score_spurious"])
    # references: explained by labels?
    u, u_arg = _max_by(pr, iou, nr)
    explained = np.minimum(1.0, u / th.support_iou)
    score_missing = 1.0 - ref.score * (1.0 - explained)
    wc_partner = np.zeros(nr, dtype=bool)
    wc_partner[pr[wc_arg[wc_arg >= 0]]] = True
    flag = (ref.score >= cal.missing_conf[ref.category]) & (u < th.match_iou) & ~wc_partner
    # each reference's label: the label that matched it, else the label that overlaps it most
    mr_iou, mr_arg = _max_by(pr[m], iou[m], nr, fill=-1.0)
    mr_arg = _lift(m, mr_arg)
    ref_label_pair = np.where(mr_arg >= 0, mr_arg, np.where(u_arg >= 0, u_arg, -1))
    r_issue = np.where(flag, "missing", np.where(ref_used, "matched", "unmatched")).astype(object)
    rr = p.ref_rows
    refs = {"issue": r_issue[rr], "score_missing": np.clip(score_missing[rr], 0.0, 1.0),
            "label_pair": ref_label_pair[rr], "label_iou": u[rr]}
    return {"labels": lab, "references": refs}


def pair_metrics(evaluator: Evaluator, labels: BoxSet, ref: BoxSet, pl: np.ndarray, pr: np.ndarray,
                 loss: str) -> dict[str, np.ndarray]:
    """IoU, GIoU, DIoU, CIoU (as 1 - their loss) and the chosen loss of each label/reference pair."""
    names = tuple(dict.fromkeys(METRICS + (loss,)))
    if len(pl) == 0:
        return {n: np.zeros(0) for n in METRICS + ("loss",)}
    got = evaluator.losses(labels.box[pl], ref.box[pr], names)
    out = {m: 1.0 - got[m] for m in METRICS}
    out["loss"] = got[loss]
    return out
