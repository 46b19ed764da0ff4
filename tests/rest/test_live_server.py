"""A real `lossd serve` process on a loopback port, as a user starts it."""

import httpx
import numpy as np

from .conftest import binary_request, parse_binary_response


def test_readme_example_request(live_server):
    url = live_server.http_url
    # the README's curl example, as JSON
    resp = httpx.post(f"{url}/v1/losses/ciou", json={"pred": [[0, 0, 10, 10]], "target": [[1, 1, 11, 11]]})
    assert resp.status_code == 200
    body = resp.json()
    # hand value: IoU 81/119, rho^2 = 2, c^2 = 242, v = 0 -> 1 - 81/119 + 2/242
    assert abs(body["loss"][0] - (1 - 81 / 119 + 2 / 242)) < 1e-6
    assert len(body["grad"][0]) == 4


def test_live_errors_and_oip_binary(live_server):
    url = live_server.http_url
    resp = httpx.post(f"{url}/v1/losses/giou", json={"pred": [[3, 0, 1, 1]], "target": [[0, 0, 1, 1]]})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "inverted_box"
    pred = np.random.default_rng(0).random((1000, 4), dtype=np.float32) * 100 + 1
    pred[:, 2:] += pred[:, :2]
    body, headers = binary_request({"PRED": pred, "TARGET": pred}, {"binary_data_output": True})
    out = parse_binary_response(httpx.post(f"{url}/v2/models/giou/infer", content=body, headers=headers))
    assert out["LOSS"].shape == (1000,) and np.abs(out["LOSS"]).max() < 1e-4  # identical boxes, eps only
    assert "lossd_requests_total" in httpx.get(f"{url}/metrics").text


def test_live_body_limit_default(live_server):
    url = live_server.http_url
    resp = httpx.post(f"{url}/v1/losses/giou", content=b" " * (64 * 2**20 + 1),
                      headers={"content-type": "application/json"})
    assert resp.status_code == 413


def test_readme_example_answers_as_printed(live_server):
    import json
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    m = re.search(r"curl -s -X POST http://127.0.0.1:8000/v1/losses/ciou.*?-d '(\{.*?\})'\n```\n\nanswers.*?"
                  r"```json\n(\{.*?\})\n```", readme, flags=re.S)
    assert m, "the README's example request and answer"
    request, printed = json.loads(m.group(1)), json.loads(m.group(2))
    got = httpx.post(f"{live_server.http_url}/v1/losses/ciou", json=request).json()
    np.testing.assert_allclose(got["loss"], printed["loss"], rtol=1e-7)
    np.testing.assert_allclose(got["grad"], printed["grad"], rtol=1e-7)
