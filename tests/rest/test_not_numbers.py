"""JSON true/false among the numbers of an array field is refused, naming the field and the rows (numpy read them
as 1 and 0, so [[0, 0, true, 1]] was a box); strings, nulls and objects name their rows too (they were an
invalid_shape without rows). Small bodies and big ones (parsed in the worker process), /v1 and the Open Inference
Protocol's JSON. Against a real `lossd serve`."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from lossd.bodyparse import BIG_JSON_BYTES


def _boxes(n: int, seed: int = 0) -> list:
    g = np.random.default_rng(seed)
    xy = g.uniform(0, 100, (n, 2))
    return np.concatenate([xy, xy + g.uniform(1, 20, (n, 2))], 1).round(3).tolist()


def _post(server, path: str, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.http_url}{path}", content=content, headers={"Content-Type": "application/json"},
                      timeout=60)


@pytest.mark.parametrize("n", [4, 40_000])
@pytest.mark.parametrize("field", ["pred", "target"])
def test_a_boolean_coordinate_names_the_field_and_row(live_server, n, field):
    body = {"pred": _boxes(n, 1), "target": _boxes(n, 2)}
    bad_row = n - 2
    body[field][bad_row][2] = True
    raw = json.dumps(body).encode()
    assert (len(raw) > BIG_JSON_BYTES) == (n > 1000)  # both parsing paths
    r = _post(live_server, "/v1/losses/ciou", raw)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_value"
    assert err["details"]["field"] == field and err["details"]["rows"] == [bad_row]
    assert f"row {bad_row}" in err["message"] and "true/false" in err["message"]


def test_every_row_is_named_and_weights_and_metrics_too(live_server):
    body = {"pred": _boxes(6), "target": _boxes(6, 3), "weights": [1, 1, False, 1, 1, True]}
    err = _post(live_server, "/v1/losses/giou", body).json()["error"]
    assert err["details"] == {"field": "weights", "rows": [2, 5], "n_rows": 2}
    boxes = _boxes(3)
    boxes[0] = [False, False, True, True]  # all booleans: numpy would even keep them as a bool array
    err = _post(live_server, "/v1/metrics/iou", {"boxes1": _boxes(3), "boxes2": boxes}).json()["error"]
    assert err["details"]["field"] == "boxes2" and err["details"]["rows"] == [0]


def test_booleans_where_booleans_belong_still_work(live_server):
    """return_grad: false is a boolean outside any array; a string holding ',true' is not an array element."""
    a, b = [[0.0, 0.0, 2.0, 2.0]], [[1.0, 1.0, 3.0, 3.0]]
    r = _post(live_server, "/v1/losses/iou", {"pred": a, "target": b, "return_grad": False})
    assert r.status_code == 200, r.text
    assert r.json()["loss"] == pytest.approx([1 - 1 / 7], rel=1e-6)  # intersection 1, union 7
    r = _post(live_server, "/v1/losses/iou", {"pred": a, "target": b, "box_format": "x,true"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_format"


@pytest.mark.parametrize("value", ["1", None, {"x": 1}])
def test_strings_nulls_and_objects_name_their_rows(live_server, value):
    pred = _boxes(5)
    pred[3][1] = value
    err = _post(live_server, "/v1/losses/ciou", {"pred": pred, "target": _boxes(5, 9)}).json()["error"]
    assert err["code"] == "invalid_value"
    assert err["details"]["field"] == "pred" and err["details"]["rows"] == [3]


@pytest.mark.parametrize("n", [3, 40_000])
def test_open_inference_protocol_json_data(live_server, n):
    pred, target = np.float32(_boxes(n, 4)), np.float32(_boxes(n, 5))
    data = pred.reshape(-1).tolist()
    data[4 * (n - 1) + 1] = True  # the last row, flattened as the protocol sends it
    body = {"inputs": [{"name": "PRED", "datatype": "FP32", "shape": [n, 4], "data": data},
                       {"name": "TARGET", "datatype": "FP32", "shape": [n, 4], "data": target.reshape(-1).tolist()}]}
    r = _post(live_server, "/v2/models/ciou/infer", body)
    assert r.status_code == 400, r.text
    message = r.json()["error"]
    assert message.startswith("inputs.PRED.data: true/false at row") and f"row {n - 1}" in message


@pytest.mark.parametrize("digits", [400, 5000])
def test_whole_numbers_past_float64_are_non_finite_naming_the_row(live_server, digits):
    """JSON allows integers of any length: one past float64 is refused like 1e400 (non_finite, its row), not as an
    unreadable body or a shapeless array; one past 64 bits that a float64 holds is a number like any other."""
    body = ('{"pred": [[0, 0, 2, 2], [0, 0, 1%s, 1]], "target": [[0, 0, 1, 1], [0, 0, 1, 1]]}'
            % ("0" * digits)).encode()
    err = _post(live_server, "/v1/losses/giou", body).json()["error"]
    assert err["code"] == "non_finite" and err["details"]["rows"] == [1] and err["details"]["field"] == "pred"
    body = b'{"pred": [[0, 0, 2, 2]], "target": [[0, 0, 10000000000000000000000000, 1]]}'  # 1e25
    r = _post(live_server, "/v1/metrics/iou", body.replace(b"pred", b"boxes1").replace(b"target", b"boxes2"))
    assert r.status_code == 200, r.text
    assert r.json()["values"] == pytest.approx([2 / 1e25], rel=1e-3)  # intersection 2 (2 x 1), union ~1e25
