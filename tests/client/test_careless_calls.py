"""The Python client as careless callers use it, against a real `lossd serve`, over both transports:
- arrays of different lengths are refused as the server refuses them (length_mismatch naming the field), also when
  the call is cut into requests: metric() row against row cut boxes2 as it cut boxes1 and dropped the rest of
  boxes2 (at any size), and a loss() split over the wire dropped target's and weights' extra rows;
- call options of the wrong type are InvalidInputError naming the option on both transports (over gRPC they were
  a TypeError naming nothing, or accepted: box_format=None);
- stream() items: a missing argument names the item, an unknown loss is NotFoundError on both transports;
- true/false are refused naming the field and rows (the server refuses JSON true/false): boolean arrays, and
  bools among a list's numbers, which numpy read as 1 and 0; ragged lists and strings name the field; metric() of float64 boxes is computed in
  float64 over HTTP as over gRPC, a URL with a path that is not a lossd root says so, and the constructor refuses
  impossible options at once."""

from __future__ import annotations

import numpy as np
import pytest

from lossd_client import AsyncLossClient, InvalidInputError, LossClient, NotFoundError

BOX = [[0.0, 0.0, 10.0, 10.0]]


def _url(server, kind):
    return server.http_url if kind == "http" else server.grpc_url


def _boxes(n, seed=0):
    g = np.random.default_rng(seed)
    xy = g.uniform(0, 100, (n, 2)).astype(np.float32)
    return np.concatenate([xy, xy + g.uniform(1, 20, (n, 2)).astype(np.float32)], 1)


@pytest.mark.parametrize("kind", ["http", "grpc"])
@pytest.mark.parametrize("n", [1, 3000])
def test_metric_row_against_row_refuses_a_longer_boxes2(live_server, kind, n):
    a = _boxes(n)
    b = np.concatenate([a, a[:1] + 1])
    with LossClient(_url(live_server, kind), max_request_bytes=16 * 1024) as c:  # 3000 rows: several requests
        with pytest.raises(InvalidInputError) as err:
            c.metric("iou", a, b)
        assert err.value.code == "length_mismatch" and err.value.field == "boxes2"
        assert f"boxes1 has {n} rows but boxes2 has {n + 1}" in err.value.message
        assert np.allclose(c.metric("iou", a, a), 1.0)  # equal lengths still work


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_a_split_loss_refuses_extra_target_or_weights_rows(live_server, kind):
    n = 3000
    t = _boxes(n + 1, 1)
    p = t[:n] + 0.5
    with LossClient(_url(live_server, kind), shared_memory=False, max_request_bytes=16 * 1024) as c:
        for kwargs, field, rows in (({"target": t}, "target", n + 1),
                                    ({"target": t[:n], "weights": np.ones(n + 1, np.float32)}, "weights", n + 1),
                                    ({"target": t[:n - 1]}, "target", n - 1)):
            with pytest.raises(InvalidInputError) as err:
                c.loss("giou", p, **kwargs)
            assert err.value.code == "length_mismatch" and err.value.field == field
            assert f"pred has {n} rows but {field} has {rows}" in err.value.message  # the caller's counts
        r = c.loss("giou", p, t[:n])  # equal lengths: answered whole, in order
        assert r.loss.shape == (n,) and r.loss[0] == pytest.approx(c.loss("giou", p[:1], t[:1]).loss[0])


@pytest.mark.parametrize("kind", ["http", "grpc"])
@pytest.mark.parametrize("call, field", [
    (lambda c: c.loss("ciou", BOX, BOX, return_grad="no"), "return_grad"),
    (lambda c: c.loss("ciou", BOX, BOX, box_format=None), "box_format"),
    (lambda c: c.loss("ciou", BOX, BOX, reduction=1), "reduction"),
    (lambda c: c.loss("ciou", BOX, BOX, params="x"), "params"),
    (lambda c: c.loss(5, BOX, BOX), "name"),
    (lambda c: c.metric("iou", BOX, BOX, pairwise="yes"), "pairwise"),
    (lambda c: c.stream([{"name": "ciou", "pred": BOX}]), "calls[0]"),
    (lambda c: c.stream([{"name": "ciou", "pred": BOX, "target": BOX, "colour": 1}]), "calls[0]"),
])
def test_wrong_option_types_name_the_option_on_both_transports(live_server, kind, call, field):
    with LossClient(_url(live_server, kind)) as c:
        with pytest.raises(InvalidInputError) as err:
            call(c)
    assert err.value.field == field, err.value


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_an_unknown_loss_in_a_stream_is_not_found_on_both_transports(live_server, kind):
    with LossClient(_url(live_server, kind)) as c:
        with pytest.raises(NotFoundError) as err:
            c.stream([{"name": "giou", "pred": BOX, "target": BOX}, {"name": "nope", "pred": BOX, "target": BOX}])
    assert err.value.code == "unknown_loss"


@pytest.mark.parametrize("kind", ["http", "grpc"])
@pytest.mark.parametrize("call, field, rows", [
    (lambda c: c.loss("ciou", np.array([[True, False, True, True]]), BOX), "pred", [0]),
    # bools among a list's numbers: numpy reads them as 1 and 0 (the server refuses JSON true/false)
    (lambda c: c.loss("ciou", [[0, 0, 5, 5], [0, 0, True, 1]], BOX * 2), "pred", [1]),
    (lambda c: c.loss("ciou", BOX * 3, [[0, 0, 1, 1], [0.5, 0, 1, 1], [0, 0, 1.5, np.True_]]), "target", [2]),
    (lambda c: c.loss("ciou", BOX * 2, BOX * 2, weights=[1.0, False]), "weights", [1]),
    (lambda c: c.loss("cross_entropy", [[0.1, 0.9]] * 3, [0, True, 1]), "target", [1]),
    (lambda c: c.metric("iou", BOX, [[True, 0, 1, 1]]), "boxes2", [0]),
])
def test_true_false_among_numbers_are_refused_naming_the_rows(live_server, kind, call, field, rows):
    with LossClient(_url(live_server, kind)) as c:
        with pytest.raises(InvalidInputError) as err:
            call(c)
        assert err.value.code == "invalid_value" and err.value.field == field and err.value.rows == rows


@pytest.mark.parametrize("call, code, field, rows", [
    (lambda c: c.loss("ciou", [[0, 0, 1, 1], [0, 0, 1]], BOX * 2), "invalid_shape", "pred", None),
    (lambda c: c.loss("ciou", BOX * 2, [[0, 0, 1, 1], ["a", 0, 1, 1]]), "invalid_value", "target", [1]),
    (lambda c: c.metric("iou", [[0, 0, 1, None]], BOX), "invalid_value", "boxes1", [0]),
    (lambda c: c.loss("ciou", np.array([["0", "0", "1", "1"]]), BOX), "invalid_value", "pred", None),
])
def test_ragged_lists_and_strings_name_the_field(live_server, call, code, field, rows):
    with LossClient(live_server.grpc_url) as c:
        with pytest.raises(InvalidInputError) as err:
            call(c)
        assert err.value.code == code and err.value.field == field and err.value.rows == rows


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_metric_of_float64_boxes_is_float64_on_both_transports(live_server, kind):
    a = np.array([[0, 0, 1e-3, 1e-3]])
    b = np.array([[0, 0, 1e-3, 1.0000001e-3]])
    exact = 1e-6 / (1e-3 * 1.0000001e-3 + 1e-7)  # b contains a: IoU = area(a) / (area(b) + eps), eps 1e-7
    with LossClient(_url(live_server, kind)) as c:
        v = c.metric("iou", a, b)
        v32 = c.metric("iou", a.astype(np.float32), b.astype(np.float32))
    assert v.dtype == np.float64 and abs(v[0] - exact) < 1e-12
    assert v32.dtype == np.float32 and abs(v32[0] - exact) > 1e-9  # float32 cannot see the 1e-7 difference


def test_async_client_checks_the_same(live_server):
    import asyncio

    async def main():
        async with AsyncLossClient(live_server.grpc_url) as c:
            with pytest.raises(InvalidInputError) as err:
                await c.metric("iou", BOX, BOX * 2)
            assert err.value.code == "length_mismatch"
            with pytest.raises(InvalidInputError):
                await c.loss("ciou", BOX, BOX, return_grad="no")

    asyncio.run(main())


def test_a_url_that_is_not_the_servers_root_says_so(live_server):
    with LossClient(live_server.http_url + "/v1") as c:
        with pytest.raises(NotFoundError) as err:
            c.losses()
    assert "no route /v1/v1/losses" in err.value.message and "server's root" in err.value.message


@pytest.mark.parametrize("kwargs, exc, word", [
    ({"url": 123}, TypeError, "url"), ({"timeout": -1}, ValueError, "timeout"),
    ({"timeout": "x"}, TypeError, "timeout"), ({"connect_timeout": 0}, ValueError, "connect_timeout"),
    ({"max_request_bytes": 0}, ValueError, "max_request_bytes"), ({"retries": -1}, ValueError, "retries"),
    ({"retries": 1.5}, TypeError, "retries"), ({"backoff": float("nan")}, ValueError, "backoff"),
])
def test_the_constructor_refuses_impossible_options(kwargs, exc, word):
    args = {"url": "http://127.0.0.1:1", **kwargs}
    with pytest.raises(exc, match=word):
        LossClient(args.pop("url"), **args)


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_numpy_booleans_are_options_like_python_ones(live_server, kind):
    """np.True_ for return_grad / pairwise failed over HTTP (JSON has no numpy bools)."""
    with LossClient(_url(live_server, kind)) as c:
        r = c.loss("iou", [[0.0, 0, 2, 2]], [[1.0, 1, 3, 3]], return_grad=np.True_)
        assert r.loss[0] == pytest.approx(1 - 1 / 7) and r.grad.shape == (1, 4)
        assert c.metric("iou", [[0.0, 0, 2, 2]], [[1.0, 1, 3, 3]], pairwise=np.True_).shape == (1, 1)


def test_a_stream_items_bad_option_names_the_item(live_server):
    with LossClient(live_server.grpc_url) as c:
        with pytest.raises(InvalidInputError) as err:
            c.stream([{"name": "iou", "pred": BOX, "target": BOX}, {"name": "iou", "pred": BOX, "target": BOX,
                                                                   "return_grad": "no"}])
    assert err.value.field == "calls[1].return_grad"
