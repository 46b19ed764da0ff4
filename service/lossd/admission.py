"""Admission control shared by both transports: a bounded number of requests in the server at once, and the
drain state. Past the limit a request is refused at once (REST 429 + Retry-After, gRPC RESOURCE_EXHAUSTED)
instead of queueing without bound; while draining (SIGTERM) new work is refused with 503 / UNAVAILABLE.

It also turns resource faults (a CUDA out-of-memory) into a clear, retryable error for the one request that hit
them: ``ResourceExhausted``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from .errors import Draining, Overloaded, ResourceExhausted  # noqa: F401  (raised here; re-exported)


class Admission:
    def __init__(self, max_in_flight: int, retry_after: float = 1.0) -> None:
        self.max_in_flight = max_in_flight
        self.retry_after = retry_after
        self.in_flight = 0
        self.draining = False
        self.admitted = 0
        self.shed = 0

    @contextlib.contextmanager
    def admit(self, in_flight_stream: bool = False) -> Iterator[None]:
        """Hold a slot for the body of the with-block; raise Overloaded/Draining when there is none. Runs on the
        event loop only, so the counter needs no lock. ``in_flight_stream``: an item of a stream that began before
        the drain, which may still finish."""
        if self.draining and not in_flight_stream:
            raise Draining("the server is shutting down; retry on another instance")
        if self.in_flight >= self.max_in_flight:
            self.shed += 1
            raise Overloaded(f"{self.in_flight} requests in flight, the limit is {self.max_in_flight} "
                             f"(LOSSD_MAX_IN_FLIGHT); retry after {self.retry_after:g} s",
                             retry_after=self.retry_after)
        self.in_flight += 1
        self.admitted += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())
