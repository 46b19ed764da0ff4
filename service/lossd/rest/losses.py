"""/v1/losses: the catalog, and one loss over a batch with per-sample values and gradients."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from ..service import Service
from .body import body_schema, read_model
from .deps import get_deadline, get_service
from .jsonio import json_response_yielding
from .openapi import V1_ERRORS

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
    # checked by the engine, as pred is: a string or null names its rows ("1.5" is not read as 1.5)
    weights: Any = Field(None, description="[N] per-sample weights",
                         json_schema_extra={"type": "array", "items": {"type": "number"}})
    params: dict[str, Any] | None = Field(None, description="the loss's parameters; omitted ones take the defaults")
    return_grad: StrictBool = True
    dtype: Literal["float32", "float64"] | str = "float32"  # anything else: unknown_dtype, from the service


class LossResponse(BaseModel):
    loss: list[float] | float
    grad: list[Any] | None = Field(None, description="d loss / d pred, pred's shape, in the request's box_format")


class ParamInfo(BaseModel):
    default: Any
    min: float | None
    max: float | None
    doc: str
    type: str
    choices: list[str] | None = None
    exclusive: dict[str, bool] | None = Field(None, description="whether min / max themselves are excluded")


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
def list_losses(service: Service = Depends(get_service)) -> dict:
    return {"losses": service.catalog()["losses"]}


@router.get("/{name}", response_model=LossInfo, responses=V1_ERRORS)
def describe_loss(name: str, service: Service = Depends(get_service)) -> dict:
    return service.describe_loss(name)


@router.post("/{name}", response_model=LossResponse, openapi_extra=body_schema(LossRequest), responses=V1_ERRORS)
async def evaluate(name: str, request: Request, service: Service = Depends(get_service),
                   deadline: float | None = Depends(get_deadline)) -> Response:
    """Evaluate one loss over a batch: per-sample loss (or the reduced value) and its gradient w.r.t. pred.
    Optional header `lossd-timeout: <seconds>`: work not started by then is dropped (504)."""
    service.known("loss", name)  # an unknown name is 404 whatever the body holds
    req = await read_model(request, LossRequest)
    out = await service.evaluate(name, req.pred, req.target, box_format=req.box_format, reduction=req.reduction,
                                 weights=req.weights, params=req.params, return_grad=req.return_grad,
                                 dtype=req.dtype, deadline=deadline)
    loss = out.loss.numpy()
    return await json_response_yielding({"loss": loss if loss.ndim else float(loss),
                                         "grad": None if out.grad is None else out.grad.numpy()})
