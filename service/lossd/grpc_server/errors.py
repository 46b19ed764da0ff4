"""Engine and protocol errors -> gRPC status codes, in this one place."""

from __future__ import annotations

import grpc

from ..admission import Draining, Overloaded, ResourceExhausted
from ..batching import DeadlineExpired
from ..engine import EngineError
from ..oip import ProtocolError

STATUS = {
    "unknown_loss": grpc.StatusCode.NOT_FOUND,
    "unknown_metric": grpc.StatusCode.NOT_FOUND,
    "unknown_version": grpc.StatusCode.NOT_FOUND,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_for(code: str) -> grpc.StatusCode:
    return STATUS.get(code, grpc.StatusCode.INVALID_ARGUMENT)


def trailers(exc: EngineError) -> tuple:
    md = [("lossd-error-code", exc.code)]
    if exc.field:
        md.append(("lossd-error-field", exc.field))
    if exc.rows:
        md.append(("lossd-error-rows", ",".join(map(str, exc.rows))))
    return tuple(md)


async def abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Ends the call with the status for an EngineError or ProtocolError (re-raises anything else)."""
    if isinstance(exc, EngineError):
        context.set_trailing_metadata(trailers(exc))
        await context.abort(status_for(exc.code), exc.message)
    if isinstance(exc, (Overloaded, Draining, ResourceExhausted)):
        status = {Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED, Draining: grpc.StatusCode.UNAVAILABLE,
                  ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED}[type(exc)]
        context.set_trailing_metadata((("lossd-error-code", exc.code), ("retry-after", "1")))
        await context.abort(status, str(exc))
    if isinstance(exc, DeadlineExpired):
        context.set_trailing_metadata((("lossd-error-code", exc.code),))
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, ProtocolError):
        context.set_trailing_metadata((("lossd-error-code", exc.code),))
        await context.abort(status_for(exc.code), exc.message)
    raise exc
