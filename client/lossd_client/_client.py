"""LossClient / AsyncLossClient: one API over REST or gRPC, picked by the URL's scheme.

    with LossClient("grpc://127.0.0.1:50051") as client:      # or "http://127.0.0.1:8000"
        loss, grad = client.loss("ciou", pred, target, box_format="xywh")
        iou = client.metric("iou", boxes_a, boxes_b, pairwise=True)

Large arrays are split into requests under ``max_request_bytes`` (several in flight at once) and stitched back
in order; UNAVAILABLE, 429
and 503 are retried with exponential backoff (honouring Retry-After).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, NamedTuple
from urllib.parse import urlparse

import grpc
import httpx
import numpy as np

from .wire import (SMALL_MESSAGE, WithTensors, decode_with_tensors, encode_evaluate_request, from_param, from_tensor,
                   oip_binary_request, oip_binary_response, passthrough, pb, pb_grpc, to_param, to_tensor, wire_array,
                   wrap_field)
from ._bulk import BulkHTTP
from ._bulk import usable as bulk_usable
from ._errors import RETRYABLE, LossdError, UnavailableError, from_grpc, from_http

# 8 MiB requests measured fastest for 1M boxes on loopback (both transports); up to 4 are in flight at once,
# so the server computes one chunk while the next is on the wire
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
MAX_IN_FLIGHT = 4
GRPC_MAX_MESSAGE = 512 * 2**20
# mean over several requests needs the server's denominator; these losses weight it (class weights, ignore_index)
WEIGHTED_MEAN = {"cross_entropy", "nll"}
EVALUATE = "/lossd.v1.LossService/Evaluate"
EVALUATE_STREAM = "/lossd.v1.LossService/EvaluateStream"


class LossResult(NamedTuple):
    loss: np.ndarray | float
    grad: np.ndarray | None


def _parse_url(url: str) -> tuple[str, str]:
    u = urlparse(url)
    if u.scheme in ("http", "https"):
        return "http", url.rstrip("/")
    if u.scheme in ("grpc", "grpcs"):
        return u.scheme, u.netloc
    raise ValueError(f"url must start with http://, https://, grpc:// or grpcs:// (TLS), got {url!r}")


# --------------------------------------------------------------------------------------------- request plans
class _Call(NamedTuple):
    name: str
    pred: np.ndarray
    target: np.ndarray
    weights: np.ndarray | None
    box_format: str
    reduction: str
    params: dict
    return_grad: bool


def _prepare(name, pred, target, weights, box_format, reduction, params, return_grad) -> _Call:
    p = wire_array(pred)
    t_in = np.asarray(target)
    t = wire_array(t_in, index=t_in.dtype.kind in "iu")
    if t.dtype.kind == "f" and t.dtype != p.dtype:
        t = t.astype(p.dtype)
    w = None if weights is None else wire_array(weights).astype(p.dtype, copy=False)
    return _Call(name, p, t, w, box_format, reduction, dict(params or {}), return_grad)


def _slices(n: int, row_bytes: int, max_bytes: int) -> list[slice]:
    rows = max(1, max_bytes // max(row_bytes, 1))
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)] or [slice(0, 0)]


def _plan(call: _Call, max_bytes: int) -> tuple[list[_Call], bool]:
    n = call.pred.shape[0] if call.pred.ndim else 1
    row_bytes = sum(a[:1].nbytes for a in (call.pred, call.target, call.weights) if a is not None and a.ndim)
    parts = _slices(n, row_bytes, max_bytes)
    if len(parts) == 1:
        return [call], False
    if call.reduction == "mean" and call.name in WEIGHTED_MEAN:
        raise ValueError(f"{call.name} with reduction='mean' weights its mean on the server and cannot be split "
                         f"into {len(parts)} requests; use reduction='sum' or a larger max_request_bytes")
    return [call._replace(pred=call.pred[s], target=call.target[s], reduction="none",
                          weights=None if call.weights is None else call.weights[s]) for s in parts], True


def _combine(call: _Call, results: list[LossResult], split: bool) -> LossResult:
    if not split:
        return results[0]
    loss = np.concatenate([r.loss for r in results])
    grad = np.concatenate([r.grad for r in results]) if call.return_grad else None
    if call.reduction == "none":
        return LossResult(loss, grad)
    n = loss.shape[0]
    if call.reduction == "sum":
        return LossResult(float(loss.sum(dtype=np.float64)), grad)
    return LossResult(float(loss.sum(dtype=np.float64) / max(n, 1)), None if grad is None else grad / max(n, 1))


def _metric_slices(boxes1: np.ndarray, boxes2: np.ndarray, pairwise: bool, max_bytes: int) -> list[slice]:
    n = boxes1.shape[0]
    out_row = (boxes2.shape[0] if pairwise else 1) * boxes1.itemsize
    in_row = boxes1[:1].nbytes + (0 if pairwise else boxes2[:1].nbytes)
    budget = max_bytes - (boxes2.nbytes if pairwise else 0)
    return _slices(n, in_row + out_row, max(budget, in_row + out_row))


# --------------------------------------------------------------------------------------------- wire forms
def _oip(call: _Call) -> tuple[bytes, dict]:
    inputs = {"PRED": call.pred, "TARGET": call.target}
    if call.weights is not None:
        inputs["WEIGHTS"] = call.weights
    params = {"box_format": call.box_format, "reduction": call.reduction, "return_grad": call.return_grad,
              "binary_data_output": True, **call.params}
    return oip_binary_request(inputs, params)


def _from_oip(call: _Call, resp: httpx.Response) -> LossResult:
    out = oip_binary_response(resp.content, resp.headers.get("inference-header-content-length"))
    loss = out["LOSS"]
    return LossResult(float(loss[0]) if call.reduction != "none" else loss, out.get("GRAD"))


def _pb_request(call: _Call) -> bytes:
    """The serialized EvaluateRequest (raw tensors, their bytes copied once)."""
    return encode_evaluate_request(call.name, call.pred, call.target, call.weights, box_format=call.box_format,
                                   reduction=call.reduction, params=call.params, return_grad=call.return_grad)


def _evaluate_methods(channel) -> tuple:
    """Evaluate and EvaluateStream taking already-encoded requests (the stub's would serialize messages)."""
    unary = channel.unary_unary(EVALUATE, request_serializer=passthrough,
                                response_deserializer=partial(decode_with_tensors, pb.EvaluateResponse,
                                                              min_bytes=SMALL_MESSAGE))
    stream = channel.stream_stream(EVALUATE_STREAM, request_serializer=passthrough,
                                   response_deserializer=pb.EvaluateStreamResponse.FromString)
    return unary, stream


def _from_pb(resp: pb.EvaluateResponse | WithTensors) -> LossResult:
    """An EvaluateResponse (decoded with its raw tensors left in the received bytes, or a plain message)."""
    if not isinstance(resp, WithTensors):
        resp = WithTensors(resp, {})
    loss = resp.array("loss")
    grad = resp.array("grad") if resp.has("grad") else None
    return LossResult(float(loss) if loss.ndim == 0 else loss, grad)


def _pb_metric(name, boxes1, boxes2, box_format, pairwise, params) -> pb.MetricRequest:
    return pb.MetricRequest(metric=name, boxes1=to_tensor(boxes1), boxes2=to_tensor(boxes2), box_format=box_format,
                            pairwise=pairwise, params={k: to_param(v) for k, v in (params or {}).items()})


def _catalog_from_pb(entries) -> list[dict]:
    out = []
    for e in entries:
        params = {p.name: {"default": from_param(p.default_value), "min": p.min if p.HasField("min") else None,
                           "max": p.max if p.HasField("max") else None, "doc": p.doc, "type": p.type,
                           "choices": list(p.choices) or None} for p in e.params}
        out.append({"name": e.name, "kind": e.kind, "summary": e.summary, "doc": e.doc, "reference": e.reference,
                    "pred": e.pred, "target": e.target, "params": params})
    return out


def _http_error(resp: httpx.Response) -> LossdError:
    code, message, details = resp.headers.get("lossd-error-code"), resp.text, {}
    if resp.headers.get("lossd-error-field"):
        details["field"] = resp.headers["lossd-error-field"]
    if resp.headers.get("lossd-error-rows"):
        details["rows"] = [int(r) for r in resp.headers["lossd-error-rows"].split(",") if r]
    try:
        body = resp.json()["error"]
        if isinstance(body, dict):
            code, message = body.get("code", code), body.get("message", message)
            details = dict(details, **body.get("details", {}))
        else:
            message = str(body)
    except (ValueError, KeyError, TypeError):
        pass
    if resp.headers.get("retry-after"):
        try:
            details = dict(details, retry_after=float(resp.headers["retry-after"]))
        except ValueError:
            pass
    return from_http(resp.status_code, code, message, details)


def _grpc_error(exc: grpc.RpcError) -> LossdError:
    md = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    details: dict[str, Any] = {}
    if "lossd-error-field" in md:
        details["field"] = md["lossd-error-field"]
    if "lossd-error-rows" in md:
        details["rows"] = [int(r) for r in md["lossd-error-rows"].split(",") if r]
    if "retry-after" in md:
        details["retry_after"] = float(md["retry-after"])
    return from_grpc(exc.code().name, md.get("lossd-error-code"), exc.details() or "", details)


def _delay(exc: LossdError, attempt: int, backoff: float) -> float:
    return float(exc.details.get("retry_after", min(backoff * 2**attempt, 10.0)))


def _headers(api_key: str | None) -> dict:
    return {"x-api-key": api_key} if api_key else {}


# --------------------------------------------------------------------------------------------- sync
class LossClient:
    """Synchronous client; ``url`` is ``http://host:8000`` or ``grpc://host:50051``."""

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 3, backoff: float = 0.2,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, api_key: str | None = None,
                 ca_cert: str | None = None) -> None:
        """api_key: sent as x-api-key; ca_cert: a PEM file to trust for https:// and grpcs:// (a private CA)."""
        self.transport, target = _parse_url(url)
        self.timeout, self.retries, self.backoff, self.max_request_bytes = timeout, retries, backoff, max_request_bytes
        self._metadata = tuple(_headers(api_key).items())
        if self.transport == "http":
            self._http = httpx.Client(base_url=target, timeout=timeout, headers=_headers(api_key),
                                      verify=ssl.create_default_context(cafile=ca_cert) if ca_cert else True)
            # binary inference requests, the large ones, go through http.client: a third of httpx's CPU (_bulk.py)
            self._bulk = (BulkHTTP(target, timeout=timeout, headers=_headers(api_key), ca_cert=ca_cert)
                          if bulk_usable(target) else None)
        else:
            opts = [("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
                    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE)]
            if self.transport == "grpcs":
                creds = grpc.ssl_channel_credentials(open(ca_cert, "rb").read() if ca_cert else None)
                self._channel = grpc.secure_channel(target, creds, options=opts)
            else:
                self._channel = grpc.insecure_channel(target, options=opts)
            self.transport = "grpc"
            self._stub = pb_grpc.LossServiceStub(self._channel)
            self._evaluate, self._evaluate_stream = _evaluate_methods(self._channel)

    def _retry(self, fn):
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except RETRYABLE as exc:
                if attempt == self.retries:
                    raise
                time.sleep(_delay(exc, attempt, self.backoff))

    def _http_call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise UnavailableError("unavailable", f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 400:
            raise _http_error(resp)
        return resp

    def _grpc_call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None

    def _bulk_post(self, path: str, body: bytes, headers: dict) -> httpx.Response:
        if self._bulk is None:
            return self._http_call("POST", path, content=body, headers=headers)
        resp = self._bulk.post(path, body, headers)
        if resp.status_code >= 400:
            raise _http_error(resp)
        return resp

    def _evaluate_one(self, call: _Call) -> LossResult:
        if self.transport == "http":
            body, headers = _oip(call)
            return _from_oip(call, self._retry(lambda: self._bulk_post(f"/v2/models/{call.name}/infer", body,
                                                                       headers)))
        req = _pb_request(call)
        return _from_pb(self._retry(lambda: self._grpc_call(self._evaluate, req)))

    def loss(self, name: str, pred: Any, target: Any, *, box_format: str = "xyxy", reduction: str = "none",
             weights: Any = None, params: dict | None = None, return_grad: bool = True) -> LossResult:
        """(loss, grad): per-sample loss [N] (a float when reduced) and d loss / d pred in ``box_format``."""
        call = _prepare(name, pred, target, weights, box_format, reduction, params, return_grad)
        parts, split = _plan(call, self.max_request_bytes)
        if len(parts) == 1:
            return _combine(call, [self._evaluate_one(parts[0])], split)
        with ThreadPoolExecutor(max_workers=min(MAX_IN_FLIGHT, len(parts))) as pool:
            return _combine(call, list(pool.map(self._evaluate_one, parts)), split)

    def stream(self, calls: list[dict]) -> list[LossResult]:
        """Several loss evaluations in order, each a dict of ``loss()``'s arguments (``name``, ``pred``, ``target``,
        ...). Over gRPC they share one EvaluateStream call (for batch jobs); over HTTP they are sent one by one.
        The first failing item raises its typed error."""
        prepared = [_prepare(c["name"], c["pred"], c["target"], c.get("weights"), c.get("box_format", "xyxy"),
                             c.get("reduction", "none"), c.get("params"), c.get("return_grad", True))
                    for c in calls]
        if self.transport == "http":
            return [self._evaluate_one(c) for c in prepared]
        reqs = [wrap_field(1, _pb_request(c)) for c in prepared]  # EvaluateStreamRequest.request

        def run() -> list[LossResult]:
            try:
                answers = list(self._evaluate_stream(iter(reqs), timeout=self.timeout, metadata=self._metadata))
            except grpc.RpcError as exc:
                raise _grpc_error(exc) from None
            out = []
            for a in answers:
                if a.HasField("error"):
                    e = a.error
                    raise from_grpc("INVALID_ARGUMENT", e.code, e.message,
                                    {"field": e.field or None, "rows": list(e.rows) or None})
                out.append(_from_pb(a.response))
            return out

        return self._retry(run)

    def metric(self, name: str, boxes1: Any, boxes2: Any, *, box_format: str = "xyxy", pairwise: bool = False,
               params: dict | None = None) -> np.ndarray:
        """IoU-family values: [N] row against row, or [N, M] with pairwise=True."""
        a, b = wire_array(boxes1), wire_array(boxes2)
        out = []
        for s in _metric_slices(a, b, pairwise, self.max_request_bytes):
            b_part = b if pairwise else b[s]
            if self.transport == "http":
                body = {"boxes1": a[s].tolist(), "boxes2": b_part.tolist(), "box_format": box_format,
                        "pairwise": pairwise, "params": params or {}}
                resp = self._retry(lambda: self._http_call("POST", f"/v1/metrics/{name}", json=body))
                out.append(np.asarray(resp.json()["values"], dtype=np.float32).reshape(
                    (a[s].shape[0], b.shape[0]) if pairwise else (-1,)))
            else:
                req = _pb_metric(name, a[s], b_part, box_format, pairwise, params)
                out.append(from_tensor(self._retry(lambda: self._grpc_call(self._stub.Metric, req)).values,
                                       "values"))
        return np.concatenate(out) if len(out) > 1 else out[0]

    def losses(self) -> list[dict]:
        """The catalog: every loss with its kind, parameters (default, min, max, doc) and reference."""
        if self.transport == "http":
            return self._retry(lambda: self._http_call("GET", "/v1/losses")).json()["losses"]
        resp = self._retry(lambda: self._grpc_call(self._stub.ListLosses, pb.ListLossesRequest()))
        return _catalog_from_pb(resp.losses)

    def close(self) -> None:
        if self.transport == "http":
            self._http.close()
            if self._bulk is not None:
                self._bulk.close()
        else:
            self._channel.close()

    def __enter__(self) -> LossClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- async
class AsyncLossClient:
    """The same API as LossClient, awaitable (httpx.AsyncClient / grpc.aio)."""

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 3, backoff: float = 0.2,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, api_key: str | None = None) -> None:
        self.transport, target = _parse_url(url)
        self.timeout, self.retries, self.backoff, self.max_request_bytes = timeout, retries, backoff, max_request_bytes
        self._metadata = tuple(_headers(api_key).items())
        if self.transport == "http":
            self._http = httpx.AsyncClient(base_url=target, timeout=timeout, headers=_headers(api_key))
        else:
            self._channel = grpc.aio.insecure_channel(target, options=[
                ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE)])
            self._stub = pb_grpc.LossServiceStub(self._channel)
            self._evaluate, self._evaluate_stream = _evaluate_methods(self._channel)

    async def _retry(self, fn):
        for attempt in range(self.retries + 1):
            try:
                return await fn()
            except RETRYABLE as exc:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(_delay(exc, attempt, self.backoff))

    async def _http_call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            resp = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise UnavailableError("unavailable", f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 400:
            raise _http_error(resp)
        return resp

    async def _grpc_call(self, method, request):
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None

    async def _evaluate_one(self, call: _Call) -> LossResult:
        if self.transport == "http":
            body, headers = _oip(call)
            resp = await self._retry(lambda: self._http_call("POST", f"/v2/models/{call.name}/infer", content=body,
                                                             headers=headers))
            return _from_oip(call, resp)
        req = _pb_request(call)
        return _from_pb(await self._retry(lambda: self._grpc_call(self._evaluate, req)))

    async def loss(self, name: str, pred: Any, target: Any, *, box_format: str = "xyxy", reduction: str = "none",
                   weights: Any = None, params: dict | None = None, return_grad: bool = True) -> LossResult:
        call = _prepare(name, pred, target, weights, box_format, reduction, params, return_grad)
        parts, split = _plan(call, self.max_request_bytes)
        gate = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def one(c: _Call) -> LossResult:
            async with gate:
                return await self._evaluate_one(c)

        return _combine(call, list(await asyncio.gather(*(one(c) for c in parts))), split)

    async def metric(self, name: str, boxes1: Any, boxes2: Any, *, box_format: str = "xyxy", pairwise: bool = False,
                     params: dict | None = None) -> np.ndarray:
        a, b = wire_array(boxes1), wire_array(boxes2)
        out = []
        for s in _metric_slices(a, b, pairwise, self.max_request_bytes):
            b_part = b if pairwise else b[s]
            if self.transport == "http":
                body = {"boxes1": a[s].tolist(), "boxes2": b_part.tolist(), "box_format": box_format,
                        "pairwise": pairwise, "params": params or {}}
                resp = await self._retry(lambda: self._http_call("POST", f"/v1/metrics/{name}", json=body))
                out.append(np.asarray(resp.json()["values"], dtype=np.float32).reshape(
                    (a[s].shape[0], b.shape[0]) if pairwise else (-1,)))
            else:
                req = _pb_metric(name, a[s], b_part, box_format, pairwise, params)
                resp = await self._retry(lambda: self._grpc_call(self._stub.Metric, req))
                out.append(from_tensor(resp.values, "values"))
        return np.concatenate(out) if len(out) > 1 else out[0]

    async def losses(self) -> list[dict]:
        if self.transport == "http":
            return (await self._retry(lambda: self._http_call("GET", "/v1/losses"))).json()["losses"]
        resp = await self._retry(lambda: self._grpc_call(self._stub.ListLosses, pb.ListLossesRequest()))
        return _catalog_from_pb(resp.losses)

    async def close(self) -> None:
        if self.transport == "http":
            await self._http.aclose()
        else:
            await self._channel.close()

    async def __aenter__(self) -> AsyncLossClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


