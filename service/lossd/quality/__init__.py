"""Label quality: score a dataset's boxes against a reference and flag likely label errors (`lossd quality`)."""

from .job import run
from .readers import BoxSet, read_any, read_coco, read_voc, read_yolo
from .score import ISSUES, Thresholds

__all__ = ["BoxSet", "ISSUES", "Thresholds", "read_any", "read_coco", "read_voc", "read_yolo", "run"]
