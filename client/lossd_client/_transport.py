"""Transports: how one request reaches one lossd endpoint, over REST or gRPC, blocking or awaitable.

A transport is two halves. Its *wire* (``HTTPWire``, ``GRPCWire``; no I/O, shared by the blocking and the
awaitable client) turns an operation into an ``Exchange``: what to send and how to read the answer. Its *sender*
(``HTTPTransport`` / ``AsyncHTTPTransport``, ``GRPCTransport`` / ``AsyncGRPCTransport``) only moves bytes and turns
network and server failures into the typed errors of ``_errors.py``. Adding a transport is one wire plus its two
senders; the clients never branch on which one they hold.
"""

from __future__ import annotations

import ssl
from functools import partial
from typing import Any, Callable, NamedTuple, Sequence
from urllib.parse import urlparse

import grpc
import grpc.aio
import httpx
import numpy as np

from ._bulk import BulkHTTP
from ._bulk import usable as bulk_usable
from . import _shm
from ._errors import DeadlineExceededError, InvalidInputError, LossdError, UnavailableError, from_grpc, from_http
from .wire import (SMALL_MESSAGE, WithTensors, decode_with_tensors, encode_evaluate_request, from_param,
                   from_tensor, oip_binary_request, oip_binary_response, passthrough, pb, pb_grpc, to_param, to_tensor,
                   wrap_field)

GRPC_MAX_MESSAGE = 512 * 2**20
EVALUATE = "/lossd.v1.LossService/Evaluate"
EVALUATE_STREAM = "/lossd.v1.LossService/EvaluateStream"


class LossResult(NamedTuple):
    loss: np.ndarray | float
    grad: np.ndarray | None


class Call(NamedTuple):
    """One loss evaluation, its arrays already in wire form."""
    name: str
    pred: np.ndarray
    target: np.ndarray
    weights: np.ndarray | None
    box_format: str
    reduction: str
    params: dict
    return_grad: bool


class Exchange(NamedTuple):
    """What a sender sends (``request``: REST (method, path, httpx kwargs); gRPC (method name, message)) and how
    the answer becomes a result."""
    request: tuple
    parse: Callable[[Any], Any]


# ------------------------------------------------------------------------------------------------ endpoints
class Endpoints(NamedTuple):
    kind: str             # "http" | "grpc"
    targets: list[str]    # base URLs (REST) or gRPC targets (host:port, dns:///host:port)
    tls: bool             # gRPC only: secure channels (REST takes it from https://)


def parse_endpoints(url: str | Sequence[str], tls: bool = False) -> Endpoints:
    """One or several endpoints of one transport: a URL, a comma-separated string of URLs, or a list of them.
    ``dns:///host:port`` is a gRPC target that resolves to every replica behind a name (a headless Service) and
    balances calls over them with gRPC's round_robin policy; ``tls=True`` makes it a TLS channel."""
    urls = [u.strip() for u in (url.split(",") if isinstance(url, str) else url) for u in u.split(",")]
    urls = [u for u in urls if u]
    if not urls:
        raise ValueError("url: no endpoint given")
    kinds, targets, secure = set(), [], set()
    for u in urls:
        p = urlparse(u)
        if p.scheme in ("http", "https", "grpc", "grpcs"):
            try:
                p.port  # noqa: B018 (urllib checks the range when the port is read)
            except ValueError:
                raise ValueError(f"url {u!r}: the port must be a number in [0, 65535]") from None
        if p.scheme in ("http", "https"):
            kinds.add("http")
            targets.append(u.rstrip("/"))
        elif p.scheme in ("grpc", "grpcs"):
            kinds.add("grpc")
            secure.add(p.scheme == "grpcs")
            targets.append(p.netloc)
        elif p.scheme == "dns":
            kinds.add("grpc")
            secure.add(tls)
            targets.append(u)
        else:
            raise ValueError(f"url must start with http://, https://, grpc://, grpcs:// (TLS) or dns:/// (gRPC, "
                             f"round_robin over a name's addresses), got {u!r}")
    if len(kinds) > 1 or len(secure) > 1:
        raise ValueError(f"url: all endpoints must use one transport and one security, got {urls}")
    return Endpoints(kinds.pop(), targets, secure.pop() if secure else False)


# ------------------------------------------------------------------------------------------------ errors
def http_error(resp: httpx.Response) -> LossdError:
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


def grpc_error(exc: grpc.RpcError) -> LossdError:
    md = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    details: dict[str, Any] = {}
    if "lossd-error-field" in md:
        details["field"] = md["lossd-error-field"]
    if "lossd-error-rows" in md:
        details["rows"] = [int(r) for r in md["lossd-error-rows"].split(",") if r]
    if "retry-after" in md:
        details["retry_after"] = float(md["retry-after"])
    return from_grpc(exc.code().name, md.get("lossd-error-code"), exc.details() or "", details)


def _checked(resp: httpx.Response) -> httpx.Response:
    if resp.status_code >= 400:
        exc = http_error(resp)
        if resp.status_code == 404 and exc.code == "not_found":  # no such route (not an unknown loss)
            exc.message += (f": no route {resp.request.url.path} on this server; the URL should be the server's "
                            "root (e.g. http://host:8000), or a proxy's prefix for it")
            exc.args = (f"{exc.code}: {exc.message}",)
        raise exc
    return resp


def not_http(target: str) -> UnavailableError:
    """What a URL whose server answers with something other than HTTP/1.1 gets (its bytes are not quoted)."""
    return UnavailableError("not_http", f"the server at {target} did not answer HTTP; if this is lossd's gRPC "
                            "port, use a grpc:// URL")


def no_answer(timeout: float) -> DeadlineExceededError:
    return DeadlineExceededError("deadline_exceeded", f"no answer within timeout={timeout:g} s; the server may "
                                 "still be computing it (not retried; raise timeout for larger calls)")


def _speaks_other(exc: Exception) -> bool:
    """Whether httpx failed because the answer was not HTTP/1.1 (not because the connection closed)."""
    return isinstance(exc, httpx.RemoteProtocolError) and "disconnected" not in str(exc).lower()


# a connection broken while a request was sent: the server may have answered something that is not HTTP and
# closed (a gRPC port does); a small GET tells
_PROBE_AFTER = (httpx.ReadError, httpx.WriteError)
PROBE_PATH = "/v2/health/live"


def _unreachable(exc: Exception, target: str, timeout: float, probe: Exception | None = None) -> LossdError:
    """A network failure as a typed error: no answer in time once connected is a deadline (not retried: the
    server may be computing the call); bytes that are not HTTP say so (``probe``: what a small GET raised after
    a broken connection); anything else is unavailable."""
    if isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout)):
        return no_answer(timeout)
    if _speaks_other(exc) or _speaks_other(probe):
        return not_http(target)
    if isinstance(exc, httpx.ConnectTimeout):
        return UnavailableError("unavailable", f"could not connect to {target} in time: {exc}")
    return UnavailableError("unavailable", f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------------ wires
def _from_oip(call: Call, resp: httpx.Response) -> LossResult:
    out = oip_binary_response(resp.content, resp.headers.get("inference-header-content-length"))
    loss = out["LOSS"]
    return LossResult(float(loss[0]) if call.reduction != "none" else loss, out.get("GRAD"))


def _from_pb(resp: pb.EvaluateResponse | WithTensors) -> LossResult:
    """An EvaluateResponse (decoded with its raw tensors left in the received bytes, or a plain message)."""
    if not isinstance(resp, WithTensors):
        resp = WithTensors(resp, {})
    loss = resp.array("loss")
    grad = resp.array("grad") if resp.has("grad") else None
    return LossResult(float(loss) if loss.ndim == 0 else loss, grad)


# codes whose gRPC status is not INVALID_ARGUMENT (service/lossd/errors.py's table)
STREAM_STATUS = {"unknown_loss": "NOT_FOUND", "unknown_metric": "NOT_FOUND", "unknown_version": "NOT_FOUND",
                 "unknown_model": "NOT_FOUND", "too_large": "RESOURCE_EXHAUSTED", "overloaded": "RESOURCE_EXHAUSTED",
                 "too_many_regions": "RESOURCE_EXHAUSTED", "resource_exhausted": "RESOURCE_EXHAUSTED",
                 "deadline_exceeded": "DEADLINE_EXCEEDED", "request_timeout": "DEADLINE_EXCEEDED",
                 "draining": "UNAVAILABLE", "internal": "INTERNAL", "unauthorized": "UNAUTHENTICATED",
                 "forbidden": "PERMISSION_DENIED", "not_found": "UNIMPLEMENTED", "method_not_allowed": "UNIMPLEMENTED"}


def _from_pb_stream(answers: list) -> list[LossResult]:
    out = []
    for a in answers:
        if a.HasField("error"):
            e = a.error
            # an item's error carries no status: the one its code has on a call of its own (the server's table)
            raise from_grpc(STREAM_STATUS.get(e.code, "INVALID_ARGUMENT"), e.code, e.message,
                            {"field": e.field or None, "rows": list(e.rows) or None})
        out.append(_from_pb(a.response))
    return out


def _catalog_from_pb(resp: pb.ListLossesResponse) -> list[dict]:
    out = []
    for e in resp.losses:
        params = {p.name: {"default": from_param(p.default_value), "min": p.min if p.HasField("min") else None,
                           "max": p.max if p.HasField("max") else None, "doc": p.doc, "type": p.type,
                           "choices": list(p.choices) or None,
                           # as over HTTP: present when a bound itself is excluded ("> 0")
                           "exclusive": ({"min": p.min_exclusive, "max": p.max_exclusive}
                                         if p.min_exclusive or p.max_exclusive else None)} for p in e.params}
        entry = {"name": e.name, "kind": e.kind, "summary": e.summary, "doc": e.doc, "reference": e.reference,
                 "pred": e.pred, "target": e.target, "params": params}
        if "weighted_mean" in e.DESCRIPTOR.fields_by_name:  # servers whose catalog says so
            entry["weighted_mean"] = e.weighted_mean
        out.append(entry)
    return out


def _pb_request(call: Call) -> bytes:
    """The serialized EvaluateRequest (raw tensors, their bytes copied once)."""
    return encode_evaluate_request(call.name, call.pred, call.target, call.weights, box_format=call.box_format,
                                   reduction=call.reduction, params=call.params, return_grad=call.return_grad)


def _json_finite(arr: np.ndarray, field: str) -> None:
    """JSON has no NaN or inf: refuse them here as the server would (non_finite, naming the rows), not with
    json's ValueError."""
    if arr.size == 0 or np.isfinite(arr).all():
        return
    rows = np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0] if arr.ndim else 1, -1)).all(1)).tolist()
    shown = ", ".join(str(r) for r in rows[:10])
    phrase = f"{'row' if len(rows) == 1 else 'rows'} {shown}" + (f", ... ({len(rows)} rows)" if len(rows) > 10 else "")
    raise InvalidInputError("non_finite", f"{field}: NaN or inf at {phrase}", None,
                            {"field": field, "rows": rows[:10], "n_rows": len(rows)})


class HTTPWire:
    """lossd over REST: losses as OIP binary-tensor inference (the compact form), metrics and catalog as JSON."""

    @staticmethod
    def evaluate(call: Call) -> Exchange:
        inputs = {"PRED": call.pred, "TARGET": call.target}
        if call.weights is not None:
            inputs["WEIGHTS"] = call.weights
        params = {"box_format": call.box_format, "reduction": call.reduction, "return_grad": call.return_grad,
                  "binary_data_output": True, **call.params}
        body, headers = oip_binary_request(inputs, params)
        return Exchange(("POST", f"/v2/models/{call.name}/infer", {"content": body, "headers": headers}),
                        partial(_from_oip, call))

    @classmethod
    def stream(cls, calls: list[Call]) -> tuple[Callable, list]:
        """(build, items): REST has no stream, so each call is its own exchange."""
        return cls.evaluate, calls

    @staticmethod
    def metric(name: str, a: np.ndarray, b: np.ndarray, box_format: str, pairwise: bool, params: dict | None
               ) -> Exchange:
        _json_finite(a, "boxes1")
        _json_finite(b, "boxes2")
        # computed in boxes1's precision, as over gRPC (float64 arrays in float64)
        dtype = "float64" if a.dtype == np.float64 else "float32"
        body = {"boxes1": a.tolist(), "boxes2": b.tolist(), "box_format": box_format, "pairwise": pairwise,
                "params": params or {}, "dtype": dtype}
        shape = (a.shape[0], b.shape[0]) if pairwise else (-1,)
        return Exchange(("POST", f"/v1/metrics/{name}", {"json": body}),
                        lambda r: np.asarray(r.json()["values"], dtype=dtype).reshape(shape))

    @staticmethod
    def losses() -> Exchange:
        return Exchange(("GET", "/v1/losses", {}), lambda r: r.json()["losses"])


class GRPCWire:
    """lossd over gRPC (lossd.v1.LossService): requests encoded once, raw tensors decoded in place."""

    @staticmethod
    def evaluate(call: Call) -> Exchange:
        return Exchange(("evaluate", _pb_request(call)), _from_pb)

    @staticmethod
    def _stream_all(calls: list[Call]) -> Exchange:
        reqs = [wrap_field(1, _pb_request(c)) for c in calls]  # EvaluateStreamRequest.request
        return Exchange(("evaluate_stream", reqs), _from_pb_stream)

    @classmethod
    def stream(cls, calls: list[Call]) -> tuple[Callable, list]:
        """(build, items): all calls share one EvaluateStream call (for batch jobs)."""
        return cls._stream_all, [calls]

    @staticmethod
    def metric(name: str, a: np.ndarray, b: np.ndarray, box_format: str, pairwise: bool, params: dict | None
               ) -> Exchange:
        req = pb.MetricRequest(metric=name, boxes1=to_tensor(a), boxes2=to_tensor(b), box_format=box_format,
                               pairwise=pairwise, params={k: to_param(v) for k, v in (params or {}).items()})
        return Exchange(("metric", req), lambda r: from_tensor(r.values, "values"))

    @staticmethod
    def losses() -> Exchange:
        return Exchange(("losses", pb.ListLossesRequest()), _catalog_from_pb)


# ------------------------------------------------------------------------------------------------ senders
def _verify(ca_cert: str | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=ca_cert) if ca_cert else True


class _Options(NamedTuple):
    timeout: float          # the wait for an answer once connected (a gRPC call's deadline)
    api_key: str | None
    ca_cert: str | None
    tls: bool
    connect_timeout: float = 10.0  # TCP connect plus the TLS / HTTP/2 handshake

    @property
    def headers(self) -> dict:
        return {"x-api-key": self.api_key} if self.api_key else {}

    def httpx(self, base_url: str) -> dict:
        """httpx.Client / AsyncClient arguments: the same trust, key and timeout."""
        return {"base_url": base_url, "timeout": httpx.Timeout(self.timeout, connect=self.connect_timeout),
                "headers": self.headers,
                "verify": _verify(self.ca_cert)}


class HTTPTransport:
    wire = HTTPWire

    def __init__(self, base_url: str, opts: _Options) -> None:
        self.target = base_url
        self._http = httpx.Client(**opts.httpx(base_url))
        # binary inference requests, the large ones, go through http.client: a third of httpx's CPU (_bulk.py)
        self._timeout = opts.timeout
        self._bulk = (BulkHTTP(base_url, timeout=opts.timeout, connect_timeout=opts.connect_timeout,
                               headers=opts.headers, ca_cert=opts.ca_cert)
                      if bulk_usable(base_url) else None)

    def send(self, request: tuple) -> httpx.Response:
        method, path, kw = request
        if self._bulk is not None and "content" in kw:
            return _checked(self._bulk.post(path, kw["content"], kw["headers"]))
        if "json_bytes" in kw:
            kw = {"content": kw["json_bytes"], "headers": {"Content-Type": "application/json"}}
        try:
            return _checked(self._http.request(method, path, **kw))
        except httpx.TransportError as exc:
            raise _unreachable(exc, self.target, self._timeout, self._probe(exc)) from exc

    def _probe(self, exc: Exception) -> Exception | None:
        if not isinstance(exc, _PROBE_AFTER):
            return None
        try:
            self._http.get(PROBE_PATH, timeout=min(self._timeout, 5.0))
        except httpx.TransportError as probe:
            return probe
        return None

    # Triton's system shared memory (lossd_client._shm): the region's management and the small infer request
    def shm_register(self, name: str, key: str, byte_size: int) -> None:
        self.send(("POST", f"/v2/systemsharedmemory/region/{name}/register",
                   {"json": {"key": key, "offset": 0, "byte_size": byte_size}}))

    def shm_unregister(self, name: str) -> None:
        self.send(("POST", f"/v2/systemsharedmemory/region/{name}/unregister", {}))

    def shm_infer(self, model: str, region: str, tensors: list, outputs: dict, params: dict) -> list:
        body = _shm.http_infer_body(model, region, tensors, outputs, params)
        # through http.client when it can (as the binary requests): httpx adds ~0.7 ms to each call
        resp = self.send(("POST", f"/v2/models/{model}/infer",
                          {"content": body, "headers": {"Content-Type": "application/json"}}))
        return _shm.http_outputs(resp.json())

    def shm_place(self, name: str) -> tuple[str, int, int]:
        """Where the server holds region ``name``: its key (shared-memory object), offset and byte_size."""
        return _place(self.send(("GET", f"/v2/systemsharedmemory/region/{name}/status", {})).json()[0])

    def close(self) -> None:
        self._http.close()
        if self._bulk is not None:
            self._bulk.close()


class AsyncHTTPTransport:
    wire = HTTPWire

    def __init__(self, base_url: str, opts: _Options) -> None:
        self.target = base_url
        self._timeout = opts.timeout
        self._http = httpx.AsyncClient(**opts.httpx(base_url))

    async def send(self, request: tuple) -> httpx.Response:
        method, path, kw = request
        if "json_bytes" in kw:
            kw = {"content": kw["json_bytes"], "headers": {"Content-Type": "application/json"}}
        try:
            return _checked(await self._http.request(method, path, **kw))
        except httpx.TransportError as exc:
            raise _unreachable(exc, self.target, self._timeout, await self._probe(exc)) from exc

    async def _probe(self, exc: Exception) -> Exception | None:
        if not isinstance(exc, _PROBE_AFTER):
            return None
        try:
            await self._http.get(PROBE_PATH, timeout=min(self._timeout, 5.0))
        except httpx.TransportError as probe:
            return probe
        return None

    async def shm_register(self, name: str, key: str, byte_size: int) -> None:
        await self.send(("POST", f"/v2/systemsharedmemory/region/{name}/register",
                         {"json": {"key": key, "offset": 0, "byte_size": byte_size}}))

    async def shm_unregister(self, name: str) -> None:
        await self.send(("POST", f"/v2/systemsharedmemory/region/{name}/unregister", {}))

    async def shm_infer(self, model: str, region: str, tensors: list, outputs: dict, params: dict) -> list:
        body = _shm.http_infer_body(model, region, tensors, outputs, params)
        resp = await self.send(("POST", f"/v2/models/{model}/infer", {"json_bytes": body}))
        return _shm.http_outputs(resp.json())

    async def shm_place(self, name: str) -> tuple[str, int, int]:
        return _place((await self.send(("GET", f"/v2/systemsharedmemory/region/{name}/status", {}))).json()[0])

    async def close(self) -> None:
        await self._http.aclose()


def _channel(api, target: str, opts: _Options):
    """A channel from ``api`` (grpc or grpc.aio): TLS when asked (trusting ``ca_cert``, else the system's roots)."""
    options = [("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
               ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
               # gRPC's connect timeout (TCP, TLS and the HTTP/2 handshake): 20 s unless set
               ("grpc.min_reconnect_backoff_ms", max(int(opts.connect_timeout * 1000), 100))]
    if target.startswith("dns:"):
        options.append(("grpc.lb_policy_name", "round_robin"))
    if opts.tls:
        root = open(opts.ca_cert, "rb").read() if opts.ca_cert else None
        return api.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)
    return api.insecure_channel(target, options=options)


def _methods(channel) -> dict[str, tuple[Callable, bool]]:
    """name -> (callable, streams): Evaluate and EvaluateStream take already-encoded requests."""
    stub = pb_grpc.LossServiceStub(channel)
    unary = channel.unary_unary(EVALUATE, request_serializer=passthrough,
                                response_deserializer=partial(decode_with_tensors, pb.EvaluateResponse,
                                                              min_bytes=SMALL_MESSAGE))
    stream = channel.stream_stream(EVALUATE_STREAM, request_serializer=passthrough,
                                   response_deserializer=pb.EvaluateStreamResponse.FromString)
    return {"evaluate": (unary, False), "evaluate_stream": (stream, True), "metric": (stub.Metric, False),
            "losses": (stub.ListLosses, False)}


class GRPCTransport:
    wire = GRPCWire

    def __init__(self, target: str, opts: _Options) -> None:
        self.target, self._timeout, self._metadata = target, opts.timeout, tuple(opts.headers.items())
        self._channel = _channel(grpc, target, opts)
        self._methods = _methods(self._channel)

    def send(self, request: tuple) -> Any:
        name, message = request
        method, streams = self._methods[name]
        try:
            if streams:
                return list(method(iter(message), timeout=self._timeout, metadata=self._metadata))
            return method(message, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise grpc_error(exc) from None

    def _oip(self):
        from .wire import oip_grpc
        if getattr(self, "_oip_stub", None) is None:
            self._oip_stub = oip_grpc.GRPCInferenceServiceStub(self._channel)
        return self._oip_stub

    def _unary(self, method, message) -> Any:
        try:
            return method(message, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise grpc_error(exc) from None

    def shm_register(self, name: str, key: str, byte_size: int) -> None:
        from .wire import oip_pb
        self._unary(self._oip().SystemSharedMemoryRegister,
                    oip_pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=0, byte_size=byte_size))

    def shm_unregister(self, name: str) -> None:
        from .wire import oip_pb
        self._unary(self._oip().SystemSharedMemoryUnregister,
                    oip_pb.SystemSharedMemoryUnregisterRequest(name=name))

    def shm_infer(self, model: str, region: str, tensors: list, outputs: dict, params: dict) -> list:
        from .wire import oip_pb
        resp = self._unary(self._oip().ModelInfer,
                           _shm.grpc_infer_request(oip_pb, model, region, tensors, outputs, params))
        return [(o.name, o.datatype, list(o.shape)) for o in resp.outputs]

    def shm_place(self, name: str) -> tuple[str, int, int]:
        from .wire import oip_pb
        resp = self._unary(self._oip().SystemSharedMemoryStatus, oip_pb.SystemSharedMemoryStatusRequest(name=name))
        return _place(resp.regions[name])

    def close(self) -> None:
        self._channel.close()


class AsyncGRPCTransport:
    wire = GRPCWire

    def __init__(self, target: str, opts: _Options) -> None:
        self.target, self._timeout, self._metadata = target, opts.timeout, tuple(opts.headers.items())
        self._channel = _channel(grpc.aio, target, opts)
        self._methods = _methods(self._channel)

    async def send(self, request: tuple) -> Any:
        name, message = request
        method, streams = self._methods[name]
        try:
            if streams:
                return [a async for a in method(iter(message), timeout=self._timeout, metadata=self._metadata)]
            return await method(message, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise grpc_error(exc) from None

    _oip = GRPCTransport._oip

    async def _unary(self, method, message) -> Any:
        try:
            return await method(message, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise grpc_error(exc) from None

    async def shm_register(self, name: str, key: str, byte_size: int) -> None:
        from .wire import oip_pb
        await self._unary(self._oip().SystemSharedMemoryRegister,
                          oip_pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=0, byte_size=byte_size))

    async def shm_unregister(self, name: str) -> None:
        from .wire import oip_pb
        await self._unary(self._oip().SystemSharedMemoryUnregister,
                          oip_pb.SystemSharedMemoryUnregisterRequest(name=name))

    async def shm_infer(self, model: str, region: str, tensors: list, outputs: dict, params: dict) -> list:
        from .wire import oip_pb
        resp = await self._unary(self._oip().ModelInfer,
                                 _shm.grpc_infer_request(oip_pb, model, region, tensors, outputs, params))
        return [(o.name, o.datatype, list(o.shape)) for o in resp.outputs]

    async def shm_place(self, name: str) -> tuple[str, int, int]:
        from .wire import oip_pb
        resp = await self._unary(self._oip().SystemSharedMemoryStatus,
                                 oip_pb.SystemSharedMemoryStatusRequest(name=name))
        return _place(resp.regions[name])

    async def close(self) -> None:
        await self._channel.close()


def _place(status: Any) -> tuple[str, int, int]:
    """(key, offset, byte_size) from a region's status: a JSON entry or a gRPC RegionStatus."""
    if isinstance(status, dict):
        return status["key"], int(status.get("offset", 0)), int(status["byte_size"])
    return status.key, int(status.offset), int(status.byte_size)


SYNC = {"http": HTTPTransport, "grpc": GRPCTransport}
ASYNC = {"http": AsyncHTTPTransport, "grpc": AsyncGRPCTransport}
