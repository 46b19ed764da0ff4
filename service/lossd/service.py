"""The transport-neutral service: what a request means, whichever wire it came on.

REST routes and gRPC servicers decode their wire form into plain values (numpy arrays, dicts, strings), call one
method here, and encode what it returns; errors are raised as EngineError / ServiceError and mapped to statuses
by lossd.errors only. Here, once for every transport:

- names and options are checked against the catalog *before* anything is keyed on them (batcher queues,
  metrics labels, statistics), so client text never becomes server state;
- a request holds an admission slot only while it computes, never while its bytes are still arriving;
- small fused CPU calls run on the event loop, everything else in a thread; big parses go to a thread too;
- a device out-of-memory becomes ResourceExhausted for the one request that hit it;
- pairwise answers are budgeted in bytes before anything is allocated.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import oip
from .admission import Admission, is_out_of_memory
from .batching import Batcher
from .engine import LOSSES, METRICS, Engine, EngineError, Result, get_loss, get_metric
from .engine.engine import REDUCTIONS
from .engine.inputs import FLOAT_DTYPES, check_box_format
from .errors import TABLE, ResourceExhausted, ServiceError, quote
from .settings import Settings
from .shm import SharedMemory, is_local, not_local

# An annotation tool's few boxes: a fused metric on up to this many values (pairwise n x m) takes ~30 us, less
# than a thread hop; such calls run on the event loop.
INLINE_MAX_METRIC_VALUES = 1024
# Request bodies (or header JSON) above this size are parsed in a thread so health and gRPC stay responsive.
INLINE_PARSE_BYTES = 256 * 1024
# Outputs of up to this many bytes are written into shared memory on the event loop (a copy of a few ms):
# handing them to a thread costs a scheduling round trip, more than the copy on a busy machine.
INLINE_SHM_WRITE_BYTES = 32 * 2**20
UNKNOWN = "unknown"  # the one metrics label for every name that is not in the catalog
MODEL_ENDPOINTS = frozenset({"v1_loss", "v2_infer", "grpc_evaluate", "grpc_infer", "grpc_stream"})

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)


def rows_of(x: Any) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


class Tracker:
    def __init__(self) -> None:
        self.batch_size: int | None = None


@dataclass
class ModelStats:
    """Per-model counts and times, as Triton's statistics extension reports them (nanoseconds)."""

    inference_count: int = 0
    execution_count: int = 0
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0


class Observability:
    """Prometheus metrics (one registry per service, so several apps in a test never collide) and per-model
    statistics. Labels come from the catalog only: an unknown name counts under 'unknown'."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lossd_requests_total", "Requests by endpoint, loss/metric and outcome",
                                ["endpoint", "name", "outcome"], registry=self.registry)
        self.latency = Histogram("lossd_request_duration_seconds", "Handler latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("lossd_batch_size", "Rows per request", ["endpoint"], buckets=BATCH_BUCKETS,
                               registry=self.registry)
        self.in_flight = Gauge("lossd_in_flight_requests", "Requests being handled", registry=self.registry)
        self.models: dict[str, ModelStats] = {name: ModelStats() for name in LOSSES}
        self._child_cache: dict[tuple, tuple] = {}

    @staticmethod
    def label(name: Any) -> str:
        return name if isinstance(name, str) and (name in LOSSES or name in METRICS) else UNKNOWN

    def _children(self, endpoint: str, label: str, outcome: str) -> tuple:
        """The metric children for one (endpoint, name, outcome): looked up once (labels() takes a lock and
        builds a key per call; a few microseconds a request). Keys are canonical, so the cache is bounded."""
        key = (endpoint, label, outcome)
        children = self._child_cache.get(key)
        if children is None:
            children = (self.requests.labels(endpoint, label, outcome), self.latency.labels(endpoint),
                        self.batch.labels(endpoint))
            self._child_cache[key] = children
        return children

    @contextmanager
    def track(self, endpoint: str, name: Any) -> Iterator[Tracker]:
        tracker = Tracker()
        label = self.label(name)
        outcome = "ok"
        self.in_flight.inc()
        t0 = time.perf_counter_ns()
        try:
            yield tracker
        except BaseException as exc:
            outcome = getattr(exc, "code", "error")
            outcome = outcome if isinstance(outcome, str) and outcome in TABLE else "error"  # a bounded label
            raise
        finally:
            elapsed = time.perf_counter_ns() - t0
            self.in_flight.dec()
            requests, latency, batch = self._children(endpoint, label, outcome)
            latency.observe(elapsed / 1e9)
            requests.inc()
            if tracker.batch_size is not None:
                batch.observe(tracker.batch_size)
            stats = self.models.get(label) if endpoint in MODEL_ENDPOINTS else None
            if stats is not None:
                if outcome == "ok":
                    stats.success_count += 1
                    stats.success_ns += elapsed
                    stats.execution_count += 1
                    stats.inference_count += tracker.batch_size or 0
                    stats.last_inference_ms = int(time.time() * 1000)
                else:
                    stats.fail_count += 1
                    stats.fail_ns += elapsed


@dataclass(frozen=True)
class Options:
    """A loss or metric call's options, canonical: checked against the catalog, params coerced to their types."""

    box_format: str
    reduction: str
    params: dict = field(default_factory=dict)
    dtype: str | None = None


class Service:
    """One per server process, shared by REST and gRPC."""

    def __init__(self, engine: Engine, settings: Settings, *, admission: Admission | None = None,
                 obs: Observability | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.admission = admission or Admission(settings.max_in_flight)
        self.batcher = Batcher(engine, enabled=settings.batching, max_rows=settings.batch_max_rows,
                               max_delay=settings.batch_max_delay_ms / 1000, inline=settings.batch_inline)
        self.obs = obs or Observability()
        self.shm = SharedMemory(settings.max_shm_regions)

    # ------------------------------------------------------------------------------------------------ catalog
    def catalog(self) -> dict:
        return {"losses": self.engine.losses(), "metrics": self.engine.metrics()}

    @staticmethod
    def describe_loss(name: Any) -> dict:
        return get_loss(_name(name, "loss")).describe()

    @staticmethod
    def known(kind: str, name: Any) -> None:
        """Raises unknown_loss / unknown_metric for a name not in the catalog (before a body is read)."""
        (get_loss if kind == "loss" else get_metric)(_name(name, kind))

    # ------------------------------------------------------------------------------------------------ options
    @staticmethod
    def options(spec, box_format: Any = "xyxy", reduction: Any = "none", params: Any = None,
                dtype: Any = None) -> Options:
        """Everything a call is keyed on, validated and canonical (errors quote client text shortened)."""
        if not isinstance(box_format, str) or len(box_format) > 16:
            raise EngineError("unknown_format", f"box_format must be one of ['xyxy', 'xywh', 'cxcywh'], got "
                              f"{quote(box_format)}", field="box_format")
        check_box_format(box_format)
        if not isinstance(reduction, str) or reduction not in REDUCTIONS:
            raise EngineError("unknown_reduction", f"reduction must be one of {list(REDUCTIONS)}, got "
                              f"{quote(reduction)}", field="reduction")
        if dtype is not None and (not isinstance(dtype, str) or dtype not in FLOAT_DTYPES):
            raise EngineError("unknown_dtype", f"dtype must be float32 or float64, got {quote(dtype)}",
                              field="dtype")
        if params is not None and not isinstance(params, Mapping):
            raise ServiceError(f"params must be an object, got {quote(params)}", field="params")
        canonical = spec.canonical(params)
        return Options(box_format, reduction, canonical, dtype)

    # ----------------------------------------------------------------------------------------------- evaluate
    async def evaluate(self, name: Any, pred: Any, target: Any, *, box_format: Any = "xyxy",
                       reduction: Any = "none", weights: Any = None, params: Any = None, return_grad: bool = True,
                       dtype: Any = None, deadline: float | None = None, endpoint: str = "v1_loss",
                       in_stream: bool = False) -> Result:
        """One loss over a batch. ``deadline``: a time.monotonic() value after which unstarted work is dropped.
        ``in_stream``: an item of an open stream, which a drain lets finish."""
        with self.obs.track(endpoint, name) as t:
            spec = get_loss(_name(name, "loss"))
            opts = self.options(spec, box_format, reduction, params, dtype)
            with self.admission.admit(in_flight_stream=in_stream):
                out = await self.batcher.evaluate(spec.name, pred, target, box_format=opts.box_format,
                                                  reduction=opts.reduction, weights=weights, params=opts.params,
                                                  return_grad=return_grad, dtype=opts.dtype, deadline=deadline)
            t.batch_size = rows_of(pred) if out.grad is None else int(out.grad.shape[0])
            return out

    # ------------------------------------------------------------------------------------------------- metric
    async def metric(self, name: Any, boxes1: Any, boxes2: Any, *, box_format: Any = "xyxy",
                     pairwise: bool = False, params: Any = None, dtype: Any = None, max_bytes: int | None = None,
                     endpoint: str = "v1_metric") -> np.ndarray:
        """IoU-family values, [N] or pairwise [N, M]. ``max_bytes``: the transport's own cap on the answer (a gRPC
        message), on top of LOSSD_MAX_PAIRWISE_BYTES."""
        with self.obs.track(endpoint, name) as t:
            spec = get_metric(_name(name, "metric"))
            opts = self.options(spec, box_format, "none", params, dtype)
            n, m = rows_of(boxes1), rows_of(boxes2)
            if pairwise and n is not None and m is not None:
                self._check_pairwise(n, m, opts.dtype or _dtype_of(boxes1), max_bytes)
            call = (lambda: self.engine.metric(spec.name, boxes1, boxes2, box_format=opts.box_format,
                                               pairwise=pairwise, params=opts.params, dtype=opts.dtype))
            with self.admission.admit():
                inline = (self.engine.runs_fused_on_cpu(spec.name) and n is not None and m is not None
                          and (n * m if pairwise else max(n, m)) <= INLINE_MAX_METRIC_VALUES)
                try:
                    values = call() if inline else await asyncio.to_thread(call)
                except RuntimeError as exc:
                    if not is_out_of_memory(exc):
                        raise
                    raise ResourceExhausted(f"the {self.engine.device} device ran out of memory; ask for fewer "
                                            "pairs") from None
            t.batch_size = int(values.numel())
            return values.numpy()

    def _check_pairwise(self, n: int, m: int, dtype: str, max_bytes: int | None) -> None:
        itemsize = 8 if dtype == "float64" else 4
        budget = self.settings.max_pairwise_bytes
        if max_bytes is not None:
            budget = min(budget, max_bytes)
        if n * m * itemsize > budget:
            raise EngineError("too_large", f"pairwise {n} x {m} = {n * m} values ({n * m * itemsize} bytes as "
                              f"{dtype}) exceeds this server's budget of {budget} bytes "
                              "(LOSSD_MAX_PAIRWISE_BYTES, and the gRPC message cap); split boxes1",
                              field="boxes2")

    # -------------------------------------------------------------------------------------------------- OIP
    async def infer(self, model: Any, request: Callable[[], tuple[dict, memoryview]], *, size: int,
                    deadline: float | None = None, endpoint: str = "v2_infer",
                    peer: str | None = "remote") -> tuple[dict, list[memoryview]]:
        """An Open Inference Protocol request -> the response's JSON form and its binary outputs (views).
        ``request`` parses the transport's framing into the protocol's JSON form plus the binary inputs in order;
        it runs with the checks in a thread when ``size`` (bytes) is large. ``peer``: the client's address
        (None: a unix socket); only local clients may name shared-memory regions."""
        with self.obs.track(endpoint, model) as t, \
                (self.shm.call() if is_local(peer) else nullcontext()) as shm:
            name = _name(model, "loss")
            spec = get_loss(name)
            call = await self.parse(lambda: oip.prepare_infer(name, *request(), shm=shm), size=size)
            if call.shm_inputs:  # big reads out of shared memory leave the event loop
                await self.parse(oip.read_shm_inputs, call, size=oip.shm_input_bytes(call))
            kw = call.kwargs
            opts = self.options(spec, kw["box_format"], kw["reduction"], kw["params"], kw["dtype"])
            with self.admission.admit():
                out = await self.batcher.evaluate(name, kw["pred"], kw["target"], box_format=opts.box_format,
                                                  reduction=opts.reduction, weights=kw["weights"],
                                                  params=opts.params, return_grad=kw["return_grad"],
                                                  dtype=opts.dtype, deadline=deadline)
            t.batch_size = rows_of(kw["pred"])
            # outputs written into shared memory are copied in a thread when big
            size = oip.shm_output_bytes(call, out)
            return await self.parse(oip.finish_infer, call, out, size=0 if size <= INLINE_SHM_WRITE_BYTES else size)

    def model_metadata(self, name: Any, version: Any = "1") -> dict:
        oip.check_version(_name(name, "loss"), version)
        return oip.model_metadata(name)

    def model_ready(self, name: Any, version: Any = "1") -> None:
        oip.check_version(_name(name, "loss"), version)

    def model_config(self, name: Any, version: Any = "1") -> dict:
        oip.check_version(_name(name, "loss"), version)
        return oip.model_config(name)

    def model_statistics(self, name: Any = "", version: Any = "") -> list[dict]:
        """Triton's statistics extension: every model, or one."""
        if name:
            oip.check_version(_name(name, "loss"), version or "1")
            names = [name]
        else:
            names = sorted(LOSSES)
        return [oip.model_statistics(n, self.obs.models[n]) for n in names]

    # ------------------------------------------------------------------------------- system shared memory
    def shm_register(self, peer: str | None, name: Any, key: Any, offset: Any = 0, byte_size: Any = 0) -> None:
        if not is_local(peer):
            raise not_local()
        self.shm.register(name, key, offset, byte_size)

    def shm_unregister(self, peer: str | None, name: Any = "") -> None:
        if not is_local(peer):
            raise not_local()
        self.shm.unregister(name)

    def shm_status(self, peer: str | None, name: Any = "") -> list[dict]:
        if not is_local(peer):
            raise not_local()
        return self.shm.status(name)

    @staticmethod
    def repository_index() -> list[dict]:
        return [{"name": n, "version": "1", "state": "READY", "reason": ""} for n in sorted(LOSSES)]

    # ------------------------------------------------------------------------------------------------ helpers
    async def parse(self, fn: Callable, *args: Any, size: int) -> Any:
        """Run a parser of client bytes: inline when small, in a thread when big (the event loop also serves
        health and gRPC)."""
        if size <= INLINE_PARSE_BYTES:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)


def _name(name: Any, kind: str) -> str:
    """A catalog name from the client, checked before it is used anywhere."""
    if not isinstance(name, str) or len(name) > 64:
        plural = "losses" if kind == "loss" else "metrics"
        raise EngineError(f"unknown_{kind}", f"no {kind} named {quote(name)}; the catalog lists the {plural} "
                          f"(GET /v1/{plural}, gRPC ListLosses)", field=kind)
    return name


def _dtype_of(x: Any) -> str:
    return "float64" if str(getattr(x, "dtype", "")) in ("float64", "torch.float64") else "float32"

