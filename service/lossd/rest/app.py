"""The FastAPI app factory. The engine is built and warmed in the lifespan (or handed in by a test)."""

from __future__ import annotations

import gc
import logging
import threading
from contextlib import asynccontextmanager

import anyio
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..admission import Admission
from ..bodyparse import BigJsonParser
from ..engine import Engine
from ..service import Observability, Service
from ..settings import Settings, host_port
from . import docs, errors, losses, metrics, oip, playground
from .deps import require_api_key
from .guard import HeadAsGet, OriginGuard
from .limits import BodyLimitMiddleware

log = logging.getLogger("lossd.rest")
# what a page on an allowed origin may read beyond the CORS-safelisted headers: the binary framing and the
# error details (lossd.errors.ErrorInfo.headers; an OIP error body is a bare string)
EXPOSED_HEADERS = ["Inference-Header-Content-Length", "lossd-error-code", "lossd-error-field", "lossd-error-rows",
                   "retry-after"]


def create_app(engine: Engine | None = None, settings: Settings | None = None, *, start_grpc: bool = False) -> FastAPI:
    """The REST app; with start_grpc the gRPC server runs on the same event loop and engine (lossd serve)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.engine is None:
            # construction is cheap; warming (CUDA init, first kernels) runs off the event loop while
            # /v2/health/live already answers and /v2/health/ready says 503
            app.state.engine = Engine(device=settings.device, warm=False, max_pairwise=settings.max_pairwise_bytes // 4,
                                      max_rows=settings.max_rows)
        eng = app.state.engine
        service = Service(eng, settings, admission=app.state.admission, obs=app.state.obs)
        app.state.service = service
        app.state.batcher = service.batcher
        grpc_server = None
        if start_grpc:
            from ..grpc_server import GrpcServer

            grpc_server = GrpcServer(service, settings,
                                     is_ready=lambda: app.state.ready.is_set() and not app.state.draining)
            await grpc_server.start()
            app.state.grpc_port = grpc_server.port
            app.state.grpc_server = grpc_server

        async def warm() -> None:
            if eng.warm_seconds is None:
                await anyio.to_thread.run_sync(eng.warm_up)
            if app.state.draining:  # the server stopped while the engine warmed (e.g. its port was taken)
                return
            if settings.gc_freeze:
                # torch, numba, grpc and FastAPI leave ~300k long-lived objects; a full collection walks them all
                # (measured: 112 ms, a stall every few thousand requests that set the p99 under load). Frozen,
                # they are left out of collections; what is garbage now is collected first.
                gc.collect()
                gc.freeze()
            if grpc_server is not None:
                await grpc_server.set_serving()
            app.state.ready.set()
            where = f", gRPC on {host_port(settings.host, grpc_server.port)}" if grpc_server else ""
            log.info("lossd ready: REST on %s%s, engine on %s, warm in %.2fs", host_port(settings.host,
                     settings.http_port), where, eng.device, eng.warm_seconds or 0.0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(warm)
            try:
                yield
            finally:
                app.state.json_parser.close()
            # shutting down (SIGTERM): readiness goes false first, then in-flight gRPC calls get the grace period
            app.state.draining = True
            app.state.admission.draining = True
            if grpc_server is not None:
                await grpc_server.stop(settings.shutdown_grace_seconds)
            tg.cancel_scope.cancel()
            log.info("lossd stopped: in-flight calls drained")

    # docs_url/redoc_url off: docs.install serves both pages with local assets (offline)
    app = FastAPI(title="lossd", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Loss-evaluation service for object detection: IoU-family scores, losses and "
                              "gradients. /v1 is lossd's own API; /v2 is the Open Inference Protocol.")
    app.state.engine = engine
    app.state.settings = settings
    app.state.ready = threading.Event()
    app.state.draining = False
    app.state.obs = Observability()
    app.state.json_parser = BigJsonParser()
    app.state.admission = Admission(settings.max_in_flight)
    errors.install(app)
    docs.install(app)
    # open without a key: liveness, readiness, server metadata and /metrics (labels are catalog names only);
    # everything else needs one when keys are configured, the same set over gRPC (README: authentication)
    guarded = [Depends(require_api_key)]
    app.include_router(losses.router, dependencies=guarded)
    app.include_router(metrics.router, dependencies=guarded)
    app.include_router(oip.router)
    app.include_router(oip.keyed)
    app.include_router(playground.router)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(app.state.obs.registry), media_type=CONTENT_TYPE_LATEST)

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=EXPOSED_HEADERS)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout_seconds)
    app.add_middleware(OriginGuard, settings=settings)  # web pages are refused at once
    app.add_middleware(HeadAsGet)  # added last, runs first
    return app
