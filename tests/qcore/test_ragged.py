"""A group size that does not divide its axis: ``ceil(n / g)`` groups, the last one shorter (as compressed-tensors
stores them). Every result is compared with a plain NumPy reference computed group by group."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcore import PerGroup, QuantizedArray, QuantScheme, checkpoint, dequantize, fake_quantize, quantize
from qcore.params import QParams
from qcore.quantize import compute_qparams
from tests.qcore.reference import ref_params

_DTYPES = (np.float32, np.float64, np.float16, ml_dtypes.bfloat16)


def _slices(n: int, g: int):
    return [slice(j, min(j + g, n)) for j in range(0, n, g)]


def ref_ragged(x: np.ndarray, scheme: QuantScheme):
    """(codes, scale, zero_point) group by group along the scheme's axis (NumPy, the last group shorter)."""
    axis, g = scheme.granularity.axis % x.ndim, scheme.granularity.size
    xc = np.moveaxis(x if x.dtype in (np.float32, np.float64) else x.astype(np.float32), axis, -1)
    codes = np.empty(xc.shape, scheme.code_dtype)
    parts = _slices(xc.shape[-1], g)
    scale = np.empty(xc.shape[:-1] + (len(parts),), np.float32)
    zp = np.empty(scale.shape, np.uint8)
    for j, sl in enumerate(parts):
        seg = xc[..., sl]
        s, z = ref_params(seg.min(-1), seg.max(-1), scheme.bits, scheme.symmetric)
        q = np.rint(seg / s[..., None]) + z[..., None].astype(np.float32)
        codes[..., sl] = np.clip(q, scheme.qmin, scheme.qmax).astype(scheme.code_dtype)
        scale[..., j], zp[..., j] = s, z
    back = (lambda a: np.moveaxis(a, -1, axis))
    return back(codes), back(scale), None if scheme.symmetric else back(zp)


def ref_dequantize_ragged(codes, scale, zp, scheme):
    axis, g = scheme.granularity.axis % codes.ndim, scheme.granularity.size
    c = np.moveaxis(codes, axis, -1).astype(np.float32)
    s = np.moveaxis(scale, axis, -1)
    z = None if zp is None else np.moveaxis(zp, axis, -1).astype(np.float32)
    out = np.empty(c.shape, np.float32)
    for j, sl in enumerate(_slices(c.shape[-1], g)):
        zj = np.float32(0) if z is None else z[..., j:j + 1]
        out[..., sl] = (c[..., sl] - zj) * s[..., j:j + 1]
    return np.moveaxis(out, -1, axis)


@st.composite
def ragged_cases(draw):
    """A float array and a PerGroup scheme whose size does not divide the group axis."""
    ndim = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 5)) for _ in range(ndim)]
    axis = draw(st.sampled_from([-1, 0] if ndim > 1 else [-1]))
    g = draw(st.integers(2, 40))
    shape[axis] = draw(st.integers(1, 3)) * g + draw(st.integers(1, g - 1))  # never a multiple of g
    symmetric = draw(st.booleans())
    bits = draw(st.integers(2 if symmetric else 1, 8))
    dtype = draw(st.sampled_from(_DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    x = rng.standard_normal(shape) * draw(st.sampled_from([1e-3, 1.0, 300.0]))
    if draw(st.booleans()):  # ties at k + 0.5 of a scale, and zero groups
        x = np.round(x * 2) / 2
    return x.astype(dtype), QuantScheme(bits, symmetric, PerGroup(g, axis))


def test_params_shape_rounds_up():
    assert QuantScheme(4, False, PerGroup(128)).params_shape((3, 576)) == (3, 5)
    assert QuantScheme(4, False, PerGroup(3, axis=0)).params_shape((7, 2)) == (3, 2)
    assert QuantScheme(4, False, PerGroup(128)).params_shape((3, 512)) == (3, 4)  # unchanged where it divides


def test_smollm2_width_quantizes_in_five_groups():
    x = np.random.default_rng(0).standard_normal((4, 576)).astype(np.float32)
    x[:, 512:] *= 10  # the short last group has its own range
    qa = quantize(x, QuantScheme(4, False, PerGroup(128)))
    codes, scale, zp = ref_ragged(x, qa.scheme)
    assert qa.scale.shape == (4, 5)
    np.testing.assert_array_equal(qa.codes, codes)
    np.testing.assert_array_equal(qa.scale, scale)
    np.testing.assert_array_equal(qa.zero_point, zp)
    assert (qa.scale[:, 4] > 5 * qa.scale[:, 3]).all()


@given(ragged_cases())
def test_ragged_equals_group_by_group_reference(case):
    x, scheme = case
    qa = quantize(x, scheme)
    codes, scale, zp = ref_ragged(x, scheme)
    np.testing.assert_array_equal(qa.codes, codes)
    np.testing.assert_array_equal(qa.scale, scale)
    if scheme.symmetric:
        assert qa.zero_point is None
    else:
        np.testing.assert_array_equal(qa.zero_point, zp)
    p = compute_qparams(x, scheme)  # the params step alone: the same min-max of the shorter last group
    np.testing.assert_array_equal(p.scale, scale)
    if not scheme.symmetric:
        np.testing.assert_array_equal(p.zero_point, zp)
    np.testing.assert_array_equal(quantize(x, params=p).codes, codes)
    deq = dequantize(qa)
    np.testing.assert_array_equal(deq, ref_dequantize_ragged(codes, scale, zp, scheme))
    np.testing.assert_array_equal(fake_quantize(x, scheme), deq.astype(x.dtype))


@given(ragged_cases())
def test_ragged_error_bound_and_requantize_idempotent(case):
    x, scheme = case
    qa = quantize(x, scheme)
    deq = dequantize(qa, dtype=np.float64)
    axis, g = scheme.granularity.axis % x.ndim, scheme.granularity.size
    s = np.take(np.repeat(qa.scale.astype(np.float64), g, axis=axis), np.arange(x.shape[axis]), axis=axis)
    xs = x.astype(np.float64)
    # inside the clip range (all of it: min-max parameters), within half a scale plus float32 rounding
    assert (np.abs(xs - deq) <= s * (0.5 + 1e-3) + 1e-6 * np.abs(xs)).all()
    again = quantize(dequantize(qa), params=qa.params)
    np.testing.assert_array_equal(again.codes, qa.codes)


def test_ragged_float_zero_point():
    """The float zero point (GGUF's ``q * d + m``) on a ragged last group: codes and values group by group."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 70)).astype(np.float32)
    scheme = QuantScheme(4, False, PerGroup(32))
    scale = rng.uniform(0.05, 0.2, (3, 3)).astype(np.float32)
    zp = rng.uniform(-2, 0, (3, 3)).astype(np.float32)
    qa = quantize(x, params=QParams(scale, zp, scheme, zero_point_kind="float"))
    deq = dequantize(qa)
    for j, sl in enumerate(_slices(70, 32)):
        s, z = scale[:, j:j + 1], zp[:, j:j + 1]
        want = np.clip(np.rint((x[:, sl] - z) / s), 0, 15).astype(np.uint8)
        np.testing.assert_array_equal(qa.codes[:, sl], want)
        np.testing.assert_array_equal(deq[:, sl], want.astype(np.float32) * s + z)


@pytest.mark.parametrize("nthreads", [1, 2])
def test_ragged_split_across_threads_equals_reference(threads, nthreads):
    threads(nthreads)
    x = np.random.default_rng(2).standard_normal((600, 200)).astype(np.float32)
    scheme = QuantScheme(3, True, PerGroup(64))  # 3 groups of 64, then 8
    qa = quantize(x, scheme)
    codes, scale, _ = ref_ragged(x, scheme)
    np.testing.assert_array_equal(qa.codes, codes)
    np.testing.assert_array_equal(qa.scale, scale)
    np.testing.assert_array_equal(dequantize(qa), ref_dequantize_ragged(codes, scale, None, scheme))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_ragged_native_checkpoint_round_trip(tmp_path, symmetric, bits):
    x = np.random.default_rng(3).standard_normal((5, 100)).astype(np.float32)
    qa = quantize(x, QuantScheme(bits, symmetric, PerGroup(32)))  # 3 groups of 32 and one of 4
    path = tmp_path / "w.safetensors"
    checkpoint.save(path, {"layer.weight": qa})
    back = checkpoint.load(path)["layer.weight"]
    assert isinstance(back, QuantizedArray) and back.scheme == qa.scheme and back.scale.shape == (5, 4)
    np.testing.assert_array_equal(back.codes, qa.codes)
    np.testing.assert_array_equal(back.scale, qa.scale)
    if not symmetric:
        np.testing.assert_array_equal(back.zero_point, qa.zero_point)


def test_ragged_checkpoint_with_divisible_scale_shape_is_refused(tmp_path):
    """A file whose scale has n // g columns for a ragged row (one group short) is a bad file naming the tensor."""
    x = np.random.default_rng(4).standard_normal((2, 40)).astype(np.float32)
    qa = quantize(x, QuantScheme(4, True, PerGroup(16)))
    from safetensors.numpy import save_file

    path = tmp_path / "bad.safetensors"
    good = tmp_path / "good.safetensors"
    checkpoint.save(good, {"w": qa})
    from safetensors import safe_open

    with safe_open(good, "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        md = f.metadata()
    tensors["w.scale"] = np.ascontiguousarray(tensors["w.scale"][:, :2])
    save_file(tensors, path, metadata=md)
    with pytest.raises(ValueError, match="'w'.*scale"):
        checkpoint.load(path)


@pytest.mark.parametrize("qtype, scheme", [("Q8_0", QuantScheme(8, True, PerGroup(32))),
                                           ("Q4_0", QuantScheme(4, False, PerGroup(32)))])
def test_gguf_refuses_a_ragged_last_block_naming_the_tensor(tmp_path, qtype, scheme):
    gguf = pytest.importorskip("gguf")
    from qcore import gguf as qg

    x = np.random.default_rng(5).standard_normal((4, 40)).astype(np.float32)
    qa = quantize(x, scheme)  # groups of 32 and 8: GGUF blocks are all 32
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight: .*multiple of 32.*\[4, 40\].*ragged"):
        qg.encode(qa, qtype, name="blk.0.ffn_up.weight")
    good = qg.quantize(np.ones((4, 64), np.float32), qtype)
    path = tmp_path / "m.gguf"
    meta = {"general.architecture": ("llama", gguf.GGUFValueType.STRING, None)}
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight: .*ragged"):
        qg.export_gguf(path, {"blk.0.attn_q.weight": good, "blk.0.ffn_up.weight": qa}, meta,
                       types={"blk.0.attn_q.weight": qtype, "blk.0.ffn_up.weight": qtype})
    assert not path.exists()  # refused before anything is written
