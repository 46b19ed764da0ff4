"""GET /playground: a page that shows what lossd answers while two boxes move (static files from the package)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import RedirectResponse, Response

router = APIRouter(tags=["playground"], include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "playground"
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "playground.css": "text/css; charset=utf-8"}
# everything from this server; the API may be another origin (the page's "API base", allowed there through
# LOSSD_CORS_ORIGINS)
HEADERS = {"Content-Security-Policy": "default-src 'self'; connect-src *; img-src 'self' data:; "
                                      "frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)


@router.get("/playground")
def page() -> Response:
    return _file("index.html")


@router.get("/playground/")
def page_slash() -> RedirectResponse:
    return RedirectResponse("../playground", status_code=308)


@router.get("/playground/{name}")
def asset(name: str) -> Response:
    if name == "index.html":  # the page's assets are relative to /playground: served from here they would miss
        return RedirectResponse("../playground", status_code=308)
    if name not in FILES:
        raise HTTPException(404, "no such playground file")
    return _file(name)
