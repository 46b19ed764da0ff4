"""The transport-neutral service: what a request means, whichever wire it came on.

REST routes and gRPC servicers decode their wire form into plain values (numpy arrays, dicts, strings), call one
method here, and encode what it returns; errors are raised as EngineError / ServiceError and mapped to statuses
by lossd.errors only. Here, once for every transport:

- names and options are checked against the catalog *before* anything is keyed on them (batcher queues,
  metrics labels, statistics), so client text never becomes server state;
- a request holds an admission slot only while it computes, never while its bytes are still arriving;
- small fused CPU calls run on the event loop, everything else in a thread; big parses go to a thread too;
- a device out-of-memory becomes ResourceExhausted for the one request that hit it;
- pairwise answers are budgeted in bytes before anything is allocated: each against LOSSD_MAX_PAIRWISE_BYTES, and
  all of them together, from compute until the transport has sent the last byte, against
  LOSSD_MAX_ANSWER_BYTES_IN_FLIGHT (``AnswerBudget``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import oip
from .admission import Admission, is_out_of_memory
from .allocator import give_back
from .batching import Batcher
from .engine import LOSSES, METRICS, Engine, EngineError, Result, get_loss, get_metric
from .engine.engine import PAIRWISE_CHUNK_ELEMS, REDUCTIONS
from .engine.inputs import FLOAT_DTYPES, check_box_format
from .errors import TABLE, Overloaded, ResourceExhausted, ServiceError, quote
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
# Pairwise answers up to this cost (bytes) are counted in the answer budget but never wait for room in it.
SMALL_ANSWER_BYTES = 2**20
# Host (or device) bytes a pairwise computation holds beside its answer, per element of the engine's chunk
# (PAIRWISE_CHUNK_ELEMS): its temporaries. Measured as peak RSS during a 3000 x 3000 call minus the answer, the
# largest over the catalog (SIoU): 19.0 values (float32) and 33.2 (float64) per chunk element; IoU takes 8.0.
PAIRWISE_TEMPORARIES = {"float32": 20, "float64": 34}
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


class AnswerBudget:
    """Bytes of big answers alive at once, across requests: a request reserves its answer's cost before it
    computes, shrinks the reservation to what its answer holds once computed, and returns it once the transport
    has sent the answer (a slow reader keeps it). One that does not fit waits, first come first served, up to
    ``wait`` seconds, then gets 429 ``overloaded`` with Retry-After: a burst of legitimate calls is served in turn
    instead of failing, and nothing waits without bound (waiters hold admission slots, so LOSSD_MAX_IN_FLIGHT
    bounds them too). Answers of at most ``small`` bytes are counted but never wait, so an annotation tool's few
    boxes are not queued behind big answers. Runs on the event loop only: no lock."""

    def __init__(self, total: int, wait: float, small: int = SMALL_ANSWER_BYTES,
                 on_idle: Callable[[], None] | None = None, idle_after: int = 0) -> None:
        self.total = total
        self.wait = wait
        self.small = small
        self.used = 0
        # on_idle runs when nothing is held any more after more than idle_after bytes were (a burst is over)
        self.on_idle = on_idle
        self.idle_after = idle_after
        self.peak = 0
        self._waiters: deque[list] = deque()  # [nbytes, future, granted]

    async def reserve(self, nbytes: int) -> Reservation:
        if nbytes <= self.small or (not self._waiters and self.used + nbytes <= self.total):
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            return Reservation(self, nbytes)
        entry = [nbytes, asyncio.get_running_loop().create_future(), False]
        self._waiters.append(entry)
        try:
            await asyncio.wait({entry[1]}, timeout=self.wait)
        finally:
            if not entry[2]:  # timed out or cancelled: leave the queue; whoever is next may fit now
                self._waiters.remove(entry)
                self._grant()
        if not entry[2]:
            raise Overloaded(f"answers of {self.used} bytes are being built or sent and this one needs {nbytes} "
                             f"more, over the budget of {self.total} bytes (LOSSD_MAX_ANSWER_BYTES_IN_FLIGHT); "
                             "retry after 1 s, or ask for fewer pairs", retry_after=1.0)
        return Reservation(self, nbytes)

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.total:
            entry = self._waiters.popleft()
            self.used += entry[0]
            self.peak = max(self.peak, self.used)
            entry[2] = True
            if not entry[1].done():
                entry[1].set_result(None)


class Reservation:
    """A request's share of an AnswerBudget; ``release()`` (idempotent) returns it, ``shrink`` a part of it."""

    def __init__(self, budget: AnswerBudget | None, nbytes: int) -> None:
        self.budget = budget
        self.nbytes = nbytes

    def shrink(self, nbytes: int) -> None:
        if self.budget is not None and nbytes < self.nbytes:
            budget = self.budget
            budget.used -= self.nbytes - nbytes
            self.nbytes = nbytes
            budget._grant()
            if budget.used == 0 and budget.peak > budget.idle_after:
                budget.peak = 0
                if budget.on_idle is not None:
                    budget.on_idle()

    def release(self) -> None:
        self.shrink(0)


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
        keep = settings.malloc_retain_mb * 2**20
        self.answers = AnswerBudget(settings.max_answer_bytes_in_flight, settings.answer_wait_seconds,
                                    on_idle=self._give_back_memory, idle_after=max(keep, 64 * 2**20))

    def _give_back_memory(self) -> None:
        """A burst of big answers is over: what it freed goes back to the kernel (in a thread: it walks the
        heaps), beyond what LOSSD_MALLOC_RETAIN_MB keeps for reuse."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.run_in_executor(None, give_back, self.settings.malloc_retain_mb * 2**20)

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
                     endpoint: str = "v1_metric", answer: Callable | None = None,
                     answer_bytes: Callable[[tuple, str], int] | None = None) -> Any:
        """IoU-family values, [N] or pairwise [N, M]. ``max_bytes``: the transport's own cap on the answer (a gRPC
        message), on top of LOSSD_MAX_PAIRWISE_BYTES. ``answer``: the transport's encoder, awaited as
        ``answer(values, release)`` while the answer's share of LOSSD_MAX_ANSWER_BYTES_IN_FLIGHT is held; it calls
        ``release`` once its bytes are out, and its result is returned (without it, the values are, and the share
        is returned at once). ``answer_bytes(shape, dtype)``: what the encoding holds at once beyond the values."""
        with self.obs.track(endpoint, name) as t:
            spec = get_metric(_name(name, "metric"))
            opts = self.options(spec, box_format, "none", params, dtype)
            n, m = rows_of(boxes1), rows_of(boxes2)
            cost = held = 0
            if pairwise and n is not None and m is not None:
                cost, held = self._check_pairwise(n, m, opts.dtype or _dtype_of(boxes1), max_bytes, answer_bytes)
            call = (lambda: self.engine.metric(spec.name, boxes1, boxes2, box_format=opts.box_format,
                                               pairwise=pairwise, params=opts.params, dtype=opts.dtype))
            with self.admission.admit():
                share = await self.answers.reserve(cost) if cost else Reservation(None, 0)
                try:
                    inline = (self.engine.runs_fused_on_cpu(spec.name) and n is not None and m is not None
                              and (n * m if pairwise else max(n, m)) <= INLINE_MAX_METRIC_VALUES)
                    try:
                        values = call() if inline else await asyncio.to_thread(call)
                    except RuntimeError as exc:
                        if not is_out_of_memory(exc):
                            raise
                        raise ResourceExhausted(f"the {self.engine.device} device ran out of memory; ask for "
                                                "fewer pairs") from None
                    t.batch_size = int(values.numel())
                    if answer is None:
                        return values.numpy()
                    share.shrink(held)  # the temporaries are gone; the answer is held until sent
                    return await answer(values.numpy(), share.release)
                except BaseException:
                    share.release()
                    raise
                finally:
                    if answer is None:
                        share.release()

    def _check_pairwise(self, n: int, m: int, dtype: str, max_bytes: int | None,
                        answer_bytes: Callable[[tuple, str], int] | None = None) -> tuple[int, int]:
        """(bytes while computing, bytes held until sent): the values and the engine's temporaries, then the
        values and what the transport's encoding holds at once; too_large when one request alone is over a
        budget."""
        itemsize = 8 if dtype == "float64" else 4
        budget = self.settings.max_pairwise_bytes
        if max_bytes is not None:
            budget = min(budget, max_bytes)
        if n * m * itemsize > budget:
            raise EngineError("too_large", f"pairwise {n} x {m} = {n * m} values ({n * m * itemsize} bytes as "
                              f"{dtype}) exceeds this server's budget of {budget} bytes "
                              "(LOSSD_MAX_PAIRWISE_BYTES, and the gRPC message cap); split boxes1",
                              field="boxes2")
        held = n * m * itemsize + (answer_bytes((n, m), dtype) if answer_bytes is not None else 0)
        chunk = min(n, max(1, PAIRWISE_CHUNK_ELEMS // max(m, 1))) * m
        cost = n * m * itemsize + chunk * itemsize * PAIRWISE_TEMPORARIES.get(dtype, 34)
        cost = max(cost, held)
        if cost > self.answers.total:
            raise EngineError("too_large", f"pairwise {n} x {m} = {n * m} values needs {cost} bytes to compute "
                              f"as {dtype}, over this server's budget of {self.answers.total} bytes for answers "
                              "at once (LOSSD_MAX_ANSWER_BYTES_IN_FLIGHT); split boxes1", field="boxes2")
        return cost, held

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
            # outputs in a mapped region are computed where they go: nothing to copy afterwards
            target = oip.shm_targets(call) if shm is not None else None
            with self.admission.admit():
                out = await self.batcher.evaluate(name, kw["pred"], kw["target"], box_format=opts.box_format,
                                                  reduction=opts.reduction, weights=kw["weights"],
                                                  params=opts.params, return_grad=kw["return_grad"],
                                                  dtype=opts.dtype, deadline=deadline, out=target)
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

