"""The catalog drives the fused route and states which losses weight their mean."""

import pytest
import torch

from lossd.engine import LOSSES, METRICS, Engine
from lossd.engine import fastpath
from lossd.engine.inputs import example_inputs


def test_the_fused_names_are_the_entries_that_declare_a_kernel():
    assert set(fastpath.FUSED_LOSSES) == {n for n, s in LOSSES.items() if s.kernel is not None}
    assert set(fastpath.METRIC_KINDS) == {n for n, s in METRICS.items() if s.kernel is not None}
    assert "cdiou" not in fastpath.FUSED_LOSSES and None not in fastpath.FUSED_LOSSES
    assert len(fastpath.FUSED_LOSSES) == 15  # 10 box losses and 5 coordinate losses, as before the move


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_declared_kernel_serves_the_defaults(name, gen):
    """An entry with a kernel is computed by it (cpu_evaluate answers), one without is left to the reference."""
    spec = LOSSES[name]
    pred, target = example_inputs(spec.inputs, 8, gen, torch.float64)
    out = fastpath.cpu_evaluate(spec, pred, target, "xyxy", "none", None, spec.resolve({}), True, torch.float64)
    assert (out is not None) == (spec.kernel is not None)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weighted_mean_says_how_mean_is_formed(name, gen):
    """weighted_mean False: 'mean' is the per-sample mean. True: it differs when rows are ignored or weighted."""
    engine = Engine(device="cpu", warm=False)
    entry = next(e for e in engine.losses() if e["name"] == name)
    spec = LOSSES[name]
    pred, target = example_inputs(spec.inputs, 8, gen, torch.float64)
    params = {}
    if entry["weighted_mean"]:  # give the rows unequal weights through the loss's own parameters
        target = target.clone()
        target[0] = -100  # the default ignore_index
        params = {"class_weights": [1.0, 2.0, 3.0, 4.0, 5.0]}
    per_sample = engine.evaluate(name, pred, target, params=params, return_grad=False).loss
    mean = engine.evaluate(name, pred, target, params=params, reduction="mean", return_grad=False).loss
    plain = per_sample.mean()
    if entry["weighted_mean"]:
        assert abs(float(mean) - float(plain)) > 1e-6
    else:
        assert float(mean) == pytest.approx(float(plain), rel=1e-12, abs=1e-12)
