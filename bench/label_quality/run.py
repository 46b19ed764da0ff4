"""Does `lossd quality` find label errors? Inject known errors into clean boxes, simulate predictions, and measure
how well its scores rank them, beside cleanlab's ObjectLab on the very same inputs, in the same run.

    python bench/label_quality/run.py [--images 5000] [--seed 0] [--coco-seeds 10] [--out bench/label_quality/results]

Clean truth, two sources:
  synthetic  COCO-like statistics: about 7 boxes per image, 80 classes, sizes from tiny to large, 640x480 images
  coco       the real COCO val2014 boxes in ../shared/data (100 images, 830 boxes, their own image sizes); the
             injection and the simulated detector are re-drawn with --coco-seeds seeds and the results pooled
Injected into the labels, each at 5% of the objects:
  shift      a label box moved/scaled until its IoU with the truth is 0.3-0.7 (badly located)
  drop       a label box deleted (missing)
  spawn      a label box added where there is no object (spurious)
  flip       a label's class changed (wrong class)
Predictions come from the clean truth: 93% of objects detected (jitter 4% of the size, confidence 0.55-1.0), 3%
of them with the wrong class at confidence 0.2-0.6, plus 0.45 false positives per object with confidences mostly
below 0.5. Both tools get the same arrays: cleanlab's `labels`/`predictions` lists, which lossd reads with
`lossd.quality.from_cleanlab`.

Reported per type (AUROC of that type's score, injected against clean labels, other error types left out):
lossd's score_badly_located / score_wrong_class / score_spurious against cleanlab's badloc / swap / badloc
sub-scores; missing over all references (lossd's score_missing, cleanlab's overlooked score, NaN = clean); per image
(any injected error): lossd's image score against cleanlab's get_label_quality_scores. Beside each, the
box-only ceiling: a label with no reference box on it at all (a "blind" label) cannot be told from another blind
label without the image, so AUROC <= 1 - b_pos * b_neg / 2. Speed: lossd's in-process scoring (calibration,
matching, scores, tables; engine warm, files already read) against cleanlab's three box sub-scores and its image
scores, both on the synthetic set.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RATES = {"shift": 0.05, "drop": 0.05, "flip": 0.05, "spawn": 0.05}


def _shared() -> Path:
    """../shared/data beside the checkout (or beside a folder above it), or $LOSSD_SHARED_DATA."""
    import os

    if os.environ.get("LOSSD_SHARED_DATA"):
        return Path(os.environ["LOSSD_SHARED_DATA"])
    for up in Path(__file__).resolve().parents:
        if (up / "shared" / "data").is_dir():
            return up / "shared" / "data"
    return Path("shared/data")


SHARED = _shared()


# ------------------------------------------------------------------------------------------------ simulation
def iou_1d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / np.maximum(union, 1e-9)


def random_boxes(g: np.random.Generator, wh: np.ndarray) -> np.ndarray:
    """One box per row of wh (the image's width, height)."""
    n = len(wh)
    size = np.exp(g.normal(np.log(70), 0.8, n)).clip(6, 400)
    aspect = np.exp(g.normal(0, 0.4, n))
    w, h = np.minimum(size * aspect, wh[:, 0] - 1).clip(4), np.minimum(size / aspect, wh[:, 1] - 1).clip(4)
    x, y = g.random(n) * (wh[:, 0] - w), g.random(n) * (wh[:, 1] - h)
    return np.stack([x, y, x + w, y + h], 1)


def jitter(g: np.random.Generator, b: np.ndarray, wh: np.ndarray, amount: float) -> np.ndarray:
    size = b[:, 2:] - b[:, :2]
    c = (b[:, :2] + b[:, 2:]) / 2 + g.normal(0, amount, size.shape) * size
    size = size * np.exp(g.normal(0, amount, size.shape))
    out = np.concatenate([c - size / 2, c + size / 2], 1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, wh[:, :1])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, wh[:, 1:])
    return out


def shifted(g: np.random.Generator, b: np.ndarray, wh: np.ndarray) -> np.ndarray:
    """Each box moved until its IoU with the original falls in [0.3, 0.7]."""
    out = b.copy()
    for i in range(len(b)):
        target = g.uniform(0.3, 0.7)
        for amount in np.linspace(0.05, 1.5, 60):
            cand = jitter(g, b[i:i + 1], wh[i:i + 1], amount)
            if abs(iou_1d(cand, b[i:i + 1])[0] - target) < 0.05 and cand[0, 2] > cand[0, 0] and cand[0, 3] > cand[0, 1]:
                out[i] = cand[0]
                break
    return out


def synthetic_truth(n_images: int, g: np.random.Generator) -> dict:
    per_image = g.poisson(7.2, n_images).clip(0, 40)
    image = np.repeat(np.arange(n_images), per_image)
    sizes = np.tile([640.0, 480.0], (n_images, 1))
    return {"image": image, "box": random_boxes(g, sizes[image]), "cls": g.integers(0, 80, len(image)),
            "sizes": sizes, "n_classes": 80}


def coco_truth() -> dict:
    from lossd.quality import read_coco

    b = read_coco(SHARED / "coco-val2014-100" / "instances_val2014_100.json")
    sizes = np.array([[im.width, im.height] for im in b.images])
    return {"image": b.image.copy(), "box": b.box.copy(), "cls": b.category.copy(), "sizes": sizes,
            "n_classes": len(b.categories)}


def inject(truth: dict, g: np.random.Generator) -> dict:
    image, cls, sizes, k = truth["image"], truth["cls"], truth["sizes"], truth["n_classes"]
    n, n_images = len(image), len(sizes)
    wh = sizes[image]
    kind = np.array(["clean"] * n, dtype=object)
    r = g.random(n)
    edges = np.cumsum([RATES["shift"], RATES["drop"], RATES["flip"]])
    kind[r < edges[0]] = "shift"
    kind[(r >= edges[0]) & (r < edges[1])] = "drop"
    kind[(r >= edges[1]) & (r < edges[2])] = "flip"
    lab_box, lab_cls = truth["box"].copy(), cls.copy()
    sh = kind == "shift"
    lab_box[sh] = shifted(g, truth["box"][sh], wh[sh])
    flip = kind == "flip"
    lab_cls[flip] = (cls[flip] + g.integers(1, k, flip.sum())) % k
    keep = kind != "drop"
    n_spawn = int(RATES["spawn"] * n)
    spawn_img = g.integers(0, n_images, n_spawn)
    labels = {"image": np.concatenate([image[keep], spawn_img]),
              "box": np.concatenate([lab_box[keep], random_boxes(g, sizes[spawn_img])]),
              "cls": np.concatenate([lab_cls[keep], g.integers(0, k, n_spawn)]),
              "kind": np.concatenate([kind[keep], np.array(["spawn"] * n_spawn, dtype=object)]),
              "truth": np.concatenate([np.flatnonzero(keep), np.full(n_spawn, -1)])}
    detected = g.random(n) < 0.93
    wrong = g.random(n) < 0.03
    det = np.flatnonzero(detected)
    p_box = jitter(g, truth["box"][det], wh[det], 0.04)
    p_cls = np.where(wrong[det], (cls[det] + 1) % k, cls[det])
    p_conf = np.where(wrong[det], g.uniform(0.2, 0.6, len(det)), g.uniform(0.55, 1.0, len(det)))
    n_fp = int(0.45 * n)
    fp_img = g.integers(0, n_images, n_fp)
    fp_conf = np.where(g.random(n_fp) < 0.9, g.uniform(0.05, 0.5, n_fp), g.uniform(0.5, 0.9, n_fp))
    preds = {"image": np.concatenate([image[det], fp_img]),
             "box": np.concatenate([p_box, random_boxes(g, sizes[fp_img])]),
             "cls": np.concatenate([p_cls, g.integers(0, k, n_fp)]), "conf": np.concatenate([p_conf, fp_conf]),
             "truth": np.concatenate([det, np.full(n_fp, -1)])}
    return {"n_images": n_images, "n_classes": k, "truth_kind": kind, "detected": detected, "labels": labels,
            "preds": preds, "sizes": sizes}


def cleanlab_inputs(ds: dict) -> dict:
    """cleanlab's labels/predictions lists and, in their flattening order, what each box is."""
    lab, p, k = ds["labels"], ds["preds"], ds["n_classes"]
    lab_order = np.lexsort((np.arange(len(lab["image"])), lab["image"]))
    labels = []
    l_start = np.searchsorted(lab["image"][lab_order], np.arange(ds["n_images"] + 1))
    p_order = np.lexsort((np.arange(len(p["image"])), p["cls"], p["image"]))
    p_start = np.searchsorted(p["image"][p_order], np.arange(ds["n_images"] + 1))
    predictions = []
    for i in range(ds["n_images"]):
        rows = lab_order[l_start[i]:l_start[i + 1]]
        labels.append({"bboxes": lab["box"][rows].astype(np.float32), "labels": lab["cls"][rows]})
        pr = p_order[p_start[i]:p_start[i + 1]]
        per_class = [np.zeros((0, 5), dtype=np.float32) for _ in range(k)]
        for c in np.unique(p["cls"][pr]):
            rc = pr[p["cls"][pr] == c]
            per_class[c] = np.concatenate([p["box"][rc], p["conf"][rc][:, None]], 1).astype(np.float32)
        arr = np.empty(k, dtype=object)
        arr[:] = per_class
        predictions.append(arr)
    return {"labels": labels, "predictions": predictions, "lab_order": lab_order, "pred_order": p_order}


# ------------------------------------------------------------------------------------------------ measures
def auroc(score_bad: np.ndarray, is_bad: np.ndarray) -> float:
    """P(a random injected box ranks above a random clean one), ties half (Mann-Whitney)."""
    pos, neg = score_bad[is_bad], score_bad[~is_bad]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2)[inv]  # average ranks over ties
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def precision_at_k(score_bad: np.ndarray, is_bad: np.ndarray) -> float:
    k = int(is_bad.sum())
    if k == 0:
        return float("nan")
    return float(is_bad[np.argsort(-score_bad, kind="mergesort")[:k]].mean())


def blind_labels(ds: dict) -> np.ndarray:
    """Per label (in ds order): no predicted box overlaps it at all."""
    lab, p = ds["labels"], ds["preds"]
    out = np.ones(len(lab["image"]), dtype=bool)
    order = np.argsort(p["image"], kind="stable")
    starts = np.searchsorted(p["image"][order], np.arange(ds["n_images"] + 1))
    for j, (i, b) in enumerate(zip(lab["image"], lab["box"])):
        rows = order[starts[i]:starts[i + 1]]
        if len(rows):
            out[j] = not (iou_1d(p["box"][rows], np.repeat(b[None], len(rows), 0)) > 0).any()
    return out


TYPES = {"badly_located": ("shift", "score_badly_located", "badloc"),
         "wrong_class": ("flip", "score_wrong_class", "swap"),
         "spurious": ("spawn", "score_spurious", "badloc")}


def measure(ds: dict, ours, theirs: dict | None) -> dict:
    """Figures for one dataset. ours: lossd.quality.Scores; theirs: cleanlab's scores in its flattening order."""
    ci = ds["_cl"]
    lab = ds["labels"]
    kinds = lab["kind"][ci["lab_order"]]  # cleanlab order == lossd's label rows (from_cleanlab keeps the order)
    boxes = ours.boxes
    idx = {b: j for j, b in enumerate(boxes.column("box_id").to_pylist())}
    # from_cleanlab names label k of image i "i:k"; cleanlab's flattening order is image by image
    names = [f"{i}:{k}" for i, d in enumerate(ci["labels"]) for k in range(len(d["labels"]))]
    rows = np.array([idx[nm] for nm in names])
    issue = np.asarray(boxes.column("issue").to_pylist(), dtype=object)[rows]
    blind = blind_labels(ds)[ci["lab_order"]]
    out = {}
    for t, (inj, col, cl) in TYPES.items():
        mask = (kinds == inj) | (kinds == "clean")
        bad = kinds[mask] == inj
        s = boxes.column(col).to_numpy()[rows][mask]
        b_pos, b_neg = blind[mask][bad].mean(), blind[mask][~bad].mean()
        r = {"injected": int(bad.sum()), "lossd_auroc": auroc(1 - s, bad),
             "lossd_precision_at_k": precision_at_k(1 - s, bad),
             "lossd_flag_recall": float((issue[mask][bad] == t).mean()),
             "lossd_flag_precision": float((kinds[issue == t] == inj).mean()) if (issue == t).any() else float("nan"),
             "blind_injected": round(float(b_pos), 4), "blind_clean": round(float(b_neg), 4),
             "box_only_ceiling": 1 - b_pos * b_neg / 2,
             "lossd_auroc_not_blind": auroc(1 - s[~blind[mask]], bad[~blind[mask]])}
        if theirs is not None:
            cs = theirs[cl][mask]
            r["cleanlab_auroc"] = auroc(1 - cs, bad)
            r["cleanlab_precision_at_k"] = precision_at_k(1 - cs, bad)
        out[t] = r
    # missing: every reference; positive = a detection of an object whose label was dropped
    p = ds["preds"]
    dropped = np.zeros(len(p["image"]), dtype=bool)
    real = p["truth"] >= 0
    dropped[real] = ds["truth_kind"][p["truth"][real]] == "drop"
    refs = ours.references
    ridx = {b: j for j, b in enumerate(refs.column("box_id").to_pylist())}
    pred_names = []
    for i, per_class in enumerate(ci["predictions"]):
        for c, arr in enumerate(per_class):
            pred_names += [f"{i}:{c}:{k}" for k in range(len(arr))]
    rrows = np.array([ridx[nm] for nm in pred_names])
    is_missing = dropped[ci["pred_order"]]
    sm = refs.column("score_missing").to_numpy()[rrows]
    r_issue = np.asarray(refs.column("issue").to_pylist(), dtype=object)[rrows]
    flagged = r_issue == "missing"
    m = {"injected": int(is_missing.sum()), "lossd_auroc": auroc(1 - sm, is_missing),
         "lossd_precision_at_k": precision_at_k(1 - sm, is_missing),
         "lossd_flag_recall": float(flagged[is_missing].mean()),
         "lossd_flag_precision": float(is_missing[flagged].mean()) if flagged.any() else float("nan")}
    if theirs is not None:
        ov = np.nan_to_num(theirs["overlooked"], nan=1.0)
        m["cleanlab_auroc"] = auroc(1 - ov, is_missing)
        m["cleanlab_precision_at_k"] = precision_at_k(1 - ov, is_missing)
    out["missing"] = m
    # images: any injected error (including a dropped label)
    has_err = np.zeros(ds["n_images"], dtype=bool)
    has_err[lab["image"][lab["kind"] != "clean"]] = True
    tk = ds["truth_kind"]
    has_err[ds["_truth_image"][tk == "drop"]] = True
    images = ours.images
    img_score = np.empty(ds["n_images"])
    img_score[np.array([int(k) for k in images.column("image_id").to_pylist()])] = images.column("score").to_numpy()
    im = {"with_errors": int(has_err.sum()), "lossd_auroc": auroc(1 - img_score, has_err),
          "lossd_precision_at_k": precision_at_k(1 - img_score, has_err)}
    # images whose only error is a dropped label: found only through score_missing among many false positives
    label_err = np.zeros(ds["n_images"], dtype=bool)
    label_err[lab["image"][lab["kind"] != "clean"]] = True
    drop_only = has_err & ~label_err
    im["drop_only_share"] = float(drop_only[has_err].mean())
    im["lossd_auroc_without_drop_only"] = auroc(1 - img_score[~drop_only], has_err[~drop_only])
    if theirs is not None:
        im["cleanlab_auroc_without_drop_only"] = auroc(1 - theirs["image"][~drop_only], has_err[~drop_only])
    # how the image ranking depends on how many boxes an image holds (each box can look doubtful by chance)
    n_boxes = np.bincount(lab["image"], minlength=ds["n_images"]) + np.bincount(p["image"], minlength=ds["n_images"])
    cuts = np.quantile(n_boxes, [1 / 3, 2 / 3])
    for name, sel in (("few_boxes", n_boxes <= cuts[0]), ("many_boxes", n_boxes > cuts[1])):
        im[f"lossd_auroc_{name}"] = auroc(1 - img_score[sel], has_err[sel])
        im[f"with_errors_share_{name}"] = float(has_err[sel].mean())
    im["lossd_auroc_true_box_chances"] = true_box_chances(boxes, rows, kinds, refs, rrows, is_missing, has_err)
    if theirs is not None:
        im["cleanlab_auroc"] = auroc(1 - theirs["image"], has_err)
        im["cleanlab_precision_at_k"] = precision_at_k(1 - theirs["image"], has_err)
    out["image"] = im
    return out


def true_box_chances(boxes, rows, kinds, refs, rrows, is_missing, has_err) -> float:
    """Image AUROC of prod(1 - p) with p each box's true chance of each issue given its per-type score, fitted to
    the injected truth of this very set (isotonic, per type). A yardstick for the image score's rule (how well
    the per-type scores alone rank images when turned into exact chances), not a score a user could compute: it
    needs the truth. Not a ceiling: the flags carry evidence beyond the per-type scores."""
    try:
        from sklearn.isotonic import IsotonicRegression
    except ImportError:
        return float("nan")
    n = len(has_err)
    log_clean = np.zeros(n)
    lab_img = np.array([int(k) for k in boxes.column("image_id").to_pylist()])[rows]
    ref_img = np.array([int(k) for k in refs.column("image_id").to_pylist()])[rrows]
    parts = [(lab_img, boxes.column(col).to_numpy()[rows], kinds == inj) for inj, col, _ in TYPES.values()]
    parts.append((ref_img, refs.column("score_missing").to_numpy()[rrows], is_missing))
    for img, score, positive in parts:
        p = IsotonicRegression(increasing=False, out_of_bounds="clip").fit(score, positive.astype(float))
        np.add.at(log_clean, img, np.log1p(-np.clip(p.predict(score), 0.0, 1.0 - 1e-9)))
    return auroc(-log_clean, has_err)


def image_sensitivity(ds: dict, ours) -> dict:
    """Image AUROC of the synthetic set over a grid of the image score's constants (reliability of the flags that
    a reference contradicts, reliability of the flags that rest on an absence; the flag share), the other
    constants as shipped."""
    from lossd.quality import job

    lab = ds["labels"]
    has_err = np.zeros(ds["n_images"], dtype=bool)
    has_err[lab["image"][lab["kind"] != "clean"]] = True
    has_err[ds["_truth_image"][ds["truth_kind"] == "drop"]] = True
    ids = [im.key for im in ds["_boxset_images"]]
    saved = dict(job.FLAG_RELIABILITY), job.FLAG_SHARE

    def image_auroc() -> float:
        t = job.image_table(ids, ids, ours.boxes, ours.references)
        score = np.empty(ds["n_images"])
        score[np.array([int(k) for k in t.column("image_id").to_pylist()])] = t.column("score").to_numpy()
        return auroc(1 - score, has_err)

    out = {"reliability": [], "flag_share": []}
    try:
        for contradicted in (0.8, 0.9, 0.95):
            for absent in (0.3, 0.4, 0.5, 0.6, 0.7):
                job.FLAG_RELIABILITY.update(badly_located=contradicted, wrong_class=contradicted, spurious=absent,
                                            missing=absent)
                out["reliability"].append([contradicted, absent, round(image_auroc(), 4)])
        job.FLAG_RELIABILITY.update(saved[0])
        for share in (0.5, 0.7, 0.9, 0.99, 1.0):
            job.FLAG_SHARE = share
            out["flag_share"].append([share, round(image_auroc(), 4)])
    finally:
        job.FLAG_RELIABILITY.update(saved[0])
        job.FLAG_SHARE = saved[1]
    return out


# ------------------------------------------------------------------------------------------------ tools
def run_lossd(ds: dict, timed: bool = False) -> tuple[object, dict]:
    from lossd.quality import evaluate_all, from_cleanlab

    lab, ref = from_cleanlab(ds["_cl"]["labels"], ds["_cl"]["predictions"],
                             image_sizes=[tuple(s) for s in ds["sizes"]])
    ds["_boxset_images"] = lab.images
    out = evaluate_all(lab, ref)  # the engine's kernels compiled/loaded once, as in a running job
    walls, cpus = [], []
    for _ in range(5 if timed else 0):  # best of 5: the machine may be shared
        t0, c0 = time.perf_counter(), time.process_time()
        out = evaluate_all(lab, ref)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return out, ({"lossd_scoring_s": min(walls), "lossd_scoring_cpu_s": min(cpus)} if timed else {})


def run_cleanlab(ds: dict) -> tuple[dict | None, dict]:
    try:
        from cleanlab.object_detection import rank
    except ImportError:
        return None, {}
    labels, predictions = ds["_cl"]["labels"], ds["_cl"]["predictions"]
    t0, c0 = time.perf_counter(), time.process_time()
    badloc = rank.compute_badloc_box_scores(labels=labels, predictions=predictions)
    swap = rank.compute_swap_box_scores(labels=labels, predictions=predictions)
    overlooked = rank.compute_overlooked_box_scores(labels=labels, predictions=predictions)
    t1, c1 = time.perf_counter(), time.process_time()
    image = rank.get_label_quality_scores(labels, predictions, verbose=False)
    t2, c2 = time.perf_counter(), time.process_time()
    scores = {"badloc": np.concatenate(badloc), "swap": np.concatenate(swap),
              "overlooked": np.concatenate([o for o in overlooked]), "image": np.asarray(image)}
    return scores, {"box_scores_s": t1 - t0, "box_scores_cpu_s": c1 - c0, "image_scores_s": t2 - t1,
                    "image_scores_cpu_s": c2 - c1}


def prepare(truth: dict, seed: int) -> dict:
    ds = inject(truth, np.random.default_rng(seed))
    ds["_truth_image"] = truth["image"]
    ds["_cl"] = cleanlab_inputs(ds)
    return ds


def pooled(results: list[dict]) -> dict:
    """Mean of each figure over seeds (COCO: 100 images per draw)."""
    out = {}
    for t in results[0]:
        out[t] = {k: (float(np.nanmean([r[t][k] for r in results])) if not isinstance(results[0][t][k], int)
                      else int(sum(r[t][k] for r in results))) for k in results[0][t]}
    return out


def write_coco(ds: dict, folder: Path) -> tuple[Path, Path]:
    """The dataset's labels and predictions as COCO files (labels.json, predictions.json) in ``folder``."""
    lab, p = ds["labels"], ds["preds"]
    images = [{"id": i, "width": float(w), "height": float(h), "file_name": f"{i:06d}.jpg"}
              for i, (w, h) in enumerate(ds["sizes"])]
    cats = [{"id": c + 1, "name": f"class{c:02d}"} for c in range(ds["n_classes"])]
    anns = [{"id": k + 1, "image_id": int(i), "category_id": int(c) + 1, "iscrowd": 0,
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
            for k, (i, c, b) in enumerate(zip(lab["image"], lab["cls"], lab["box"]))]
    res = [{"image_id": int(i), "category_id": int(c) + 1, "score": float(s),
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
           for i, c, s, b in zip(p["image"], p["cls"], p["conf"], p["box"])]
    lp, rp = folder / "labels.json", folder / "predictions.json"
    lp.write_text(json.dumps({"images": images, "categories": cats, "annotations": anns}))
    rp.write_text(json.dumps(res))
    return lp, rp


def job_wall(ds: dict) -> float:
    """`lossd quality` end to end on COCO files (read, calibrate, score, write every output and the report)."""
    from lossd.quality import run

    with tempfile.TemporaryDirectory() as tmp:
        lp, rp = write_coco(ds, Path(tmp))
        t0 = time.perf_counter()
        run(lp, rp, Path(tmp) / "out", shard_size=1000, progress=False)
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ report
def table(title: str, res: dict, with_cl: bool) -> list[str]:
    lines = [f"### {title}", "",
             "| issue | injected | lossd AUROC | lossd P@k | lossd flag recall / precision |"
             + (" cleanlab AUROC | cleanlab P@k | lossd − cleanlab |" if with_cl else "")
             + " box-only ceiling (blind injected / clean) |",
             "|---|---|---|---|---|" + ("---|---|---|" if with_cl else "") + "---|"]
    for t in ("badly_located", "wrong_class", "spurious", "missing", "image"):
        r = res[t]
        n = r.get("injected", r.get("with_errors"))
        flag = (f"{r['lossd_flag_recall']:.3f} / {r['lossd_flag_precision']:.3f}" if "lossd_flag_recall" in r
                else "–")
        row = f"| {t} | {n} | {r['lossd_auroc']:.3f} | {r['lossd_precision_at_k']:.3f} | {flag} |"
        if with_cl:
            row += (f" {r['cleanlab_auroc']:.3f} | {r['cleanlab_precision_at_k']:.3f} | "
                    f"{r['lossd_auroc'] - r['cleanlab_auroc']:+.3f} |")
        row += (f" {r['box_only_ceiling']:.3f} ({r['blind_injected']:.3f} / {r['blind_clean']:.3f}) |"
                if "box_only_ceiling" in r else " – |")
        lines.append(row)
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coco-seeds", type=int, default=10)
    ap.add_argument("--no-job", action="store_true", help="skip the end-to-end job timing")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    print(f"synthetic: {args.images} images ...", flush=True)
    syn = prepare(synthetic_truth(args.images, np.random.default_rng(args.seed)), args.seed + 1)
    ours, our_t = run_lossd(syn, timed=True)
    theirs, their_t = run_cleanlab(syn)
    res_syn = measure(syn, ours, theirs)
    grid = image_sensitivity(syn, ours)
    print("coco ...", flush=True)
    truth = coco_truth()
    coco_runs = []
    for s in range(args.coco_seeds):
        ds = prepare(truth, 2000 + s)  # draws 1000-1007 were used to choose constants; these are held out
        o, _ = run_lossd(ds)
        t, _ = run_cleanlab(ds)
        coco_runs.append(measure(ds, o, t))
    res_coco = pooled(coco_runs)
    wall = None if args.no_job else job_wall(syn)
    with_cl = theirs is not None
    res = {"command": f"python bench/label_quality/run.py --images {args.images} --seed {args.seed} "
                      f"--coco-seeds {args.coco_seeds}",
           "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
           "synthetic": {"images": args.images, "labels": int(len(syn["labels"]["image"])),
                         "predictions": int(len(syn["preds"]["image"])), "results": res_syn},
           "coco": {"images": len(truth["sizes"]), "seeds": args.coco_seeds, "results": res_coco},
           "speed": {**{k: round(v, 3) for k, v in our_t.items()},
                     **{f"cleanlab_{k}": round(v, 3) for k, v in their_t.items()},
                     "job_wall_s": None if wall is None else round(wall, 2)},
           "image_score_sensitivity": grid,
           "thresholds_pooled": ours.thresholds["calibration"]["pooled"]}
    sp = res["speed"]
    lines = ["# Label-quality benchmark: injected errors, lossd beside cleanlab", "",
             f"Command: `{res['command']}` ({res['machine']}).", "",
             f"Synthetic: {args.images} images, {res['synthetic']['labels']} labels, "
             f"{res['synthetic']['predictions']} predictions. COCO: the real val2014 boxes of {res['coco']['images']} "
             f"images, errors and detections drawn {args.coco_seeds} times (figures: mean over draws, counts: sum).",
             "", *table("Synthetic", res_syn, with_cl), *table("Real COCO boxes", res_coco, with_cl),
             "### Speed (synthetic set)", "",
             f"- lossd in-process scoring (calibrate, match, score, tables; best of 5): "
             f"**{sp['lossd_scoring_s']:.2f} s** wall, {sp['lossd_scoring_cpu_s']:.2f} s CPU"]
    if with_cl:
        lines += [f"- cleanlab {__import__('cleanlab').__version__} box sub-scores (badloc, swap, overlooked; one run): "
                  f"{sp['cleanlab_box_scores_s']:.1f} s wall, {sp['cleanlab_box_scores_cpu_s']:.1f} s CPU → lossd "
                  f"is **{sp['cleanlab_box_scores_cpu_s'] / sp['lossd_scoring_cpu_s']:.0f}×** faster in CPU time "
                  f"({sp['cleanlab_box_scores_s'] / sp['lossd_scoring_s']:.0f}× in wall time)",
                  f"- cleanlab image scores (get_label_quality_scores): {sp['cleanlab_image_scores_s']:.1f} s wall, "
                  f"{sp['cleanlab_image_scores_cpu_s']:.1f} s CPU"]
    else:
        lines += ["- cleanlab is not installed (`pip install \"lossd[compare]\"` to put its figures beside these)"]
    if wall is not None:
        lines.append(f"- `lossd quality` end to end on COCO JSON files (read, calibrate, score, write all outputs and "
                     f"the report): {wall:.1f} s wall")
    im = res_syn["image"]
    lines += ["", f"Images by box count (synthetic, labels + references): lossd image AUROC "
              f"{im['lossd_auroc_few_boxes']:.3f} on the third with fewest boxes "
              f"({im['with_errors_share_few_boxes']:.0%} hold an error), {im['lossd_auroc_many_boxes']:.3f} on the "
              f"third with most ({im['with_errors_share_many_boxes']:.0%} hold an error).",
              "", f"Yardstick for the image score: prod(1 - p) with p each box's true chance of each issue given its "
              f"per-type score (isotonic fit to the injected truth of the same set; no user can compute it) ranks "
              f"images at AUROC {im['lossd_auroc_true_box_chances']:.3f} (synthetic), "
              f"{res_coco['image']['lossd_auroc_true_box_chances']:.3f} (COCO).",
              "", "Image score's constants (synthetic image AUROC; shipped: reliabilities 0.9 / 0.5, flag share "
              "0.9): " + ", ".join(f"{a} / {b}: {v:.3f}" for a, b, v in grid["reliability"]) + "; flag share "
              + ", ".join(f"{a}: {v:.3f}" for a, v in grid["flag_share"]) + ".",
              "", f"Images whose only error is a dropped label ({im['drop_only_share']:.0%} of the images with an error) "
              f"are found only through a reference no label explains: without them, lossd's image AUROC is "
              f"{im['lossd_auroc_without_drop_only']:.3f}"
              + (f" (cleanlab {im['cleanlab_auroc_without_drop_only']:.3f})." if with_cl else "."),
              "", f"Calibrated thresholds (pooled over classes, synthetic): {res['thresholds_pooled']}"]
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
