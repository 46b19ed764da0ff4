"""The error bodies the routes really answer, for the OpenAPI document."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetails(BaseModel):
    field: str | None = Field(None, description="the input that was wrong: pred, target, params.alpha, ...")
    rows: list[int] | None = Field(None, description="the first offending rows (at most 10)")
    n_rows: int | None = Field(None, description="how many rows were offending")


class ErrorInfo(BaseModel):
    code: str = Field(..., description="stable machine-readable code (README: error table)")
    message: str
    details: ErrorDetails


class V1Error(BaseModel):
    error: ErrorInfo


class OipError(BaseModel):
    error: str = Field(..., description="what was wrong; the code travels in the lossd-error-code header")


def _errors(model: type[BaseModel], statuses: dict[int, str]) -> dict:
    return {status: {"model": model, "description": text} for status, text in statuses.items()}


_STATUSES = {401: "a valid API key is required", 404: "unknown loss, metric or version", 408: "the body did not "
             "arrive in time", 413: "body or answer over a size limit", 429: "overloaded; see Retry-After",
             503: "draining or out of device memory; see Retry-After", 504: "deadline passed before the work started"}
V1_ERRORS = _errors(V1Error, {**_STATUSES, 400: "the body is not JSON, or a bad header",
                              422: "invalid input: the error names the field and the offending rows"})
# "4XX" also keeps FastAPI from documenting the 422 it would add by default: /v2 answers bad input with 400
OIP_ERRORS = _errors(OipError, {**_STATUSES, 400: "invalid input or framing: the message names the input and "
                                "rows; lossd-error-code/-field/-rows headers carry the details",
                                "4XX": "any other client error, in the same shape"})
