"""REST transport: lossd's /v1 API and the Open Inference Protocol (/v2) over one engine."""

from .app import create_app

__all__ = ["create_app"]
