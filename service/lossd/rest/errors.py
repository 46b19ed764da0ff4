"""Engine error codes -> HTTP statuses, in this one place; the JSON error bodies for /v1 and the OIP routes."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..admission import Draining, Overloaded, ResourceExhausted
from ..batching import DeadlineExpired
from ..engine import EngineError

STATUS = {
    "unknown_loss": 404,
    "unknown_metric": 404,
    "too_large": 413,
}
DEFAULT_STATUS = 422  # the request was well-formed JSON but its content is not acceptable


def status_for(code: str) -> int:
    return STATUS.get(code, DEFAULT_STATUS)


class ApiError(Exception):
    """An error raised by the transport itself (bad JSON, bad binary framing), with the /v1 error shape."""

    def __init__(self, status: int, code: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details or {}


def _is_oip(request: Request) -> bool:
    return request.url.path.startswith("/v2")


def error_response(request: Request, status: int, body: dict) -> JSONResponse:
    # the code also travels as a header, so OIP clients (whose error body is a bare string) can read it
    headers = {"lossd-error-code": body["code"]}
    details = body.get("details") or {}
    if details.get("field"):
        headers["lossd-error-field"] = str(details["field"])
    if details.get("rows"):
        headers["lossd-error-rows"] = ",".join(map(str, details["rows"]))
    if _is_oip(request):  # the Open Inference Protocol's error shape
        return JSONResponse({"error": body["message"]}, status_code=status, headers=headers)
    return JSONResponse({"error": body}, status_code=status, headers=headers)


async def engine_error_handler(request: Request, exc: EngineError) -> JSONResponse:
    return error_response(request, status_for(exc.code), exc.to_dict())


async def deadline_handler(request: Request, exc: DeadlineExpired) -> JSONResponse:
    return error_response(request, 504, {"code": exc.code, "message": str(exc), "details": {}})


async def overloaded_handler(request: Request, exc: Overloaded) -> JSONResponse:
    resp = error_response(request, 429, {"code": exc.code, "message": str(exc), "details": {}})
    resp.headers["Retry-After"] = str(max(1, round(request.app.state.admission.retry_after)))
    return resp


async def unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    resp = error_response(request, 503, {"code": exc.code, "message": str(exc), "details": {}})
    resp.headers["Retry-After"] = "1"
    return resp


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(request, exc.status, {"code": exc.code, "message": exc.message, "details": exc.details})


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        at = first.get("loc", ("body", "?"))[-1]
        code, message, field = "invalid_json", f"the body is not valid JSON: {first.get('msg')} at character {at}", "body"
    else:
        code, message = "invalid_request", f"{field}: {first.get('msg')}"
    details = {"field": field, "errors": [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in errors[:10]]}
    return error_response(request, 422 if code != "invalid_json" else 400,
                          {"code": code, "message": message, "details": details})


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
    resp = error_response(request, exc.status_code, {"code": code, "message": str(exc.detail), "details": {}})
    if exc.headers:
        resp.headers.update(exc.headers)
    return resp


def install(app) -> None:
    app.add_exception_handler(EngineError, engine_error_handler)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(DeadlineExpired, deadline_handler)
    app.add_exception_handler(Overloaded, overloaded_handler)
    app.add_exception_handler(Draining, unavailable_handler)
    app.add_exception_handler(ResourceExhausted, unavailable_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
