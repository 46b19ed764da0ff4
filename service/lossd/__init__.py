"""lossd: a loss-evaluation service for object detection (engine, REST, gRPC, batch jobs, CLI)."""

__version__ = "0.1.0"
