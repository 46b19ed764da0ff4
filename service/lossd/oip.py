"""The Open Inference Protocol's request handling, shared by the REST and gRPC transports.

Every catalog loss is a model: inputs PRED, TARGET (and optional WEIGHTS), outputs LOSS and GRAD; request
``parameters`` carry box_format, reduction, return_grad and the loss's own parameters. A request arrives as a
dict in the protocol's JSON form plus one buffer holding the binary inputs in order; each transport builds those
from its own framing (HTTP binary extension, gRPC raw_input_contents).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import __version__
from .engine import EngineError, Out, Result, get_loss
from .bodyparse import BodyError, NotNumbers, loads, refuse_bools, row_size, rows_where
from .engine.errors import rows_phrase
from .errors import ServiceError, parsing, quote
from .shm import ShmCall, not_local, tensor_ref

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
INPUTS = ("PRED", "TARGET", "WEIGHTS")
OUTPUTS = ("LOSS", "GRAD")
RESERVED = {"box_format", "reduction", "return_grad", "binary_data_output", "dtype"}
HEADER = "inference-header-content-length"
SERVER_METADATA = {"name": "lossd", "version": __version__,
                   "extensions": ["binary_tensor_data", "model_configuration", "statistics", "model_repository",
                                  "system_shared_memory"]}


def server_metadata(shared_memory: bool) -> dict:
    """GET /v2 and gRPC ServerMetadata: the extensions, without system_shared_memory when it is off
    (LOSSD_MAX_SHM_REGIONS=0)."""
    if shared_memory:
        return SERVER_METADATA
    return {**SERVER_METADATA, "extensions": [e for e in SERVER_METADATA["extensions"] if e != "system_shared_memory"]}


MAX_DIMS = 8            # the models take [N], [N,K]; deeper shapes are refused before any allocation
MAX_ID_CHARS = 1024     # a request id, echoed back in the answer
MAX_DIM = 2**40         # a single dimension; the element count is bounded by the body (or message) size anyway


class ProtocolError(ServiceError):
    """A request that breaks the protocol (framing, names, shapes, types)."""

    code = "invalid_request"


def bad(message: str) -> ProtocolError:
    """A protocol error; its field is the tensor the message starts with ("input PRED: ..." -> inputs.PRED)."""
    head = message.split(":", 1)[0].split()
    field = None
    if len(head) == 2 and head[0] in ("input", "output") and head[1].isidentifier():
        field = f"{head[0]}s.{head[1]}"
    return ProtocolError(message, field=field)


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



def model_config(name: str) -> dict:
    """Triton's model configuration extension, in its JSON form (what tritonclient's get_model_config reads)."""
    meta = model_metadata(name)

    def tensor(t: dict) -> dict:
        return {"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"],
                **({"optional": True} if t.get("optional") else {})}

    return {"name": name, "platform": "lossd", "backend": "lossd", "max_batch_size": 0,
            "input": [tensor(t) for t in meta["inputs"]], "output": [tensor(t) for t in meta["outputs"]],
            "version_policy": {"latest": {"num_versions": 1}},
            "parameters": {"kind": {"string_value": meta["parameters"]["kind"]}}}


def model_statistics(name: str, stats) -> dict:
    """Triton's statistics extension for one model (``stats``: a lossd.service.ModelStats)."""
    zero = {"count": 0, "ns": 0}
    return {"name": name, "version": "1", "last_inference": stats.last_inference_ms,
            "inference_count": stats.inference_count, "execution_count": stats.execution_count,
            "inference_stats": {"success": {"count": stats.success_count, "ns": stats.success_ns},
                                "fail": {"count": stats.fail_count, "ns": stats.fail_ns},
                                "queue": dict(zero), "compute_input": dict(zero),
                                "compute_infer": {"count": stats.success_count, "ns": stats.success_ns},
                                "compute_output": dict(zero), "cache_hit": dict(zero), "cache_miss": dict(zero)},
            "batch_stats": []}


def check_version(name: str, version: str) -> None:
    get_loss(name)
    if not isinstance(version, str) or version not in ("", "1"):
        raise ProtocolError(f"model {name} has only version 1, not {quote(version)}", "unknown_version")




def parse_http_body(body: bytes, header_len: str | None) -> tuple[dict, memoryview]:
    raw = memoryview(body)
    if header_len is not None:
        text = header_len.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > len(body):
            raise bad(f"Inference-Header-Content-Length {quote(header_len)} must be a whole number no larger than "
                      f"the body ({len(body)} bytes)")
        n = int(header_len)
        head, raw = bytes(raw[:n]), raw[n:]
    else:
        head, raw = body, raw[len(body):]
    req = loads_json(head, "the request header" if header_len is not None else "the request body",
                     code="invalid_request")
    try:
        refuse_bools(head, req, "oip")
    except NotNumbers as exc:
        raise not_numbers(exc) from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise bad("the request must be a JSON object with an 'inputs' list")
    return req, raw


def not_numbers(exc: NotNumbers) -> EngineError:
    """invalid_value naming the field and rows that hold JSON true/false where numbers go."""
    return EngineError("invalid_value", f"{exc.field}: true/false at {rows_phrase(exc.rows, len(exc.rows))}; "
                       "boxes, labels and weights must be numbers (JSON true/false would be read as 1 and 0)",
                       field=exc.field, rows=exc.rows)


def loads_json(data: bytes | memoryview, what: str, code: str = "invalid_json") -> Any:
    """JSON from client bytes (lossd.bodyparse.loads), its errors as ``code``."""
    try:
        return loads(data, what)
    except BodyError as exc:
        raise ServiceError(str(exc), code, field="body") from None


def _tensor(entry: Any, raw: memoryview, offset: int, shm: ShmCall | None = None) -> tuple[str, np.ndarray, int]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise bad("each input needs a 'name' (a string)")
    name = entry["name"]
    if name not in INPUTS:
        raise bad(f"unknown input {quote(name)}; the models take {list(INPUTS)}")
    datatype = entry.get("datatype")
    dt = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dt is None:
        raise bad(f"input {name}: datatype {quote(datatype)} is not one of {sorted(DTYPES)}")
    if datatype == "BOOL":  # boxes, labels and weights are numbers (model metadata): true/false would be 1 and 0
        raise bad(f"input {name}: datatype BOOL is not accepted; boxes, labels and weights are numbers (FP32, FP64 "
                  "or, for labels, an integer type)")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape):
        raise bad(f"input {name}: shape must be a list of at most {MAX_DIMS} non-negative whole numbers (each at most {MAX_DIM}), "
                  f"got {quote(shape)}")
    count = math.prod(shape)
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad(f"input {name}: parameters must be an object")
    ref = tensor_ref(params, f"inputs.{name}")
    if ref is not None:
        if shm is None:
            raise not_local()
        if "binary_data_size" in params or "data" in entry:
            raise bad(f"input {name}: give shared_memory_region or data/binary_data_size, not both")
        if ref[2] != count * dt.itemsize:
            raise ProtocolError(f"input {name}: shared_memory_byte_size {ref[2]} does not match shape {shape} of "
                                f"{datatype} ({count * dt.itemsize} bytes)", field=f"inputs.{name}")
        region, _ = shm.check(ref, f"inputs.{name}")  # read later, by read_shm_inputs (in a thread when it copies)
        return name, ShmTensor(ref, dt, shape, copies=region.mm is None or dt.kind != "f"), offset
    if "binary_data_size" in params:
        if "data" in entry:  # Triton refuses the pair too; reading either one would drop the other unseen
            raise bad(f"input {name}: give data or a binary part (parameters.binary_data_size; over gRPC "
                      "raw_input_contents), not both")
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
    with parsing(f"inputs.{name}.data"):
        arr = _numbers(np.asarray(entry["data"]), dt, name, entry["data"], shape)
    if arr.size != count:
        raise bad(f"input {name}: data has {arr.size} elements but shape {shape} needs {count}")
    return name, arr.reshape(shape), offset


def _numbers(arr: np.ndarray, dt: np.dtype, name: str, data: Any, shape: list) -> np.ndarray:
    """JSON data as the declared datatype: floats as float64 (the engine casts), integers checked against the
    declared type's range (never wrapped), booleans as booleans. Strings, nulls and objects where numbers go
    are invalid_value naming their rows (of ``shape``)."""
    kind = arr.dtype.kind
    if dt.kind != "b" and kind not in "iufb" and isinstance(data, list):
        rows = rows_where(data, row_size(shape), lambda v: not isinstance(v, (int, float)))
        if rows:
            raise EngineError("invalid_value", f"inputs.{name}.data: not a number (a string, null or object) at "
                              f"{rows_phrase(rows, len(rows))}", field=f"inputs.{name}.data", rows=rows)
    if dt.kind == "f":
        if kind not in "iuf":
            raise ProtocolError(f"input {name}: data must hold numbers ({dt.name})", field=f"inputs.{name}.data")
        return arr.astype(np.float64)
    if dt.kind == "b":
        if kind != "b":
            raise ProtocolError(f"input {name}: BOOL data must hold true/false", field=f"inputs.{name}.data")
        return arr
    info = np.iinfo(dt)
    if kind not in "iu" or (arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max)):
        raise ProtocolError(f"input {name}: data must hold whole numbers in [{info.min}, {info.max}] "
                            f"({dt.name})", field=f"inputs.{name}.data")
    return arr.astype(dt)


@dataclass
class ShmTensor:
    """An input that lies in a shared-memory region, not read yet."""

    ref: tuple  # (region, offset, byte_size)
    dtype: np.dtype
    shape: list
    copies: bool  # read as a copy (else a view of a mapped region: no work)

    @property
    def nbytes(self) -> int:
        return self.ref[2]


@dataclass
class InferCall:
    """A parsed inference request: the engine call to make, and how to shape its answer."""

    model: str
    kwargs: dict
    wanted: dict[str, bool]
    request_id: Any
    has_id: bool
    shm: ShmCall | None = None
    shm_outputs: dict = None  # output name -> (region, offset, byte_size)
    shm_inputs: tuple = ()    # the inputs still to be read from a region (ShmTensor in kwargs)
    out: Out | None = None    # outputs the engine computes straight into their regions (shm_targets)


def prepare_infer(model: str, req: dict, raw: memoryview, shm: ShmCall | None = None) -> InferCall:
    """Check and decode an inference request (JSON form plus the binary inputs, in order) into an engine call.
    ``shm``: the call's access to shared-memory regions (None: the client may not use them)."""
    get_loss(model)
    tensors: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    shm_inputs: list[str] = []
    offset = 0
    for entry in req["inputs"]:
        name, arr, offset = _tensor(entry, raw, offset, shm)
        if name in tensors:
            raise bad(f"input {name} given twice")
        if isinstance(arr, ShmTensor):
            shm_inputs.append(name)
        tensors[name], datatypes[name] = arr, entry["datatype"]
    if offset != len(raw):
        raise bad(f"the binary part holds {len(raw)} bytes but the inputs' binary_data_size add up to {offset}")
    missing = [n for n in ("PRED", "TARGET") if n not in tensors]
    if missing:
        raise bad(f"missing input {missing[0]}; model {model} needs PRED and TARGET")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad("parameters must be an object")
    return_grad = _flag(params, "return_grad", True, "parameters")
    binary_all = _flag(params, "binary_data_output", False, "parameters")
    for key in ("box_format", "reduction"):
        if key in params and not isinstance(params[key], str):
            raise ProtocolError(f"parameters.{key} must be a string, got {quote(params[key])}",
                                field=f"parameters.{key}")
    requested = req.get("outputs")
    wanted: dict[str, bool] = {}
    shm_outputs: dict[str, tuple] = {}
    if requested is None:
        wanted = {"LOSS": binary_all, "GRAD": binary_all}
    else:
        if not isinstance(requested, list):
            raise bad("outputs must be a list")
        for o in requested:
            oname = o.get("name") if isinstance(o, dict) else None
            if not isinstance(oname, str) or oname not in OUTPUTS:
                raise bad(f"unknown output {quote(oname)}; model {model} gives {list(OUTPUTS)}")
            if oname in wanted:
                raise bad(f"output {oname} asked for twice")
            oparams = o.get("parameters") or {}
            if not isinstance(oparams, dict):
                raise bad(f"output {oname}: parameters must be an object")
            if "classification" in oparams:
                raise ProtocolError(f"output {oname}: parameters.classification is not supported (the models "
                                    "give losses and gradients, not class scores)",
                                    field=f"outputs.{oname}.parameters.classification")
            if oname == "GRAD" and not return_grad:
                raise ProtocolError("output GRAD is asked for but parameters.return_grad is false; leave GRAD out "
                                    "of outputs or set return_grad to true", field="parameters.return_grad")
            wanted[oname] = _flag(oparams, "binary_data", binary_all, f"outputs.{oname}.parameters")
            ref = tensor_ref(oparams, f"outputs.{oname}")
            if ref is not None:
                if shm is None:
                    raise not_local()
                shm.check(ref, f"outputs.{oname}")  # the region exists and holds the range, before computing
                shm_outputs[oname] = ref
        if len(shm_outputs) > 1:
            shm.apart(shm_outputs)
    kwargs = dict(pred=tensors["PRED"], target=tensors["TARGET"], box_format=params.get("box_format", "xyxy"),
                  reduction=params.get("reduction", "none"), weights=tensors.get("WEIGHTS"),
                  params={k: v for k, v in params.items() if k not in RESERVED},
                  return_grad=return_grad and "GRAD" in wanted,
                  dtype="float64" if datatypes["PRED"] == "FP64" else "float32")
    request_id = req.get("id")
    if "id" in req and not (isinstance(request_id, str) and len(request_id) <= MAX_ID_CHARS):
        # the id is echoed in the answer: a string, as the protocol says, and short
        raise ProtocolError(f"id must be a string of at most {MAX_ID_CHARS} characters, got {quote(request_id)}",
                            field="id")
    return InferCall(model, kwargs, wanted, request_id, "id" in req, shm, shm_outputs, tuple(shm_inputs))


def _flag(params: dict, key: str, default: bool, where: str) -> bool:
    """A boolean parameter; anything but JSON true/false is refused ("yes", 1, "false" would read as true)."""
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}.{key} must be true or false, got {quote(value)}", field=f"{where}.{key}")
    return value


KWARG = {"PRED": "pred", "TARGET": "target", "WEIGHTS": "weights"}


def shm_input_bytes(call: InferCall) -> int:
    """The bytes read_shm_inputs copies (views of a mapped region cost nothing)."""
    return sum(t.nbytes for t in (call.kwargs[KWARG[n]] for n in call.shm_inputs) if t.copies)


def shm_output_bytes(call: InferCall, out: Result) -> int:
    """The bytes finish_infer copies into shared memory (none for outputs computed there)."""
    sizes = {"LOSS": out.loss.numel() * out.loss.element_size(),
             "GRAD": 0 if out.grad is None else out.grad.numel() * out.grad.element_size()}
    placed = {"LOSS": call.out.loss, "GRAD": call.out.grad} if call.out is not None else {}
    return sum(sizes[name] for name in (call.shm_outputs or {}) if name in sizes and placed.get(name) is None)


def shm_targets(call: InferCall) -> Out | None:
    """Where in its shared-memory regions the engine can compute LOSS (and GRAD) directly, saving the copy
    finish_infer would make: per-sample losses, in mapped regions (see ShmCall.target). None: computed
    elsewhere and copied (or refused) as usual."""
    kw = call.kwargs
    pred = kw["pred"]
    if (not call.shm_outputs or "LOSS" not in call.shm_outputs or kw["reduction"] != "none"
            or not isinstance(pred, np.ndarray) or pred.ndim != 2):
        return None
    dt = np.float64 if kw["dtype"] == "float64" else np.float32
    loss = call.shm.target(call.shm_outputs["LOSS"], dt, (pred.shape[0],), "outputs.LOSS")
    if loss is None:
        return None
    grad = None
    if kw["return_grad"] and "GRAD" in call.shm_outputs:
        grad = call.shm.target(call.shm_outputs["GRAD"], dt, pred.shape, "outputs.GRAD")
    call.out = Out(loss, grad)
    return call.out


def read_shm_inputs(call: InferCall) -> None:
    """Read the inputs that lie in shared memory (see lossd.shm for when that is in place and when a copy)."""
    for name in call.shm_inputs:
        t = call.kwargs[KWARG[name]]
        call.kwargs[KWARG[name]] = call.shm.read(t.ref, t.dtype, t.shape, f"inputs.{name}")
    call.shm_inputs = ()


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
        if call.shm_outputs and oname in call.shm_outputs:
            entry["parameters"] = _write_shm(call, oname, arr)
        elif call.wanted[oname]:
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


def _write_shm(call: InferCall, oname: str, arr: np.ndarray) -> dict:
    """Write an output into its shared-memory region; the response's parameters for it."""
    region, offset, size = call.shm_outputs[oname]
    what = f"outputs.{oname}"
    if arr.nbytes > size:
        raise ProtocolError(f"output {oname}: shared_memory_byte_size {size} is too small for shape "
                            f"{list(arr.shape)} of {DTYPES_NAME[arr.dtype]} ({arr.nbytes} bytes)", field=what)
    call.shm.check_registered(region, what)
    call.shm.write((region, offset, size), arr, what)
    return {"shared_memory_region": region, "shared_memory_byte_size": arr.nbytes,
            **({"shared_memory_offset": offset} if offset else {})}


DTYPES_NAME = {v: k for k, v in DTYPES.items()}
