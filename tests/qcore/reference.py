"""Plain NumPy reference of the quantization numerics (docs/numerics.md), written independently of the
numba kernels. The kernels must equal it bit for bit."""

import ml_dtypes
import numpy as np

from qcore.scheme import PerChannel, PerTensor

TINY = np.float32(np.finfo(np.float32).tiny)
F32_MAX = np.float64(np.finfo(np.float32).max)


def compute_view(x):
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def grouped(x, scheme):
    """x reshaped so that each group is reduced over the returned axes (keepdims broadcast back)."""
    g = scheme.granularity
    if isinstance(g, PerTensor):
        return x, tuple(range(x.ndim))
    if isinstance(g, PerChannel):
        axis = g.axis % x.ndim
        return x, tuple(i for i in range(x.ndim) if i != axis)
    axis = g.axis % x.ndim
    shape = x.shape[:axis] + (x.shape[axis] // g.size, g.size) + x.shape[axis + 1:]
    return x.reshape(shape), (axis + 1,)


def ref_params(mn, mx, bits, symmetric):
    lo = np.minimum(np.asarray(mn, np.float64), 0.0)
    hi = np.maximum(np.asarray(mx, np.float64), 0.0)
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1
    s64 = np.maximum(-lo, hi) / qmax if symmetric else (hi - lo) / qmax
    scale = np.minimum(s64, F32_MAX).astype(np.float32)
    scale = np.where(scale >= TINY, scale, TINY).astype(np.float32)
    zp = np.zeros_like(s64) if symmetric else np.clip(np.rint(-lo / scale.astype(np.float64)), 0, qmax)
    reach = np.maximum(zp, qmax - zp)
    shrunk = (F32_MAX / reach).astype(np.float32)
    shrunk = np.where(shrunk.astype(np.float64) * reach > F32_MAX, np.nextafter(shrunk, np.float32(0)), shrunk)
    scale = np.where(scale.astype(np.float64) * reach > F32_MAX, shrunk, scale).astype(np.float32)
    return scale, zp


def ref_quantize(x, scheme):
    """(codes, scale, zero_point) with scale/zp in the user-visible params shape."""
    xc = compute_view(x)
    xg, red = grouped(xc, scheme)
    if xg.size:
        mn, mx = xg.min(axis=red, keepdims=True), xg.max(axis=red, keepdims=True)
    else:  # an empty array: every (empty) group follows the all-zero convention
        mn = mx = np.zeros([1 if i in red else n for i, n in enumerate(xg.shape)], xg.dtype)
    scale, zp = ref_params(mn, mx, scheme.bits, scheme.symmetric)
    q = np.rint(xg / scale) + zp.astype(np.float32)
    codes = np.clip(q, scheme.qmin, scheme.qmax).astype(scheme.code_dtype).reshape(x.shape)
    pshape = scheme.params_shape(x.shape)
    return codes, scale.reshape(pshape), None if scheme.symmetric else zp.astype(np.uint8).reshape(pshape)


def ref_dequantize(codes, scale, zp, scheme):
    cg, red = grouped(codes, scheme)
    shape = [1 if i in red else n for i, n in enumerate(cg.shape)]
    s = scale.reshape(shape)
    z = np.zeros(shape, np.float32) if zp is None else zp.reshape(shape).astype(np.float32)
    return ((cg.astype(np.float32) - z) * s).reshape(codes.shape)


def bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)


def ref_quantize_given(x, scale, zp, scheme):
    """Codes of ``x`` with given parameters (in the user-visible params shape): ``clip(rint(x / s) + zp)``."""
    xg, red = grouped(compute_view(x), scheme)
    shape = [1 if i in red else n for i, n in enumerate(xg.shape)]
    s = np.asarray(scale, np.float32).reshape(shape)
    z = np.zeros(shape, np.float32) if zp is None else np.asarray(zp).reshape(shape).astype(np.float32)
    q = np.rint(xg / s) + z
    return np.clip(q, scheme.qmin, scheme.qmax).astype(scheme.code_dtype).reshape(x.shape)
