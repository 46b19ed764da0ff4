"""Shared state reaches the routers through these dependencies, never through globals."""

from __future__ import annotations

import math
import time

from fastapi import Request

from ..batching import Batcher
from ..engine import Engine
from .errors import ApiError
from .observability import Observability


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_obs(request: Request) -> Observability:
    return request.app.state.obs


def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


TIMEOUT_HEADER = "lossd-timeout"


def get_deadline(request: Request) -> float | None:
    """time.monotonic() deadline from the `lossd-timeout: <seconds>` header, if sent."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ApiError(400, "invalid_request", f"header {TIMEOUT_HEADER} must be a positive number of seconds, "
                       f"got {raw!r}")
    return time.monotonic() + seconds
