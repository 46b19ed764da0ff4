import json
import numpy as np
import pytest
from fastapi.testclient import TestClient

from lossd.rest import create_app
from lossd.settings import Settings


@pytest.fixture
def make_client(engine):
    clients = []

    def make(**settings) -> TestClient:
        c = TestClient(create_app(engine=engine, settings=Settings(**settings)))
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def binary_request(inputs: dict, parameters: dict | None = None, outputs: list | None = None) -> tuple[bytes, dict]:
    """An OIP binary-extension body: JSON header, then each array's raw little-endian bytes."""
    dts = {np.dtype("<f4"): "FP32", np.dtype("<f8"): "FP64", np.dtype("<i8"): "INT64", np.dtype("<i4"): "INT32"}
    header = {"inputs": [], "parameters": parameters or {}}
    blobs = []
    for name, arr in inputs.items():
        arr = np.ascontiguousarray(arr)
        blob = arr.tobytes()
        header["inputs"].append({"name": name, "shape": list(arr.shape), "datatype": dts[arr.dtype],
                                 "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    if outputs is not None:
        header["outputs"] = outputs
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head)),
                                    "Content-Type": "application/octet-stream"}


def parse_binary_response(resp) -> dict:
    n = int(resp.headers["Inference-Header-Content-Length"])
    head = json.loads(resp.content[:n])
    out, offset = {}, n
    for o in head["outputs"]:
        dt = {"FP32": "<f4", "FP64": "<f8"}[o["datatype"]]
        if "parameters" in o and "binary_data_size" in o["parameters"]:
            size = o["parameters"]["binary_data_size"]
            out[o["name"]] = np.frombuffer(resp.content[offset:offset + size], dtype=dt).reshape(o["shape"])
            offset += size
        else:
            out[o["name"]] = np.asarray(o["data"], dtype=dt).reshape(o["shape"])
    assert offset == len(resp.content)
    return out
