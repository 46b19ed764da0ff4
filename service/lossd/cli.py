"""The `lossd` command: serve, list the catalog, or run a small demo of the engine."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .rest import create_app

    overrides = {k: v for k, v in {"host": args.host, "http_port": args.http_port, "grpc_port": args.grpc_port,
                                   "device": args.device}.items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings=settings, start_grpc=True)
    config = uvicorn.Config(app, host=settings.host, port=settings.http_port, log_level=settings.log_level,
                            access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None)
    server = uvicorn.Server(config)
    server.run()
    return 0


def _losses(args: argparse.Namespace) -> int:
    from .engine import Engine

    catalog = Engine.losses()
    if args.json:
        json.dump(catalog, sys.stdout, indent=2)
        print()
        return 0
    for entry in catalog:
        params = ", ".join(f"{k}={v['default']}" for k, v in entry["params"].items())
        print(f"{entry['name']:<20} {entry['kind']:<15} {params}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .engine import Engine

    engine = Engine(device=args.device or "auto")
    pred = [[0, 0, 10, 10], [5, 5, 15, 20]]
    target = [[1, 1, 11, 11], [5, 5, 15, 15]]
    print(f"engine on {engine.device}, warm in {engine.warm_seconds:.2f}s")
    for name in ("iou", "giou", "diou", "ciou", "eiou", "siou"):
        out = engine.evaluate(name, pred, target)
        print(f"{name:<5} loss={out.loss.tolist()} grad[0]={[round(g, 4) for g in out.grad[0].tolist()]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lossd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the REST (and gRPC) server over a warm engine")
    serve.add_argument("--host", help="bind address (default 127.0.0.1; LOSSD_HOST)")
    serve.add_argument("--http-port", type=int, help="REST port (default 8000; LOSSD_HTTP_PORT)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; LOSSD_GRPC_PORT)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="engine device (default auto; LOSSD_DEVICE)")
    serve.set_defaults(func=_serve)
    ls = sub.add_parser("losses", help="list the catalog")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_losses)
    demo = sub.add_parser("demo", help="evaluate a few box losses in-process")
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"])
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
