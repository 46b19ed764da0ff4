"""The catalog: every loss and metric declares itself here once, and every interface reads it.

A loss is a plain function ``fn(pred, target, **params) -> Tensor[N]`` (per-sample values) registered with
``@register_loss``. Its docstring carries the formula and the reference; its parameters carry a default, a
range or a set of choices, and a one-line meaning. REST, gRPC, OIP metadata and the CLI list this catalog
instead of repeating it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import EngineError, quote

KINDS = ("box", "regression", "classification")


@dataclass(frozen=True)
class Param:
    """One parameter of a loss or metric.

    type: "float" | "int" | "bool" | "choice" | "floats" (a list of floats, e.g. class weights).
    min/max bound floats and ints (inclusive unless *_exclusive); choices bound "choice".
    arg is the keyword the function takes when the public name is not a Python identifier ("lambda").
    """

    name: str
    default: Any
    doc: str
    type: str = "float"
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    choices: tuple[str, ...] | None = None
    arg: str | None = None

    @property
    def kwarg(self) -> str:
        return self.arg or self.name

    def describe(self) -> dict:
        out: dict[str, Any] = {"default": self.default, "min": self.min, "max": self.max, "doc": self.doc,
                               "type": self.type}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.min_exclusive or self.max_exclusive:
            out["exclusive"] = {"min": self.min_exclusive, "max": self.max_exclusive}
        return out

    def coerce(self, value: Any, where: str) -> Any:
        """Check one user-supplied value and return it in its canonical Python type."""
        fld = f"{where}.{self.name}"
        if self.type == "choice":
            if not isinstance(value, str) or value not in (self.choices or ()):
                raise EngineError("invalid_param", f"{fld} must be one of {list(self.choices or ())}, got {value!r}",
                                  field=fld)
            return value
        if self.type == "bool":
            if not isinstance(value, bool):
                raise EngineError("invalid_param", f"{fld} must be true or false, got {value!r}", field=fld)
            return value
        if self.type == "floats":
            if value is None:
                return None
            if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                raise EngineError("invalid_param", f"{fld} must be a list of numbers, got {value!r}", field=fld)
            vals = [float(v) for v in value]
            if not all(math.isfinite(v) for v in vals):
                raise EngineError("invalid_param", f"{fld} must hold finite numbers", field=fld)
            if self.min is not None and any(v < self.min for v in vals):
                raise EngineError("param_out_of_range", f"{fld} values must be >= {self.min}", field=fld)
            return vals
        if not _is_number(value):
            raise EngineError("invalid_param", f"{fld} must be a number, got {value!r}", field=fld)
        if self.type == "int":
            if not math.isfinite(value) or float(value) != int(value):
                raise EngineError("invalid_param", f"{fld} must be a whole number, got {value!r}", field=fld)
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise EngineError("invalid_param", f"{fld} must be finite, got {value!r}", field=fld)
        if self.min is not None and (value < self.min or (self.min_exclusive and value == self.min)):
            raise EngineError("param_out_of_range", f"{fld} must be {'>' if self.min_exclusive else '>='} "
                              f"{self.min}, got {value}", field=fld)
        if self.max is not None and (value > self.max or (self.max_exclusive and value == self.max)):
            raise EngineError("param_out_of_range", f"{fld} must be {'<' if self.max_exclusive else '<='} "
                              f"{self.max}, got {value}", field=fld)
        return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Spec:
    """A catalog entry: a loss (kind box/regression/classification) or a metric (kind "metric")."""

    name: str
    kind: str
    fn: Callable
    params: tuple[Param, ...]
    reference: str
    inputs: str  # which validator prepares pred/target (see inputs.py)
    doc: str = ""
    summary: str = ""
    # Per-sample weights of the 'mean' denominator (e.g. cross-entropy's class weights, ignored rows);
    # None means every sample counts once.
    mean_weight: Callable | None = None
    pred_doc: str = ""
    target_doc: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    # the fused CPU kernel this entry declares (fastpath.BoxKernel / CoordKernel for a loss, a fused kind for a
    # metric), or None: then the autograd reference (or torch.compile on CUDA) computes it
    kernel: Any = None

    def canonical(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """The user's params alone, checked and coerced to their types; keyed by parameter name (what a batch of
        requests may share)."""
        known = {p.name: p for p in self.params}
        out = {}
        for key, value in (params or {}).items():
            p = known.get(key) if isinstance(key, str) else None
            if p is None:
                raise EngineError("unknown_param", f"{self.name} has no parameter {quote(key)}; it takes "
                                  f"{sorted(known) or 'no parameters'}",
                                  field=f"params.{key}" if isinstance(key, str) and len(key) <= 64 else "params")
            out[key] = p.coerce(value, "params")
        return out

    def resolve(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Catalog defaults overlaid with the user's params, checked; keyed by the function's kwargs."""
        given = self.canonical(params)
        return {p.kwarg: given.get(p.name, p.default) for p in self.params}

    def describe(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "summary": self.summary, "doc": self.doc,
               "reference": self.reference, "pred": self.pred_doc, "target": self.target_doc,
               "params": {p.name: p.describe() for p in self.params}}
        if self.kind != "metric":
            # 'mean' divides by summed per-sample weights (class weights, ignored rows) rather than N: a client
            # that splits a batch must combine the parts' sums and weights, not their means
            out["weighted_mean"] = self.mean_weight is not None
        return out


LOSSES: dict[str, Spec] = {}
METRICS: dict[str, Spec] = {}

# pred/target descriptions for each input kind; the validators in inputs.py enforce them.
INPUT_DOCS = {
    "boxes": ("[N,4] boxes in box_format", "[N,4] boxes in box_format"),
    "boxes+logit": ("[N,5]: a box in box_format, then the predicted IoU logit", "[N,4] boxes in box_format"),
    "regression": ("[N], [N,D] or [N,4] numbers", "same shape as pred"),
    "class_logits": ("[N,C] logits", "[N] class indices, or [N,C] class probabilities"),
    "class_soft": ("[N,C] logits", "[N,C] class probabilities"),
    "class_logprobs": ("[N,C] log-probabilities", "[N] class indices"),
    "probs": ("[N] or [N,C] probabilities in [0,1]", "same shape as pred, values in [0,1]"),
    "logits_binary": ("[N] or [N,C] logits", "same shape as pred, values in [0,1]"),
    "logits_dense": ("[N] or [N,C] logits", "same shape, values in [0,1]; or [N] class indices in [0,C] "
                     "when pred is [N,C] (index C = background)"),
    "distribution": ("[N,B] logits over B bins", "[N] continuous targets in [0, B-1]"),
    "signed": ("[N] or [N,D] scores", "same shape, labels in {-1, +1} (0 reads as -1)"),
    "ranking": ("[N,2]: the two scores x1, x2", "[N] labels in {-1, +1}: +1 means x1 should rank higher"),
}


def _summary(doc: str) -> str:
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _check_signature(fn: Callable, params: tuple[Param, ...]) -> None:
    sig = inspect.signature(fn)
    for p in params:
        if p.kwarg not in sig.parameters:
            raise AssertionError(f"{fn.__name__} does not take parameter {p.kwarg!r}")
        default = sig.parameters[p.kwarg].default
        if default is not inspect.Parameter.empty and default != p.default:
            raise AssertionError(f"{fn.__name__}: default of {p.kwarg!r} differs from the catalog")


def register_loss(name: str, *, kind: str, inputs: str, reference: str, params: tuple[Param, ...] = (),
                  mean_weight: Callable | None = None, kernel: Any = None) -> Callable:
    """Decorator: add a per-sample loss function to the catalog; kernel declares its fused CPU route."""
    if kind not in KINDS:
        raise AssertionError(kind)

    def deco(fn: Callable) -> Callable:
        if name in LOSSES:
            raise AssertionError(f"loss {name!r} registered twice")
        _check_signature(fn, params)
        doc = inspect.getdoc(fn) or ""
        pred_doc, target_doc = INPUT_DOCS[inputs]
        LOSSES[name] = Spec(name=name, kind=kind, fn=fn, params=tuple(params), reference=reference, inputs=inputs,
                            doc=doc, summary=_summary(doc), mean_weight=mean_weight, pred_doc=pred_doc,
                            target_doc=target_doc, kernel=kernel)
        return fn

    return deco


def register_metric(name: str, *, reference: str, params: tuple[Param, ...] = (),
                    kernel: int | None = None) -> Callable:
    """Decorator: add a similarity ``fn(boxes1, boxes2, **params)`` over broadcastable xyxy boxes; kernel is its
    fused kind (fused.box_metric), if it has one."""

    def deco(fn: Callable) -> Callable:
        if name in METRICS:
            raise AssertionError(f"metric {name!r} registered twice")
        _check_signature(fn, params)
        doc = inspect.getdoc(fn) or ""
        METRICS[name] = Spec(name=name, kind="metric", fn=fn, params=tuple(params), reference=reference,
                             inputs="boxes", doc=doc, summary=_summary(doc), pred_doc="[N,4] boxes1",
                             target_doc="[N,4] or [M,4] boxes2", kernel=kernel)
        return fn

    return deco


def get_loss(name: str) -> Spec:
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise EngineError("unknown_loss", f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}",
                          field="loss") from None


def get_metric(name: str) -> Spec:
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        raise EngineError("unknown_metric", f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}",
                          field="metric") from None
