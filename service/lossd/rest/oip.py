"""The Open Inference Protocol (KServe v2) over HTTP, with the binary tensor data extension and Triton's model
configuration, statistics and repository extensions. The protocol lives in lossd.oip and lossd.service; this
module is the HTTP framing and routes. Statuses are Triton's (400 for bad input)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..bodyparse import BIG_JSON_BYTES
from ..errors import ServiceError
from ..oip import HEADER, loads_json, parse_http_body, server_metadata as metadata
from ..service import Service
from .body import read_json
from .deps import get_deadline, get_service, require_api_key
from .jsonio import dumps
from .openapi import OIP_ERRORS

BINARY_BODY = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object", "description": "OIP inference request: id?, parameters?, "
                                    "inputs [{name, shape, datatype, data}], outputs?"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
                                            "binary tensor extension: a JSON header of Inference-Header-Content-"
                                            "Length bytes, then each input's raw little-endian bytes in order "
                                            "(parameters.binary_data_size on each binary input)"}}}}}

# open: liveness, readiness and server metadata (the same set is open over gRPC, see grpc_server/server.py)
router = APIRouter(prefix="/v2", tags=["open inference protocol"], responses=OIP_ERRORS)
keyed = APIRouter(prefix="/v2", tags=["open inference protocol"], responses=OIP_ERRORS,
                  dependencies=[Depends(require_api_key)])


@router.get("")
def server_metadata(service: Service = Depends(get_service)) -> dict:
    return metadata(service.settings.max_shm_regions > 0)


@router.get("/health/live")
def live() -> dict:
    return {"live": True}


def _ready(request: Request) -> bool:
    return request.app.state.ready.is_set() and not request.app.state.draining


@router.get("/health/ready")
def ready(request: Request) -> Response:
    is_ready = _ready(request)
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
def model_ready(name: str, request: Request, version: str = "1", service: Service = Depends(get_service)) -> Response:
    service.model_ready(name, version)
    is_ready = _ready(request)
    return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)


@keyed.get("/models/stats")
@keyed.get("/models/{name}/stats")
@keyed.get("/models/{name}/versions/{version}/stats")
def model_stats(name: str = "", version: str = "", service: Service = Depends(get_service)) -> dict:
    return {"model_stats": service.model_statistics(name, version)}


@keyed.get("/models/{name}")
@keyed.get("/models/{name}/versions/{version}")
def get_model(name: str, version: str = "1", service: Service = Depends(get_service)) -> dict:
    return service.model_metadata(name, version)


@keyed.get("/models/{name}/config")
@keyed.get("/models/{name}/versions/{version}/config")
def model_config(name: str, version: str = "1", service: Service = Depends(get_service)) -> dict:
    return service.model_config(name, version)


@keyed.post("/repository/index")
def repository_index(service: Service = Depends(get_service)) -> list:
    return service.repository_index()


@keyed.post("/models/{name}/infer", openapi_extra=BINARY_BODY)
@keyed.post("/models/{name}/versions/{version}/infer", openapi_extra=BINARY_BODY)
async def infer(name: str, request: Request, version: str = "1", service: Service = Depends(get_service),
                deadline: float | None = Depends(get_deadline)) -> Response:
    """Evaluate a loss: JSON tensors, or the binary tensor data extension (the fast path for large batches)."""
    service.model_ready(name, version)
    header_len = request.headers.get(HEADER)
    if header_len is None and int(request.headers.get("content-length") or 0) > BIG_JSON_BYTES:
        req = await read_json(request, "oip")  # big JSON tensors: parsed in the worker process
        if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
            raise ServiceError("the request must be a JSON object with an 'inputs' list")
        resp, blobs = await service.infer(name, lambda: (req, memoryview(b"")), size=0, deadline=deadline,
                                          peer=_peer(request))
    else:
        body = await request.body()  # before any admission slot is taken: slow senders hold none
        resp, blobs = await service.infer(name, lambda: parse_http_body(body, header_len), size=len(body),
                                          deadline=deadline, peer=_peer(request))
    head = dumps(resp)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(b"".join([head, *blobs]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


# ------------------------------------------------------------------------- Triton's system shared memory
def _peer(request: Request) -> str | None:
    """The client's address; None on a unix socket."""
    return request.client.host if request.client else None


@keyed.get("/systemsharedmemory/status")
@keyed.post("/systemsharedmemory/status")
@keyed.get("/systemsharedmemory/region/{name}/status")
@keyed.post("/systemsharedmemory/region/{name}/status")
def shm_status(request: Request, name: str = "", service: Service = Depends(get_service)) -> list:
    return service.shm_status(_peer(request), name)


@keyed.post("/systemsharedmemory/region/{name}/register")
async def shm_register(name: str, request: Request, service: Service = Depends(get_service)) -> Response:
    """Map ``byte_size`` bytes at ``offset`` of the POSIX shared-memory object ``key`` as region ``name``
    (clients on the server's host only)."""
    body = loads_json(await request.body(), "the register request")
    if not isinstance(body, dict):
        raise ServiceError("the register request must be a JSON object {key, offset?, byte_size}", field="body")
    service.shm_register(_peer(request), name, body.get("key"), body.get("offset", 0), body.get("byte_size", 0))
    return Response(b"{}", media_type="application/json")


@keyed.post("/systemsharedmemory/unregister")
@keyed.post("/systemsharedmemory/region/{name}/unregister")
def shm_unregister(request: Request, name: str = "", service: Service = Depends(get_service)) -> Response:
    service.shm_unregister(_peer(request), name)
    return Response(b"{}", media_type="application/json")
