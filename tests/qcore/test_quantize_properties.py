"""The promises of docs/numerics.md, as properties over random shapes, axes, bits, modes and granularities."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcore import PerChannel, PerGroup, PerTensor, QuantScheme, dequantize, fake_quantize, quantize
from tests.qcore.reference import compute_view, ref_dequantize, ref_quantize

DTYPES = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16]


@st.composite
def schemes_and_arrays(draw, max_rank=3, elements=None):
    rank = draw(st.integers(1, max_rank))
    shape = list(draw(hnp.array_shapes(min_dims=rank, max_dims=rank, min_side=0, max_side=9)))
    bits = draw(st.integers(1, 8))
    symmetric = bits > 1 and draw(st.booleans())
    kind = draw(st.sampled_from(["tensor", "channel", "group"]))
    axis = draw(st.integers(-rank, rank - 1))
    if kind == "tensor":
        gran = PerTensor()
    elif kind == "channel":
        gran = PerChannel(axis)
    else:
        size = draw(st.sampled_from([1, 2, 3, 4, 8]))
        shape[axis] = size * draw(st.integers(0, 4))
        gran = PerGroup(size, axis)
    dtype = draw(st.sampled_from(DTYPES))
    if elements is None:
        scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]))
        elements = st.floats(-1, 1, width=32).map(lambda v: v * scale)
    data = draw(hnp.arrays(np.float64, tuple(shape), elements=elements))
    with np.errstate(over="ignore"):  # 1e30 does not fit float16: such draws are discarded just below
        x = data.astype(dtype)
    assume(np.all(np.isfinite(x.astype(np.float64))))
    return x, QuantScheme(bits, symmetric, gran)


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


def _expand(params, x_shape, scheme):
    """Broadcast per-group parameters back to the element shape."""
    g = scheme.granularity
    if isinstance(g, PerTensor):
        return np.broadcast_to(params, x_shape)
    if isinstance(g, PerChannel):
        axis = g.axis % len(x_shape)
        return np.broadcast_to(params.reshape([-1 if i == axis else 1 for i in range(len(x_shape))]), x_shape)
    return np.repeat(params, g.size, axis=g.axis)


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
    np.testing.assert_array_equal(y, dequantize(quantize(x, scheme)).astype(x.dtype))


@pytest.mark.parametrize("dtype", [np.float16, np.float64, ml_dtypes.bfloat16])
def test_other_output_dtypes(dtype):
    x = np.linspace(-3, 3, 64, dtype=np.float32).reshape(4, 16)
    qa = quantize(x, QuantScheme(4, False, PerGroup(8)))
    y = dequantize(qa, dtype=dtype)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y, dequantize(qa).astype(dtype))


F32_MAX = float(np.finfo(np.float32).max)


@st.composite
def extreme_groups(draw):
    """Per-tensor schemes on values anywhere up to +-float32 max, ranges wider than float32 can hold included."""
    bits = draw(st.integers(1, 8))
    symmetric = bits > 1 and draw(st.booleans())
    ends = st.floats(0, 1).map(lambda u: u * F32_MAX)
    lo, hi = -draw(ends), draw(ends)
    fill = st.floats(0, 1).map(lambda u: lo + u * (hi - lo))
    x = np.array([lo, hi] + draw(st.lists(fill, max_size=6)), np.float32)
    return x, QuantScheme(bits, symmetric, PerTensor())


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
