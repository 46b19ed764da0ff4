"""Classification and regression losses against torch.nn.functional (an independent implementation of the same
definitions) and against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from lossd.engine.inputs import example_inputs


def test_cross_entropy_matches_torch(engine, gen):
    logits, idx = example_inputs("class_logits", 12, gen)
    idx[3] = -100
    w = [1.0, 2.0, 0.5, 1.0, 3.0]
    for params in ({}, {"label_smoothing": 0.2}, {"class_weights": w}, {"class_weights": w, "label_smoothing": 0.1}):
        tw = torch.tensor(w, dtype=torch.float64) if "class_weights" in params else None
        ls = params.get("label_smoothing", 0.0)
        for reduction in ("none", "mean", "sum"):
            want = F.cross_entropy(logits, idx, weight=tw, label_smoothing=ls, reduction=reduction)
            got = engine.evaluate("cross_entropy", logits, idx, params=params, reduction=reduction)
            torch.testing.assert_close(got.loss, want)
            x = logits.clone().requires_grad_(True)
            F.cross_entropy(x, idx, weight=tw, label_smoothing=ls, reduction=reduction).sum().backward()
            torch.testing.assert_close(got.grad, x.grad)
    assert engine.evaluate("cross_entropy", logits, idx).loss[3].item() == 0.0  # ignored row


def test_cross_entropy_hand_and_soft_targets(engine):
    # logits (0, ln 3): softmax (1/4, 3/4); CE for class 1 is ln(4/3)
    got = engine.evaluate("cross_entropy", [[0.0, math.log(3)]], [1.0], dtype="float64")
    assert got.loss.item() == pytest.approx(math.log(4 / 3))
    torch.testing.assert_close(got.grad, torch.tensor([[0.25, -0.25]], dtype=torch.float64))
    soft = engine.evaluate("cross_entropy", [[0.0, math.log(3)]], [[0.5, 0.5]], dtype="float64")
    assert soft.loss.item() == pytest.approx(-0.5 * math.log(0.25) - 0.5 * math.log(0.75))


def test_nll_and_kl(engine, gen):
    logits, idx = example_inputs("class_logits", 10, gen)
    logp = torch.log_softmax(logits, 1)
    torch.testing.assert_close(engine.evaluate("nll", logp, idx).loss, F.nll_loss(logp, idx, reduction="none"))
    q = torch.softmax(torch.randn(10, 5, generator=gen, dtype=torch.float64), 1)
    q[0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)  # 0 log 0 = 0
    want = (q * (torch.log(q.clamp(min=1e-300)) - logp)).sum(1)
    torch.testing.assert_close(engine.evaluate("kl_div", logits, q).loss, want)


def test_bce_family(engine, gen):
    p, t = example_inputs("probs", 9, gen)
    want = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).sum(1)
    torch.testing.assert_close(engine.evaluate("bce", p, t).loss, want)
    x, t = example_inputs("logits_binary", 9, gen)
    s = torch.sigmoid(x)
    want = -(3.0 * t * torch.log(s) + (1 - t) * torch.log(1 - s)).sum(1)
    torch.testing.assert_close(engine.evaluate("bce_with_logits", x, t, params={"pos_weight": 3.0}).loss, want)


LOGIT_SETS = {
    "small": torch.linspace(-0.5, 0.5, 12, dtype=torch.float64),
    "big": torch.linspace(-30, 30, 12, dtype=torch.float64),
    "random": torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4,
}
TARGET_SETS = {"zeros": torch.zeros(12, dtype=torch.float64), "ones": torch.ones(12, dtype=torch.float64),
               "mixed": (torch.arange(12) % 2).to(torch.float64)}


@pytest.mark.parametrize("logits", sorted(LOGIT_SETS))
@pytest.mark.parametrize("targets", sorted(TARGET_SETS))
@pytest.mark.parametrize("alpha", [-1, 0, 0.58, 1])
@pytest.mark.parametrize("gamma", [0, 2])
def test_focal_like_torchvision(engine, logits, targets, alpha, gamma):
    # torchvision's TestFocalLoss: focal <= ce, and focal / ce == (1 - p_t)^gamma * alpha_t
    x, t = LOGIT_SETS[logits], TARGET_SETS[targets]
    focal = engine.evaluate("focal", x, t, params={"alpha": alpha, "gamma": gamma}).loss
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    assert bool((focal <= ce + 1e-12).all())
    p = torch.sigmoid(x)
    pt = p * t + (1 - p) * (1 - t)
    at = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(t)
    torch.testing.assert_close(focal, ce * (1 - pt) ** gamma * at, rtol=1e-5, atol=1e-12)


def test_focal_defaults_and_bce_equivalence(engine, gen):
    spec = [e for e in engine.losses() if e["name"] == "focal"][0]
    assert spec["params"]["alpha"]["default"] == 0.25 and spec["params"]["gamma"]["default"] == 2.0
    x, t = example_inputs("logits_binary", 6, gen)
    out = engine.evaluate("focal", x, t, params={"alpha": -1, "gamma": 0})
    torch.testing.assert_close(out.loss, engine.evaluate("bce_with_logits", x, t).loss)
    torch.testing.assert_close(out.grad, engine.evaluate("bce_with_logits", x, t).grad)


def test_focal_index_targets_mean_background(engine, gen):
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    idx = torch.tensor([0, 2, 3, 1])  # 3 = C = background
    dense = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(engine.evaluate("focal", x, idx).loss, engine.evaluate("focal", x, dense).loss)


def test_varifocal_and_quality_focal_hand(engine):
    x = torch.tensor([[0.4, -1.2]], dtype=torch.float64)
    q = torch.tensor([[0.7, 0.0]], dtype=torch.float64)
    s = torch.sigmoid(x)
    bce = -(q * torch.log(s) + (1 - q) * torch.log(1 - s))
    vfl = bce[0, 0] * 0.7 + bce[0, 1] * 0.75 * s[0, 1] ** 2
    assert engine.evaluate("varifocal", x, q).loss.item() == pytest.approx(vfl.item())
    qfl = (bce * (q - s).abs() ** 2).sum()
    assert engine.evaluate("quality_focal", x, q).loss.item() == pytest.approx(qfl.item())


def test_distribution_focal_hand(engine):
    x = torch.tensor([[0.1, 0.5, -0.3, 1.0], [0.1, 0.5, -0.3, 1.0]], dtype=torch.float64)
    logp = torch.log_softmax(x[0], 0)
    got = engine.evaluate("distribution_focal", x, [1.3, 3.0]).loss
    assert got[0].item() == pytest.approx(-(0.7 * logp[1] + 0.3 * logp[2]).item())
    assert got[1].item() == pytest.approx(-logp[3].item())  # y = B - 1: all weight on the last bin


def test_dice_and_tversky(engine):
    p = torch.tensor([[0.9, 0.2, 0.6]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    # 2*TP = 3.0, sum p = 1.7, sum t = 2 -> dice = 1 - (3 + 1) / (3.7 + 1)
    assert engine.evaluate("dice", p, t).loss.item() == pytest.approx(1 - 4 / 4.7)
    # alpha = beta = 0.5 with half the smoothing is Dice; alpha = beta = 1 is 1 - Jaccard (smooth -> 0)
    tv = engine.evaluate("tversky", p, t, params={"smooth": 0.5}).loss.item()
    assert tv == pytest.approx(1 - 4 / 4.7)
    tp, fp, fn = 1.5, 0.2, 0.5
    tj = engine.evaluate("tversky", p, t, params={"alpha": 1, "beta": 1, "smooth": 1e-9}).loss.item()
    assert tj == pytest.approx(1 - tp / (tp + fp + fn), rel=1e-6)


def test_margin_losses_match_torch(engine, gen):
    f = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.where(torch.rand(8, 3, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    torch.testing.assert_close(engine.evaluate("hinge", f, y).loss, (1 - y * f).clamp(min=0).sum(1))
    torch.testing.assert_close(engine.evaluate("perceptron", f, y).loss, (-y * f).clamp(min=0).sum(1))
    torch.testing.assert_close(engine.evaluate("exponential", f, y).loss, torch.exp(-y * f).sum(1))
    zero_as_neg = engine.evaluate("hinge", f, (y > 0).to(torch.float64)).loss
    torch.testing.assert_close(zero_as_neg, engine.evaluate("hinge", f, y).loss)
    he = F.hinge_embedding_loss(f, y, margin=1.0, reduction="none").sum(1)
    torch.testing.assert_close(engine.evaluate("hinge_embedding", f, y).loss, he)
    x = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    yr = y[:, 0]
    want = F.margin_ranking_loss(x[:, 0], x[:, 1], yr, margin=0.3, reduction="none")
    torch.testing.assert_close(engine.evaluate("margin_ranking", x, yr, params={"margin": 0.3}).loss, want)


def test_regression_losses(engine):
    pred = torch.tensor([[0.0, 1.0, 2.0, 5.0]], dtype=torch.float64)
    target = torch.tensor([[0.5, 1.0, 0.0, 1.0]], dtype=torch.float64)  # z = -0.5, 0, 2, 4
    cases = {
        "l1": 6.5, "l2": 0.5 * (0.25 + 4 + 16), "mse": 20.25,
        "smooth_l1": 0.125 + 1.5 + 3.5, "huber": 0.125 + 1.5 + 3.5,
        # q = 0.9: under-estimate (z_true = y - y_hat = 0.5) costs 0.45; over-estimates (2, 4) cost 0.1 each unit
        "quantile": 0.9 * 0.5 + 0.1 * 6,
    }
    for name, want in cases.items():
        params = {"q": 0.9} if name == "quantile" else {}
        assert engine.evaluate(name, pred, target, params=params).loss.item() == pytest.approx(want), name
    # huber(delta) = delta * smooth_l1(beta=delta)
    h = engine.evaluate("huber", pred, target, params={"delta": 3.0}).loss.item()
    s = engine.evaluate("smooth_l1", pred, target, params={"beta": 3.0}).loss.item()
    assert h == pytest.approx(3.0 * s)
    torch.testing.assert_close(engine.evaluate("mse", pred, target).loss,
                               F.mse_loss(pred, target, reduction="none").sum(1))


def test_balanced_l1_is_continuous_and_matches_formula(engine):
    alpha, gamma, beta = 0.5, 1.5, 1.0
    b = math.exp(gamma / alpha) - 1
    z = torch.tensor([0.3, 1 - 1e-9, 1 + 1e-9, 2.0], dtype=torch.float64)
    got = engine.evaluate("balanced_l1", z, torch.zeros(4, dtype=torch.float64)).loss
    inner = alpha / b * (b * 0.3 + 1) * math.log(b * 0.3 / beta + 1) - alpha * 0.3
    assert got[0].item() == pytest.approx(inner)
    assert got[1].item() == pytest.approx(got[2].item(), abs=1e-7)
    assert got[3].item() == pytest.approx(gamma * 2 + gamma / b - alpha * beta)
