"""/v1: catalog, losses, metrics and their errors, through httpx against the app."""

import numpy as np
import pytest
import torch

from lossd.engine import LOSSES

PRED = [[0, 0, 10, 10], [5, 5, 15, 20], [2, 3, 4, 9]]
TARGET = [[1, 1, 11, 11], [5, 5, 15, 15], [2, 2, 5, 8]]


def error_of(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["code"] == code and body["message"]
    return body


def test_catalog(client):
    cat = client.get("/v1/losses").json()["losses"]
    assert sorted(e["name"] for e in cat) == sorted(LOSSES)
    ciou = client.get("/v1/losses/ciou").json()
    assert ciou["kind"] == "box" and "Zheng" in ciou["reference"]
    assert ciou["params"]["eps"] == {"default": 1e-7, "min": 0.0, "max": 0.01, "doc": ciou["params"]["eps"]["doc"],
                                     "type": "float", "choices": None, "exclusive": None}
    assert ciou["params"]["alpha_rule"]["choices"] == ["torchvision", "mmdet", "attached"]
    error_of(client.get("/v1/losses/nope"), 404, "unknown_loss")


def test_loss_values_and_grads_match_engine(client, engine):
    resp = client.post("/v1/losses/ciou", json={"pred": PRED, "target": TARGET})
    assert resp.status_code == 200
    ref = engine.evaluate("ciou", PRED, TARGET)
    np.testing.assert_allclose(resp.json()["loss"], ref.loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(resp.json()["grad"], ref.grad.numpy(), rtol=1e-6)


def test_loss_options(client, engine):
    xywh = [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in PRED]
    txywh = [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in TARGET]
    body = {"pred": xywh, "target": txywh, "box_format": "xywh", "reduction": "mean", "weights": [1, 2, 0.5],
            "params": {"gamma": 0.5}, "dtype": "float64"}
    resp = client.post("/v1/losses/eiou", json=body).json()
    ref = engine.evaluate("eiou", xywh, txywh, box_format="xywh", reduction="mean", weights=[1, 2, 0.5],
                          params={"gamma": 0.5}, dtype="float64")
    assert resp["loss"] == pytest.approx(ref.loss.item(), rel=1e-12)
    np.testing.assert_allclose(resp["grad"], ref.grad.numpy(), rtol=1e-12)
    nograd = client.post("/v1/losses/giou", json={"pred": PRED, "target": TARGET, "return_grad": False}).json()
    assert nograd["grad"] is None and len(nograd["loss"]) == 3


def test_classification_over_json(client):
    logits = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
    resp = client.post("/v1/losses/cross_entropy", json={"pred": logits, "target": [0, 2], "dtype": "float64"})
    want = torch.nn.functional.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor([0, 2]),
                                             reduction="none")
    np.testing.assert_allclose(resp.json()["loss"], want.numpy(), rtol=1e-12)
    resp = client.post("/v1/losses/focal", json={"pred": [[0.3, -2.0]], "target": [[1, 0]]})
    assert resp.status_code == 200 and len(resp.json()["grad"][0]) == 2


def test_empty_batch_is_valid(client):
    resp = client.post("/v1/losses/giou", json={"pred": [], "target": [], "reduction": "mean"})
    assert resp.status_code == 200 and resp.json() == {"loss": 0.0, "grad": []}
    resp = client.post("/v1/losses/ciou", json={"pred": [], "target": []})
    assert resp.json() == {"loss": [], "grad": []}
    assert client.post("/v1/metrics/iou", json={"boxes1": [], "boxes2": [[0, 0, 1, 1]], "pairwise": True}).json() \
        == {"values": []}
    resp = client.post("/v1/losses/l1", json={"pred": [], "target": [], "reduction": "mean"})
    assert resp.status_code == 200 and resp.json() == {"loss": 0.0, "grad": []}
    resp = client.post("/v1/metrics/iou", json={"boxes1": [[0, 0, 1, 1]], "boxes2": [[0, 0, 1, 1]],
                                                "pairwise": True})
    assert resp.json()["values"] == [[pytest.approx(1.0)]]


@pytest.mark.parametrize("body,status,code,field", [
    ({"pred": [[0, 0, 10, 10], [0, 0, float("nan"), 1]], "target": TARGET[:2]}, 422, "non_finite", "pred"),
    ({"pred": PRED, "target": [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, float("inf")]]}, 422, "non_finite", "target"),
    ({"pred": [[0, 0, 1]], "target": [[0, 0, 1, 1]]}, 422, "invalid_shape", "pred"),
    ({"pred": [[0, 0, 1], [0, 0, 1, 1]], "target": TARGET[:2]}, 422, "invalid_shape", "pred"),
    ({"pred": PRED, "target": TARGET[:2]}, 422, "length_mismatch", "target"),
    ({"pred": [[0, 0, 10, 10], [9, 0, 1, 1]], "target": TARGET[:2]}, 422, "inverted_box", "pred"),
    ({"pred": PRED, "target": TARGET, "box_format": "yxyx"}, 422, "unknown_format", "box_format"),
    ({"pred": PRED, "target": TARGET, "reduction": "avg"}, 422, "unknown_reduction", "reduction"),
    ({"pred": PRED, "target": TARGET, "params": {"gamma": 1}}, 422, "unknown_param", "params.gamma"),
    ({"pred": PRED, "target": TARGET, "params": {"eps": 5}}, 422, "param_out_of_range", "params.eps"),
    ({"pred": PRED, "target": TARGET, "weights": [1, 2]}, 422, "length_mismatch", "weights"),
    ({"pred": PRED, "target": TARGET, "weights": 2.0}, 422, "length_mismatch", "weights"),
    ({"pred": PRED}, 422, "invalid_request", "target"),
    ({"pred": PRED, "target": TARGET, "colour": "red"}, 422, "invalid_request", "colour"),
    ({"pred": "boxes", "target": TARGET}, 422, "invalid_shape", "pred"),
    ({"pred": PRED, "target": TARGET, "dtype": "float16"}, 422, "unknown_dtype", "dtype"),
])
def test_loss_errors(client, body, status, code, field):
    import json

    resp = client.post("/v1/losses/ciou", content=json.dumps(body), headers={"content-type": "application/json"})
    err = error_of(resp, status, code)
    assert err["details"]["field"] == field
    if code in ("non_finite", "inverted_box"):
        assert err["details"]["rows"] and "row" in err["message"]


@pytest.mark.parametrize("weights, row", [([1, "a", 2], 1), ([1, 2, "1.5"], 2), ([None, 1, 2], 0)])
def test_weights_that_are_not_numbers_name_their_row(client, weights, row):
    """As in pred and target: a string (even "1.5") or null among the weights is refused, naming its row."""
    resp = client.post("/v1/losses/ciou", json={"pred": PRED, "target": TARGET, "weights": weights})
    err = error_of(resp, 422, "invalid_value")
    assert err["details"]["field"] == "weights" and err["details"]["rows"] == [row]


@pytest.mark.parametrize("name", ["iou", "giou", "diou", "ciou", "eiou", "siou"])
def test_eps_zero_on_a_zero_area_pair_is_nan_not_500(client, name):
    """With eps 0, a pair whose union is empty has no IoU: the reference gives NaN (JSON null) for that row and
    its gradient; the other rows are unaffected. (The fused kernels used to raise ZeroDivisionError: a 500.)"""
    r = client.post(f"/v1/losses/{name}", json={"pred": [[0, 0, 2, 0], [0, 0, 1, 1]],
                                                "target": [[0, 0, 0, 5], [0, 0, 1, 2]], "params": {"eps": 0.0}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["loss"][0] is None and body["grad"][0] == [None] * 4
    assert isinstance(body["loss"][1], float) and all(isinstance(g, float) for g in body["grad"][1])


def test_rows_in_inverted_error(client):
    pred = [[0, 0, 1, 1]] * 5 + [[3, 0, 1, 1]] + [[0, 0, 1, 1]] * 3 + [[0, 5, 1, 1]]
    err = error_of(client.post("/v1/losses/giou", json={"pred": pred, "target": [[0, 0, 1, 1]] * 10}), 422,
                   "inverted_box")
    assert err["details"]["rows"] == [5, 9] and "rows 5, 9" in err["message"]


def test_unknown_loss_and_bad_json(client):
    error_of(client.post("/v1/losses/ciouu", json={"pred": PRED, "target": TARGET}), 404, "unknown_loss")
    # the name is checked before the body: an unknown name is 404 whatever (or however broken) the body is
    error_of(client.post("/v1/losses/ciouu", json={}), 404, "unknown_loss")
    error_of(client.post("/v1/metrics/iouu", content=b"not json", headers={"content-type": "application/json"}),
             404, "unknown_metric")
    resp = client.post("/v1/losses/ciou", content=b'{"pred": [[0, 0', headers={"content-type": "application/json"})
    error_of(resp, 400, "invalid_json")
    resp = client.post("/v1/losses/ciou", content=b"not json at all", headers={"content-type": "application/json"})
    error_of(resp, 400, "invalid_json")


def test_body_limit(make_client):
    small = make_client(max_body_bytes=1000)
    body = {"pred": [[0, 0, 1, 1]] * 200, "target": [[0, 0, 1, 1]] * 200}
    err = error_of(small.post("/v1/losses/giou", json=body), 413, "too_large")
    assert "1000" in err["message"]

    def chunks():  # no Content-Length: the body streams in chunks and is refused once it passes the cap
        for _ in range(50):
            yield b" " * 100

    resp = small.post("/v1/losses/giou", content=chunks(), headers={"content-type": "application/json"})
    error_of(resp, 413, "too_large")
    ok = small.post("/v1/losses/giou", json={"pred": [[0, 0, 1, 1]], "target": [[0, 0, 1, 1]]})
    assert ok.status_code == 200


def test_metrics_endpoint(client, engine):
    resp = client.post("/v1/metrics/diou", json={"boxes1": PRED, "boxes2": TARGET}).json()
    np.testing.assert_allclose(resp["values"], engine.metric("diou", PRED, TARGET).numpy(), rtol=1e-6)
    resp = client.post("/v1/metrics/giou", json={"boxes1": PRED, "boxes2": TARGET[:2], "pairwise": True}).json()
    assert np.asarray(resp["values"]).shape == (3, 2)
    error_of(client.post("/v1/metrics/giou", json={"boxes1": PRED, "boxes2": TARGET[:2]}), 422, "length_mismatch")
    error_of(client.post("/v1/metrics/jaccard", json={"boxes1": PRED, "boxes2": TARGET}), 404, "unknown_metric")
    assert {m["name"] for m in client.get("/v1/metrics").json()["metrics"]} >= {"iou", "ciou", "siou", "nwd"}


def test_pairwise_budget_is_413(make_client):
    small = make_client(max_pairwise_bytes=16)  # 4 float32 values: 3 x 3 is over, 2 x 2 fits
    err = error_of(small.post("/v1/metrics/iou", json={"boxes1": PRED, "boxes2": TARGET, "pairwise": True}), 413,
                   "too_large")
    assert "36 bytes" in err["message"] and "LOSSD_MAX_PAIRWISE_BYTES" in err["message"]
    ok = small.post("/v1/metrics/iou", json={"boxes1": PRED[:2], "boxes2": TARGET[:2], "pairwise": True})
    assert ok.status_code == 200 and np.asarray(ok.json()["values"]).shape == (2, 2)
    err = error_of(small.post("/v1/metrics/iou", json={"boxes1": PRED[:2], "boxes2": TARGET[:2], "pairwise": True,
                                                       "dtype": "float64"}), 413, "too_large")


def test_prometheus_and_docs(client):
    client.post("/v1/losses/giou", json={"pred": PRED, "target": TARGET})
    client.post("/v1/losses/giou", json={"pred": [[1, 0, 0, 1]], "target": [[0, 0, 1, 1]]})
    text = client.get("/metrics").text
    assert 'lossd_requests_total{endpoint="v1_loss",name="giou",outcome="ok"} 1.0' in text
    assert 'lossd_requests_total{endpoint="v1_loss",name="giou",outcome="inverted_box"} 1.0' in text
    assert "lossd_batch_size_bucket" in text and "lossd_in_flight_requests" in text
    spec = client.get("/openapi.json").json()
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert "application/octet-stream" in infer["requestBody"]["content"]
    assert "/v1/losses/{name}" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_cors(make_client):
    c = make_client(cors_origins=["https://annotate.example"])
    resp = c.options("/v1/losses/iou", headers={"Origin": "https://annotate.example",
                                                "Access-Control-Request-Method": "POST"})
    assert resp.headers["access-control-allow-origin"] == "https://annotate.example"
    resp = c.options("/v1/losses/iou", headers={"Origin": "https://evil.example",
                                                "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in resp.headers


def test_flags_must_be_booleans(client):
    err = error_of(client.post("/v1/losses/ciou", json={"pred": PRED, "target": TARGET, "return_grad": "yes"}), 422,
                   "invalid_request")
    assert err["details"]["field"] == "return_grad"
    err = error_of(client.post("/v1/metrics/iou", json={"boxes1": PRED, "boxes2": TARGET, "pairwise": 1}), 422,
                   "invalid_request")
    assert err["details"]["field"] == "pairwise"
