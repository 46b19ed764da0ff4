"""The scoring rules on hand-made images, one rule each."""

import numpy as np
import pytest

from lossd.quality.readers import BoxSet, Image
from lossd.quality.score import Thresholds, group, pairwise_iou, score_images


def boxset(rows, images=("a", "b"), cats=("cat", "dog")) -> BoxSet:
    """rows: (image, category, x1, y1, x2, y2, score, id)"""
    arr = np.array([r[:7] for r in rows], dtype=float).reshape(len(rows), 7)
    return BoxSet([Image(k, 100, 100) for k in images], list(cats), arr[:, 0].astype(int), arr[:, 1].astype(int),
                  arr[:, 2:6].copy(), arr[:, 6].copy(), [r[7] for r in rows])


def exact_eval(pred, target, loss):
    iou = np.diag(pairwise_iou(pred, target))
    return {"iou": iou, "giou": iou, "diou": iou, "ciou": iou, "loss": 1 - iou}


def run(labels, ref, th=Thresholds()):
    n = len(labels.images)
    cols = score_images(labels, ref, np.arange(n), th, exact_eval, group(labels.image, n), group(ref.image, n))
    return cols


def test_each_issue():
    labels = boxset([
        (0, 0, 0, 0, 10, 10, 1, "ok"),          # matches a confident cat exactly
        (0, 0, 20, 20, 30, 30, 1, "loose"),     # same class, IoU 25/175
        (0, 0, 50, 50, 60, 60, 1, "flip"),      # a confident dog sits on it
        (0, 1, 80, 80, 90, 90, 1, "ghost"),     # nothing near it
    ])
    ref = boxset([
        (0, 0, 0, 0, 10, 10, 0.9, "p0"),
        (0, 0, 25, 25, 35, 35, 0.8, "p1"),
        (0, 1, 50, 50, 60, 61, 0.95, "p2"),
        (0, 1, 70, 0, 80, 10, 0.99, "p3"),      # a confident dog with no label: missing
        (0, 0, 0, 40, 10, 50, 0.3, "p4"),       # unconfident: never flagged
    ])
    cols = run(labels, ref)
    issues = dict(zip([labels.box_id[r] if k == 0 else ref.box_id[r] for k, r in zip(cols["kind"], cols["row"])],
                      zip(cols["issue"], cols["score"])))
    assert issues["ok"] == ("ok", pytest.approx(1 - 0.9 * (1 - 100 / (100 + 1e-7))))
    q = 25 / 175
    assert issues["loose"] == ("badly_located", pytest.approx(1 - 0.8 * (1 - q)))
    assert issues["flip"] == ("wrong_class", pytest.approx(1 - 0.95 * 100 / 110, rel=1e-6))
    assert issues["ghost"] == ("spurious", 0.0)
    assert issues["p3"] == ("missing", pytest.approx(0.01))
    assert "p4" not in issues and len(issues) == 5
    # metrics are filled for every paired label, NaN where there is no partner
    paired = cols["partner"] >= 0
    assert np.isfinite(cols["iou"][paired]).all() and np.isnan(cols["iou"][~paired]).all()


def test_assignment_is_optimal_not_greedy():
    # greedy by best IoU gives B the middle prediction (IoU 0.82) and leaves A with only IoU 0.05 (no match);
    # the optimal assignment matches both: A-mid (0.54) and B-right (0.33)
    labels = boxset([(0, 0, 0, 0, 10, 10, 1, "A"), (0, 0, 4, 0, 14, 10, 1, "B")])
    ref = boxset([(0, 0, 3, 0, 13, 10, 0.9, "mid"), (0, 0, 9, 0, 19, 10, 0.9, "right")])
    cols = run(labels, ref)
    partners = {labels.box_id[r]: ref.box_id[p] for r, p in zip(cols["row"], cols["partner"])}
    assert partners == {"A": "mid", "B": "right"}
    assert list(cols["issue"]) == ["badly_located", "badly_located"]


def test_empty_images_and_second_annotator():
    labels = boxset([(1, 0, 0, 0, 10, 10, 1, "x")])
    cols = run(labels, boxset([]))  # image a has nothing; b has one label and no reference
    assert list(cols["issue"]) == ["spurious"]
    same = run(labels, boxset([(1, 0, 0, 0, 10, 10, 1.0, "y")]))  # a second annotator agreeing
    assert list(same["issue"]) == ["ok"] and same["score"][0] == pytest.approx(1.0)
