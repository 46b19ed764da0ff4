"""A/B: two `lossd serve` processes from two checkouts, side by side on loopback, the same calls alternating
between them, so a change's cost is a ratio from one run on the same (noisy) machine.

    python bench/ab.py --a /path/to/old/checkout [--a-pythonpath EXTRA] [--b .] [--rounds 5] [--out FILE]

Each checkout's server runs with PYTHONPATH=<checkout>/service:<checkout>/client (plus --*-pythonpath, e.g. a
folder with the protobuf runtime that checkout's stubs need); the client is this checkout's. Measured, round by
round, A then B: single-pair IoU over REST /v1 and over gRPC (p50, p99 of 400 calls each), and 1M CIoU pairs with
gradients through LossClient over gRPC (best of 3). Prints and saves the medians over rounds and B/A ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402

PRED = [[0.0, 0.0, 10.0, 10.0]]
TARGET = [[1.0, 1.0, 11.0, 11.0]]


class Server:
    def __init__(self, checkout: Path, extra_path: str | None) -> None:
        self.http, self.grpc = free_port(), free_port()
        path = [str(checkout / "service"), str(checkout / "client")] + ([extra_path] if extra_path else [])
        env = dict(os.environ, LOSSD_DEVICE="cpu", PYTHONPATH=os.pathsep.join(path))
        self.log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "lossd.cli", "serve", "--http-port", str(self.http),
                                      "--grpc-port", str(self.grpc)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server from {checkout} did not start: {open(self.log.name).read()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def rest_single(port: int, n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post("/v1/metrics/iou", json={"boxes1": PRED, "boxes2": TARGET})
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200
    return out


def grpc_single(port: int, n: int) -> list[float]:
    import grpc

    from lossd_client.wire import pb, pb_grpc, to_tensor

    out = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.LossServiceStub(ch)
        req = pb.MetricRequest(metric="iou", boxes1=to_tensor(np.asarray(PRED, "<f4")),
                               boxes2=to_tensor(np.asarray(TARGET, "<f4")))
        for _ in range(n):
            t0 = time.perf_counter()
            stub.Metric(req, timeout=30)
            out.append(time.perf_counter() - t0)
    return out


def bulk(port: int, pred: np.ndarray, target: np.ndarray) -> float:
    from lossd_client import LossClient

    with LossClient(f"grpc://127.0.0.1:{port}") as client:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            client.loss("ciou", pred, target)
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, required=True, help="the checkout to compare against (A)")
    ap.add_argument("--a-pythonpath", default=None)
    ap.add_argument("--b", type=Path, default=ROOT, help="the checkout under test (B) [this one]")
    ap.add_argument("--b-pythonpath", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ab.json")
    args = ap.parse_args()
    g = np.random.default_rng(0)
    xy = g.uniform(0, 500, (1_000_000, 2)).astype("<f4")
    pred = np.concatenate([xy, xy + g.uniform(1, 50, (1_000_000, 2)).astype("<f4")], 1)
    target = pred + g.uniform(-2, 2, pred.shape).astype("<f4")
    target[:, 2:] = np.maximum(target[:, 2:], target[:, :2] + 0.5)
    servers = {"A": Server(args.a, args.a_pythonpath), "B": Server(args.b, args.b_pythonpath)}
    rows: dict[str, dict[str, list[float]]] = {k: {} for k in servers}
    try:
        for side, s in servers.items():  # warm both
            rest_single(s.http, 50), grpc_single(s.grpc, 50), bulk(s.grpc, pred[:1000], target[:1000])
        for r in range(args.rounds):
            for side, s in servers.items():
                rest = rest_single(s.http, args.calls)
                rpc = grpc_single(s.grpc, args.calls)
                for key, value in (("rest_p50_ms", np.percentile(rest, 50) * 1e3),
                                   ("rest_p99_ms", np.percentile(rest, 99) * 1e3),
                                   ("grpc_p50_ms", np.percentile(rpc, 50) * 1e3),
                                   ("grpc_p99_ms", np.percentile(rpc, 99) * 1e3),
                                   ("bulk_1m_ciou_grpc_ms", bulk(s.grpc, pred, target) * 1e3)):
                    rows[side].setdefault(key, []).append(float(value))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} A {rows['A'][k][-1]:.2f} B {rows['B'][k][-1]:.2f}" for k in rows["A"]), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    med = {side: {k: statistics.median(v) for k, v in r.items()} for side, r in rows.items()}
    result = {"a": str(args.a), "b": str(args.b), "rounds": args.rounds, "calls": args.calls,
              "load_average": os.getloadavg(), "median": med,
              "b_over_a": {k: round(med["B"][k] / med["A"][k], 3) for k in med["A"]}, "raw": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"median": med, "b_over_a": result["b_over_a"], "load_average": result["load_average"]},
                     indent=2))


if __name__ == "__main__":
    main()
