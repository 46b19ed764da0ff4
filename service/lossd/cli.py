"""The `lossd` command: serve, list the catalog, run a small demo of the engine, or check a dataset's labels."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .settings import Settings


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help line, except where there is none to show (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .allocator import tune_malloc
    from .rest import create_app
    from .settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "http_port": args.http_port, "grpc_port": args.grpc_port,
                                   "device": args.device}.items() if v is not None}
    settings = Settings(**overrides)
    _check_serve_settings(settings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_malloc(settings.malloc_retain_mb * 2**20)
    app = create_app(settings=settings, start_grpc=True)
    from .rest.limits import guarded_protocol

    _raise_open_files(settings.max_connections + 1024)
    tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key} if settings.tls_cert else {}
    config = uvicorn.Config(app, host=settings.host, port=settings.http_port, log_level=settings.log_level,
                            access_log=False, lifespan="on",
                            http=guarded_protocol(settings.max_header_bytes, settings.header_timeout_seconds,
                                                  settings.max_connections),
                            # idle connections past the cap are evicted (rest/limits.py); uvicorn's own 503 is the
                            # backstop when twice the cap hold requests (a closed connection leaves the count a
                            # moment later, so the cap itself would refuse the very client an eviction made room for)
                            limit_concurrency=2 * settings.max_connections,
                            timeout_keep_alive=settings.keep_alive_seconds,
                            timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None, **tls)
    server = _DrainingServer(config, app, settings.drain_seconds)
    try:
        server.run()
    except KeyboardInterrupt:
        # uvicorn re-raises the Ctrl-C it caught once the graceful shutdown is done (asyncio turns it into
        # KeyboardInterrupt); the shutdown has been logged ("lossd stopped"), so exit as an interrupted command
        if not server.should_exit:
            raise
        return 130
    return 0


class _StartupError(ValueError):
    """A setting `lossd serve` cannot start with; the message names it (printed on one line, exit 2)."""


def _check_serve_settings(settings: Settings) -> None:
    """What would otherwise fail inside the server's start-up as a traceback: TLS files, the device, the ports."""
    for name, path in (("LOSSD_TLS_CERT", settings.tls_cert), ("LOSSD_TLS_KEY", settings.tls_key)):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise _StartupError(f"{name}={path}: cannot read it: {exc.strerror or exc}") from None
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise _StartupError("LOSSD_TLS_CERT and LOSSD_TLS_KEY go together: set both or neither")
    if settings.tls_cert and settings.tls_key:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(settings.tls_cert, settings.tls_key)
        except ssl.SSLError as exc:
            raise _StartupError(f"LOSSD_TLS_CERT={settings.tls_cert}, LOSSD_TLS_KEY={settings.tls_key}: not a PEM "
                                f"certificate and its private key ({exc.reason or exc})") from None
    _check_device(settings.device, "LOSSD_DEVICE / --device")
    if settings.http_port and settings.http_port == settings.grpc_port:
        raise _StartupError(f"LOSSD_HTTP_PORT / --http-port and LOSSD_GRPC_PORT / --grpc-port are both "
                            f"{settings.http_port}: REST and gRPC need a port each")
    for name, flag, port in (("LOSSD_HTTP_PORT", "--http-port", settings.http_port),
                             ("LOSSD_GRPC_PORT", "--grpc-port", settings.grpc_port)):
        _check_port_free(settings.host, port, f"{name} / {flag} {port}")  # port 0 checks the host


def _check_device(device: str, what: str) -> None:
    """A device torch cannot use here (cuda without a GPU, cuda:N past the last one, mps, ...) as one line."""
    if device == "auto":
        return
    from .engine import pick_device

    try:
        pick_device(device)
    except (ValueError, RuntimeError) as exc:
        raise _StartupError(f"{what} {device}: {str(exc).split(': ', 1)[-1]}") from None


def _check_port_free(host: str, port: int, what: str) -> None:
    import errno
    import socket

    from .settings import host_port

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise _StartupError(f"LOSSD_HOST / --host {host}: not an address to bind: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # as the servers bind: an earlier server's connections in TIME_WAIT do not count as the port in use
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise _StartupError(f"{what}: {host_port(host, port)} is already in use (another lossd serve?); "
                                    "pick a free port, or 0 for any") from None
            raise _StartupError(f"{what}: cannot bind {host_port(host, port)}: {exc.strerror or exc}") from None


def _raise_open_files(wanted: int) -> None:
    """Each connection is a file descriptor: lift the soft limit toward LOSSD_MAX_CONNECTIONS (and no further
    than the hard limit), so the connection cap, not the OS, decides who is refused."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


class _DrainingServer:
    """uvicorn.Server whose first SIGTERM/SIGINT first makes readiness false (REST /v2/health/ready 503, gRPC
    health NOT_SERVING, new work 503/UNAVAILABLE) for drain_seconds, so load balancers stop sending; then the
    normal graceful shutdown lets in-flight requests finish. A second signal exits at once."""

    def __new__(cls, config, app, drain_seconds: float):
        import asyncio

        import uvicorn

        class Server(uvicorn.Server):
            draining = False

            def handle_exit(self, sig, frame) -> None:
                if self.draining or drain_seconds <= 0:
                    _mark_draining(app)
                    return super().handle_exit(sig, frame)
                self.draining = True
                _mark_draining(app)
                loop = asyncio.get_event_loop()
                grpc_server = getattr(app.state, "grpc_server", None)
                if grpc_server is not None:
                    loop.call_soon_threadsafe(lambda: loop.create_task(grpc_server.set_not_serving()))
                loop.call_soon_threadsafe(loop.call_later, drain_seconds, super().handle_exit, sig, frame)

        return Server(config)


def _mark_draining(app) -> None:
    app.state.draining = True
    app.state.admission.draining = True


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

    _check_device(args.device or "auto", "--device")
    engine = Engine(device=args.device or "auto")
    pred = [[0, 0, 10, 10], [5, 5, 15, 20]]
    target = [[1, 1, 11, 11], [5, 5, 15, 15]]
    print(f"engine on {engine.device}, warm in {engine.warm_seconds:.2f}s")
    for name in ("iou", "giou", "diou", "ciou", "eiou", "siou"):
        out = engine.evaluate(name, pred, target)
        print(f"{name:<5} loss={out.loss.tolist()} grad[0]={[round(g, 4) for g in out.grad[0].tolist()]}")
    return 0


class _QualityHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where an option has none (its help says what happens then)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def _quality(args: argparse.Namespace) -> int:
    try:
        from lossd_client import LossdError
    except Exception:  # noqa: BLE001 - only --server needs the client; in-process scoring must not depend on it
        LossdError = ()  # catches nothing
    from .quality import InputError, Thresholds, run

    if not args.server and args.ray is None:  # a Ray worker may have the GPU this process lacks
        _check_device(args.device, "--device")
    th = Thresholds(conf=args.conf, ok_iou=args.ok_iou, missing_conf=args.missing_conf, match_iou=args.match_iou,
                    wrong_class_iou=args.wrong_class_iou, support_iou=args.support_iou, loss=args.loss)
    try:
        summary = run(args.labels, args.reference, args.out, th=th, shard_size=args.shard_size, server=args.server,
                      use_ray=args.ray is not None, ray_address=args.ray or None, image_dir=args.images,
                      classes=args.classes, sizes=args.sizes, device=args.device or "auto",
                      progress=not args.no_progress, api_key=args.api_key or os.environ.get("LOSSD_API_KEY"))
    except InputError as exc:
        print(f"lossd quality: error: {exc}", file=sys.stderr)
        return 2
    except LossdError as exc:
        print(f"lossd quality: error: server {args.server}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("images", "labels", "references", "by_issue", "seconds")}, indent=2))
    print(f"wrote {os.path.join(args.out, 'report.html')}, boxes, references and images (.parquet, .csv), "
          "problems.csv, summary.json")
    for note in summary.get("notes", ()):
        print(f"lossd quality: note: {note}", file=sys.stderr)
    for w in summary["warnings"]:
        print(f"lossd quality: warning: {w}", file=sys.stderr)
    return 3 if summary["warnings"] else 0


def _simulate(args: argparse.Namespace) -> int:
    from .simulate import ablation, run

    if args.paper_ablation:
        ablation(cases=args.cases or 34_300, iterations=args.iterations, seed=args.seed, out=args.out,
                 progress=not args.no_progress)
        print(open(os.path.join(args.out, "ablation.md")).read())
        return 0

    losses = None
    if args.losses and args.losses != "all":
        from .simulate import PAPER_LOSSES

        losses = list(PAPER_LOSSES) if args.losses == "paper" else [x for x in args.losses.split(",") if x]
    server = None if args.local else args.server or SIM_SERVER
    if args.local or args.paper_gradients:
        _check_device(args.device or "cpu", "--device")
    try:
        summary = run(losses=losses, cases=args.cases, iterations=args.iterations, seed=args.seed, out=args.out,
                      server=server, api_key=args.api_key or os.environ.get("LOSSD_API_KEY"),
                      device=args.device or "cpu", shards=args.shards,
                      map_losses=args.map.split(",") if args.map else None, progress=not args.no_progress,
                      force=args.force, paper_gradients=args.paper_gradients)
    except Exception as exc:
        from lossd_client import UnavailableError

        if server is None or not isinstance(exc, UnavailableError):
            raise
        print(f"lossd simulate: error: cannot reach the server at {server} ({exc}); start one with "
              "`lossd serve`, name another with --server URL, or run in this process with --local", file=sys.stderr)
        return 2
    for row in summary["losses"]:
        print(json.dumps(row))
    if summary["paper_losses_seconds"] is not None:
        print(f"paper's four losses: {summary['paper_losses_seconds']:.1f} s ({summary['backend']})")
    print(f"wrote {args.out}: table.csv/.json/.md, " + ", ".join(os.path.basename(p) for p in summary["plots"]))
    return 130 if summary["interrupted"] else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def _bounded_int(high: int, why: str):
    """A whole number in [1, high]; `why` says where the bound comes from."""

    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:,} ({why}), got {value:,}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


# each shard is a thread with one request in flight: beyond a few per server core nothing runs faster, and a server
# answers more than LOSSD_MAX_IN_FLIGHT (512 by default) requests at once with `overloaded`
MAX_SHARDS = 64
MAX_ITERATIONS = 100_000  # each iteration is a step of every case and a point (8 bytes) of every curve and record
SIM_SERVER = "http://127.0.0.1:8000"
PAPER_CASES = 1_715_000  # simulate.POINTS * simulate.CASES_PER_POINT (not imported here: numba loads slowly)


def _names(text: str) -> str:
    """Comma-separated names, each once, in the order given; none at all is refused (it would mean every loss)."""
    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"give one or more comma-separated names, got {text!r}")
    return ",".join(names)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port in [0, 65535], got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in [0, 65535], got {text}")
    return value


def _run(args: argparse.Namespace) -> int:
    """A subcommand, with the errors a user can cause (bad settings, inputs, servers) as one line and exit 2."""
    from pydantic import ValidationError

    from lossd_client import LossdError

    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return rc
    except BrokenPipeError:
        # `lossd losses | head -1`: the reader has what it wanted; end quietly like other Unix tools (status
        # 128 + SIGPIPE), with stdout pointed at /dev/null so the interpreter's own flush at exit says nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        hint = ""
        if args.command == "quality":
            hint = (f"; the shards done are kept in {os.path.join(args.out, 'shards')}: run the same command again "
                    "to go on")
        print(f"lossd {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except ValidationError as exc:  # LOSSD_* settings
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        msg = str(first.get("msg")).removeprefix("Value error, ")
        if not msg.startswith(f"LOSSD_{where.upper()}"):
            msg = f"LOSSD_{where.upper()}: {msg}"
        print(f"lossd {args.command}: error: {msg}", file=sys.stderr)
    except (LossdError, OSError, ValueError) as exc:
        print(f"lossd {args.command}: error: {exc}", file=sys.stderr)
    except Exception as exc:
        # an EngineError can only come from a command that imported the engine; `lossd simulate --server`
        # never does (no torch in that process)
        engine_errors = sys.modules.get("lossd.engine.errors")
        if engine_errors is None or not isinstance(exc, engine_errors.EngineError):
            raise
        print(f"lossd {args.command}: error: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # while the parser is built (its imports) or the arguments are read
        print("lossd: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="lossd", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"lossd {__version__}")
    # every subcommand's parser gets the same formatter
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_HelpFormatter))
    serve = sub.add_parser("serve", help="start the REST (and gRPC) server over a warm engine")
    serve.add_argument("--host", help="bind address (default 127.0.0.1; LOSSD_HOST)")
    serve.add_argument("--http-port", type=_port, help="REST port (default 8000; LOSSD_HTTP_PORT)")
    serve.add_argument("--grpc-port", type=_port, help="gRPC port (default 50051; LOSSD_GRPC_PORT)")
    serve.add_argument("--device", help="engine device: auto, cpu, cuda or cuda:N (default auto; LOSSD_DEVICE)")
    serve.set_defaults(func=_serve)
    ls = sub.add_parser("losses", help="list the catalog")
    ls.add_argument("--json", action="store_true", help="the whole catalog as JSON")
    ls.set_defaults(func=_losses)
    demo = sub.add_parser("demo", help="evaluate a few box losses in-process")
    demo.add_argument("--device", default="auto", help="engine device: auto, cpu, cuda or cuda:N")
    demo.set_defaults(func=_demo)
    q = sub.add_parser("quality", help="score a dataset's boxes against a reference and flag likely label errors",
                       formatter_class=_QualityHelp,
                       epilog="Exit codes: 0 done; 2 an input could not be read (the message names the file); "
                              "3 done, but most rows were rejected or most labels have no reference on them "
                              "(a warning says which).")
    q.add_argument("labels", help="COCO instances .json, or a folder of VOC .xml or YOLO .txt files")
    q.add_argument("reference", help="model predictions (COCO results .json, YOLO .txt with confidences) or a "
                                     "second annotator's labels, in any of the same formats")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--images", help="folder of the images, to draw boxes on them in the report (only files inside "
                                    "it are read)")
    q.add_argument("--classes", help="YOLO: class names, one per line (default <folder>/classes.txt)")
    q.add_argument("--sizes", help="YOLO: image sizes as CSV image,width,height (default <folder>/sizes.csv)")
    q.add_argument("--server", help="score on running lossd servers instead of an engine in this process, e.g. "
                                    "grpc://127.0.0.1:50051 (streaming call); several, comma-separated, or "
                                    "dns:///host:port spread the shards over them with failover; with --ray the "
                                    "Ray workers call them")
    q.add_argument("--api-key", help="API key for --server (or LOSSD_API_KEY); with --ray it goes to the workers")
    q.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="distribute shards over Ray (a local Ray when no address is given; pip install "
                        '-e ".[ray]" in the clone); each worker loads an engine, or calls the --server servers when given')
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="engine device (in this process, or on each Ray worker; unused with --server)")
    q.add_argument("--shard-size", type=_positive_int, default=500, help="images per shard (the unit of resumption)")
    from .quality.score import Thresholds

    d = Thresholds()
    cal = "calibrated per class from the data"
    q.add_argument("--conf", type=_fraction, default=d.conf,
                   help=f"references from this confidence up are trusted to match and flag (default: {cal})")
    q.add_argument("--ok-iou", type=_fraction, default=d.ok_iou,
                   help=f"matched IoU from which a label is ok (default: {cal})")
    q.add_argument("--missing-conf", type=_fraction, default=d.missing_conf,
                   help=f"confidence from which an unlabelled reference is a missing box (default: {cal})")
    q.add_argument("--match-iou", type=_fraction, default=d.match_iou, help="least IoU for a label/reference match")
    q.add_argument("--wrong-class-iou", type=_fraction, default=d.wrong_class_iou,
                   help="IoU with a trusted other-class reference that makes a label wrong_class")
    q.add_argument("--support-iou", type=_fraction, default=d.support_iou,
                   help="IoU from which any reference shows that an object is there (unconfirmed, not spurious)")
    q.add_argument("--loss", default=d.loss, help="the loss kept for each label/reference pair")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_quality)
    sim = sub.add_parser("simulate", help="the DIoU paper's regression simulation, on lossd's gradients "
                                          "(pip install -e \".[simulate]\" in the clone: matplotlib)")
    where = sim.add_mutually_exclusive_group()
    where.add_argument("--server", help=f"the running lossd to ask (http(s):// or grpc://; default {SIM_SERVER})")
    where.add_argument("--local", action="store_true", help="use an engine in this process instead of a server")
    sim.add_argument("--device", choices=["cpu", "cuda"], help="--local: engine device (default cpu)")
    sim.add_argument("--api-key", help="API key for --server (or LOSSD_API_KEY)")
    sim.add_argument("--losses", default="all", type=_names,
                     help="comma-separated names, 'paper' (iou,giou,diou,ciou) or 'all' (the paper's four, then "
                          "every other box and regression loss in the catalog; default)")
    sim.add_argument("--cases", type=_bounded_int(PAPER_CASES, "the paper's cases; N selects a prefix of them"),
                     help=f"only the first N of the {PAPER_CASES:,} cases (quick runs)")
    sim.add_argument("--iterations", type=_bounded_int(MAX_ITERATIONS, "500 times the paper's 200"), default=200,
                     help=f"gradient steps (the learning rate drops at 80%% and 90%%; at most {MAX_ITERATIONS:,})")
    sim.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the 5,000 anchor centres")
    sim.add_argument("--shards", type=_bounded_int(MAX_SHARDS, "each is a thread with a request in flight; more "
                                                   "only load the server"),
                     default=2, help=f"case groups stepped concurrently (at most {MAX_SHARDS})")
    sim.add_argument("--map", type=_names,
                     help="losses drawn in the final-error map (default: the paper's four that ran)")
    sim.add_argument("--out", default="simulation", help="output folder")
    sim.add_argument("--force", action="store_true", help="rerun losses whose results are already in --out")
    sim.add_argument("--paper-gradients", action="store_true",
                     help="descend with the paper code's hand-derived gradients (in-process) instead of lossd's")
    sim.add_argument("--paper-ablation", action="store_true",
                     help="run the paper's gradients with each of their departures from the exact gradient fixed in "
                          "turn (in-process; --cases defaults to 34,300); writes ablation.md/.json")
    sim.add_argument("--no-progress", action="store_true", help="no progress bars")
    sim.set_defaults(func=_simulate)
    args = parser.parse_args(argv)
    rc = _run(args)
    if argv is None:
        # run as the program: its work is done and reported, so a Ctrl-C while the interpreter shuts down (joining
        # library threads) must not turn the exit status into "killed by SIGINT"
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return rc


if __name__ == "__main__":
    sys.exit(main())
