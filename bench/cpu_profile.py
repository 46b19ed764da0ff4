"""Where the CPU goes: a system-wide sampling profile (Linux perf) of the client and a real `lossd serve`.

    python bench/cpu_profile.py [--seconds 3] [--out bench/results]

The benchmark (bench/run.py) measures how much CPU each side spends; this says on what. Each scenario runs for
--seconds while `perf record -a -g` samples every CPU; each sample is given to its process (the client is this
process, the server is `lossd serve` or the do-nothing echo server) and to a category from its leaf frame and
kernel call chain: the engine's compiled kernels, user-space memory copies, the kernel's socket copies and page
faults, the TCP stack, gRPC's C core, the Python interpreter, ... Figures are CPU per call (1M-pair scenarios)
or per request (single-pair scenarios), from samples / frequency / calls.

Scenarios:
  in_process   the engine alone: ciou loss + gradient on 1M pairs
  grpc_1m      1M pairs through gRPC raw bytes (LossClient, 8 MiB requests, 4 in flight)
  echo_1m      the same bytes through a grpc.aio server that does nothing with them
  rest_1m      1M pairs through OIP REST binary (LossClient)
  conc64_on    single-pair ciou requests from 64 concurrent gRPC clients, dynamic batching on
  conc64_off   the same, batching off

Writes profile.json, profile.md (tables, with what bounds each unmet target) and profile.png under --out.
Needs `perf` (Debian: linux-perf) and permission to profile the whole machine (root, or
kernel.perf_event_paranoid <= 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (bench/run.py: the servers, the data and the load generator the benchmark uses)

FREQ = 499  # Hz per CPU; an odd rate so sampling does not lock step with periodic work
N = 1_000_000

ENGINE = "engine kernels (numba JIT, libm, torch)"
COPY = "memory copies (user space)"
MALLOC = "malloc / free"
K_COPY = "kernel: socket data copies"
K_FAULT = "kernel: page faults (fresh memory)"
K_NET = "kernel: TCP/IP stack"
K_SCHED = "kernel: scheduling, waits, wake-ups"
K_OTHER = "kernel: other"
GRPC = "gRPC C core"
HTTP = "HTTP server (uvloop, httptools)"
PYTHON = "Python interpreter"
PROTOBUF = "protobuf"
NUMPY = "numpy"
OTHER = "other"
CATEGORIES = [ENGINE, COPY, MALLOC, K_COPY, K_FAULT, K_NET, K_SCHED, K_OTHER, GRPC, HTTP, PYTHON, PROTOBUF,
              NUMPY, OTHER]
# categories that are neither the engine nor moving the request through the transport
TRANSPORT = [c for c in CATEGORIES if c != ENGINE]


@dataclass
class Sample:
    comm: str
    pid: int
    time: float
    frames: list[tuple[str, str]] = field(default_factory=list)  # (symbol, dso), leaf first


_HEADER = re.compile(r"^(?P<comm>.*?)\s+(?P<pid>-?\d+)/(?P<tid>-?\d+)\s+(?P<time>\d+\.\d+):")
_FRAME = re.compile(r"^\s*[0-9a-f]+\s+(?P<sym>.*?)\s+\((?P<dso>[^()]*|.*\(deleted\))\)\s*$")


def parse_perf_script(text: str):
    """Samples from `perf script -F comm,pid,tid,time,ip,sym,dso` output (with or without call chains)."""
    sample = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            m = _HEADER.match(line)
            if m is None:
                continue
            if sample is not None:
                yield sample
            sample = Sample(m["comm"].strip(), int(m["pid"]), float(m["time"]))
            rest = line[m.end():]
            fm = _FRAME.match(rest) if rest.strip() else None
            if fm:  # --hide-call-graph puts the leaf frame on the header line
                sample.frames.append((fm["sym"], fm["dso"]))
        elif sample is not None:
            fm = _FRAME.match(line)
            if fm:
                sample.frames.append((fm["sym"], fm["dso"]))
    if sample is not None:
        yield sample


def _base(dso: str) -> str:
    return dso.rsplit("/", 1)[-1]


def categorize(frames: list[tuple[str, str]]) -> str | None:
    """The category of a sample from its frames (leaf first); None for an idle CPU."""
    if not frames:
        return OTHER
    sym, dso = frames[0]
    base = _base(dso)
    if base == "[kernel.kallsyms]":
        kernel = " ".join(s for s, d in frames if d == "[kernel.kallsyms]")
        if re.search(r"cpuidle|do_idle|safe_halt|default_idle|poll_idle", kernel):
            return None
        if re.search(r"page_fault|handle_mm_fault", kernel):
            return K_FAULT
        if re.search(r"copy_(to|from)_iter|copy_user|copyin|copyout|rep_movs|memcpy", sym):
            return K_COPY
        if re.search(r"tcp_|sock_|skb|sys_sendmsg|sys_recvmsg|sys_sendto|sys_recvfrom|ip_|net_rx|__dev_queue|"
                     r"loopback|softirq", kernel):
            return K_NET
        if re.search(r"schedule|switch|futex|epoll|wake|poll|nanosleep|hrtimer", kernel):
            return K_SCHED
        return K_OTHER
    if base.startswith("perf-") or base.startswith("[JIT]") or base in ("libm.so.6", "libgomp.so.1") \
            or "numba" in dso or "llvmlite" in dso or "/torch/lib/" in dso or base.startswith("libtorch") \
            or base.startswith("libc10"):
        return ENGINE
    if base.startswith("libc.so") or base.startswith("libc-"):
        if re.search(r"mem(move|cpy|set)", sym):
            return COPY
        if re.search(r"malloc|free|_int_|realloc|memalign|tcache", sym):
            return MALLOC
        return OTHER
    if base.startswith("cygrpc"):
        return GRPC
    if base.startswith("loop.cpython") or base.startswith("parser.cpython") or "httptools" in dso \
            or "uvloop" in dso:
        return HTTP
    if base.startswith("libpython") or base.startswith("python3") or "/lib-dynload/" in dso:
        return PYTHON
    if "_upb" in dso or "protobuf" in dso or base.startswith("_message"):
        return PROTOBUF
    if "/numpy/" in dso:
        return NUMPY
    return OTHER


def tally(samples, roles: dict[int, str], window: tuple[float, float]) -> dict:
    """Samples in the window, per role (from pid; 'other' for the rest) and category, plus each role's top
    leaf symbols."""
    counts: dict[str, Counter] = defaultdict(Counter)
    syms: dict[str, Counter] = defaultdict(Counter)
    idle = 0
    for s in samples:
        if not window[0] <= s.time <= window[1]:
            continue
        cat = categorize(s.frames)
        if cat is None:
            idle += 1
            continue
        role = roles.get(s.pid, "other")
        counts[role][cat] += 1
        if s.frames:
            syms[role][f"{s.frames[0][0]} ({_base(s.frames[0][1])})"] += 1
    return {"counts": {r: dict(c) for r, c in counts.items()}, "idle": idle,
            "top": {r: c.most_common(8) for r, c in syms.items()}}


# ------------------------------------------------------------------------------------------------- recording
def perf_usable() -> str | None:
    """None when `perf record -a` works here; else why not."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: apt-get install linux-perf)"
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["perf", "record", "-a", "-g", "-F", str(FREQ), "-o", f"{d}/t.data", "--", "sleep",
                            "0.05"], capture_output=True, text=True)
        if r.returncode != 0:
            return "perf cannot profile the whole machine here: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


class Recording:
    """`perf record -a -g` from enter to exit, with monotonic timestamps (the clock time.monotonic() reads)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Recording:
        self.proc = subprocess.Popen(["perf", "record", "-a", "-g", "-F", str(FREQ), "-k", "mono", "-o",
                                      str(self.path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # perf has opened its events on every CPU
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=120)
        if self.proc.returncode not in (0, -signal.SIGINT):
            raise RuntimeError(f"perf record failed: {err.decode(errors='replace')[-500:]}")

    def samples(self) -> list[Sample]:
        out = subprocess.run(["perf", "script", "-i", str(self.path), "-F", "comm,pid,tid,time,ip,sym,dso"],
                             capture_output=True, text=True, check=True).stdout
        return list(parse_perf_script(out))


def drive(fn, seconds: float) -> tuple[int, tuple[float, float]]:
    """Calls fn until `seconds` have passed; (calls, monotonic window)."""
    t0 = time.monotonic()
    calls = 0
    while time.monotonic() - t0 < seconds:
        fn()
        calls += 1
    return calls, (t0, time.monotonic())


def profile_scenario(name: str, tmp: Path, roles: dict[int, str], fn, seconds: float, per: str) -> dict:
    with Recording(tmp / f"{name}.data") as rec:
        calls, window = fn(seconds)
    res = tally(rec.samples(), roles, window)
    wall = window[1] - window[0]
    res.update(name=name, calls=calls, wall_s=wall, per=per, wall_per_call_s=wall / calls,
               cpu_s={role: {c: n / FREQ / calls for c, n in cats.items()} for role, cats in res["counts"].items()})
    totals = {role: sum(v.values()) for role, v in res["cpu_s"].items()}
    run.log(f"  {name:>10}: {calls} {per}s in {wall:.1f} s ({wall / calls * 1e3:.2f} ms each); CPU per {per}: "
            + ", ".join(f"{role} {t * 1e3:.2f} ms" for role, t in sorted(totals.items())))
    return res


def _echo_proc(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "run.py"), "--echo-server", str(port)])


def profile_all(seconds: float, tmp: Path) -> dict:
    import grpc
    import torch
    from concurrent.futures import ThreadPoolExecutor

    from lossd.engine import Engine
    from lossd_client import LossClient
    from lossd_client import DEFAULT_MAX_REQUEST_BYTES, MAX_IN_FLIGHT

    me = os.getpid()
    p, t = run.boxes(N, 7)
    out: dict[str, dict] = {}

    run.log("[1/5] in-process engine")
    engine = Engine(device="cpu")
    pt, tt = torch.from_numpy(p), torch.from_numpy(t)
    for _ in range(3):
        engine.evaluate("ciou", pt, tt)
    out["in_process"] = profile_scenario("in_process", tmp, {me: "client"},
                                         lambda s: drive(lambda: engine.evaluate("ciou", pt, tt), s), seconds,
                                         "call")
    servers = {True: run.Server(batching=True), False: run.Server(batching=False)}
    try:
        srv = servers[True]
        roles = {me: "client", srv.proc.pid: "server"}
        for i, (name, scheme, port) in enumerate((("grpc_1m", "grpc", srv.grpc), ("rest_1m", "http", srv.http))):
            run.log(f"[{2 + i}/5] 1M pairs via {scheme}")
            with LossClient(f"{scheme}://127.0.0.1:{port}") as c:
                for _ in range(3):
                    c.loss("ciou", p, t)
                out[name] = profile_scenario(name, tmp, roles, lambda s: drive(lambda: c.loss("ciou", p, t), s),
                                             seconds, "call")
        run.log("[4/5] the same bytes through a do-nothing grpc.aio server")
        port = run.free_port()
        echo = _echo_proc(port)
        try:
            opts = [("grpc.max_receive_message_length", 2**30), ("grpc.max_send_message_length", 2**30)]
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
                grpc.channel_ready_future(ch).result(timeout=60)
                call = ch.unary_unary("/bench.Echo/Echo")
                data = np.random.default_rng(0).bytes(N * 32)
                parts = [data[i:i + DEFAULT_MAX_REQUEST_BYTES] for i in range(0, len(data),
                                                                            DEFAULT_MAX_REQUEST_BYTES)]
                with ThreadPoolExecutor(MAX_IN_FLIGHT) as pool:
                    for _ in range(3):
                        list(pool.map(call, parts))
                    out["echo_1m"] = profile_scenario(
                        "echo_1m", tmp, {me: "client", echo.pid: "server"},
                        lambda s: drive(lambda: list(pool.map(call, parts)), s), seconds, "call")
        finally:
            echo.terminate()
            echo.wait(timeout=30)
        run.log("[5/5] single-pair requests at concurrency 64, batching on and off")
        for batching, server in servers.items():
            name = f"conc64_{'on' if batching else 'off'}"
            target = f"127.0.0.1:{server.grpc}"
            asyncio.run(run._load(target, 64, 1.0, "ciou"))  # warm-up

            def load(s: float, target: str = target) -> tuple[int, tuple[float, float]]:
                t0 = time.monotonic()
                r = asyncio.run(run._load(target, 64, s, "ciou"))
                return r["requests"], (t0, time.monotonic())

            out[name] = profile_scenario(name, tmp, {me: "client", server.proc.pid: "server"}, load, seconds,
                                         "request")
    finally:
        for server in servers.values():
            server.stop()
    return out


# ------------------------------------------------------------------------------------------------- analysis
def _cpu(res: dict, role: str, cats: list[str] | None = None) -> float:
    v = res["cpu_s"].get(role, {})
    return sum(x for c, x in v.items() if cats is None or c in cats)


def bounds(prof: dict, cores: int) -> dict:
    """What the profile says about each target the benchmark could not meet."""
    b: dict[str, dict] = {}
    inp = prof["in_process"]
    engine_wall = inp["wall_per_call_s"]
    engine_cpu = _cpu(inp, "client")
    for name, target in (("grpc_1m", 0.5), ("rest_1m", 0.4)):
        r = prof[name]
        total = _cpu(r, "client") + _cpu(r, "server")
        moving = total - _cpu(r, "server", [ENGINE])
        b[name] = {"target": target, "measured_fraction": engine_wall / r["wall_per_call_s"],
                   "engine_cpu_s": engine_cpu, "server_engine_cpu_s": _cpu(r, "server", [ENGINE]),
                   "transport_cpu_s": moving, "total_cpu_s": total,
                   "best_fraction": engine_wall / (total / cores)}
    e = prof["echo_1m"]
    b["echo_1m"] = {"transport_cpu_s": _cpu(e, "client") + _cpu(e, "server"),
                    "best_fraction": engine_wall / ((_cpu(e, "client") + _cpu(e, "server") + engine_cpu) / cores)}
    for mode in ("on", "off"):
        r = prof[f"conc64_{mode}"]
        total = _cpu(r, "client") + _cpu(r, "server")
        b[f"conc64_{mode}"] = {"total_cpu_s": total, "server_cpu_s": _cpu(r, "server"),
                               "server_engine_cpu_s": _cpu(r, "server", [ENGINE]),
                               "client_cpu_s": _cpu(r, "client"),
                               "max_speedup_if_engine_free": total / max(total - _cpu(r, "server", [ENGINE]), 1e-12)}
    return b


def _fmt(seconds: float, per: str) -> str:
    return f"{seconds * 1e3:.1f}" if per == "call" else f"{seconds * 1e6:.0f}"


def markdown(res: dict) -> str:
    prof, b, cores = res["scenarios"], res["bounds"], res["meta"]["cores"]
    lines = [f"# lossd CPU profile ({res['meta']['when']}, {res['meta']['machine']})", "",
             f"Command: `{res['meta']['command']}`. `perf record -a -g -F {FREQ}` over every CPU while each scenario "
             "runs; a sample counts for the process it interrupted and the category of its leaf frame (kernel "
             "samples by their call chain). Figures are CPU per 1M-pair call in ms, or per single-pair request in "
             "us; idle CPUs are left out.", ""]
    for group, per, unit in (("1M pairs", "call", "ms per call"), ("single-pair requests", "request",
                                                                   "us per request")):
        names = [n for n, r in prof.items() if r["per"] == per]
        cols = [(n, role) for n in names for role in ("client", "server") if role in prof[n]["cpu_s"]]
        lines += [f"## {group}: CPU {unit}", "", "| category | " + " | ".join(f"{n} {role}" for n, role in cols)
                  + " |", "|---" * (len(cols) + 1) + "|"]
        for cat in CATEGORIES:
            vals = [prof[n]["cpu_s"][role].get(cat, 0.0) for n, role in cols]
            if any(v * (1e3 if per == "call" else 1e6) >= 0.05 for v in vals):
                lines.append(f"| {cat} | " + " | ".join(_fmt(v, per) for v in vals) + " |")
        lines.append("| **total** | " + " | ".join(f"**{_fmt(_cpu(prof[n], role), per)}**" for n, role in cols)
                     + " |")
        lines.append("| wall per " + per + " | " + " | ".join(_fmt(prof[n]["wall_per_call_s"], per) for n, _ in cols)
                     + " |")
        lines.append("")
    lines += ["## What bounds the targets", ""]
    for name, label in (("grpc_1m", "1M pairs via gRPC raw bytes"), ("rest_1m", "1M pairs via OIP REST binary")):
        x = b[name]
        lines.append(
            f"- **{label}** (target {x['target']} of in-process): measured here {x['measured_fraction']:.2f}. "
            f"The engine's kernels take {x['server_engine_cpu_s'] * 1e3:.0f} ms of the server's CPU (in-process: "
            f"{x['engine_cpu_s'] * 1e3:.0f} ms); moving the data costs client + server "
            f"{x['transport_cpu_s'] * 1e3:.0f} ms more. All of it shares {cores} cores, so the best fraction this "
            f"CPU allows is {x['best_fraction']:.2f}.")
    e = b["echo_1m"]
    lines.append(f"- The same bytes through a grpc.aio server that does nothing cost "
                 f"{e['transport_cpu_s'] * 1e3:.0f} ms of CPU (client + server): with the engine's work added, "
                 f"{e['best_fraction']:.2f} of in-process at best, before lossd does anything of its own.")
    for mode in ("on", "off"):
        x = b[f"conc64_{mode}"]
        lines.append(
            f"- **Concurrency 64, ciou, batching {mode}**: {x['total_cpu_s'] * 1e6:.0f} us of CPU per request "
            f"(load generator {x['client_cpu_s'] * 1e6:.0f}, server {x['server_cpu_s'] * 1e6:.0f}), of which the "
            f"engine's kernels {x['server_engine_cpu_s'] * 1e6:.1f} us: even if batching made them free, "
            f"throughput could grow at most {x['max_speedup_if_engine_free']:.2f}x (target 3x).")
    lines += ["", "## Top leaf symbols", ""]
    for n, r in prof.items():
        for role, top in sorted(r["top"].items()):
            if role == "other":
                continue
            total = sum(r["counts"][role].values())
            lines.append(f"- {n} {role}: " + "; ".join(f"{s} {c / total:.0%}" for s, c in top[:6]))
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prof = res["scenarios"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    colors = dict(zip(CATEGORIES, plt.get_cmap("tab20").colors))
    for ax, per, scale, unit in ((axes[0], "call", 1e3, "ms of CPU per 1M-pair call"),
                                 (axes[1], "request", 1e6, "us of CPU per single-pair request")):
        bars = [(n, role) for n, r in prof.items() if r["per"] == per for role in ("client", "server")
                if role in r["cpu_s"]]
        y = np.arange(len(bars))[::-1]
        left = np.zeros(len(bars))
        for cat in CATEGORIES:
            vals = np.array([prof[n]["cpu_s"][role].get(cat, 0.0) * scale for n, role in bars])
            ax.barh(y, vals, left=left, color=colors[cat], label=cat if per == "call" else None)
            left += vals
        walls = [prof[n]["wall_per_call_s"] * scale for n, _ in bars]
        ax.scatter(walls, y, marker="|", s=400, color="black", zorder=3, label="wall time" if per == "call" else None)
        ax.set_yticks(y, [f"{n} {role}" for n, role in bars])
        ax.set(xlabel=unit)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_title("1M pairs + gradients: where the CPU goes")
    axes[1].set_title("concurrency 64, single-pair ciou")
    fig.legend(loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="recording time per scenario (default 3)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    why = perf_usable()
    if why:
        print(f"cpu_profile: {why}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    res = {"meta": {"when": time.strftime("%Y-%m-%d %H:%M"), "cores": cores, "frequency_hz": FREQ,
                    "machine": f"{platform.machine()}, {cores} CPUs, Python {platform.python_version()}",
                    "command": "python bench/cpu_profile.py"
                    + (f" --seconds {args.seconds:g}" if args.seconds != 3.0 else "")}}
    with tempfile.TemporaryDirectory() as tmp:
        res["scenarios"] = profile_all(args.seconds, Path(tmp))
    res["bounds"] = bounds(res["scenarios"], cores)
    run.write_results(out, "profile", res, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
