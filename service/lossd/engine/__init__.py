"""lossd's loss engine: IoU-family and classification losses with gradients, and IoU-family metrics.

Transport-free: REST and gRPC are thin layers over ``Engine``.
"""

from ._utils import BOX_FORMATS, frozen_detached, to_xyxy
from .engine import REDUCTIONS, Engine, Out, Result, pick_device
from .errors import CODES, EngineError
from .registry import LOSSES, METRICS, Param, Spec, get_loss, get_metric

__all__ = ["BOX_FORMATS", "CODES", "Engine", "EngineError", "LOSSES", "METRICS", "Out", "Param", "REDUCTIONS",
           "Result", "Spec", "frozen_detached", "get_loss", "get_metric", "pick_device", "to_xyxy"]
