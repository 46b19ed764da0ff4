"""Hostile clients against a real `lossd serve` on loopback, both transports. Each test asserts: no 5xx / UNKNOWN /
INTERNAL, bounded memory, and legitimate calls still served. Counts are small here; bench/hostile.py runs the
same attacks at scale (figures in docs/reliability.md)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossd_client.wire import oip_grpc, oip_pb, pb, pb_grpc, to_param, to_tensor

from ..conftest import start_server
from . import attacks

ENV = {"LOSSD_BODY_TIMEOUT_SECONDS": "2", "LOSSD_HEADER_TIMEOUT_SECONDS": "2", "LOSSD_MAX_IN_FLIGHT": "32",
       "LOSSD_GRPC_MAX_MESSAGE_BYTES": str(2 * 2**20)}
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def server():
    srv = start_server(ENV)
    yield srv
    srv.proc.terminate()
    try:
        srv.proc.wait(timeout=30)
    except Exception:
        srv.proc.kill()
    log = srv.log()
    # a traceback in the log means some input reached code that did not expect it
    assert "Traceback" not in log, log[-5000:]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.grpc_target, options=[("grpc.max_receive_message_length", 64 * 2**20),
                                                             ("grpc.max_send_message_length", 64 * 2**20)])
    yield ch
    ch.close()


def assert_client_error(resp: httpx.Response, case) -> None:
    assert resp.status_code < 500, (case.what, resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        body = resp.json()
        if case.path.startswith("/v2"):
            assert isinstance(body["error"], str) and len(body["error"]) <= 1000, (case.what, body)
        else:
            assert body["error"]["code"] and len(body["error"]["message"]) <= 1000, (case.what, body)
        assert resp.headers["lossd-error-code"], case.what
        assert len(resp.text) < 5000, (case.what, len(resp.text))  # client text is never echoed whole


@pytest.mark.parametrize("case", attacks.known_bad_http(), ids=lambda c: c.what)
def test_known_bad_http_inputs_are_4xx(http, case):
    resp = attacks.send_http(http, case)
    assert_client_error(resp, case)
    assert 400 <= resp.status_code < 500, (case.what, resp.status_code, resp.text[:300])


def test_known_bad_inputs_name_the_field(http):
    resp = http.post("/v1/losses/cross_entropy", content=b'{"pred": [[0.1, 0.9]], "target": [1], '
                     b'"params": {"ignore_index": NaN}}', headers={"content-type": "application/json"})
    assert resp.status_code == 422 and resp.json()["error"]["details"]["field"] == "params.ignore_index"
    body = attacks.oip_json()
    body["inputs"].append({"name": "WEIGHTS", "shape": [2], "datatype": "INT8", "data": [1000, 1]})
    resp = http.post("/v2/models/ciou/infer", json=body)
    assert resp.status_code == 400 and "WEIGHTS" in resp.json()["error"] and "[-128, 127]" in resp.json()["error"]
    resp = http.post("/v1/losses/ciou", json=attacks.v1_loss(box_format="q" * 100_000))
    err = resp.json()["error"]
    assert resp.status_code == 422 and err["code"] == "unknown_format" and len(err["message"]) < 300


@given(rng=st.randoms(use_true_random=False))
@FUZZ
def test_fuzzed_http_requests_never_5xx(http, rng):
    case = attacks.fuzz_http_case(rng)
    assert_client_error(attacks.send_http(http, case), case)


def test_raw_http_framing_fuzz(server):
    host, port = "127.0.0.1", int(server.http_url.rsplit(":", 1)[1])
    rng = random.Random(7)
    for _ in range(150):
        answer = attacks.raw_http(host, port, attacks.fuzz_raw_request(rng))
        if answer:
            status = int(answer.split(b" ", 2)[1])
            assert status < 500, answer[:300]
    assert httpx.get(f"{server.http_url}/v2/health/ready", timeout=30).status_code == 200


@given(rng=st.randoms(use_true_random=False))
@FUZZ
def test_fuzzed_grpc_messages_never_unknown(channel, rng):
    method, data = attacks.fuzz_grpc_payload(rng, VALID)
    code = attacks.grpc_raw_call(channel, method, data)
    assert code not in attacks.SERVER_FAULTS, (method, code, data[:100])


VALID = attacks.valid_grpc_messages()


def test_grpc_errors_are_short_and_typed(channel):
    stub = pb_grpc.LossServiceStub(channel)
    pred = to_tensor(np.asarray(attacks.PRED, "<f4"))
    with pytest.raises(grpc.RpcError) as info:
        stub.Evaluate(pb.EvaluateRequest(loss="ciou", pred=pred, target=pred, box_format="b" * 100_000), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(info.value.details()) < 300
    with pytest.raises(grpc.RpcError) as info:
        stub.Evaluate(pb.EvaluateRequest(loss="n" * 100_000, pred=pred, target=pred), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and len(info.value.details()) < 300
    # a pairwise answer that fits LOSSD_MAX_PAIRWISE_BYTES but not the 2 MiB message cap: refused before compute
    boxes = to_tensor(np.tile(np.asarray(attacks.PRED[:1], "<f4"), (1000, 1)))
    with pytest.raises(grpc.RpcError) as info:
        stub.Metric(pb.MetricRequest(metric="iou", boxes1=boxes, boxes2=boxes, pairwise=True), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "split boxes1" in info.value.details()
    assert dict(info.value.trailing_metadata())["lossd-error-code"] == "too_large"
    small = to_tensor(np.tile(np.asarray(attacks.PRED[:1], "<f4"), (500, 1)))
    out = stub.Metric(pb.MetricRequest(metric="iou", boxes1=small, boxes2=small, pairwise=True), timeout=30)
    assert list(out.values.shape) == [500, 500]


def test_bad_stream_item_is_answered_in_place(channel):
    stub = pb_grpc.LossServiceStub(channel)
    logits = to_tensor(np.asarray([[0.1, 0.9], [2.0, -1.0]], "<f4"))
    labels = to_tensor(np.asarray([1, 0], "<i8"))

    def item(**params):
        return pb.EvaluateStreamRequest(request=pb.EvaluateRequest(
            loss="cross_entropy", pred=logits, target=labels, params={k: to_param(v) for k, v in params.items()}))

    answers = list(stub.EvaluateStream(iter([item(), item(ignore_index=float("nan")), item(), item(eps=1)]),
                                       timeout=30))
    assert [("error" if a.HasField("error") else "response") for a in answers] == ["response", "error", "response", "error"]
    assert answers[1].error.code == "invalid_param" and answers[1].error.field == "params.ignore_index"
    assert answers[3].error.code == "unknown_param"
    raw = channel.stream_stream("/lossd.v1.LossService/EvaluateStream", request_serializer=lambda b: b,
                                response_deserializer=pb.EvaluateStreamResponse.FromString)
    answers = list(raw(iter([item().SerializeToString(), b"\x0a\xff\xff\xff", item().SerializeToString()]),
                       timeout=30))
    assert [("error" if a.HasField("error") else "response") for a in answers] == ["response", "error", "response"]


def test_slow_senders_do_not_lock_out_others(server):
    """More slow senders than admission slots (32): legitimate calls on both transports are all served, and the
    slow ones are dropped with 408 once the body deadline (2 s) passes."""
    host, port = "127.0.0.1", int(server.http_url.rsplit(":", 1)[1])
    outcome: dict = {}
    rest, grpc_result = attacks.Legit(), attacks.Legit()

    async def run():
        stop = asyncio.Event()
        senders = [asyncio.create_task(attacks.slow_sender(host, port, stop, 0.5, outcome)) for _ in range(300)]
        await asyncio.sleep(0.5)
        await asyncio.gather(attacks.legit_rest(server.http_url, 40, rest),
                             attacks.legit_grpc(server.grpc_target, 40, grpc_result))
        await asyncio.wait_for(asyncio.gather(*senders), timeout=30)
        stop.set()

    asyncio.run(run())
    assert rest.ok == 40 and grpc_result.ok == 40, (rest.errors, grpc_result.errors)
    assert outcome.get("408", 0) >= 290, outcome  # the server dropped them (a few may see a reset instead)


def test_header_bomb_is_cut_off(server):
    host, port = "127.0.0.1", int(server.http_url.rsplit(":", 1)[1])
    before = attacks.rss_mib(server.proc.pid)
    for _ in range(5):
        sent, answer = asyncio.run(attacks.header_bomb(host, port, 200 * 2**20))
        assert sent < 4 * 2**20, sent  # refused after ~64 KiB (LOSSD_MAX_HEADER_BYTES), not after 200 MiB
        assert answer.startswith(b"HTTP/1.1 431") or answer == b"", answer[:100]
    assert attacks.rss_mib(server.proc.pid) - before < 50
    assert httpx.get(f"{server.http_url}/v2/health/live", timeout=30).status_code == 200


def test_name_and_param_floods_leave_no_state(server, http):
    rng = random.Random(3)
    metrics_before = len(http.get("/metrics").content)
    for _ in range(200):  # warm: allocator pools settle before the baseline
        name, body = attacks.random_name_request(rng)
        http.post(f"/v1/losses/{name}", json=body)
    rss_before = attacks.rss_mib(server.proc.pid)
    stub = pb_grpc.LossServiceStub(grpc.insecure_channel(server.grpc_target))
    pred = to_tensor(np.asarray(attacks.PRED, "<f4"))
    for i in range(800):
        name, body = attacks.random_name_request(rng)
        assert http.post(f"/v1/losses/{name}", json=body).status_code < 500
        if i % 4 == 0:
            try:
                stub.Evaluate(pb.EvaluateRequest(loss=name, pred=pred, target=pred, box_format=body["box_format"],
                                                 params={k: to_param(v) for k, v in body["params"].items()}),
                              timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() not in attacks.SERVER_FAULTS
    text = http.get("/metrics").text
    names = {line.split('name="', 1)[1].split('"', 1)[0] for line in text.splitlines()
             if line.startswith("lossd_requests_total{")}
    assert "unknown" in names and all(len(n) <= 20 for n in names), names
    assert len(text) - metrics_before < 20_000
    assert attacks.rss_mib(server.proc.pid) - rss_before < 50


def test_big_json_is_parsed_off_the_event_loop(server):
    """Health answers while 20 MiB /v1 bodies are parsed (the latency itself is a benchmark figure)."""
    rows = 250_000
    body = json.dumps({"pred": [[0.0, 0.0, 10.0, 10.0]] * rows, "target": [[1.0, 1.0, 11.0, 11.0]] * rows,
                       "return_grad": False}).encode()
    statuses: list[int] = []

    def post_bodies():
        with httpx.Client(base_url=server.http_url, timeout=120) as client:
            for _ in range(2):
                statuses.append(client.post("/v1/losses/ciou", content=body,
                                            headers={"content-type": "application/json"}).status_code)

    worker = threading.Thread(target=post_bodies)
    worker.start()
    probes, worst = 0, 0.0
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        while worker.is_alive():
            t0 = time.perf_counter()
            assert client.get("/v2/health/live").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            probes += 1
            time.sleep(0.01)
    worker.join()
    assert statuses == [200, 200] and probes > 5
    print(f"liveness probes: {probes}, worst {worst * 1000:.0f} ms while 20 MiB /v1 bodies were parsed")


def test_open_endpoints_are_the_same_on_both_transports():
    srv = start_server({"LOSSD_API_KEYS": '["k1"]'})
    try:
        ch = grpc.insecure_channel(srv.grpc_target)
        oip = oip_grpc.GRPCInferenceServiceStub(ch)

        def grpc_open(call, request) -> bool:
            try:
                call(request, timeout=30)
                return True
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
                return False

        def rest_open(method: str, path: str) -> bool:
            status = httpx.request(method, srv.http_url + path, timeout=30, json={}).status_code
            assert status < 500
            return status != 401

        pairs = [
            (rest_open("GET", "/v2/health/live"), grpc_open(oip.ServerLive, oip_pb.ServerLiveRequest())),
            (rest_open("GET", "/v2/health/ready"), grpc_open(oip.ServerReady, oip_pb.ServerReadyRequest())),
            (rest_open("GET", "/v2/models/ciou/ready"),
             grpc_open(oip.ModelReady, oip_pb.ModelReadyRequest(name="ciou"))),
            (rest_open("GET", "/v2"), grpc_open(oip.ServerMetadata, oip_pb.ServerMetadataRequest())),
            (rest_open("GET", "/v2/models/ciou"), grpc_open(oip.ModelMetadata, oip_pb.ModelMetadataRequest(name="ciou"))),
            (rest_open("POST", "/v2/models/ciou/infer"),
             grpc_open(oip.ModelInfer, oip_pb.ModelInferRequest(model_name="ciou"))),
            (rest_open("GET", "/v1/losses"),
             grpc_open(pb_grpc.LossServiceStub(ch).ListLosses, pb.ListLossesRequest())),
        ]
        assert [r for r, _ in pairs] == [g for _, g in pairs] == [True, True, True, True, False, False, False]
        # a non-ASCII key is a wrong key, not a server error
        resp = httpx.get(srv.http_url + "/v1/losses", headers={"x-api-key": "k\u00e9y".encode()}, timeout=30)
        assert resp.status_code == 401
        with pytest.raises(grpc.RpcError) as info:  # (gRPC clients refuse to send non-ASCII metadata at all)
            oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="ciou"), metadata=(("x-api-key", "k2"),), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="ciou"), metadata=(("x-api-key", "k1"),),
                                 timeout=30).name == "ciou"
        ch.close()
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=30)


def test_idle_connections_beyond_the_cap_cannot_lock_others_out():
    """More half-sent request heads than LOSSD_MAX_CONNECTIONS: the oldest idle ones are closed, readiness and
    calls are still served (they were 503 for everyone once the cap was full)."""
    import socket

    srv = start_server({"LOSSD_MAX_CONNECTIONS": "100"})
    try:
        port = int(srv.http_url.rsplit(":", 1)[1])
        socks = []
        for _ in range(250):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\nx-slow: ")
            socks.append(s)
        with httpx.Client(base_url=srv.http_url, timeout=30) as client:
            for _ in range(10):
                assert client.get("/v2/health/ready").status_code == 200
                assert client.post("/v1/metrics/iou", json={"boxes1": attacks.PRED, "boxes2": attacks.TARGET}
                                   ).status_code == 200
        closed = 0
        for s in socks:
            s.settimeout(5)
            try:
                closed += s.recv(10) == b""
            except OSError:
                closed += 1
            s.close()
        assert closed >= 150, closed  # the server closed the surplus, oldest first
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=30)


def test_standard_grpc_services_refuse_garbage_with_invalid_argument(channel):
    for method in ("/grpc.health.v1.Health/Check", "/lossd.v1.LossService/Metric"):
        assert attacks.grpc_raw_call(channel, method, b"\xff\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT
    refl = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                 request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        list(refl(iter([b"\xff\xff\xff"]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_second_server_cannot_share_the_grpc_port(server):
    import os
    import subprocess
    import sys

    grpc_port = server.grpc_target.rsplit(":", 1)[1]
    second = subprocess.run([sys.executable, "-m", "lossd.cli", "serve", "--http-port", "0", "--grpc-port",
                             grpc_port], env=dict(os.environ, LOSSD_DEVICE="cpu"), capture_output=True, text=True,
                            timeout=240)
    assert second.returncode != 0 and "lossd ready" not in second.stdout + second.stderr


def test_a_taken_rest_port_never_logs_ready(server):
    import os
    import subprocess
    import sys

    http_port = server.http_url.rsplit(":", 1)[1]
    second = subprocess.run([sys.executable, "-m", "lossd.cli", "serve", "--http-port", http_port, "--grpc-port",
                             "0"], env=dict(os.environ, LOSSD_DEVICE="cpu"), capture_output=True, text=True,
                            timeout=240)
    assert second.returncode != 0 and "lossd ready" not in second.stdout + second.stderr


def test_an_answer_the_client_refuses_leaves_no_traceback(server):
    """A 2 MB pairwise answer to a client whose receive limit is 1 MiB: the client sees RESOURCE_EXHAUSTED, the
    server logs no traceback (checked again at teardown for the whole module)."""
    with grpc.insecure_channel(server.grpc_target, options=[("grpc.max_receive_message_length", 2**20)]) as ch:
        boxes = to_tensor(np.tile(np.asarray(attacks.PRED[:1], "<f4"), (700, 1)))
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.LossServiceStub(ch).Metric(pb.MetricRequest(metric="iou", boxes1=boxes, boxes2=boxes,
                                                                pairwise=True), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Traceback" not in server.log()


def test_bytes_that_are_not_http_get_the_json_error_shape(server):
    host, port = "127.0.0.1", int(server.http_url.rsplit(":", 1)[1])
    answer = attacks.raw_http(host, port, b"\x16\x03\x01 not http\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"lossd-error-code: invalid_http" in head
    assert b'"code":"invalid_http"' in body


def test_pipelined_requests_and_a_client_that_hangs_up_log_nothing(server):
    """50 pipelined requests, 2 KB read, then close, twenty times: uvicorn marked only the newest request as
    disconnected, so the one being answered was written to a closed transport and logged as an internal error
    with a traceback, per request (a cheap way to flood the log)."""
    import socket

    host, port = "127.0.0.1", int(server.http_url.rsplit(":", 1)[1])
    before = server.log().count("internal error")
    for _ in range(20):
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n" * 50)
            s.recv(2000)
    assert httpx.get(f"{server.http_url}/v2/health/live", timeout=10).status_code == 200
    time.sleep(0.5)
    log = server.log()
    assert log.count("internal error") == before and "Traceback" not in log, log[-3000:]
