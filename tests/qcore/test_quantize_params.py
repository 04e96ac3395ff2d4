"""The params step apart from rounding: compute_qparams -> QParams -> quantize(x, params=...), the registry of
params methods, and the checks on given parameters."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qcore.params as qparams
from qcore import (PerChannel, PerGroup, PerTensor, QParams, QuantScheme, compute_qparams, dequantize, fake_quantize,
                   params_methods, quantize, register_params_method)
from tests.qcore.reference import compute_view, ref_quantize, ref_quantize_given
from tests.qcore.test_quantize_properties import _expand, schemes_and_arrays

F32_MAX = float(np.finfo(np.float32).max)


def assert_same(a, b):
    assert a.scheme == b.scheme and a.codes.dtype == b.codes.dtype
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)
    if a.scheme.symmetric:
        assert a.zero_point is None and b.zero_point is None
    else:
        np.testing.assert_array_equal(a.zero_point, b.zero_point)


# --- minmax params, given back, equal the fused pass ------------------------------------------------------

@given(schemes_and_arrays())
def test_quantize_with_computed_params_equals_the_fused_pass(case):
    x, scheme = case
    p = compute_qparams(x, scheme)
    assert isinstance(p, QParams) and p.scheme == scheme and p.zero_point_kind == "int"
    assert_same(quantize(x, params=p), quantize(x, scheme))
    assert_same(quantize(x, scheme, params=p), quantize(x, scheme, params="minmax"))


@given(schemes_and_arrays())
def test_minmax_params_equal_the_numpy_reference(case):
    x, scheme = case
    _, scale, zp = ref_quantize(x, scheme)
    p = compute_qparams(x, scheme, method="minmax")
    np.testing.assert_array_equal(p.scale, scale)
    if scheme.symmetric:
        assert p.zero_point is None
    else:
        np.testing.assert_array_equal(p.zero_point, zp)


# --- arbitrary valid params ------------------------------------------------------------------------------

@st.composite
def arrays_with_params(draw):
    """An array, a scheme, and valid parameters unrelated to the data: some values fall outside the grid."""
    x, scheme = draw(schemes_and_arrays())
    pshape = scheme.params_shape(x.shape)
    xf = compute_view(x).astype(np.float64)
    mag = float(np.abs(xf).max()) if xf.size and np.abs(xf).max() > 0 else 1.0
    factor = draw(hnp.arrays(np.float64, pshape, elements=st.floats(0.05, 3.0)))
    # subnormal data can make the product underflow to 0, which no valid grid has: the smallest normal instead
    scale = np.maximum((factor * mag / scheme.qmax).astype(np.float32), np.finfo(np.float32).tiny)
    zp = None
    if not scheme.symmetric:
        zp = draw(hnp.arrays(np.uint8, pshape, elements=st.integers(0, scheme.qmax)))
    return x, QParams(scale, zp, scheme)


@given(arrays_with_params())
def test_given_params_equal_the_numpy_reference_bit_for_bit(case):
    x, p = case
    qa = quantize(x, params=p)
    np.testing.assert_array_equal(qa.codes, ref_quantize_given(x, p.scale, p.zero_point, p.scheme))
    np.testing.assert_array_equal(qa.scale, p.scale)
    if p.zero_point is not None:
        np.testing.assert_array_equal(qa.zero_point, p.zero_point)


@given(arrays_with_params())
def test_given_params_half_step_inside_the_grid_and_clip_outside(case):
    x, p = case
    scheme = p.scheme
    qa = quantize(x, params=p)
    assert qa.codes.dtype == scheme.code_dtype and qa.codes.shape == x.shape
    assert np.all((qa.codes >= scheme.qmin) & (qa.codes <= scheme.qmax))
    xf = compute_view(x).astype(np.float64)
    s = _expand(p.scale, x.shape, scheme).astype(np.float64)
    z = 0.0 if p.zero_point is None else _expand(p.zero_point, x.shape, scheme).astype(np.float64)
    t = xf / s + z  # where x falls on the grid of codes, exactly
    inside = (t >= scheme.qmin) & (t <= scheme.qmax)
    err = np.abs(xf - dequantize(qa).astype(np.float64))
    # float32 slack: one rounding in the division, one in the product
    assert np.all((err <= s / 2 * (1 + 1e-6) + np.abs(xf) * 2e-7)[inside])
    np.testing.assert_array_equal(qa.codes[t < scheme.qmin], scheme.qmin)
    np.testing.assert_array_equal(qa.codes[t > scheme.qmax], scheme.qmax)


def test_given_params_on_many_threads_equal_one_thread(threads):
    x = np.random.default_rng(5).standard_normal((256, 1024)).astype(np.float32)
    for scheme in (QuantScheme(4, False, PerGroup(128)), QuantScheme(8, True, PerChannel(0)),
                   QuantScheme(8, False, PerTensor())):
        p = compute_qparams(x * 0.5, scheme)  # parameters of other data: some codes clip
        threads(1)
        one = quantize(x, params=p)
        threads(4)
        assert_same(quantize(x, params=p), one)
        assert_same(quantize(x, scheme), quantize(x, params=compute_qparams(x, scheme)))


def test_a_known_answer_with_hand_made_params():
    scheme = QuantScheme(4, False, PerChannel(0))
    x = np.array([[-1.0, 0.0, 0.25, 9.0], [0.375, 0.625, 1.0, -3.0]], np.float32)
    p = QParams(np.array([0.5, 0.25], np.float32), np.array([2, 0], np.uint8), scheme)
    # row 0: rint(-2, 0, 0.5, 18) + 2 = 0, 2, 2, 20 -> 15 (ties to even, clip); row 1: rint(1.5, 2.5, 4, -12)
    assert quantize(x, params=p).codes.tolist() == [[0, 2, 2, 15], [2, 2, 4, 0]]


def test_the_result_owns_its_parameters():
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
    p = compute_qparams(x, QuantScheme(4, False, PerGroup(4)))
    qa = quantize(x, params=p)
    scale, zp = qa.scale.copy(), qa.zero_point.copy()
    p.scale[...] = 7.0
    p.zero_point[...] = 15
    np.testing.assert_array_equal(qa.scale, scale)
    np.testing.assert_array_equal(qa.zero_point, zp)


def test_strided_and_misaligned_params_are_read_correctly():
    x = np.random.default_rng(2).standard_normal((6, 8)).astype(np.float32)
    scheme = QuantScheme(4, False, PerGroup(2, axis=0))  # params (3, 8)
    p = compute_qparams(x, scheme)
    buf = np.zeros(p.scale.size * 4 + 1, np.uint8)
    odd = buf[1:].view(np.float32).reshape(-1)[:p.scale.size].reshape(p.scale.shape)  # misaligned view
    odd[...] = p.scale
    assert not odd.flags.aligned
    strided = np.asfortranarray(p.zero_point)
    assert_same(quantize(x, params=QParams(odd, strided, scheme)), quantize(x, scheme))


def test_empty_inputs_take_given_params_of_their_shape():
    qa = quantize(np.zeros((3, 0), np.float32), params=QParams(np.ones(3, np.float32), None, QuantScheme()))
    assert qa.codes.shape == (3, 0) and qa.scale.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"scale has shape \(2,\), but .* needs \(3,\)"):
        quantize(np.zeros((3, 0), np.float32), params=QParams(np.ones(2, np.float32), None, QuantScheme()))


def test_fake_quantize_takes_params():
    x = np.linspace(-2, 2, 8, dtype=np.float32)
    scheme = QuantScheme(8, True, PerTensor())
    p = QParams(np.array(0.01, np.float32), None, scheme)
    np.testing.assert_array_equal(fake_quantize(x, params=p), dequantize(quantize(x, params=p)))
    assert fake_quantize(x, params=p).max() == np.float32(127) * np.float32(0.01)  # clipped at code 127


def test_compute_qparams_unpacks_as_scale_and_zero_point():
    x = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    scale, zp = compute_qparams(x, QuantScheme(3, False, PerGroup(4)))
    assert scale.dtype == np.float32 and zp.dtype == np.uint8 and scale.shape == zp.shape == (5, 3)


# --- given params are checked ----------------------------------------------------------------------------

SYM = QuantScheme(8, True, PerChannel(0))
ASYM = QuantScheme(4, False, PerGroup(4))
X = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)


@pytest.mark.parametrize("scale,zp,scheme,error,match", [
    (np.ones(3, np.float32), None, SYM, ValueError, r"scale has shape \(3,\), but sym int8 per-channel\(axis=0\) "
                                                    r"needs \(2,\) for an input of shape \(2, 8\)"),
    (np.ones((2, 2), np.float32), np.ones((2, 1), np.uint8), ASYM, ValueError,
     r"zero_point shape \(2, 1\) differs from scale shape \(2, 2\)"),
    (np.array([1.0, 0.0], np.float32), None, SYM, ValueError, r"scale must be finite and > 0 everywhere, got 0 at "
                                                              r"index \(1,\)"),
    (np.array([1.0, -2.0], np.float32), None, SYM, ValueError, r"got -2 at index \(1,\)"),
    (np.array([np.nan, 1.0], np.float32), None, SYM, ValueError, r"got nan at index \(0,\)"),
    (np.array([1.0, np.inf], np.float32), None, SYM, ValueError, r"got inf at index \(1,\)"),
    (np.array([1.0, 3e38], np.float32), None, SYM, ValueError, r"scale 3e\+38 at index \(1,\) makes code 127 "
                                                               r"dequantize to inf"),
    (np.ones((2, 2), np.float32), np.array([[0, 16], [0, 0]], np.uint8), ASYM, ValueError,
     r"zero_point 16 at index \(0, 1\) is outside 0..15"),
    (np.ones(2, np.float64), None, SYM, TypeError, r"scale must be a float32 numpy.ndarray, got float64"),
    ([1.0, 1.0], None, SYM, TypeError, r"scale must be a float32 numpy.ndarray, got list"),
    (np.ones((2, 2), np.float32), np.ones((2, 2), np.int64), ASYM, TypeError,
     r"zero_point of asymmetric scheme asym int4 per-group\(4, axis=-1\) must be a uint8 numpy.ndarray, got int64"),
    (np.ones((2, 2), np.float32), None, ASYM, TypeError, r"must be a uint8 numpy.ndarray, got NoneType"),
    (np.ones(2, np.float32), np.zeros(2, np.uint8), SYM, ValueError, r"a symmetric scheme .* has no zero_point"),
])
def test_bad_params_are_refused_naming_the_problem(scale, zp, scheme, error, match):
    with pytest.raises(error, match=match):
        quantize(X, params=QParams(scale, zp, scheme))


def test_params_with_another_scheme_or_kind_or_type_are_refused():
    p = compute_qparams(X, SYM)
    with pytest.raises(ValueError, match=r"params are for scheme sym int8 per-channel\(axis=0\), not sym int4"):
        quantize(X, QuantScheme(4, True, PerChannel(0)), params=p)
    with pytest.raises(ValueError, match=r"zero_point_kind 'half' is not supported; expected one of \('int', 'float'\)"):
        QParams(p.scale, None, SYM, zero_point_kind="half")
    with pytest.raises(ValueError, match=r"zero_point_kind 'float' needs an asymmetric scheme, got sym int8"):
        QParams(p.scale, None, SYM, zero_point_kind="float")
    with pytest.raises(TypeError, match="scheme must be a qcore.QuantScheme, got str"):
        QParams(p.scale, None, "int8")
    with pytest.raises(TypeError, match=r"params must be a qcore.QParams, a params method name \('hqq', 'minmax',"):
        quantize(X, SYM, params=(p.scale, None))
    with pytest.raises(ValueError, match=r"unknown params method 'nope'; registered: \('hqq', 'minmax',"):
        quantize(X, SYM, params="nope")
    with pytest.raises(ValueError, match="unknown params method 'nope'"):
        compute_qparams(X, SYM, method="nope")


@pytest.mark.parametrize("scheme", [SYM, ASYM, QuantScheme(8, False, PerTensor())])
def test_non_finite_input_with_given_params_is_refused_naming_the_index(scheme):
    p = compute_qparams(X, scheme)
    for bad, text in ((np.nan, "nan"), (-np.inf, "-inf")):
        x = X.copy()
        x[1, 5] = bad
        with pytest.raises(ValueError, match=rf"x contains {text} at index \(1, 5\); NaN and Inf cannot be quantized"):
            quantize(x, params=p)
    x = X.astype(np.float64)
    x[0, 3] = 1e300
    with pytest.raises(ValueError, match=r"1e\+300 at index \(0, 3\), beyond the float32 range"):
        quantize(x, params=p)


# --- the registry ----------------------------------------------------------------------------------------

@pytest.fixture
def registry(monkeypatch):
    """A registry of this test's own: methods registered in a test do not leak into others."""
    monkeypatch.setattr(qparams, "_METHODS", dict(qparams._METHODS))


def test_one_function_and_one_registration_add_a_method(registry):
    seen = {}

    @register_params_method("halfrange")
    def halfrange(x, scheme):
        seen["dtype"] = x.dtype
        p = compute_qparams(x, scheme)
        return QParams(p.scale / 2, p.zero_point, scheme)

    assert params_methods() == ("halfrange", "hqq", "minmax", "mse")
    x = np.linspace(-1, 1, 32, dtype=np.float16).reshape(4, 8)
    scheme = QuantScheme(8, True, PerChannel(0))
    qa = quantize(x, scheme, params="halfrange")
    assert seen["dtype"] == np.float32  # float16 arrives widened, as the kernels see it
    np.testing.assert_array_equal(qa.scale, compute_qparams(x, scheme).scale / 2)
    assert_same(qa, quantize(x, params=compute_qparams(x, scheme, method="halfrange")))
    assert qa.codes.min() == -127 and qa.codes.max() == 127  # half the range: the ends clip
    with pytest.raises(ValueError, match="params method 'halfrange' is already registered"):
        register_params_method("halfrange", halfrange)


def test_a_method_sees_only_finite_input_and_its_result_is_checked(registry):
    calls = []
    register_params_method("spy", lambda x, scheme: calls.append(1) or compute_qparams(x, scheme))
    register_params_method("pair", lambda x, scheme: tuple(compute_qparams(x, scheme)))
    register_params_method("other", lambda x, scheme: compute_qparams(x, QuantScheme(4, True, PerChannel(0))))
    register_params_method("negative", lambda x, scheme: QParams(-np.ones(2, np.float32), None, scheme))
    x = X.copy()
    x[0, 1] = np.inf
    with pytest.raises(ValueError, match=r"x contains inf at index \(0, 1\)"):
        compute_qparams(x, SYM, method="spy")
    assert calls == []
    with pytest.raises(TypeError, match="params method 'pair' returned tuple, not a qcore.QParams"):
        compute_qparams(X, SYM, method="pair")
    with pytest.raises(ValueError, match=r"params method 'other' returned params for scheme sym int4"):
        compute_qparams(X, SYM, method="other")
    with pytest.raises(ValueError, match="scale must be finite and > 0 everywhere, got -1"):
        quantize(X, SYM, params="negative")


def test_registering_needs_a_name_and_a_function(registry):
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        register_params_method("", lambda x, s: None)
    with pytest.raises(TypeError, match="params method 'x' must be callable, got int"):
        register_params_method("x", 3)
    with pytest.raises(ValueError, match="params method 'minmax' is already registered"):
        register_params_method("minmax", lambda x, s: None)


def test_numpy_scalars_are_per_tensor_params():
    p = QParams(np.float32(0.25), np.uint8(3), QuantScheme(8, False, PerTensor()))
    assert p.scale.shape == () and p.zero_point.shape == ()
    assert quantize(np.array([-0.75, 0.5], np.float32), params=p).codes.tolist() == [0, 5]


def test_a_quantized_array_gives_its_grid_for_other_data():
    scheme = QuantScheme(4, False, PerGroup(4))
    qa = quantize(X, scheme)
    assert qa.params.scheme == scheme and qa.params.scale is qa.scale
    y = X * 1.5  # beyond the grid in places: those codes clip
    np.testing.assert_array_equal(quantize(y, params=qa.params).codes,
                                  ref_quantize_given(y, qa.scale, qa.zero_point, scheme))


def test_from_parts_checks_zero_points_as_given_params_are_checked():
    qa = quantize(X, ASYM)
    zp = qa.zero_point.copy()
    zp[1, 0] = 16
    with pytest.raises(ValueError, match=r"zero_point 16 at index \(1, 0\) is outside 0..15"):
        type(qa).from_parts(qa.codes, qa.scale, zp, ASYM)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scheme", [QuantScheme(8, True, PerChannel(0)), QuantScheme(4, False, PerTensor()),
                                    QuantScheme(2, False, PerGroup(2))])
def test_a_tiny_scale_saturates_even_where_x_over_scale_overflows(dtype, scheme):
    x = np.array([[3e38, -3e38, 1.0, 0.0]], dtype)  # x / 1.2e-38 is +-inf in float32 (and beyond in float64)
    pshape = scheme.params_shape(x.shape)
    zp = None if scheme.symmetric else np.full(pshape, 1, np.uint8)
    qa = quantize(x, params=QParams(np.full(pshape, np.finfo(np.float32).tiny, np.float32), zp, scheme))
    assert qa.codes.tolist() == [[scheme.qmax, scheme.qmin, scheme.qmax, 0 if zp is None else 1]]
