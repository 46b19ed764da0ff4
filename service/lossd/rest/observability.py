"""Prometheus metrics for the REST transport: requests by endpoint/loss/outcome, latency, batch size, in-flight."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine import EngineError

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)


class Tracker:
    def __init__(self) -> None:
        self.batch_size: int | None = None


class Observability:
    """One registry per app, so several apps (tests) never collide in the global registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lossd_requests_total", "Requests by endpoint, loss/metric and outcome",
                                ["endpoint", "name", "outcome"], registry=self.registry)
        self.latency = Histogram("lossd_request_duration_seconds", "Handler latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("lossd_batch_size", "Rows per request", ["endpoint"], buckets=BATCH_BUCKETS,
                               registry=self.registry)
        self.in_flight = Gauge("lossd_in_flight_requests", "Requests being handled", registry=self.registry)

    @contextmanager
    def track(self, endpoint: str, name: str) -> Iterator[Tracker]:
        tracker = Tracker()
        outcome = "ok"
        self.in_flight.inc()
        t0 = time.perf_counter()
        try:
            yield tracker
        except EngineError as exc:
            outcome = exc.code
            raise
        except Exception as exc:
            outcome = getattr(exc, "code", "error")
            raise
        finally:
            self.in_flight.dec()
            self.latency.labels(endpoint).observe(time.perf_counter() - t0)
            self.requests.labels(endpoint, name, outcome).inc()
            if tracker.batch_size is not None:
                self.batch.labels(endpoint).observe(tracker.batch_size)
