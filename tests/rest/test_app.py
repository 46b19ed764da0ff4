"""The app's start-up: once warm, the objects loaded at start-up are frozen out of Python's collections."""

import gc

import pytest
from fastapi.testclient import TestClient

from lossd.rest import create_app
from lossd.settings import Settings


@pytest.mark.parametrize("freeze", [True, False])
def test_start_up_freezes_long_lived_objects(engine, freeze):
    gc.unfreeze()
    try:
        with TestClient(create_app(engine=engine, settings=Settings(gc_freeze=freeze))) as c:
            assert c.get("/v2/health/ready").status_code == 200
            frozen = gc.get_freeze_count()
            if freeze:
                assert frozen > 10_000  # torch, numba, FastAPI: far more than this
                # a full collection no longer walks them
                assert len(gc.get_objects()) < frozen
            else:
                assert frozen == 0
    finally:
        gc.unfreeze()


def test_openapi_documents_the_error_bodies_really_answered(client):
    spec = client.get("/openapi.json").json()
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
    assert "422" not in infer and "400" in infer  # /v2 answers bad input with 400, as Triton does
    assert infer["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OipError")
    v1 = spec["paths"]["/v1/losses/{name}"]["post"]["responses"]
    assert v1["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/V1Error")
    error = spec["components"]["schemas"]["ErrorInfo"]["properties"]
    assert {"code", "message", "details"} <= set(error)
    # and the body the route really answers has that shape
    body = client.post("/v1/losses/ciou", json={"pred": [[1, 0, 0, 1]], "target": [[0, 0, 1, 1]]}).json()
    assert set(body["error"]) == {"code", "message", "details"} and body["error"]["details"]["rows"] == [0]
