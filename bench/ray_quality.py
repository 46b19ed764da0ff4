"""`lossd quality --ray` with an engine in every worker against `--ray --server`, the workers calling servers: images/s
and the workers' memory, same data, same run.

    python bench/ray_quality.py [--copies 50] [--servers 2] [--reps 3] [--shard-size 50] [--out bench/results]

The data is the 100-image COCO sample in shared/data, repeated --copies times under new image and box ids
(5,000 images, 41,500 labels by default). After a warm-up (the sample once in-process and once on the servers,
not counted), each repetition runs, in this order, the job in-process, with --server
(no Ray), with --ray (a fresh local Ray with as many CPUs as the machine has, an engine per worker) and with
--ray --server (a fresh local Ray, the workers calling the --servers local `lossd serve` processes, CPU engine).
A Ray mode runs twice in its Ray session: "cold" (the workers import lossd, and torch when they load an engine)
and "warm" (the same workers again). Everything runs on this machine: servers, workers, driver and Ray share
its cores. Worker memory is read from /proc after the warm run: the resident set (VmRSS) and its peak (VmHWM)
of every worker that ran a shard, and whether libtorch is mapped in it. Writes ray_quality.json and prints it.
"""

from __future__ import annotations

import argparse
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
from reliability import Server  # noqa: E402

COCO = next((p for p in (ROOT.parent / "shared" / "data" / "coco-val2014-100",
                         ROOT.parents[1] / "shared" / "data" / "coco-val2014-100") if p.exists()), None)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def repeated(folder: Path, copies: int) -> tuple[Path, Path]:
    """The COCO sample ``copies`` times over, each copy under new image and box ids."""
    labels = json.loads((COCO / "instances_val2014_100.json").read_text())
    preds = json.loads((COCO / "fakebbox100_results.json").read_text())
    step = 1 + max(im["id"] for im in labels["images"])
    astep = 1 + max(a["id"] for a in labels["annotations"])
    out_l = {**labels, "images": [], "annotations": []}
    out_p = []
    for k in range(copies):
        out_l["images"] += [{**im, "id": im["id"] + k * step} for im in labels["images"]]
        out_l["annotations"] += [{**a, "id": a["id"] + k * astep, "image_id": a["image_id"] + k * step}
                                 for a in labels["annotations"]]
        out_p += [{**p, "image_id": p["image_id"] + k * step} for p in preds]
    lp, pp = folder / "labels.json", folder / "predictions.json"
    lp.write_text(json.dumps(out_l))
    pp.write_text(json.dumps(out_p))
    return lp, pp


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(d.name))
    return out


def _mib(status: str, key: str) -> float:
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def workers() -> list[dict]:
    """The Ray workers below this process that ran a shard (scipy mapped: the matching uses it, Ray does not)."""
    children, found, stack = _children(), [], [os.getpid()]
    while stack:
        for pid in children.get(stack.pop(), []):
            stack.append(pid)
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                maps = Path(f"/proc/{pid}/maps").read_text()
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            if (b"ray::" in cmd or b"default_worker.py" in cmd) and "/scipy/" in maps:
                found.append({"pid": pid, "torch_loaded": "libtorch" in maps,
                              "rss_mib": round(_mib(status, "VmRSS"), 1), "peak_mib": round(_mib(status, "VmHWM"), 1)})
    return found


def job(args, out: Path, **kw) -> dict:
    from lossd.quality import run

    s = run(*args, out, progress=False, **kw)
    return {"seconds": s["seconds"], "images_per_s": round(s["images"] / s["seconds"], 1), "mode": s["mode"]}


def ray_mode(args, d: Path, name: str, **kw) -> dict:
    import ray

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=os.cpu_count() or 2)
    res: dict = {"ray_init_s": round(time.perf_counter() - t0, 2)}
    try:
        res["cold"] = job(args, d / f"{name}-cold", use_ray=True, **kw)
        res["warm"] = job(args, d / f"{name}-warm", use_ray=True, **kw)
        res["workers"] = workers()
    finally:
        ray.shutdown()
    w = res["workers"]
    log(f"  {name:10s} cold {res['cold']['images_per_s']:7.1f} images/s, warm {res['warm']['images_per_s']:7.1f} "
        f"images/s; {len(w)} workers, RSS {[x['rss_mib'] for x in w]} MiB, peak {[x['peak_mib'] for x in w]} MiB, "
        f"torch loaded: {[x['torch_loaded'] for x in w]}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=50, help="copies of the 100-image sample")
    ap.add_argument("--servers", type=int, default=2, help="local lossd serve processes for the server modes")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the four modes")
    ap.add_argument("--shard-size", type=int, default=50, help="images per shard (a Ray task)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    if COCO is None:
        raise SystemExit("shared/data/coco-val2014-100 not found beside the checkout")
    res: dict = {"command": "python bench/ray_quality.py " + " ".join(sys.argv[1:]), "cpus": os.cpu_count(),
                 "loadavg_before": os.getloadavg(), "runs": []}
    with ThreadPoolExecutor(a.servers) as pool:
        servers = list(pool.map(lambda _: Server(), range(a.servers)))
    urls = ",".join(f"grpc://127.0.0.1:{s.grpc}" for s in servers)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            args = repeated(d, a.copies)
            res["images"] = 100 * a.copies
            sample = (COCO / "instances_val2014_100.json", COCO / "fakebbox100_results.json")
            job(sample, d / "warm-up-in-process", shard_size=a.shard_size)
            job(sample, d / "warm-up-server", shard_size=a.shard_size, server=urls)
            for rep in range(a.reps):
                log(f"repetition {rep + 1}:")
                r = {"in-process": job(args, d / f"in-process-{rep}", shard_size=a.shard_size),
                     "server": job(args, d / f"server-{rep}", shard_size=a.shard_size, server=urls)}
                log(f"  in-process {r['in-process']['images_per_s']:7.1f} images/s; --server "
                    f"{r['server']['images_per_s']:7.1f} images/s")
                r["ray"] = ray_mode(args, d, f"ray-{rep}", shard_size=a.shard_size)
                r["ray+server"] = ray_mode(args, d, f"ray+server-{rep}", shard_size=a.shard_size, server=urls)
                res["runs"].append(r)
                same = all((d / f"{m}/boxes.parquet").read_bytes() == (d / f"in-process-{rep}/boxes.parquet")
                           .read_bytes() for m in (f"server-{rep}", f"ray-{rep}-warm", f"ray+server-{rep}-warm"))
                r["outputs_identical"] = same
        res["server_rss_mib"] = [s.rss_mib() for s in servers]
    finally:
        for s in servers:
            s.stop()
    res["loadavg_after"] = os.getloadavg()
    med = {}
    for m in ("in-process", "server"):
        med[m] = statistics.median(r[m]["images_per_s"] for r in res["runs"])
    for m in ("ray", "ray+server"):
        for t in ("cold", "warm"):
            med[f"{m} {t}"] = statistics.median(r[m][t]["images_per_s"] for r in res["runs"])
        peaks = [w["peak_mib"] for r in res["runs"] for w in r[m]["workers"]]
        med[f"{m} worker peak MiB (median, max)"] = [statistics.median(peaks), max(peaks)] if peaks else None
        med[f"{m} workers with torch"] = sum(w["torch_loaded"] for r in res["runs"] for w in r[m]["workers"])
    res["summary"] = med
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_quality.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
