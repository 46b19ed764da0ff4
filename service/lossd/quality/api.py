"""The Python API: ``evaluate`` (one table of label boxes) and ``evaluate_all`` (every table and the summary), in-process
or on a server, from files, ``BoxSet``s or cleanlab ObjectLab's inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .job import Inputs, image_table, make_evaluator, score_shard
from .readers import BoxSet, InputError, from_cleanlab, read_any
from .score import Thresholds, calibrate_all


@dataclass
class Scores:
    boxes: pa.Table  # one row per label box: issue, score, score_badly_located, score_wrong_class, score_spurious
    references: pa.Table  # one row per reference box: issue, score_missing, label_id
    images: pa.Table  # one row per image, worst first
    thresholds: dict  # the thresholds used: given or calibrated per class


def _inputs(labels: Any, reference: Any, classes=None, sizes=None, class_names=None,
            image_sizes=None) -> tuple[BoxSet, BoxSet]:
    if isinstance(labels, BoxSet):
        if not isinstance(reference, BoxSet):
            raise InputError("reference: labels is a BoxSet, so reference must be one too")
        return labels, reference
    if isinstance(labels, (str, Path)):
        lab = read_any(labels, classes=classes, sizes=sizes)
        return lab, read_any(reference, classes=classes, sizes=sizes, like=lab)
    if isinstance(labels, (list, tuple)):
        lab, ref = from_cleanlab(labels, reference, class_names, image_sizes)
        return lab, ref
    raise InputError(f"labels: expected a path, a BoxSet or cleanlab's list of per-image dicts, got "
                     f"{type(labels).__name__}")


def evaluate_all(labels: Any, reference: Any, *, server: str | None = None, api_key: str | None = None,
          device: str = "auto", classes=None, sizes=None, class_names=None, image_sizes=None,
          **thresholds) -> Scores:
    """Score label boxes against a reference (model predictions or a second annotator).

    ``labels``/``reference``: paths (COCO .json, VOC or YOLO folders, as ``lossd quality``), ``BoxSet``s, or
    cleanlab ObjectLab's ``labels`` (list of dicts) and ``predictions`` (per image, one [M, 5] array per class;
    ``class_names`` names the class ids). ``thresholds``: any field of ``Thresholds`` (conf, ok_iou,
    missing_conf, match_iou, wrong_class_iou, support_iou, loss); those left out of conf, ok_iou and missing_conf
    are calibrated per class."""
    unknown = set(thresholds) - set(Thresholds.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown threshold(s) {sorted(unknown)}; known: {sorted(Thresholds.__dataclass_fields__)}")
    th = Thresholds(**thresholds)
    lab, ref = _inputs(labels, reference, classes, sizes, class_names, image_sizes)
    inp = Inputs(lab, ref, "")
    evaluator = make_evaluator(server, api_key, device)
    try:
        cal = calibrate_all(lab, ref, th, evaluator, inp.groups)
        boxes, refs = score_shard(inp, np.arange(len(lab.images)), th, cal, evaluator)
    finally:
        evaluator.close()
    images = image_table([im.key for im in lab.images], [im.file for im in lab.images], boxes, refs)
    return Scores(boxes, refs, images, {**th.as_dict(), "calibration": cal.as_dict(lab.categories)})


def evaluate(labels: Any, reference: Any, **kwargs) -> pa.Table:
    """One row per label box (see ``evaluate_all`` for the arguments); ``.to_pandas()`` turns it into a DataFrame."""
    return evaluate_all(labels, reference, **kwargs).boxes


__all__ = ["Scores", "evaluate", "evaluate_all"]
