"""The grpc.aio server: both services, health (grpc.health.v1) and reflection, on the caller's event loop."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from lossd_client.wire import SMALL_MESSAGE, decode_field, decode_with_tensors, passthrough
from lossd_client.wire import oip_pb
from lossd_client.wire import pb

from ..auth import key_matches, request_key
from ..service import Service
from ..settings import Settings, host_port
from ..errors import ServiceError
from .errors import abort
from .servicers import BadMessage, InferenceServicer, LossServicer

UNAUTHORIZED = ServiceError("a valid API key is required (metadata x-api-key or authorization: Bearer <key>; "
                            "one key per call)", "unauthorized")

log = logging.getLogger("lossd.grpc")


class _PeerGone(logging.Filter):
    """grpc logs an ERROR with a traceback whenever an answer cannot be sent because the client is gone (it
    cancelled, timed out, or refused an answer over its receive limit). That is the client's doing, one line per
    call at most, and a hostile client could otherwise fill the log with tracebacks: kept as one debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "ExecuteBatchError" in record.getMessage():
            log.debug("answer not delivered, the client is gone: %s", record.getMessage())
            return False
        return True


logging.getLogger("grpc._cython.cygrpc").addFilter(_PeerGone())

SERVICES = (pb.DESCRIPTOR.services_by_name["LossService"].full_name,
            oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)


HANDLER = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
           (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


# lossd.v1 requests whose raw tensors stay in the received bytes (servicers read them as WithTensors)
LOSS_DECODERS = {
    "Evaluate": partial(decode_with_tensors, pb.EvaluateRequest, min_bytes=SMALL_MESSAGE),
    "Metric": partial(decode_with_tensors, pb.MetricRequest, min_bytes=SMALL_MESSAGE),
    "EvaluateStream": partial(decode_field, pb.EvaluateRequest, 1, outer_cls=pb.EvaluateStreamRequest,
                              min_bytes=SMALL_MESSAGE),
}

# ModelInfer's raw_input_contents (field 7) stay in the received bytes
OIP_DECODERS = {"ModelInfer": partial(decode_with_tensors, oip_pb.ModelInferRequest, min_bytes=SMALL_MESSAGE,
                                      blobs_field=7)}


def _tolerant(parse, method: str):
    """A request parser that never raises: bytes that are not the message become a BadMessage, answered with
    INVALID_ARGUMENT by the servicer."""

    def parse_or_flag(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 (DecodeError, ValueError, RecursionError, ...)
            return BadMessage(method, exc)

    return parse_or_flag


def _refusing_bad_messages(behavior, request_streaming: bool):
    """A third-party servicer's method, made to answer INVALID_ARGUMENT for a request that is a BadMessage (our
    own servicers check for it themselves, and answer stream items in place)."""
    if not request_streaming:
        async def unary_request(request, context):
            if isinstance(request, BadMessage):
                await abort(context, request.error)
            return await behavior(request, context)

        return unary_request

    async def checked(requests, context):
        async for request in requests:
            if isinstance(request, BadMessage):
                await abort(context, request.error)
            yield request

    async def streaming_request(requests, context):
        async for response in behavior(checked(requests, context), context):
            yield response

    return streaming_request


def add_service(server: grpc.aio.Server, servicer, module, service_name: str, encoded: set[str],
                decoders: dict | None = None, third_party: bool = False) -> None:
    """What the generated add_XServicer_to_server does, except that the methods in ``encoded`` may answer with
    already-encoded bytes (raw tensors written straight into the wire format by lossd_client.wire) as well as
    with messages, and ``decoders`` replace the request parsers of some methods."""
    service = module.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        make = HANDLER[(method.client_streaming, method.server_streaming)]
        response = getattr(module, method.output_type.name)
        parse = (decoders or {}).get(method.name, getattr(module, method.input_type.name).FromString)
        behavior = getattr(servicer, method.name)
        if third_party:
            behavior = _refusing_bad_messages(behavior, method.client_streaming)
        handlers[method.name] = make(behavior, request_deserializer=_tolerant(parse, method.name),
                                     response_serializer=passthrough if method.name in encoded
                                     else response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


OIP_SERVICE = "/" + oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name + "/"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health, liveness/readiness, server metadata and reflection must carry one configured key
    (metadata x-api-key or authorization: Bearer): the same open set and rule as REST (rest/oip.py's open
    router)."""

    OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.") + tuple(
        OIP_SERVICE + m for m in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata"))

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

        async def deny(request, context):
            await abort(context, UNAUTHORIZED)

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(self.OPEN):
            return await continuation(details)
        given = request_key(details.invocation_metadata or ())
        if key_matches(given, self.keys):
            return await continuation(details)
        handler = await continuation(details)
        if handler is not None and handler.request_streaming:
            async def deny_stream(request_iterator, context):
                await abort(context, UNAUTHORIZED)
                yield  # pragma: no cover

            return grpc.stream_stream_rpc_method_handler(deny_stream)
        return self._deny_unary


class GrpcServer:
    """Start with ``await start()``; ``set_serving()`` once the engine is warm; ``await stop(grace)`` drains."""

    def __init__(self, service: Service, settings: Settings, is_ready: Callable[[], bool]) -> None:
        host, port = settings.host, settings.grpc_port
        opts = [("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
                ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
                # idle and old connections go away (clients reconnect, spread over replicas); clients may ping
                # to keep a connection, but not more often than every 10 s, and not without calls in flight
                ("grpc.max_connection_idle_ms", int(settings.grpc_max_connection_idle_seconds * 1000)),
                ("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_seconds * 1000)),
                ("grpc.max_connection_age_grace_ms", int(max(settings.shutdown_grace_seconds, 1) * 1000)),
                ("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 0),
                ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
                ("grpc.max_metadata_size", 16 * 1024),
                # without this a second `lossd serve` on the same port binds too and silently takes a share of
                # the connections; with it, the bind fails and the second server exits
                ("grpc.so_reuseport", 0)]
        interceptors = [ApiKeyInterceptor(settings.api_keys)] if settings.api_keys else []
        self.server = grpc.aio.server(options=opts, interceptors=interceptors)
        add_service(self.server, LossServicer(service, settings.grpc_max_message_bytes), pb, "LossService",
                    encoded={"Evaluate", "EvaluateStream"}, decoders=LOSS_DECODERS)
        add_service(self.server, InferenceServicer(service, is_ready), oip_pb,
                    "GRPCInferenceService", encoded={"ModelInfer"}, decoders=OIP_DECODERS)
        # health and reflection are added like our own services, so that bytes that are not their messages get
        # INVALID_ARGUMENT too (their generated adders would answer UNKNOWN and log a traceback)
        self.health = health.aio.HealthServicer()
        add_service(self.server, self.health, health_pb2, "Health", encoded=set(), third_party=True)
        add_service(self.server, reflection.aio.ReflectionServicer(
            SERVICES + (health.SERVICE_NAME, reflection.SERVICE_NAME)), reflection_pb2, "ServerReflection",
            encoded=set(), third_party=True)
        try:
            if settings.tls_cert and settings.tls_key:
                creds = grpc.ssl_server_credentials([(Path(settings.tls_key).read_bytes(),
                                                      Path(settings.tls_cert).read_bytes())])
                self.port = self.server.add_secure_port(host_port(host, port), creds)
            else:
                self.port = self.server.add_insecure_port(host_port(host, port))
        except RuntimeError:  # grpc's own message points at GRPC_VERBOSITY, not at the setting
            self.port = 0
        if self.port == 0:
            raise RuntimeError(f"LOSSD_GRPC_PORT / --grpc-port: could not bind gRPC to {host_port(host, port)} (in use, or "
                               "LOSSD_HOST is not an address of this machine)")
        self.host = host

    async def start(self) -> None:
        for name in ("",) + SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("gRPC listening on %s", host_port(self.host, self.port))

    async def set_not_serving(self) -> None:
        for name in ("",) + SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def set_serving(self) -> None:
        for name in ("",) + SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
