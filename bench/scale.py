"""Per-replica figures for the capacity model in docs/scaling.md, and the cost of spreading a call over replicas.

    python bench/scale.py [--seconds 3] [--rows 1000000] [--out bench/results]

Every figure comes from real `lossd serve` processes (CPU engine) on loopback; the load generator runs on the same
machine and takes CPU from the server, so the per-replica figures are lower bounds for a replica on cores of its
own. The machine's load average before and after is saved beside the figures: on a shared machine read them as
noisy.
  single   single-pair gRPC Evaluate calls (pre-encoded, so the generator costs little) from 1, 4, 16 and 64
           concurrent callers for --seconds each: requests/s, p50, p99
  bulk     one --rows-pair CIoU loss+grad call through LossClient (8 MiB requests, 4 in flight), gRPC and REST:
           pairs/s (best of 3)
  quality  `lossd quality` on the 100-image COCO sample in shared/data against the replica: images/s
  memory   the replica's resident memory after warm-up, after the runs, and its peak (VmHWM)
  spread   the same bulk call through one endpoint, through the same replica named three times (the client's own
           cost of spreading) and through three replicas (LossClient "a,b,c"), alternating, best of 5 each; and
           single-pair calls through each client, p50 of 1,000
Writes scale.json and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from reliability import Server, boxes  # noqa: E402  (the same server start-up as the reliability bench)

COCO = next((p for p in (ROOT.parent / "shared" / "data" / "coco-val2014-100",
                         ROOT.parents[1] / "shared" / "data" / "coco-val2014-100") if p.exists()), None)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pcts(lat: list[float]) -> dict:
    lat = sorted(lat)
    return {"p50_ms": 1e3 * lat[len(lat) // 2], "p99_ms": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


async def single_pair_load(target: str, concurrency: int, seconds: float) -> dict:
    import grpc

    from lossd_client.wire import encode_evaluate_request, passthrough, pb

    p, t = boxes(1, 7)
    req = encode_evaluate_request("ciou", p, t, None, box_format="xyxy", reduction="none", params={},
                                  return_grad=True)
    channel = grpc.aio.insecure_channel(target)
    call = channel.unary_unary("/lossd.v1.LossService/Evaluate", request_serializer=passthrough,
                               response_deserializer=pb.EvaluateResponse.FromString)
    await call(req)
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await call(req, timeout=30)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await channel.close()
    return {"concurrency": concurrency, "requests": len(lat), "rps": len(lat) / elapsed, **pcts(lat)}


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_replica(server: Server, seconds: float, rows: int) -> dict:
    from lossd_client import LossClient

    out: dict = {"rss_after_warmup_mib": round(status(server.proc.pid, "VmRSS"), 1)}
    out["single"] = []
    for conc in (1, 4, 16, 64):
        r = asyncio.run(single_pair_load(f"127.0.0.1:{server.grpc}", conc, seconds))
        log(f"  single pair, {conc:>2} callers: {r['rps']:7.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
            f"p99 {r['p99_ms']:.2f} ms")
        out["single"].append(r)
    p, t = boxes(rows, 3)
    out["bulk"] = {}
    for name, url in (("grpc", f"grpc://127.0.0.1:{server.grpc}"), ("rest", server.url)):
        with LossClient(url) as c:
            c.loss("ciou", p[:1000], t[:1000])
            s = best_of(lambda: c.loss("ciou", p, t), 3)
        out["bulk"][name] = {"rows": rows, "seconds": s, "pairs_per_s": rows / s}
        log(f"  bulk {rows:,} pairs over {name}: {s * 1e3:.0f} ms, {rows / s / 1e6:.2f} M pairs/s")
    if COCO is not None:
        from lossd.quality import run

        with tempfile.TemporaryDirectory() as d:
            args = (COCO / "instances_val2014_100.json", COCO / "fakebbox100_results.json")
            run(*args, Path(d) / "warm", shard_size=50, progress=False, server=f"grpc://127.0.0.1:{server.grpc}")
            summary = run(*args, Path(d) / "q", shard_size=50, progress=False,
                          server=f"grpc://127.0.0.1:{server.grpc}")
        out["quality"] = {"images": summary["images"], "labels": summary["labels"],
                          "seconds": summary["seconds"], "scoring_seconds": summary["scoring_seconds"],
                          "images_per_s": summary["images"] / summary["seconds"],
                          "boxes_per_s": (summary["labels"] + summary["references"]) / summary["seconds"]}
        log(f"  quality: {out['quality']['images_per_s']:.0f} images/s ({summary['images']} images, whole job)")
    out["rss_end_mib"] = round(status(server.proc.pid, "VmRSS"), 1)
    out["rss_peak_mib"] = round(status(server.proc.pid, "VmHWM"), 1)
    log(f"  memory: {out['rss_after_warmup_mib']} MiB after warm-up, {out['rss_end_mib']} MiB at the end, "
        f"peak {out['rss_peak_mib']} MiB")
    return out


def bench_spread(servers: list[Server], rows: int) -> dict:
    from lossd_client import LossClient

    p, t = boxes(rows, 4)
    a = f"grpc://127.0.0.1:{servers[0].grpc}"
    # "same": three endpoints that are all the first replica: the client's own cost of spreading and choosing,
    # without three servers sharing this machine's cores
    clients = {"one": LossClient(a), "same": LossClient([a, a, a]),
               "three": LossClient([f"grpc://127.0.0.1:{s.grpc}" for s in servers])}
    try:
        for c in clients.values():
            for _ in range(3):
                c.loss("ciou", p[:100_000], t[:100_000])
        times: dict[str, list] = {k: [] for k in clients}
        for _ in range(5):  # alternating, so drifting load on the machine hits all alike
            for name, c in clients.items():
                times[name].append(best_of(lambda: c.loss("ciou", p, t), 1))
        pair = boxes(1, 9)
        lat: dict[str, list] = {k: [] for k in clients}
        for _ in range(5):
            for name, c in clients.items():
                for _ in range(200):
                    t0 = time.perf_counter()
                    c.loss("ciou", *pair)
                    lat[name].append(time.perf_counter() - t0)
    finally:
        for c in clients.values():
            c.close()
    res = {"rows": rows, **{f"bulk_{k}_s": min(v) for k, v in times.items()},
           **{f"single_pair_{k}_p50_ms": 1e3 * statistics.median(v) for k, v in lat.items()}}
    for k in ("same", "three"):
        res[f"bulk_{k}_over_one"] = res[f"bulk_{k}_s"] / res["bulk_one_s"]
        res[f"single_pair_{k}_over_one"] = res[f"single_pair_{k}_p50_ms"] / res["single_pair_one_p50_ms"]
    log(f"  {rows:,} pairs: one endpoint {res['bulk_one_s'] * 1e3:.0f} ms, the same replica thrice "
        f"{res['bulk_same_s'] * 1e3:.0f} ms, three replicas {res['bulk_three_s'] * 1e3:.0f} ms")
    log(f"  single pair p50: {res['single_pair_one_p50_ms']:.2f} / {res['single_pair_same_p50_ms']:.2f} / "
        f"{res['single_pair_three_p50_ms']:.2f} ms")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per single-pair load level")
    ap.add_argument("--rows", type=int, default=1_000_000, help="pairs in the bulk call")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    res: dict = {"command": "python bench/scale.py " + " ".join(sys.argv[1:]), "cpus": os.cpu_count(),
                 "loadavg_before": os.getloadavg()}
    with ThreadPoolExecutor(3) as pool:  # three replicas, started together
        servers = list(pool.map(lambda _: Server(), range(3)))
    try:
        log("one replica:")
        res["replica"] = bench_replica(servers[0], args.seconds, args.rows)
        log("three replicas:")
        res["spread"] = bench_spread(servers, args.rows)
    finally:
        for s in servers:
            s.stop()
    res["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
