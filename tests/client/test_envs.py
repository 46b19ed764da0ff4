"""lossd-client beside the rest of an inference stack: installed (torch-free) into two fresh virtual
environments, one with the latest tritonclient[all] (protobuf 6) and one with protobuf 7, where its pure tests
run and it calls a real server over gRPC and HTTP next to tritonclient.

Opt-in (it installs packages: about 3 minutes on 2 cores, most of it pip; .ci/run sets it): LOSSD_TEST_ENVS=1.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENVS = {
    # pip resolves the client's protobuf/grpcio ranges together with tritonclient's (protobuf<7)
    "tritonclient": ["tritonclient[all]"],
    "protobuf7": ["protobuf>=7"],
}
PURE_TESTS = ["tests/client/test_wire.py", "tests/client/test_bulk.py"]

opt_in = pytest.mark.skipif(os.environ.get("LOSSD_TEST_ENVS") != "1",
                            reason="installs two virtual environments (minutes); LOSSD_TEST_ENVS=1 runs it")

CALLS = r'''
import json, sys, warnings
warnings.simplefilter("error")  # a gencode/runtime mismatch warns at import: fail on it
import google.protobuf, grpc, numpy as np
import lossd_client
from lossd_client import LossClient
assert "torch" not in sys.modules
out = {"protobuf": google.protobuf.__version__, "grpcio": grpc.__version__}
http_url, grpc_url, grpc_target = sys.argv[1:4]
pred, target = np.array([[0, 0, 10, 10]], np.float32), np.array([[1, 1, 11, 11]], np.float32)
for url in (grpc_url, http_url):
    with LossClient(url) as c:
        loss, grad = c.loss("ciou", pred, target)
        out[url.split(":")[0]] = float(loss[0])
try:
    import tritonclient.grpc as tg
except ImportError:
    pass
else:
    # tritonclient in the same process, after the client, against the same server
    triton = tg.InferenceServerClient(grpc_target)
    out["triton_ready"] = triton.is_server_ready()
    inputs = [tg.InferInput("PRED", [1, 4], "FP32"), tg.InferInput("TARGET", [1, 4], "FP32")]
    inputs[0].set_data_from_numpy(pred)
    inputs[1].set_data_from_numpy(target)
    out["triton_ciou"] = float(triton.infer("ciou", inputs).as_numpy("LOSS")[0])
print(json.dumps(out))
'''


def _run(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_import_leaves_the_oip_stubs_unloaded():
    # their `inference.*` symbols would clash with tritonclient.grpc's in protobuf's default pool
    code = ("import sys, lossd_client, lossd_client.wire; "
            "print(sorted(m for m in sys.modules if 'inference' in m or m == 'torch'))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


@opt_in
@pytest.mark.parametrize("name", list(ENVS))
def test_client_in_a_fresh_environment(name, tmp_path, live_server):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])  # a real venv: nothing from this interpreter's site-packages
    py = venv / "bin" / "python"
    # from a copy: pip builds in the source folder, and its build/ and egg-info must not land in the checkout
    client = shutil.copytree(ROOT / "client", tmp_path / "client",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _run([py, "-m", "pip", "install", "--quiet", client, *ENVS[name], "pytest", "hypothesis"])
    _run([py, "-m", "pip", "check"])
    installed = {d["name"].lower(): d["version"] for d in json.loads(_run([py, "-m", "pip", "list", "--format=json"]))}
    assert "torch" not in installed

    protobuf_major = int(installed["protobuf"].split(".")[0])
    if name == "tritonclient":
        # the newest tritonclient, not an old one pip fell back to because of the client's ranges
        latest = re.search(r"\(([^)]+)\)", _run([py, "-m", "pip", "index", "versions", "tritonclient"])).group(1)
        assert installed["tritonclient"] == latest, (installed["tritonclient"], latest)
        assert protobuf_major == 6, installed["protobuf"]
    else:
        assert protobuf_major == 7, installed["protobuf"]

    # the client's own tests that need neither torch nor a server (no conftest: it imports torch)
    _run([py, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider", *PURE_TESTS], cwd=ROOT)

    out = json.loads(_run([py, "-c", CALLS, live_server.http_url, live_server.grpc_url, live_server.grpc_target],
                          cwd=tmp_path).strip().splitlines()[-1])
    want = 1 - 81 / 119 + 2 / 242  # CIoU by hand: IoU 81/119, centre distance 2 over the diagonal 242
    assert abs(out["grpc"] - want) < 1e-6 and abs(out["http"] - want) < 1e-6, out
    assert out["protobuf"] == installed["protobuf"]
    if name == "tritonclient":
        assert out["triton_ready"] is True and abs(out["triton_ciou"] - want) < 1e-6, out
