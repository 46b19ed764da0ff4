"""`lossd quality --ray --server a,b,c`: the Ray workers score their shards on three real `lossd serve` processes
that require an API key, one of them SIGKILLed part-way; every output is byte for byte that of an in-process run,
each replica's /metrics shows its share, and no worker (nor the driver) loads torch."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lossd.quality import run
from tests.conftest import start_server

from .ray_workers import loads_torch, ray_workers

pytest.importorskip("ray", reason="Ray comes with the test extra")

KEY = "k3y-ray"
OUTPUTS = ("boxes.csv", "boxes.parquet", "references.csv", "references.parquet", "images.csv", "images.parquet",
           "problems.csv")
SHARD = 2  # 50 shards of the 100-image sample: many tasks left when a replica is killed
QUALITY_LOSSES = {"iou", "giou", "diou", "ciou"}


def served(url: str) -> float:
    """Successful gRPC stream items of the job's losses on one replica, from its /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for name, v in re.findall(
        r'lossd_requests_total\{endpoint="grpc_stream",name="(\w+)",outcome="ok"\} (\S+)', text)
        if name in QUALITY_LOSSES)


@pytest.fixture(scope="module")
def keyed_replicas():
    with ThreadPoolExecutor(3) as pool:
        servers = list(pool.map(lambda _: start_server({"LOSSD_API_KEYS": f'["{KEY}"]'}, timeout=240), range(3)))
    yield servers
    for s in servers:
        if s.proc.poll() is None:
            s.proc.terminate()
            s.proc.wait(timeout=30)


def test_ray_workers_call_the_servers(keyed_replicas, coco_dir, tmp_path):
    labels, preds = coco_dir / "instances_val2014_100.json", coco_dir / "fakebbox100_results.json"
    a, b, c = keyed_replicas
    run(labels, preds, tmp_path / "in-process", shard_size=SHARD, progress=False)
    before = [served(s.http_url) for s in keyed_replicas]

    out = tmp_path / "ray"
    # the key only in the environment, as a user sets it: the driver reads it and hands it to the workers
    job = subprocess.Popen([sys.executable, "-m", "lossd.cli", "quality", str(labels), str(preds), "--out", str(out),
                            "--ray", "--server", ",".join(s.grpc_url for s in keyed_replicas), "--shard-size",
                            str(SHARD), "--no-progress"],
                           env=dict(os.environ, LOSSD_API_KEY=KEY), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while len(list((out / "shards").glob("shard-*[0-9].parquet"))) < 3:  # a few shards in, many left
            assert job.poll() is None, job.stdout.read()
            assert time.monotonic() < deadline, "the Ray job wrote no shard in 180 s"
            time.sleep(0.02)
        workers = ray_workers(job.pid)
        driver_has_torch = loads_torch(job.pid)
        victim_share = served(c.http_url)
        running_at_kill = job.poll() is None
        shards_at_kill = len(list((out / "shards").glob("shard-*[0-9].parquet")))
        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait(timeout=10)
        log, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, log
    assert running_at_kill and shards_at_kill < 100 // SHARD, shards_at_kill

    # the workers scored through the servers: none of them (nor the driver) loaded torch
    print("workers that ran shards:", workers)
    assert workers and not any(w["torch"] for w in workers.values()), workers
    assert not driver_has_torch

    # every replica served part of the work (the killed one before it died)
    shares = {}
    for s, was in zip(keyed_replicas, before):
        now = victim_share if s is c else served(s.http_url)
        shares[s.http_url] = now - was
    print("requests per replica:", shares)
    assert all(n >= 1 for n in shares.values()), shares

    assert json.loads((out / "summary.json").read_text())["mode"] == "ray+server"
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (tmp_path / "in-process" / name).read_bytes(), name


def test_every_server_gone_is_one_line_error(keyed_replicas, coco_dir, tmp_path):
    """Kills the replicas still up (so it comes after the test above). The workers' error, not Ray's wrapper
    around it, reaches the user."""
    labels, preds = coco_dir / "instances_val2014_100.json", coco_dir / "fakebbox100_results.json"
    alive = [s for s in keyed_replicas if s.proc.poll() is None]
    out = tmp_path / "ray"
    job = subprocess.Popen([sys.executable, "-m", "lossd.cli", "quality", str(labels), str(preds), "--out", str(out),
                            "--ray", "--server", ",".join(s.grpc_url for s in alive), "--api-key", KEY,
                            "--shard-size", str(SHARD), "--no-progress"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list((out / "shards").glob("shard-*[0-9].parquet")):
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "the Ray job wrote no shard in 180 s"
            time.sleep(0.02)
        for s in alive:
            s.proc.send_signal(signal.SIGKILL)
            s.proc.wait(timeout=10)
        _, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 2, err
    assert "Traceback" not in err and "RayTaskError" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lossd quality: error: server grpc://") and "unavailable" in line, err


def test_client_errors_cross_a_process_boundary():
    """A worker's error reaches the driver pickled: every field survives."""
    from lossd_client import InvalidInputError, UnavailableError

    e = pickle.loads(pickle.dumps(InvalidInputError("invalid_shape", "pred: rows [3]", 422,
                                                    {"field": "pred", "rows": [3]})))
    assert type(e) is InvalidInputError and str(e) == "invalid_shape: pred: rows [3]"
    assert (e.code, e.message, e.status, e.field, e.rows) == ("invalid_shape", "pred: rows [3]", 422, "pred", [3])
    assert type(pickle.loads(pickle.dumps(UnavailableError("unavailable", "gone")))) is UnavailableError
