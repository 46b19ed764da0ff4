"""Reliability figures for docs/reliability.md: load at a target rate, overload and recovery, and a soak.

    python bench/reliability.py [--rate 300] [--load-seconds 20] [--soak-seconds 180] [--out bench/results]

Every figure comes from real `lossd serve` processes on loopback; the loops are bounded in count and time.
  load      single-pair and 1k-box requests at a fixed rate over REST and gRPC; every answer checked against the
            in-process engine
  overload  64 concurrent 50k-box requests against LOSSD_MAX_IN_FLIGHT=4: how many are shed (429), then the same
            traffic one at a time: none shed, all correct
  soak      mixed traffic (losses, metrics, both transports, some bad input) for --soak-seconds; the server's
            resident memory after warm-up and at the end
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, **env: str) -> None:
        self.http, self.grpc = free_port(), free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "lossd.cli", "serve", "--http-port", str(self.http),
                                      "--grpc-port", str(self.grpc)],
                                     env=dict(os.environ, LOSSD_DEVICE="cpu", LOSSD_LOG_LEVEL="warning", **env),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def boxes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    t = (g.random((n, 4)) * 500).astype(np.float32)
    t[:, 2:] = t[:, :2] + 5 + g.random((n, 2)).astype(np.float32) * 50
    p = t + g.normal(size=(n, 4)).astype(np.float32)
    p[:, 2:] = np.maximum(p[:, 2:], p[:, :2] + 1)
    return p, t


async def _traffic(server: Server, rate: float, seconds: float, engine, mix_bad: bool = False) -> dict:
    """Requests at a fixed rate (open loop, bounded by rate x seconds); each answer checked."""
    from lossd_client import AsyncLossClient, LossdError

    counts = {"tried": 0, "ok": 0, "shed": 0, "rejected_bad_input": 0, "wrong": 0, "failed": 0}
    cases = [boxes(1, s) for s in range(8)] + [boxes(1000, 100 + s) for s in range(4)]
    refs = [engine.evaluate("ciou", p, t).loss.numpy() for p, t in cases]
    clients = [AsyncLossClient(server.url, retries=0), AsyncLossClient(f"grpc://127.0.0.1:{server.grpc}",
                                                                        retries=0)]
    bad = (np.array([[5, 0, 1, 1]], np.float32), np.array([[0, 0, 1, 1]], np.float32))

    async def one(i: int) -> None:
        counts["tried"] += 1
        c = clients[i % 2]
        k = i % len(cases)
        try:
            if mix_bad and i % 17 == 0:
                await c.loss("ciou", *bad)
                counts["wrong"] += 1  # bad input must not be accepted
                return
            loss, _ = await c.loss("ciou", *cases[k])
            if np.allclose(loss, refs[k], rtol=1e-6, atol=1e-7):
                counts["ok"] += 1
            else:
                counts["wrong"] += 1
        except LossdError as exc:
            if exc.code == "overloaded":
                counts["shed"] += 1
            elif exc.code == "inverted_box":
                counts["rejected_bad_input"] += 1
            else:
                counts["failed"] += 1
        except Exception:  # noqa: BLE001  (counted, reported)
            counts["failed"] += 1

    tasks = []
    t0 = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    counts["seconds"] = round(time.perf_counter() - t0, 2)
    counts["achieved_rate"] = round(counts["tried"] / counts["seconds"], 1)
    for c in clients:
        await c.close()
    return counts


def load(rate: float, seconds: float, engine) -> dict:
    server = Server()
    try:
        return asyncio.run(_traffic(server, rate, seconds, engine))
    finally:
        server.stop()


def overload(engine) -> dict:
    from lossd_client import AsyncLossClient, LossdError

    server = Server(LOSSD_MAX_IN_FLIGHT="4")
    reqs = [boxes(50_000, s) for s in range(64)]
    refs = [engine.evaluate("siou", p, t).loss.numpy() for p, t in reqs]

    async def phase(concurrent: bool) -> dict:
        counts = {"tried": 0, "ok": 0, "shed": 0, "wrong": 0, "failed": 0}
        async with AsyncLossClient(server.url, retries=0) as c:
            async def one(k: int) -> None:
                counts["tried"] += 1
                try:
                    loss, _ = await c.loss("siou", *reqs[k])
                    counts["ok" if np.allclose(loss, refs[k], rtol=1e-6) else "wrong"] += 1
                except LossdError as exc:
                    counts["shed" if exc.code == "overloaded" else "failed"] += 1

            t0 = time.perf_counter()
            if concurrent:
                await asyncio.gather(*(one(k) for k in range(64)))
            else:
                for k in range(16):
                    await one(k)
            counts["seconds"] = round(time.perf_counter() - t0, 2)
        return counts

    try:
        return {"burst_64_concurrent": asyncio.run(phase(True)), "then_one_at_a_time": asyncio.run(phase(False))}
    finally:
        server.stop()


def soak(seconds: float, engine) -> dict:
    server = Server()
    try:
        asyncio.run(_traffic(server, 100, 10, engine, mix_bad=True))  # warm-up
        before = server.rss_mib()
        samples = []
        t0 = time.monotonic()
        total = {}
        while time.monotonic() - t0 < seconds:
            chunk = asyncio.run(_traffic(server, 150, min(20, seconds - (time.monotonic() - t0)) or 1, engine,
                                         mix_bad=True))
            for k, v in chunk.items():
                if isinstance(v, int):
                    total[k] = total.get(k, 0) + v
            samples.append(round(server.rss_mib(), 1))
            print(f"  soak {time.monotonic() - t0:5.0f}/{seconds:.0f} s: rss {samples[-1]} MiB", flush=True)
        return {"seconds": seconds, "rss_after_warmup_mib": round(before, 1), "rss_end_mib": samples[-1],
                "rss_samples_mib": samples, "growth_mib": round(samples[-1] - before, 1), **total}
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=300)
    ap.add_argument("--load-seconds", type=float, default=20)
    ap.add_argument("--soak-seconds", type=float, default=180)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    from lossd.engine import Engine

    engine = Engine(device="cpu")
    res = {"command": " ".join(["python bench/reliability.py"] + sys.argv[1:])}
    print("[1/3] load", flush=True)
    res["load"] = load(args.rate, args.load_seconds, engine)
    print(json.dumps(res["load"]), flush=True)
    print("[2/3] overload", flush=True)
    res["overload"] = overload(engine)
    print(json.dumps(res["overload"]), flush=True)
    print("[3/3] soak", flush=True)
    res["soak"] = soak(args.soak_seconds, engine)
    print(json.dumps({k: v for k, v in res["soak"].items() if k != "rss_samples_mib"}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out / 'reliability.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
