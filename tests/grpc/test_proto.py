"""The generated stubs are exactly what proto/generate.py makes from proto/ (CI fails on a hand edit or a stale
stub), and they import from the installed client under their real package path."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_proto():
    res = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_stub_imports_name_the_client_package():
    grpc_stub = (ROOT / "client" / "lossd_client" / "_proto" / "lossd" / "v1" / "lossd_pb2_grpc.py").read_text()
    assert "from lossd_client._proto.lossd.v1 import lossd_pb2" in grpc_stub
    assert "\nimport lossd" not in grpc_stub and "from lossd.v1" not in grpc_stub
