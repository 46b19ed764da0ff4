"""The Open Inference Protocol (KServe v2) over HTTP, with the binary tensor data extension. The protocol's
request handling lives in lossd.oip, shared with gRPC; this module is the HTTP framing and routes."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..engine import get_loss
from ..batching import Batcher
from ..oip import (HEADER, SERVER_METADATA, InferCall, ProtocolError, check_version, finish_infer, model_metadata,
                   parse_http_body, prepare_infer)
from .deps import admitted, get_batcher, get_deadline, get_obs, require_api_key
from .errors import ApiError
from .jsonio import dumps
from .observability import Observability

router = APIRouter(prefix="/v2", tags=["open inference protocol"])

BINARY_BODY = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object", "description": "OIP inference request: id?, parameters?, "
                                    "inputs [{name, shape, datatype, data}], outputs?"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
                                            "binary tensor extension: a JSON header of Inference-Header-Content-"
                                            "Length bytes, then each input's raw little-endian bytes in order "
                                            "(parameters.binary_data_size on each binary input)"}}}}}


INLINE_PARSE_BYTES = 256 * 1024


def _prepare(name: str, body: bytes, header_len: str | None) -> InferCall:
    req, raw = parse_http_body(body, header_len)
    return prepare_infer(name, req, raw)


def _api_error(exc: ProtocolError) -> ApiError:
    return ApiError(404 if exc.code == "unknown_version" else 400, exc.code, exc.message)


def _check(name: str, version: str) -> None:
    try:
        check_version(name, version)
    except ProtocolError as exc:
        raise _api_error(exc) from None


@router.get("")
def server_metadata() -> dict:
    return SERVER_METADATA


@router.get("/health/live")
def live() -> dict:
    return {"live": True}


@router.get("/health/ready")
def ready(request: Request) -> Response:
    is_ready = request.app.state.ready.is_set() and not request.app.state.draining
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
def get_model(name: str, version: str = "1") -> dict:
    _check(name, version)
    return model_metadata(name)


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
def model_ready(name: str, request: Request, version: str = "1") -> Response:
    get_loss(name)
    _check(name, version)
    is_ready = request.app.state.ready.is_set()
    return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)


@router.post("/models/{name}/infer", openapi_extra=BINARY_BODY, dependencies=[Depends(require_api_key),
                                                                            Depends(admitted)])
@router.post("/models/{name}/versions/{version}/infer", openapi_extra=BINARY_BODY,
             dependencies=[Depends(require_api_key), Depends(admitted)])
async def infer(name: str, request: Request, version: str = "1", batcher: Batcher = Depends(get_batcher),
                deadline: float | None = Depends(get_deadline), obs: Observability = Depends(get_obs)) -> Response:
    """Evaluate a loss: JSON tensors, or the binary tensor data extension (the fast path for large batches)."""
    _check(name, version)
    body = await request.body()
    with obs.track("v2_infer", name) as t:
        try:
            if len(body) > INLINE_PARSE_BYTES:  # big JSON parses off the event loop
                call = await anyio.to_thread.run_sync(_prepare, name, body, request.headers.get(HEADER))
            else:
                call = _prepare(name, body, request.headers.get(HEADER))
        except ProtocolError as exc:
            raise _api_error(exc) from None
        out = await batcher.evaluate(name, **call.kwargs, deadline=deadline)
        resp, blobs = finish_infer(call, out)
        t.batch_size = int(resp["outputs"][0]["shape"][0]) if resp["outputs"] and resp["outputs"][0]["shape"] else 0
    head = dumps(resp)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(b"".join([head, *blobs]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})
