"""Hostile-mix figures for docs/reliability.md: legitimate traffic while attackers run, on a real `lossd serve` with
its default settings, loopback only, bounded in count and time.

    python bench/hostile.py [--fuzz 100000] [--slow 1000] [--flood 100000] [--out bench/results]

  fuzz      mutated / random requests on both transports (tests/hostile/attacks.py): count of 5xx and of
            UNKNOWN / INTERNAL answers (target 0)
  slow      --slow connections that send an infer head and trickle the body a byte at a time, while single-pair
            calls run on REST and gRPC: share served and p99 against the unloaded p99 measured first (targets
            >= 99 %, <= 5x)
  stall     liveness probes every 10 ms while 60 MiB /v1 bodies are parsed back to back: worst probe (<= 100 ms)
  flood     --flood requests with random loss names, box formats and params: server RSS growth (<= 50 MiB) and
            the /metrics size before and after
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import start_server  # noqa: E402
from tests.hostile import attacks  # noqa: E402


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def fuzz_http(url: str, n: int, seed: int, concurrency: int = 8) -> dict:
    counts: dict[str, int] = {}
    rng = random.Random(seed)
    cases = iter([attacks.fuzz_http_case(rng) for _ in range(n)])
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def worker():
            for case in cases:
                headers = {k: v.encode() for k, v in {"content-type": "application/json", **case.headers}.items()}
                try:
                    resp = await client.request(case.method, case.path, content=case.body, headers=headers)
                    key = f"{resp.status_code // 100}xx"
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                counts[key] = counts.get(key, 0) + 1
                done = sum(counts.values())
                if done % 10000 == 0:
                    progress(f"  HTTP fuzz {done}/{n}: {counts}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


async def fuzz_grpc(target: str, n: int, seed: int, concurrency: int = 8) -> dict:
    counts: dict[str, int] = {}
    rng = random.Random(seed)
    valid = attacks.valid_grpc_messages()
    payloads = iter([attacks.fuzz_grpc_payload(rng, valid) for _ in range(n)])
    async with grpc.aio.insecure_channel(target) as ch:
        calls = {m: ch.unary_unary(m, request_serializer=lambda b: b, response_deserializer=lambda b: b)
                 for m in attacks.GRPC_METHODS}

        async def worker():
            for method, data in payloads:
                try:
                    await calls[method](data, timeout=60)
                    key = "OK"
                except grpc.aio.AioRpcError as exc:
                    key = exc.code().name
                counts[key] = counts.get(key, 0) + 1
                done = sum(counts.values())
                if done % 10000 == 0:
                    progress(f"  gRPC fuzz {done}/{n}: {counts}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


async def legit_pair(server, n: int) -> tuple[attacks.Legit, attacks.Legit]:
    rest, rpc = attacks.Legit(), attacks.Legit()
    await asyncio.gather(attacks.legit_rest(server.http_url, n, rest, pause=0.01),
                         attacks.legit_grpc(server.grpc_target, n, rpc, pause=0.01))
    return rest, rpc


async def slow_phase(server, n_slow: int, n_legit: int) -> dict:
    host, port = "127.0.0.1", int(server.http_url.rsplit(":", 1)[1])
    outcome: dict = {}
    stop = asyncio.Event()
    senders = [asyncio.create_task(attacks.slow_sender(host, port, stop, 2.0, outcome)) for _ in range(n_slow)]
    await asyncio.sleep(2.0)  # every slow sender is connected and trickling
    t0 = time.perf_counter()
    rest, rpc = await legit_pair(server, n_legit)
    legit_seconds = time.perf_counter() - t0
    await asyncio.wait_for(asyncio.gather(*senders), timeout=120)
    return {"slow_outcomes": outcome, "rest": _summary(rest), "grpc": _summary(rpc),
            "legit_seconds": round(legit_seconds, 1)}


def _summary(r: attacks.Legit) -> dict:
    return {"ok": r.ok, "failed": r.failed, "errors": r.errors, "p50_ms": round(r.p(50) * 1000, 2),
            "p99_ms": round(r.p(99) * 1000, 2), "max_ms": round(max(r.latencies) * 1000, 2)}


def stall_phase(server, mib: int, bodies: int) -> dict:
    rows = int(mib * 2**20 / 56)  # ~56 bytes of JSON per row of pred + target
    body = json.dumps({"pred": [[0.0, 0.0, 10.0, 10.0]] * rows, "target": [[1.0, 1.0, 11.0, 11.0]] * rows,
                       "return_grad": False}).encode()
    statuses: list[int] = []

    def post():
        with httpx.Client(base_url=server.http_url, timeout=300) as client:
            for _ in range(bodies):
                statuses.append(client.post("/v1/losses/ciou", content=body,
                                            headers={"content-type": "application/json"}).status_code)

    worker = threading.Thread(target=post)
    worker.start()
    lat = []
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        while worker.is_alive():
            t0 = time.perf_counter()
            client.get("/v2/health/live")
            lat.append(time.perf_counter() - t0)
            time.sleep(0.01)
    worker.join()
    lat.sort()
    return {"body_mib": round(len(body) / 2**20, 1), "bodies": bodies, "statuses": statuses, "probes": len(lat),
            "probe_p50_ms": round(lat[len(lat) // 2] * 1000, 2), "probe_max_ms": round(lat[-1] * 1000, 1)}


async def flood_phase(server, n: int, seed: int, concurrency: int = 8) -> dict:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as client:
        metrics_before = len((await client.get("/metrics")).content)
        warm = [attacks.random_name_request(rng) for _ in range(2000)]
        for name, body in warm:
            await client.post(f"/v1/losses/{name}", json=body)
        rss_before = attacks.rss_mib(server.proc.pid)
        statuses: dict[str, int] = {}
        done = 0

        async def worker():
            nonlocal done
            while done < n:
                done += 1
                name, body = attacks.random_name_request(rng)
                resp = await client.post(f"/v1/losses/{name}", json=body)
                key = f"{resp.status_code // 100}xx"
                statuses[key] = statuses.get(key, 0) + 1
                if done % 20000 == 0:
                    progress(f"  flood {done}/{n}, RSS {attacks.rss_mib(server.proc.pid):.0f} MiB")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        metrics_after = len((await client.get("/metrics")).content)
    rss_after = attacks.rss_mib(server.proc.pid)
    return {"requests": n, "statuses": statuses, "rss_before_mib": round(rss_before, 1),
            "rss_after_mib": round(rss_after, 1), "rss_growth_mib": round(rss_after - rss_before, 1),
            "metrics_bytes_before": metrics_before, "metrics_bytes_after": metrics_after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fuzz", type=int, default=100_000, help="fuzzed requests per transport")
    ap.add_argument("--slow", type=int, default=1000, help="slow connections")
    ap.add_argument("--legit", type=int, default=500, help="legitimate calls per transport in each phase")
    ap.add_argument("--stall-mib", type=int, default=60, help="size of each /v1 body in the stall phase")
    ap.add_argument("--flood", type=int, default=100_000, help="random-name requests")
    ap.add_argument("--phases", default="slow,stall,fuzz,flood", help="which phases to run, comma-separated")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    out: dict = {"settings": "defaults (lossd serve with no LOSSD_* variables)"}
    server = start_server()
    try:
        progress("unloaded single-pair latency")
        rest, rpc = asyncio.run(legit_pair(server, args.legit))
        out["unloaded"] = {"rest": _summary(rest), "grpc": _summary(rpc)}
        if "slow" in phases:
            progress(f"slow senders: {args.slow} connections trickling bodies (the body deadline is 30 s)")
            out["slow"] = asyncio.run(slow_phase(server, args.slow, args.legit))
            for t in ("rest", "grpc"):
                s, u = out["slow"][t], out["unloaded"][t]
                s["served_share"] = round(s["ok"] / (s["ok"] + s["failed"]), 4)
                s["p99_vs_unloaded"] = round(s["p99_ms"] / u["p99_ms"], 2)
            progress(f"  {out['slow']}")
        if "stall" in phases:
            progress(f"stall: liveness while {args.stall_mib} MiB /v1 bodies are parsed (three runs)")
            out["stall"] = [stall_phase(server, args.stall_mib, 3) for _ in range(3)]
            progress(f"  {out['stall']}")
        if "fuzz" in phases:
            progress(f"fuzz: {args.fuzz} requests per transport")
            out["fuzz_http"] = asyncio.run(fuzz_http(server.http_url, args.fuzz, 1))
            progress(f"  HTTP {out['fuzz_http']}")
            out["fuzz_grpc"] = asyncio.run(fuzz_grpc(server.grpc_target, args.fuzz, 2))
            progress(f"  gRPC {out['fuzz_grpc']}")
        if "flood" in phases:
            progress(f"flood: {args.flood} requests with random names, formats, params")
            out["flood"] = asyncio.run(flood_phase(server, args.flood, 3))
            progress(f"  {out['flood']}")
        out["server_alive"] = httpx.get(f"{server.http_url}/v2/health/ready").status_code == 200
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=60)
        log = server.log()
        out["tracebacks_in_log"] = log.count("Traceback")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "hostile.json" if phases >= {"slow", "stall", "fuzz", "flood"} else f"hostile-{'-'.join(sorted(phases))}.json"
    (args.out / name).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
