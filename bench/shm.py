"""Same-host loss calls through system shared memory against the wire and the caller's own process, in one run.

    python bench/shm.py [--sizes 1000000,10000000] [--budget 2.0] [--rounds 7] [--out bench/results]

CIoU loss + gradient on N box pairs (float32). The scenarios take turns: each round runs a chunk of calls of
every scenario (in a rotated order, with a short pause before each chunk so that one scenario's idle OpenMP
threads are asleep before the next one starts, and one untimed call to start each chunk of calls under a
second), and each scenario's ratio to the in-process engine is taken within a round, then the median over rounds
is reported. A machine whose speed drifts during the run (other
tenants, frequency) then moves both sides of a ratio alike. Scenarios:

  engine_in_process     lossd's engine called in this process (no server)
  torch_autograd        the same CIoU formula written in torch, forward + backward, in this process (the caller's
                        own alternative), at the torch thread count that is fastest on this machine at the time
                        (probed first)
  torchvision           torchvision.ops.complete_box_iou_loss, forward + backward, in this process, at the same
                        thread count (bench/torchvision_ops.py: installed, or its own code from the matching PyPI
                        wheel where the wheel cannot be installed beside a CPU-only torch)
  lossd_shm_grpc/http   LossClient with shared memory: the inputs copied into its region, one small request, LOSS
                        and GRAD handed back as views of the region (lent to the caller until it drops them)
  lossd_inplace_grpc/http  LossClient with shared memory, the inputs built in the region (client.shared_inputs():
                        the caller fills its arrays instead of arrays of its own, as the in-process engine reads
                        tensors the caller made): nothing copied in, one small request, answers as above
  lossd_wire_grpc/http  LossClient(shared_memory=False): the tensors through the socket (8 MiB requests, 4 in flight)
  triton_shm_grpc/http  tritonclient's shared-memory flow as its examples write it (set_shared_memory_region,
                        infer, get_contents_as_numpy: views of the output region, valid until the next call), in a
                        worker process: its protobuf messages clash with lossd's in one process

Each row has the per-call wall time (median over rounds), its ratio to the in-process engine, torch autograd and
torchvision (medians of the per-round ratios, with their range), and the CPU per call of the client and of the
server. The machine's load (1-minute load average before and after, and the hypervisor's steal) is saved with the
figures. Writes shm.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (bench/run.py: the server, the data and the timers)

PAUSE_S = 0.05  # before each chunk: OpenMP threads of the previous scenario stop spinning and sleep
WARM_UP_BELOW_S = 1.0  # each chunk of a scenario faster than this starts with one untimed call

# tritonclient in its own process, driven one command (a JSON line) at a time
TRITON = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import run
    import tritonclient.grpc as tg
    import tritonclient.http as th
    import tritonclient.utils.shared_memory as shm

    http_url, grpc_target, pid = sys.argv[2], sys.argv[3], int(sys.argv[4])
    flows, handles = {}, []

    def teardown():
        for c, ih, oh, name in handles:
            c.unregister_system_shared_memory("bin_" + name)
            c.unregister_system_shared_memory("bout_" + name)
            shm.destroy_shared_memory_region(ih)
            shm.destroy_shared_memory_region(oh)
        handles.clear()
        flows.clear()

    def setup(n):
        teardown()
        p, t = run.boxes(n, 7)
        sums = {}
        for name, mod, url in (("http", th, http_url), ("grpc", tg, grpc_target)):
            kw = {"network_timeout": 600.0, "connection_timeout": 600.0} if name == "http" else {}
            c = mod.InferenceServerClient(url, **kw)
            key = f"/lossd_bench_{os.getpid()}_{name}_{n}"
            in_b, loss_b = p.nbytes, n * 4
            ih = shm.create_shared_memory_region("bin", key + "_in", 2 * in_b)
            oh = shm.create_shared_memory_region("bout", key + "_out", loss_b + in_b)
            c.register_system_shared_memory("bin_" + name, key + "_in", 2 * in_b)
            c.register_system_shared_memory("bout_" + name, key + "_out", loss_b + in_b)
            handles.append((c, ih, oh, name))
            inputs = [mod.InferInput("PRED", [n, 4], "FP32"), mod.InferInput("TARGET", [n, 4], "FP32")]
            inputs[0].set_shared_memory("bin_" + name, in_b)
            inputs[1].set_shared_memory("bin_" + name, in_b, offset=in_b)
            outputs = [mod.InferRequestedOutput("LOSS"), mod.InferRequestedOutput("GRAD")]
            outputs[0].set_shared_memory("bout_" + name, loss_b)
            outputs[1].set_shared_memory("bout_" + name, in_b, offset=loss_b)

            def call(c=c, ih=ih, oh=oh, inputs=inputs, outputs=outputs, n=n, loss_b=loss_b):
                shm.set_shared_memory_region(ih, [p, t])
                c.infer("ciou", inputs, outputs=outputs)
                return (shm.get_contents_as_numpy(oh, np.float32, [n]),
                        shm.get_contents_as_numpy(oh, np.float32, [n, 4], offset=loss_b))

            loss, grad = call()
            sums[name] = float(loss.astype(np.float64).sum())
            flows[name] = call
        return sums

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "setup":
            reply = setup(cmd["n"])
        elif cmd["op"] == "chunk":
            reply = run.chunk(flows[cmd["transport"]], cmd["k"], pid)
        else:
            teardown()
            break
        print(json.dumps(reply), flush=True)
""")


class Triton:
    """The tritonclient worker process."""

    def __init__(self, server: run.Server) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", TRITON, str(Path(__file__).resolve().parent),
                                      f"127.0.0.1:{server.http}", f"127.0.0.1:{server.grpc}", str(server.proc.pid)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the tritonclient worker exited ({self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


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
    ap.add_argument("--rounds", type=int, default=7, help="rounds of chunks (each scenario's ratio is taken "
                    "within a round)")
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
    triton = Triton(server)
    clients = {}
    res: dict = {"sizes": sizes, "cores": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                 "torch_threads": torch.get_num_threads(), "torchvision": tv_source, "load_before": before,
                 "rounds": args.rounds, "rows": []}
    try:
        engine = Engine(device="cpu")
        autograd_threads, res["torch_autograd_threads_probe"] = best_threads(torch)
        default_threads = torch.get_num_threads()

        def in_threads(fn, threads):
            def call():
                torch.set_num_threads(threads)
                try:
                    return fn()
                finally:
                    torch.set_num_threads(default_threads)
            return call

        urls = {"grpc": f"grpc://127.0.0.1:{server.grpc}", "http": f"http://127.0.0.1:{server.http}"}
        for transport, url in urls.items():
            for mode in ("shm", "wire"):
                clients[(mode, transport)] = LossClient(url, shared_memory=mode == "shm", timeout=600)
        for n in sizes:
            p, t = run.boxes(n, 7)
            pt, tt = torch.from_numpy(p), torch.from_numpy(t)
            inputs = {}
            for transport in urls:
                bufs = inputs[transport] = clients[("shm", transport)].shared_inputs(p.shape)
                assert bufs.shared, transport
                bufs.pred[...], bufs.target[...] = p, t

            def autograd():
                x = pt.clone().requires_grad_(True)
                torch_ciou(x, tt).sum().backward()
                return x.grad

            def torchvision():
                x = pt.clone().requires_grad_(True)
                tv_ciou(x, tt, reduction="sum").backward()
                return x.grad

            # every path gives the same numbers
            results = {key: c.loss("ciou", p, t) for key, c in clients.items()}
            for transport, bufs in inputs.items():
                results[("inplace", transport)] = clients[("shm", transport)].loss("ciou", bufs.pred, bufs.target)
            for transport, bufs in inputs.items():  # the in-place calls' answers lie in their own region
                whole = np.frombuffer(bufs.region.mem.buf, np.uint8)
                assert np.shares_memory(results[("inplace", transport)].grad, whole), transport
                del whole
            ref = results[("wire", "grpc")]
            for key, r in results.items():
                assert np.array_equal(r.loss, ref.loss) and np.array_equal(r.grad, ref.grad), key
                assert (clients.get(key, clients[("shm", key[1])]).shared_memory_calls > 0) == (key[0] != "wire"), key
            del results
            ref_sum = float(ref.loss.astype(np.float64).sum())
            for transport, tr_sum in triton.ask(op="setup", n=n).items():
                assert abs(tr_sum - ref_sum) <= 1e-3 * abs(ref_sum), (transport, tr_sum, ref_sum)
            # torchvision computes the same loss (float64 here, so its eps and ours do not blur the check)
            x = pt.double().requires_grad_(True)
            tv_sum = float(tv_ciou(x, tt.double(), reduction="sum").detach())
            assert abs(tv_sum - ref_sum) <= 1e-3 * abs(tv_sum), (tv_sum, ref_sum)

            local = {"engine_in_process": lambda: engine.evaluate("ciou", pt, tt),
                     "torch_autograd": in_threads(autograd, autograd_threads),
                     "torchvision": in_threads(torchvision, autograd_threads)}
            for (mode, transport), c in clients.items():
                local[f"lossd_{mode}_{transport}"] = (lambda c=c: c.loss("ciou", p, t))
            for transport, bufs in inputs.items():
                local[f"lossd_inplace_{transport}"] = (
                    lambda c=clients[("shm", transport)], b=bufs: c.loss("ciou", b.pred, b.target))
            names = list(local) + ["triton_shm_grpc", "triton_shm_http"]

            def run_chunk(name: str, k: int) -> dict:
                if name.startswith("triton_"):
                    return triton.ask(op="chunk", transport=name.rsplit("_", 1)[1], k=k)
                server_pid = server.proc.pid if name.startswith("lossd_") else None
                return run.chunk(local[name], k, server_pid)

            # calls per chunk: about budget / rounds seconds of each scenario
            once = {name: run_chunk(name, 1)["s"] for name in names}
            ks = {name: max(1, round(args.budget / args.rounds / max(once[name], 1e-6))) for name in names}
            chunks: dict[str, list[dict]] = {name: [] for name in names}
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    time.sleep(PAUSE_S)
                    if once[name] < WARM_UP_BELOW_S:
                        run_chunk(name, 1)  # untimed: the scenario's threads and data back in play
                    chunks[name].append(run_chunk(name, ks[name]))
                run.log(f"  n={n}: round {r + 1}/{args.rounds} done")
            res["rows"].append({"n": n, **summarise(n, chunks, ks)})
            for bufs in inputs.values():
                bufs.close()
    finally:
        triton.close()
        for c in clients.values():
            c.close()
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


def summarise(n: int, chunks: dict[str, list[dict]], ks: dict[str, int]) -> dict:
    """Per scenario: median wall and CPU per call over rounds, and ratios to the baselines taken round by round
    (median, with the lowest and highest round)."""
    def cpu(c: dict) -> float:
        return c["client_cpu_s"] + (c.get("server_cpu_s") or 0.0)

    rows = {}
    for name, cs in chunks.items():
        r = {"s": statistics.median(c["s"] for c in cs), "calls_per_chunk": ks[name],
             "client_cpu_s": statistics.median(c["client_cpu_s"] for c in cs),
             "cpu_s": statistics.median(cpu(c) for c in cs),
             "steal_fraction": max(c["steal_fraction"] for c in cs), "rounds_s": [c["s"] for c in cs]}
        if cs[0].get("server_cpu_s") is not None:
            r["server_cpu_s"] = statistics.median(c["server_cpu_s"] for c in cs)
        for key, base in (("fraction_of_engine", "engine_in_process"), ("x_torch_autograd", "torch_autograd"),
                          ("x_torchvision", "torchvision")):
            ratios = [b["s"] / c["s"] for b, c in zip(chunks[base], cs)]
            r[key] = statistics.median(ratios)
            r[key + "_range"] = [min(ratios), max(ratios)]
            cpu_ratios = [cpu(b) / cpu(c) for b, c in zip(chunks[base], cs)]
            r["cpu_" + key] = statistics.median(cpu_ratios)
        rows[name] = r
        spread = r["fraction_of_engine_range"]
        detail = f"client CPU {r['client_cpu_s'] * 1e3:7.1f} ms"
        if "server_cpu_s" in r:
            detail += f", server {r['server_cpu_s'] * 1e3:7.1f} ms"
        run.log(f"  n={n:>9} {name:>18}: {r['s'] * 1e3:8.1f} ms  {r['fraction_of_engine']:5.2f} of engine "
                f"[{spread[0]:.2f}-{spread[1]:.2f}]  {r['x_torch_autograd']:5.2f}x autograd "
                f"{r['x_torchvision']:5.2f}x torchvision | CPU {r['cpu_s'] * 1e3:7.1f} ms "
                f"{r['cpu_fraction_of_engine']:5.2f} of engine {r['cpu_x_torchvision']:5.2f}x torchvision "
                f"({detail}; steal up to {r['steal_fraction']:.0%})")
    return rows


if __name__ == "__main__":
    sys.exit(main())
