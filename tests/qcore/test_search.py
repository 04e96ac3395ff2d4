"""The "mse" params method (qcore.search): never worse than min-max per group, the format contract, and
identical bytes for a fixed input."""

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings

from qcore import (PerChannel, PerGroup, PerTensor, QuantizedArray, QuantScheme, compute_qparams, dequantize,
                   params_methods, quantize)
from tests.qcore.reference import compute_view, grouped
from tests.qcore.test_quantize_properties import schemes_and_arrays


def group_errors(x, qa):
    """Squared error of each group of ``qa.scheme``, in float64."""
    e = (dequantize(qa).astype(np.float64) - compute_view(x).astype(np.float64)) ** 2
    g, axes = grouped(e, qa.scheme)
    return g.sum(axis=axes) if axes else g


def test_mse_is_registered():
    assert "mse" in params_methods()


@settings(max_examples=300)
@given(schemes_and_arrays())
def test_mse_never_has_a_larger_group_error_than_minmax(case):
    x, scheme = case
    mse, minmax = quantize(x, scheme, params="mse"), quantize(x, scheme)
    e_mse, e_minmax = group_errors(x, mse), group_errors(x, minmax)
    assert e_mse.shape == e_minmax.shape
    # the search scores candidates in its own summation order: equal up to a few ulps of the sum
    assert np.all(e_mse <= e_minmax * (1 + 1e-9)), (e_mse, e_minmax)


@given(schemes_and_arrays())
def test_mse_keeps_the_format_contract(case):
    x, scheme = case
    qa = quantize(x, scheme, params="mse")
    assert isinstance(qa, QuantizedArray) and qa.codes.dtype == scheme.code_dtype and qa.shape == x.shape
    assert qa.scale.shape == scheme.params_shape(x.shape)
    # from_parts checks codes in qmin..qmax, zero points in range, finite scales > 0 whose grid stays finite
    again = QuantizedArray.from_parts(qa.codes, qa.scale, qa.zero_point, scheme)
    assert np.all(np.isfinite(dequantize(again)))
    if x.size:
        assert qa.codes.min() >= scheme.qmin and qa.codes.max() <= scheme.qmax
    # the parameters are those compute_qparams gives, and rounding with them gives the same codes
    p = compute_qparams(x, scheme, method="mse")
    np.testing.assert_array_equal(p.scale, qa.scale)
    np.testing.assert_array_equal(quantize(x, params=p).codes, qa.codes)


def gaussian(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("scheme", [QuantScheme(4, False, PerGroup(128)), QuantScheme(4, True, PerGroup(64)),
                                    QuantScheme(3, False, PerChannel(0)), QuantScheme(4, True, PerTensor())])
def test_mse_lowers_the_error_of_gaussian_weights(scheme):
    w = gaussian((64, 256))
    e_mse = group_errors(w, quantize(w, scheme, params="mse")).sum()
    e_minmax = group_errors(w, quantize(w, scheme)).sum()
    assert e_mse < 0.93 * e_minmax


def test_a_group_minmax_rounds_exactly_keeps_its_minmax_grid():
    # each row is exactly the 4-bit grid of its range (which includes 0)
    x = np.stack([np.arange(16), np.arange(16) * -0.25]).astype(np.float32)
    scheme = QuantScheme(4, False, PerChannel(0))
    qa = quantize(x, scheme, params="mse")
    np.testing.assert_array_equal(qa.scale, quantize(x, scheme).scale)
    np.testing.assert_array_equal(dequantize(qa), x)


def test_an_outlier_is_clipped():
    # one large value among small ones: min-max spends the grid on the outlier, mse clips it
    x = np.concatenate([np.linspace(-1, 1, 63), [8.0]]).astype(np.float32).reshape(1, 64)
    scheme = QuantScheme(4, True, PerChannel(0))
    mm, mse = quantize(x, scheme), quantize(x, scheme, params="mse")
    assert mse.scale[0] < mm.scale[0]
    assert group_errors(x, mse).sum() < 0.85 * group_errors(x, mm).sum()


def test_empty_and_all_zero_groups_get_the_minmax_convention():
    scheme = QuantScheme(4, False, PerGroup(4))
    for x in (np.zeros((3, 0), np.float32), np.zeros((2, 8), np.float32)):
        a, b = quantize(x, scheme, params="mse"), quantize(x, scheme)
        np.testing.assert_array_equal(a.scale, b.scale)
        np.testing.assert_array_equal(a.zero_point, b.zero_point)
        np.testing.assert_array_equal(a.codes, b.codes)


def test_bad_input_is_refused_by_name():
    x = np.ones((2, 8), np.float32)
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN and Inf cannot be quantized"):
        quantize(x, QuantScheme(4, False, PerGroup(4)), params="mse")


def test_a_ragged_last_group_gets_its_own_search():
    """Group size 4 on rows of 6: two groups, the last of 2 values, each clipped on its own and never worse than
    min-max."""
    x = np.random.default_rng(5).standard_normal((3, 6)).astype(np.float32)
    x[:, 4:] *= 40  # the short group's own range
    s = QuantScheme(4, False, PerGroup(4))
    a, b = quantize(x, s, params="mse"), quantize(x, s)
    assert a.scale.shape == (3, 2)
    for j, cols in enumerate((slice(0, 4), slice(4, 6))):
        err = lambda qa: ((dequantize(qa)[:, cols] - x[:, cols]) ** 2).sum(axis=1)
        assert np.all(err(a) <= err(b))
        one = quantize(np.ascontiguousarray(x[:, cols]), QuantScheme(4, False, PerGroup(cols.stop - cols.start)),
                       params="mse")
        np.testing.assert_array_equal(a.scale[:, j], one.scale[:, 0])


PINNED = "0e04dc19c5be6990d4d11efd881ccdb9a751d08d3b9bde170130824d559a2ccf"


def fixed_input():
    i = np.arange(48 * 256, dtype=np.float64)
    return (np.sin(i * 0.37) * np.cos(i * 0.011) * 3).astype(np.float32).reshape(48, 256)


def digest(qa):
    h = hashlib.sha256(qa.packed().tobytes())
    h.update(qa.scale.tobytes())
    if qa.zero_point is not None:
        h.update(qa.zero_point.tobytes())
    return h.hexdigest()


def test_a_fixed_input_gives_identical_bytes_on_any_thread_count(threads):
    x, scheme = fixed_input(), QuantScheme(4, False, PerGroup(32))
    threads(1)
    one = digest(quantize(x, scheme, params="mse"))
    threads(2)
    assert digest(quantize(x, scheme, params="mse")) == one
    assert digest(quantize(x, scheme, params="mse")) == one
    # pinned: the search's arithmetic is IEEE division, rint and float32 products, the same on every machine
    assert one == PINNED


# --- weighted_mse_params: the clipping scored with per-column weights (gptq's weighted=True) ---------------------

from qcore.search import weighted_mse_params  # noqa: E402

WEIGHTED_SCHEMES = [QuantScheme(4, False, PerGroup(32, axis=1)), QuantScheme(4, True, PerGroup(16, axis=1)),
                    QuantScheme(3, False, PerChannel(0)), QuantScheme(4, False, PerGroup(40, axis=1))]  # 40: ragged


def weighted_group_errors(x, weights, qa, g):
    e = (dequantize(qa).astype(np.float64) - x.astype(np.float64)) ** 2 * weights
    return np.add.reduceat(e, np.arange(0, x.shape[1], g), axis=1)


@pytest.mark.parametrize("scheme", WEIGHTED_SCHEMES, ids=str)
def test_weighted_mse_never_has_a_larger_weighted_group_error_than_minmax(scheme):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 96)) * rng.gamma(1.0, size=96)).astype(np.float32)
    weights = rng.gamma(0.5, size=96)  # a few columns matter much more than the rest
    g = getattr(scheme.granularity, "size", 96)
    wq = quantize(x, params=weighted_mse_params(x, weights, scheme))
    e_w = weighted_group_errors(x, weights, wq, g)
    assert np.all(e_w <= weighted_group_errors(x, weights, quantize(x, scheme), g) * (1 + 1e-9))
    # it optimises what it is asked to: a lower weighted error than the unweighted search, which it equals with
    # equal weights
    assert e_w.sum() < weighted_group_errors(x, weights, quantize(x, scheme, params="mse"), g).sum()
    same = weighted_mse_params(x, np.full(96, 2.0), scheme)
    np.testing.assert_array_equal(same.scale, compute_qparams(x, scheme, method="mse").scale)


def test_weighted_mse_refuses_bad_input_by_name():
    x = gaussian((4, 32))
    s = QuantScheme(4, False, PerGroup(16, axis=1))
    with pytest.raises(ValueError, match=r"weights must be 32 finite numbers >= 0"):
        weighted_mse_params(x, np.ones(31), s)
    with pytest.raises(ValueError, match=r"weights must be 32 finite numbers >= 0"):
        weighted_mse_params(x, -np.ones(32), s)
    with pytest.raises(ValueError, match=r"x must be a finite float32/float64 \[N, K\] array"):
        weighted_mse_params(x[0], np.ones(32), s)
    with pytest.raises(ValueError, match=r"PerChannel\(0\) or PerGroup\(size, axis=1\)"):
        weighted_mse_params(x, np.ones(32), QuantScheme(4, False, PerGroup(2, axis=0)))
