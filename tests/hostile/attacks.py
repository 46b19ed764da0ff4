"""Hostile clients, as functions: the tests in this folder run them bounded and small, bench/hostile.py runs them at
scale beside legitimate traffic. Everything targets a real `lossd serve` on loopback."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import numpy as np

from lossd_client.wire import oip_pb, pb, to_param, to_tensor

PRED = [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 20.0]]
TARGET = [[1.0, 1.0, 11.0, 11.0], [5.0, 5.0, 15.0, 15.0]]
SERVER_FAULTS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# ------------------------------------------------------------------------------------------- REST requests
@dataclass
class HttpCase:
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    what: str = ""


def v1_loss(name: str = "ciou", **extra: Any) -> dict:
    return {"pred": PRED, "target": TARGET, **extra}


def oip_json(**params: Any) -> dict:
    return {"inputs": [{"name": "PRED", "shape": [2, 4], "datatype": "FP32", "data": PRED},
                       {"name": "TARGET", "shape": [2, 4], "datatype": "FP32", "data": TARGET}],
            "parameters": params}


def _json(case_body: Any) -> bytes:
    return json.dumps(case_body, allow_nan=True).encode()


def known_bad_http() -> list[HttpCase]:
    """The inputs that once gave 500s, one per class (the fuzzers look for the rest)."""
    deep = b"[" * 100_000 + b"]" * 100_000
    out = [
        HttpCase("POST", "/v1/losses/cross_entropy", _json({"pred": [[0.1, 0.9]], "target": [1],
                                                            "params": {"ignore_index": math.nan}}), {}, "NaN int"),
        HttpCase("POST", "/v1/losses/cross_entropy", b'{"pred": [[0.1, 0.9]], "target": [1], "params": '
                 b'{"ignore_index": Infinity}}', {}, "Infinity int"),
        HttpCase("POST", "/v1/losses/ciou", deep, {}, "deep brackets /v1"),
        HttpCase("POST", "/v2/models/ciou/infer", deep, {}, "deep brackets /v2"),
        HttpCase("POST", "/v1/losses/ciou", _json(v1_loss(box_format={"a": 1})), {}, "dict box_format /v1"),
        HttpCase("POST", "/v1/losses/ciou", _json(v1_loss(box_format="x" * 100_000)), {}, "100 KB box_format"),
        HttpCase("POST", "/v1/losses/" + "n" * 2000, _json(v1_loss()), {}, "2 KB loss name"),
        HttpCase("POST", "/v1/losses/ciou", _json(v1_loss(params={"eps": "x" * 100_000})), {}, "100 KB param"),
        HttpCase("POST", "/v1/losses/ciou", _json(v1_loss(params={"\u00e9" * 50_000: 1})), {}, "huge param name"),
        HttpCase("POST", "/v1/losses/ciou", _json(v1_loss(params=[1, 2])), {}, "params not an object"),
        HttpCase("POST", "/v1/losses/ciou", _json(v1_loss(weights=[1e400, 1])), {}, "weight overflow"),
        HttpCase("POST", "/v1/losses/ciou", b"\xff\xfe\x00garbage", {}, "not UTF-8"),
        HttpCase("POST", "/v1/metrics/iou", _json({"boxes1": PRED, "boxes2": TARGET, "pairwise": True,
                                                    "params": {"eps": -1}}), {}, "metric param out of range"),
        HttpCase("POST", "/v1/metrics/iou", _json({"boxes1": [[0, 0, 1, 1]] * 5000, "boxes2": [[0, 0, 1, 1]] * 5000,
                                                    "pairwise": True, "dtype": "float64"}), {}, "pairwise budget"),
        HttpCase("POST", "/v1/losses/ciou", _json(v1_loss()), {"lossd-timeout": "nan"}, "NaN timeout header"),
        HttpCase("POST", "/v1/losses/ciou", _json(v1_loss()), {"lossd-timeout": "1e999"}, "inf timeout header"),
    ]
    for dt, value in (("INT8", 1000), ("INT32", 2**40), ("UINT64", -1), ("INT64", 2**70), ("BOOL", 3),
                      ("FP32", "1.0"), ("FP32", None)):
        body = oip_json()
        body["inputs"].append({"name": "WEIGHTS", "shape": [2], "datatype": dt, "data": [value, value]})
        out.append(HttpCase("POST", "/v2/models/ciou/infer", _json(body), {}, f"{dt} {value!r} data"))
    for shape in ([1] * 65, [2**63, 0], [2**64], [-1, 4], [True, 4], ["2", 4], [2.0, 4]):
        body = oip_json()
        body["inputs"][0]["shape"] = shape
        body["inputs"][0]["data"] = []
        out.append(HttpCase("POST", "/v2/models/ciou/infer", _json(body), {}, f"shape {shape[:3]}"))
    for params in ({"box_format": 3}, {"box_format": ["xyxy"]}, {"reduction": {}}, {"return_grad": "no"},
                   {"alpha_rule": 7}, {"eps": math.inf}):
        out.append(HttpCase("POST", "/v2/models/ciou/infer", _json(oip_json(**params)), {}, f"OIP params {params}"))
    for request_id in (2**200, {"a": 1}, "i" * 5000):  # the id is echoed back in the answer
        out.append(HttpCase("POST", "/v2/models/ciou/infer", _json({**oip_json(), "id": request_id}), {},
                            f"OIP id {str(request_id)[:20]}"))
    for outputs in ([{"name": "LOSS", "parameters": [1]}], [{"name": 5}], "LOSS", [None]):
        body = oip_json()
        body["outputs"] = outputs
        out.append(HttpCase("POST", "/v2/models/ciou/infer", _json(body), {}, f"outputs {outputs!r}"))
    binary_head = _json({"inputs": [{"name": "PRED", "shape": [2, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 32}},
                                    {"name": "TARGET", "shape": [2, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 32}}]})
    blob = np.asarray(PRED + TARGET, dtype="<f4").tobytes()
    for value in ("\u0663\u0662", "\u00b2", "-5", "1e3", "0x10", "9" * 40):
        out.append(HttpCase("POST", "/v2/models/ciou/infer", binary_head + blob,
                            {"Inference-Header-Content-Length": value}, f"header length {value!r}"))
    out.append(HttpCase("GET", "/v2/models/" + "m" * 3000, b"", {}, "3 KB model name"))
    out.append(HttpCase("GET", "/v2/models/ciou/versions/" + "9" * 3000, b"", {}, "3 KB version"))
    return out


def send_http(client: httpx.Client, case: HttpCase) -> httpx.Response:
    headers = {"content-type": "application/json", **case.headers}
    headers = {k: v.encode("utf-8") for k, v in headers.items()}  # non-ASCII values travel as UTF-8 bytes
    return client.request(case.method, case.path, content=case.body, headers=headers)


# --------------------------------------------------------------------------------------------- REST fuzzer
_ODD_VALUES = [math.nan, math.inf, -math.inf, 1e308, -1e308, 2**63, -2**63 - 1, 2**200, -1, 0, 1.5, True, None,
               "", "x" * 5000, "\u00e9\u4e2d\ud83d\ude00", [], {}, [[[[]]]], {"a": {"b": [1]}}, [1] * 70]


def _mutate(value: Any, rng: random.Random, depth: int = 0) -> Any:
    """A random change somewhere inside a JSON value."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.25:
            out[rng.choice(["box_format", "params", "reduction", "dtype", "weights", "outputs", "parameters", "id",
                            "\u00e9" * rng.randint(1, 300), "x" * rng.randint(1, 3000)])] = rng.choice(_ODD_VALUES)
        else:
            out[key] = _mutate(value[key], rng, depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out = list(value)
        i = rng.randrange(len(out))
        roll = rng.random()
        if roll < 0.15:
            del out[i]
        elif roll < 0.25:
            out.append(rng.choice(_ODD_VALUES))
        else:
            out[i] = _mutate(out[i], rng, depth + 1)
        return out
    return rng.choice(_ODD_VALUES + ["xyxy", "cxcywh", "mean", "FP64", "INT8", "UINT64", [2, 4], [2**40, 4]])


BASES = [
    ("/v1/losses/ciou", {"pred": PRED, "target": TARGET, "box_format": "xyxy", "reduction": "none",
                         "params": {"eps": 1e-7}, "return_grad": True, "dtype": "float32"}),
    ("/v1/losses/cross_entropy", {"pred": [[0.1, 0.9], [2.0, -1.0]], "target": [1, 0],
                                  "params": {"ignore_index": -100, "label_smoothing": 0.1}}),
    ("/v1/losses/focal", {"pred": [0.3, -1.0], "target": [1, 0], "params": {"alpha": 0.25, "gamma": 2.0}}),
    ("/v1/metrics/giou", {"boxes1": PRED, "boxes2": TARGET, "pairwise": True, "box_format": "xywh"}),
    ("/v2/models/ciou/infer", {**oip_json(box_format="xyxy", reduction="mean", return_grad=True), "id": "7",
                               "outputs": [{"name": "LOSS", "parameters": {"binary_data": False}}]}),
    ("/v2/models/cross_entropy/infer", {"inputs": [
        {"name": "PRED", "shape": [2, 2], "datatype": "FP64", "data": [[0.1, 0.9], [2.0, -1.0]]},
        {"name": "TARGET", "shape": [2], "datatype": "INT64", "data": [1, 0]}],
        "parameters": {"ignore_index": -100}}),
]
PATHS = ["/v1/losses/ciou", "/v1/losses/", "/v1/metrics/iou", "/v2/models/ciou/infer", "/v2/models/ciou",
         "/v2/models/ciou/config", "/v2/models/ciou/stats", "/v2/repository/index", "/v2/models/%00/infer",
         "/v1/losses/%ff", "/v2/models/ciou/versions/2/infer", "/metrics", "/v2", "/docs"]


def fuzz_http_case(rng: random.Random) -> HttpCase:
    """One hostile request: a mutated valid body, random bytes, odd headers, odd paths."""
    path, body = rng.choice(BASES)
    roll = rng.random()
    headers: dict[str, str] = {}
    if roll < 0.6:
        for _ in range(rng.randint(1, 3)):
            body = _mutate(body, rng)
        data = json.dumps(body, allow_nan=True).encode()
    elif roll < 0.7:
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 400)))
    elif roll < 0.8:
        data = json.dumps(body).encode()
        cut = rng.randrange(len(data) + 1)
        data = data[:cut] + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 8)))
    elif roll < 0.9:
        data = json.dumps(body).encode()
        headers[rng.choice(["lossd-timeout", "Inference-Header-Content-Length", "x-api-key", "authorization",
                            "content-type", "x-other"])] = rng.choice(
            ["nan", "-1", "0", "1e999", "\u00b2", "\u0663", "x" * 2000, "application/octet-stream", "Bearer x",
             str(rng.randint(0, 10**6)), "0"])
    else:
        path = rng.choice(PATHS)
        data = json.dumps(body).encode()
    method = "POST" if rng.random() < 0.9 else rng.choice(["GET", "PUT", "DELETE", "PATCH"])
    return HttpCase(method, path, data, headers, "fuzz")


def raw_http(host: str, port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Raw bytes on a fresh connection; what the server answers before closing (or the timeout)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks)


def fuzz_raw_request(rng: random.Random) -> bytes:
    """A request line and head with random damage: framing the HTTP parser itself must refuse."""
    body = json.dumps({"pred": PRED, "target": TARGET}).encode()
    lines = [b"POST /v1/losses/ciou HTTP/1.1", b"host: localhost", b"content-type: application/json",
             b"content-length: %d" % len(body)]
    roll = rng.random()
    if roll < 0.3:
        i = rng.randrange(len(lines))
        lines[i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
    elif roll < 0.5:
        lines[3] = rng.choice([b"content-length: -1", b"content-length: 99999999999999999999999",
                               b"content-length: 1, 2", b"transfer-encoding: chunked", b"content-length: \xd9\xa3"])
    elif roll < 0.7:
        lines.append(b"x-" + bytes(rng.choice(b"abc:\x00\x7f\xff") for _ in range(rng.randint(1, 300))))
    else:
        body = body[: rng.randrange(len(body) + 1)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# --------------------------------------------------------------------------------------------- gRPC fuzzer
GRPC_METHODS = ["/lossd.v1.LossService/Evaluate", "/lossd.v1.LossService/Metric",
                "/lossd.v1.LossService/ListLosses", "/inference.GRPCInferenceService/ModelInfer",
                "/inference.GRPCInferenceService/ModelMetadata", "/inference.GRPCInferenceService/ModelReady"]


def valid_grpc_messages() -> dict[str, bytes]:
    pred, target = np.asarray(PRED, "<f4"), np.asarray(TARGET, "<f4")
    ev = pb.EvaluateRequest(loss="ciou", pred=to_tensor(pred), target=to_tensor(target), box_format="xyxy",
                            params={"eps": to_param(1e-7)})
    me = pb.MetricRequest(metric="giou", boxes1=to_tensor(pred), boxes2=to_tensor(target), pairwise=True)
    inf = oip_pb.ModelInferRequest(model_name="ciou", inputs=[
        oip_pb.ModelInferRequest.InferInputTensor(name="PRED", datatype="FP32", shape=[2, 4]),
        oip_pb.ModelInferRequest.InferInputTensor(name="TARGET", datatype="FP32", shape=[2, 4])],
        raw_input_contents=[pred.tobytes(), target.tobytes()])
    return {GRPC_METHODS[0]: ev.SerializeToString(), GRPC_METHODS[1]: me.SerializeToString(),
            GRPC_METHODS[2]: b"", GRPC_METHODS[3]: inf.SerializeToString(),
            GRPC_METHODS[4]: oip_pb.ModelMetadataRequest(name="ciou").SerializeToString(),
            GRPC_METHODS[5]: oip_pb.ModelReadyRequest(name="ciou", version="1").SerializeToString()}


def _odd_message(method: str, rng: random.Random) -> bytes:
    """A well-formed message with hostile field values."""
    odd_str = rng.choice(["", "x" * rng.randint(1, 100_000), "\u00e9" * 300, "ciou\x00", "../../etc"])
    odd_num = rng.choice([math.nan, math.inf, -1e308, 1e308, 0.0, -1.0])
    pred = np.asarray(PRED, "<f4")
    if method.endswith("Evaluate"):
        msg = pb.EvaluateRequest(loss=rng.choice(["ciou", "cross_entropy", odd_str]),
                                 pred=pb.Tensor(shape=rng.choice([[2, 4], [2**62, 4], [1] * 70, [-1], [3, 4]]),
                                                raw=pred.tobytes(), dtype=rng.choice([0, 1, 2, 3, 4, 5, 99])),
                                 target=to_tensor(pred), box_format=rng.choice(["xyxy", odd_str]),
                                 reduction=rng.choice(["none", "mean", odd_str]),
                                 params={rng.choice(["eps", "ignore_index", odd_str[:200]]): to_param(odd_num)})
        return msg.SerializeToString()
    if method.endswith("Metric"):
        n = rng.choice([2, 3000, 40000])
        boxes = np.tile(pred[:1], (n, 1))
        return pb.MetricRequest(metric=rng.choice(["iou", odd_str]), boxes1=to_tensor(boxes),
                                boxes2=to_tensor(boxes), pairwise=rng.random() < 0.5,
                                compute_dtype=rng.choice([0, 1, 2, 77])).SerializeToString()
    if method.endswith("ModelInfer"):
        dt = rng.choice(["FP32", "INT8", "UINT64", "BOOL", "FP8", odd_str[:50]])
        params = {rng.choice(["box_format", "reduction", "return_grad", "eps", odd_str[:100]]):
                  oip_pb.InferParameter(**rng.choice([{"string_param": odd_str}, {"int64_param": -2**63},
                                                      {"bool_param": True}, {"double_param": odd_num}]))}
        t = oip_pb.ModelInferRequest.InferInputTensor(name=rng.choice(["PRED", "TARGET", odd_str[:50]]),
                                                      datatype=dt, shape=rng.choice([[2, 4], [2**63 - 1], [1] * 65]))
        return oip_pb.ModelInferRequest(model_name=rng.choice(["ciou", odd_str]), inputs=[t],
                                        parameters=params).SerializeToString()
    return oip_pb.ModelMetadataRequest(name=odd_str, version=odd_str[:100]).SerializeToString()


def fuzz_grpc_payload(rng: random.Random, valid: dict[str, bytes]) -> tuple[str, bytes]:
    method = rng.choice(GRPC_METHODS)
    roll = rng.random()
    data = valid[method]
    if roll < 0.3:
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
    elif roll < 0.55 and data:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            buf[rng.randrange(len(buf))] = rng.getrandbits(8)
        data = bytes(buf)
    elif roll < 0.65 and data:
        data = data[: rng.randrange(len(data))]
    else:
        data = _odd_message(method, rng)
    return method, data


def grpc_raw_call(channel: grpc.Channel, method: str, data: bytes, timeout: float = 30.0,
                  metadata: tuple = ()) -> grpc.StatusCode:
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        call(data, timeout=timeout, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


# ------------------------------------------------------------------------------------------- slow senders
async def slow_sender(host: str, port: int, stop: asyncio.Event, interval: float, outcome: dict) -> None:
    """Sends an infer request's head, then trickles its body a byte at a time until the server gives up."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        outcome["refused"] = outcome.get("refused", 0) + 1
        return
    try:
        writer.write(b"POST /v2/models/ciou/infer HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                     b"content-length: 100000\r\n\r\n")
        await writer.drain()
        while not stop.is_set():
            if reader.at_eof():
                break
            try:
                head = await asyncio.wait_for(reader.read(200), timeout=interval)
            except asyncio.TimeoutError:
                head = None
            if head:
                status = head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/1.1 ") else "?"
                outcome[status] = outcome.get(status, 0) + 1
                return
            if head == b"":
                outcome["closed"] = outcome.get("closed", 0) + 1
                return
            writer.write(b" ")
            await writer.drain()
        outcome["still_open"] = outcome.get("still_open", 0) + 1
    except (ConnectionError, OSError):
        outcome["reset"] = outcome.get("reset", 0) + 1
    finally:
        writer.close()


async def header_bomb(host: str, port: int, total_bytes: int, chunk: int = 16384) -> tuple[int, bytes]:
    """An endless header line: how many bytes the server took before answering / closing, and its answer."""
    reader, writer = await asyncio.open_connection(host, port)
    sent = 0
    answer = b""
    try:
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\nx-bomb: ")
        while sent < total_bytes:
            writer.write(b"a" * chunk)
            sent += chunk
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(4096), timeout=0.001)
            except asyncio.TimeoutError:
                continue
            break
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return sent, answer


# ---------------------------------------------------------------------------------------- legitimate calls
@dataclass
class Legit:
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def record(self, t0: float, good: bool, key: str) -> None:
        self.latencies.append(time.perf_counter() - t0)
        if good:
            self.ok += 1
        else:
            self.failed += 1
            self.errors[key] = self.errors.get(key, 0) + 1

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else math.nan


async def legit_rest(url: str, n: int, result: Legit, pause: float = 0.0) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                resp = await client.post("/v1/metrics/iou", json={"boxes1": PRED[:1], "boxes2": TARGET[:1]})
                good = resp.status_code == 200 and abs(resp.json()["values"][0] - 0.6806723) < 1e-4
                key = str(resp.status_code)
            except httpx.HTTPError as exc:
                good, key = False, type(exc).__name__
            result.record(t0, good, key)
            if pause:
                await asyncio.sleep(pause)


async def legit_grpc(target: str, n: int, result: Legit, pause: float = 0.0) -> None:
    from lossd_client.wire import pb_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.LossServiceStub(ch)
        req = pb.MetricRequest(metric="iou", boxes1=to_tensor(np.asarray(PRED[:1], "<f4")),
                               boxes2=to_tensor(np.asarray(TARGET[:1], "<f4")))
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                resp = await stub.Metric(req, timeout=30)
                value = np.frombuffer(resp.values.raw, "<f4")[0]
                good, key = abs(value - 0.6806723) < 1e-4, "wrong"
            except grpc.aio.AioRpcError as exc:
                good, key = False, exc.code().name
            result.record(t0, good, key)
            if pause:
                await asyncio.sleep(pause)


def random_name_request(rng: random.Random) -> tuple[str, dict]:
    """A request whose names, formats and params are random (most invalid): state must not grow with them."""
    name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(1, 2000)))
    if rng.random() < 0.3:
        name = rng.choice(["ciou", "giou", "iou", "smooth_l1"])
    body = {"pred": PRED, "target": TARGET,
            "box_format": rng.choice(["xyxy", "xywh", "x" * rng.randint(1, 5000)]),
            "params": {rng.choice(["eps", "beta", "k" * rng.randint(1, 500)]): rng.uniform(0, 1e-3)}}
    return name, body


def pack_f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)
