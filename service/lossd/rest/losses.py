"""/v1/losses: the catalog, and one loss over a batch with per-sample values and gradients."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ..engine import Engine, get_loss
from ..batching import Batcher
from .deps import admitted, get_batcher, get_deadline, get_engine, get_obs
from .jsonio import json_response
from .observability import Observability

router = APIRouter(prefix="/v1/losses", tags=["losses"])


class LossRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"pred": [[0, 0, 10, 10], [5, 5, 15, 20]], "target": [[1, 1, 11, 11], [5, 5, 15, 15]], "box_format": "xyxy",
         "reduction": "none", "return_grad": True}]})

    pred: Any = Field(..., description="[N,4] boxes for box losses; logits/probabilities/scores for the others "
                                       "(see GET /v1/losses/{name})")
    target: Any = Field(..., description="same rows as pred: boxes, class indices, or targets")
    box_format: Literal["xyxy", "xywh", "cxcywh"] | str = "xyxy"
    reduction: Literal["none", "mean", "sum"] | str = "none"
    weights: list[float] | None = Field(None, description="[N] per-sample weights")
    params: dict[str, Any] | None = Field(None, description="the loss's parameters; omitted ones take the defaults")
    return_grad: bool = True
    dtype: Literal["float32", "float64"] = "float32"


class LossResponse(BaseModel):
    loss: list[float] | float
    grad: list[Any] | None = Field(None, description="d loss / d pred, pred's shape, in the request's box_format")


class ParamInfo(BaseModel):
    # extra keys the catalog adds only where they apply pass through, e.g. exclusive {"min": bool, "max": bool}
    # when a bound is itself refused (as /v1/metrics shows it)
    model_config = ConfigDict(extra="allow")

    default: Any
    min: float | None
    max: float | None
    doc: str
    type: str
    choices: list[str] | None = None


class LossInfo(BaseModel):
    name: str
    kind: str
    summary: str
    doc: str
    reference: str
    pred: str
    target: str
    params: dict[str, ParamInfo]
    weighted_mean: bool = Field(False, description="'mean' divides by summed per-sample weights (class weights, "
                                "ignored rows), not by N")


class Catalog(BaseModel):
    losses: list[LossInfo]


@router.get("", response_model=Catalog)
def list_losses(engine: Engine = Depends(get_engine)) -> dict:
    return {"losses": engine.losses()}


@router.get("/{name}", response_model=LossInfo)
def describe_loss(name: str) -> dict:
    return get_loss(name).describe()


@router.post("/{name}", response_model=LossResponse, dependencies=[Depends(admitted)], responses={
    404: {"description": "unknown loss"}, 429: {"description": "overloaded; see Retry-After"},
    503: {"description": "draining or out of device memory"}, 504: {"description": "deadline passed before the work started"}, 413: {"description": "body over the size limit"},
    422: {"description": "invalid input: the error names the field and the offending rows"}})
async def evaluate(name: str, req: LossRequest, batcher: Batcher = Depends(get_batcher),
                   deadline: float | None = Depends(get_deadline), obs: Observability = Depends(get_obs)) -> Response:
    """Evaluate one loss over a batch: per-sample loss (or the reduced value) and its gradient w.r.t. pred.
    Optional header `lossd-timeout: <seconds>`: work not started by then is dropped (504)."""
    with obs.track("v1_loss", name) as t:
        out = await batcher.evaluate(name, req.pred, req.target, box_format=req.box_format, reduction=req.reduction,
                                     weights=req.weights, params=req.params, return_grad=req.return_grad,
                                     dtype=req.dtype, deadline=deadline)
        t.batch_size = int(np.shape(req.pred)[0]) if out.grad is None else int(out.grad.shape[0])
        loss = out.loss.numpy()
        return json_response({"loss": loss if loss.ndim else float(loss),
                              "grad": None if out.grad is None else out.grad.numpy()})
