"""Exceptions -> gRPC status and trailing metadata, through lossd.errors (the one table)."""

from __future__ import annotations

import grpc

from lossd_client.wire import pb

from ..errors import describe


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status the table gives ``exc`` (internal faults: INTERNAL, logged)."""
    info = describe(exc)
    context.set_trailing_metadata(tuple(info.headers()))
    await context.abort(getattr(grpc.StatusCode, info.row.grpc), info.message)


def stream_error(exc: BaseException) -> pb.Error:
    """An error in place, for one item of a stream (the stream goes on)."""
    info = describe(exc)
    return pb.Error(code=info.code, message=info.message, field=info.field or "", rows=info.rows or [],
                    n_rows=info.n_rows or 0)
