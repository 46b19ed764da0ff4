"""GET /v1/losses shows exclusive bounds and weighted_mean; [N] dice and overflowing boxes answer 200 / 422."""


def test_exclusive_bounds_are_listed(client):
    cat = {e["name"]: e for e in client.get("/v1/losses").json()["losses"]}
    assert cat["dice"]["params"]["smooth"]["exclusive"] == {"min": True, "max": False}
    assert cat["quantile"]["params"]["q"]["exclusive"] == {"min": True, "max": True}
    assert cat["ciou"]["params"]["eps"].get("exclusive") is None  # 0 is allowed there
    assert client.get("/v1/losses/dice").json()["params"]["smooth"]["exclusive"] == {"min": True, "max": False}
    assert {n for n, e in cat.items() if e["weighted_mean"]} == {"cross_entropy", "nll"}
    refused = client.post("/v1/losses/dice", json={"pred": [0.2], "target": [0], "params": {"smooth": 0}})
    assert refused.status_code == 422 and "> 0.0" in refused.json()["error"]["message"]


def test_dice_on_n_values_and_overflow_refusal(client):
    r = client.post("/v1/losses/dice", json={"pred": [0.2, 0.9], "target": [0, 1], "dtype": "float64"})
    assert r.status_code == 200 and [round(v, 5) for v in r.json()["loss"]] == [0.16667, 0.03448]
    r = client.post("/v1/losses/ciou", json={"pred": [[0, 0, 1, 1], [-1e308, -1e308, 1e308, 1e308]],
                                             "target": [[0, 0, 1, 1], [0, 0, 1e308, 1e308]], "dtype": "float64"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "non_finite" and err["details"]["rows"] == [1]
