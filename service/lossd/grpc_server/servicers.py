"""Thin servicers: decode the message, call the engine (off the event loop), encode the answer."""

from __future__ import annotations

import asyncio
import time

import grpc

from lossd_client.wire import WithTensors, encode_evaluate_response, encode_message, wrap_field
from lossd_client.wire import oip_pb
from lossd_client.wire import oip_grpc
from lossd_client.wire import pb
from lossd_client.wire import pb_grpc

from ..engine import Engine, EngineError
from ..admission import Admission, Draining, Overloaded, ResourceExhausted, is_out_of_memory
from ..batching import Batcher, DeadlineExpired, metric_runs_inline
from ..oip import SERVER_METADATA, InferCall, ProtocolError, check_version, finish_infer, model_metadata, prepare_infer
from .errors import abort
from .tensors import from_numpy, params_to_dict, to_numpy, value_to_param

REFUSALS = (EngineError, DeadlineExpired, Overloaded, Draining, ResourceExhausted)
COMPUTE = {pb.DTYPE_FLOAT64: "float64", pb.DTYPE_FLOAT32: "float32"}


def _expired(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _evaluate(batcher: Batcher, decoded: WithTensors, deadline: float | None) -> pb.EvaluateResponse | bytes:
    """The answer: encoded EvaluateResponse bytes (raw tensors), or the message itself for typed output.
    ``decoded``: the request, its raw tensors still in the received bytes (decode_with_tensors)."""
    req = decoded.message
    out = await batcher.evaluate(
        req.loss, to_numpy(decoded, "pred"), to_numpy(decoded, "target"), box_format=req.box_format or "xyxy",
        reduction=req.reduction or "none", weights=to_numpy(decoded, "weights", required=False),
        params=params_to_dict(req.params), return_grad=req.return_grad if req.HasField("return_grad") else True,
        dtype=COMPUTE.get(req.compute_dtype), deadline=deadline)
    grad = None if out.grad is None else out.grad.numpy()
    if not req.typed_output:  # raw tensors: written straight into the wire bytes, one copy
        return encode_evaluate_response(out.loss.numpy(), grad, req.request_id)
    resp = pb.EvaluateResponse(loss=from_numpy(out.loss.numpy(), True), request_id=req.request_id)
    if grad is not None:
        resp.grad.CopyFrom(from_numpy(grad, True))
    return resp


def _metric(engine: Engine, decoded: WithTensors) -> pb.MetricResponse:
    req = decoded.message
    values = engine.metric(req.metric, to_numpy(decoded, "boxes1"), to_numpy(decoded, "boxes2"),
                           box_format=req.box_format or "xyxy", pairwise=req.pairwise,
                           params=params_to_dict(req.params), dtype=COMPUTE.get(req.compute_dtype))
    return pb.MetricResponse(values=from_numpy(values.numpy(), req.typed_output))


def _leading(t: pb.Tensor) -> int | None:
    """A tensor's declared number of rows (None without a shape): enough to size a call before decoding."""
    return int(t.shape[0]) if len(t.shape) else None


def catalog_entry(entry: dict) -> pb.CatalogEntry:
    params = []
    for name, p in entry["params"].items():
        info = pb.ParamInfo(name=name, type=p["type"], doc=p["doc"], choices=p.get("choices") or [])
        if p["default"] is not None:
            info.default_value.CopyFrom(value_to_param(p["default"]))
        if p["min"] is not None:
            info.min = p["min"]
        if p["max"] is not None:
            info.max = p["max"]
        params.append(info)
    return pb.CatalogEntry(name=entry["name"], kind=entry["kind"], summary=entry["summary"], doc=entry["doc"],
                           reference=entry["reference"], pred=entry["pred"], target=entry["target"], params=params)


class LossServicer(pb_grpc.LossServiceServicer):
    def __init__(self, engine: Engine, batcher: Batcher, admission: Admission) -> None:
        self.engine = engine
        self.batcher = batcher
        self.admission = admission

    async def Evaluate(self, request, context):
        try:
            with self.admission.admit():
                return await _evaluate(self.batcher, request, _deadline(context))
        except REFUSALS as exc:
            await abort(context, exc)

    async def Metric(self, request, context):
        if _expired(context):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the work started")
        try:
            with self.admission.admit():
                msg = request.message
                if metric_runs_inline(self.engine, msg.metric, _leading(msg.boxes1), _leading(msg.boxes2),
                                      msg.pairwise):
                    return _metric(self.engine, request)
                return await asyncio.to_thread(_metric, self.engine, request)
        except REFUSALS as exc:
            await abort(context, exc)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            await abort(context, ResourceExhausted(f"the {self.engine.device} device ran out of memory"))

    async def ListLosses(self, request, context):
        return pb.ListLossesResponse(losses=[catalog_entry(e) for e in self.engine.losses()],
                                     metrics=[catalog_entry(e) for e in self.engine.metrics()])

    async def EvaluateStream(self, request_iterator, context):
        if self.admission.draining:
            await abort(context, Draining("the server is shutting down; retry on another instance"))
        async for item in request_iterator:
            if _expired(context):
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed")
            try:
                resp = await _evaluate(self.batcher, item, _deadline(context))
                yield (wrap_field(1, resp) if isinstance(resp, bytes)
                       else pb.EvaluateStreamResponse(response=resp))
            except ResourceExhausted as exc:
                yield pb.EvaluateStreamResponse(error=pb.Error(code=exc.code, message=str(exc)))
            except EngineError as exc:
                yield pb.EvaluateStreamResponse(error=pb.Error(code=exc.code, message=exc.message,
                                                               field=exc.field or "", rows=exc.rows or [],
                                                               n_rows=exc.n_rows or 0))


# --------------------------------------------------------------------------------------------------- OIP


def _param(p: oip_pb.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _contents(entry, datatype: str) -> list:
    c = entry.contents
    field = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "FP16": "fp32_contents"}.get(datatype, "fp32_contents")
    return list(getattr(c, field))


def _prepare(decoded: WithTensors) -> InferCall:
    """The gRPC request as the protocol's JSON form plus one buffer, parsed by the shared lossd.oip code.
    ``decoded``: the request, its raw_input_contents left in the received bytes when it was large."""
    request = decoded.message
    # each access to raw_input_contents[i] copies; read them once
    contents = decoded.blobs if decoded.blobs is not None else list(request.raw_input_contents)
    if contents and len(contents) != len(request.inputs):
        raise ProtocolError(f"{len(contents)} raw_input_contents for {len(request.inputs)} inputs")
    inputs, blobs = [], []
    for i, t in enumerate(request.inputs):
        entry = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                 "parameters": {k: _param(v) for k, v in t.parameters.items()}}
        if contents:
            blob = contents[i]
            entry["parameters"]["binary_data_size"] = len(blob)
            blobs.append(blob)
        else:
            entry["data"] = _contents(t, t.datatype)
        inputs.append(entry)
    req = {"inputs": inputs, "parameters": {k: _param(v) for k, v in request.parameters.items()},
           "id": request.id}
    req["parameters"]["binary_data_output"] = True  # gRPC answers in raw_output_contents, as Triton does
    if request.outputs:
        req["outputs"] = [{"name": o.name, "parameters": {"binary_data": True}} for o in request.outputs]
    raw = memoryview(blobs[0]) if len(blobs) == 1 else memoryview(b"".join(blobs))
    return prepare_infer(request.model_name, req, raw)


def _answer(call: InferCall, out) -> bytes:
    """The encoded ModelInferResponse, its raw_output_contents (field 6) written straight into the wire bytes."""
    resp, out_blobs = finish_infer(call, out)
    head = oip_pb.ModelInferResponse(
        model_name=resp["model_name"], model_version="1", id=call.request_id or "",
        outputs=[oip_pb.ModelInferResponse.InferOutputTensor(name=o["name"], datatype=o["datatype"],
                                                             shape=o["shape"]) for o in resp["outputs"]])
    return encode_message(head, {}, (6, out_blobs))


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine, batcher: Batcher, admission: Admission, is_ready) -> None:
        self.engine = engine
        self.batcher = batcher
        self.admission = admission
        self.is_ready = is_ready

    async def ServerLive(self, request, context):
        return oip_pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return oip_pb.ServerReadyResponse(ready=self.is_ready())

    async def ModelReady(self, request, context):
        try:
            check_version(request.name, request.version or "1")
        except (EngineError, ProtocolError) as exc:
            await abort(context, exc)
        return oip_pb.ModelReadyResponse(ready=self.is_ready())

    async def ServerMetadata(self, request, context):
        return oip_pb.ServerMetadataResponse(**SERVER_METADATA)

    async def ModelMetadata(self, request, context):
        try:
            check_version(request.name, request.version or "1")
            meta = model_metadata(request.name)
        except (EngineError, ProtocolError) as exc:
            await abort(context, exc)
        tm = oip_pb.ModelMetadataResponse.TensorMetadata
        return oip_pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tm(name=i["name"], datatype=i["datatype"], shape=i["shape"]) for i in meta["inputs"]],
            outputs=[tm(name=o["name"], datatype=o["datatype"], shape=o["shape"]) for o in meta["outputs"]])

    async def ModelInfer(self, decoded, context):
        try:
            with self.admission.admit():
                call = _prepare(decoded)
                out = await self.batcher.evaluate(decoded.message.model_name, **call.kwargs,
                                                  deadline=_deadline(context))
                return _answer(call, out)
        except REFUSALS + (ProtocolError,) as exc:
            await abort(context, exc)


