"""Exhaustive checks over every code of every width, and known-answer vectors."""

import ml_dtypes
import numpy as np
import pytest

from qcore import (PerChannel, PerGroup, PerTensor, QuantizedArray, QuantScheme, compute_qparams, dequantize,
                   quantize)

TINY = np.finfo(np.float32).tiny
F32_MAX = np.finfo(np.float32).max


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_symmetric_code_round_trips(bits):
    qmax = 2 ** (bits - 1) - 1
    codes = np.arange(-qmax, qmax + 1)
    x = (codes * 0.25).astype(np.float32)  # a power-of-two step: scale is exactly 0.25
    qa = quantize(x, QuantScheme(bits, True, PerTensor()))
    assert float(qa.scale) == 0.25
    np.testing.assert_array_equal(qa.codes, codes)
    np.testing.assert_array_equal(dequantize(qa), x)


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_asymmetric_code_and_zero_point_round_trips(bits):
    qmax = 2 ** bits - 1
    codes = np.arange(qmax + 1)
    # one row per zero point: rows quantize independently per channel
    zps = np.arange(qmax + 1)
    x = ((codes[None, :] - zps[:, None]) * 0.5).astype(np.float32)
    qa = quantize(x, QuantScheme(bits, False, PerChannel(0)))
    np.testing.assert_array_equal(qa.scale, np.full(qmax + 1, 0.5, np.float32))
    np.testing.assert_array_equal(qa.zero_point, zps)
    np.testing.assert_array_equal(qa.codes, np.broadcast_to(codes, x.shape))
    np.testing.assert_array_equal(dequantize(qa), x)


def test_ties_round_half_to_even():
    # scale is exactly 1.0 (absmax 127 / 127); x/scale lands on k + 0.5
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.0], np.float32)
    qa = quantize(x, QuantScheme(8, True, PerTensor()))
    assert float(qa.scale) == 1.0
    assert qa.codes.tolist() == [0, 2, 2, 0, -2, -2, 126, 127]


def test_asymmetric_ties_and_zero_point():
    # range [-2, 253] -> scale (255/255) = 1, zero point 2; 0.5 + 2 rounds to 2 (even), 1.5 -> 4
    x = np.array([-2.0, 0.5, 1.5, 253.0], np.float32)
    qa = quantize(x, QuantScheme(8, False, PerTensor()))
    assert (float(qa.scale), int(qa.zero_point)) == (1.0, 2)
    assert qa.codes.tolist() == [0, 2, 4, 255]


def test_asymmetric_range_is_widened_to_include_zero():
    x = np.array([2.0, 3.0, 4.0], np.float32)  # all positive: range becomes [0, 4]
    qa = quantize(x, QuantScheme(8, False, PerTensor()))
    assert int(qa.zero_point) == 0 and np.isclose(float(qa.scale), 4 / 255)
    y = np.array([-4.0, -1.0], np.float32)  # all negative: range [-4, 0], zero point at the top
    qb = quantize(y, QuantScheme(8, False, PerTensor()))
    assert int(qb.zero_point) == 255


def test_all_zero_rows_get_the_smallest_normal_scale_and_exact_zeros():
    x = np.zeros((3, 8), np.float32)
    x[1] = np.linspace(-1, 1, 8)
    for scheme in (QuantScheme(8, True, PerChannel(0)), QuantScheme(4, False, PerChannel(0)),
                   QuantScheme(3, False, PerGroup(4))):
        qa = quantize(x, scheme)
        s = qa.scale.reshape(3, -1)
        assert np.all(s[[0, 2]] == np.float32(TINY)) and np.all(s[1] > TINY)
        zp = 0 if qa.zero_point is None else qa.zero_point.reshape(3, -1)[[0, 2]]
        assert np.all(qa.codes[[0, 2]] == (zp if np.ndim(zp) == 0 else np.repeat(zp, 8 // zp.shape[1], 1)))
        y = dequantize(qa)
        assert np.all(y[[0, 2]] == 0) and not np.any(np.isnan(y))


def test_single_non_zero():
    x = np.array([0, 0, 5.0, 0], np.float32)
    qa = quantize(x, QuantScheme(8, True, PerTensor()))
    assert qa.codes.tolist() == [0, 0, 127, 0]
    np.testing.assert_allclose(dequantize(qa), x, rtol=1e-6)


def test_subnormals():
    x = np.array([1e-45, -1e-44, 3e-39, 0.0], np.float32)
    for scheme in (QuantScheme(8, True, PerTensor()), QuantScheme(4, False, PerTensor())):
        qa = quantize(x, scheme)
        assert float(qa.scale) >= TINY and np.isfinite(qa.scale)
        assert np.max(np.abs(dequantize(qa) - x)) <= float(qa.scale) / 2


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (2, True), (1, False)])
def test_huge_values_near_float32_max_stay_finite(bits, symmetric):
    x = np.array([F32_MAX, -F32_MAX, 1.0, -F32_MAX / 3], np.float32)
    qa = quantize(x, QuantScheme(bits, symmetric, PerTensor()))
    assert np.isfinite(qa.scale) and float(qa.scale) > 0
    assert np.all((qa.codes >= qa.scheme.qmin) & (qa.codes <= qa.scheme.qmax))
    assert np.all(np.isfinite(dequantize(qa)))
    err = np.abs(dequantize(qa).astype(np.float64) - x.astype(np.float64))
    if bits == 8 and symmetric:  # the extremes are reproduced to float32 precision
        np.testing.assert_allclose(dequantize(qa)[:2], x[:2], rtol=1e-6)
    elif bits == 8:  # the grid was shrunk to stay finite: within one step, not half
        assert np.all(err <= float(qa.scale) * 1.001)


def test_float64_input_divides_in_float64():
    x = np.array([1.0, 1 / 3, -0.7], np.float64)
    qa = quantize(x, QuantScheme(8, True, PerTensor()))
    s = np.float64(qa.scale)
    assert qa.codes.tolist() == np.rint(x / s).astype(int).tolist()


def test_bfloat16_and_float16_inputs_quantize_their_exact_values():
    x32 = np.linspace(-2, 2, 32, dtype=np.float32).reshape(2, 16)
    for dt in (ml_dtypes.bfloat16, np.float16):
        x = x32.astype(dt)
        a = quantize(x, QuantScheme(4, False, PerGroup(8)))
        b = quantize(x.astype(np.float32), QuantScheme(4, False, PerGroup(8)))
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)


def test_params_shapes_for_every_granularity():
    x = np.ones((4, 6, 8), np.float32)
    assert quantize(x, QuantScheme(8, True, PerTensor())).scale.shape == ()
    assert quantize(x, QuantScheme(8, True, PerChannel(1))).scale.shape == (6,)
    assert quantize(x, QuantScheme(8, True, PerChannel(-1))).scale.shape == (8,)
    assert quantize(x, QuantScheme(8, False, PerGroup(4))).zero_point.shape == (4, 6, 2)
    assert quantize(x, QuantScheme(8, False, PerGroup(3, axis=1))).scale.shape == (4, 2, 8)


def test_empty_arrays_have_a_defined_result():
    qa = quantize(np.zeros((0, 8), np.float32), QuantScheme(4, False, PerGroup(4)))
    assert qa.codes.shape == (0, 8) and qa.scale.shape == (0, 2) and dequantize(qa).shape == (0, 8)
    qb = quantize(np.zeros((3, 0), np.float32), QuantScheme(8, True, PerChannel(0)))
    assert qb.scale.tolist() == [TINY] * 3  # empty channels follow the all-zero convention
    qc = quantize(np.zeros((0,), np.float32), QuantScheme(8, False, PerTensor()))
    assert float(qc.scale) == TINY and int(qc.zero_point) == 0 and dequantize(qc).shape == (0,)


def test_compute_qparams_matches_quantize():
    x = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    scheme = QuantScheme(3, False, PerGroup(4))
    s, z = compute_qparams(x, scheme)
    qa = quantize(x, scheme)
    np.testing.assert_array_equal(s, qa.scale)
    np.testing.assert_array_equal(z, qa.zero_point)
    s8, z8 = compute_qparams(x, QuantScheme())
    assert z8 is None and s8.shape == (5,)


def test_from_parts_keeps_per_tensor_parameters_0d():
    qa = quantize(np.linspace(-1, 1, 8, dtype=np.float32), QuantScheme(4, False, PerTensor()))
    again = QuantizedArray.from_parts(qa.codes, qa.scale, qa.zero_point, qa.scheme)
    assert again.scale.shape == () and again.zero_point.shape == ()
    np.testing.assert_array_equal(dequantize(again), dequantize(qa))


def test_the_constructor_checks_structure_so_kernels_never_read_out_of_bounds():
    s = QuantScheme()
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(4,\), got float32 \(2,\)"):
        QuantizedArray(np.ones((4, 8), np.int8), np.ones(2, np.float32), None, s)
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(67108864,\)"):
        QuantizedArray(np.ones((1 << 26, 1), np.int8), np.ones(1, np.float32), None, s)
    with pytest.raises(TypeError, match="codes must be int8"):
        QuantizedArray(np.ones((4, 8), np.uint8), np.ones(4, np.float32), None, s)
    with pytest.raises(ValueError, match="zero_point must be uint8 of shape"):
        QuantizedArray(np.ones((4, 8), np.uint8), np.ones(4, np.float32), None, QuantScheme(8, False))
    with pytest.raises(ValueError, match="0-d"):
        QuantizedArray(np.ones((), np.int8), np.ones((), np.float32), None, QuantScheme(8, True, PerTensor()))


def test_float64_beyond_the_float32_range_is_refused():
    for scheme in (QuantScheme(8, True, PerTensor()), QuantScheme(8, True, PerChannel(0)), QuantScheme(4, False)):
        x = np.array([[1.0, -5.0], [1e300, 2.0]])
        with pytest.raises(ValueError, match=r"1e\+300 at index \(1, 0\), beyond the float32 range"):
            quantize(x, scheme)
    ok = np.array([[F32_MAX, -F32_MAX]], np.float64)  # the float32 maximum itself is fine
    assert np.all(np.isfinite(dequantize(quantize(ok, QuantScheme(8, True, PerTensor())))))


def test_quantized_array_from_parts_validates():
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    qa = quantize(x, QuantScheme(4, False, PerGroup(4)))
    again = QuantizedArray.from_parts(qa.codes, qa.scale, qa.zero_point, qa.scheme)
    np.testing.assert_array_equal(dequantize(again), dequantize(qa))
    with pytest.raises(ValueError, match="scale must be finite"):
        QuantizedArray.from_parts(qa.codes, np.full_like(qa.scale, np.nan), qa.zero_point, qa.scheme)
    with pytest.raises(ValueError, match=r"code \d+ is outside 0..15"):
        QuantizedArray.from_parts(qa.codes + 16, qa.scale, qa.zero_point, qa.scheme)
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(2, 2\)"):
        QuantizedArray.from_parts(qa.codes, qa.scale[:1], qa.zero_point, qa.scheme)
    with pytest.raises(TypeError, match="codes must be uint8"):
        QuantizedArray.from_parts(qa.codes.astype(np.int8), qa.scale, qa.zero_point, qa.scheme)


@pytest.mark.parametrize("scheme", [QuantScheme(8, True, PerTensor()), QuantScheme(8, True, PerChannel(0)),
                                    QuantScheme(4, False, PerChannel(1)), QuantScheme(3, False, PerGroup(4)),
                                    QuantScheme(4, True, PerGroup(2, axis=0))])
def test_dequantize_into_out_equals_a_fresh_result(scheme):
    x = np.random.default_rng(3).standard_normal((6, 8)).astype(np.float32)
    qa = quantize(x, scheme)
    out = np.full(x.shape, np.nan, np.float32)
    assert dequantize(qa, out=out) is out
    np.testing.assert_array_equal(out, dequantize(qa))
    for bad in (np.empty((8, 6), np.float32), np.empty(x.shape, np.float64), np.empty((8, 6), np.float32).T):
        with pytest.raises(ValueError, match=r"out must be a writeable C-contiguous float32 array of shape \(6, 8\)"):
            dequantize(qa, out=bad)
    with pytest.raises(ValueError, match="not C-contiguous"):
        dequantize(qa, out=np.empty((8, 6), np.float32).T)
    with pytest.raises(TypeError, match="dtype must be float32"):
        dequantize(qa, dtype=np.float16, out=out)


def test_dequantize_prior_art_positional_forms():
    codes = np.array([[-127, 0, 127], [10, 20, 30]], np.int8)
    np.testing.assert_allclose(dequantize(codes, 0.5), codes * 0.5)
    scales = np.array([1.0, 2.0], np.float32)  # per output channel
    np.testing.assert_allclose(dequantize(codes, scales), codes * scales[:, None])
    np.testing.assert_allclose(dequantize(np.array([3, 5], np.uint8), 0.25, 3), [0.0, 0.5])
    with pytest.raises(TypeError, match="integer array"):
        dequantize(np.array([0.5]), 1.0)
    # the parameters are checked as quantize(params=...) checks them: no silently negated, NaN or shifted values
    for scale in (-0.5, np.nan, np.inf, np.array([1.0, -1.0], np.float32)):
        with pytest.raises(ValueError, match="scale must be finite and >= 0"):
            dequantize(codes, scale)
    np.testing.assert_array_equal(dequantize(codes, np.array([0.0, 2.0])), np.r_[[[0.0] * 3], [[20, 40, 60]]])
    for zp in (300, -129, np.nan):
        with pytest.raises(ValueError, match=r"zero_point must lie in the range of the int8 codes \[-128, 127\]"):
            dequantize(codes, 0.5, zp)
    for zp in (-128, 127):  # the ends of the range are zero points
        np.testing.assert_array_equal(dequantize(codes, 0.5, zp), (codes.astype(np.float32) - zp) * 0.5)
    np.testing.assert_array_equal(dequantize(np.array([0, 255], np.uint8), 1.0, 255), [-255.0, 0.0])
    with pytest.raises(TypeError, match="dtype must be float16, float32, float64 or bfloat16"):
        dequantize(codes, 0.5, dtype=np.int32)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_packed_round_trip_applies_the_signed_offset(bits, symmetric):
    if bits == 1 and symmetric:
        return
    x = np.random.default_rng(bits).standard_normal((3, 40)).astype(np.float32)
    scheme = QuantScheme(bits, symmetric, PerGroup(8))
    qa = quantize(x, scheme)
    packed = qa.packed()
    assert packed.dtype == np.uint8 and packed.shape == (3, -(-40 * bits // 8))
    back = QuantizedArray.from_packed(packed, qa.scale, qa.zero_point, scheme, qa.shape)
    np.testing.assert_array_equal(back.codes, qa.codes)
    assert qa.nbytes == packed.nbytes + qa.scale.nbytes + (0 if symmetric else qa.zero_point.nbytes)


def test_packed_signed_layout_is_offset_binary():
    # symmetric 4-bit codes -7..7 are stored as code + 8: [-1.0, 1.0] -> codes [-7, 7] -> nibbles 1, 15
    qa = quantize(np.array([-1.0, 1.0], np.float32), QuantScheme(4, True, PerTensor()))
    assert qa.codes.tolist() == [-7, 7] and qa.packed().tolist() == [1 | 15 << 4]


def test_from_parts_refuses_0d_codes_as_the_constructor_does():
    with pytest.raises(ValueError, match="0-d"):
        QuantizedArray.from_parts(np.array(3, np.int8), np.array(1, np.float32), None, QuantScheme(8, True, PerTensor()))


@pytest.mark.parametrize("scheme,zp,bad", [
    (QuantScheme(8, True, PerTensor()), None, "code 127 dequantize to inf"),
    (QuantScheme(8, False, PerTensor()), 200, r"code 0 \(zero point 200\) dequantize to inf"),
    (QuantScheme(4, False, PerTensor()), 3, r"code 15 \(zero point 3\) dequantize to inf"),
])
def test_from_parts_refuses_scales_whose_codes_overflow(scheme, zp, bad):
    # 3e38 is finite, but 127 * 3e38 is not: a file must not bring in what quantize would never make
    codes = np.zeros(4, scheme.code_dtype)
    z = None if zp is None else np.array(zp, np.uint8)
    with pytest.raises(ValueError, match=bad):
        QuantizedArray.from_parts(codes, np.array(3e38, np.float32), z, scheme)
    edge = np.float32(F32_MAX / max(scheme.qmax - (zp or 0), zp or 0))
    edge = np.nextafter(edge, np.float32(0))  # the largest scale quantize itself could produce here
    qa = QuantizedArray.from_parts(codes, np.array(edge, np.float32), z, scheme)
    full = np.full(4, scheme.qmin if zp and zp > scheme.qmax - zp else scheme.qmax, scheme.code_dtype)
    assert np.all(np.isfinite(dequantize(QuantizedArray.from_parts(full, qa.scale, z, scheme))))
