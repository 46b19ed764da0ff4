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
