"""Thin servicers: decode the message, call lossd.service, encode the answer; errors go through errors.abort."""

from __future__ import annotations

import math
import time
from typing import Any, Awaitable, Callable

import grpc

from lossd_client.wire import (WithTensors, encode_evaluate_response, encode_message, from_param, oip_grpc, oip_pb,
                               pb, pb_grpc, to_param, to_tensor, wrap_field)

from ..engine import EngineError
from ..errors import ServiceError, parsing
from ..oip import ProtocolError, server_metadata
from ..service import Service
from .errors import abort, stream_error

COMPUTE = {pb.DTYPE_FLOAT64: "float64", pb.DTYPE_FLOAT32: "float32"}


def _compute(value: int) -> str | None:
    """compute_dtype: unset (the inputs' own float type), FLOAT32 or FLOAT64; anything else is refused."""
    if value == pb.DTYPE_UNSPECIFIED:
        return None
    if value not in COMPUTE:
        raise EngineError("unknown_dtype", f"compute_dtype must be DTYPE_FLOAT32 or DTYPE_FLOAT64 (or unset), "
                          f"got {pb.Dtype.Name(value) if value in pb.Dtype.values() else value}",
                          field="compute_dtype")
    return COMPUTE[value]
# answers leave room for the message's own framing under the message cap
FRAMING_BYTES = 64 * 1024


class BadMessage:
    """What a request deserializer returns for bytes that are not the message (the servicer answers
    INVALID_ARGUMENT; a raising deserializer would make gRPC answer UNKNOWN/INTERNAL)."""

    def __init__(self, method: str, exc: BaseException) -> None:
        self.error = ServiceError(f"the {method} request is not a valid protobuf message", field="request")


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _guarded(context: grpc.aio.ServicerContext, request: Any, work: Callable[[], Awaitable[Any]]) -> Any:
    if isinstance(request, BadMessage):
        await abort(context, request.error)
    try:
        return await work()
    except Exception as exc:  # noqa: BLE001 (mapped by the table; internal faults become INTERNAL)
        error = exc
    await abort(context, error)


def _message_bytes(shape: tuple, dtype: str) -> int:
    """What a MetricResponse holds beyond the values while gRPC sends it: the message's copy of them and its
    serialised bytes."""
    return 2 * math.prod(shape) * (8 if dtype == "float64" else 4)


def _array(message: WithTensors, field: str, required: bool = True):
    """The array in ``message``'s field (raw tensors are views of the received bytes)."""
    try:
        return message.array(field, required)
    except (ValueError, OverflowError, TypeError) as exc:
        raise EngineError("invalid_shape", str(exc)[:300], field=field) from None


def _params(params) -> dict:
    out = {}
    for name, v in params.items():
        with parsing(f"params.{name[:64]}"):
            value = from_param(v)
        if value is None:
            raise EngineError("invalid_param", f"params.{name[:64]} has no value", field=f"params.{name[:64]}")
        out[name] = value
    return out


def catalog_entry(entry: dict) -> pb.CatalogEntry:
    params = []
    for name, p in entry["params"].items():
        info = pb.ParamInfo(name=name, type=p["type"], doc=p["doc"], choices=p.get("choices") or [])
        if p["default"] is not None:
            info.default_value.CopyFrom(to_param(p["default"]))
        if p["min"] is not None:
            info.min = p["min"]
        if p["max"] is not None:
            info.max = p["max"]
        exclusive = p.get("exclusive") or {}
        info.min_exclusive, info.max_exclusive = bool(exclusive.get("min")), bool(exclusive.get("max"))
        params.append(info)
    return pb.CatalogEntry(name=entry["name"], kind=entry["kind"], summary=entry["summary"], doc=entry["doc"],
                           reference=entry["reference"], pred=entry["pred"], target=entry["target"], params=params,
                           weighted_mean=bool(entry.get("weighted_mean", False)))


class LossServicer(pb_grpc.LossServiceServicer):
    def __init__(self, service: Service, max_message_bytes: int) -> None:
        self.service = service
        self.max_answer_bytes = max(1, max_message_bytes - FRAMING_BYTES)

    async def _evaluate(self, decoded: WithTensors, context, endpoint: str) -> pb.EvaluateResponse | bytes:
        """The answer: encoded EvaluateResponse bytes (raw tensors), or the message itself for typed output.
        ``decoded``: the request, its raw tensors still in the received bytes (decode_with_tensors)."""
        req = decoded.message
        out = await self.service.evaluate(
            req.loss, _array(decoded, "pred"), _array(decoded, "target"), box_format=req.box_format or "xyxy",
            reduction=req.reduction or "none", weights=_array(decoded, "weights", required=False),
            params=_params(req.params), return_grad=req.return_grad if req.HasField("return_grad") else True,
            dtype=_compute(req.compute_dtype), deadline=_deadline(context), endpoint=endpoint,
            in_stream=endpoint == "grpc_stream")
        grad = None if out.grad is None else out.grad.numpy()
        if not req.typed_output:  # raw tensors: written straight into the wire bytes, one copy
            return encode_evaluate_response(out.loss.numpy(), grad, req.request_id)
        resp = pb.EvaluateResponse(loss=to_tensor(out.loss.numpy(), True), request_id=req.request_id)
        if grad is not None:
            resp.grad.CopyFrom(to_tensor(grad, True))
        return resp

    async def Evaluate(self, request, context):
        return await _guarded(context, request, lambda: self._evaluate(request, context, "grpc_evaluate"))

    async def Metric(self, request, context):
        async def answer(values, release):
            # the message and its serialised bytes live until gRPC has sent them (a client that does not read
            # keeps them): the answer's share of LOSSD_MAX_ANSWER_BYTES_IN_FLIGHT is held until the call ends
            context.add_done_callback(lambda _context: release())
            return pb.MetricResponse(values=to_tensor(values, request.message.typed_output))

        async def work():
            msg = request.message
            return await self.service.metric(
                msg.metric, _array(request, "boxes1"), _array(request, "boxes2"),
                box_format=msg.box_format or "xyxy", pairwise=msg.pairwise, params=_params(msg.params),
                dtype=_compute(msg.compute_dtype), max_bytes=self.max_answer_bytes, endpoint="grpc_metric",
                answer=answer, answer_bytes=_message_bytes)

        return await _guarded(context, request, work)

    async def ListLosses(self, request, context):
        catalog = self.service.catalog()
        return pb.ListLossesResponse(losses=[catalog_entry(e) for e in catalog["losses"]],
                                     metrics=[catalog_entry(e) for e in catalog["metrics"]])

    async def EvaluateStream(self, request_iterator, context):
        if self.service.admission.draining:
            await abort(context, ServiceError("the server is shutting down; retry on another instance", "draining"))
        async for item in request_iterator:
            if isinstance(item, BadMessage):  # errors in place: the stream goes on
                yield pb.EvaluateStreamResponse(error=stream_error(item.error))
                continue
            try:
                resp = await self._evaluate(item, context, "grpc_stream")
            except Exception as exc:  # noqa: BLE001
                yield pb.EvaluateStreamResponse(error=stream_error(exc))
                continue
            yield wrap_field(1, resp) if isinstance(resp, bytes) else pb.EvaluateStreamResponse(response=resp)


# --------------------------------------------------------------------------------------------------- OIP


def _param(p: oip_pb.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "FP16": "fp32_contents"}


def _as_oip(decoded: WithTensors) -> tuple[dict, memoryview]:
    """The gRPC request in the protocol's neutral form (lossd.oip): a dict of inputs and parameters, and one
    buffer holding the binary inputs in order. ``decoded``: raw_input_contents left in the received bytes."""
    request = decoded.message
    # each access to raw_input_contents[i] copies; read them once
    contents = decoded.blobs if decoded.blobs is not None else list(request.raw_input_contents)
    # inputs in shared memory have no raw_input_contents (tritonclient sends the others, in order)
    on_wire = [t for t in request.inputs if "shared_memory_region" not in t.parameters]
    if contents and len(contents) != len(on_wire):
        raise ProtocolError(f"{len(contents)} raw_input_contents for {len(on_wire)} inputs not in shared memory")
    inputs, blobs = [], []
    i = 0
    for t in request.inputs:
        entry = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                 "parameters": {k: _param(v) for k, v in t.parameters.items()}}
        if t.HasField("contents") or not (contents or "shared_memory_region" in t.parameters):
            # with a region or raw_input_contents too, lossd.oip refuses the pair (as Triton does), never
            # silently reads one of the two
            entry["data"] = list(getattr(t.contents, CONTENTS.get(t.datatype, "fp32_contents")))
        if "shared_memory_region" in t.parameters:
            pass  # lossd.oip reads it from the region
        elif contents:
            blob = contents[i]
            i += 1
            entry["parameters"]["binary_data_size"] = len(blob)
            blobs.append(blob)
        inputs.append(entry)
    req = {"inputs": inputs, "parameters": {k: _param(v) for k, v in request.parameters.items()},
           "id": request.id}
    req["parameters"]["binary_data_output"] = True  # gRPC answers in raw_output_contents, as Triton does
    if request.outputs:
        req["outputs"] = [{"name": o.name, "parameters": {**{k: _param(v) for k, v in o.parameters.items()},
                                                          "binary_data": True}} for o in request.outputs]
    raw = memoryview(blobs[0]) if len(blobs) == 1 else memoryview(b"".join(blobs))
    return req, raw


def _shm_params(params: dict | None) -> dict:
    """A shared-memory output's parameters as InferParameters (binary outputs' binary_data_size stays off the
    wire: gRPC frames them itself)."""
    if not params or "shared_memory_region" not in params:
        return {}
    return {k: oip_pb.InferParameter(string_param=v) if isinstance(v, str) else oip_pb.InferParameter(int64_param=v)
            for k, v in params.items()}


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: Service, is_ready: Callable[[], bool]) -> None:
        self.service = service
        self.is_ready = is_ready

    async def ServerLive(self, request, context):
        return oip_pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return oip_pb.ServerReadyResponse(ready=self.is_ready())

    async def ModelReady(self, request, context):
        async def work():
            # an unknown model or version is not ready, not an error: Triton answers ready=false with OK (its
            # server.cc ModelIsReady), so tritonclient's is_model_ready returns False as over HTTP
            try:
                self.service.model_ready(request.name, request.version or "1")
            except (EngineError, ServiceError) as exc:
                if exc.code in ("unknown_loss", "unknown_model", "unknown_version"):
                    return oip_pb.ModelReadyResponse(ready=False)
                raise
            return oip_pb.ModelReadyResponse(ready=self.is_ready())

        return await _guarded(context, request, work)

    async def ServerMetadata(self, request, context):
        return oip_pb.ServerMetadataResponse(**server_metadata(self.service.settings.max_shm_regions > 0))

    async def ModelMetadata(self, request, context):
        async def work():
            meta = self.service.model_metadata(request.name, request.version or "1")
            tm = oip_pb.ModelMetadataResponse.TensorMetadata
            return oip_pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[tm(name=i["name"], datatype=i["datatype"], shape=i["shape"]) for i in meta["inputs"]],
                outputs=[tm(name=o["name"], datatype=o["datatype"], shape=o["shape"]) for o in meta["outputs"]])

        return await _guarded(context, request, work)

    async def ModelConfig(self, request, context):
        async def work():
            cfg = self.service.model_config(request.name, request.version or "1")
            dt = oip_pb.DataType.Value

            def tensor(cls, t: dict):
                extra = {"optional": True} if t.get("optional") else {}
                return cls(name=t["name"], data_type=dt(t["data_type"]), dims=t["dims"], **extra)

            return oip_pb.ModelConfigResponse(config=oip_pb.ModelConfig(
                name=cfg["name"], platform=cfg["platform"], backend=cfg["backend"],
                max_batch_size=cfg["max_batch_size"], input=[tensor(oip_pb.ModelInput, t) for t in cfg["input"]],
                output=[tensor(oip_pb.ModelOutput, t) for t in cfg["output"]]))

        return await _guarded(context, request, work)

    async def ModelStatistics(self, request, context):
        async def work():
            def duration(d: dict):
                return oip_pb.StatisticDuration(count=d["count"], ns=d["ns"])

            stats = self.service.model_statistics(request.name, request.version)
            return oip_pb.ModelStatisticsResponse(model_stats=[oip_pb.ModelStatistics(
                name=m["name"], version=m["version"], last_inference=m["last_inference"],
                inference_count=m["inference_count"], execution_count=m["execution_count"],
                inference_stats=oip_pb.InferStatistics(**{k: duration(v) for k, v in m["inference_stats"].items()}))
                for m in stats])

        return await _guarded(context, request, work)

    async def RepositoryIndex(self, request, context):
        index = oip_pb.RepositoryIndexResponse.ModelIndex
        return oip_pb.RepositoryIndexResponse(models=[index(**m) for m in self.service.repository_index()])

    async def ModelInfer(self, decoded, context):
        async def work():
            msg = decoded.message
            self.service.model_ready(msg.model_name, msg.model_version or "1")
            size = sum(len(b) for b in decoded.blobs) if decoded.blobs is not None else msg.ByteSize()
            call_resp, out_blobs = await self.service.infer(msg.model_name, lambda: _as_oip(decoded), size=size,
                                                            deadline=_deadline(context), endpoint="grpc_infer",
                                                            peer=context.peer())
            head = oip_pb.ModelInferResponse(
                model_name=call_resp["model_name"], model_version="1", id=msg.id,
                outputs=[oip_pb.ModelInferResponse.InferOutputTensor(
                    name=o["name"], datatype=o["datatype"], shape=o["shape"],
                    parameters=_shm_params(o.get("parameters")))
                         for o in call_resp["outputs"]])
            # raw_output_contents (field 6) written straight into the wire bytes
            return encode_message(head, {}, (6, out_blobs))

        return await _guarded(context, decoded, work)

    # ----------------------------------------------------------------------- Triton's system shared memory
    async def SystemSharedMemoryStatus(self, request, context):
        async def work():
            status = oip_pb.SystemSharedMemoryStatusResponse.RegionStatus
            regions = self.service.shm_status(context.peer(), request.name)
            return oip_pb.SystemSharedMemoryStatusResponse(regions={r["name"]: status(**r) for r in regions})

        return await _guarded(context, request, work)

    async def SystemSharedMemoryRegister(self, request, context):
        async def work():
            self.service.shm_register(context.peer(), request.name, request.key, request.offset, request.byte_size)
            return oip_pb.SystemSharedMemoryRegisterResponse()

        return await _guarded(context, request, work)

    async def SystemSharedMemoryUnregister(self, request, context):
        async def work():
            self.service.shm_unregister(context.peer(), request.name)
            return oip_pb.SystemSharedMemoryUnregisterResponse()

        return await _guarded(context, request, work)
