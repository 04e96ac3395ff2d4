"""Activations as 8-bit integer planes: a row ``x`` per block of inputs as ``round(x * 2^(P - e))`` split into
signed bytes, read by the integer kernels (:mod:`qtorch.vnni`, :mod:`qtorch.vnni_amx`, the one-row kernel's
integer variant in :mod:`qtorch.gemv`).

A leaf. With ``2^e`` the first power of two above a block's largest ``|x|``, ``q = round(x * 2^(P - e))`` (``|q| <=
2^P``) is held as ``256 h + l`` (``P = 14``, two planes) or ``65536 h + 256 m + l`` (``P = 22``, three), every
plane a signed byte; per block ``2^(e - P)`` and ``sum q`` (three planes: ``sum h`` and ``sum (256 m + l)``).
The one rounding is ``x``'s: at most ``2^(e - P - 1)``.

>>> import numpy as np
>>> xq, xm, xs = np.empty((2, 8), np.int8), np.empty(1, np.float32), np.empty((1, 2), np.int32)
>>> split_row(np.array([1, -2, 0, 0, 0, 0, 0, 3], np.float32), 8, 14, 2, xq, xm, xs)
True
>>> (256 * xq[0].astype(int) + xq[1]).tolist(), float(xm[0]), int(xs[0, 0])
([4096, -8192, 0, 0, 0, 0, 0, 12288], 0.000244140625, 8192)
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._ir import cached as _cached

__all__ = ["P", "block_size", "block_size_of", "split_row"]

#: the exponent ``P`` of ``q = round(x * 2^(P - e))`` by number of planes
P = {2: 14, 3: 22}


def block_size(group: int) -> int:
    """Inputs per block of ``x``'s split: the largest multiple of 8 up to 128 that divides ``group`` (0: none).

    >>> block_size(128), block_size(32), block_size(4096), block_size(192), block_size(12)
    (128, 32, 128, 96, 0)
    """
    return int(block_size_of(group))


@njit(cache=True, nogil=True)
def block_size_of(group):  # pragma: no cover - compiled; :func:`block_size` for the kernels
    for b in range(min(128, group) // 8 * 8, 0, -8):
        if group % b == 0:
            return b
    return 0


#: 1.5 * 2^52: adding then subtracting it rounds a float64 below 2^51 in magnitude to an integer, to nearest even
#: (``np.rint``'s result; a call that LLVM does not vectorise)
_RNE = 6755399441055744.0


@njit(inline="always")
def split_block(xf, k0, n, P, parts, xq, xm, xs, b):  # pragma: no cover - compiled
    # loops that LLVM vectorises (slices indexed from 0: no wraparound test): the largest |x| by its bits (NaN and
    # infinity above the largest finite), then the rounding of x times a power of two (exact, in float64) and the
    # planes
    xv = xf[k0:k0 + n]
    xb = xv.view(np.uint32)
    mb = np.uint32(0)
    for j in range(n):
        v = xb[j] & np.uint32(0x7FFFFFFF)
        mb = v if v > mb else mb
    if mb >= np.uint32(0x7F800000):  # a NaN or an infinity: not representable
        return False
    p0 = xq[0, k0:k0 + n]
    p1 = xq[1, k0:k0 + n]
    if mb == 0:
        xm[b] = 0
        for p in range(parts):
            xq[p, k0:k0 + n] = 0
        xs[b, 0] = 0
        xs[b, 1] = 0
        return True
    ex = np.int64(mb >> np.uint32(23))
    e = ex - 126 if ex > 0 else -126  # |x| < 2^e (subnormals: below 2^-126)
    sc = math.ldexp(1.0, P - e)
    xm[b] = np.float32(math.ldexp(1.0, e - P))
    s0 = np.int32(0)
    s1 = np.int32(0)
    if parts == 2:
        for j in range(n):
            q = np.int32((np.float64(xv[j]) * sc + _RNE) - _RNE)
            lo = ((q + 128) & 255) - 128
            p0[j] = (q - lo) >> 8
            p1[j] = lo
            s0 += q
        xs[b, 0] = s0
        xs[b, 1] = 0
        return True
    p2 = xq[2, k0:k0 + n]
    for j in range(n):
        q = np.int32((np.float64(xv[j]) * sc + _RNE) - _RNE)
        lo = ((q + 128) & 255) - 128
        r = (q - lo) >> 8
        mid = ((r + 128) & 255) - 128
        hi = (r - mid) >> 8
        p0[j] = hi
        p1[j] = mid
        p2[j] = lo
        s0 += q
        s1 += hi
    xs[b, 0] = s1
    xs[b, 1] = s0 - 65536 * s1
    return True


@_cached
@njit(cache=True, nogil=True)
def split_row(xf, bsize, P, parts, xq, xm, xs):  # pragma: no cover - compiled; xf: float32 [K]
    for b in range(xf.shape[0] // bsize):
        if not split_block(xf, b * bsize, bsize, P, parts, xq, xm, xs, b):
            return False
    return True
