"""Engine.evaluate(out=Out(loss, grad)): the answer written into the caller's arrays (a shared-memory region on the
server), by the fused CPU kernels directly and by every other path through a copy. Expected values come from a
float64 autograd of the CIoU formula written from the paper (Zheng et al. 2020), from hand-computed boxes and from
torch's own cross-entropy in float64, never from the engine itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lossd.engine import Engine, Out
from lossd.engine import engine as engine_mod


def ciou_reference(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CIoU loss and its gradient wrt pred, float64 autograd of the paper's formula (alpha detached)."""
    p = torch.tensor(pred, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(target, dtype=torch.float64)
    eps = 1e-7
    x1, y1, x2, y2 = p.unbind(-1)
    a1, b1, a2, b2 = t.unbind(-1)
    inter = (torch.min(x2, a2) - torch.max(x1, a1)).clamp(min=0) * (torch.min(y2, b2) - torch.max(y1, b1)).clamp(min=0)
    union = (x2 - x1) * (y2 - y1) + (a2 - a1) * (b2 - b1) - inter
    iou = inter / (union + eps)
    c2 = (torch.max(x2, a2) - torch.min(x1, a1)) ** 2 + (torch.max(y2, b2) - torch.min(y1, b1)) ** 2 + eps
    rho2 = ((x1 + x2 - a1 - a2) ** 2 + (y1 + y2 - b1 - b2) ** 2) / 4
    v = (4 / math.pi ** 2) * (torch.atan((a2 - a1) / (b2 - b1)) - torch.atan((x2 - x1) / (y2 - y1))) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    loss = 1 - iou + rho2 / c2 + alpha * v
    loss.sum().backward()
    return loss.detach().numpy(), p.grad.numpy()


def hand_ciou() -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Three box pairs and their CIoU worked out by hand (eps left out: it moves nothing at 1e-6)."""
    pred = np.array([[0, 0, 2, 2], [0, 0, 4, 2], [1, 1, 3, 3]], np.float32)
    target = np.array([[1, 1, 3, 3], [0, 0, 2, 4], [1, 1, 3, 3]], np.float32)
    # 1: inter 1, union 7, enclosing 3x3 (c2 18), centres (1,1)/(2,2) (rho2 2), same aspect (v 0)
    first = 1 - 1 / 7 + 2 / 18
    # 2: inter 4, union 12, enclosing 4x4 (c2 32), centres (2,1)/(1,2) (rho2 2), aspects 2:1 vs 1:2
    v = 4 / math.pi ** 2 * (math.atan(2 / 4) - math.atan(4 / 2)) ** 2
    second = 1 - 1 / 3 + 2 / 32 + v / (1 - 1 / 3 + v) * v
    return pred, target, [first, second, 0.0]  # 3: the same box


def boxes(n: int, seed: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n, 2))
    pred = np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2))], 1).astype(dtype)
    txy = xy + rng.uniform(-10, 10, (n, 2))
    target = np.concatenate([txy, txy + rng.uniform(1, 50, (n, 2))], 1).astype(dtype)
    return pred, target


@pytest.fixture(scope="module")
def reference_engine() -> Engine:
    return Engine(device="cpu", fast="off", warm=False)


@pytest.fixture
def placed(monkeypatch):
    """Which outputs Out.fill had to copy (those not computed where they go)."""
    copied = []
    real = engine_mod._place

    def spy(dst, src, name):
        if src.data_ptr() != dst.ctypes.data:
            copied.append(name)
        real(dst, src, name)

    monkeypatch.setattr(engine_mod, "_place", spy)
    return copied


def _sentinel_out(n: int, cols: int | None, dtype=np.float32, value=7.25) -> Out:
    return Out(np.full(n, value, dtype), None if cols is None else np.full((n, cols), value, dtype))


@pytest.mark.parametrize("which", ["fused", "reference"])
def test_out_gives_the_same_numbers_and_shares_memory(engine, reference_engine, placed, which):
    eng = engine if which == "fused" else reference_engine
    pred, target, hand = hand_ciou()
    out = _sentinel_out(3, 4)
    res = eng.evaluate("ciou", pred, target, out=out)
    np.testing.assert_allclose(out.loss, hand, rtol=1e-5, atol=1e-6)
    assert np.shares_memory(res.loss.numpy(), out.loss) and np.shares_memory(res.grad.numpy(), out.grad)

    pred, target = boxes(2000, 1)
    want_loss, want_grad = ciou_reference(pred, target)
    plain = eng.evaluate("ciou", pred, target)
    out = _sentinel_out(2000, 4)
    placed.clear()
    res = eng.evaluate("ciou", pred, target, out=out)
    # computed straight into out by the fused kernel; the reference path copies both outputs there
    assert placed == ([] if which == "fused" else ["loss", "grad"])
    np.testing.assert_array_equal(out.loss, plain.loss.numpy())
    np.testing.assert_array_equal(out.grad, plain.grad.numpy())
    np.testing.assert_allclose(out.loss, want_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.grad, want_grad, rtol=1e-3, atol=1e-5)
    assert res.loss.data_ptr() == out.loss.ctypes.data and res.grad.data_ptr() == out.grad.ctypes.data
    assert res.dtype == torch.float32


def test_out_in_float64_and_with_big_batches(engine):
    """float64 out arrays for a float64 call; a batch big enough for the parallel kernel."""
    pred, target = boxes(300, 2, np.float64)
    want_loss, want_grad = ciou_reference(pred, target)
    out = _sentinel_out(300, 4, np.float64)
    plain = engine.evaluate("ciou", pred, target)
    engine.evaluate("ciou", pred, target, out=out)
    np.testing.assert_array_equal(out.loss, plain.loss.numpy())
    np.testing.assert_array_equal(out.grad, plain.grad.numpy())
    # eps sits in a few more places in the engine than in the reference: ~1e-9 apart
    np.testing.assert_allclose(out.loss, want_loss, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(out.grad, want_grad, rtol=1e-5, atol=1e-8)

    pred, target = boxes(200_000, 3)
    plain = engine.evaluate("ciou", pred, target)
    out = _sentinel_out(200_000, 4)
    engine.evaluate("ciou", pred, target, out=out)
    np.testing.assert_array_equal(out.loss, plain.loss.numpy())
    np.testing.assert_array_equal(out.grad, plain.grad.numpy())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("which", ["fused", "reference"])
def test_a_reduced_loss_leaves_out_untouched(engine, reference_engine, reduction, which):
    eng = engine if which == "fused" else reference_engine
    pred, target = boxes(500, 4)
    want_loss, want_grad = ciou_reference(pred, target)
    out = _sentinel_out(500, 4)
    res = eng.evaluate("ciou", pred, target, reduction=reduction, out=out)
    assert (out.loss == 7.25).all() and (out.grad == 7.25).all()
    assert not np.shares_memory(res.grad.numpy(), out.grad)
    scale = 1 / 500 if reduction == "mean" else 1.0
    assert float(res.loss) == pytest.approx(want_loss.sum() * scale, rel=1e-5)
    np.testing.assert_allclose(res.grad.numpy(), want_grad * scale, rtol=1e-3, atol=1e-7)
    # an out that would be refused for a per-sample call is ignored too (nothing to write)
    bad = Out(np.zeros(500, np.float64))
    assert float(eng.evaluate("ciou", pred, target, reduction=reduction, out=bad).loss) == float(res.loss)


def test_a_classification_loss_without_a_kernel_is_copied_into_out(engine, placed):
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (64, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 64)
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    want = torch.nn.functional.cross_entropy(x, torch.tensor(labels), reduction="none")
    want.sum().backward()
    out = _sentinel_out(64, 5)
    res = engine.evaluate("cross_entropy", logits, labels, out=out)
    assert placed == ["loss", "grad"]
    np.testing.assert_allclose(out.loss, want.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.grad, x.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert np.shares_memory(res.loss.numpy(), out.loss) and np.shares_memory(res.grad.numpy(), out.grad)


@pytest.mark.parametrize("which", ["fused", "reference"])
def test_out_with_loss_only(engine, reference_engine, which):
    eng = engine if which == "fused" else reference_engine
    pred, target = boxes(100, 6)
    want_loss, want_grad = ciou_reference(pred, target)
    out = Out(np.full(100, 7.25, np.float32))
    res = eng.evaluate("ciou", pred, target, out=out)
    np.testing.assert_allclose(out.loss, want_loss, rtol=1e-4, atol=1e-5)
    assert np.shares_memory(res.loss.numpy(), out.loss)
    np.testing.assert_allclose(res.grad.numpy(), want_grad, rtol=1e-3, atol=1e-5)  # in fresh memory
    # no gradient asked for: out.grad is left alone
    out = _sentinel_out(100, 4)
    res = eng.evaluate("ciou", pred, target, return_grad=False, out=out)
    assert res.grad is None and (out.grad == 7.25).all()
    np.testing.assert_allclose(out.loss, want_loss, rtol=1e-4, atol=1e-5)


def _read_only(n):
    a = np.zeros(n, np.float32)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("which", ["fused", "reference"])
@pytest.mark.parametrize("case", ["dtype", "strided", "read-only", "grad dtype", "grad not contiguous", "not numpy",
                                  "loss shape", "grad shape"])
def test_bad_out_arrays_are_refused(engine, reference_engine, which, case):
    eng = engine if which == "fused" else reference_engine
    pred, target = boxes(10, 7)
    good_loss, good_grad = np.zeros(10, np.float32), np.zeros((10, 4), np.float32)
    out, text = {
        "dtype": (Out(np.zeros(10, np.float64), good_grad), "out.loss"),
        "strided": (Out(np.zeros(20, np.float32)[::2], good_grad), "out.loss"),
        "read-only": (Out(_read_only(10), good_grad), "out.loss"),
        "grad dtype": (Out(good_loss, np.zeros((10, 4), np.float64)), "out.grad"),
        "grad not contiguous": (Out(good_loss, np.zeros((4, 10), np.float32).T), "out.grad"),
        "not numpy": (Out(torch.zeros(10), good_grad), "out.loss"),
        "loss shape": (Out(np.zeros(11, np.float32), good_grad), "out.loss"),
        "grad shape": (Out(good_loss, np.zeros((10, 5), np.float32)), "out.grad"),
    }[case]
    with pytest.raises(ValueError) as err:
        eng.evaluate("ciou", pred, target, out=out)
    assert text in str(err.value)
