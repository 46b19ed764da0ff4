"""Fuzzing: schemathesis against the OpenAPI schema of a real server (no 5xx, answers that parse), hypothesis on
the engine (in tests/engine/test_properties.py), and malformed protobuf / lying binary sizes on both transports."""

import json

import grpc
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from lossd_client.wire import pb
from lossd_client.wire import pb_grpc

FUZZED = {"cases": 0}


@pytest.fixture(scope="module")
def api_schema(live_server):
    return schemathesis.openapi.from_url(f"{live_server.http_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, live_server):
    response = case.call(base_url=live_server.http_url, timeout=30)
    FUZZED["cases"] += 1
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    ctype = response.headers.get("content-type") or ""
    ctype = ctype[0] if isinstance(ctype, list) else ctype
    if ctype.startswith("application/json"):
        body = json.loads(response.content)
        if response.status_code >= 400 and not case.path.startswith("/v2"):
            assert {"code", "message"} <= set(body["error"])  # every /v1 error has the documented shape


def test_the_server_survived_the_fuzzing(live_server):
    assert httpx.get(f"{live_server.http_url}/v2/health/ready").status_code == 200
    print(f"schemathesis cases sent: {FUZZED['cases']}")


@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff\x0f", b"\x12\x05\x0a\x03\x01", b"\x0a" * 64,
                                     b"\x12\x80\x80\x80\x80\x10"])
def test_malformed_protobuf_is_refused_not_fatal(live_server, payload):
    ch = grpc.insecure_channel(live_server.grpc_target)
    raw = ch.unary_unary("/lossd.v1.LossService/Evaluate", request_serializer=lambda b: b,
                         response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        raw(payload, timeout=10)
    assert info.value.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT,
                                 grpc.StatusCode.INTERNAL, grpc.StatusCode.NOT_FOUND)
    # and the server answers the next good call
    stub = pb_grpc.LossServiceStub(ch)
    assert len(stub.ListLosses(pb.ListLossesRequest(), timeout=10).losses) > 30
    ch.close()
