"""JSON out through orjson: numpy arrays serialise natively, about 15x faster than json.dumps on lists.

A big answer (a million losses and gradients is ~30 MB of JSON) is written slice by slice, giving the event loop a
turn between slices: the serializer holds the GIL, so one call would stall health probes and gRPC for its whole
run (measured ~110 ms for 960k values on a loaded 2-core machine).
"""

from __future__ import annotations

import asyncio
import logging
import weakref

import numpy as np
import orjson
from fastapi.responses import Response

log = logging.getLogger("lossd.rest")

OPTIONS = orjson.OPT_SERIALIZE_NUMPY
SLICE_VALUES = 65536  # values per slice: a few milliseconds of serializing


def dumps(payload) -> bytes:
    return orjson.dumps(payload, option=OPTIONS)


async def dumps_yielding(payload: dict) -> bytes:
    """dumps() of a flat dict whose big values are numpy arrays (sliced along their first axis)."""
    parts = [b"{"]
    for i, (key, value) in enumerate(payload.items()):
        parts.append((b"," if i else b"") + orjson.dumps(key) + b":")
        if not isinstance(value, np.ndarray) or value.ndim == 0 or value.size <= SLICE_VALUES:
            parts.append(dumps(value))
            continue
        rows = max(1, SLICE_VALUES // max(1, value.size // max(1, value.shape[0])))
        parts.append(b"[")
        for start in range(0, value.shape[0], rows):
            chunk = dumps(value[start:start + rows])[1:-1]  # the slice's elements, without its brackets
            parts.append((b"," if start else b"") + chunk)
            await asyncio.sleep(0)
        parts.append(b"]")
    parts.append(b"}")
    return b"".join(parts)


def json_response(payload, status_code: int = 200) -> Response:
    return Response(dumps(payload), status_code=status_code, media_type="application/json")


async def json_response_yielding(payload: dict, status_code: int = 200) -> Response:
    return Response(await dumps_yielding(payload), status_code=status_code, media_type="application/json")


# The most bytes one value takes in orjson's text, its comma included: measured over negative values of every
# binary exponent with random mantissas ('-0.0000010830308,' 17 for float32, '-1.3498094062947883e-308,' 25 for
# float64; tests/rest/test_answer_budget.py checks it); IoU values in [0, 1] take ~10.6 on average (float32).
JSON_MAX_BYTES_PER_VALUE = {"float32": 17, "float64": 25}


def sliced_json_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """The most JSON text a SlicedJsonResponse of an array of ``shape`` holds at once: a slice's text, its copy
    without brackets and the server's chunk framing of it."""
    rows = shape[0] if shape else 1
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    rows_at_once = min(rows, max(1, SLICE_VALUES // max(1, per_row)))
    return 3 * (rows_at_once * per_row * JSON_MAX_BYTES_PER_VALUE.get(dtype, 25) + 3 * rows_at_once + 64)


class SlicedJsonResponse(Response):
    """A ``{"key": array}`` answer written slice by slice as the client reads it (chunked transfer, no
    Content-Length): its JSON text (~2.7x the float32 array) is never whole in memory, and a slow reader holds the
    array and one slice, not the text. ``on_done`` runs once, when the last byte is handed over or the answer is
    abandoned."""

    media_type = "application/json"

    def __init__(self, payload: dict, on_done=None, status_code: int = 200, stall_seconds: float | None = None) -> None:
        super().__init__(None, status_code=status_code)
        self.stall_seconds = stall_seconds
        del self.headers["content-length"]
        self.payload = payload
        self.on_done = on_done
        # on_done also runs if the answer is dropped unsent (collected), on the event loop that made it
        loop = asyncio.get_running_loop()
        self._done = weakref.finalize(self, loop.call_soon_threadsafe, on_done) if on_done is not None else None

    def size_hint(self) -> int:
        return sum(v.nbytes for v in self.payload.values() if isinstance(v, np.ndarray))

    def _pieces(self):
        yield b"{"
        for i, (key, value) in enumerate(self.payload.items()):
            yield (b"," if i else b"") + orjson.dumps(key) + b":"
            if not isinstance(value, np.ndarray) or value.ndim == 0 or value.size <= SLICE_VALUES:
                yield dumps(value)
                continue
            rows = max(1, SLICE_VALUES // max(1, value.size // max(1, value.shape[0])))
            yield b"["
            for start in range(0, value.shape[0], rows):
                if start:
                    yield b","
                yield dumps(value[start:start + rows])[1:-1]  # the slice's elements, without its brackets
            yield b"]"
        yield b"}"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for piece in self._pieces():
                try:
                    await asyncio.wait_for(send({"type": "http.response.body", "body": piece, "more_body": True}),
                                           self.stall_seconds)
                except asyncio.TimeoutError:
                    # the client stopped reading: the answer is dropped unfinished, so the server closes the
                    # connection, and what it held is freed
                    log.warning("a client took no part of a %d-byte answer for %g s (LOSSD_SEND_STALL_SECONDS); "
                                "connection closed", self.size_hint(), self.stall_seconds)
                    return
                await asyncio.sleep(0)  # a send that does not wait on the client still gives the loop a turn
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if self._done is not None and self._done.detach() is not None:
                self.on_done()
