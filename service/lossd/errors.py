"""Every error a client can get, in one table. The engine raises ``EngineError``; the service layer and the
transports raise ``ServiceError``; anything else is an internal fault. Each transport maps an exception to its
wire form through ``describe`` and ``TABLE`` only:

    ServiceError(ValueError-free)          code, message, field, rows, retry_after
    ├── Overloaded          overloaded           the in-flight limit (LOSSD_MAX_IN_FLIGHT) is reached
    ├── Draining            draining             SIGTERM: readiness is false, new work is refused
    ├── ResourceExhausted   resource_exhausted   the device ran out of memory for this request
    └── DeadlineExpired     deadline_exceeded    the caller's deadline passed before the work started
    EngineError (lossd.engine)                   invalid input, its code one of engine.errors.CODES

    code                 /v1   /v2 (OIP)  gRPC
    (see TABLE below; a code missing from it is a bug, checked by a test)

Client input is hostile until parsed: ``parsing(field)`` turns the exceptions a parser raises on bad bytes
(ValueError, OverflowError, TypeError, RecursionError, UnicodeError, ...) into ``invalid_request`` naming the
field, and ``quote`` shortens client text before it appears in a message, a header or trailing metadata.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

from .engine import EngineError
from .engine.errors import QUOTE_CHARS, quote  # noqa: F401  (re-exported: one quoting rule)

log = logging.getLogger("lossd.errors")

MESSAGE_CHARS = 1000  # a message (and each header or metadata value) is cut to this many characters


@dataclass(frozen=True)
class Row:
    v1: int      # HTTP status on lossd's own API (/v1, /metrics, anything that is not /v2)
    oip: int     # HTTP status on the Open Inference Protocol (/v2), as Triton and KServe answer
    grpc: str    # grpc.StatusCode name, both gRPC services
    retry: bool  # whether the client may retry the same call (Retry-After / retry-after metadata)


_INPUT = Row(422, 400, "INVALID_ARGUMENT", False)
TABLE: dict[str, Row] = {
    # the engine's codes (lossd.engine.errors.CODES): the content of a well-formed request is not acceptable
    "unknown_loss": Row(404, 404, "NOT_FOUND", False),
    "unknown_metric": Row(404, 404, "NOT_FOUND", False),
    "unknown_format": _INPUT,
    "unknown_reduction": _INPUT,
    "unknown_param": _INPUT,
    "unknown_dtype": _INPUT,
    "invalid_param": _INPUT,
    "param_out_of_range": _INPUT,
    "invalid_shape": _INPUT,
    "length_mismatch": _INPUT,
    "non_finite": _INPUT,
    "inverted_box": _INPUT,
    "invalid_value": _INPUT,
    "too_large": Row(413, 413, "RESOURCE_EXHAUSTED", False),
    # the service's and transports' own
    "invalid_request": Row(422, 400, "INVALID_ARGUMENT", False),   # fields, types, shapes of the request itself
    "invalid_json": Row(400, 400, "INVALID_ARGUMENT", False),      # the body is not JSON (or nested too deeply)
    "invalid_header": Row(400, 400, "INVALID_ARGUMENT", False),    # a header or metadata value
    "invalid_http": Row(400, 400, "INVALID_ARGUMENT", False),      # bytes the HTTP parser cannot read
    "unknown_version": Row(404, 404, "NOT_FOUND", False),
    "unknown_model": Row(404, 404, "NOT_FOUND", False),
    "unauthorized": Row(401, 401, "UNAUTHENTICATED", False),
    "forbidden": Row(403, 403, "PERMISSION_DENIED", False),         # shared memory from a client on another host
    "too_many_regions": Row(429, 429, "RESOURCE_EXHAUSTED", False),  # LOSSD_MAX_SHM_REGIONS are registered
    "unknown_region": Row(400, 400, "INVALID_ARGUMENT", False),     # no shared-memory region by that name
    "region_truncated": Row(400, 400, "INVALID_ARGUMENT", False),   # its object shrank below the region
    "not_found": Row(404, 404, "UNIMPLEMENTED", False),
    "method_not_allowed": Row(405, 405, "UNIMPLEMENTED", False),
    "request_timeout": Row(408, 408, "DEADLINE_EXCEEDED", True),    # the body did not arrive in time
    "header_too_large": Row(431, 431, "INVALID_ARGUMENT", False),
    "unsupported_encoding": Row(415, 415, "INVALID_ARGUMENT", False),  # a compressed body (Content-Encoding)
    "overloaded": Row(429, 429, "RESOURCE_EXHAUSTED", True),
    "draining": Row(503, 503, "UNAVAILABLE", True),
    "resource_exhausted": Row(503, 503, "RESOURCE_EXHAUSTED", True),
    "deadline_exceeded": Row(504, 504, "DEADLINE_EXCEEDED", False),
    "internal": Row(500, 500, "INTERNAL", False),
}


def ascii_value(text: str, limit: int = MESSAGE_CHARS) -> str:
    """A header / metadata value: printable ASCII, at most ``limit`` characters."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if 32 <= ord(c) < 127 else " " for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ServiceError(Exception):
    """An error the service or a transport raises on purpose; ``code`` is a row of TABLE."""

    code = "invalid_request"

    def __init__(self, message: str, code: str | None = None, *, field: str | None = None,
                 rows: Sequence[int] | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if self.code not in TABLE:
            raise AssertionError(f"error code {self.code!r} has no row in lossd.errors.TABLE")
        self.message = message
        self.field = field
        self.rows = list(rows) if rows is not None else None
        self.retry_after = retry_after


class Overloaded(ServiceError):
    code = "overloaded"


class Draining(ServiceError):
    code = "draining"


class ResourceExhausted(ServiceError):
    """The device ran out of memory for this request (after splitting it); others carry on."""

    code = "resource_exhausted"


class DeadlineExpired(ServiceError):
    """The request's deadline passed before its work started; it was not computed."""

    code = "deadline_exceeded"


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str
    field: str | None
    rows: list[int] | None
    n_rows: int | None
    retry_after: float | None
    row: Row

    def details(self) -> dict:
        out: dict = {}
        if self.field is not None:
            out["field"] = self.field
        if self.rows is not None:
            out["rows"] = self.rows
            out["n_rows"] = self.n_rows
        return out

    def body_v1(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "details": self.details()}}

    def headers(self) -> list[tuple[str, str]]:
        """lossd-error-* headers (REST) / trailing metadata (gRPC): OIP clients, whose error body is a bare
        string, read the code there."""
        out = [("lossd-error-code", self.code)]
        if self.field:
            out.append(("lossd-error-field", ascii_value(self.field, QUOTE_CHARS)))
        if self.rows:
            out.append(("lossd-error-rows", ",".join(map(str, self.rows))))
        if self.retry_after is not None or self.row.retry:
            out.append(("retry-after", str(max(1, round(self.retry_after or 1)))))
        return out


def describe(exc: BaseException) -> ErrorInfo:
    """The one mapping from an exception to what a client sees. Internal faults are logged with their traceback
    here and reach the client as 'internal' without Python's text."""
    if isinstance(exc, EngineError):
        code, message, field, rows, n_rows, retry = exc.code, exc.message, exc.field, exc.rows, exc.n_rows, None
    elif isinstance(exc, ServiceError):
        code, message, field, rows, retry = exc.code, exc.message, exc.field, exc.rows, exc.retry_after
        n_rows = None if rows is None else len(rows)
    else:
        log.error("internal error", exc_info=exc)
        code, message, field, rows, n_rows, retry = ("internal", "internal server error (logged on the server)",
                                                     None, None, None, None)
    row = TABLE.get(code)
    if row is None:  # an EngineError code nobody added here: a bug, but the client still gets its message
        log.error("error code %r has no row in lossd.errors.TABLE", code)
        row = _INPUT
    if len(message) > MESSAGE_CHARS:
        message = message[:MESSAGE_CHARS - 3] + "..."
    if field is not None and len(field) > QUOTE_CHARS:
        field = field[:QUOTE_CHARS] + "..."
    return ErrorInfo(code, message, field, rows, n_rows, retry, row)


# What a parser may raise on hostile bytes; MemoryError is left out on purpose (an internal fault, not the
# client's), and EngineError/ServiceError pass through unchanged.
PARSE_ERRORS = (ValueError, OverflowError, TypeError, RecursionError, UnicodeError, KeyError, IndexError,
                AttributeError)


@contextlib.contextmanager
def parsing(field: str, code: str = "invalid_request") -> Iterator[None]:
    """Turns a parser's exception on client input into ``code`` naming ``field``."""
    try:
        yield
    except (EngineError, ServiceError):
        raise
    except PARSE_ERRORS as exc:
        what = "nested too deeply" if isinstance(exc, RecursionError) else quote(str(exc), 200).strip("'\"")
        raise ServiceError(f"{field}: {what}", code, field=field) from None
