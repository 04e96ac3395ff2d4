"""The promises of docs/numerics.md, as properties over random shapes, axes, bits, modes and granularities.

The strategies and the promise checks live in ``qcore.testing`` (the same suite other quantizers can run)."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qcore import PerChannel, PerGroup, QuantScheme, dequantize, fake_quantize, quantize
from qcore.testing import PROMISES, adapters
from qcore.testing.conformance import run_check
from qcore.testing.strategies import F32_MAX, expand as _expand, extreme_groups, schemes_and_arrays
from tests.qcore.reference import compute_view, ref_dequantize, ref_quantize

@given(schemes_and_arrays())
def test_kernels_equal_numpy_reference_bit_for_bit(case):
    x, scheme = case
    qa = quantize(x, scheme)
    codes, scale, zp = ref_quantize(x, scheme)
    assert qa.codes.dtype == scheme.code_dtype and qa.codes.shape == x.shape
    np.testing.assert_array_equal(qa.codes, codes)
    np.testing.assert_array_equal(qa.scale, scale)
    if scheme.symmetric:
        assert qa.zero_point is None
    else:
        np.testing.assert_array_equal(qa.zero_point, zp)
    np.testing.assert_array_equal(dequantize(qa), ref_dequantize(codes, scale, zp, scheme))


@given(schemes_and_arrays())
def test_round_trip_error_within_half_a_step(case):
    x, scheme = case
    qa = quantize(x, scheme)
    xf = compute_view(x).astype(np.float64)
    err = np.abs(xf - dequantize(qa).astype(np.float64))
    step = _expand(qa.scale, x.shape, scheme).astype(np.float64)
    # float32 slack: one rounding in the division, one in the product
    assert np.all(err <= step / 2 * (1 + 1e-6) + np.abs(xf) * 2e-7), float(np.max(err - step / 2))
    assert np.all((qa.codes >= scheme.qmin) & (qa.codes <= scheme.qmax))


@given(schemes_and_arrays())
def test_requantizing_the_dequantized_values_gives_the_same_codes(case):
    x, scheme = case
    qa = quantize(x, scheme)
    y = dequantize(qa).astype(np.float64)
    s = _expand(qa.scale, x.shape, scheme).astype(np.float64)
    z = 0 if qa.zero_point is None else _expand(qa.zero_point, x.shape, scheme).astype(np.float64)
    again = np.clip(np.rint(y / s) + z, scheme.qmin, scheme.qmax)
    np.testing.assert_array_equal(again, qa.codes)


@given(schemes_and_arrays())
def test_zero_is_exact(case):
    x, scheme = case
    assume(x.size > 0)
    x = x.copy()
    x.reshape(-1)[:: max(1, x.size // 3)] = 0  # some zeros in most groups
    y = dequantize(quantize(x, scheme))
    assert np.all(y[compute_view(x) == 0] == 0)


@given(schemes_and_arrays(), st.sampled_from(["transpose", "reverse", "slice"]))
def test_strided_views_equal_their_contiguous_copy(case, how):
    x, scheme = case
    if how == "transpose":
        v = x.T
        # transposing moves the axis: mirror it so the scheme means the same data
        g = scheme.granularity
        if isinstance(g, PerChannel):
            g = PerChannel(x.ndim - 1 - g.axis % x.ndim)
        elif isinstance(g, PerGroup):
            g = PerGroup(g.size, x.ndim - 1 - g.axis % x.ndim)
        scheme = QuantScheme(scheme.bits, scheme.symmetric, g)
    elif how == "reverse":
        v = x[..., ::-1]
    else:
        v = np.repeat(x, 2, axis=0)[::2]
    a, b = quantize(v, scheme), quantize(np.ascontiguousarray(v), scheme)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)
    if not scheme.symmetric:
        np.testing.assert_array_equal(a.zero_point, b.zero_point)


@given(schemes_and_arrays())
def test_fake_quantize_keeps_dtype_and_equals_dequantize(case):
    x, scheme = case
    y = fake_quantize(x, scheme)
    assert y.dtype == x.dtype and y.shape == x.shape
    w = dequantize(quantize(x, scheme))
    if x.dtype.itemsize == 2:  # past the 16-bit range: its largest finite value
        top = float(ml_dtypes.finfo(x.dtype).max)
        w = np.clip(w, -top, top)
    np.testing.assert_array_equal(y, w.astype(x.dtype))


@settings(max_examples=60)
@given(st.sampled_from([np.float16, ml_dtypes.bfloat16]), st.integers(2, 8), st.booleans(),
       st.sampled_from([PerChannel(0), PerGroup(16)]), st.floats(0.25, 1.0), st.integers(0, 2 ** 32 - 1))
def test_fake_quantize_of_finite_16_bit_data_near_its_maximum_is_finite_within_half_a_step(dtype, bits, symmetric,
                                                                                          granularity, reach, seed):
    """An asymmetric grid's integer zero point shifts it up to half a step past the data: float16 data near 65504
    gave inf (and bfloat16 near 3.4e38). The grid point past the range now saturates, which only nears the data."""
    top = float(ml_dtypes.finfo(dtype).max)
    rng = np.random.default_rng(seed)
    x = (rng.uniform(-1, 1, (4, 32)) * top * reach).astype(dtype)
    x[:, 0] = dtype(top * reach)  # every row and group reaches out to the top
    scheme = QuantScheme(bits, symmetric, granularity)
    y = fake_quantize(x, scheme).astype(np.float64)
    assert np.all(np.isfinite(y))
    step = _expand(quantize(x, scheme).scale, x.shape, scheme).astype(np.float64)
    xf = x.astype(np.float64)
    # docs/numerics.md's one exception: an asymmetric group spanning more than float32 max is bound by one step
    groups = xf.reshape(4, 1, 32) if isinstance(granularity, PerChannel) else xf.reshape(4, 2, 16)
    span = np.maximum(groups.max(-1), 0) - np.minimum(groups.min(-1), 0)
    wide = np.repeat((span > F32_MAX) & (not symmetric), groups.shape[-1], axis=-1).reshape(x.shape)
    half = np.where(wide, step, step / 2)
    bound = half * (1 + 1e-6) + np.abs(y) * float(ml_dtypes.finfo(dtype).eps)  # and the 16-bit rounding
    assert np.all(np.abs(xf - y) <= bound)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, ml_dtypes.bfloat16])
def test_other_output_dtypes(dtype):
    x = np.linspace(-3, 3, 64, dtype=np.float32).reshape(4, 16)
    qa = quantize(x, QuantScheme(4, False, PerGroup(8)))
    y = dequantize(qa, dtype=dtype)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y, dequantize(qa).astype(dtype))


@given(extreme_groups())
def test_error_bound_at_the_float32_extremes(case):
    """The exact bound: half a step, unless an asymmetric group spans more than float32 max; then one step.

    Such a group's grid is shrunk so that every code dequantizes to a finite float32, and an integer zero point
    (0.0 exact) cannot centre it, so the far end is clipped by up to one step.
    """
    x, scheme = case
    qa = quantize(x, scheme)
    y = dequantize(qa).astype(np.float64)
    assert np.all(np.isfinite(y))
    xf = x.astype(np.float64)
    err, step = np.abs(xf - y), float(qa.scale)
    span = max(float(xf.max()), 0.0) - min(float(xf.min()), 0.0)
    bound = step / 2 if scheme.symmetric or span <= F32_MAX else step
    assert np.all(err <= bound * (1 + 1e-6) + np.abs(xf) * 2e-7), (float(np.max(err)) / step, span)


@pytest.mark.parametrize("promise", list(PROMISES))
def test_qcore_keeps_every_promise_of_the_conformance_suite(promise):
    """Every promise of ``qcore.testing``, on subnormals to the float32 maximum, ties, all-zero groups and views."""
    subject = adapters.qcore_packer() if promise in ("packing", "bit_order") else adapters.qcore_quantizer()
    result = run_check(promise, subject, max_examples=settings().max_examples)
    assert result.passed, f"{result.message}\ninput: {result.counterexample}"
