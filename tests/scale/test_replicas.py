"""Three local `lossd serve` replicas behind one client: a large call and a `lossd quality --server a,b,c` job run
at once, spread over all three (each replica's /metrics counts its share), one replica is SIGKILLed while both are
under way, and both results are byte for byte those of a single-server run."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from lossd_client import LossClient
from tests.conftest import start_server

ROOT = Path(__file__).resolve().parents[2]
# shared/ beside the checkout (a clone, /work/main) or beside its worktree folder (/work/wt/NAME)
COCO = next((p for p in (ROOT.parent / "shared" / "data" / "coco-val2014-100",
                         ROOT.parents[1] / "shared" / "data" / "coco-val2014-100") if p.exists()),
            ROOT.parent / "shared" / "data" / "coco-val2014-100")
QUALITY_LOSSES = {"iou", "giou", "diou", "ciou"}
BIG_LOSS = "siou"  # not one the quality job uses, so the two shares can be told apart on /metrics
ROWS, CHUNK_BYTES = 400_000, 256 * 1024  # 49 requests of 8192 rows (32 bytes a row)
OUTPUTS = ("boxes.csv", "boxes.parquet", "images.csv", "problems.csv")


@pytest.fixture(scope="module")
def replicas():
    with ThreadPoolExecutor(3) as pool:  # the three start together; on a loaded machine that takes a while
        servers = list(pool.map(lambda _: start_server(timeout=240), range(3)))
    yield servers
    for s in servers:
        if s.proc.poll() is None:
            s.proc.terminate()
            s.proc.wait(timeout=30)


def served(url: str) -> dict[str, float]:
    """Successful OIP inference requests on one replica, by loss, from its /metrics."""
    out: dict[str, float] = {}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for name, value in re.findall(r'lossd_requests_total\{endpoint="v2_infer",name="(\w+)",outcome="ok"\} (\S+)',
                                  text):
        out[name] = out.get(name, 0.0) + float(value)
    return out


def boxes(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    b = g.random((n, 4), dtype=np.float32) * 500
    b[:, 2:] += b[:, :2] + 1
    return b


class KillOnChunk:
    """The client's wire, with a SIGKILL of one replica when the ``at``-th chunk is built (others are in flight)."""

    def __init__(self, wire, victim, at: int) -> None:
        self.wire, self.victim, self.at, self.count = wire, victim, at, 0
        self.lock = threading.Lock()
        self.victim_share: dict = {}
        self.quality_running_at_kill = None

    def evaluate(self, call):
        with self.lock:
            self.count += 1
            if self.count == self.at:
                self.victim_share = served(self.victim.http_url)
                self.quality_running_at_kill = self.quality.poll() is None
                self.victim.proc.send_signal(signal.SIGKILL)
                self.victim.proc.wait(timeout=10)
        return self.wire.evaluate(call)


def test_spread_and_failover_are_byte_identical(replicas, tmp_path):
    assert COCO.exists(), f"the shared test data is missing: {COCO}"
    labels, preds = COCO / "instances_val2014_100.json", COCO / "fakebbox100_results.json"
    a, b, c = replicas
    t0 = time.monotonic()
    pred, target = boxes(ROWS, 1), boxes(ROWS, 2)

    # single-server runs, on one replica
    with LossClient(a.http_url, max_request_bytes=CHUNK_BYTES) as one:
        ref_loss, ref_grad = one.loss(BIG_LOSS, pred, target)
    from lossd.quality import run

    run(labels, preds, tmp_path / "single", shard_size=2, progress=False, server=a.http_url)
    before = [served(s.http_url) for s in replicas]

    # the same over three replicas, at once, C killed part-way through both
    urls = ",".join(s.http_url for s in replicas)
    out = tmp_path / "spread"
    quality = subprocess.Popen([sys.executable, "-m", "lossd.cli", "quality", str(labels), str(preds), "--out",
                                str(out), "--server", urls, "--shard-size", "2", "--no-progress"],
                               env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "shards" / "shard-00003.parquet").exists():  # a few shards in, many left (50)
            assert quality.poll() is None, quality.stdout.read()
            assert time.monotonic() < deadline, "the quality job wrote no shard in 120 s"
            time.sleep(0.02)
        with LossClient(urls, max_request_bytes=CHUNK_BYTES) as spread:
            hook = KillOnChunk(spread._wire, c, at=12)
            hook.quality = quality
            spread._wire = hook
            loss, grad = spread.loss(BIG_LOSS, pred, target)
        log, _ = quality.communicate(timeout=120)
    finally:
        if quality.poll() is None:
            quality.kill()
    assert quality.returncode == 0, log

    # the kill came mid-way through both; every replica took a share of both before it
    assert hook.count == -(-ROWS // (CHUNK_BYTES // 32)) and hook.quality_running_at_kill
    for s in (a, b):  # the two left standing must still be up (a replica dying here is a bug to see)
        assert s.proc.poll() is None, (f"replica {s.http_url} died (exit status {s.proc.returncode}); "
                                       f"its log ends: {s.log()[-3000:]}")
    after = {s.http_url: served(s.http_url) for s in (a, b)}
    shares = {}
    for s, was in zip(replicas, before):
        now = hook.victim_share if s is c else after[s.http_url]
        shares[s.http_url] = {k: now.get(k, 0) - was.get(k, 0) for k in (BIG_LOSS, *QUALITY_LOSSES)}
        assert shares[s.http_url][BIG_LOSS] >= 1, shares
        assert sum(shares[s.http_url][k] for k in QUALITY_LOSSES) >= 1, shares
    print("requests per replica (large call, quality job):",
          {u: (v[BIG_LOSS], sum(v[k] for k in QUALITY_LOSSES)) for u, v in shares.items()})

    # byte for byte
    assert loss.tobytes() == ref_loss.tobytes() and grad.tobytes() == ref_grad.tobytes()
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name

    # gRPC, with C gone: its chunks go to the others at once
    with LossClient(a.grpc_url, max_request_bytes=CHUNK_BYTES) as one, \
            LossClient([s.grpc_url for s in replicas], max_request_bytes=CHUNK_BYTES, retries=0) as three:
        r1, r3 = one.loss(BIG_LOSS, pred, target), three.loss(BIG_LOSS, pred, target)
    assert r1.loss.tobytes() == r3.loss.tobytes() and r1.grad.tobytes() == r3.grad.tobytes()
    print(f"test body (servers up): {time.monotonic() - t0:.1f} s")
