"""/v1/metrics: IoU-family values, elementwise [N] or pairwise [N, M]."""

from __future__ import annotations

import functools
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ..engine import Engine
from ..admission import ResourceExhausted, is_out_of_memory
from ..batching import metric_runs_inline, rows_of
from .deps import admitted, get_engine, get_obs
from .jsonio import json_response
from .observability import Observability

router = APIRouter(prefix="/v1/metrics", tags=["metrics"])


class MetricRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"boxes1": [[0, 0, 10, 10]], "boxes2": [[1, 1, 11, 11], [20, 20, 30, 30]], "pairwise": True}]})

    boxes1: Any = Field(..., description="[N,4] boxes")
    boxes2: Any = Field(..., description="[N,4] boxes (elementwise) or [M,4] (pairwise)")
    box_format: Literal["xyxy", "xywh", "cxcywh"] | str = "xyxy"
    pairwise: bool = False
    params: dict[str, Any] | None = None
    dtype: Literal["float32", "float64"] = "float32"


class MetricResponse(BaseModel):
    values: list[Any]


@router.get("")
def list_metrics(engine: Engine = Depends(get_engine)) -> dict:
    return {"metrics": engine.metrics()}


@router.post("/{name}", response_model=MetricResponse, dependencies=[Depends(admitted)])
async def metric(name: str, req: MetricRequest, engine: Engine = Depends(get_engine),
                 obs: Observability = Depends(get_obs)) -> Response:
    """IoU, GIoU, DIoU, CIoU, EIoU, SIoU or NWD of boxes1 vs boxes2."""
    with obs.track("v1_metric", name) as t:
        call = functools.partial(engine.metric, name, req.boxes1, req.boxes2, box_format=req.box_format,
                                 pairwise=req.pairwise, params=req.params, dtype=req.dtype)
        try:
            # an annotation tool's few boxes: on the event loop (microseconds); anything larger: in a thread
            if metric_runs_inline(engine, name, rows_of(req.boxes1), rows_of(req.boxes2), req.pairwise):
                values = call()
            else:
                values = await anyio.to_thread.run_sync(call)
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise ResourceExhausted(f"the {engine.device} device ran out of memory; ask for fewer pairs") \
                    from None
            raise
        t.batch_size = int(values.numel())
        return json_response({"values": values.numpy()})
