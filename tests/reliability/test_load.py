"""Overload, drain and crash, against real processes on loopback; every loop is bounded in count and time."""

import asyncio
import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from lossd.engine import Engine
from lossd_client.wire import oip_binary_request, oip_binary_response

from ..conftest import start_server

ROOT = Path(__file__).resolve().parents[2]


def _request(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, bytes, dict]:
    g = np.random.default_rng(seed)
    t = (g.random((n, 4)) * 500).astype(np.float32)
    t[:, 2:] = t[:, :2] + 5 + g.random((n, 2)).astype(np.float32) * 50
    p = t + g.normal(size=(n, 4)).astype(np.float32)
    p[:, 2:] = np.maximum(p[:, 2:], p[:, :2] + 1)
    body, headers = oip_binary_request({"PRED": p, "TARGET": t}, {"binary_data_output": True})
    return p, t, body, headers


def test_overload_sheds_at_once_and_recovers():
    server = start_server({"LOSSD_MAX_IN_FLIGHT": "2"})
    engine = Engine(device="cpu")
    try:
        reqs = [_request(50_000, s) for s in range(24)]

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as h:
                return await asyncio.gather(*(h.post(f"{server.http_url}/v2/models/siou/infer", content=b,
                                                     headers=hd) for _, _, b, hd in reqs))

        t0 = time.monotonic()
        answers = asyncio.run(fire())
        elapsed = time.monotonic() - t0
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {200, 429}, statuses
        shed = [r for r in answers if r.status_code == 429]
        assert shed, "24 concurrent requests over a limit of 2 in flight: some must be shed"
        assert all(r.headers["retry-after"] == "1" for r in shed) and elapsed < 60
        for (p, t, _, _), r in zip(reqs, answers):  # every accepted request got the right answer
            if r.status_code == 200:
                out = oip_binary_response(r.content, r.headers["inference-header-content-length"])
                np.testing.assert_allclose(out["LOSS"], engine.evaluate("siou", p, t).loss.numpy(), rtol=1e-6)
        # load drops: requests one at a time are all served
        with httpx.Client(timeout=60) as h:
            for _, _, b, hd in reqs[:4]:
                assert h.post(f"{server.http_url}/v2/models/siou/infer", content=b, headers=hd).status_code == 200
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)


def test_sigterm_makes_readiness_false_then_drains():
    server = start_server({"LOSSD_DRAIN_SECONDS": "3"})
    try:
        with httpx.Client(timeout=10) as h:
            assert h.get(f"{server.http_url}/v2/health/ready").status_code == 200
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 2.5
            while h.get(f"{server.http_url}/v2/health/ready").status_code != 503:
                assert time.monotonic() < deadline, "readiness did not go false"
                time.sleep(0.05)
            r = h.post(f"{server.http_url}/v1/losses/giou", json={"pred": [[0, 0, 1, 1]], "target": [[0, 0, 1, 1]]})
            assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def _synthetic(tmp: Path, images: int) -> tuple[Path, Path]:
    spec = importlib.util.spec_from_file_location("lq_bench", ROOT / "bench" / "label_quality" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = mod.np.random.default_rng(3)
    ds = mod.inject(mod.synthetic_truth(images, rng), rng)
    return mod.write_coco(ds, tmp)


def test_killed_batch_job_resumes_to_the_same_output(tmp_path):
    labels, preds = _synthetic(tmp_path, 3000)
    cmd = [sys.executable, "-m", "lossd.cli", "quality", str(labels), str(preds), "--shard-size", "25",
           "--no-progress"]
    whole = subprocess.run(cmd + ["--out", str(tmp_path / "whole")], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    def shards_done() -> int:
        return len(list((out / "shards").glob("shard-*.parquet"))) if (out / "shards").exists() else 0

    while shards_done() < 3:
        assert time.monotonic() < deadline and proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = len(list((out / "shards").glob("shard-*.parquet")))
    assert 3 <= done < 120 and not (out / "boxes.csv").exists()  # killed in the middle
    again = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    for name in ("boxes.csv", "images.csv"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert json.loads((out / "summary.json").read_text())["by_issue"] == \
        json.loads((tmp_path / "whole" / "summary.json").read_text())["by_issue"]

