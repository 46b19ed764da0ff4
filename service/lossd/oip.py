"""The Open Inference Protocol's request handling, shared by the REST and gRPC transports.

Every catalog loss is a model: inputs PRED, TARGET (and optional WEIGHTS), outputs LOSS and GRAD; request
``parameters`` carry box_format, reduction, return_grad and the loss's own parameters. A request arrives as a
dict in the protocol's JSON form plus one buffer holding the binary inputs in order; each transport builds those
from its own framing (HTTP binary extension, gRPC raw_input_contents).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from . import __version__
from .engine import Result, get_loss

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
INPUTS = ("PRED", "TARGET", "WEIGHTS")
OUTPUTS = ("LOSS", "GRAD")
RESERVED = {"box_format", "reduction", "return_grad", "binary_data_output", "dtype"}
HEADER = "inference-header-content-length"
SERVER_METADATA = {"name": "lossd", "version": __version__, "extensions": ["binary_tensor_data"]}


class ProtocolError(Exception):
    """A request that breaks the protocol (framing, names, shapes); code is invalid_request or unknown_version."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def bad(message: str) -> ProtocolError:
    return ProtocolError(message)


def _shapes(inputs: str) -> tuple[list[int], list[int]]:
    return {"boxes": ([-1, 4], [-1, 4]), "boxes+logit": ([-1, 5], [-1, 4])}.get(inputs, ([-1, -1], [-1, -1]))


def model_metadata(name: str) -> dict:
    spec = get_loss(name)
    pred_shape, target_shape = _shapes(spec.inputs)
    return {
        "name": name, "versions": ["1"], "platform": "lossd",
        "inputs": [{"name": "PRED", "datatype": "FP32", "shape": pred_shape},
                   {"name": "TARGET", "datatype": "FP32", "shape": target_shape},
                   {"name": "WEIGHTS", "datatype": "FP32", "shape": [-1], "optional": True}],
        "outputs": [{"name": "LOSS", "datatype": "FP32", "shape": [-1]},
                    {"name": "GRAD", "datatype": "FP32", "shape": pred_shape}],
        "parameters": {"kind": spec.kind, "pred": spec.pred_doc, "target": spec.target_doc,
                       "params": {p.name: p.describe() for p in spec.params},
                       "request_parameters": sorted(RESERVED - {"dtype"})},
    }



def check_version(name: str, version: str) -> None:
    get_loss(name)
    if version != "1":
        raise ProtocolError(f"model {name!r} has only version 1, not {version!r}", "unknown_version")




def parse_http_body(body: bytes, header_len: str | None) -> tuple[dict, memoryview]:
    raw = memoryview(body)
    if header_len is not None:
        if not header_len.strip().isdigit() or int(header_len) > len(body):
            raise bad(f"Inference-Header-Content-Length {header_len!r} must be a whole number no larger than the "
                      f"body ({len(body)} bytes)")
        n = int(header_len)
        head, raw = bytes(raw[:n]), raw[n:]
    else:
        head, raw = body, raw[len(body):]
    try:
        req = orjson.loads(head)
    except orjson.JSONDecodeError:
        try:  # the stdlib also reads NaN/Infinity, so the engine can name their rows
            req = json.loads(head)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"the request header is not valid JSON: {exc}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise bad("the request must be a JSON object with an 'inputs' list")
    return req, raw


def _tensor(entry: Any, raw: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise bad("each input needs a 'name'")
    name = entry["name"]
    dt = DTYPES.get(entry.get("datatype"))
    if dt is None:
        raise bad(f"input {name}: datatype {entry.get('datatype')!r} is not one of {sorted(DTYPES)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise bad(f"input {name}: shape must be a list of non-negative whole numbers, got {shape!r}")
    count = math.prod(shape)
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad(f"input {name}: parameters must be an object")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"input {name}: binary_data_size must be a non-negative whole number")
        if size != count * dt.itemsize:
            raise bad(f"input {name}: binary_data_size {size} does not match shape {shape} of {entry['datatype']} "
                      f"({count * dt.itemsize} bytes)")
        if offset + size > len(raw):
            raise bad(f"input {name}: needs {size} bytes at offset {offset} but the binary part holds only "
                      f"{len(raw)} bytes")
        arr = np.frombuffer(raw[offset:offset + size], dtype=dt).reshape(shape)
        return name, arr, offset + size
    if "data" not in entry:
        raise bad(f"input {name}: has neither 'data' nor parameters.binary_data_size")
    try:
        arr = np.asarray(entry["data"], dtype=dt if dt.kind != "f" else np.float64)
    except (ValueError, TypeError) as exc:
        raise bad(f"input {name}: data is not an array of {entry['datatype']} numbers ({exc})") from None
    if arr.size != count:
        raise bad(f"input {name}: data has {arr.size} elements but shape {shape} needs {count}")
    return name, arr.reshape(shape).astype(dt, copy=False) if dt.kind != "f" else arr.reshape(shape), offset


@dataclass
class InferCall:
    """A parsed inference request: the engine call to make, and how to shape its answer."""

    model: str
    kwargs: dict
    wanted: dict[str, bool]
    request_id: Any
    has_id: bool


def prepare_infer(model: str, req: dict, raw: memoryview) -> InferCall:
    """Check and decode an inference request (JSON form plus the binary inputs, in order) into an engine call."""
    get_loss(model)
    tensors: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for entry in req["inputs"]:
        name, arr, offset = _tensor(entry, raw, offset)
        if name not in INPUTS:
            raise bad(f"unknown input {name!r}; model {model} takes {list(INPUTS)}")
        if name in tensors:
            raise bad(f"input {name} given twice")
        tensors[name], datatypes[name] = arr, entry["datatype"]
    if offset != len(raw):
        raise bad(f"the binary part holds {len(raw)} bytes but the inputs' binary_data_size add up to {offset}")
    missing = [n for n in ("PRED", "TARGET") if n not in tensors]
    if missing:
        raise bad(f"missing input {missing[0]}; model {model} needs PRED and TARGET")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad("parameters must be an object")
    return_grad = params.get("return_grad", True)
    if not isinstance(return_grad, bool):
        raise bad("parameters.return_grad must be true or false")
    requested = req.get("outputs")
    binary_all = bool(params.get("binary_data_output", False))
    wanted: dict[str, bool] = {}
    if requested is None:
        wanted = {"LOSS": binary_all, "GRAD": binary_all}
    else:
        if not isinstance(requested, list):
            raise bad("outputs must be a list")
        for o in requested:
            oname = o.get("name") if isinstance(o, dict) else None
            if oname not in OUTPUTS:
                raise bad(f"unknown output {oname!r}; model {model} gives {list(OUTPUTS)}")
            wanted[oname] = bool((o.get("parameters") or {}).get("binary_data", binary_all))
    kwargs = dict(pred=tensors["PRED"], target=tensors["TARGET"], box_format=params.get("box_format", "xyxy"),
                  reduction=params.get("reduction", "none"), weights=tensors.get("WEIGHTS"),
                  params={k: v for k, v in params.items() if k not in RESERVED},
                  return_grad=return_grad and "GRAD" in wanted,
                  dtype="float64" if datatypes["PRED"] == "FP64" else "float32")
    return InferCall(model, kwargs, wanted, req.get("id"), "id" in req)


def finish_infer(call: InferCall, out: Result) -> tuple[dict, list[memoryview]]:
    """The response in the protocol's JSON form, plus the binary outputs in order (views of the result arrays:
    each transport copies them once, into its own framing)."""
    dt = "FP64" if out.dtype.itemsize == 8 else "FP32"
    arrays = {"LOSS": out.loss.numpy().reshape(-1)}
    if call.kwargs["return_grad"]:
        arrays["GRAD"] = out.grad.numpy()
    outputs, blobs = [], []
    for oname in OUTPUTS:
        if oname not in call.wanted or oname not in arrays:
            continue
        arr = np.ascontiguousarray(arrays[oname], dtype=DTYPES[dt])
        entry: dict[str, Any] = {"name": oname, "datatype": dt, "shape": list(arr.shape)}
        if call.wanted[oname]:
            blob = memoryview(arr.reshape(-1)).cast("B") if arr.size else memoryview(b"")
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.reshape(-1)
        outputs.append(entry)
    resp = {"model_name": call.model, "model_version": "1", "outputs": outputs}
    if call.has_id:
        resp["id"] = call.request_id
    return resp, blobs

