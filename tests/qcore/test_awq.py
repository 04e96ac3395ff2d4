"""qcore.awq: activation-aware scales chosen from a Hessian, never a larger output error than plain rounding."""

import numpy as np
import pytest

from qcore import PerChannel, PerGroup, QuantScheme, dequantize, quantize
from qcore.awq import awq_scales, output_error


def case(seed, k=64, loud=4):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((800, k)) * np.where(np.arange(k) < loud, 15.0, 1.0)
    h = 2 * x.T @ x / len(x)
    ws = [rng.standard_normal((n, k)).astype(np.float32) for n in (32, 16)]
    return h, ws


def scaled_error(ws, h, s, scheme):
    return sum(output_error(w, dequantize(quantize(w * s, scheme)) / s.astype(np.float64), h) for w in ws)


@pytest.mark.parametrize("scheme", [QuantScheme(4, False, PerGroup(32, axis=1)), QuantScheme(3, True, PerChannel(0))],
                         ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_awq_scales_never_give_a_larger_output_error_than_plain_rounding(scheme, seed):
    h, ws = case(seed)
    s, alpha = awq_scales(ws, h, scheme)
    assert s.shape == (64,) and s.dtype == np.float32 and np.all(s > 0) and 0 <= alpha <= 1
    plain = sum(output_error(w, dequantize(quantize(w, scheme)), h) for w in ws)
    assert scaled_error(ws, h, s, scheme) <= plain
    assert alpha > 0 and scaled_error(ws, h, s, scheme) < 0.95 * plain  # loud inputs: scaling pays


def test_equal_inputs_need_no_scales_and_dead_inputs_get_a_positive_one():
    _, ws = case(3)
    s, alpha = awq_scales(ws, 2 * np.eye(64), QuantScheme(4, False, PerGroup(32, axis=1)))
    assert np.all(s == 1)  # every alpha gives s = 1: the first, alpha = 0, is kept
    h, ws = case(4)
    h[5, :] = h[:, 5] = 0.0  # an input that is always zero
    s, alpha = awq_scales(ws, h, QuantScheme(4, False, PerGroup(32, axis=1)))
    assert np.all(np.isfinite(s)) and np.all(s > 0)


def test_bad_input_is_refused_by_name():
    h, ws = case(5)
    s = QuantScheme(4, False, PerGroup(32, axis=1))
    with pytest.raises(ValueError, match=r"weights\[1\] must be \[N, 64\]"):
        awq_scales([ws[0], ws[1][:, :8]], h, s)
    with pytest.raises(ValueError, match="weights is empty"):
        awq_scales([], h, s)
    with pytest.raises(ValueError, match=r"h must be a finite float \[K, K\]"):
        awq_scales(ws, h[:3], s)
    with pytest.raises(ValueError, match="grid must be a positive int"):
        awq_scales(ws, h, s, grid=0)
    with pytest.raises(TypeError, match="scheme must be a qcore.QuantScheme"):
        awq_scales(ws, h, "w4a16")
