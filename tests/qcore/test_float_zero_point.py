"""The float zero point (``zero_point_kind="float"``: ``x ≈ q * scale + zero_point``) and its promises."""

import numpy as np
import pytest
from hypothesis import assume, given

from qcore import PerChannel, PerGroup, PerTensor, QuantizedArray, QuantScheme, dequantize, quantize
from qcore.params import QParams
from qcore.quantize import _layout, expand_params
from tests.qcore.test_quantize_properties import schemes_and_arrays


def _group_minmax(x: np.ndarray, scheme: QuantScheme):
    """Each group's min and max, in ``scheme.params_shape(x.shape)`` (plain NumPy, float64)."""
    x = x.astype(np.float64)
    kind, axis = _layout(x.shape, scheme)
    pshape = scheme.params_shape(x.shape)
    if kind == "tensor":
        return np.array(x.min()), np.array(x.max())
    if kind == "channel":
        m = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        return m.min(1).reshape(pshape), m.max(1).reshape(pshape)
    g = scheme.granularity.size
    m = np.moveaxis(x, axis, -1)
    m = m.reshape(m.shape[:-1] + (m.shape[-1] // g, g))
    return (np.moveaxis(m.min(-1), -1, axis).reshape(pshape), np.moveaxis(m.max(-1), -1, axis).reshape(pshape))


def _float_params(x, scheme):
    """Each group's range over the code range, offset by its minimum: the Q4_1 construction in float32."""
    lo, hi = _group_minmax(x, scheme)
    scale = ((hi - lo) / scheme.qmax).astype(np.float32)
    scale = np.where(scale > 0, scale, np.finfo(np.float32).tiny).astype(np.float32)
    return QParams(scale, lo.astype(np.float32), scheme, zero_point_kind="float")


@given(schemes_and_arrays(elements=None))
def test_float_zero_point_codes_dequantize_and_error_bound(case):
    x, scheme = case
    assume(not scheme.symmetric and x.size > 0)
    p = _float_params(x, scheme)
    qa = quantize(x, params=p)
    assert qa.zero_point_kind == "float" and qa.codes.dtype == np.uint8 and qa.zero_point.dtype == np.float32
    assert int(qa.codes.max()) <= scheme.qmax
    s = np.broadcast_to(expand_params(qa.scale, x.shape, scheme), x.shape)
    z = np.broadcast_to(expand_params(qa.zero_point, x.shape, scheme), x.shape)
    # dequantize is codes * scale + zero_point in float32, two roundings
    w = dequantize(qa)
    np.testing.assert_array_equal(w, (qa.codes.astype(np.float32) * s) + z)
    # within half a step of x, plus the float32 roundings of the division, the product and the sum; each of those
    # is relative (eps) or, among subnormals, absolute (half the smallest subnormal): a subnormal scale, rounded by
    # up to that, is off by up to qmax times it at the top code (which clipping then keeps)
    xf = x.astype(np.float64)
    eps = np.finfo(np.float32).eps
    tiny = 2.0 ** -149
    tol = (s.astype(np.float64) / 2 + 4 * eps * (np.abs(xf) + np.abs(z) + scheme.qmax * s.astype(np.float64))
           + (scheme.qmax + 4) * tiny)
    assert (np.abs(w.astype(np.float64) - xf) <= tol).all()
    # re-quantizing the dequantized values with the same parameters keeps the codes, wherever the step is not
    # lost in the rounding of the offset (a step below float32's resolution at |zero_point| collapses the grid)
    again = quantize(w, params=qa.params)
    sound = s.astype(np.float64) >= 64 * eps * (np.abs(z) + scheme.qmax * s.astype(np.float64))
    np.testing.assert_array_equal(again.codes[sound], qa.codes[sound])


def test_a_float_zero_point_need_not_put_zero_on_the_grid():
    x = np.array([[1.0, 1.5, 2.0, 2.5]], np.float32)
    p = QParams(np.array([[0.5]], np.float32), np.array([[1.0]], np.float32), QuantScheme(2, False, PerGroup(4)),
                zero_point_kind="float")
    qa = quantize(x, params=p)
    assert qa.codes.tolist() == [[0, 1, 2, 3]] and np.array_equal(dequantize(qa), x)
    assert "zero_point_kind='float'" in repr(qa)
    out = np.empty_like(x)
    assert dequantize(qa, out=out) is out and np.array_equal(out, x)
    assert dequantize(qa, dtype=np.float16).dtype == np.float16


@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(1), PerGroup(2, 0)])
def test_every_granularity_takes_a_float_zero_point(gran):
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    scheme = QuantScheme(4, False, gran)
    qa = quantize(x, params=_float_params(x, scheme))
    assert np.abs(dequantize(qa) - x).max() <= qa.scale.max() / 2 + 1e-6
    back = QuantizedArray.from_parts(qa.codes, qa.scale, qa.zero_point, scheme, zero_point_kind="float")
    assert np.array_equal(dequantize(back), dequantize(qa))


def test_float_zero_points_are_checked():
    scheme = QuantScheme(4, False, PerGroup(2))
    s = np.ones((1, 2), np.float32)
    with pytest.raises(ValueError, match="zero_point nan at index \\(0, 1\\) is not finite"):
        QParams(s, np.array([[0, np.nan]], np.float32), scheme, zero_point_kind="float").check((1, 4))
    with pytest.raises(ValueError, match="makes code 15 dequantize to inf"):
        QParams(s * 1e37, np.array([[3e38, 0]], np.float32), scheme, zero_point_kind="float").check((1, 4))
    with pytest.raises(TypeError, match=r"must be a float32 numpy.ndarray \(zero_point_kind='float'\), got uint8"):
        QParams(s, np.zeros((1, 2), np.uint8), scheme, zero_point_kind="float")
    with pytest.raises(ValueError, match="zero_point_kind 'float' needs an asymmetric scheme"):
        QParams(s, None, QuantScheme(4, True, PerGroup(2)), zero_point_kind="float")
    with pytest.raises(ValueError, match=r"zero_point must be float32 of shape \(1, 2\), got uint8"):
        QuantizedArray(np.zeros((1, 4), np.uint8), s, np.zeros((1, 2), np.uint8), scheme, "float")
    with pytest.raises(ValueError, match="zero_point .* is not finite"):
        QuantizedArray.from_parts(np.zeros((1, 4), np.uint8), s, np.array([[np.inf, 0]], np.float32), scheme,
                                  zero_point_kind="float")
    # an integer zero point is unchanged: uint8, in range
    with pytest.raises(TypeError, match="must be a uint8 numpy.ndarray, got float32"):
        QParams(s, np.zeros((1, 2), np.float32), scheme)
