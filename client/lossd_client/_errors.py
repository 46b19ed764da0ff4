"""Every error the client raises:

    LossdError                 base: .code (the server's stable code), .message, .status, .details
    ├── InvalidInputError      the request was refused (422/400, INVALID_ARGUMENT): .field and .rows say where
    ├── NotFoundError          unknown loss or metric (404, NOT_FOUND)
    ├── TooLargeError          over a size budget (413, RESOURCE_EXHAUSTED with code too_large)
    ├── OverloadedError        the server shed load (429, RESOURCE_EXHAUSTED); retried before it is raised
    ├── UnavailableError       the server is down or draining (503, UNAVAILABLE, connection refused); retried
    ├── DeadlineExceededError  the call ran out of time
    ├── ClientClosedError      a call on a client after its close() (code client_closed); nothing is sent
    └── ServerError            anything else the server got wrong (5xx, INTERNAL, UNKNOWN)
"""

from __future__ import annotations


class LossdError(Exception):
    def __init__(self, code: str, message: str, status: object = None, details: dict | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.details = details or {}

    def __reduce__(self):
        # pickled by its fields, so that it crosses a process boundary (multiprocessing, a Ray task) intact
        return self.__class__, (self.code, self.message, self.status, self.details)

    @property
    def field(self) -> str | None:
        return self.details.get("field")

    @property
    def rows(self) -> list[int] | None:
        return self.details.get("rows")


class InvalidInputError(LossdError):
    pass


class AuthError(InvalidInputError):
    """The server wants an API key this call lacks or has wrong (401 / UNAUTHENTICATED), or refuses the caller
    (403 / PERMISSION_DENIED: e.g. a web page's Origin, shared memory from another host). The same class over
    REST and gRPC."""


class NotFoundError(LossdError):
    pass


class TooLargeError(LossdError):
    pass


class OverloadedError(LossdError):
    pass


class UnavailableError(LossdError):
    pass


class DeadlineExceededError(LossdError):
    pass


class ServerError(LossdError):
    pass


class ClientClosedError(LossdError):
    """A call on a client after its ``close()`` (or after its ``with`` block): make a new client."""

    def __init__(self, code: str = "client_closed", message: str = "this client was closed (close() or the end "
                 "of its with block); make a new one", status: object = None, details: dict | None = None) -> None:
        super().__init__(code, message, status, details)


RETRYABLE = (OverloadedError, UnavailableError)


def from_http(status: int, code: str | None, message: str, details: dict | None = None) -> LossdError:
    cls = {401: AuthError, 403: AuthError, 404: NotFoundError, 413: TooLargeError, 429: OverloadedError,
           503: UnavailableError, 504: DeadlineExceededError}.get(status)
    if cls is None:
        cls = InvalidInputError if 400 <= status < 500 else ServerError
    return cls(code or f"http_{status}", message, status, details)


def from_grpc(status_name: str, code: str | None, message: str, details: dict | None = None) -> LossdError:
    if status_name == "RESOURCE_EXHAUSTED":
        cls = TooLargeError if code == "too_large" else OverloadedError
    else:
        cls = {"INVALID_ARGUMENT": InvalidInputError, "NOT_FOUND": NotFoundError, "UNAVAILABLE": UnavailableError,
               "DEADLINE_EXCEEDED": DeadlineExceededError, "UNAUTHENTICATED": AuthError,
               "PERMISSION_DENIED": AuthError}.get(status_name, ServerError)
    return cls(code or status_name.lower(), message, status_name, details)
