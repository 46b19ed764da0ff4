"""Label quality: score a dataset's boxes against a reference and flag likely label errors (`lossd quality`,
or ``lossd.quality.evaluate`` from Python)."""

from .api import Scores, evaluate, evaluate_all
from .job import run
from .readers import BoxSet, InputError, from_cleanlab, read_any, read_coco, read_voc, read_yolo
from .score import ISSUES, Evaluator, Thresholds

__all__ = ["BoxSet", "Evaluator", "ISSUES", "InputError", "Scores", "Thresholds", "evaluate", "from_cleanlab",
           "read_any", "read_coco", "read_voc", "read_yolo", "run", "evaluate_all"]
