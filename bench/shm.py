"""Same-host loss calls through system shared memory against the wire and the caller's own process, in one run.

    python bench/shm.py [--sizes 1000000,10000000] [--budget 2.0] [--out bench/results]

CIoU loss + gradient on N box pairs (float32), each scenario timed by the median chunk of repeated calls
(bench/run.py's timeit_cpu), with the client's and the server's CPU per call:

  engine_in_process     lossd's engine called in this process (no server)
  torch_autograd        the same CIoU formula written in torch, forward + backward, in this process (the caller's
                        own alternative), at the torch thread count that is fastest on this machine at the time
                        (probed first)
  torchvision           torchvision.ops.complete_box_iou_loss, forward + backward, in this process, at the same
                        thread count (bench/torchvision_ops.py: installed, or its own code from the matching PyPI
                        wheel where the wheel cannot be installed beside a CPU-only torch)
  lossd_shm_grpc/http   LossClient with shared memory (copy in, one small request, copy LOSS and GRAD out)
  lossd_wire_grpc/http  LossClient(shared_memory=False): the tensors through the socket (8 MiB requests, 4 in flight)
  triton_shm_grpc/http  tritonclient's shared-memory flow (set_shared_memory_region, infer, get_contents_as_numpy
                        and a copy out), in a subprocess: its protobuf messages clash with lossd's in one process

Each row has ratios against the in-process engine, torch autograd and torchvision: by wall time, and by CPU (the client's
plus the server's CPU per call against the engine's). On a busy machine wall times swing with other work; the CPU
a call costs moves much less. The machine's load (1-minute load average before and after, and the hypervisor's
steal) is saved with the figures: it says how far the wall-time ratios can be trusted. Writes shm.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (bench/run.py: the server, the data and the timers)

TRITON = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import run
    import tritonclient.grpc as tg
    import tritonclient.http as th
    import tritonclient.utils.shared_memory as shm

    http_url, grpc_target, sizes = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    budget, pid = float(sys.argv[5]), int(sys.argv[6])
    out = {}
    for n in sizes:
        p, t = run.boxes(n, 7)
        for name, mod, url in (("http", th, http_url), ("grpc", tg, grpc_target)):
            kw = {"network_timeout": 600.0, "connection_timeout": 600.0} if name == "http" else {}
            c = mod.InferenceServerClient(url, **kw)
            key = f"/lossd_bench_{os.getpid()}_{name}_{n}"
            in_b, loss_b = p.nbytes, n * 4
            ih = shm.create_shared_memory_region("bin", key + "_in", 2 * in_b)
            oh = shm.create_shared_memory_region("bout", key + "_out", loss_b + in_b)
            c.register_system_shared_memory("bin", key + "_in", 2 * in_b)
            c.register_system_shared_memory("bout", key + "_out", loss_b + in_b)
            inputs = [mod.InferInput("PRED", [n, 4], "FP32"), mod.InferInput("TARGET", [n, 4], "FP32")]
            inputs[0].set_shared_memory("bin", in_b)
            inputs[1].set_shared_memory("bin", in_b, offset=in_b)
            outputs = [mod.InferRequestedOutput("LOSS"), mod.InferRequestedOutput("GRAD")]
            outputs[0].set_shared_memory("bout", loss_b)
            outputs[1].set_shared_memory("bout", in_b, offset=loss_b)

            def call():
                shm.set_shared_memory_region(ih, [p, t])
                c.infer("ciou", inputs, outputs=outputs)
                loss = shm.get_contents_as_numpy(oh, np.float32, [n]).copy()
                grad = shm.get_contents_as_numpy(oh, np.float32, [n, 4], offset=loss_b).copy()
                return loss, grad

            loss, grad = call()
            out[f"{n}:{name}"] = dict(run.timeit_cpu(call, pid, budget, chunks=5), loss_sum=float(loss.sum()),
                                      grad_sum=float(grad.sum()))
            c.unregister_system_shared_memory("bin")
            c.unregister_system_shared_memory("bout")
            shm.destroy_shared_memory_region(ih)
            shm.destroy_shared_memory_region(oh)
    print(json.dumps(out))
""")


def torch_ciou(pred, target, eps: float = 1e-7):
    """CIoU loss (Zheng et al. 2020) as a caller writes it in torch: alpha detached, as torchvision does."""
    import torch

    x1, y1, x2, y2 = pred.unbind(-1)
    a1, b1, a2, b2 = target.unbind(-1)
    inter = (torch.min(x2, a2) - torch.max(x1, a1)).clamp(min=0) * (torch.min(y2, b2) - torch.max(y1, b1)).clamp(min=0)
    union = (x2 - x1) * (y2 - y1) + (a2 - a1) * (b2 - b1) - inter
    iou = inter / (union + eps)
    c2 = (torch.max(x2, a2) - torch.min(x1, a1)) ** 2 + (torch.max(y2, b2) - torch.min(y1, b1)) ** 2 + eps
    rho2 = ((x1 + x2 - a1 - a2) ** 2 + (y1 + y2 - b1 - b2) ** 2) / 4
    v = (4 / math.pi ** 2) * (torch.atan((a2 - a1) / (b2 - b1)) - torch.atan((x2 - x1) / (y2 - y1))) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return 1 - iou + rho2 / c2 + alpha * v


def best_threads(torch) -> tuple[int, dict]:
    """The torch thread count at which the caller's autograd runs fastest here (on a busy machine, intra-op
    threads that wait on each other can be many times slower than one): median of 3 calls at 100k pairs."""
    p, t = run.boxes(100_000, 3)
    pt, tt = torch.from_numpy(p), torch.from_numpy(t)
    default, probe = torch.get_num_threads(), {}
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            x = pt.clone().requires_grad_(True)
            torch_ciou(x, tt).sum().backward()
            times.append(time.perf_counter() - t0)
        probe[threads] = sorted(times)[1]
    torch.set_num_threads(default)
    return min(probe, key=probe.get), {str(k): v for k, v in probe.items()}


def load() -> dict:
    return {"loadavg_1m": os.getloadavg()[0], "steal_s": run.steal()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per scenario and size (about)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    import torch

    from lossd.engine import Engine
    from lossd_client import LossClient
    from torchvision_ops import load as load_torchvision

    tv_ciou, tv_source = load_torchvision("complete_box_iou_loss")
    run.log(f"torchvision: {tv_source}")

    before = load()
    server = run.Server(batching=True)
    res: dict = {"sizes": sizes, "cores": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                 "torch_threads": torch.get_num_threads(), "torchvision": tv_source, "load_before": before, "rows": []}
    try:
        engine = Engine(device="cpu")
        triton = subprocess.run([sys.executable, "-c", TRITON, str(Path(__file__).resolve().parent),
                                 f"127.0.0.1:{server.http}", f"127.0.0.1:{server.grpc}", json.dumps(sizes),
                                 str(args.budget), str(server.proc.pid)], capture_output=True, text=True,
                                timeout=3000)
        if triton.returncode != 0:
            raise RuntimeError(f"tritonclient run failed: {triton.stderr[-2000:]}")
        triton_rows = json.loads(triton.stdout)
        autograd_threads, res["torch_autograd_threads_probe"] = best_threads(torch)
        for n in sizes:
            p, t = run.boxes(n, 7)
            pt, tt = torch.from_numpy(p), torch.from_numpy(t)
            rows = {}
            rows["engine_in_process"] = run.timeit_cpu(lambda: engine.evaluate("ciou", pt, tt), None, args.budget,
                                                       chunks=5)

            def autograd():
                x = pt.clone().requires_grad_(True)
                torch_ciou(x, tt).sum().backward()
                return x.grad

            default_threads = torch.get_num_threads()
            torch.set_num_threads(autograd_threads)
            try:
                rows["torch_autograd"] = run.timeit_cpu(autograd, None, args.budget, chunks=5)
            finally:
                torch.set_num_threads(default_threads)
            rows["torch_autograd"]["torch_threads"] = autograd_threads

            def torchvision():
                x = pt.clone().requires_grad_(True)
                tv_ciou(x, tt, reduction="sum").backward()
                return x.grad

            torch.set_num_threads(autograd_threads)
            try:
                rows["torchvision"] = run.timeit_cpu(torchvision, None, args.budget, chunks=5)
                x = pt.double().requires_grad_(True)
                tv_sum = float(tv_ciou(x, tt.double(), reduction="sum").detach())
            finally:
                torch.set_num_threads(default_threads)
            rows["torchvision"]["torch_threads"] = autograd_threads
            results = {}
            for transport, url in (("grpc", f"grpc://127.0.0.1:{server.grpc}"),
                                   ("http", f"http://127.0.0.1:{server.http}")):
                for mode in ("shm", "wire"):
                    with LossClient(url, shared_memory=mode == "shm", timeout=600) as c:
                        results[(mode, transport)] = c.loss("ciou", p, t)
                        rows[f"lossd_{mode}_{transport}"] = run.timeit_cpu(lambda: c.loss("ciou", p, t),
                                                                           server.proc.pid, args.budget, chunks=5)
                        assert (c.shared_memory_calls > 0) == (mode == "shm"), (mode, transport)
            ref = results[("wire", "grpc")]
            for key, r in results.items():  # every path gives the same numbers
                assert np.array_equal(r.loss, ref.loss) and np.array_equal(r.grad, ref.grad), key
            for transport in ("grpc", "http"):
                tr = triton_rows[f"{n}:{transport}"]
                assert abs(tr.pop("loss_sum") - float(ref.loss.sum())) <= 1e-3 * abs(float(ref.loss.sum())), transport
                tr.pop("grad_sum")
                rows[f"triton_shm_{transport}"] = tr
            # torchvision computes the same loss (float64 here, so its eps and ours do not blur the check)
            assert abs(tv_sum - float(ref.loss.sum())) <= 1e-3 * abs(tv_sum), (tv_sum, float(ref.loss.sum()))
            base, torch_s = rows["engine_in_process"]["s"], rows["torch_autograd"]["s"]
            base_cpu, torch_cpu = rows["engine_in_process"]["client_cpu_s"], rows["torch_autograd"]["client_cpu_s"]
            tv_s, tv_cpu = rows["torchvision"]["s"], rows["torchvision"]["client_cpu_s"]
            for name, r in rows.items():
                r["fraction_of_engine"] = base / r["s"]
                r["x_torch_autograd"] = torch_s / r["s"]
                r["x_torchvision"] = tv_s / r["s"]
                r["cpu_x_torchvision"] = tv_cpu / (r["client_cpu_s"] + (r.get("server_cpu_s") or 0.0))
                # CPU of both processes per call: on a busy machine wall times swing with other people's work,
                # the CPU a call costs much less
                r["cpu_s"] = r["client_cpu_s"] + (r.get("server_cpu_s") or 0.0)
                r["cpu_fraction_of_engine"] = base_cpu / r["cpu_s"]
                r["cpu_x_torch_autograd"] = torch_cpu / r["cpu_s"]
                cpu = f"client CPU {r['client_cpu_s'] * 1e3:7.1f} ms"
                if r.get("server_cpu_s") is not None:
                    cpu += f", server {r['server_cpu_s'] * 1e3:7.1f} ms"
                run.log(f"  n={n:>9} {name:>18}: {r['s'] * 1e3:8.1f} ms  {r['fraction_of_engine']:5.2f} of engine  "
                        f"{r['x_torch_autograd']:5.2f}x autograd {r['x_torchvision']:5.2f}x torchvision | CPU "
                        f"{r['cpu_s'] * 1e3:7.1f} ms {r['cpu_fraction_of_engine']:5.2f} of engine "
                        f"{r['cpu_x_torch_autograd']:5.2f}x autograd {r['cpu_x_torchvision']:5.2f}x torchvision "
                        f"({cpu}; steal {r['steal_fraction']:.0%})")
            res["rows"].append({"n": n, **rows})
    finally:
        server.stop()
    res["load_after"] = load()
    res["steal_fraction_run"] = ((res["load_after"]["steal_s"] - before["steal_s"]))
    run.log(f"load average (1 min) {before['loadavg_1m']:.2f} before, {res['load_after']['loadavg_1m']:.2f} after, "
            f"on {os.cpu_count()} cores")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shm.json").write_text(json.dumps(res, indent=1))
    run.log(f"wrote {out / 'shm.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
