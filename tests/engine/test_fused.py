"""The fast routes against the autograd reference: same values and gradients, same errors."""

import pytest
import torch

from lossd.engine import Engine, EngineError
from lossd.engine import fastpath
from lossd.engine.fastpath import FUSED_LOSSES
from lossd.engine.registry import get_metric
from lossd.engine.inputs import example_inputs, random_boxes

from .test_properties import DEGENERATE

VARIANTS = [(n, {}) for n in FUSED_LOSSES] + [
    ("iou", {"mode": "log"}), ("iou", {"mode": "square"}), ("ciou", {"alpha_rule": "mmdet"}),
    ("eiou", {"gamma": 0.5}), ("siou", {"theta": 2.5}), ("giou", {"eps": 1e-3}),
    ("smooth_l1", {"beta": 0.3}), ("smooth_l1", {"beta": 0.0}), ("huber", {"delta": 2.0}),
    ("mpdiou", {"normalizer": "enclosing"}), ("mpdiou", {"image_width": 100.0, "image_height": 37.0}),
    ("wiou", {"version": "v2", "iou_mean": 0.4}), ("wiou", {"version": "v2", "gamma": 0.0}),
    ("wiou", {"version": "v3", "iou_mean": 0.3}), ("wiou", {"version": "v3", "alpha": 2.5, "delta": 1.5}),
    ("inner_iou", {"ratio": 1.3}), ("inner_iou", {"base": "giou"}), ("inner_iou", {"base": "diou", "ratio": 0.5}),
    ("inner_iou", {"base": "ciou", "ratio": 1.5}),
    ("alpha_iou", {"penalty": "giou"}), ("alpha_iou", {"penalty": "diou", "alpha": 2.0}),
    ("alpha_iou", {"penalty": "ciou"}), ("alpha_iou", {"alpha": 1.0, "penalty": "ciou"}),
    ("alpha_iou", {"alpha": 4.0, "penalty": "giou"}),
]


@pytest.fixture(scope="module")
def fast():
    return Engine(device="cpu", fast="auto")


@pytest.fixture(scope="module")
def ref():
    return Engine(device="cpu", fast="off", warm=False)


def _convert(b: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "xywh":
        return torch.cat((b[:, :2], b[:, 2:] - b[:, :2]), 1)
    if fmt == "cxcywh":
        return torch.cat((0.5 * (b[:, :2] + b[:, 2:]), b[:, 2:] - b[:, :2]), 1)
    return b


def assert_same(a, b, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(a.loss, b.loss, rtol=rtol, atol=atol)
    if b.grad is None:
        assert a.grad is None
    else:
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)


BOXES = ("iou", "giou", "diou", "ciou", "eiou", "siou", "mpdiou", "wiou", "inner_iou", "alpha_iou")
CASES = [(n, p, f) for n, p in VARIANTS for f in (("xyxy", "xywh", "cxcywh") if n in BOXES else ("xyxy",))]


@pytest.mark.parametrize("name,params,box_format", CASES, ids=[f"{n}{p or ''}-{f}" for n, p, f in CASES])
def test_fused_matches_reference(fast, ref, name, params, box_format, gen):
    kind = "boxes" if name in BOXES else "regression"
    pred, target = example_inputs(kind, 64, gen)
    if kind == "boxes":
        pred, target = _convert(pred, box_format), _convert(target, box_format)
    w = torch.rand(64, generator=gen, dtype=torch.float64)
    for reduction in ("none", "mean", "sum"):
        for weights in (None, w):
            kw = dict(box_format=box_format, reduction=reduction, weights=weights, params=params)
            assert_same(fast.evaluate(name, pred, target, **kw), ref.evaluate(name, pred, target, **kw))
    assert fast.evaluate(name, pred, target, return_grad=False, params=params, box_format=box_format).grad is None


@pytest.mark.parametrize("name", BOXES)
def test_fused_matches_reference_on_edge_cases(fast, ref, name, gen):
    pred = torch.tensor([p for p, _ in DEGENERATE.values()], dtype=torch.float64)
    target = torch.tensor([t for _, t in DEGENERATE.values()], dtype=torch.float64)
    t = random_boxes(8, gen)
    wh = t[:, 2:] - t[:, :2]
    contained = torch.cat((t[:, :2] + 0.2 * wh, t[:, 2:] - 0.3 * wh), 1)
    pred, target = torch.cat((pred, target, contained, t + 1e4)), torch.cat((target, pred, t, t))
    assert_same(fast.evaluate(name, pred, target), ref.evaluate(name, pred, target), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["ciou", "siou", "wiou", "l1"])
def test_parallel_kernel_and_float32(fast, ref, name, gen):
    kind = "regression" if name == "l1" else "boxes"
    pred, target = example_inputs(kind, 20_000, gen)  # above the parallel threshold
    assert_same(fast.evaluate(name, pred, target, reduction="mean"), ref.evaluate(name, pred, target, reduction="mean"))
    lo = fast.evaluate(name, pred.float(), target.float())
    hi = ref.evaluate(name, pred.float().double(), target.float().double())
    assert lo.loss.dtype == torch.float32
    torch.testing.assert_close(lo.loss.double(), hi.loss, rtol=1e-5, atol=1e-6)


def test_regression_shapes(fast, ref, gen):
    for shape in ((7,), (7, 3), (0,), (0, 4)):
        p = torch.randn(*shape, generator=gen, dtype=torch.float64)
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        for name in ("l1", "smooth_l1"):
            out = fast.evaluate(name, p, t)
            assert_same(out, ref.evaluate(name, p, t))
            assert out.grad.shape == p.shape


@pytest.mark.parametrize("bad,code", [
    ({"pred": [[0, 0, 1, 1], [2, 0, 1, 1]]}, "inverted_box"),
    ({"pred": [[0, 0, 1, 1], [0, 0, float("nan"), 1]]}, "non_finite"),
    ({"target": [[0, 0, 1, 1], [0, 0, 1, float("inf")]]}, "non_finite"),
    ({"target": [[0, 0, 1, 1], [0, 3, 1, 1]]}, "inverted_box"),
    ({"weights": [1.0, -1.0]}, "invalid_value"),
    ({"pred": [[0, 0, 1]]}, "invalid_shape"),
])
def test_fused_errors_are_the_reference_errors(fast, ref, bad, code):
    args = {"pred": [[0, 0, 1, 1], [0, 0, 2, 2]], "target": [[0, 0, 1, 1], [1, 1, 2, 2]], "weights": None}
    args.update(bad)
    errors = []
    for engine in (fast, ref):
        with pytest.raises(EngineError) as info:
            engine.evaluate("ciou", args["pred"], args["target"], weights=args["weights"])
        errors.append(info.value.to_dict())
    assert errors[0] == errors[1] and errors[0]["code"] == code


@pytest.mark.parametrize("name", BOXES)
def test_zero_eps_divisions_give_the_reference_nans(fast, ref, name):
    """eps = 0 on empty unions and zero heights divides by zero: the kernels give the reference's NaN and inf
    row by row (numpy's error model), never an exception."""
    pred = torch.tensor([[0, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 3], [1, 1, 3, 4], [0, 0, 1, 1]], dtype=torch.float64)
    target = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 5], [0, 0, 2, 0], [1, 1, 3, 4], [2, 2, 3, 3]],
                          dtype=torch.float64)
    got = fast.evaluate(name, pred, target, params={"eps": 0.0})
    want = ref.evaluate(name, pred, target, params={"eps": 0.0})
    assert torch.isnan(want.loss).any()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-9, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12, equal_nan=True)


METRICS = ("iou", "giou", "diou", "ciou", "eiou", "siou")
METRIC_CASES = [(n, {}) for n in METRICS] + [("giou", {"eps": 1e-3}), ("siou", {"theta": 2.5}), ("ciou", {"eps": 0.0})]


@pytest.mark.parametrize("name,params", METRIC_CASES, ids=[f"{n}{p or ''}" for n, p in METRIC_CASES])
def test_fused_metrics_match_reference(fast, ref, name, params, gen):
    """Elementwise and pairwise, every format, both dtypes, random and degenerate boxes: the reference's values."""
    pred, target = example_inputs("boxes", 24, gen)
    dp = torch.tensor([p for p, _ in DEGENERATE.values()], dtype=torch.float64)
    dt = torch.tensor([t for _, t in DEGENERATE.values()], dtype=torch.float64)
    a, b = torch.cat((pred, dp, dt)), torch.cat((target, dt, dp))
    for fmt in ("xyxy", "xywh", "cxcywh"):
        a_f, b_f = _convert(a, fmt), _convert(b, fmt)
        for pairwise in (False, True):
            for dtype in ("float64", "float32"):
                kw = dict(box_format=fmt, pairwise=pairwise, params=params, dtype=dtype)
                got, want = fast.metric(name, a_f, b_f, **kw), ref.metric(name, a_f, b_f, **kw)
                assert got.dtype == want.dtype and got.shape == want.shape
                direct = fastpath.cpu_metric(name, a_f, b_f, fmt, pairwise, get_metric(name).resolve(params),
                                             got.dtype, 10**9)  # the fused route took these inputs itself
                torch.testing.assert_close(direct, got, rtol=0, atol=0, equal_nan=True)
                tol = dict(rtol=1e-9, atol=1e-12) if dtype == "float64" else dict(rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(got, want, equal_nan=True, **tol)


@pytest.mark.parametrize("bad,code", [
    ({"boxes1": [[0, 0, 1, 1], [2, 0, 1, 1]]}, "inverted_box"),
    ({"boxes2": [[0, 0, 1, 1], [0, 0, float("nan"), 1]]}, "non_finite"),
    ({"boxes2": [[0, 0, 1, 1]]}, "length_mismatch"),
    ({"boxes1": [[0, 0, 1]]}, "invalid_shape"),
])
def test_fused_metric_errors_are_the_reference_errors(fast, ref, bad, code):
    args = {"boxes1": [[0, 0, 1, 1], [0, 0, 2, 2]], "boxes2": [[0, 0, 1, 1], [1, 1, 2, 2]]}
    args.update(bad)
    errors = []
    for engine in (fast, ref):
        with pytest.raises(EngineError) as info:
            engine.metric("ciou", args["boxes1"], args["boxes2"])
        errors.append(info.value.to_dict())
    assert errors[0] == errors[1] and errors[0]["code"] == code


def test_fused_metric_respects_the_pairwise_budget():
    small = Engine(device="cpu", warm=False, max_pairwise=4)
    with pytest.raises(EngineError) as info:
        small.metric("iou", [[0, 0, 1, 1]] * 3, [[0, 0, 1, 1]] * 3, pairwise=True)
    assert info.value.code == "too_large"


def test_unfused_parameter_values_take_the_reference(fast, ref, gen):
    pred, target = example_inputs("boxes", 16, gen)
    for name, params in (("ciou", {"alpha_rule": "attached"}), ("siou", {"distance_sign": "mmdet"})):
        assert_same(fast.evaluate(name, pred, target, params=params), ref.evaluate(name, pred, target, params=params))


def test_compiled_route_matches_reference(ref, gen):
    """The route CUDA takes (torch.compile over torch.func), checked here on the CPU."""
    compiled = Engine(device="cpu", fast="compiled", warm=False)
    pred, target = example_inputs("boxes", 32, gen)
    w = torch.rand(32, generator=gen, dtype=torch.float64)
    for name in ("ciou", "siou"):
        kw = dict(reduction="mean", weights=w, box_format="xyxy")
        assert_same(compiled.evaluate(name, pred, target, **kw), ref.evaluate(name, pred, target, **kw))


@pytest.fixture
def fresh_compiled(monkeypatch):
    """The compiled route with its own empty cache, dynamo reset and loud about silent eager fallbacks, on the
    aot_eager backend: dynamo's tracing and guards as inductor sees them, without inductor's C++ builds."""
    import torch._dynamo
    import torch._dynamo.utils

    from lossd.engine import fastpath

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(fastpath, "_COMPILED", {})
    monkeypatch.setattr(fastpath, "BACKEND", "aot_eager")
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    yield fastpath
    torch._dynamo.reset()


def test_compiled_route_compiles_every_fused_loss_whole(fresh_compiled, ref, gen):
    """Every fused loss, and two in float32 and other formats (13 graphs, over dynamo's 8 per code object), is
    traced as one graph: no graph break, no recompile limit, none left to the reference; values as the
    reference's."""
    import torch._dynamo.utils

    compiled = Engine(device="cpu", fast="compiled", warm=False)
    cases = [(name, torch.float64, "xyxy") for name in FUSED_LOSSES]
    cases += [("ciou", torch.float32, "cxcywh"), ("siou", torch.float32, "xywh")]
    for name, dtype, fmt in cases:
        pred, target = example_inputs("boxes", 16, gen, dtype)
        pred, target = _convert(pred, fmt), _convert(target, fmt)
        got = compiled.evaluate(name, pred, target, box_format=fmt, dtype=dtype)
        want = ref.evaluate(name, pred, target, box_format=fmt, dtype=dtype)
        assert_same(got, want, **(dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}))
    graphs = fresh_compiled._COMPILED
    assert len(graphs) == len(cases) and all(fn is not None for fn in graphs.values())
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["unimplemented"], dict(counters["unimplemented"])
    assert counters["stats"]["unique_graphs"] == len(graphs)  # one graph each: no splits, no recompiles


def test_compiled_route_past_its_graph_limit_takes_the_reference(fresh_compiled, ref, gen, monkeypatch):
    monkeypatch.setattr(fresh_compiled, "MAX_COMPILED", 2)
    compiled = Engine(device="cpu", fast="compiled", warm=False)
    pred, target = example_inputs("boxes", 16, gen)
    for name in ("iou", "giou", "diou", "ciou"):
        assert_same(compiled.evaluate(name, pred, target), ref.evaluate(name, pred, target))
    assert [k[0] for k in fresh_compiled._COMPILED] == ["iou", "giou"]


def test_a_loss_that_cannot_be_compiled_takes_the_reference(fresh_compiled, ref, gen, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no graph for you")

    monkeypatch.setattr(fresh_compiled, "_compile", lambda *a: broken)
    compiled = Engine(device="cpu", fast="compiled", warm=False)
    pred, target = example_inputs("boxes", 16, gen)
    for _ in range(2):
        assert_same(compiled.evaluate("ciou", pred, target), ref.evaluate("ciou", pred, target))
    assert list(fresh_compiled._COMPILED.values()) == [None]
    assert sum("could not compile ciou" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("name", ["iou", "giou", "diou", "ciou", "eiou", "siou", "l1", "smooth_l1"])
def test_cuda_matches_cpu_reference(ref, name, gen):
    cuda = Engine(device="cuda")
    kind = "regression" if name in ("l1", "smooth_l1") else "boxes"
    pred, target = example_inputs(kind, 4096, gen)
    for reduction in ("none", "mean"):
        assert_same(cuda.evaluate(name, pred, target, reduction=reduction),
                    ref.evaluate(name, pred, target, reduction=reduction), rtol=1e-9, atol=1e-10)
