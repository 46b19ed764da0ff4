"""Triton's tools against a real `lossd serve`: tritonclient's model configuration, statistics and repository index
over HTTP and gRPC, with real counts. tritonclient runs in a subprocess: its generated `inference.*` messages
and lossd's own would clash in protobuf's default pool if one process loaded both."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

# looked up, not imported: importing tritonclient.grpc here would clash with lossd's stubs in this process
if importlib.util.find_spec("tritonclient") is None:
    pytest.skip("tritonclient is in the test extra", allow_module_level=True)

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as tg
    import tritonclient.http as th

    http_url, grpc_target = sys.argv[1], sys.argv[2]
    out = {}
    for name, mod, url in (("http", th, http_url), ("grpc", tg, grpc_target)):
        c = mod.InferenceServerClient(url)
        pred = np.array([[0, 0, 10, 10], [5, 5, 15, 20]], np.float32)
        target = np.array([[1, 1, 11, 11], [5, 5, 15, 15]], np.float32)
        inputs = [mod.InferInput("PRED", [2, 4], "FP32"), mod.InferInput("TARGET", [2, 4], "FP32")]
        inputs[0].set_data_from_numpy(pred)
        inputs[1].set_data_from_numpy(target)
        for _ in range(3):
            c.infer("ciou", inputs)
        kw = {"as_json": True} if name == "grpc" else {}
        cfg = c.get_model_config("ciou", **kw)
        cfg = cfg.get("config", cfg)
        stats = c.get_inference_statistics("ciou", **kw)
        index = c.get_model_repository_index(**kw)
        index = index.get("models", index) if isinstance(index, dict) else index
        try:
            c.get_model_config("no_such_loss", **kw)
            missing = "no error"
        except Exception as exc:
            missing = type(exc).__name__ + ": " + str(exc)[:200]
        out[name] = {"config": cfg, "stats": stats, "index": index, "missing": missing}
    print(json.dumps(out))
""")


def test_tritonclient_config_statistics_and_index(live_server):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, live_server.http_url.removeprefix("http://"),
                           live_server.grpc_target], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    for transport in ("http", "grpc"):
        got = out[transport]
        cfg = got["config"]
        assert cfg["name"] == "ciou" and cfg["platform"] == "lossd"
        inputs = {t["name"]: t for t in cfg["input"]}
        assert inputs["PRED"]["data_type"] == "TYPE_FP32" and [int(d) for d in inputs["PRED"]["dims"]] == [-1, 4]
        assert inputs["WEIGHTS"].get("optional") is True
        assert {t["name"] for t in cfg["output"]} == {"LOSS", "GRAD"}
        (ciou,) = got["stats"]["model_stats"]
        success = ciou["inference_stats"]["success"]
        # this call's three infers at least (the shared server may have served other ciou calls before)
        assert int(success["count"]) >= 3 and int(success["ns"]) > 0
        assert int(ciou["inference_count"]) >= 6  # rows
        names = {m["name"] for m in got["index"]}
        assert {"ciou", "giou", "cross_entropy"} <= names
        assert all(m.get("state") == "READY" for m in got["index"])
        assert "no_such_loss" in got["missing"] or "no loss named" in got["missing"]
    # gRPC's statistics counted in the same table as HTTP's: the second reading saw the first transport's calls
    http_count = int(out["http"]["stats"]["model_stats"][0]["inference_stats"]["success"]["count"])
    grpc_count = int(out["grpc"]["stats"]["model_stats"][0]["inference_stats"]["success"]["count"])
    assert grpc_count >= http_count + 3
