"""LossClient / AsyncLossClient: one API over REST or gRPC, picked by the URL's scheme, over one or several
replicas.

    with LossClient("grpc://127.0.0.1:50051") as client:      # or "http://127.0.0.1:8000"
        loss, grad = client.loss("ciou", pred, target, box_format="xywh")
        iou = client.metric("iou", boxes_a, boxes_b, pairwise=True)

    LossClient("http://a:8000,http://b:8000")       # several replicas: chunks spread over them, failover
    LossClient("dns:///lossd-headless:50051")       # gRPC round_robin over every address behind a name

Large arrays are split into requests under ``max_request_bytes`` (several in flight at once, taking the replicas
in turn) and stitched back in order. A request that finds its replica gone (connection refused, UNAVAILABLE, 503)
or overloaded (429) goes at once to the next replica it has not tried; once every replica has been tried it is
retried with exponential backoff (honouring Retry-After). Each chunk's answer is taken once, from the one request
that succeeded, so no row is lost or counted twice. An error about some rows of a chunk names the caller's rows
(the chunk's start added). The two classes share everything but the waiting.

Timeouts: ``connect_timeout`` (10 s) bounds reaching a replica (TCP, plus the TLS and HTTP/2 handshakes); a
replica that cannot be reached in time counts as unavailable and the request is retried or goes to another one.
``timeout`` (60 s) bounds the wait for each request's answer once connected (the gRPC deadline); a request that
runs past it raises DeadlineExceededError and is not retried, since the server may still be computing it. A large
call is split into requests of ``max_request_bytes``, so ``timeout`` applies to one chunk, not to the whole call.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ._errors import (RETRYABLE, ClientClosedError, InvalidInputError, LossdError, NotFoundError, ServerError,
                      UnavailableError)
from ._inputs import SharedInputs
from ._shm import AsyncShmPath, ShmPath, is_loopback_url
from ._transport import ASYNC, SYNC, Call, Exchange, LossResult, _Options, parse_endpoints
from .wire import wire_array

# 8 MiB requests measured fastest for 1M boxes on loopback (both transports); up to 4 per replica are in flight
# at once, so a server computes one chunk while the next is on the wire
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
MAX_IN_FLIGHT = 4
# a replica that refused a connection is passed over by new requests for this long (it is tried again after)
DOWN_SECONDS = 5.0
# which losses weight their mean on the server (class weights, ignore_index), for servers whose catalog does not
# say (no ``weighted_mean`` in GET /v1/losses): such a mean cannot be rebuilt from several requests
WEIGHTED_MEAN = frozenset({"cross_entropy", "nll"})

__all__ = ["AsyncLossClient", "LossClient", "LossResult"]


# --------------------------------------------------------------------------------------------- request plans
def _invalid(field: str, message: str) -> InvalidInputError:
    return InvalidInputError("invalid_request", f"{field}: {message}", None, {"field": field})


def _check_args(**args: Any) -> None:
    """The call's options, checked here as the server checks them over HTTP (over gRPC a wrong type failed while
    the message was built, with a TypeError naming nothing)."""
    for field, value in args.items():
        if field in ("name", "box_format", "reduction"):
            if not isinstance(value, str):
                raise _invalid(field, f"must be a string, got {type(value).__name__} {value!r:.60}")
        elif field in ("return_grad", "pairwise"):
            if not isinstance(value, (bool, np.bool_)):
                raise _invalid(field, f"must be True or False, got {type(value).__name__} {value!r:.60}")
        elif field == "params":
            if value is not None and not isinstance(value, Mapping):
                raise _invalid(field, f"must be a dict of parameter values, got {type(value).__name__} "
                                      f"{value!r:.60}")


def _rows(a: np.ndarray) -> int | None:
    return a.shape[0] if a.ndim else None


def _same_rows(first: tuple[str, np.ndarray], *others: tuple[str, np.ndarray | None]) -> None:
    """A length_mismatch as the server words it, raised here when a call is cut into requests (each request
    would otherwise take its rows of the longer array and drop the rest without a word)."""
    name, a = first
    for other, b in others:
        if b is not None and _rows(a) is not None and _rows(b) is not None and _rows(a) != _rows(b):
            raise InvalidInputError("length_mismatch", f"{name} has {_rows(a)} rows but {other} has {_rows(b)}",
                                    None, {"field": other})


_PREPARE_ARGS = ("name", "pred", "target", "weights", "box_format", "reduction", "params", "return_grad")


def _rows_text(rows: list[int]) -> str:
    if len(rows) == 1:
        return f"row {rows[0]}"
    shown = ", ".join(map(str, rows[:10]))
    return f"rows {shown}" + (f", ... ({len(rows)} rows)" if len(rows) > 10 else "")


def _bool_rows(x: Any) -> list[int]:
    """Rows of an array-like holding true/false: every row of a boolean array; for nested lists, the rows with a
    bool among their numbers (numpy reads them as 1 and 0, as the server would read JSON true/false)."""
    if isinstance(x, np.ndarray):
        return list(range(len(x) if x.ndim else 1)) if x.dtype.kind == "b" and x.size else []
    if not isinstance(x, (list, tuple)) or not _holds_bool(x):
        return []
    return _rows_holding(x, lambda v: isinstance(v, (bool, np.bool_)))


def _rows_holding(x: Any, leaf: Callable[[Any], bool]) -> list[int]:
    """Rows of nested lists holding, at any depth, an element for which ``leaf`` is true."""
    if not isinstance(x, (list, tuple)):
        return []

    def has(v: Any) -> bool:
        return any(has(e) for e in v) if isinstance(v, (list, tuple)) else leaf(v)

    return [i for i, v in enumerate(x) if has(v)]


def _holds_bool(x: list | tuple) -> bool:
    """Whether nested lists hold a bool at any depth, one level at a time in C (the set of the elements' types):
    for a list of a million boxes, 0.2-0.3 s, a little less than numpy's conversion of it."""
    level: list | tuple = x
    while level:
        types = set(map(type, level))
        if bool in types or np.bool_ in types:
            return True
        nested = [t for t in types if issubclass(t, (list, tuple))]
        if not nested:
            return False
        if len(nested) < len(types):
            level = [e for e in level if isinstance(e, (list, tuple))]
        level = list(itertools.chain.from_iterable(level))
    return False


def _numbers(x: Any, field: str, *, labels: bool = False) -> np.ndarray:
    """An input as a wire array (``labels``: integers stay integers, for class labels); true/false, strings and
    ragged lists are InvalidInputError naming the field (and the rows), as the server names them."""
    rows = _bool_rows(x)
    if rows:
        raise InvalidInputError("invalid_value", f"{field}: true/false at {_rows_text(rows)}; boxes, labels and "
                                "weights must be numbers (convert with .astype(np.float32) if 0 and 1 are meant)",
                                None, {"field": field, "rows": rows})
    try:
        arr = np.asarray(x)
    except ValueError:
        raise InvalidInputError("invalid_shape", f"{field} is not a rectangular array (its rows have different "
                                "lengths)", None, {"field": field}) from None
    try:
        return wire_array(arr, index=labels and arr.dtype.kind in "iu")
    except TypeError as exc:
        rows = _rows_holding(x, lambda v: not isinstance(v, (int, float, np.number)))
        if rows:
            raise InvalidInputError("invalid_value", f"{field}: not a number (a string, null or object) at "
                                    f"{_rows_text(rows)}", None, {"field": field, "rows": rows}) from None
        raise InvalidInputError("invalid_value", f"{field}: {exc}", None, {"field": field}) from None


def _prepare(name, pred, target, weights=None, box_format="xyxy", reduction="none", params=None,
             return_grad=True) -> Call:
    _check_args(name=name, box_format=box_format, reduction=reduction, return_grad=return_grad, params=params)
    p = _numbers(pred, "pred")
    t = _numbers(target, "target", labels=True)
    if t.dtype.kind == "f" and t.dtype != p.dtype:
        t = t.astype(p.dtype)
    w = None if weights is None else _numbers(weights, "weights").astype(p.dtype, copy=False)
    return Call(name, p, t, w, box_format, reduction, dict(params or {}), bool(return_grad))  # np.True_ too


def _slices(n: int, row_bytes: int, max_bytes: int) -> list[slice]:
    rows = max(1, max_bytes // max(row_bytes, 1))
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)] or [slice(0, 0)]


def _plan(call: Call, max_bytes: int) -> list[tuple[int, Call]]:
    """The requests of one loss call: (first row, the chunk's call)."""
    n = call.pred.shape[0] if call.pred.ndim else 1
    row_bytes = sum(a[:1].nbytes for a in (call.pred, call.target, call.weights) if a is not None and a.ndim)
    parts = _slices(n, row_bytes, max_bytes)
    if len(parts) == 1:
        return [(0, call)]  # one request: the server checks the lengths
    _same_rows(("pred", call.pred), ("target", call.target), ("weights", call.weights))
    return [(s.start, call._replace(pred=call.pred[s], target=call.target[s], reduction="none",
                                    weights=None if call.weights is None else call.weights[s])) for s in parts]


def _rows_phrase(rows: list[int], n_rows: int | None) -> str:
    """The server's 'row 3' / 'rows 3, 7, 9' (lossd.engine.errors.rows_phrase) for these rows."""
    word = "row" if (n_rows or len(rows)) == 1 else "rows"
    return f"{word} {', '.join(str(r) for r in rows)}"


def _shift_rows(exc: LossdError, start: int) -> None:
    """An error about rows of a chunk that starts at row ``start`` of the caller's arrays: its rows (attribute and
    message) become the caller's."""
    rows = exc.details.get("rows")
    if not start or not rows:
        return
    shifted = [int(r) + start for r in rows]
    n_rows = exc.details.get("n_rows")
    old, new = _rows_phrase(rows, n_rows), _rows_phrase(shifted, n_rows)
    if old in exc.message:
        message = exc.message.replace(old, new, 1)
    else:
        message = f"{exc.message} (rows of the request starting at row {start}; the call's {new})"
    exc.details["rows"] = shifted
    exc.message = message
    exc.args = (f"{exc.code}: {message}",)


def _at(start: int, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except LossdError as exc:
        _shift_rows(exc, start)
        raise


def _check_split(call: Call, parts: int, weighted: frozenset) -> None:
    if parts > 1 and call.reduction == "mean" and call.name in weighted:
        raise ValueError(f"{call.name} with reduction='mean' weights its mean on the server and cannot be split "
                         f"into {parts} requests; use reduction='sum' or a larger max_request_bytes")


def _combine(call: Call, results: list[LossResult]) -> LossResult:
    if len(results) == 1:
        return results[0]
    loss = np.concatenate([r.loss for r in results])
    grad = np.concatenate([r.grad for r in results]) if call.return_grad else None
    if call.reduction == "none":
        return LossResult(loss, grad)
    n = loss.shape[0]
    if call.reduction == "sum":
        return LossResult(float(loss.sum(dtype=np.float64)), grad)
    return LossResult(float(loss.sum(dtype=np.float64) / max(n, 1)), None if grad is None else grad / max(n, 1))


def _read_only(result: LossResult) -> LossResult:
    """Answers are read-only whichever way they came (views of the received bytes, of a shared-memory region, or
    pieces put together): the same code works on every path; ``np.array(x)`` gives a copy to change."""
    for arr in result:
        if isinstance(arr, np.ndarray):
            arr.flags.writeable = False
    return result


def _metric_slices(boxes1: np.ndarray, boxes2: np.ndarray, pairwise: bool, max_bytes: int) -> list[slice]:
    n = boxes1.shape[0]
    out_row = (boxes2.shape[0] if pairwise else 1) * boxes1.itemsize
    in_row = boxes1[:1].nbytes + (0 if pairwise else boxes2[:1].nbytes)
    budget = max_bytes - (boxes2.nbytes if pairwise else 0)
    return _slices(n, in_row + out_row, max(budget, in_row + out_row))


def _weighted_from_catalog(entries: list[dict]) -> frozenset:
    if any("weighted_mean" in e for e in entries):
        return frozenset(e["name"] for e in entries if e.get("weighted_mean"))
    return WEIGHTED_MEAN


def _flatten(results: list) -> list:
    """Stream answers: one result per exchange (REST) or a list per exchange (a gRPC stream)."""
    return [r for res in results for r in (res if isinstance(res, list) else [res])]


def _delay(exc: LossdError, attempt: int, backoff: float) -> float:
    return float(exc.details.get("retry_after", min(backoff * 2**attempt, 10.0)))


class _Tries:
    """Where one request goes on each try and how long to wait before it: first the replica whose turn it is, on
    a failure each replica not yet tried (at once), then, with every replica tried, ``retries`` more rounds
    after a backoff."""

    def __init__(self, client: _Base) -> None:
        self.client = client
        self.index = client._pick(())
        self.tried = {self.index}
        self.rounds = 0

    def after(self, exc: LossdError) -> float:
        """The wait before the next try, which goes to ``self.index``; raises ``exc`` when no try is left."""
        c = self.client
        if isinstance(exc, UnavailableError) and len(c._endpoints) > 1:
            c._down[self.index] = time.monotonic() + DOWN_SECONDS
        nxt = c._pick(self.tried)
        if nxt is not None:
            self.index = nxt
            self.tried.add(nxt)
            return 0.0
        if self.rounds >= c.retries:
            raise exc
        wait = _delay(exc, self.rounds, c.backoff)
        self.rounds += 1
        self.index = c._pick(())
        self.tried = {self.index}
        return wait


# --------------------------------------------------------------------------------------------- shared
def _check_options(url: Any, **numbers: Any) -> None:
    """The constructor's arguments, refused at once (they failed at the first call, with socket errors, or were
    taken as they were: a negative retry count, a zero request size)."""
    if not isinstance(url, str) and not (isinstance(url, Sequence) and url and all(isinstance(u, str) for u in url)):
        raise TypeError(f"url must be a string (one URL or several, comma-separated) or a list of strings, got "
                        f"{type(url).__name__} {url!r:.60}")
    for name, value in numbers.items():
        integer = name in ("retries", "max_request_bytes")
        ok = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
        if not ok or isinstance(value, bool):
            raise TypeError(f"{name} must be {'a whole number' if integer else 'a number of seconds'}, got "
                            f"{type(value).__name__} {value!r:.60}")
        low_ok = value >= 0 if name in ("retries", "backoff") else value > 0
        if not (low_ok and math.isfinite(value)):
            bound = ">= 0" if name in ("retries", "backoff") else "> 0"
            raise ValueError(f"{name} must be finite and {bound}, got {value!r}")


class _Base:
    _transports: dict = {}

    def __init__(self, url: str | Sequence[str], *, timeout: float = 60.0, retries: int = 3, backoff: float = 0.2,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, api_key: str | None = None,
                 ca_cert: str | None = None, tls: bool = False, shared_memory: bool = True,
                 connect_timeout: float = 10.0) -> None:
        """url: one endpoint, several (a list or a comma-separated string), or ``dns:///host:port`` (gRPC
        round_robin over every address of the name); api_key: sent as x-api-key; ca_cert: a PEM file to trust for
        https://, grpcs:// and TLS dns:/// targets (a private CA); tls: TLS for dns:/// targets;
        shared_memory: with one endpoint on this host (a loopback URL), large loss calls pass their tensors
        through POSIX shared memory instead of the socket (Triton's system shared-memory extension), falling back
        to the wire when the server cannot share memory with this process (or loses the region twice in one call);
        timeout: seconds to wait for each request's answer once connected (not retried when it passes);
        connect_timeout: seconds to reach a replica (TCP, TLS and HTTP/2 handshakes; retried when it passes)."""
        _check_options(url, timeout=timeout, connect_timeout=connect_timeout, retries=retries, backoff=backoff,
                       max_request_bytes=max_request_bytes)
        ep = parse_endpoints(url, tls=tls or False)
        self.transport = ep.kind
        self.timeout, self.retries, self.backoff, self.max_request_bytes = timeout, retries, backoff, max_request_bytes
        self.connect_timeout = connect_timeout
        opts = _Options(timeout, api_key, ca_cert, ep.tls, connect_timeout)
        self._endpoints = [self._transports[ep.kind](t, opts) for t in ep.targets]
        self._wire = self._endpoints[0].wire
        self._turn = itertools.count()
        self._down: dict[int, float] = {}
        self._weighted: frozenset | None = None
        self._in_flight = MAX_IN_FLIGHT * len(self._endpoints)
        local = len(ep.targets) == 1 and not ep.targets[0].startswith("dns:") and is_loopback_url(ep.targets[0])
        path = ShmPath if self._transports is SYNC else AsyncShmPath
        self._shm = path(self._endpoints[0]) if shared_memory and local else None
        self._closed = False

    def _check_open(self) -> None:
        """A call after close() is refused before anything is built or sent (the transports' own errors for a
        closed channel differ, and a pooled HTTP connection would even open again)."""
        if self._closed:
            raise ClientClosedError()

    @property
    def shared_memory_calls(self) -> int:
        """How many loss calls went through shared memory (0 when the path is off or never taken)."""
        return self._shm.calls if self._shm is not None else 0

    def shared_inputs(self, pred_shape: Any, target_shape: Any = None, *, dtype: Any = "float32",
                      target_dtype: Any = None, weights: bool = False) -> SharedInputs:
        """Arrays to fill with loss() inputs (``.pred``, ``.target``, ``.weights`` when asked for) that lie in
        shared memory with the server when this client uses shared memory: a loss() call on them, or on a
        contiguous part such as ``pred[:k]``, then copies and sends no tensor bytes (the server reads them in
        place). Otherwise they are ordinary arrays (``.shared`` says which). ``pred_shape``: e.g. (n, 4), or n for
        n boxes; ``target_shape``: pred's unless given (e.g. (n,) with target_dtype="int64" for class labels);
        ``dtype``: float32 or float64. Close it (or the client) to unregister its region."""
        self._check_open()
        path = self._shm if self._shm is not None and self._shm.enabled else None
        return SharedInputs(path, pred_shape, target_shape, dtype=dtype, target_dtype=target_dtype,
                            weights=weights)

    @property
    def endpoints(self) -> list[str]:
        return [e.target for e in self._endpoints]

    def _pick(self, tried) -> int | None:
        """The next replica in turn that is up and not in ``tried``; with none up, any not tried; None when every
        replica has been tried."""
        n, now = len(self._endpoints), time.monotonic()
        start = next(self._turn)
        order = [(start + k) % n for k in range(n)]
        fresh = [i for i in order if i not in tried]
        up = [i for i in fresh if self._down.get(i, 0.0) <= now]
        return (up or fresh or [None])[0]

    def _loss_plan(self, *args) -> tuple[Call, list[tuple[int, Call]]]:
        call = _prepare(*args)
        return call, _plan(call, self.max_request_bytes)

    def _metric_plan(self, name, boxes1, boxes2, box_format, pairwise, params) -> tuple[Callable, list]:
        _check_args(name=name, box_format=box_format, pairwise=pairwise, params=params)
        a, b = _numbers(boxes1, "boxes1"), _numbers(boxes2, "boxes2")
        if not pairwise:
            _same_rows(("boxes1", a), ("boxes2", b))  # row against row: boxes2 is cut as boxes1 is
        pairwise = bool(pairwise)  # np.True_ too (JSON has no numpy bools)
        build = lambda s: self._wire.metric(name, a[s], b if pairwise else b[s], box_format, pairwise, params)  # noqa: E731
        return build, [(s.start, s) for s in _metric_slices(a, b, pairwise, self.max_request_bytes)]

    def _stream_plan(self, calls: list[dict]) -> tuple[Callable, list]:
        prepared = []
        for i, c in enumerate(calls):
            if not isinstance(c, Mapping):
                raise _invalid(f"calls[{i}]", f"must be a dict of loss()'s arguments, got {type(c).__name__}")
            faults = [f"needs {k}" for k in ("name", "pred", "target") if k not in c]
            faults += [f"unknown argument {k!r:.40}" for k in c if k not in _PREPARE_ARGS]
            if faults:
                raise _invalid(f"calls[{i}]", "; ".join(faults))
            try:
                prepared.append(_prepare(**c))
            except InvalidInputError as exc:
                raise _invalid(f"calls[{i}].{exc.field}", exc.message) from None
        return self._wire.stream(prepared)


def _parsed(exchange: Exchange, answer: Any, target: str) -> Any:
    """The answer read; one that is not what lossd sends (a 200 page of some other server, a proxy's HTML) is a
    ServerError naming the endpoint, not a JSONDecodeError or KeyError from deep inside."""
    try:
        return exchange.parse(answer)
    except LossdError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ServerError("unreadable_answer", f"the answer from {target} is not a lossd answer "
                          f"({type(exc).__name__}: {str(exc)[:200]}); is the URL a lossd server's root?") from exc


def _needs_catalog(call: Call, parts: list) -> bool:
    return len(parts) > 1 and call.reduction == "mean"


# --------------------------------------------------------------------------------------------- sync
class LossClient(_Base):
    """Synchronous client; ``url`` is ``http://host:8000``, ``grpc://host:50051``, several of them, or a
    ``dns:///`` target (see the module docstring)."""

    _transports = SYNC

    def _run(self, exchange: Exchange) -> Any:
        tries = _Tries(self)
        while True:
            try:
                endpoint = self._endpoints[tries.index]
                return _parsed(exchange, endpoint.send(exchange.request), endpoint.target)
            except RETRYABLE as exc:
                time.sleep(tries.after(exc))

    def _map(self, build: Callable[[Any], Exchange], items: list, starts: list[int] | None = None) -> list:
        """Each item's answer, in order; ``starts``: the first row of each item in the caller's arrays (errors
        about rows name the caller's rows)."""
        starts = starts or [0] * len(items)
        if len(items) <= 1:
            return [_at(s, lambda i=i: self._run(build(i))) for s, i in zip(starts, items)]
        with ThreadPoolExecutor(max_workers=min(self._in_flight, len(items))) as pool:
            return list(pool.map(lambda si: _at(si[0], lambda: self._run(build(si[1]))), zip(starts, items)))

    def _weighted_mean(self) -> frozenset:
        if self._weighted is None:
            try:
                self._weighted = _weighted_from_catalog(self.losses())
            except NotFoundError:
                self._weighted = WEIGHTED_MEAN
        return self._weighted

    def loss(self, name: str, pred: Any, target: Any, *, box_format: str = "xyxy", reduction: str = "none",
             weights: Any = None, params: dict | None = None, return_grad: bool = True) -> LossResult:
        """(loss, grad): per-sample loss [N] (a float when reduced) and d loss / d pred in ``box_format``."""
        self._check_open()
        call, parts = self._loss_plan(name, pred, target, weights, box_format, reduction, params, return_grad)
        if self._shm is not None and self._shm.wants(call):
            # one request, however large: shared memory has no message size (the server's max_rows still holds)
            out = self._shm.evaluate(call)
            if out is not None:
                return _read_only(out)
        if _needs_catalog(call, parts):
            _check_split(call, len(parts), self._weighted_mean())
        starts, calls = zip(*parts)
        return _read_only(_combine(call, self._map(self._wire.evaluate, list(calls), list(starts))))

    def stream(self, calls: list[dict]) -> list[LossResult]:
        """Several loss evaluations in order, each a dict of ``loss()``'s arguments (``name``, ``pred``, ``target``,
        ...). Over gRPC they share one EvaluateStream call (for batch jobs); over HTTP each is its own request.
        The first failing item raises its typed error."""
        self._check_open()
        return _flatten(self._map(*self._stream_plan(calls)))

    def metric(self, name: str, boxes1: Any, boxes2: Any, *, box_format: str = "xyxy", pairwise: bool = False,
               params: dict | None = None) -> np.ndarray:
        """IoU-family values: [N] row against row, or [N, M] with pairwise=True."""
        self._check_open()
        build, parts = self._metric_plan(name, boxes1, boxes2, box_format, pairwise, params)
        out = self._map(build, [s for _, s in parts], [start for start, _ in parts])
        return np.concatenate(out) if len(out) > 1 else out[0]

    def losses(self) -> list[dict]:
        """The catalog: every loss with its kind, parameters (default, min, max, doc) and reference."""
        self._check_open()
        return self._run(self._wire.losses())

    def close(self) -> None:
        """Unregisters and removes the shared-memory regions (arrays still held keep their memory) and closes
        the connections; calls after it raise ClientClosedError. Closing twice is harmless."""
        self._closed = True
        if self._shm is not None:
            self._shm.close()
        for e in self._endpoints:
            e.close()

    def __enter__(self) -> LossClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- async
class AsyncLossClient(_Base):
    """The same API as LossClient, awaitable (httpx.AsyncClient / grpc.aio)."""

    _transports = ASYNC

    async def _run(self, exchange: Exchange) -> Any:
        tries = _Tries(self)
        while True:
            try:
                endpoint = self._endpoints[tries.index]
                return _parsed(exchange, await endpoint.send(exchange.request), endpoint.target)
            except RETRYABLE as exc:
                await asyncio.sleep(tries.after(exc))

    async def _map(self, build: Callable[[Any], Exchange], items: list, starts: list[int] | None = None) -> list:
        gate = asyncio.Semaphore(self._in_flight)
        starts = starts or [0] * len(items)

        async def one(start, item):
            async with gate:
                try:
                    return await self._run(build(item))
                except LossdError as exc:
                    _shift_rows(exc, start)
                    raise

        return list(await asyncio.gather(*(one(s, i) for s, i in zip(starts, items))))

    async def _weighted_mean(self) -> frozenset:
        if self._weighted is None:
            try:
                self._weighted = _weighted_from_catalog(await self.losses())
            except NotFoundError:
                self._weighted = WEIGHTED_MEAN
        return self._weighted

    async def loss(self, name: str, pred: Any, target: Any, *, box_format: str = "xyxy", reduction: str = "none",
                   weights: Any = None, params: dict | None = None, return_grad: bool = True) -> LossResult:
        self._check_open()
        call, parts = self._loss_plan(name, pred, target, weights, box_format, reduction, params, return_grad)
        if self._shm is not None and self._shm.wants(call):
            out = await self._shm.aevaluate(call)
            if out is not None:
                return _read_only(out)
        if _needs_catalog(call, parts):
            _check_split(call, len(parts), await self._weighted_mean())
        starts, calls = zip(*parts)
        return _read_only(_combine(call, await self._map(self._wire.evaluate, list(calls), list(starts))))

    async def stream(self, calls: list[dict]) -> list[LossResult]:
        self._check_open()
        return _flatten(await self._map(*self._stream_plan(calls)))

    async def metric(self, name: str, boxes1: Any, boxes2: Any, *, box_format: str = "xyxy", pairwise: bool = False,
                     params: dict | None = None) -> np.ndarray:
        self._check_open()
        build, parts = self._metric_plan(name, boxes1, boxes2, box_format, pairwise, params)
        out = await self._map(build, [s for _, s in parts], [start for start, _ in parts])
        return np.concatenate(out) if len(out) > 1 else out[0]

    async def losses(self) -> list[dict]:
        self._check_open()
        return await self._run(self._wire.losses())

    async def close(self) -> None:
        self._closed = True
        if self._shm is not None:
            await self._shm.aclose()
        for e in self._endpoints:
            await e.close()

    async def __aenter__(self) -> AsyncLossClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
