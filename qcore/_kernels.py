"""numba kernels for quantize / dequantize. Imports only the ``_team`` leaf of the package.

Every kernel receives checked, C-contiguous arrays from :mod:`qcore.quantize` and must equal the NumPy
reference in ``tests/qcore/reference.py`` bit for bit (ties included), so the arithmetic here is written in
the same order as there: parameters in float64, scale rounded once to float32, ``rint(x / scale) + zp``
in the input's compute dtype, clip, cast.
"""

import numpy as np
from numba import carray, njit

from . import _team
from ._jitcache import cached as _cached

F32_TINY = np.float32(np.finfo(np.float32).tiny)  # smallest normal: the scale of an all-zero group
F32_MAX = np.float64(np.finfo(np.float32).max)


@_cached
@njit(cache=True, nogil=True)
def params_from_minmax(mn, mx, qmax, symmetric):
    """(scale float32, zero_point) of one group from its min and max (any float type)."""
    lo = min(np.float64(mn), 0.0)  # widen the range to include 0 so that 0.0 is exact
    hi = max(np.float64(mx), 0.0)
    if symmetric:
        s64 = max(-lo, hi) / qmax
    else:
        s64 = (hi - lo) / qmax
    s64 = min(s64, F32_MAX)  # +-3.4e38 ranges overflow float32 when subtracted
    scale = np.float32(s64)
    if not scale >= F32_TINY:  # also catches 0: an all-zero group gets the smallest normal, never 0
        scale = F32_TINY
    zp = 0.0
    if not symmetric:
        zp = min(max(np.rint(-lo / np.float64(scale)), 0.0), np.float64(qmax))
    # At the edge of the float32 range, shrink the grid so that every code dequantizes to a finite value.
    reach = max(zp, qmax - zp)
    if np.float64(scale) * reach > F32_MAX:
        scale = np.float32(F32_MAX / reach)
        if np.float64(scale) * reach > F32_MAX:
            scale = np.nextafter(scale, np.float32(0))
    return scale, zp


@_cached
@njit(cache=True, nogil=True)
def _minmax(seg, start, stop):
    """(min, max, bad) of the non-empty run ``seg[start:stop]``; bad is True if it holds NaN, +-Inf or a
    value beyond the float32 range.

    Kept a separate serial function: inlined into a prange body, the same loop does not vectorise. Runs are
    given as bounds, not slices: a slice per group costs reference counting that a 32-element group notices.
    """
    mn = seg[np.uint64(start)]
    mx = mn
    nan = False
    for i in range(np.uint64(start), np.uint64(stop)):  # unsigned: no wraparound code, so it vectorises
        v = seg[i]
        mn = min(mn, v)
        mx = max(mx, v)
        nan |= v != v
    # float64 input beyond the float32 range has no float32 scale (and inf is beyond it too)
    return np.float64(mn), np.float64(mx), nan or mn < -F32_MAX or mx > F32_MAX


_KEY_MASK = np.int32(0x7FFFFFFF)
_KEY_POS_INF = np.int32(0x7F800000)  # key of +inf; NaNs with the sign bit clear sort above it
_KEY_NEG_INF = np.int32(-2139095041)  # key of -inf (0xff800000 ^ 0x7fffffff); negative NaNs sort below


@_cached
@njit(cache=True, nogil=True, inline="always")
def _key(v):
    # float32 bits -> an int32 whose signed order is the float order (-0.0 just below +0.0). Integer
    # min/max reductions vectorise without fast-math, float ones do not. The np.int32() casts matter:
    # numba widens int32 arithmetic to int64, and AVX2 has no 64-bit min/max (3.5x slower, measured).
    return np.int32(v ^ ((v >> np.int32(31)) & _KEY_MASK))


@_cached
@njit(cache=True, nogil=True)
def _minmax_f32bits(seg, start, stop, scratch):
    """:func:`_minmax` of float32 data given as its int32 bit pattern; NaN and Inf show as keys at or
    beyond the keys of +-Inf, so nothing is lost by not comparing floats. ``scratch``: 2 int32 slots, passed
    in because an allocation per group costs more than the group's arithmetic."""
    mn = np.int32(2147483647)
    mx = np.int32(-2147483648)
    for i in range(np.uint64(start), np.uint64(stop)):  # unsigned: no wraparound code, so it vectorises
        k = _key(seg[i])
        mn = np.int32(min(mn, k))
        mx = np.int32(max(mx, k))
    bad = mx >= _KEY_POS_INF or mn <= _KEY_NEG_INF
    scratch[0] = _key(mn)  # the transform is its own inverse
    scratch[1] = _key(mx)
    f = scratch.view(np.float32)
    return np.float64(f[0]), np.float64(f[1]), bad


@_cached
@njit(cache=True, nogil=True)
def _group_minmax(seg, bits, start, stop, scratch):
    # ``bits`` is the int32 view of a float32 ``seg`` (fast path), or an empty array for other dtypes.
    if bits.size:
        return _minmax_f32bits(bits, start, stop, scratch)
    return _minmax(seg, start, stop)


@_cached
@njit(cache=True, nogil=True)
def _quantize_seg(seg, start, stop, s, z, qmin, qmax, out):
    # float32 operands keep float32 input in float32 (the reference's rounding, and twice the SIMD width);
    # float64 input promotes them exactly.
    zc = np.float32(z)
    lo = np.float32(qmin)
    hi = np.float32(qmax)
    for i in range(np.uint64(start), np.uint64(stop)):  # unsigned: no wraparound code, so it vectorises
        t = np.rint(seg[i] / s) + zc
        out[i] = min(max(t, lo), hi)


@_cached
@njit(cache=True, nogil=True, inline="always")
def _ngroups(length, g):
    return (length + g - 1) // g  # a ragged last group counts as one


@_cached
@njit(cache=True, nogil=True, inline="always")
def _group_stop(j, g, length):
    return min((j + 1) * g, length)  # the last group of a ragged row ends at the row's end


# The kernels below run over a range of rows or elements ``[r0, r1)``, so that qcore._parallel can split one
# call across a thread team (the team kernels at the end). (numba's parallel=True compiled 3x slower, a real
# cost on every fresh install, and its runtime would be an OpenMP team of its own.)

@_cached
@njit(cache=True, nogil=True)
def quantize_rows(x, xbits, g, qmin, qmax, symmetric, codes, scale, zp, r0, r1):
    """Fused pass over rows ``r0..r1``: min/max of each group of ``g`` along axis 1, its parameters, then
    its codes. x: (R, L) float32/float64; xbits: x.view(int32) for float32 x, else an empty (R, 0) array;
    codes: (R, L) int8/uint8; scale: (R, ceil(L/g)) float32; zp: (R, ceil(L/g)) uint8. When g does not divide
    L, the last group of each row is the shorter run ``[(ceil(L/g) - 1) * g, L)``.
    Returns the number of rows holding NaN or Inf (the caller raises; ``codes`` is then garbage).
    """
    length = x.shape[1]
    bad = 0
    scratch = np.empty(2, np.int32)
    for r in range(r0, r1):
        # Row first: a 1-D row of a C array is typed contiguous (a 2-D slice x[r, a:b] is not, and its loops
        # do not vectorise).
        xr = x[r]
        br = xbits[r]
        cr = codes[r]
        for j in range(_ngroups(length, g)):
            stop = _group_stop(j, g, length)
            mn, mx, nonfinite = _group_minmax(xr, br, j * g, stop, scratch)
            if nonfinite:
                bad += 1
                break
            s, z = params_from_minmax(mn, mx, qmax, symmetric)
            scale[r, j] = s
            zp[r, j] = np.uint8(z)
            _quantize_seg(xr, j * g, stop, s, z, qmin, qmax, cr)
    return bad


@_cached
@njit(cache=True, nogil=True)
def minmax_range(x, xbits, lo, hi):
    """(min, max, non-finite) of ``x[lo:hi]`` of a flat array (``xbits`` as in :func:`quantize_rows`)."""
    if lo >= hi:
        return 0.0, 0.0, False
    return _group_minmax(x, xbits, lo, hi, np.empty(2, np.int32))


@_cached
@njit(cache=True, nogil=True)
def quantize_flat(x, s, z, qmin, qmax, codes, lo, hi):
    """Per-tensor codes of ``x[lo:hi]`` of a flat array with one (scale, zero point)."""
    _quantize_seg(x, lo, hi, s, z, qmin, qmax, codes)


@_cached
@njit(cache=True, nogil=True)
def _dequantize_seg(codes, start, stop, s, z, out):
    for i in range(np.uint64(start), np.uint64(stop)):  # unsigned: no wraparound code, so it vectorises
        out[i] = (np.float32(codes[i]) - z) * s


@_cached
@njit(cache=True, nogil=True)
def dequantize_rows(codes, g, scale, zp, out, r0, r1):
    """out[r, i] = (codes[r, i] - zp[r, i // g]) * scale[r, i // g] in float32 for rows ``r0..r1``;
    ``zp`` may have 0 columns (symmetric). scale/zp have ceil(L/g) columns (a ragged last group)."""
    length = codes.shape[1]
    has_zp = zp.shape[1] > 0
    for r in range(r0, r1):
        cr = codes[r]
        orow = out[r]
        for j in range(_ngroups(length, g)):
            z = np.float32(zp[r, j]) if has_zp else np.float32(0.0)
            _dequantize_seg(cr, j * g, _group_stop(j, g, length), scale[r, j], z, orow)


@_cached
@njit(cache=True, nogil=True)
def dequantize_flat(codes, s, z, out, lo, hi):
    """Per-tensor dequantize of ``codes[lo:hi]`` of a flat array: out = (codes - z) * s in float32."""
    _dequantize_seg(codes, lo, hi, np.float32(s), np.float32(z), out)


# --- team kernels (qcore._team): a cfunc per kernel and dtype pair, compiled on first use. Each reads its
# operands (an Operands spec below, in the order qcore.quantize passes them) and runs the kernel above on the
# chunks it claims.
_I, _F, _A = _team.I64, _team.F64, _team.ADDR
QUANTIZE_ROWS = _team.Operands("quantize_rows", rows=_I, length=_I, x=_A, xbits=_A, xbits_cols=_I, g=_I, qmin=_I,
                               qmax=_I, symmetric=_I, codes=_A, scale=_A, zp=_A, groups=_I)
MINMAX_RANGE = _team.Operands("minmax_range", n=_I, x=_A, xbits=_A, xbits_len=_I,
                              out=_A)  # out: float64 [chunks, 3]: min, max, non-finite
QUANTIZE_FLAT = _team.Operands("quantize_flat", n=_I, x=_A, scale=_F, zero_point=_F, qmin=_I, qmax=_I, codes=_A)
DEQUANTIZE_ROWS = _team.Operands("dequantize_rows", rows=_I, length=_I, codes=_A, g=_I, scale=_A, zp=_A, zp_cols=_I,
                                 out=_A)  # out: float32 [rows, length]; scale has ceil(length / g) columns
DEQUANTIZE_FLAT = _team.Operands("dequantize_flat", n=_I, codes=_A, scale=_F, zero_point=_F, out=_A)
_read_quantize_rows, _read_minmax_range, _read_quantize_flat = (QUANTIZE_ROWS.read, MINMAX_RANGE.read,
                                                               QUANTIZE_FLAT.read)
_read_dequantize_rows, _read_dequantize_flat = DEQUANTIZE_ROWS.read, DEQUANTIZE_FLAT.read


# for a kernel that reads its operands from the header by slot (``_team.claim_loop``): head[3], head[4], ...
@njit(inline="always")
def _ptr(head, k):
    return _team.as_ptr(head[k])


@njit(inline="always")
def _f64(head, k):
    return head.view(np.float64)[k]


@njit(inline="always")
def _quantize_rows_chunk(o, i, lo, hi, xdt, cdt):
    R, L, ngroups = o.rows, o.length, o.groups
    x = carray(o.x, (R, L), xdt)
    xbits = carray(o.xbits, (R, o.xbits_cols), np.int32)
    codes = carray(o.codes, (R, L), cdt)
    scale = carray(o.scale, (R, ngroups), np.float32)
    zp = carray(o.zp, (R, ngroups), np.uint8)
    return quantize_rows(x, xbits, o.g, o.qmin, o.qmax, o.symmetric != 0, codes, scale, zp, lo, hi)


@njit(inline="always")
def _minmax_chunk(o, i, lo, hi, xdt, _y):
    n = o.n
    mn, mx, bad = minmax_range(carray(o.x, n, xdt), carray(o.xbits, o.xbits_len, np.int32), lo, hi)
    out = carray(o.out, (i + 1, 3), np.float64)
    out[i, 0], out[i, 1], out[i, 2] = mn, mx, 1.0 if bad else 0.0
    return 0


@njit(inline="always")
def _quantize_flat_chunk(o, i, lo, hi, xdt, cdt):
    n = o.n
    quantize_flat(carray(o.x, n, xdt), np.float32(o.scale), o.zero_point, o.qmin, o.qmax, carray(o.codes, n, cdt),
                  lo, hi)
    return 0


@njit(inline="always")
def _dequantize_rows_chunk(o, i, lo, hi, cdt, _y):
    R, L, g = o.rows, o.length, o.g
    ngroups = _ngroups(L, g)
    dequantize_rows(carray(o.codes, (R, L), cdt), g, carray(o.scale, (R, ngroups), np.float32),
                    carray(o.zp, (R, o.zp_cols), np.uint8), carray(o.out, (R, L), np.float32), lo, hi)
    return 0


@njit(inline="always")
def _dequantize_flat_chunk(o, i, lo, hi, cdt, _y):
    n = o.n
    dequantize_flat(carray(o.codes, n, cdt), o.scale, o.zero_point, carray(o.out, n, np.float32), lo, hi)
    return 0


def _quantize_rows_f32_i8(data):
    _team.claim_operands(data, _read_quantize_rows, _quantize_rows_chunk, np.float32, np.int8)


def _quantize_rows_f32_u8(data):
    _team.claim_operands(data, _read_quantize_rows, _quantize_rows_chunk, np.float32, np.uint8)


def _quantize_rows_f64_i8(data):
    _team.claim_operands(data, _read_quantize_rows, _quantize_rows_chunk, np.float64, np.int8)


def _quantize_rows_f64_u8(data):
    _team.claim_operands(data, _read_quantize_rows, _quantize_rows_chunk, np.float64, np.uint8)


def _minmax_f32(data):
    _team.claim_operands(data, _read_minmax_range, _minmax_chunk, np.float32, 0)


def _minmax_f64(data):
    _team.claim_operands(data, _read_minmax_range, _minmax_chunk, np.float64, 0)


def _quantize_flat_f32_i8(data):
    _team.claim_operands(data, _read_quantize_flat, _quantize_flat_chunk, np.float32, np.int8)


def _quantize_flat_f32_u8(data):
    _team.claim_operands(data, _read_quantize_flat, _quantize_flat_chunk, np.float32, np.uint8)


def _quantize_flat_f64_i8(data):
    _team.claim_operands(data, _read_quantize_flat, _quantize_flat_chunk, np.float64, np.int8)


def _quantize_flat_f64_u8(data):
    _team.claim_operands(data, _read_quantize_flat, _quantize_flat_chunk, np.float64, np.uint8)


def _dequantize_rows_i8(data):
    _team.claim_operands(data, _read_dequantize_rows, _dequantize_rows_chunk, np.int8, 0)


def _dequantize_rows_u8(data):
    _team.claim_operands(data, _read_dequantize_rows, _dequantize_rows_chunk, np.uint8, 0)


def _dequantize_flat_i8(data):
    _team.claim_operands(data, _read_dequantize_flat, _dequantize_flat_chunk, np.int8, 0)


def _dequantize_flat_u8(data):
    _team.claim_operands(data, _read_dequantize_flat, _dequantize_flat_chunk, np.uint8, 0)


_T = _team.TeamKernel
#: team kernels by (kernel name, dtype names): the input's compute dtype and/or the codes' dtype
TEAM = {
    ("quantize_rows", "float32", "int8"): _T(_quantize_rows_f32_i8),
    ("quantize_rows", "float32", "uint8"): _T(_quantize_rows_f32_u8),
    ("quantize_rows", "float64", "int8"): _T(_quantize_rows_f64_i8),
    ("quantize_rows", "float64", "uint8"): _T(_quantize_rows_f64_u8),
    ("minmax_range", "float32"): _T(_minmax_f32),
    ("minmax_range", "float64"): _T(_minmax_f64),
    ("quantize_flat", "float32", "int8"): _T(_quantize_flat_f32_i8),
    ("quantize_flat", "float32", "uint8"): _T(_quantize_flat_f32_u8),
    ("quantize_flat", "float64", "int8"): _T(_quantize_flat_f64_i8),
    ("quantize_flat", "float64", "uint8"): _T(_quantize_flat_f64_u8),
    ("dequantize_rows", "int8"): _T(_dequantize_rows_i8),
    ("dequantize_rows", "uint8"): _T(_dequantize_rows_u8),
    ("dequantize_flat", "int8"): _T(_dequantize_flat_i8),
    ("dequantize_flat", "uint8"): _T(_dequantize_flat_u8),
}


# --- the params step apart from rounding: min/max parameters alone, and codes from given parameters. Same
# arithmetic as quantize_rows (the same _group_minmax, params_from_minmax and _quantize_seg), so that
# quantizing with minmax_params_rows' output equals the fused kernel bit for bit. Team slots, from 3:
#   minmax_params_rows:    R, L, x, xbits, xbits columns, g, qmax, symmetric, scale, zp
#   quantize_rows_given:   R, L, x, xbits, xbits columns, g, qmin, qmax, codes, scale, zp, zp columns

@_cached
@njit(cache=True, nogil=True)
def minmax_params_rows(x, xbits, g, qmax, symmetric, scale, zp, r0, r1):
    """Scale and zero point of every group of ``g`` along axis 1 for rows ``r0..r1``, from its min/max (the
    parameters :func:`quantize_rows` uses, without its codes). Returns the number of rows holding NaN or Inf."""
    length = x.shape[1]
    bad = 0
    scratch = np.empty(2, np.int32)
    for r in range(r0, r1):
        xr = x[r]
        br = xbits[r]
        for j in range(_ngroups(length, g)):
            mn, mx, nonfinite = _group_minmax(xr, br, j * g, _group_stop(j, g, length), scratch)
            if nonfinite:
                bad += 1
                break
            s, z = params_from_minmax(mn, mx, qmax, symmetric)
            scale[r, j] = s
            zp[r, j] = np.uint8(z)
    return bad


@_cached
@njit(cache=True, nogil=True)
def quantize_rows_given(x, xbits, g, qmin, qmax, codes, scale, zp, r0, r1):
    """Codes of rows ``r0..r1`` with given parameters: group ``j`` of row ``r`` (``g`` elements along axis 1)
    uses ``scale[r, j]`` and ``zp[r, j]`` (``zp`` may have 0 columns: symmetric). Returns the number of rows
    holding NaN, Inf or float64 beyond the float32 range (the caller raises; ``codes`` is then garbage)."""
    length = x.shape[1]
    has_zp = zp.shape[1] > 0
    bad = 0
    scratch = np.empty(2, np.int32)
    for r in range(r0, r1):
        xr = x[r]
        cr = codes[r]
        # one read of the row for the input check; the row is then in cache for the rounding pass
        if length and _group_minmax(xr, xbits[r], 0, length, scratch)[2]:
            bad += 1
            continue
        for j in range(_ngroups(length, g)):
            z = np.float64(zp[r, j]) if has_zp else 0.0
            _quantize_seg(xr, j * g, _group_stop(j, g, length), scale[r, j], z, qmin, qmax, cr)
    return bad


@njit(inline="always")
def _minmax_params_rows_chunk(head, i, lo, hi, xdt, _y):
    R, L, g = head[3], head[4], head[8]
    x = carray(_ptr(head, 5), (R, L), xdt)
    xbits = carray(_ptr(head, 6), (R, head[7]), np.int32)
    scale = carray(_ptr(head, 11), (R, _ngroups(L, g)), np.float32)
    zp = carray(_ptr(head, 12), (R, _ngroups(L, g)), np.uint8)
    return minmax_params_rows(x, xbits, g, head[9], head[10] != 0, scale, zp, lo, hi)


@njit(inline="always")
def _quantize_rows_given_chunk(head, i, lo, hi, xdt, cdt):
    R, L, g = head[3], head[4], head[8]
    x = carray(_ptr(head, 5), (R, L), xdt)
    xbits = carray(_ptr(head, 6), (R, head[7]), np.int32)
    codes = carray(_ptr(head, 11), (R, L), cdt)
    scale = carray(_ptr(head, 12), (R, _ngroups(L, g)), np.float32)
    zp = carray(_ptr(head, 13), (R, head[14]), np.uint8)
    return quantize_rows_given(x, xbits, g, head[9], head[10], codes, scale, zp, lo, hi)


def _minmax_params_rows_f32(data):
    _team.claim_loop(data, _minmax_params_rows_chunk, np.float32, 0)


def _minmax_params_rows_f64(data):
    _team.claim_loop(data, _minmax_params_rows_chunk, np.float64, 0)


def _quantize_rows_given_f32_i8(data):
    _team.claim_loop(data, _quantize_rows_given_chunk, np.float32, np.int8)


def _quantize_rows_given_f32_u8(data):
    _team.claim_loop(data, _quantize_rows_given_chunk, np.float32, np.uint8)


def _quantize_rows_given_f64_i8(data):
    _team.claim_loop(data, _quantize_rows_given_chunk, np.float64, np.int8)


def _quantize_rows_given_f64_u8(data):
    _team.claim_loop(data, _quantize_rows_given_chunk, np.float64, np.uint8)


TEAM.update({
    ("minmax_params_rows", "float32"): _T(_minmax_params_rows_f32),
    ("minmax_params_rows", "float64"): _T(_minmax_params_rows_f64),
    ("quantize_rows_given", "float32", "int8"): _T(_quantize_rows_given_f32_i8),
    ("quantize_rows_given", "float32", "uint8"): _T(_quantize_rows_given_f32_u8),
    ("quantize_rows_given", "float64", "int8"): _T(_quantize_rows_given_f64_i8),
    ("quantize_rows_given", "float64", "uint8"): _T(_quantize_rows_given_f64_u8),
})
