"""Every exception -> an HTTP response, through lossd.errors (the one table). /v1 answers lossd's error body
``{"error": {"code", "message", "details"}}``; /v2 answers the Open Inference Protocol's ``{"error": message}``
with Triton's statuses; both carry lossd-error-* headers."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine import EngineError
from ..errors import ServiceError, describe

HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def is_oip(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(path: str, exc: BaseException) -> JSONResponse:
    info = describe(exc)
    oip = is_oip(path)
    body = {"error": info.message} if oip else info.body_v1()
    headers = dict(info.headers())
    if info.code in ("request_timeout", "header_too_large"):
        headers["connection"] = "close"
    return JSONResponse(body, status_code=info.row.oip if oip else info.row.v1, headers=headers)


async def handle(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request.url.path, exc)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    # path and query parameters only: request bodies are parsed by the routes themselves (rest/body.py)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(p) for p in first.get("loc", ())) or "request"
    return error_response(request.url.path, ServiceError(f"{field}: {first.get('msg')}", field=field))


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code)
    if code is None:  # statuses the table has no row for keep their own status and text
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
    resp = error_response(request.url.path, ServiceError(str(exc.detail), code))
    if exc.headers:
        resp.headers.update(exc.headers)
    return resp


async def disconnect_handler(request: Request, exc: ClientDisconnect) -> Response:
    return Response(status_code=400)  # the client went away mid-body: nobody reads this, and nothing to log


def install(app) -> None:
    app.add_exception_handler(ClientDisconnect, disconnect_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(EngineError, handle)
    app.add_exception_handler(ServiceError, handle)
    # anything else is an internal fault: 500 'internal', its traceback in the log only
    app.add_exception_handler(Exception, handle)
