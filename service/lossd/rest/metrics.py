"""/v1/metrics: IoU-family values, elementwise [N] or pairwise [N, M]."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from ..service import Service
from .body import body_schema, read_model
from .deps import get_service
from .jsonio import SLICE_VALUES, SlicedJsonResponse, json_response_yielding, sliced_json_bytes
from .openapi import V1_ERRORS

router = APIRouter(prefix="/v1/metrics", tags=["metrics"])


class MetricRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"boxes1": [[0, 0, 10, 10]], "boxes2": [[1, 1, 11, 11], [20, 20, 30, 30]], "pairwise": True}]})

    boxes1: Any = Field(..., description="[N,4] boxes")
    boxes2: Any = Field(..., description="[N,4] boxes (elementwise) or [M,4] (pairwise)")
    box_format: Literal["xyxy", "xywh", "cxcywh"] | str = "xyxy"
    pairwise: StrictBool = False
    params: dict[str, Any] | None = None
    dtype: Literal["float32", "float64"] | str = "float32"  # anything else: unknown_dtype, from the service


class MetricResponse(BaseModel):
    values: list[Any]


@router.get("")
def list_metrics(service: Service = Depends(get_service)) -> dict:
    return {"metrics": service.catalog()["metrics"]}


@router.post("/{name}", response_model=MetricResponse, openapi_extra=body_schema(MetricRequest),
             responses=V1_ERRORS)
async def metric(name: str, request: Request, service: Service = Depends(get_service)) -> Response:
    """IoU, GIoU, DIoU, CIoU, EIoU, SIoU or NWD of boxes1 vs boxes2."""
    service.known("metric", name)  # an unknown name is 404 whatever the body holds
    req = await read_model(request, MetricRequest)
    return await service.metric(name, req.boxes1, req.boxes2, box_format=req.box_format, pairwise=req.pairwise,
                                params=req.params, dtype=req.dtype, answer=_answer(service.settings.send_stall_seconds),
                                answer_bytes=sliced_json_bytes)


def _answer(stall_seconds: float):
    async def answer(values, release) -> Response:
        """Big answers are sent slice by slice as the client reads them, holding their budget until sent."""
        if values.size <= SLICE_VALUES:
            try:
                return await json_response_yielding({"values": values})
            finally:
                release()
        return SlicedJsonResponse({"values": values}, on_done=release, stall_seconds=stall_seconds)
    return answer
