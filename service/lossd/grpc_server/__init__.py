"""gRPC transport: lossd.v1.LossService and the Open Inference Protocol's GRPCInferenceService, over one engine."""

from .server import GrpcServer

__all__ = ["GrpcServer"]
