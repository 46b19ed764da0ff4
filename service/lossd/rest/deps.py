"""Shared state reaches the routers through these dependencies, never through globals."""

from __future__ import annotations

from fastapi import Request

from ..engine import Engine
from .observability import Observability


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_obs(request: Request) -> Observability:
    return request.app.state.obs
