"""The scoring rules on hand-made images, one rule each, with the IoU from the real engine; expected values are
computed by hand from the formulas in lossd/quality/score.py's docstring."""

import numpy as np
import pytest

from lossd.quality.job import EngineEvaluator
from lossd.quality.readers import BoxSet, Image
from lossd.quality.score import Thresholds, calibrate_all, classify, group, match

GIVEN = Thresholds(conf=0.5, ok_iou=0.7, missing_conf=0.8)


@pytest.fixture(scope="module")
def evaluator():
    return EngineEvaluator("cpu")


def boxset(rows, images=("a", "b"), cats=("cat", "dog")) -> BoxSet:
    """rows: (image, category, x1, y1, x2, y2, score, id)"""
    arr = np.array([r[:7] for r in rows], dtype=float).reshape(len(rows), 7)
    return BoxSet([Image(k, 100, 100) for k in images], list(cats), arr[:, 0].astype(int), arr[:, 1].astype(int),
                  arr[:, 2:6].copy(), arr[:, 6].copy(), [r[7] for r in rows])


def score(labels, ref, evaluator, th=GIVEN):
    n = len(labels.images)
    groups = (group(labels.image, n), group(ref.image, n))
    cal = calibrate_all(labels, ref, th, evaluator, groups)
    pairs = match(labels, ref, np.arange(n), th, cal, evaluator, *groups)
    cols = classify(labels, ref, pairs, th, cal)
    lab = {labels.box_id[r]: {k: v[j] for k, v in cols["labels"].items()} for j, r in enumerate(pairs.lab_rows)}
    refs = {ref.box_id[r]: {k: v[j] for k, v in cols["references"].items()} for j, r in enumerate(pairs.ref_rows)}
    partner = {labels.box_id[r]: (ref.box_id[pairs.pr[p]] if p >= 0 else None)
               for r, p in zip(pairs.lab_rows, cols["labels"]["partner_pair"])}
    return lab, refs, partner, cal


def test_each_issue_and_its_scores(evaluator):
    labels = boxset([
        (0, 0, 0, 0, 10, 10, 1, "ok"),          # a trusted cat on it exactly
        (0, 0, 20, 20, 30, 30, 1, "loose"),     # a trusted cat at IoU 25/175
        (0, 0, 50, 50, 60, 60, 1, "flip"),      # a trusted dog sits on it (IoU 100/110)
        (0, 1, 80, 80, 90, 90, 1, "ghost"),     # nothing near it
        (0, 1, 0, 60, 20, 80, 1, "weak"),       # only an untrusted dog (0.3) on it
    ])
    ref = boxset([
        (0, 0, 0, 0, 10, 10, 0.9, "p0"),
        (0, 0, 25, 25, 35, 35, 0.8, "p1"),
        (0, 1, 50, 50, 60, 61, 0.95, "p2"),
        (0, 1, 70, 0, 80, 10, 0.99, "p3"),      # a confident dog with no label: missing
        (0, 1, 0, 60, 20, 80, 0.3, "p4"),
    ])
    lab, refs, partner, _ = score(labels, ref, evaluator)
    q = 25 / 175
    expect = {  # issue, badly_located, wrong_class, spurious
        "ok": ("ok", 1.0, 0.5 * (1 + 0.9), 1.0),
        "loose": ("badly_located", q, 0.5 * (1 + 0.8 * q), q),
        "flip": ("wrong_class", 0.7, 0.5 * (1 - 0.95 * 100 / 110), 100 / 110),
        "ghost": ("spurious", 0.7, 0.5, 0.0),
        "weak": ("unconfirmed", 0.7 + 0.3 / 0.5 * (1 - 0.7), 0.5 * (1 + 0.3), 0.3 / 0.5),
    }
    for box, (issue, bl, wc, sp) in expect.items():
        got = lab[box]
        assert got["issue"] == issue, box
        assert got["score_badly_located"] == pytest.approx(bl, rel=1e-6), box
        assert got["score_wrong_class"] == pytest.approx(wc, rel=1e-6), box
        assert got["score_spurious"] == pytest.approx(sp, rel=1e-6, abs=1e-9), box
        assert got["score"] == pytest.approx(min(bl, wc, sp), rel=1e-6, abs=1e-9), box
    assert partner == {"ok": "p0", "loose": "p1", "flip": "p2", "ghost": None, "weak": "p4"}
    # every reference has a row and a missing score 1 - s (1 - min(1, u / 0.5))
    assert {k: v["issue"] for k, v in refs.items()} == {"p0": "matched", "p1": "matched", "p2": "unmatched",
                                                       "p3": "missing", "p4": "unmatched"}
    assert refs["p3"]["score_missing"] == pytest.approx(0.01)
    assert refs["p1"]["score_missing"] == pytest.approx(1 - 0.8 * (1 - q / 0.5), rel=1e-6)
    assert refs["p0"]["score_missing"] == pytest.approx(1.0)


def test_a_low_confidence_reference_is_evidence_against_spurious(evaluator):
    labels = boxset([(0, 0, 0, 0, 10, 10, 1, "seen"), (0, 0, 50, 50, 60, 60, 1, "nothing")])
    ref = boxset([(0, 0, 0, 0, 10, 10.1, 0.05, "faint")])
    lab, _, _, _ = score(labels, ref, evaluator)
    assert lab["seen"]["issue"] == "unconfirmed" and lab["nothing"]["issue"] == "spurious"
    assert lab["seen"]["score_spurious"] > lab["nothing"]["score_spurious"] == 0.0


def test_assignment_is_optimal_not_greedy(evaluator):
    # greedy by best IoU gives B the middle prediction (IoU 0.82) and leaves A with only IoU 0.05 (no match);
    # the optimal assignment matches both: A-mid (0.54) and B-right (0.33)
    labels = boxset([(0, 0, 0, 0, 10, 10, 1, "A"), (0, 0, 4, 0, 14, 10, 1, "B")])
    ref = boxset([(0, 0, 3, 0, 13, 10, 0.9, "mid"), (0, 0, 9, 0, 19, 10, 0.9, "right")])
    lab, refs, partner, _ = score(labels, ref, evaluator)
    assert partner == {"A": "mid", "B": "right"}
    assert lab["A"]["issue"] == lab["B"]["issue"] == "badly_located"
    assert refs["mid"]["issue"] == refs["right"]["issue"] == "matched"


def test_empty_images_and_second_annotator(evaluator):
    labels = boxset([(1, 0, 0, 0, 10, 10, 1, "x")])
    lab, refs, _, _ = score(labels, boxset([]), evaluator)  # image a has nothing; b one label and no reference
    assert lab["x"]["issue"] == "spurious" and refs == {}
    lab, _, _, _ = score(labels, boxset([(1, 0, 0, 0, 10, 10, 1.0, "y")]), evaluator)  # a second annotator agrees
    assert lab["x"]["issue"] == "ok" and lab["x"]["score_badly_located"] == pytest.approx(1.0)


def test_calibration_rule(evaluator):
    """cat: 20 references that labels confirm (confidence 0.60-0.95) and 20 nobody labelled (0.10-0.45): the
    Youden threshold is the lowest confirmed confidence, 0.60. Label IoUs 0.9 (x10) and 0.8 (x10): median 0.85,
    MAD 0.05, ok_iou = 0.85 - 3 * 1.4826 * 0.05. missing_conf = max(conf, median confirmed confidence). dog has
    3 references: it takes the pooled values."""
    n = 43
    lab_rows, ref_rows = [], []
    conf_ok = np.linspace(0.6, 0.95, 20)
    for i in range(20):
        d = 100 / 0.9 / 10 - 10 if i % 2 == 0 else 100 / 0.8 / 10 - 10  # IoU 0.9 or 0.8
        lab_rows.append((i, 0, 0, 0, 10, 10, 1, f"l{i}"))
        ref_rows.append((i, 0, 0, 0, 10, 10 + d, conf_ok[i], f"r{i}"))
    for i in range(20):
        ref_rows.append((20 + i, 0, 0, 0, 10, 10, 0.1 + i * 0.35 / 19, f"u{i}"))
    for i in range(3):
        ref_rows.append((40 + i, 1, 0, 0, 10, 10, 0.2, f"d{i}"))
    images = [str(i) for i in range(n)]
    labels, ref = boxset(lab_rows, images), boxset(ref_rows, images)
    _, _, _, cal = score(labels, ref, evaluator, Thresholds())
    assert cal.conf[0] == pytest.approx(0.6)
    assert cal.ok_iou[0] == pytest.approx(0.85 - 3 * 1.4826 * 0.05, rel=1e-6)
    assert cal.missing_conf[0] == pytest.approx(np.median(conf_ok))
    pooled = cal.as_dict(["cat", "dog"])
    assert cal.conf[1] == pytest.approx(pooled["pooled"]["conf"], abs=1e-4)
    assert pooled["source"] == {"conf": "calibrated", "ok_iou": "calibrated", "missing_conf": "calibrated"}
    _, _, _, given = score(labels, ref, evaluator, Thresholds(conf=0.3))
    assert (given.conf == 0.3).all() and given.as_dict(["cat", "dog"])["source"]["conf"] == "given"


@pytest.mark.parametrize("kw", [{"conf": 2}, {"ok_iou": float("nan")}, {"missing_conf": -0.1}, {"match_iou": None},
                                {"support_iou": "0.5"}, {"wrong_class_iou": True}])
def test_thresholds_outside_0_1_are_refused_as_in_the_cli(kw):
    with pytest.raises(ValueError, match=f"{next(iter(kw))} must be a number in \\[0, 1\\]"):
        Thresholds(**kw)


def test_the_python_api_refuses_thresholds_the_cli_refuses(coco_dir):
    from lossd.quality import evaluate

    files = coco_dir / "instances_val2014_100.json", coco_dir / "fakebbox100_results.json"
    with pytest.raises(ValueError, match="conf must be"):
        evaluate(*files, conf=2)
    with pytest.raises(ValueError, match="ok_iou must be"):
        evaluate(*files, ok_iou=float("nan"))
