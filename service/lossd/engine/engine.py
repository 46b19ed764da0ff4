"""The warm loss engine: one object per process, shared by every transport.

    engine = Engine(device="auto")             # picks cuda when present, runs every loss once
    out = engine.evaluate("ciou", pred, target, box_format="xywh", return_grad=True)
    out.loss, out.grad                         # [N] (or a scalar), and d loss / d pred in the caller's format
    engine.metric("iou", a, b, pairwise=True)  # [N, M], computed in row chunks
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from . import box_losses, classification, fastpath, metrics, regression  # noqa: F401  (registration)
from ._utils import overflow_bound, to_xyxy
from .errors import EngineError, rows_phrase
from .inputs import (FLOAT_DTYPES, VALIDATORS, as_float, check_box_format, check_boxes, empty_as_rows,
                     example_inputs)
from .registry import LOSSES, METRICS, get_loss, get_metric

log = logging.getLogger("lossd.engine")

REDUCTIONS = ("none", "mean", "sum")
# Elements of one pairwise chunk: ~30 float temporaries of this many elements stay well under 0.5 GB.
PAIRWISE_CHUNK_ELEMS = 1 << 21


@dataclass
class Result:
    """loss: [N] per sample ('none') or a 0-d tensor; grad: pred's shape, or None. Both on the CPU."""

    loss: Tensor
    grad: Tensor | None
    dtype: torch.dtype


@dataclass
class Out:
    """Where Engine.evaluate writes its answer instead of fresh memory (e.g. a client's shared-memory region):
    ``loss`` a C-contiguous [N] array, ``grad`` one of pred's shape (None: the gradient goes to fresh memory).
    Only for reduction "none"; each array must be writable, aligned and of the compute dtype."""

    loss: np.ndarray
    grad: np.ndarray | None = None

    def checked(self, reduction: str, return_grad: bool, dtype: np.dtype) -> "Out | None":
        """Itself, or None when the call cannot write into it (a reduced loss): then nothing is written."""
        if reduction != "none":
            return None
        for name, a in (("loss", self.loss), ("grad", self.grad if return_grad else None)):
            if a is not None and not (isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous
                                      and a.flags.aligned and a.flags.writeable):
                raise ValueError(f"out.{name} must be a writable, aligned, C-contiguous {np.dtype(dtype).name} "
                                 "array")
        return self if return_grad else Out(self.loss)

    def fill(self, result: Result) -> Result:
        """The result in these arrays (copied there unless it was computed there); the Result of views of them."""
        _place(self.loss, result.loss.reshape(-1), "loss")
        grad = result.grad
        if grad is not None and self.grad is not None:
            _place(self.grad, grad, "grad")
            grad = torch.from_numpy(self.grad)
        return Result(torch.from_numpy(self.loss), grad, result.dtype)


def _place(dst: np.ndarray, src: Tensor, name: str) -> None:
    if tuple(src.shape) != dst.shape:
        raise ValueError(f"out.{name} has shape {list(dst.shape)}, the result {list(src.shape)}")
    if src.data_ptr() != dst.ctypes.data:
        np.copyto(dst, src.numpy())


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """auto (CUDA when torch sees a GPU, else CPU), cpu, cuda or cuda:N; anything else is a ValueError (the engine
    is built and tested on these two; mps or meta would fail only at warm-up)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device)
    if not (name in ("cpu", "cuda") or (name.startswith("cuda:") and name[5:].isascii() and name[5:].isdigit())):
        raise ValueError(f"device {str(device)!r}: expected auto, cpu, cuda or cuda:N")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: torch sees no CUDA GPU here; use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1})")
    return dev


def _resolve_dtype(dtype: str | torch.dtype | None, pred: Any) -> torch.dtype:
    """float32 by default; float64 when asked, or when pred itself is float64 data; fp16/bf16 compute in float32."""
    if dtype is None:
        kind = getattr(pred, "dtype", None)
        return torch.float64 if kind in (torch.float64, "float64") or str(kind) == "float64" else torch.float32
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype in ("float16", "bfloat16"):
        return torch.float32
    if dtype not in FLOAT_DTYPES:
        raise EngineError("unknown_dtype", f"dtype must be float32 or float64, got {dtype!r}", field="dtype")
    return FLOAT_DTYPES[dtype]


def _row_max_abs(t: Tensor) -> Tensor:
    return t.abs().reshape(t.shape[0], -1).amax(1) if t.numel() else t.new_zeros(t.shape[0])


def refuse_non_finite(values: Tensor, grad: Tensor | None, pred: Tensor, target: Tensor, kwargs: Mapping[str, Any],
                      *, what: str = "loss", field: str = "pred", first_row: int = 0) -> None:
    """Finite input whose result is not finite (an intermediate overflowed the dtype, e.g. boxes near 1e308 whose
    areas are inf) is refused with the rows named, never answered with a silent NaN/null.

    One exception, documented: with eps = 0 a pair whose denominator is zero (an empty union, a zero height) has
    no value, and gives NaN for that row. Coordinates within overflow_bound cannot overflow, so a non-finite row
    there is that division by zero and is returned as it is."""
    bad = ~torch.isfinite(values)
    if bad.dim() > 1:  # pairwise [n, m]: a row of boxes1
        bad = bad.any(dim=1)
    if grad is not None and grad.numel():
        bad = bad | ~torch.isfinite(grad).reshape(grad.shape[0], -1).all(dim=1)
    if not bool(bad.any()):
        return
    if kwargs.get("eps", None) == 0 and target.dtype.is_floating_point:
        limit = overflow_bound(torch.finfo(values.dtype).max)
        big = _row_max_abs(pred) > limit
        far = _row_max_abs(target) > limit
        big = big | (far if far.shape[0] == big.shape[0] and values.dim() == 1 else bool(far.any()))
        bad = bad & big
        if not bool(bad.any()):
            return
    rows = [first_row + r for r in bad.nonzero().flatten().tolist()]
    raise EngineError("non_finite", f"{field}: the {what} overflows {str(values.dtype).removeprefix('torch.')} at "
                      f"{rows_phrase(rows, len(rows))} although the input is finite (coordinates this large have "
                      "areas or squared distances beyond the dtype's range); scale the input down", field=field,
                      rows=rows)


class Engine:
    """Evaluates catalog losses and metrics on one device. Thread-safe for concurrent calls (no shared state
    beyond read-only catalog entries)."""

    def __init__(self, device: str | torch.device = "auto", *, warm: bool = True,
                 max_pairwise: int = 1_000_000_000, fast: str = "auto", max_rows: int | None = None) -> None:
        """fast: "auto" (numba kernels on CPU, torch.compile on CUDA), "compiled" (torch.compile anywhere) or
        "off" (the autograd reference only)."""
        if fast not in ("auto", "compiled", "off"):
            raise ValueError(f"fast must be auto, compiled or off, got {fast!r}")
        self.device = pick_device(device)
        self.fast = fast
        self.max_pairwise = int(max_pairwise)
        self.max_rows = max_rows
        self.warm_seconds: float | None = None
        if warm:
            self.warm_up()

    # ----------------------------------------------------------------------------------------------- catalog
    @staticmethod
    def losses() -> list[dict]:
        return [LOSSES[name].describe() for name in sorted(LOSSES)]

    @staticmethod
    def metrics() -> list[dict]:
        return [METRICS[name].describe() for name in sorted(METRICS)]

    def runs_fused_on_cpu(self, name: str) -> bool:
        """Whether a loss (or metric) takes the fused CPU kernels on this engine: microseconds for a few rows."""
        return (self.device.type == "cpu" and self.fast == "auto"
                and (name in fastpath.FUSED_LOSSES or name in fastpath.METRIC_KINDS))

    # ----------------------------------------------------------------------------------------------- evaluate
    def evaluate(self, loss_name: str, pred: Any, target: Any, *, box_format: str = "xyxy", reduction: str = "none",
                 weights: Any = None, params: Mapping[str, Any] | None = None, return_grad: bool = True,
                 dtype: str | torch.dtype | None = None, out: Out | None = None) -> Result:
        """``out``: arrays to write the per-sample loss and the gradient into (reduction "none"; see Out). The
        fused CPU kernels write there directly, any other path copies its result there; the Result's tensors are
        then views of them. On an error their contents are undefined."""
        spec = get_loss(loss_name)
        if reduction not in REDUCTIONS:
            raise EngineError("unknown_reduction", f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}",
                              field="reduction")
        check_box_format(box_format)
        kwargs = spec.resolve(params)
        cdtype = _resolve_dtype(dtype, pred)
        self._check_rows(pred, "pred")
        if out is not None:
            out = out.checked(reduction, return_grad, fastpath.NP_DTYPE[cdtype])
        if self.fast == "auto" and self.device.type == "cpu" and spec.name in fastpath.FUSED_LOSSES:
            fast = fastpath.cpu_evaluate(spec, pred, target, box_format, reduction, weights, kwargs, return_grad,
                                         cdtype, out)
            if fast is not None:
                result = Result(fast[0], fast[1], cdtype)
                return result if out is None else out.fill(result)
        result = self._evaluate(spec, pred, target, box_format, reduction, weights, kwargs, return_grad, cdtype)
        return result if out is None else out.fill(result)

    def _evaluate(self, spec, pred: Any, target: Any, box_format: str, reduction: str, weights: Any, kwargs: dict,
                  return_grad: bool, cdtype: torch.dtype) -> Result:
        """The reference path (autograd, or torch.compile on CUDA)."""
        pred_t = as_float(pred, "pred", cdtype, self.device)
        if spec.inputs in ("boxes", "boxes+logit"):
            pred_t = empty_as_rows(pred_t, 4 if spec.inputs == "boxes" else 5)
        to_fn, target_t = VALIDATORS[spec.inputs](pred_t, target, box_format, kwargs, cdtype)
        w = None
        if weights is not None:
            w = as_float(weights, "weights", cdtype, self.device)
            if w.dim() != 1:
                raise EngineError("invalid_shape", f"weights must be [N], got shape {list(w.shape)}", field="weights")
            if w.shape[0] != pred_t.shape[0]:
                raise EngineError("length_mismatch", f"pred has {pred_t.shape[0]} rows but weights has "
                                  f"{w.shape[0]}", field="weights")
            neg = (w < 0).nonzero().flatten().tolist()
            if neg:
                raise EngineError("invalid_value", f"weights: negative weight at {rows_phrase(neg, len(neg))}",
                                  field="weights", rows=neg)

        compiled = (fastpath.compiled_evaluate(spec, pred_t, target_t, box_format, kwargs, to_fn)
                    if self._compiled_route(spec, kwargs) and return_grad else None)
        if compiled is not None:
            loss, grad = compiled
            refuse_non_finite(loss, grad, pred_t, target_t, kwargs)
            if w is not None:
                loss, grad = loss * w, grad * w.reshape(-1, *([1] * (grad.dim() - 1)))
            if reduction == "sum":
                loss = loss.sum()
            elif reduction == "mean":
                n = loss.shape[0]
                loss, grad = (loss.sum() / n, grad / n) if n else (loss.sum() * 0.0, grad)
            return Result(loss.detach().cpu(), grad.detach().cpu(), cdtype)

        with torch.enable_grad():
            leaf = pred_t.detach().requires_grad_(return_grad)
            per_sample = spec.fn(to_fn(leaf), target_t, **kwargs)
            if w is not None:
                per_sample = per_sample * w
            if reduction == "none":
                out = per_sample
            elif reduction == "sum":
                out = per_sample.sum()
            else:
                out = self._mean(spec, per_sample, leaf, target_t, kwargs, w)
            grad = None
            if return_grad:
                if out.requires_grad:
                    (grad,) = torch.autograd.grad(out.sum(), leaf, allow_unused=True)
                if grad is None:  # the loss does not depend on pred (e.g. an empty batch)
                    grad = torch.zeros_like(leaf)
            refuse_non_finite(per_sample.detach(), grad, pred_t, target_t, kwargs)
        return Result(out.detach().cpu(), None if grad is None else grad.detach().cpu(), cdtype)

    def _check_rows(self, x: Any, field: str) -> None:
        if self.max_rows is None:
            return
        try:
            n = len(x)
        except TypeError:
            return
        if n > self.max_rows:
            raise EngineError("too_large", f"{field} has {n} rows; this server takes at most {self.max_rows} per "
                              "request (LOSSD_MAX_ROWS): split it (the Python client splits calls by size, "
                              "max_request_bytes, not by rows)", field=field)

    def _compiled_route(self, spec, kwargs: dict) -> bool:
        if spec.name not in fastpath.FUSED_LOSSES or spec.mean_weight is not None:
            return False
        return self.fast == "compiled" or (self.fast == "auto" and self.device.type == "cuda")

    @staticmethod
    def _mean(spec, per_sample: Tensor, pred: Tensor, target: Tensor, kwargs: dict, w: Tensor | None) -> Tensor:
        if spec.mean_weight is None:
            denom = per_sample.new_tensor(float(per_sample.shape[0]))
        else:
            denom = spec.mean_weight(pred, target, **kwargs).sum()
        if per_sample.shape[0] == 0 or float(denom) == 0:
            return 0.0 * per_sample.sum()  # keeps the graph, as torchvision does for an empty batch
        return per_sample.sum() / denom

    # ----------------------------------------------------------------------------------------------- metric
    def metric(self, name: str, boxes1: Any, boxes2: Any, *, box_format: str = "xyxy", pairwise: bool = False,
               params: Mapping[str, Any] | None = None, dtype: str | torch.dtype | None = None) -> Tensor:
        spec = get_metric(name)
        check_box_format(box_format)
        self._check_rows(boxes1, "boxes1")
        self._check_rows(boxes2, "boxes2")
        kwargs = spec.resolve(params)
        cdtype = _resolve_dtype(dtype, boxes1)
        if self.fast == "auto" and self.device.type == "cpu":
            fast = fastpath.cpu_metric(spec.name, boxes1, boxes2, box_format, pairwise, kwargs, cdtype,
                                       self.max_pairwise)
            if fast is not None:
                return fast
        a = empty_as_rows(as_float(boxes1, "boxes1", cdtype, self.device), 4)
        b = empty_as_rows(as_float(boxes2, "boxes2", cdtype, self.device), 4)
        check_boxes(a, "boxes1", box_format)
        check_boxes(b, "boxes2", box_format)
        a, b = to_xyxy(a, box_format), to_xyxy(b, box_format)
        with torch.no_grad():
            if not pairwise:
                if a.shape[0] != b.shape[0]:
                    raise EngineError("length_mismatch", f"boxes1 has {a.shape[0]} rows but boxes2 has {b.shape[0]}; "
                                      "elementwise metrics pair row i with row i (use pairwise for N x M)",
                                      field="boxes2")
                values = spec.fn(a, b, **kwargs)
                refuse_non_finite(values, None, a, b, kwargs, what="value", field="boxes1")
                return values.cpu()
            n, m = a.shape[0], b.shape[0]
            if n * m > self.max_pairwise:
                raise EngineError("too_large", f"pairwise {n} x {m} = {n * m} values exceeds the budget of "
                                  f"{self.max_pairwise}", field="boxes2")
            out = torch.empty(n, m, dtype=cdtype)
            rows = max(1, PAIRWISE_CHUNK_ELEMS // max(m, 1))
            for start in range(0, n, rows):
                chunk = a[start:start + rows, None, :]
                values = spec.fn(chunk, b[None, :, :], **kwargs)
                refuse_non_finite(values, None, chunk[:, 0, :], b, kwargs, what="value", field="boxes1",
                                  first_row=start)
                out[start:start + rows] = values.cpu()
            return out

    # ----------------------------------------------------------------------------------------------- warm-up
    def warm_up(self) -> float:
        """Run every loss (with its gradient) and metric once, so the first request pays no start-up cost."""
        t0 = time.perf_counter()
        if self.device.type == "cpu" and self.fast == "auto":
            fastpath.warm_cpu_kernels()
        gen = torch.Generator().manual_seed(0)
        for spec in LOSSES.values():
            pred, target = example_inputs(spec.inputs, 8, gen, torch.float32)
            self.evaluate(spec.name, pred, target, reduction="mean", dtype="float32")
            if self.device.type == "cuda" and spec.name in fastpath.FUSED_LOSSES:
                self.evaluate(spec.name, pred.double(), target, reduction="none", dtype="float64")
        boxes, _ = example_inputs("boxes", 8, gen, torch.float32)
        for name in METRICS:
            self.metric(name, boxes, boxes, pairwise=True, dtype="float32")
        self.warm_seconds = time.perf_counter() - t0
        log.info("engine warm on %s in %.2fs (%d losses, %d metrics)", self.device, self.warm_seconds, len(LOSSES),
                 len(METRICS))
        return self.warm_seconds

