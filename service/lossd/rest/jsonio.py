"""JSON out through orjson: numpy arrays serialise natively, about 15x faster than json.dumps on lists."""

from __future__ import annotations

import orjson
from fastapi.responses import Response


def dumps(payload) -> bytes:
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def json_response(payload, status_code: int = 200) -> Response:
    return Response(dumps(payload), status_code=status_code, media_type="application/json")
