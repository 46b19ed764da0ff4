"""Request bodies: read under the body deadline (rest/limits.py), parsed with bounds; big ones in a worker process
(lossd.bodyparse), so the event loop keeps answering. FastAPI's own body parsing is not used: it parses on the
event loop and lets a RecursionError through."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..bodyparse import BIG_JSON_BYTES, V1_ARRAYS, BodyError, NotNumbers, ParserLost, refuse_bools
from ..errors import ServiceError, quote
from ..oip import loads_json, not_numbers

M = TypeVar("M", bound=BaseModel)


def validate(data: object, model: type[M]) -> M:
    """The model from parsed JSON; arrays already converted (big bodies) are kept as they are."""
    arrays = {}
    if isinstance(data, dict):
        arrays = {k: data[k] for k in V1_ARRAYS if k in data and isinstance(data[k], np.ndarray)}
        data = {**data, **{k: [] for k in arrays}}
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        # the field's own path: pydantic adds the union member it tried ("literal['none','mean']", "str")
        loc = [part for part in first.get("loc", ()) if not (isinstance(part, str) and (
            "[" in part or part in ("str", "int", "float", "bool", "list", "dict")))]
        field = ".".join(str(p) for p in loc) or "body"
        raise ServiceError(f"{quote(field, 100).strip(chr(39))}: {first.get('msg')}", "invalid_request",
                           field=field) from None
    return parsed.model_copy(update=arrays) if arrays else parsed


async def read_json(request: Request, kind: str) -> object:
    """The parsed body: small ones here, big ones in the worker process with their arrays as numpy."""
    body = await request.body()
    try:
        if len(body) <= BIG_JSON_BYTES:
            out = loads_json(body, "the body")
            refuse_bools(body, out, kind)
            return out
        return await request.app.state.json_parser.parse(body, kind)
    except NotNumbers as exc:
        raise not_numbers(exc) from None
    except BodyError as exc:
        raise ServiceError(str(exc), "invalid_json", field="body") from None
    except ParserLost as exc:
        raise ServiceError(str(exc), "too_large", field="body") from None


async def read_model(request: Request, model: type[M]) -> M:
    return validate(await read_json(request, "v1"), model)


def body_schema(model: type[BaseModel]) -> dict:
    """openapi_extra documenting a JSON body the route parses itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}
