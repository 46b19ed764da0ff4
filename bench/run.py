"""lossd's benchmark suite: one command, figures as ratios measured in the same run.

    python bench/run.py [--quick] [--out bench/results]

Writes results.json, results.md (tables) and results.png (curves) under --out, and prints the tables.
Sections:
  engine   pairs/s for loss + gradient at N = 1, 100, 10k, 1M: fused vs the eager-autograd reference
  service  a real `lossd serve` on loopback: 1M pairs via gRPC raw bytes, OIP REST binary and REST JSON as a
           fraction of in-process throughput, with the CPU the client and the server spend on them (what bounds
           the fraction when they share the machine's cores); single-pair latency p50/p99 over REST and gRPC;
           single-pair requests/s and p99 at concurrency 1, 16, 64 with dynamic batching on and off (gRPC), for a
           loss with a fused kernel (ciou) and one on the autograd path (nwd)
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FUSED = ["iou", "giou", "diou", "ciou", "eiou", "siou", "mpdiou", "wiou", "inner_iou", "alpha_iou", "l1",
         "smooth_l1"]
SIZES = [1, 100, 10_000, 1_000_000]
TARGETS = {
    "fused CIoU loss+grad at 1M pairs vs eager autograd": (">=", 3.0),
    "single pair in-process (us)": ("<=", 20.0),
    "1M pairs via gRPC raw bytes / in-process": (">=", 0.5),
    "1M pairs via OIP REST binary / in-process": (">=", 0.4),
    "single-pair REST round trip p50 (ms)": ("<=", 1.0),
    "concurrency 64, ciou (fused kernel): batching on / off throughput": (">=", 3.0),
    "concurrency 64, ciou (fused kernel): p99 on / off (lower is better)": ("<=", 1.0),
    "concurrency 64, nwd (autograd path): batching on / off throughput": (">=", 3.0),
    "concurrency 64, nwd (autograd path): p99 on / off (lower is better)": ("<=", 1.0),
}
# the single-pair load runs one loss with a fused CPU kernel (an engine call of ~11 us) and one served by the
# autograd reference (~280 us a call, nearly the same for 1 or 64 rows: what a GPU call costs too)
LOAD_LOSSES = {"ciou": "fused kernel", "nwd": "autograd path"}


def log(msg: str) -> None:
    print(msg, flush=True)


def boxes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    t = g.random((n, 4), dtype=np.float32) * 500
    t[:, 2:] = t[:, :2] + 5 + g.random((n, 2), dtype=np.float32) * 100
    wh = t[:, 2:] - t[:, :2]
    c = 0.5 * (t[:, :2] + t[:, 2:]) + g.normal(size=(n, 2)).astype(np.float32) * 0.1 * wh
    wh = wh * np.exp(g.normal(size=(n, 2)).astype(np.float32) * 0.1)
    return np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32), t


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steal() -> float:
    """CPU seconds the hypervisor has given to others, summed over this machine's CPUs (/proc/stat); time a VM's
    process loses this way can show up in its own CPU time, so figures taken while it grows are suspect."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def timeit_cpu(fn, server_pid: int | None, budget: float, chunks: int = 7) -> dict:
    """Seconds per call, with the CPU per call of this process (the client) and of the server process, all from
    the same run of calls: the chunk of calls with the median wall time (after two warm-up calls)."""
    fn()
    t0 = time.perf_counter()
    fn()
    per_chunk = max(1, int(budget / chunks / max(time.perf_counter() - t0, 1e-7)))
    rows = []
    for _ in range(chunks):
        c0, s0, st0 = time.process_time(), proc_cpu(server_pid) if server_pid else 0.0, steal()
        t0 = time.perf_counter()
        for _ in range(per_chunk):
            fn()
        wall = time.perf_counter() - t0
        rows.append({"s": wall / per_chunk, "client_cpu_s": (time.process_time() - c0) / per_chunk,
                     "server_cpu_s": (proc_cpu(server_pid) - s0) / per_chunk if server_pid else None,
                     "steal_fraction": (steal() - st0) / (wall * (os.cpu_count() or 1))})
    rows.sort(key=lambda r: r["s"])
    out = dict(rows[len(rows) // 2])
    out["calls_per_chunk"] = per_chunk
    if not server_pid:
        del out["server_cpu_s"]
    return out


def chunk(fn, k: int, server_pid: int | None) -> dict:
    """Seconds per call over ``k`` calls in a row, with the CPU per call of this process (the client) and of the
    server process, and the share of the machine's CPU the hypervisor gave to others meanwhile."""
    c0, s0, st0 = time.process_time(), proc_cpu(server_pid) if server_pid else 0.0, steal()
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    wall = time.perf_counter() - t0
    return {"s": wall / k, "client_cpu_s": (time.process_time() - c0) / k,
            "server_cpu_s": (proc_cpu(server_pid) - s0) / k if server_pid else None,
            "steal_fraction": (steal() - st0) / (wall * (os.cpu_count() or 1))}


def timeit(fn, budget: float = 0.4, min_reps: int = 3) -> float:
    """Median seconds per call over repeated calls filling about `budget` seconds."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    reps = max(min_reps, min(20000, int(budget / once)))
    chunks = []
    per_chunk = max(1, reps // 5)
    for _ in range(max(1, reps // per_chunk)):
        t0 = time.perf_counter()
        for _ in range(per_chunk):
            fn()
        chunks.append((time.perf_counter() - t0) / per_chunk)
    return statistics.median(chunks)


# ------------------------------------------------------------------------------------------------------ engine
def bench_engine(quick: bool) -> dict:
    import torch

    from lossd.engine import Engine

    fast, ref = Engine(device="cpu"), Engine(device="cpu", fast="off", warm=False)
    rows = []
    for name in FUSED:
        for n in SIZES:
            if name in ("l1", "smooth_l1"):
                g = np.random.default_rng(n)
                p, t = g.normal(size=(n, 4)).astype(np.float32), g.normal(size=(n, 4)).astype(np.float32)
            else:
                p, t = boxes(n, n)
            pt, tt = torch.from_numpy(p), torch.from_numpy(t)
            budget = 0.15 if quick else 0.4
            t_fast = timeit(lambda: fast.evaluate(name, pt, tt), budget)
            t_ref = timeit(lambda: ref.evaluate(name, pt, tt), budget)
            rows.append({"loss": name, "n": n, "fused_s": t_fast, "reference_s": t_ref,
                         "fused_pairs_per_s": n / t_fast, "reference_pairs_per_s": n / t_ref,
                         "speedup": t_ref / t_fast})
            log(f"  engine {name:>9} n={n:>8}: fused {n / t_fast / 1e6:8.2f} M/s ({t_fast * 1e6:9.1f} us)  "
                f"reference {n / t_ref / 1e6:7.2f} M/s  x{t_ref / t_fast:6.2f}")
    return {"rows": rows}


TOOL_LOSSES, TOOL_SIZES = ("ciou", "siou"), (1, 10_000, 1_000_000)


def bench_tools(quick: bool) -> dict:
    """How the CPU route was chosen: the numba kernels vs torch.compile (inductor) of the reference (the CUDA
    route, run here on the CPU) vs eager autograd, loss + gradient, in the same run."""
    import torch

    from lossd.engine import Engine

    engines = {"numba": Engine(device="cpu"), "torch.compile": Engine(device="cpu", fast="compiled", warm=False),
               "eager": Engine(device="cpu", fast="off", warm=False)}
    rows = []
    for name in TOOL_LOSSES:
        for n in TOOL_SIZES:
            p, t = boxes(n, n)
            pt, tt = torch.from_numpy(p), torch.from_numpy(t)
            t0 = time.perf_counter()
            engines["torch.compile"].evaluate(name, pt, tt)  # compiles on the first call of a loss (and size class)
            first = time.perf_counter() - t0
            row = {"loss": name, "n": n, "compile_first_call_s": first}
            for tool, e in engines.items():
                row[tool] = timeit(lambda e=e: e.evaluate(name, pt, tt), 0.15 if quick else 0.4)
            rows.append(row)
            log(f"  tools {name:>5} n={n:>8}: " + "  ".join(f"{k} {row[k] * 1e6:9.1f} us" for k in engines))
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------------ service
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, batching: bool) -> None:
        self.http, self.grpc = free_port(), free_port()
        # 1M pairs as JSON is ~77 MB, over the 64 MiB default body limit
        env = dict(os.environ, LOSSD_DEVICE="cpu", LOSSD_BATCHING="true" if batching else "false",
                   LOSSD_LOG_LEVEL="warning", LOSSD_MAX_BODY_BYTES=str(512 * 2**20))
        self.proc = subprocess.Popen([sys.executable, "-m", "lossd.cli", "serve", "--http-port", str(self.http),
                                      "--grpc-port", str(self.grpc)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("lossd serve did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def bench_bulk(server: Server, quick: bool) -> dict:
    """1M pairs + gradients per transport, as the client sends them (8 MiB requests, up to 4 in flight), with the
    CPU each side spends: on a machine whose cores the client, the server and the engine share, (client CPU +
    server CPU) / cores bounds the wall time from below, whatever the overlap."""
    import httpx
    import torch

    from lossd.engine import Engine
    from lossd_client import LossClient

    n = 1_000_000
    p, t = boxes(n, 7)
    engine = Engine(device="cpu")
    pt, tt = torch.from_numpy(p), torch.from_numpy(t)
    budget = 1.0 if quick else 2.5
    in_proc = timeit_cpu(lambda: engine.evaluate("ciou", pt, tt), None, budget)
    out = {"n": n, "in_process_s": in_proc["s"], "in_process_cpu_s": in_proc["client_cpu_s"],
           "cores": os.cpu_count()}
    with LossClient(f"grpc://127.0.0.1:{server.grpc}") as c:
        out["grpc_raw"] = timeit_cpu(lambda: c.loss("ciou", p, t), server.proc.pid, budget)
    with LossClient(f"http://127.0.0.1:{server.http}") as c:
        out["oip_rest_binary"] = timeit_cpu(lambda: c.loss("ciou", p, t), server.proc.pid, budget)
    body = json.dumps({"pred": p.tolist(), "target": t.tolist()}).encode()
    with httpx.Client(timeout=300) as h:
        url = f"http://127.0.0.1:{server.http}/v1/losses/ciou"
        out["rest_json"] = {"s": timeit(lambda: h.post(url, content=body, headers={
            "content-type": "application/json"}).raise_for_status(), 0.1, min_reps=1)}
    for k in ("grpc_raw", "oip_rest_binary", "rest_json"):
        r = out[k]
        r["fraction"] = in_proc["s"] / r["s"]
        msg = f"  1M pairs via {k:>15}: {r['s'] * 1e3:8.1f} ms = {r['fraction']:.2f} of in-process " \
              f"({in_proc['s'] * 1e3:.1f} ms)"
        if "server_cpu_s" in r:
            r["cpu_bound_s"] = (r["client_cpu_s"] + r["server_cpu_s"]) / out["cores"]
            r["best_fraction"] = in_proc["s"] / r["cpu_bound_s"]
            msg += f"; CPU client {r['client_cpu_s'] * 1e3:.0f} ms + server {r['server_cpu_s'] * 1e3:.0f} ms " \
                   f"(engine {in_proc['client_cpu_s'] * 1e3:.0f}) -> at best {r['best_fraction']:.2f} on " \
                   f"{out['cores']} cores (steal {r['steal_fraction']:.0%})"
        log(msg)
    return out


def _echo_server(port: int) -> None:
    """A grpc.aio server whose one method answers each request with 5/8 of its size in bytes (made once per
    size) and does nothing else: what moving 1M pairs' bytes (32 MB in, 20 MB out) costs grpc's C core and Python
    layer alone. The process is tuned as `lossd serve` tunes its own."""
    import grpc

    from lossd.allocator import tune_malloc

    tune_malloc(256 * 2**20)
    answers: dict[int, bytes] = {}

    async def echo(request: bytes, context) -> bytes:
        size = len(request) * 5 // 8
        if size not in answers:
            answers[size] = bytes(size)
        return answers[size]

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 2**30),
                                          ("grpc.max_send_message_length", 2**30)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def bench_grpc_floor(quick: bool) -> dict:
    """The same bytes as the 1M-pair gRPC call, in the same 8 MiB requests with 4 in flight, through a server
    that does nothing with them."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from lossd_client import DEFAULT_MAX_REQUEST_BYTES, MAX_IN_FLIGHT

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--echo-server", str(port)])
    try:
        opts = [("grpc.max_receive_message_length", 2**30), ("grpc.max_send_message_length", 2**30)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            echo = ch.unary_unary("/bench.Echo/Echo")
            data = np.random.default_rng(0).bytes(1_000_000 * 32)
            parts = [data[i:i + DEFAULT_MAX_REQUEST_BYTES] for i in range(0, len(data), DEFAULT_MAX_REQUEST_BYTES)]
            with ThreadPoolExecutor(MAX_IN_FLIGHT) as pool:
                out = timeit_cpu(lambda: list(pool.map(echo, parts)), proc.pid, 1.0 if quick else 2.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log(f"  1M pairs' bytes through a do-nothing grpc.aio server: {out['s'] * 1e3:.1f} ms; CPU client "
        f"{out['client_cpu_s'] * 1e3:.0f} ms + server {out['server_cpu_s'] * 1e3:.0f} ms")
    return out


def bench_latency(server: Server, quick: bool) -> dict:
    import grpc

    from lossd_client.wire import to_tensor
    from lossd_client.wire import pb
    from lossd_client.wire import pb_grpc

    reps = 300 if quick else 1000
    body = json.dumps({"pred": [[0, 0, 10, 10]], "target": [[1, 1, 11, 11]]}).encode()
    out = {}
    # a keep-alive stdlib client: what an annotation tool's HTTP library does, without httpx's own ~0.2 ms
    conn = http.client.HTTPConnection("127.0.0.1", server.http)
    out["rest"] = _rest_latency(conn, "/v1/losses/ciou", body, reps)
    # the annotation tool's call: a CIoU score for the box being drawn
    out["rest_metric"] = _rest_latency(conn, "/v1/metrics/ciou", json.dumps(
        {"boxes1": [[0, 0, 10, 10]], "boxes2": [[1, 1, 11, 11]]}).encode(), reps)
    conn.close()
    ch = grpc.insecure_channel(f"127.0.0.1:{server.grpc}")
    stub = pb_grpc.LossServiceStub(ch)
    req = pb.EvaluateRequest(loss="ciou", pred=to_tensor(np.array([[0, 0, 10, 10]], np.float32)),
                             target=to_tensor(np.array([[1, 1, 11, 11]], np.float32)))
    lat = []
    for _ in range(reps + 20):
        t0 = time.perf_counter()
        stub.Evaluate(req)
        lat.append(time.perf_counter() - t0)
    ch.close()
    out["grpc"] = _pcts(lat[20:])
    for k, v in out.items():
        log(f"  single pair {k:>4}: p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms")
    return out


def _rest_latency(conn: http.client.HTTPConnection, path: str, body: bytes, reps: int) -> dict:
    """p50/p99 of `reps` JSON POSTs on one keep-alive connection, after 20 not counted."""
    lat = []
    for _ in range(reps + 20):
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{path} answered {resp.status}")
        lat.append(time.perf_counter() - t0)
    return _pcts(lat[20:])


def _pcts(lat: list[float]) -> dict:
    a = np.asarray(lat) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": len(a)}


async def _load(target: str, concurrency: int, seconds: float, loss: str = "ciou") -> dict:
    import grpc

    from lossd_client.wire import to_tensor
    from lossd_client.wire import pb
    from lossd_client.wire import pb_grpc

    channels = [grpc.aio.insecure_channel(target) for _ in range(max(1, concurrency // 16))]
    stubs = [pb_grpc.LossServiceStub(c) for c in channels]
    req = pb.EvaluateRequest(loss=loss, pred=to_tensor(np.array([[0, 0, 10, 10]], np.float32)),
                             target=to_tensor(np.array([[1, 1, 11, 11]], np.float32)))
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        stub = stubs[i % len(stubs)]
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await stub.Evaluate(req, timeout=30)
            lat.append(time.perf_counter() - t0)

    for s in stubs:  # warm the connections
        await s.Evaluate(req)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - t0
    for c in channels:
        await c.close()
    return {"requests": len(lat), "rps": len(lat) / elapsed, **_pcts(lat)}


MODES = {"on": True, "off": False}


def bench_concurrency(quick: bool) -> dict:
    """Single-pair gRPC requests from 1, 16 and 64 concurrent clients, dynamic batching on and off, for a fused
    loss and one on the autograd path. Both servers run side by side and the runs alternate between them
    (rounds of on, off), after a warm-up; each figure is the median over the rounds."""
    rounds, seconds = (1, 1.5) if quick else (3, 2.0)
    servers = {mode: Server(batching) for mode, batching in MODES.items()}
    out = {}
    try:
        for loss in LOAD_LOSSES:
            for server in servers.values():
                asyncio.run(_load(f"127.0.0.1:{server.grpc}", 64, 0.5, loss))  # warm-up, not counted
            for conc in (1, 16, 64):
                runs: dict[str, list[dict]] = {mode: [] for mode in servers}
                for _ in range(rounds):
                    for mode, server in servers.items():
                        runs[mode].append(asyncio.run(_load(f"127.0.0.1:{server.grpc}", conc, seconds, loss)))
                for mode, rs in runs.items():
                    r = {k: statistics.median(x[k] for x in rs) for k in ("rps", "p50_ms", "p99_ms")}
                    r["rounds"] = rs
                    out[f"{loss}_{mode}_{conc}"] = r
                    log(f"  {loss:>6} batching {mode:>3} concurrency {conc:>2}: {r['rps']:8.0f} req/s  "
                        f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  (median of {rounds})")
    finally:
        for server in servers.values():
            server.stop()
    def order(key: str) -> tuple:
        loss, mode, conc = key.rsplit("_", 2)
        return loss != "ciou", mode != "on", int(conc)

    return dict(sorted(out.items(), key=lambda kv: order(kv[0])))


# ------------------------------------------------------------------------------------------------------ report
def summarise(res: dict) -> dict:
    rows = {(r["loss"], r["n"]): r for r in res["engine"]["rows"]}
    s = {}
    s["fused CIoU loss+grad at 1M pairs vs eager autograd"] = rows[("ciou", 1_000_000)]["speedup"]
    s["single pair in-process (us)"] = rows[("ciou", 1)]["fused_s"] * 1e6
    if "bulk" in res:
        b = res["bulk"]
        s["1M pairs via gRPC raw bytes / in-process"] = b["grpc_raw"]["fraction"]
        s["1M pairs via gRPC raw bytes: best fraction its CPU cost allows"] = b["grpc_raw"]["best_fraction"]
        if "grpc_floor" in b:
            s["1M pairs' bytes through a do-nothing grpc.aio server / in-process"] = (
                b["in_process_s"] / b["grpc_floor"]["s"])
        s["1M pairs via OIP REST binary / in-process"] = b["oip_rest_binary"]["fraction"]
        s["1M pairs via OIP REST binary: best fraction its CPU cost allows"] = b["oip_rest_binary"]["best_fraction"]
        s["1M pairs via REST JSON / in-process"] = b["rest_json"]["fraction"]
    if "latency" in res:
        s["single-pair REST round trip p50 (ms)"] = res["latency"]["rest"]["p50_ms"]
        s["single-pair gRPC round trip p50 (ms)"] = res["latency"]["grpc"]["p50_ms"]
        if "rest_metric" in res["latency"]:
            s["single-pair REST CIoU metric (score) round trip p50 (ms)"] = res["latency"]["rest_metric"]["p50_ms"]
    if "concurrency" in res:
        c = res["concurrency"]
        for loss, path in LOAD_LOSSES.items():
            on, off = c[f"{loss}_on_64"], c[f"{loss}_off_64"]
            s[f"concurrency 64, {loss} ({path}): batching on / off throughput"] = on["rps"] / off["rps"]
            s[f"concurrency 64, {loss} ({path}): p99 on / off (lower is better)"] = on["p99_ms"] / off["p99_ms"]
    return s


def markdown(res: dict) -> str:
    lines = [f"# lossd benchmark ({res['meta']['when']}, {res['meta']['machine']})", "",
             f"Command: `{res['meta']['command']}`", "", "## Targets", "", "| figure | measured | target | met |",
             "|---|---|---|---|"]
    for k, v in res["summary"].items():
        tgt = TARGETS.get(k)
        met = "" if tgt is None else ("yes" if (v >= tgt[1] if tgt[0] == ">=" else v <= tgt[1]) else "**no**")
        lines.append(f"| {k} | {v:.3g} | {'' if tgt is None else tgt[0] + ' ' + str(tgt[1])} | {met} |")
    lines += ["", "## Engine: loss + gradient, pairs/s (fused vs eager autograd)", "",
              "| loss | N | fused M/s | fused time | reference M/s | speed-up |", "|---|---|---|---|---|---|"]
    for r in res["engine"]["rows"]:
        lines.append(f"| {r['loss']} | {r['n']:,} | {r['fused_pairs_per_s'] / 1e6:.2f} | "
                     f"{r['fused_s'] * 1e6:.1f} us | {r['reference_pairs_per_s'] / 1e6:.2f} | {r['speedup']:.2f}x |")
    if "tools" in res:
        lines += ["", "## Choosing the CPU route: loss + gradient, us per call", "",
                  "| loss | N | numba kernel | torch.compile (inductor) | eager autograd | numba vs torch.compile |",
                  "|---|---|---|---|---|---|"]
        for r in res["tools"]["rows"]:
            lines.append(f"| {r['loss']} | {r['n']:,} | {r['numba'] * 1e6:.1f} | {r['torch.compile'] * 1e6:.1f} | "
                         f"{r['eager'] * 1e6:.1f} | {r['torch.compile'] / r['numba']:.1f}x |")
    if "bulk" in res:
        b = res["bulk"]
        lines += ["", f"## 1M pairs + gradients per transport (in-process: {b['in_process_s'] * 1e3:.1f} ms, "
                  f"{b['in_process_cpu_s'] * 1e3:.0f} ms of CPU)", "",
                  "| transport | wall ms | fraction of in-process | client CPU ms | server CPU ms | "
                  f"CPU-bound wall on {b['cores']} cores, ms | best fraction | steal |",
                  "|---|---|---|---|---|---|---|---|"]
        for k in ("grpc_raw", "oip_rest_binary", "rest_json"):
            r = b[k]
            cpu = (f"{r['client_cpu_s'] * 1e3:.0f} | {r['server_cpu_s'] * 1e3:.0f} | {r['cpu_bound_s'] * 1e3:.0f} | "
                   f"{r['best_fraction']:.2f} | {r['steal_fraction']:.0%}") if "server_cpu_s" in r else " |  |  |  | "
            lines.append(f"| {k} | {r['s'] * 1e3:.1f} | {r['fraction']:.3g} | {cpu} |")
        if "grpc_floor" in b:
            f = b["grpc_floor"]
            bound = (f["client_cpu_s"] + f["server_cpu_s"]) / b["cores"]
            lines.append(f"| the same bytes through a do-nothing grpc.aio server | {f['s'] * 1e3:.1f} | "
                         f"{b['in_process_s'] / f['s']:.3g} | {f['client_cpu_s'] * 1e3:.0f} | "
                         f"{f['server_cpu_s'] * 1e3:.0f} | {bound * 1e3:.0f} | {b['in_process_s'] / bound:.2f} | "
                         f"{f['steal_fraction']:.0%} |")
    if "concurrency" in res:
        lines += ["", "## Single-pair requests over gRPC, dynamic batching on vs off", "",
                  "| loss | concurrency | batching | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
        for k, r in res["concurrency"].items():
            loss, mode, conc = k.rsplit("_", 2)
            lines.append(f"| {loss} | {conc} | {mode} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + ("concurrency" in res) + ("bulk" in res)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    for name in FUSED:
        rows = [r for r in res["engine"]["rows"] if r["loss"] == name]
        line, = ax.plot([r["n"] for r in rows], [r["fused_pairs_per_s"] for r in rows], marker="o", label=name)
        ax.plot([r["n"] for r in rows], [r["reference_pairs_per_s"] for r in rows], ls="--", color=line.get_color(),
                alpha=0.6)
    ax.set(xscale="log", yscale="log", xlabel="pairs per call", ylabel="pairs/s (loss + gradient)",
           title="Engine: fused (solid) vs eager autograd (dashed)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    if "bulk" in res:
        ax = axes[-1]
        b = res["bulk"]
        names = ["in-process", "grpc_raw", "oip_rest_binary"]
        walls = [b["in_process_s"] * 1e3] + [b[k]["s"] * 1e3 for k in names[1:]]
        bounds = [b["in_process_s"] * 1e3] + [b[k]["cpu_bound_s"] * 1e3 for k in names[1:]]
        ax.bar(names, walls, color=["tab:gray", "tab:blue", "tab:orange"], label="measured")
        ax.scatter(names, bounds, marker="_", s=900, color="black", zorder=3,
                   label=f"(client + server CPU) / {b['cores']} cores")
        for target, name in ((0.5, "grpc_raw"), (0.4, "oip_rest_binary")):
            ax.scatter([name], [b["in_process_s"] * 1e3 / target], marker="v", color="tab:red", zorder=3)
        ax.scatter([], [], marker="v", color="tab:red", label="target")
        ax.set(ylabel="ms for 1M pairs + gradients", title="1M pairs: transport vs in-process")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    if "concurrency" in res:
        ax = axes[1]
        c = res["concurrency"]
        xs = [1, 16, 64]
        for loss, color in zip(LOAD_LOSSES, ("tab:blue", "tab:orange")):
            for mode, style in (("on", "-o"), ("off", "--s")):
                ax.plot(xs, [c[f"{loss}_{mode}_{x}"]["rps"] for x in xs], style, color=color,
                        label=f"{loss} ({LOAD_LOSSES[loss]}), batching {mode}")
        ax.set(xscale="log", xlabel="concurrent clients", ylabel="single-pair requests/s",
               title="gRPC single-pair throughput")
        ax.set_xticks([1, 16, 64], ["1", "16", "64"])
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_results(out: Path, stem: str, res: dict, to_markdown, to_plot) -> None:
    """<stem>.json, .md and .png under out; prints the markdown."""
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    (out / f"{stem}.md").write_text(md)
    to_plot(res, out / f"{stem}.png")
    print()
    print(md)
    log(f"wrote {out / f'{stem}.json'}, {out / f'{stem}.md'}, {out / f'{stem}.png'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter timings (for a smoke run)")
    ap.add_argument("--engine-only", action="store_true", help="skip the service section")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)  # bench_grpc_floor's server process
    args = ap.parse_args()
    if args.echo_server:
        _echo_server(args.echo_server)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"meta": {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, "
                    f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
                    "command": "python bench/run.py" + (" --quick" if args.quick else "")
                    + (" --engine-only" if args.engine_only else "")}}
    log("[1/4] engine: fused vs eager autograd; numba vs torch.compile")
    res["engine"] = bench_engine(args.quick)
    res["tools"] = bench_tools(args.quick)
    if not args.engine_only:
        server = Server(batching=True)
        try:
            log("[2/4] service: 1M pairs per transport")
            res["bulk"] = bench_bulk(server, args.quick)
            res["bulk"]["grpc_floor"] = bench_grpc_floor(args.quick)
            log("[3/4] service: single-pair latency")
            res["latency"] = bench_latency(server, args.quick)
        finally:
            server.stop()
        log("[4/4] service: concurrency with batching on and off")
        res["concurrency"] = bench_concurrency(args.quick)
    res["summary"] = summarise(res)
    write_results(out, "results", res, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
