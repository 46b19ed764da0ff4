"""The Node.js example (real @grpc/grpc-js from npm) against a real server, checked against the Python client;
and buf lint on proto/ with buf from npm."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lossd_client import LossClient

NODE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"


@pytest.fixture(scope="module")
def node_modules():
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.fail("node and npm are needed for the Node example (they are on this machine kind)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists() or \
            not (NODE_DIR / "node_modules" / ".bin" / "buf").exists():
        # npm ci installs exactly the committed lockfile (it lists buf's binaries for every platform) and
        # never rewrites it
        lock = (NODE_DIR / "package-lock.json").read_bytes()
        res = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert (NODE_DIR / "package-lock.json").read_bytes() == lock, "npm ci changed package-lock.json"
    return NODE_DIR / "node_modules"


def test_node_example_matches_python_client(node_modules, live_server):
    res = subprocess.run(["node", "evaluate.js", live_server.grpc_target], cwd=NODE_DIR, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    pred = np.array([[0, 0, 10, 10], [5, 5, 15, 20], [2, 3, 4, 9]], dtype=np.float32)
    gt = np.array([[1, 1, 11, 11], [5, 5, 15, 15], [2, 2, 5, 8]], dtype=np.float32)
    with LossClient(live_server.grpc_url) as c:
        loss, grad = c.loss("ciou", pred, gt, params={"eps": 1e-7})
        iou = c.metric("iou", pred, gt, pairwise=True)
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-7)
    np.testing.assert_allclose(out["grad"], grad, rtol=1e-7)
    np.testing.assert_allclose(out["metric"], iou, rtol=1e-7)
    assert out["error"]["status"] == "INVALID_ARGUMENT" and out["error"]["code"] == "inverted_box"
    assert "row 0" in out["error"]["details"]


def test_buf_lint(node_modules):
    res = subprocess.run([str(node_modules / ".bin" / "buf"), "lint"], cwd=NODE_DIR.parents[1] / "proto",
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
