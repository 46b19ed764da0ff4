"""Small requests, big answers: K concurrent `POST /v1/metrics/iou` with M boxes as both boxes1 and boxes2 and
``pairwise: true`` (a ~245 KiB body for M=4000 asks for an M x M answer), each read slowly, against a real
`lossd serve`; prints the server's resident memory before, at its peak and after the burst (JSON).

    python -m tests.hostile.amplify [K] [M]            # defaults 8 4000
"""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx
import numpy as np


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return 0


def body(m: int) -> bytes:
    rng = np.random.default_rng(1)
    boxes = np.hstack([rng.uniform(0, 100, (m, 2)), rng.uniform(100, 200, (m, 2))]).round(2).tolist()
    return json.dumps({"boxes1": boxes, "boxes2": boxes, "pairwise": True}).encode()


def burst(url: str, pid: int, k: int = 8, m: int = 4000, timeout: float = 150.0, settle: float = 3.0) -> dict:
    """K slow readers at once; RSS sampled every 50 ms while they run, then once after ``settle`` seconds."""
    payload = body(m)
    results: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def one() -> None:
        with httpx.Client(timeout=timeout) as c:
            with c.stream("POST", f"{url}/v1/metrics/iou", content=payload,
                          headers={"content-type": "application/json"}) as r:
                n = 0
                for chunk in r.iter_bytes(1 << 16):
                    n += len(chunk)
                    time.sleep(0.001)  # a slow reader: the answer waits in the server
                code = r.headers.get("lossd-error-code", "")
                with lock:
                    results.append((r.status_code, n, code))

    before = rss_mib(pid)
    threads = [threading.Thread(target=one, daemon=True) for _ in range(k)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    peak = before
    while any(t.is_alive() for t in threads) and time.monotonic() - t0 < timeout:
        peak = max(peak, rss_mib(pid))
        time.sleep(0.05)
    seconds = time.monotonic() - t0
    time.sleep(settle)
    statuses: dict[str, int] = {}
    for status, _, code in results:
        key = f"{status} {code}".strip()
        statuses[key] = statuses.get(key, 0) + 1
    return {"k": k, "m": m, "request_kib": len(payload) >> 10, "rss_before_mib": before, "rss_peak_mib": peak,
            "rss_after_mib": rss_mib(pid), "answer_mib": max((n for _, n, _ in results), default=0) >> 20,
            "statuses": statuses, "seconds": round(seconds, 1)}


GRPC_CLIENT = r"""
import sys, numpy as np, grpc
from lossd_client.wire import pb, pb_grpc, to_tensor
m = int(sys.argv[2])
rng = np.random.default_rng(1)
b = np.hstack([rng.uniform(0, 100, (m, 2)), rng.uniform(100, 200, (m, 2))]).astype(np.float32)
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.max_receive_message_length", 1 << 30)])
grpc.channel_ready_future(ch).result(timeout=60)
req = pb.MetricRequest(metric="iou", boxes1=to_tensor(b, False), boxes2=to_tensor(b, False), pairwise=True)
fut = pb_grpc.LossServiceStub(ch).Metric.future(req, timeout=300)
print("sent", flush=True)
try:
    print("ok", len(fut.result().values.raw), flush=True)
except grpc.RpcError as e:
    print("err", e.code().name, flush=True)
"""


def grpc_burst(target: str, pid: int, k: int = 8, m: int = 4000, stopped: float = 8.0) -> dict:
    """K gRPC Metric calls for one M x M pairwise answer each (64 MB for M=4000; no client-side split), from K
    client processes stopped (SIGSTOP) as soon as each has sent its request: their answers cannot be delivered
    and wait in the server. RSS sampled while they are stopped; then they resume and read."""
    import os
    import signal
    import subprocess

    before = rss_mib(pid)
    procs = [subprocess.Popen([sys.executable, "-c", GRPC_CLIENT, target, str(m)], stdout=subprocess.PIPE,
                              text=True) for _ in range(k)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "sent"
            os.kill(p.pid, signal.SIGSTOP)
        peak, t0 = before, time.monotonic()
        while time.monotonic() - t0 < stopped:
            peak = max(peak, rss_mib(pid))
            time.sleep(0.05)
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGCONT)
    outcomes = [p.communicate(timeout=300)[0].strip() for p in procs]
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[o] = statuses.get(o, 0) + 1
    return {"k": k, "m": m, "rss_before_mib": before, "rss_peak_mib": peak, "statuses": statuses}


def main() -> None:
    from tests.conftest import start_server

    k = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    m = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
    server = start_server()
    try:
        httpx.post(f"{server.http_url}/v1/metrics/iou", timeout=60,
                   json={"boxes1": [[0, 0, 1, 1]] * 100, "boxes2": [[0, 0, 1, 1]] * 100, "pairwise": True})
        print(json.dumps(burst(server.http_url, server.proc.pid, k, m)))
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)


if __name__ == "__main__":
    main()
