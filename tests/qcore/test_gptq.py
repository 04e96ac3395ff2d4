"""qcore.gptq: lower layer output error than min-max on correlated inputs, the format contract, determinism,
and the checks at the boundary."""

import hashlib

import numpy as np
import pytest

from qcore import PerChannel, PerGroup, PerTensor, QuantizedArray, QuantScheme, dequantize, quantize
from qcore.gptq import Hessian, gptq, refit_scales

SCHEMES = [QuantScheme(4, False, PerGroup(32, axis=1)), QuantScheme(4, True, PerGroup(16, axis=-1)),
           QuantScheme(3, False, PerChannel(0)), QuantScheme(4, True, PerTensor()), QuantScheme(8, True),
           QuantScheme(4, False, PerGroup(64, axis=1))]  # K = 96: a shorter last group of 32


def layer(n=48, k=96, samples=600, seed=0):
    """Correlated inputs (a random mixing of Gaussian features, a few of them large) and a weight."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.standard_normal((samples, k)) @ mix
    x[:, :4] *= 5  # outlier features, as activations have
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    return x, w


def out_error(x, w, qa):
    return float(np.linalg.norm(x @ (w.astype(np.float64) - dequantize(qa)).T))


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_lower_than_minmax(scheme, act_order):
    x, w = layer()
    qa = gptq(w, Hessian.of(x), scheme, act_order=act_order, block_size=20)
    assert out_error(x, w, qa) < 0.9 * out_error(x, w, quantize(w, scheme))


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_gptq_keeps_the_format_contract(scheme):
    x, w = layer(seed=1)
    qa = gptq(w, Hessian.of(x), scheme, act_order=True, params="mse")
    assert isinstance(qa, QuantizedArray) and qa.shape == w.shape and qa.codes.dtype == scheme.code_dtype
    again = QuantizedArray.from_parts(qa.codes, qa.scale, qa.zero_point, scheme)  # codes, zero points, grid
    deq = dequantize(again)
    assert np.all(np.isfinite(deq))
    # every code sits on its group's grid: rounding the dequantized weight with the same params gives it back
    np.testing.assert_array_equal(quantize(deq, params=qa.params).codes, qa.codes)


def test_block_size_changes_only_the_order_of_arithmetic():
    x, w = layer(seed=2)
    scheme = QuantScheme(4, False, PerGroup(32, axis=1))
    a = gptq(w, Hessian.of(x), scheme, block_size=7)  # groups straddle blocks: pending updates are applied
    b = gptq(w, Hessian.of(x), scheme, block_size=96)
    # the lazy updates add the same terms in another order: scales agree to float32 rounding, and at most a
    # few codes round the other way
    np.testing.assert_allclose(a.scale, b.scale, rtol=1e-5)
    assert np.mean(a.codes != b.codes) < 0.01


def digest(qa):
    h = hashlib.sha256(qa.codes.tobytes())
    h.update(qa.scale.tobytes())
    if qa.zero_point is not None:
        h.update(qa.zero_point.tobytes())
    return h.hexdigest()


def test_gptq_is_deterministic():
    x, w = layer(seed=3)
    h = Hessian.of(x)
    scheme = QuantScheme(4, False, PerGroup(32, axis=1))
    first = digest(gptq(w, h, scheme, act_order=True))
    assert all(digest(gptq(w, h.copy(), scheme, act_order=True)) == first for _ in range(3))


def test_inputs_are_left_untouched_and_dead_columns_become_zero():
    x, w = layer(seed=4)
    x[:, 5] = 0.0  # an input that is always zero: its column of w never matters
    h = Hessian.of(x)
    w0, h0 = w.copy(), h.copy()
    qa = gptq(w, h, QuantScheme(4, False, PerGroup(32, axis=1)), act_order=True)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(h, h0)
    assert np.all(dequantize(qa)[:, 5] == 0)


def test_hessian_accumulates_the_mean_in_batches():
    x, _ = layer(seed=5)
    acc = Hessian(x.shape[1])
    for part in np.array_split(x, 7):
        acc.add(part.astype(np.float32))
    np.testing.assert_allclose(acc.h, 2 * x.T @ x / len(x), rtol=1e-5, atol=1e-5)
    assert acc.count == len(x)


def test_bad_input_is_refused_by_name():
    x, w = layer()
    h = Hessian.of(x)
    s = QuantScheme(4, False, PerGroup(32, axis=1))
    with pytest.raises(ValueError, match=r"h must be a float \[K, K\] = \[96, 96\]"):
        gptq(w, h[:5, :5], s)
    with pytest.raises(ValueError, match=r"PerGroup\(size, axis=1\)"):
        gptq(w, h, QuantScheme(4, False, PerGroup(16, axis=0)))
    with pytest.raises(ValueError, match="damp must be"):
        gptq(w, h, s, damp=-1)
    with pytest.raises(ValueError, match="unknown params method 'nope'"):
        gptq(w, h, s, params="nope")
    bad = w.copy()
    bad[2, 3] = np.inf
    with pytest.raises(ValueError, match=r"index \(2, 3\)"):
        gptq(bad, h, s)
    with pytest.raises(ValueError, match=r"h\[0, 0\] = -1.0 < 0: not X\^T X of any inputs"):
        gptq(w, -np.eye(96), s, damp=0)
    with pytest.raises(ValueError, match=r"shape \[..., 96\]"):
        Hessian(96).add(np.ones((3, 5)))


@pytest.mark.parametrize("params", ["minmax", "mse"])
def test_with_uncorrelated_inputs_gptq_is_rounding_to_nearest_also_in_a_shorter_last_group(params):
    """H = I: no column's error can be compensated by another, so GPTQ rounds each group on the grid its params
    method gives it, as quantize does; K = 96 in groups of 64 leaves a last group of 32 columns."""
    _, w = layer(seed=6)
    scheme = QuantScheme(4, False, PerGroup(64, axis=1))
    qa = gptq(w, np.eye(96), scheme, params=params, block_size=40)
    want = quantize(w, scheme, params=params)
    assert qa.scale.shape == want.scale.shape == (48, 2)
    np.testing.assert_array_equal(qa.codes, want.codes)
    np.testing.assert_array_equal(qa.scale, want.scale)
    np.testing.assert_array_equal(qa.zero_point, want.zero_point)


def test_add_gram_is_add_of_the_rows():
    x, _ = layer(seed=7)
    a, b = Hessian(96), Hessian(96)
    for part in np.array_split(x, 3):
        a.add(part)
        b.add_gram(part.T @ part, len(part))
    np.testing.assert_array_equal(a.h, b.h)
    assert a.count == b.count == len(x)
    with pytest.raises(ValueError, match=r"xtx must be a float \[96, 96\] matrix"):
        b.add_gram(np.ones((3, 3)), 3)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        b.add_gram(np.eye(96), -1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        b.add_gram(np.full((96, 96), np.nan), 1)


def test_a_params_method_with_a_float_zero_point_is_refused_by_name(monkeypatch):
    from qcore import params as qparams
    from qcore.params import QParams

    def offset_grid(x, scheme):  # x ~ q * scale + min: a float zero point, as GGUF's Q4_1
        lo, hi = x.min(axis=-1), x.max(axis=-1)  # per row: the per-channel grid gptq asks for
        scale = np.maximum((hi - lo) / scheme.qmax, 1e-8).astype(np.float32)
        return QParams(scale, lo.astype(np.float32), scheme, zero_point_kind="float")

    monkeypatch.setitem(qparams._METHODS, "test-offset", offset_grid)
    x, w = layer()
    with pytest.raises(ValueError, match="params method 'test-offset' gives a float zero point"):
        gptq(w, Hessian.of(x), QuantScheme(4, False, PerGroup(32, axis=1)), params="test-offset")


def row_errors(w, h, qa, damp):
    """Each row's ``(w - dq)^T H' (w - dq)`` with ``H'`` dampened as gptq and refit_scales dampen it."""
    hd = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    e = w.astype(np.float64) - dequantize(qa)
    return np.einsum("rk,rk->r", e @ hd, e)


REFIT_SCHEMES = [QuantScheme(4, False, PerGroup(32, axis=1)), QuantScheme(4, True, PerGroup(16, axis=1)),
                 QuantScheme(3, False, PerChannel(0)), QuantScheme(4, False, PerGroup(64, axis=1))]


@pytest.mark.parametrize("scheme", REFIT_SCHEMES, ids=str)
@pytest.mark.parametrize("damp", [0.0, 0.1])
def test_refit_never_raises_a_rows_output_error_and_keeps_codes_and_zero_points(scheme, damp):
    x, w = layer(seed=8)
    h = Hessian.of(x)
    for qa in (quantize(w, scheme), quantize(w, scheme, params="mse"),
               gptq(w, h, scheme, damp=0.1, act_order=True, params="mse")):
        fit = refit_scales(w, h, qa, damp=damp)
        before, after = row_errors(w, h, qa, damp), row_errors(w, h, fit, damp)
        assert np.all(after <= before * (1 + 1e-9))
        assert np.sum(after) < 0.99 * np.sum(before)  # and it does fit: the grids were chosen without H
        np.testing.assert_array_equal(fit.codes, qa.codes)
        if qa.zero_point is not None:
            np.testing.assert_array_equal(fit.zero_point, qa.zero_point)
        assert fit.scale.shape == qa.scale.shape and fit.scale.dtype == np.float32 and np.all(fit.scale > 0)


def test_refit_is_the_least_squares_scale_of_a_single_group():
    """One group per row, H = I: the best scale of fixed codes c is (c . w) / (c . c)."""
    _, w = layer(seed=9)
    scheme = QuantScheme(4, True, PerChannel(0))
    qa = quantize(w, scheme)
    c = qa.codes.astype(np.float64)
    want = np.sum(c * w, axis=1) / np.sum(c * c, axis=1)
    np.testing.assert_allclose(refit_scales(w, np.eye(96), qa, damp=0.0).scale, want, rtol=1e-6)


def test_refit_keeps_the_scale_of_a_group_that_is_all_zero_point():
    x, w = layer(seed=10)
    w[3] = 0.0  # a zero row: every code is its zero point, no scale fits better than another
    w[5, :32] = 0.0  # one zero group in a row whose other groups are refitted
    scheme = QuantScheme(4, False, PerGroup(32, axis=1))
    plain = quantize(w, scheme)  # gptq would move compensation into the zero group
    qa = refit_scales(w, Hessian.of(x), plain)
    np.testing.assert_array_equal(qa.scale[3], plain.scale[3])
    assert qa.scale[5, 0] == plain.scale[5, 0] and np.all(dequantize(qa)[3] == 0) and np.all(qa.scale > 0)
    assert not np.array_equal(qa.scale[5, 1:], plain.scale[5, 1:])


def test_gptq_with_refit_lowers_the_output_error_and_is_deterministic():
    x, w = layer(seed=11)
    h = Hessian.of(x)
    scheme = QuantScheme(4, False, PerGroup(32, axis=1))
    plain = gptq(w, h, scheme, damp=0.1, act_order=True)
    fit = gptq(w, h, scheme, damp=0.1, act_order=True, refit=True)
    assert np.all(row_errors(w, h, fit, 0.1) <= row_errors(w, h, plain, 0.1))
    assert out_error(x, w, fit) < out_error(x, w, plain)
    first = digest(fit)
    assert all(digest(gptq(w, h.copy(), scheme, damp=0.1, act_order=True, refit=True)) == first for _ in range(2))


def test_refit_refuses_bad_input_by_name():
    x, w = layer()
    h = Hessian.of(x)
    qa = quantize(w, QuantScheme(4, False, PerGroup(32, axis=1)))
    with pytest.raises(ValueError, match=r"w must be 2-D \[N, K\] with qa's shape \(48, 96\)"):
        refit_scales(w[:, :64], h, qa)
    with pytest.raises(ValueError, match=r"h must be a finite float \[K, K\] = \[96, 96\]"):
        refit_scales(w, h[:4, :4], qa)
    with pytest.raises(ValueError, match="damp must be"):
        refit_scales(w, h, qa, damp=np.nan)
    with pytest.raises(TypeError, match="qa must be a qcore.QuantizedArray"):
        refit_scales(w, h, dequantize(qa))
    with pytest.raises(ValueError, match="PerTensor"):
        refit_scales(w, h, quantize(w, QuantScheme(4, True, PerTensor())))
    with pytest.raises(TypeError, match="refit must be a bool"):
        gptq(w, h, QuantScheme(4, False, PerGroup(32, axis=1)), refit=1)


def test_weighted_clipping_with_uncorrelated_inputs_is_the_weighted_search_of_each_group():
    """H diagonal: nothing to compensate, so gptq(weighted=True) rounds each group on the clipping that
    qcore.search.weighted_mse_params picks with weights diag(H)."""
    from qcore.search import weighted_mse_params

    _, w = layer(seed=12)
    d = np.random.default_rng(12).gamma(0.5, size=96) + 0.01
    scheme = QuantScheme(4, False, PerGroup(32, axis=1))
    qa = gptq(w, np.diag(d), scheme, params="mse", weighted=True, damp=0.0)
    want = quantize(w, params=weighted_mse_params(w, d, scheme))
    np.testing.assert_array_equal(qa.scale, want.scale)
    np.testing.assert_array_equal(qa.codes, want.codes)
    assert not np.array_equal(qa.scale, quantize(w, scheme, params="mse").scale)
    with pytest.raises(ValueError, match="weighted=True weighs the clippings of params='mse'"):
        gptq(w, np.diag(d), scheme, params="minmax", weighted=True)


@pytest.mark.parametrize("h, match", [
    (np.zeros((64, 64)), "h is all zero on its diagonal: the layer's recorded inputs are all zero, or none"),
    (Hessian(64).h, "h is all zero on its diagonal"),  # nothing added
    (-np.eye(64), r"h\[0, 0\] = -1.0 < 0: not X\^T X of any inputs"),
])
def test_a_hessian_without_inputs_is_refused_not_a_weight_of_zeros(h, match):
    """Every column of an empty Hessian counts as never fed, so the whole weight came back 0 without a word."""
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        gptq(w, h, QuantScheme(4, False, PerGroup(32)))


def test_float64_weights_beyond_float32_are_named_as_quantize_names_them():
    w = np.full((2, 64), 1.0)
    w[1, 3] = 1e39
    with pytest.raises(ValueError, match=r"w contains 1e\+39 at index \(1, 3\), beyond the float32 range"):
        gptq(w, np.eye(64), QuantScheme(4, False, PerGroup(32)))
