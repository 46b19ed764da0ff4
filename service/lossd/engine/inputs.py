"""Turning user arrays into checked tensors, one validator per input kind of the catalog.

Every check names the field and the first offending rows; nothing is clipped or dropped. A validator returns
``(to_fn, target)``: ``to_fn`` maps the differentiable ``pred`` leaf (in the caller's format) to what the loss
function takes, so autograd carries gradients back through any conversion.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ._utils import BOX_FORMATS, to_xyxy
from .errors import EngineError, rows_phrase

FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def bad_rows(mask: Tensor) -> list[int]:
    """Indices of rows (first dim) where mask holds anywhere."""
    if mask.dim() > 1:
        mask = mask.flatten(1).any(dim=1)
    return mask.nonzero().flatten().tolist()


def _raise_rows(code: str, field: str, rows: list[int], what: str) -> None:
    raise EngineError(code, f"{field}: {what} at {rows_phrase(rows, len(rows))}", field=field, rows=rows,
                      n_rows=len(rows))


def _rows_where(x: Any, leaf: Callable[[Any], bool]) -> list[int]:
    """Rows of nested lists (as parsed from JSON) holding, at any depth, a value for which ``leaf`` is true."""
    def found(v: Any) -> bool:
        return any(found(e) for e in v) if isinstance(v, (list, tuple)) else leaf(v)

    return [i for i, v in enumerate(x) if found(v)] if isinstance(x, (list, tuple)) else []


def _not_a_number(v: Any) -> bool:
    return not isinstance(v, (int, float, np.number))


def _past_float64(v: Any) -> bool:
    """A whole number too large for a float64."""
    if not isinstance(v, int):
        return False
    try:
        float(v)
    except OverflowError:
        return True
    return False


def as_array(x: Any, field: str) -> Tensor:
    """Any array-like (tensor, numpy, nested lists) as a tensor, without choosing the compute dtype yet."""
    if isinstance(x, Tensor):
        return x.detach()
    if x is None:
        raise EngineError("invalid_shape", f"{field} is missing", field=field)
    try:
        arr = np.asarray(x)
    except ValueError:  # ragged nested lists
        raise EngineError("invalid_shape", f"{field} is not a rectangular array (its rows have different "
                          "lengths)", field=field) from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        rows = _rows_where(x, _not_a_number)
        if rows:
            _raise_rows("invalid_value", field, rows, "not a number (a string, null or object)")
        if arr.dtype != object or not isinstance(x, (list, tuple)):
            raise EngineError("invalid_shape", f"{field} must be a rectangular array of numbers", field=field)
        # numbers only, some of them whole numbers past 64 bits (JSON allows any length): as float64
        try:
            arr = np.asarray(x, dtype=np.float64)
        except OverflowError:
            _raise_rows("non_finite", field, _rows_where(x, _past_float64), "whole numbers beyond float64's range")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.float32)
    elif arr.dtype.kind == "u" and arr.dtype != np.uint8:
        # torch has no uint16/32/64 tensors to take over; JSON integers past 2**63 arrive as uint64
        arr = arr.astype(np.int64) if arr.size == 0 or arr.max() <= np.iinfo(np.int64).max else arr.astype(np.float64)
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        # a zero-copy view of a request's bytes: the engine never writes into its inputs, so share it
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(arr)
    return torch.from_numpy(arr)


def as_float(x: Any, field: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    t = as_array(x, field)
    if t.dtype.is_complex:
        raise EngineError("invalid_shape", f"{field} must be real", field=field)
    source = t
    t = t.to(device=device, dtype=dtype)
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = ~torch.isfinite(t)
        if source.dtype.is_floating_point and source.dtype != t.dtype and bool(torch.isfinite(source).all()):
            _raise_rows("non_finite", field, bad_rows(bad.cpu()),
                        f"values beyond {str(dtype).removeprefix('torch.')}'s range (send dtype float64)")
        _raise_rows("non_finite", field, bad_rows(bad), "NaN or inf")
    return t


def check_rank(t: Tensor, field: str, ranks: tuple[int, ...], shape_doc: str) -> None:
    if t.dim() not in ranks:
        raise EngineError("invalid_shape", f"{field} must be {shape_doc}, got shape {list(t.shape)}", field=field)


def check_rows(pred: Tensor, other: Tensor, field: str) -> None:
    if other.shape[0] != pred.shape[0]:
        raise EngineError("length_mismatch", f"pred has {pred.shape[0]} rows but {field} has {other.shape[0]}",
                          field=field)


def check_same_shape(pred: Tensor, target: Tensor) -> None:
    check_rows(pred, target, "target")
    if target.shape != pred.shape:
        raise EngineError("invalid_shape", f"target must have pred's shape {list(pred.shape)}, got "
                          f"{list(target.shape)}", field="target")


def check_range(t: Tensor, field: str, lo: float, hi: float, what: str) -> None:
    out = (t < lo) | (t > hi)
    if t.numel() and bool(out.any()):
        _raise_rows("invalid_value", field, bad_rows(out), what)


def empty_as_rows(t: Tensor, width: int) -> Tensor:
    """A bare empty list (shape [0], as JSON writes zero rows) read as zero rows of the expected width."""
    return t.reshape(0, width) if t.dim() == 1 and t.shape[0] == 0 else t


def check_boxes(t: Tensor, field: str, box_format: str, width: int = 4) -> None:
    """[N, width] with a valid box in the first four columns (zero area allowed)."""
    if t.dim() != 2 or t.shape[1] != width:
        extra = "" if width == 4 else " (a box and the predicted IoU logit)"
        raise EngineError("invalid_shape", f"{field} must be [N, {width}]{extra}, got shape {list(t.shape)}",
                          field=field)
    if t.shape[0] == 0:
        return
    if box_format == "xyxy":
        bad = (t[:, 2] < t[:, 0]) | (t[:, 3] < t[:, 1])
        what = "x2 < x1 or y2 < y1 (xyxy boxes need x1 <= x2 and y1 <= y2)"
    else:
        bad = (t[:, 2] < 0) | (t[:, 3] < 0)
        what = f"negative width or height ({box_format} boxes)"
    if bool(bad.any()):
        _raise_rows("inverted_box", field, bad_rows(bad), what)


def check_box_format(box_format: Any) -> str:
    if box_format not in BOX_FORMATS:
        raise EngineError("unknown_format", f"box_format must be one of {list(BOX_FORMATS)}, got {box_format!r}",
                          field="box_format")
    return box_format


def as_index(x: Any, field: str, device: torch.device) -> Tensor:
    """Class indices: an integer array, or a float array holding whole numbers (JSON has no ints in arrays)."""
    t = as_array(x, field)
    if t.dtype.is_floating_point:
        if t.numel() and not bool(torch.isfinite(t).all()):
            _raise_rows("non_finite", field, bad_rows(~torch.isfinite(t)), "NaN or inf")
        frac = t != t.round()
        if t.numel() and bool(frac.any()):
            _raise_rows("invalid_value", field, bad_rows(frac), "class indices must be whole numbers")
    return t.to(device=device, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# validators: (pred float tensor, raw target, box_format, params, dtype) -> (to_fn, target)

Validated = tuple[Callable[[Tensor], Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


def _boxes(pred: Tensor, target: Any, box_format: str, params: dict, dtype: torch.dtype) -> Validated:
    check_boxes(pred, "pred", box_format)
    tgt = empty_as_rows(as_float(target, "target", dtype, pred.device), 4)
    check_boxes(tgt, "target", box_format)
    check_rows(pred, tgt, "target")
    return (lambda x: to_xyxy(x, box_format)), to_xyxy(tgt, box_format)


def _boxes_logit(pred: Tensor, target: Any, box_format: str, params: dict, dtype: torch.dtype) -> Validated:
    check_boxes(pred, "pred", box_format, width=5)
    tgt = empty_as_rows(as_float(target, "target", dtype, pred.device), 4)
    check_boxes(tgt, "target", box_format)
    check_rows(pred, tgt, "target")
    return (lambda x: torch.cat((to_xyxy(x[:, :4], box_format), x[:, 4:]), dim=1)), to_xyxy(tgt, box_format)


def _regression(pred: Tensor, target: Any, box_format: str, params: dict, dtype: torch.dtype) -> Validated:
    check_rank(pred, "pred", (1, 2), "[N] or [N, D]")
    tgt = as_float(target, "target", dtype, pred.device)
    check_same_shape(pred, tgt)
    return _identity, tgt


def _n_classes(pred: Tensor) -> int:
    if pred.shape[1] < 1:
        raise EngineError("invalid_shape", "pred must have at least one class column", field="pred")
    return pred.shape[1]


def _check_indices(idx: Tensor, lo: int, hi: int, ignore: int | None) -> None:
    out = (idx < lo) | (idx > hi)
    if ignore is not None:
        out &= idx != ignore
    if idx.numel() and bool(out.any()):
        allowed = f"[{lo}, {hi}]" + (f" or ignore_index {ignore}" if ignore is not None else "")
        _raise_rows("invalid_value", "target", bad_rows(out), f"class index outside {allowed}")


def _class_logits(pred: Tensor, target: Any, box_format: str, params: dict, dtype: torch.dtype) -> Validated:
    check_rank(pred, "pred", (2,), "[N, C] logits")
    c = _n_classes(pred)
    raw = as_array(target, "target")
    if raw.dim() == 2:
        tgt = as_float(raw, "target", dtype, pred.device)
        check_same_shape(pred, tgt)
        check_range(tgt, "target", 0.0, 1.0, "class probabilities must lie in [0, 1]")
        return _identity, tgt
    check_rank(raw, "target", (1,), "[N] class indices or [N, C] probabilities")
    idx = as_index(raw, "target", pred.device)
    check_rows(pred, idx, "target")
    _check_indices(idx, 0, c - 1, params.get("ignore_index"))
    return _identity, idx


def _class_logprobs(pred: Tensor, target: Any, box_format: str, params: dict, dtype: torch.dtype) -> Validated:
    check_rank(pred, "pred", (2,), "[N, C] log-probabilities")
    c = _n_classes(pred)
    check_range(pred, "pred", -float("inf"), 0.0, "log-probabilities must be <= 0")
    idx = as_index(target, "target", pred.device)
    check_rank(idx, "target", (1,), "[N] class indices")
    check_rows(pred, idx, "target")
    _check_indices(idx, 0, c - 1, params.get("ignore_index"))
    return _identity, idx


def _class_soft(pred: Tensor, target: Any, box_format: str, params: dict, dtype: torch.dtype) -> Validated:
    check_rank(pred, "pred", (2,), "[N, C] logits")
    tgt = as_float(target, "target", dtype, pred.device)
    check_same_shape(pred, tgt)
    check_range(tgt, "target", 0.0, 1.0, "class probabilities must lie in [0, 1]")
    return _identity, tgt


def _probs(pred: Tensor, target: Any, box_format: str, params: dict, dtype: torch.dtype) -> Validated:
    check_rank(pred, "pred", (1, 2), "[N] or [N, C] probabilities")
    check_range(pred, "pred", 0.0, 1.0, "probabilities must lie in [0, 1]")
    tgt = as_float(target, "target", dtype, pred.device)
    check_same_shape(pred, tgt)
    check_range(tgt, "target", 0.0, 1.0, "targets must lie in [0, 1]")
    return _identity, tgt


def _logits_binary(pred: Tensor, target: Any, box_format: str, params: dict, dtype: torch.dtype) -> Validated:
    check_rank(pred, "pred", (1, 2), "[N] or [N, C] logits")
    tgt = as_float(target, "target", dtype, pred.device)
    check_same_shape(pred, tgt)
    check_range(tgt, "target", 0.0, 1.0, "targets must lie in [0, 1]")
    return _identity, tgt


def _logits_dense(pred: Tensor, target: Any, box_format: str, params: dict, dtype: torch.dtype) -> Validated:
    raw = as_array(target, "target")
    if pred.dim() == 2 and raw.dim() == 1:
        # class indices with index C meaning background (an all-zero row), as mmdetection's focal loss takes them
        c = _n_classes(pred)
        idx = as_index(raw, "target", pred.device)
        check_rows(pred, idx, "target")
        _check_indices(idx, 0, c, None)
        onehot = torch.nn.functional.one_hot(idx, c + 1)[:, :c].to(dtype)
        return _identity, onehot
    return _logits_binary(pred, raw, box_format, params, dtype)


def _distribution(pred: Tensor, target: Any, box_format: str, params: dict, dtype: torch.dtype) -> Validated:
    check_rank(pred, "pred", (2,), "[N, B] logits over B >= 2 bins")
    if pred.shape[1] < 2:
        raise EngineError("invalid_shape", f"pred needs at least 2 bins, got {pred.shape[1]}", field="pred")
    tgt = as_float(target, "target", dtype, pred.device)
    check_rank(tgt, "target", (1,), "[N] continuous targets")
    check_rows(pred, tgt, "target")
    check_range(tgt, "target", 0.0, pred.shape[1] - 1, f"targets must lie in [0, {pred.shape[1] - 1}] (B - 1)")
    return _identity, tgt


def _signed(pred: Tensor, target: Any, box_format: str, params: dict, dtype: torch.dtype) -> Validated:
    check_rank(pred, "pred", (1, 2), "[N] or [N, D] scores")
    tgt = as_float(target, "target", dtype, pred.device)
    check_same_shape(pred, tgt)
    bad = (tgt != 1) & (tgt != -1) & (tgt != 0)
    if tgt.numel() and bool(bad.any()):
        _raise_rows("invalid_value", "target", bad_rows(bad), "labels must be -1 or +1 (0 reads as -1)")
    return _identity, torch.where(tgt > 0, torch.ones_like(tgt), -torch.ones_like(tgt))


def _ranking(pred: Tensor, target: Any, box_format: str, params: dict, dtype: torch.dtype) -> Validated:
    if pred.dim() != 2 or pred.shape[1] != 2:
        raise EngineError("invalid_shape", f"pred must be [N, 2] (x1, x2), got shape {list(pred.shape)}", field="pred")
    tgt = as_float(target, "target", dtype, pred.device)
    check_rank(tgt, "target", (1,), "[N] labels")
    check_rows(pred, tgt, "target")
    bad = (tgt != 1) & (tgt != -1)
    if tgt.numel() and bool(bad.any()):
        _raise_rows("invalid_value", "target", bad_rows(bad), "labels must be -1 or +1")
    return _identity, tgt


VALIDATORS: dict[str, Callable[..., Validated]] = {
    "boxes": _boxes,
    "boxes+logit": _boxes_logit,
    "regression": _regression,
    "class_logits": _class_logits,
    "class_logprobs": _class_logprobs,
    "class_soft": _class_soft,
    "probs": _probs,
    "logits_binary": _logits_binary,
    "logits_dense": _logits_dense,
    "distribution": _distribution,
    "signed": _signed,
    "ranking": _ranking,
}


# ---------------------------------------------------------------------------------------------------------------
# valid random inputs per kind: the warm-up runs each loss on them, and the tests draw from them

def random_boxes(n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64, scale: float = 100.0) -> Tensor:
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * scale
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * scale * 0.5 + scale * 0.01
    return torch.cat((xy, xy + wh), dim=1)


def jitter_boxes(boxes: Tensor, gen: torch.Generator, amount: float = 0.15) -> Tensor:
    """Valid xyxy boxes near ``boxes``: centres moved and sides scaled by about ``amount`` of the size."""
    wh = boxes[:, 2:] - boxes[:, :2]
    c = 0.5 * (boxes[:, :2] + boxes[:, 2:]) + torch.randn(wh.shape, generator=gen, dtype=boxes.dtype) * amount * wh
    wh = wh * torch.exp(torch.randn(wh.shape, generator=gen, dtype=boxes.dtype) * amount)
    return torch.cat((c - 0.5 * wh, c + 0.5 * wh), dim=1)


def example_inputs(inputs: str, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64,
                   n_classes: int = 5) -> tuple[Tensor, Tensor]:
    """(pred, target) valid for the input kind; boxes in xyxy."""
    def r(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen, dtype=dtype)

    def rn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    if inputs == "boxes":
        a = random_boxes(n, gen, dtype)
        return jitter_boxes(a, gen), a  # pred near the target so most pairs overlap
    if inputs == "boxes+logit":
        a = random_boxes(n, gen, dtype)
        return torch.cat((jitter_boxes(a, gen), rn(n, 1)), dim=1), a
    if inputs == "regression":
        return rn(n, 4) * 2, rn(n, 4) * 2
    if inputs == "class_logits":
        return rn(n, n_classes) * 2, torch.randint(0, n_classes, (n,), generator=gen)
    if inputs == "class_logprobs":
        return torch.log_softmax(rn(n, n_classes) * 2, dim=1), torch.randint(0, n_classes, (n,), generator=gen)
    if inputs == "class_soft":
        return rn(n, n_classes) * 2, torch.softmax(rn(n, n_classes), dim=1)
    if inputs == "probs":
        return r(n, n_classes) * 0.98 + 0.01, r(n, n_classes)
    if inputs in ("logits_binary", "logits_dense"):
        return rn(n, n_classes) * 2, (r(n, n_classes) < 0.3).to(dtype) * r(n, n_classes)
    if inputs == "distribution":
        return rn(n, 8) * 2, r(n) * 7
    if inputs == "signed":
        return rn(n, 3) * 2, torch.where(r(n, 3) < 0.5, -1.0, 1.0).to(dtype)
    if inputs == "ranking":
        return rn(n, 2) * 2, torch.where(r(n) < 0.5, -1.0, 1.0).to(dtype)
    raise AssertionError(inputs)
