"""Fast routes to the reference values, chosen per call; the engine falls back to the reference (autograd) path
whenever a fast route does not apply or the input needs an error message.

- CPU: the numba kernels in fused.py (one pass, analytic gradients, validation in the same pass).
- CUDA: the reference loss compiled with torch.compile over torch.func.grad_and_value (one fused Triton
  kernel per loss instead of ~30 launches plus an autograd graph).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from . import fused
from ._utils import overflow_bound
from .registry import LOSSES, METRICS, Spec

log = logging.getLogger("lossd.engine")

NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def _no_args(params: Mapping[str, Any]) -> tuple[int, float, float, float]:
    return 0, 0.0, 0.0, 0.0


@dataclass(frozen=True)
class BoxKernel:
    """A box loss's fused route, declared where the loss is registered: its kind (fused.IOU, ...) and
    args(resolved params) -> (mode, p1, p2, p3) as fused.box_loss_grad reads them, or None where a parameter value
    has no fused route (the reference computes it). eps is passed on its own."""

    kind: int
    args: Callable[[Mapping[str, Any]], tuple[int, float, float, float] | None] = _no_args


@dataclass(frozen=True)
class CoordKernel:
    """A coordinate regression loss's fused route: its kind (fused.L1, ...) and the parameter, if any, passed as the
    kernel's beta (smooth_l1's beta, huber's delta)."""

    kind: int
    beta: str | None = None


class _Declared:
    """The names of catalog entries that declare a fused kernel: a live view of the catalog, not a second table."""

    def __init__(self, table: Mapping[str, Spec]) -> None:
        self._table = table

    def __contains__(self, name: object) -> bool:
        spec = self._table.get(name) if isinstance(name, str) else None
        return spec is not None and spec.kernel is not None

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(n for n, s in self._table.items() if s.kernel is not None))

    def __len__(self) -> int:
        return sum(1 for _ in self)


FUSED_LOSSES = _Declared(LOSSES)
METRIC_KINDS = _Declared(METRICS)


def _all_finite(a: np.ndarray) -> bool:
    """One reduction instead of an elementwise test: a NaN or inf anywhere makes the sum non-finite (so can an
    overflowing sum of finite values; then the reference re-checks row by row)."""
    return bool(np.isfinite(a.sum()))


def _zero_eps_nan(kwargs: dict, *arrays: np.ndarray) -> bool:
    """Non-finite results that are the documented eps = 0 division by zero (kept as NaN), not an overflow."""
    if kwargs.get("eps", None) != 0:
        return False
    top = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    return top <= overflow_bound(float(np.finfo(arrays[0].dtype).max))


def _as_np(x: Any, dtype: np.dtype) -> np.ndarray | None:
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu" or x.is_complex():
            return None
        x = x.detach().numpy() if x.dtype not in (torch.float16, torch.bfloat16) else x.detach().float().numpy()
    try:
        arr = np.asarray(x)
    except ValueError:
        return None
    if arr.dtype.kind not in "iuf":
        return None
    with np.errstate(over="ignore"):  # values past float32's range become inf here, refused by name later
        return np.ascontiguousarray(arr, dtype=dtype)


def cpu_evaluate(spec: Spec, pred: Any, target: Any, box_format: str, reduction: str, weights: Any, kwargs: dict,
                 return_grad: bool, cdtype: torch.dtype, out=None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(loss, grad) from a fused kernel, or None: then the reference path computes (or names the error).
    ``out``: an engine.Out (checked) the kernel writes into when its shapes fit the call."""
    kernel = spec.kernel
    if kernel is None:
        return None
    dt = NP_DTYPE[cdtype]
    p = _as_np(pred, dt)
    t = _as_np(target, dt)
    if p is None or t is None:
        return None
    if weights is None:
        w = np.empty(0, dtype=dt)
    else:
        w = _as_np(weights, dt)
        if w is None or w.ndim != 1 or w.shape[0] != p.shape[0] or not (np.isfinite(w).all() and (w >= 0).all()):
            return None
    box = isinstance(kernel, BoxKernel)
    if box:
        if p.ndim == 1 and p.shape[0] == 0:
            p = p.reshape(0, 4)
        if t.ndim == 1 and t.shape[0] == 0:
            t = t.reshape(0, 4)
        if p.ndim != 2 or p.shape[1] != 4 or t.shape != p.shape:
            return None
        args = kernel.args(kwargs)
        if args is None:
            return None
        view = p
    else:
        if p.ndim not in (1, 2) or t.shape != p.shape:
            return None
        view = p.reshape(p.shape[0], int(np.prod(p.shape[1:])))
        t = t.reshape(view.shape)
    n = view.shape[0]
    scale = 1.0 / n if reduction == "mean" and n else 1.0
    loss = grad = None
    if out is not None and out.loss.shape == (n,):
        loss = out.loss
        if return_grad and out.grad is not None and out.grad.shape == p.shape:
            grad = out.grad.reshape(view.shape)  # a view: out.grad is C-contiguous
    if loss is None:
        loss = np.empty(n, dtype=dt)
    if grad is None:
        grad = np.empty(view.shape, dtype=dt) if return_grad else np.empty((0, view.shape[1]), dtype=dt)
    if box:
        run = fused.box_kernel_parallel if n >= fused.PARALLEL_MIN_ROWS else fused.box_kernel
        mode, p1, p2, p3 = args
        status = run(kernel.kind, mode, fused.FORMATS[box_format], view, t, w, scale, float(kwargs.get("eps", 0.0)),
                     float(p1), float(p2), float(p3), loss, grad, return_grad)
    else:
        run = fused.coord_kernel_parallel if n >= fused.PARALLEL_MIN_ROWS else fused.coord_kernel
        beta = float(kwargs[kernel.beta]) if kernel.beta else 0.0
        status = run(kernel.kind, view, t, w, scale, beta, loss, grad, return_grad)
    if status != fused.OK:
        return None  # the reference names the bad rows
    if not (_all_finite(loss) and (not return_grad or _all_finite(grad))) and not _zero_eps_nan(kwargs, p, t):
        return None  # an overflow: the reference refuses it, naming the rows (Engine.evaluate)
    loss_t = torch.from_numpy(loss)
    if reduction == "sum":
        loss_t = loss_t.sum()
    elif reduction == "mean":
        loss_t = loss_t.sum() / n if n else loss_t.sum() * 0.0
    grad_t = torch.from_numpy(grad.reshape(p.shape)) if return_grad else None
    return loss_t, grad_t


METRIC_MAX_VALUES = 1 << 16  # past this the reference (vectorised over both cores) is as fast as a serial loop


def cpu_metric(name: str, boxes1: Any, boxes2: Any, box_format: str, pairwise: bool, kwargs: dict,
               cdtype: torch.dtype, max_pairwise: int) -> torch.Tensor | None:
    """An IoU-family metric from the fused kernel, or None: then the reference computes it (or names the
    error, the pairwise budget's included)."""
    spec = METRICS.get(name)
    kind = None if spec is None else spec.kernel
    if kind is None:
        return None
    dt = NP_DTYPE[cdtype]
    a = _as_np(boxes1, dt)
    b = _as_np(boxes2, dt)
    if a is None or b is None:
        return None
    a = a.reshape(0, 4) if a.ndim == 1 and a.shape[0] == 0 else a
    b = b.reshape(0, 4) if b.ndim == 1 and b.shape[0] == 0 else b
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != 4 or b.shape[1] != 4:
        return None
    n, m = a.shape[0], b.shape[0]
    if not pairwise and n != m:
        return None
    if (n * m if pairwise else n) > min(METRIC_MAX_VALUES, max_pairwise if pairwise else METRIC_MAX_VALUES):
        return None
    out = np.empty((n, m if pairwise else 1), dtype=dt)
    status = fused.metric_kernel(kind, fused.FORMATS[box_format], a, b, float(kwargs.get("eps", 0.0)),
                                 float(kwargs.get("theta", 4.0)), pairwise, out)
    if status != fused.OK or not (_all_finite(out) or _zero_eps_nan(kwargs, a, b)):
        return None
    return torch.from_numpy(out if pairwise else out.reshape(n))


def warm_cpu_kernels() -> None:
    """Compile (or load from numba's cache) every kernel specialisation the fast path calls."""
    for dt in (np.float32, np.float64):
        for rows, box_k, coord_k in ((1, fused.box_kernel, fused.coord_kernel),
                                     (2, fused.box_kernel_parallel, fused.coord_kernel_parallel)):
            p = np.tile(np.array([[0, 0, 2, 2]], dtype=dt), (rows, 1))
            w = np.ones(rows, dtype=dt)
            for weights in (w, w[:0]):
                for want in (True, False):
                    box_k(fused.CIOU, 0, 0, p, p, weights, 1.0, 1e-7, 0.0, 0.0, 0.0, np.empty(rows, dt),
                          np.empty((rows, 4), dt), want)
                    coord_k(fused.L1, p, p, weights, 1.0, 1.0, np.empty(rows, dt), np.empty((rows, 4), dt), want)
        for pairwise in (False, True):
            fused.metric_kernel(fused.CIOU, 0, p, p, 1e-7, 4.0, pairwise, np.empty((rows, rows), dt))


# ---------------------------------------------------------------------------------------------------------------
# compiled reference (the CUDA route; also runs on CPU, where the tests check it against the reference)

MAX_COMPILED = 64  # (loss, format, parameters, device, dtype) graphs kept; past that, calls take the reference
BACKEND = "inductor"  # torch.compile's backend (the tests use a quicker one to check tracing alone)
_COMPILED: dict[tuple, Callable | None] = {}  # None: the loss could not be compiled whole; it takes the reference


def _compile(spec: Spec, kwargs: dict, to_fn: Callable, tag: str) -> Callable:
    def per_sample(p: torch.Tensor, t: torch.Tensor):
        loss = spec.fn(to_fn(p), t, **kwargs)
        return loss.sum(), loss

    grad_and_value = torch.func.grad_and_value(per_sample, has_aux=True)

    def entry(p: torch.Tensor, t: torch.Tensor):
        return grad_and_value(p, t)

    # dynamo keeps compiled graphs per code object, at most recompile_limit (8) of them, and every closure of one
    # function shares its code object: the ninth (loss, format, parameters) would silently run eagerly. A code
    # object of its own per key keeps each cache to its one graph.
    own = types.FunctionType(entry.__code__.replace(co_name=f"lossd_compiled_{tag}"), entry.__globals__,
                             entry.__name__, entry.__defaults__, entry.__closure__)
    # fullgraph: a graph break would split the one fused graph into pieces run eagerly in between
    return torch.compile(own, backend=BACKEND, dynamic=True, fullgraph=True)


def compiled_evaluate(spec: Spec, pred: torch.Tensor, target: torch.Tensor, box_format: str, kwargs: dict,
                      to_fn: Callable) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sample loss and d(sum of loss)/d pred, through one compiled graph of the reference function; None
    where the caller should take the reference instead (a loss that cannot be compiled whole, or too many
    distinct graphs already)."""
    key = (spec.name, box_format, tuple(sorted((k, str(v)) for k, v in kwargs.items())), pred.device.type,
           pred.dtype)
    if key not in _COMPILED:
        if len(_COMPILED) >= MAX_COMPILED:
            return None
        fn = _compile(spec, kwargs, to_fn, str(len(_COMPILED)))
        try:
            grad, (_, loss) = fn(pred, target)
        except Exception:  # noqa: BLE001 - compilation failed: the reference computes the same values
            log.warning("torch.compile could not compile %s (%s) whole; it takes the reference path", spec.name,
                        key[1:], exc_info=True)
            _COMPILED[key] = None
            return None
        _COMPILED[key] = fn
        return loss, grad
    fn = _COMPILED[key]
    if fn is None:
        return None
    grad, (_, loss) = fn(pred, target)
    return loss, grad

