"""Dynamic batching: concurrent small requests for the same loss and parameters become one engine call.

Requests queue per key (loss, box format, parameters, dtype, row shape). One worker per key takes everything
queued (up to ``max_rows`` rows), waits at most ``max_delay`` for more when the batch is small, runs the engine
once on the concatenation with reduction "none", and splits the result back: each request gets its rows, then
its own reduction ('sum' adds its rows; 'mean' divides by its row count), exactly what it would have got alone.
While a batch computes, the next one gathers, so under load batches grow by themselves and an idle server adds
no delay (max_delay defaults to 0). A request whose deadline has passed is dropped before compute. If a batched
call fails validation, each request is evaluated alone so that each gets its own answer or error.

Losses whose 'mean' is weighted by the server (cross_entropy, nll) and requests larger than max_rows go
straight to the engine. Keys are built from canonical, validated values (the service layer resolves box_format,
reduction and params against the catalog first), and a key's queue and worker are dropped as soon as its queue
is empty, so the number of keys is bounded by the requests in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .admission import is_out_of_memory
from .engine import Engine, EngineError, Out, Result, get_loss
from .errors import DeadlineExpired, ResourceExhausted


# A fused CPU kernel on this many rows takes ~20 us: less than handing the call to a worker thread and back, so
# such calls run on the event loop itself. Everything else (and everything on a GPU) runs in a thread.
INLINE_MAX_ROWS = 512


@dataclass
class _Item:
    pred: np.ndarray
    target: np.ndarray
    weights: np.ndarray | None
    reduction: str
    deadline: float | None
    future: asyncio.Future
    kwargs: dict = field(default_factory=dict)


def _rows_array(x: Any) -> np.ndarray | None:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy() if x.device.type == "cpu" else None
    try:
        arr = np.asarray(x)
    except ValueError:
        return None
    return arr if arr.dtype.kind in "iuf" and arr.ndim >= 1 else None


class Batcher:
    def __init__(self, engine: Engine, *, enabled: bool = True, max_rows: int = 65536, max_delay: float = 0.0,
                 inline: bool = True) -> None:
        """inline: let small fused CPU calls run on the event loop (never on a GPU)."""
        self.engine = engine
        self.allow_inline = inline
        self.enabled = enabled
        self.max_rows = max_rows
        self.max_delay = max_delay
        self._queues: dict[tuple, deque[_Item]] = {}
        self._workers: dict[tuple, asyncio.Task] = {}
        self.batches = 0
        self.batched_requests = 0

    async def evaluate(self, loss_name: str, pred: Any, target: Any, *, box_format: str = "xyxy",
                       reduction: str = "none", weights: Any = None, params: dict | None = None,
                       return_grad: bool = True, dtype: str | None = None, deadline: float | None = None,
                       out: Out | None = None) -> Result:
        """engine.evaluate, off the event loop, batched with its peers when it can be. ``deadline`` is a
        time.monotonic() value; ``out``: where to write the answer (engine.Out), which keeps the call alone."""
        kwargs = dict(box_format=box_format, params=params, return_grad=return_grad, dtype=dtype)
        key = self._key(loss_name, pred, target, weights, reduction, kwargs) if self.enabled and out is None else None
        if key is None:
            _check_deadline(deadline)
            if out is not None:
                kwargs["out"] = out
            return await self._call(loss_name, pred, target, reduction=reduction, weights=weights, **kwargs)
        p, t = _rows_array(pred), _rows_array(target)
        w = None if weights is None else _rows_array(weights)
        if not self._queues.get(key) and self._inline(loss_name, p) and _idle(self._workers.get(key)):
            # nothing is waiting to share this call and it runs inline: computing now is what a batch of one does
            _check_deadline(deadline)
            return await self._call(loss_name, p, t, reduction=reduction, weights=w, **kwargs)
        fut = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(_Item(p, t, w, reduction, deadline, fut, kwargs))
        if key not in self._workers or self._workers[key].done():
            self._workers[key] = asyncio.create_task(self._drain(key, loss_name))
        return await fut

    async def _call(self, loss_name: str, pred: Any, target: Any, **kwargs) -> Result:
        try:
            if self._inline(loss_name, pred):
                return self.engine.evaluate(loss_name, pred, target, **kwargs)
            return await asyncio.to_thread(self.engine.evaluate, loss_name, pred, target, **kwargs)
        except Exception as exc:
            if is_out_of_memory(exc):
                _release_cuda_cache()
                raise ResourceExhausted(f"the {self.engine.device} device ran out of memory for this request "
                                        f"({_rows(pred)} rows); retry with fewer rows") from None
            raise

    def _inline(self, loss_name: str, pred: Any) -> bool:
        if not self.allow_inline or not self.engine.runs_fused_on_cpu(loss_name):
            return False
        try:
            return len(pred) <= INLINE_MAX_ROWS
        except TypeError:
            return False

    def _key(self, loss_name: str, pred: Any, target: Any, weights: Any, reduction: str, kwargs: dict) -> tuple | None:
        try:
            spec = get_loss(loss_name)
        except EngineError:
            return None
        if spec.mean_weight is not None or reduction not in ("none", "mean", "sum"):
            return None
        p, t = _rows_array(pred), _rows_array(target)
        if p is None or t is None or p.shape[0] != t.shape[0] or p.shape[0] > self.max_rows or p.shape[0] == 0:
            return None
        if weights is not None:
            w = _rows_array(weights)
            if w is None or w.shape != (p.shape[0],):
                return None
        try:
            params = tuple(sorted((k, repr(v)) for k, v in (kwargs["params"] or {}).items()))
        except TypeError:
            return None
        dtype = kwargs["dtype"] or ("float64" if p.dtype == np.float64 else "float32")
        kwargs["dtype"] = dtype
        return (loss_name, kwargs["box_format"], params, kwargs["return_grad"], dtype, p.shape[1:], t.shape[1:],
                t.dtype.kind)

    async def _drain(self, key: tuple, loss_name: str) -> None:
        queue = self._queues[key]
        while queue:
            if self.max_delay > 0 and sum(i.pred.shape[0] for i in queue) < self.max_rows:
                await asyncio.sleep(self.max_delay)
            batch, rows = [], 0
            while queue and rows + queue[0].pred.shape[0] <= self.max_rows:
                item = queue.popleft()
                rows += item.pred.shape[0]
                batch.append(item)
            if not batch:  # cannot happen (items are <= max_rows), but never spin
                batch.append(queue.popleft())
            now = time.monotonic()
            live = []
            for item in batch:
                if item.future.cancelled():
                    continue
                if item.deadline is not None and item.deadline <= now:
                    item.future.set_exception(DeadlineExpired("deadline passed while queued; not computed"))
                else:
                    live.append(item)
            if live:
                await self._run(loss_name, live)
        # the queue is empty and nothing awaits between this check and here: drop the key (bounded state)
        if self._queues.get(key) is queue:
            del self._queues[key]
        if self._workers.get(key) is asyncio.current_task():
            del self._workers[key]

    async def _run(self, loss_name: str, items: list[_Item]) -> None:
        kwargs = items[0].kwargs
        if len(items) == 1:
            item = items[0]
            await self._single(loss_name, item)
            return
        pred = np.concatenate([i.pred for i in items])
        target = np.concatenate([i.target for i in items])
        weights = None
        if any(i.weights is not None for i in items):
            weights = np.concatenate([i.weights if i.weights is not None else np.ones(i.pred.shape[0])
                                      for i in items])
        try:
            out = await self._call(loss_name, pred, target, reduction="none", weights=weights, **kwargs)
        except EngineError:
            for item in items:  # someone's input is bad: everyone gets their own answer
                await self._single(loss_name, item)
            return
        except ResourceExhausted:
            half = len(items) // 2  # out of memory: split the batch and try each half
            await self._run(loss_name, items[:half])
            await self._run(loss_name, items[half:])
            return
        except Exception as exc:  # an internal fault fails the batch, not the server
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self.batches += 1
        self.batched_requests += len(items)
        start = 0
        for item in items:
            n = item.pred.shape[0]
            loss = out.loss[start:start + n]
            grad = None if out.grad is None else out.grad[start:start + n]
            start += n
            if item.reduction == "sum":
                loss = loss.sum()
            elif item.reduction == "mean":
                loss = loss.sum() / n
                grad = None if grad is None else grad / n
            if not item.future.done():
                item.future.set_result(Result(loss, grad, out.dtype))

    async def _single(self, loss_name: str, item: _Item) -> None:
        try:
            out = await self._call(loss_name, item.pred, item.target, reduction=item.reduction, weights=item.weights,
                                   **item.kwargs)
        except Exception as exc:
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if not item.future.done():
            item.future.set_result(out)


def _rows(x: Any) -> int | str:
    try:
        return len(x)
    except TypeError:
        return "?"


def _release_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _idle(worker: asyncio.Task | None) -> bool:
    return worker is None or worker.done()


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and deadline <= time.monotonic():
        raise DeadlineExpired("deadline passed before the work started; not computed")
