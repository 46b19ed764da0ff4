"""Request bodies: read under the body deadline (rest/limits.py), parsed with bounds, big ones off the event
loop. FastAPI's own body parsing is not used: it parses on the event loop and lets a RecursionError through."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..errors import ServiceError, quote
from ..oip import loads_json
from ..service import Service

M = TypeVar("M", bound=BaseModel)


def parse_model(body: bytes, model: type[M]) -> M:
    data = loads_json(body, "the body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ServiceError(f"{quote(field, 100).strip(chr(39))}: {first.get('msg')}", "invalid_request",
                           field=field) from None


async def read_model(request: Request, model: type[M]) -> M:
    body = await request.body()
    service: Service = request.app.state.service
    return await service.parse(parse_model, body, model, size=len(body))


def body_schema(model: type[BaseModel]) -> dict:
    """openapi_extra documenting a JSON body the route parses itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}
