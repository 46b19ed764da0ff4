"""The grpc.aio server: both services, health (grpc.health.v1) and reflection, on the caller's event loop."""

from __future__ import annotations

import logging
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lossd_client._proto.inference import grpc_predict_v2_pb2 as oip_pb
from lossd_client._proto.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from lossd_client._proto.lossd.v1 import lossd_pb2 as pb
from lossd_client._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc

from ..batching import Batcher
from ..engine import Engine
from .servicers import InferenceServicer, LossServicer

log = logging.getLogger("lossd.grpc")

SERVICES = (pb.DESCRIPTOR.services_by_name["LossService"].full_name,
            oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)


class GrpcServer:
    """Start with ``await start()``; ``set_serving()`` once the engine is warm; ``await stop(grace)`` drains."""

    def __init__(self, engine: Engine, batcher: Batcher, host: str, port: int, max_message_bytes: int,
                 is_ready: Callable[[], bool]) -> None:
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)]
        self.server = grpc.aio.server(options=opts)
        pb_grpc.add_LossServiceServicer_to_server(LossServicer(engine, batcher), self.server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(engine, batcher, is_ready), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(SERVICES + (health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC to {host}:{port}")
        self.host = host

    async def start(self) -> None:
        for name in ("",) + SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("gRPC listening on %s:%d", self.host, self.port)

    async def set_serving(self) -> None:
        for name in ("",) + SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
