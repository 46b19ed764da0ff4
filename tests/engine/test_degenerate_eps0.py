"""With eps = 0, which degenerate boxes have a CIoU and which are null (README: numerics). Hand-computed:
pred [0, 0, 10, 0] (zero height) against [0, 0, 10, 10]: IoU 0; centres (5, 0) and (5, 5), rho^2 = 25; enclosing
box 10 x 10, c^2 = 200; v = 4/pi^2 (atan(10/10) - atan(10/0))^2 = 4/pi^2 (pi/4 - pi/2)^2 = 1/4;
alpha = v / ((1 - IoU) + v) = 0.2; loss = 1 - 0 + 25/200 + 0.2 * 0.25 = 1.175. A 0 x 0 box has atan(0/0): NaN."""

import math

import numpy as np
import pytest


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("pred", [[0, 0, 10, 0], [0, 0, 0, 10]])
def test_one_zero_side_is_finite(engine, dtype, pred):
    r = engine.evaluate("ciou", np.array([pred], dtype=dtype), np.array([[0, 0, 10, 10]], dtype=dtype),
                        params={"eps": 0.0}, dtype=dtype)
    assert float(r.loss[0]) == pytest.approx(1.175, rel=1e-6)
    assert np.isfinite(r.grad.numpy()).all()


def test_zero_by_zero_is_nan(engine):
    r = engine.evaluate("ciou", np.array([[0.0, 0, 0, 0]]), np.array([[0.0, 0, 10, 10]]), params={"eps": 0.0},
                        dtype="float64")
    assert math.isnan(float(r.loss[0]))
