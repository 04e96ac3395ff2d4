"""Error metrics and the prior-art function names."""

import math

import numpy as np
import pytest

from qcore import (PerChannel, QuantScheme, calculate_quantization_error, channel_linear_quantize, dequantize,
                   linear_quantize, quantization_error, quantize, quantize_symmetric, quantize_weight_per_channel)
from qcore import metrics


def test_known_values():
    x = np.array([1.0, -2.0, 3.0, 0.0])
    y = np.array([1.0, -1.0, 3.0, 1.0])
    assert metrics.mse(x, y) == 0.5
    assert metrics.max_abs_error(x, y) == 1.0
    assert metrics.mean_abs_error(x, y) == 0.5
    assert math.isclose(metrics.relative_error_pct(x, y), 100 * math.sqrt(2) / math.sqrt(14))
    assert math.isclose(metrics.sqnr_db(x, y), 10 * math.log10(14 / 2))
    d = quantization_error(x, y)
    assert set(d) >= {"max_abs_error", "mean_abs_error", "relative_error_pct", "snr_db"}
    assert d["snr_db"] == metrics.sqnr_db(x, y)


def test_nan_propagates_to_every_figure():
    x, y = np.array([1.0, 2.0, 3.0]), np.array([np.nan, 2.0, 2.0])
    d = quantization_error(x, y)
    assert all(math.isnan(d[k]) for k in ("max_abs_error", "mean_abs_error", "mse"))
    assert math.isnan(metrics.max_abs_error(np.r_[x, np.zeros(1 << 17)], np.r_[y, np.zeros(1 << 17)]))


def test_square_weights_prior_art_per_channel_is_per_output_channel():
    w = np.random.default_rng(2).standard_normal((4, 4)).astype(np.float32)
    w[0] *= 100  # one loud output channel: applying its scale on the wrong axis would show
    codes, scales = quantize_weight_per_channel(w)
    np.testing.assert_allclose(dequantize(codes, scales), w, atol=float(scales.max()) / 2 + 1e-6)
    assert calculate_quantization_error(w, codes, scales)["snr_db"] > 35
    for dim in (0, 1):
        s, z, q = channel_linear_quantize(w, dim=dim)
        np.testing.assert_allclose(dequantize(q, s, z), w, atol=float(s.max()) / 2 + 1e-5)


def test_edge_cases():
    z = np.zeros(3)
    assert metrics.sqnr_db(np.ones(3), np.ones(3)) == math.inf
    assert metrics.sqnr_db(z, np.ones(3)) == -math.inf
    assert metrics.relative_error_pct(z, z) == 0.0 and metrics.relative_error_pct(z, np.ones(3)) == math.inf
    assert metrics.mse(np.zeros(0), np.zeros(0)) == 0.0
    with pytest.raises(ValueError, match=r"shape \(3,\) but x_hat has shape \(2,\)"):
        metrics.mse(z, np.zeros(2))
    with pytest.raises(TypeError, match="real numeric"):
        metrics.mse(np.ones(2, np.complex64), np.ones(2))


def test_sqnr_grows_about_6db_per_bit():
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    s = [metrics.sqnr_db(x, dequantize(quantize(x, QuantScheme(b, True, PerChannel(0))))) for b in (4, 6, 8)]
    assert 10 < s[1] - s[0] < 14 and 10 < s[2] - s[1] < 14


def test_prior_art_names():
    w = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    codes, scale = quantize_symmetric(w)
    assert codes.dtype == np.int8 and scale.shape == () and np.isclose(scale, np.abs(w).max() / 127)
    codes, scales = quantize_weight_per_channel(w)
    assert scales.shape == (8,) and np.abs(codes).max() == 127
    err = calculate_quantization_error(w, codes, scales)
    assert err["snr_db"] > 35 and err["max_abs_error"] <= scales.max() / 2 + 1e-7
    for dtype, lo in ((np.int8, -128), (np.uint8, 0)):
        s, z, q = linear_quantize(w, dtype=dtype)
        assert q.dtype == dtype and q.min() == lo and s.shape == ()
        np.testing.assert_allclose(dequantize(q, s, z), w, atol=float(s) / 2 + 1e-7)
        for dim in (0, 1):
            s, z, q = channel_linear_quantize(w, dim=dim, dtype=dtype)
            assert s.shape == z.shape == ((8, 1) if dim == 0 else (1, 16))
            np.testing.assert_allclose(dequantize(q, s, z), w, atol=float(s.max()) / 2 + 1e-7)
    with pytest.raises(TypeError, match="np.int8 or np.uint8"):
        linear_quantize(w, dtype=np.int16)
