"""Dequantize output rows of a canonical weight into float32 or bfloat16, for :mod:`qtorch.dequant_mm`. A leaf.

Reads the state_dict form (docs/packing.md): codes ``[N, ceil(K*bits/8)]`` packed LSB first along K (8 bits: the
codes themselves, int8 when symmetric), and writes ``out[r - r0, k] = (code - zero) * scale`` for rows
``r0..r1``. ``code - zero`` is exact in float32 (both are small integers), then multiplied by the float32 scale
(one rounding, as qcore computes it; subtracting in int32 first measured 2x slower); bfloat16 output rounds that
float32 value to nearest even, so it equals ``dequantize(...).to(torch.bfloat16)`` bit for bit.

Scales and zero points come in one form for every granularity: ``S[R, G]`` with row ``r // row_div`` and group
``k // (K // G)``: per tensor ``[1, 1]`` (row_div = N), per channel ``[N, 1]``, groups along K ``[N, ceil(K/g)]``
(``group=g``: the last group shorter where g does not divide K), per
input column ``[1, K]`` (row_div = N), groups along N ``[N/g, K]`` (row_div = g). ``Z`` is uint8 of the same
shape, or ``[0, 0]`` with ``zero`` the fixed offset (0 for int8 codes, ``2^(bits-1)`` for packed symmetric ones).

Why a kernel: torch's ops take separate passes (``int8 -> bfloat16``, the scale multiply; for 4 bits the unpacking
too); this reads every code once and writes every value once, converted in registers. Measured on one core of the
AMX Xeon, a 1024 x 4096 block to bfloat16: int8 0.61 ms against 1.59 ms for ``q.to(bf16) * scale.to(bf16)``
(3.62 ms computed in float32 as here), 4 bits in groups of 128 1.34 ms against 5.46 ms for the same in torch ops.
8-bit codes to bfloat16 convert 32 at a time by ``vcvtne2ps2bf16`` where the CPU has AVX512-BF16: on one core of
a Zen 4, 1024 x 4096 int8 went from 7.6 to 13.8 G values/s, 1536 x 576 from 5.4 to 7.6 (the rows' own costs
weigh more there). Rows are claimed in chunks by the threads of PyTorch's OpenMP team (:mod:`qtorch._omp`), so the
matmul that follows finds its workers awake.

>>> import numpy as np
>>> q = np.array([[-2, 0, 3]], np.int8).view(np.uint8)
>>> out = np.empty((1, 3), np.float32)
>>> dequant_rows(q, 8, True, 3, np.full((1, 1), 0.5, np.float32), np.zeros((0, 0), np.uint8), 0, 1, 0, 1, out)
array([[-1. ,  0. ,  1.5]], dtype=float32)
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _omp
from ._ir import F32, I8, I16, I32, host_has, to_bf16x32, vec
from ._ir import cached as _cached

__all__ = ["dequant_rows"]


@_cached
@njit(cache=True, nogil=True, inline="always")
def _code(qrow, k, bits):  # pragma: no cover - compiled
    # code k of a packed row of any width: read 16 bits from its first byte (widths 3, 5, 6, 7 straddle bytes)
    off = k * bits
    i = off >> 3
    v = np.int32(qrow[i])
    if i + 1 < qrow.shape[0]:
        v |= np.int32(qrow[i + 1]) << 8
    return (v >> (off & 7)) & ((1 << bits) - 1)


@intrinsic
def _f32_bits(typingctx, v):
    """The bit pattern of a float32 as uint32 (a register bitcast: the store below stays vectorised)."""
    if v != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(v), codegen


def _put(dst, k, v):  # pragma: no cover - replaced by the overload below in compiled code
    dst[k] = v


@overload(_put, inline="always")
def _put_typed(dst, k, v):
    """Store one float32 value: as itself, or as bfloat16 bits (round to nearest even; finite values only:
    scales are validated, codes are small integers) into a uint16 row. Chosen by the row's dtype at compile time."""
    if dst.dtype == types.uint16:
        def store_bf16(dst, k, v):
            u = _f32_bits(v)
            dst[k] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return store_bf16

    def store(dst, k, v):
        dst[k] = v
    return store


#: whether 8-bit codes go to bfloat16 by ``vcvtne2ps2bf16`` (:func:`_bf16_runs`): the integer rounding that LLVM
#: vectorises otherwise costs five 512-bit operations per 16 values, and on Zen 4 (which runs a 512-bit operation
#: as two halves) the whole loop ran at 1.6 values a cycle
_CVT = host_has("avx512bf16")
_MIN_NORMAL = np.float32(np.finfo(np.float32).tiny)


@intrinsic
def _bf16_runs(typingctx, src, dst, n32, s, z):
    """``dst[i] = bfloat16((src[i] - z) * s)`` for ``i < 32 n32`` (int8 or uint8 ``src``; uint16 ``dst`` of
    bfloat16 bits), 32 values a step: widen, subtract, multiply in float32, then one ``vcvtne2ps2bf16``
    (:func:`qtorch._ir.to_bf16x32`: round to nearest even, as ``_put``; it reads float32 subnormals as zero, so
    callers keep ``|s|`` normal or zero)."""
    if not (isinstance(src, types.Array) and src.dtype in (types.int8, types.uint8) and src.layout == "C"
            and isinstance(dst, types.Array) and dst.dtype == types.uint16 and dst.layout == "C"
            and s == types.float32 and z == types.float32):
        return None
    signed = src.dtype == types.int8

    def codegen(context, builder, sig, args):
        sa, da = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(2))
        n32 = context.cast(builder, args[2], sig.args[2], types.int64)
        v16f, v32b, v32s = vec(F32, 16), vec(I8, 32), vec(I16, 32)
        sv, zv = (builder.shuffle_vector(builder.insert_element(ir.Constant(v16f, ir.Undefined), a,
                                                                ir.Constant(I32, 0)),
                                         ir.Constant(v16f, ir.Undefined), ir.Constant(vec(I32, 16), [0] * 16))
                  for a in args[3:5])
        with cgutils.for_range(builder, n32) as loop:
            at = builder.mul(loop.index, ir.Constant(ir.IntType(64), 32))
            b = builder.load(builder.bitcast(builder.gep(sa.data, [at]), v32b.as_pointer()), align=1)
            halves = []
            for h in (0, 16):
                part = builder.shuffle_vector(b, ir.Constant(v32b, ir.Undefined),
                                              ir.Constant(vec(I32, 16), list(range(h, h + 16))))
                wide = builder.sext(part, vec(I32, 16)) if signed else builder.zext(part, vec(I32, 16))
                halves.append(builder.fmul(builder.fsub(builder.sitofp(wide, v16f), zv), sv))
            builder.store(to_bf16x32(builder, *halves, True),
                          builder.bitcast(builder.gep(da.data, [at]), v32s.as_pointer()), align=2)
        return context.get_dummy_value()

    return types.void(src, dst, n32, s, z), codegen


def _codes8(dg, qg, gs, s, z):  # pragma: no cover - replaced by the overload below in compiled code
    for k in range(gs):
        dg[k] = (np.float32(qg[k]) - z) * s


@overload(_codes8, inline="always")
def _codes8_typed(dg, qg, gs, s, z):
    """``gs`` 8-bit codes of a group into ``dg``: to bfloat16 bits by :func:`_bf16_runs` where the CPU has it and
    every value is normal or zero (``|s|`` normal), the rest (and every float32 row) by ``_put``."""
    if dg.dtype == types.uint16 and _CVT:
        def fast(dg, qg, gs, s, z):
            # |code - z| >= 1 where it is not 0: with |s| normal, every product is normal too
            n = (gs // 32) * np.int64((s == 0) | (abs(s) >= _MIN_NORMAL))
            _bf16_runs(qg, dg, n, s, z)
            for k in range(32 * n, gs):
                _put(dg, k, (np.float32(qg[k]) - z) * s)
        return fast

    def plain(dg, qg, gs, s, z):
        for k in range(gs):
            _put(dg, k, (np.float32(qg[k]) - z) * s)
    return plain


@_cached
@njit(cache=True, nogil=True, inline="always")
def _group(qrow, bits, k0, gs, s, z, whole_bytes, dst):  # pragma: no cover - compiled
    # codes k0 .. k0 + gs of a row, over slices from 0 (LLVM vectorises these; indexing the whole row from k0
    # measured 2.3x slower)
    dg = dst[k0:k0 + gs]
    if bits == 8:  # int8 rows (symmetric) or uint8 rows (asymmetric)
        _codes8(dg, qrow[k0:k0 + gs], gs, s, z)
    elif bits == 4 and whole_bytes:  # low nibble first
        qg = qrow[k0 >> 1:(k0 + gs) >> 1]
        for j in range(gs >> 1):
            c = np.int32(qg[j])
            _put(dg, 2 * j, (np.float32(c & 15) - z) * s)
            _put(dg, 2 * j + 1, (np.float32(c >> 4) - z) * s)
    else:
        for k in range(gs):
            _put(dg, k, (np.float32(_code(qrow, k0 + k, bits)) - z) * s)


@_cached
@njit(cache=True, nogil=True, inline="always")
def _row(qrow, bits, K, S, Z, sr, zero, gsize, dst):  # pragma: no cover - compiled
    # one output row: groups of ``gsize`` codes share a scale (and a zero point); a ragged row ends in a shorter
    # group, done apart so that the loop over whole groups keeps one trip count (a per-group length measured 20%
    # slower for 8-bit rows to bfloat16). ``_put`` stores each value as float32 or as bfloat16 bits, by ``dst``'s
    # dtype: converting in registers measured 2.2x faster than a float32 scratch row converted afterwards
    G = S.shape[1]
    full = min(G, K // gsize)
    has_z = Z.shape[0] > 0
    even = gsize % 2 == 0
    for g in range(full):
        z = np.float32(Z[sr, g]) if has_z else np.float32(zero)  # code - z is exact in float32 too
        _group(qrow, bits, g * gsize, gsize, S[sr, g], z, even, dst)
    if full < G:
        z = np.float32(Z[sr, G - 1]) if has_z else np.float32(zero)
        k0 = full * gsize
        _group(qrow, bits, k0, K - k0, S[sr, G - 1], z, even and (K - k0) % 2 == 0, dst)


@_cached
@njit(cache=True, nogil=True)
def _ranged(q, bits, K, S, Z, zero, row_div, gsize, r0, out32, out16, a, b):  # pragma: no cover - compiled
    # rows r0 + a .. r0 + b into out32 (float32) or, where it has rows, out16 (bfloat16 bits)
    for i in range(a, b):
        r = r0 + i
        if out16.shape[0]:
            _row(q[r], bits, K, S, Z, r // row_div, zero, gsize, out16[i])
        else:
            _row(q[r], bits, K, S, Z, r // row_div, zero, gsize, out32[i])


# The argument block of the team kernel (int64): chunk counter, chunks, then shapes, flags and addresses.
(_B_NEXT, _B_CHUNKS, _B_N, _B_KB, _B_K, _B_R, _B_G, _B_ZR, _B_BITS, _B_SIGNED, _B_ZERO, _B_DIV, _B_R0, _B_ROWS,
 _B_BF16, _B_Q, _B_S, _B_Z, _B_OUT, _B_GSIZE, _B_LEN) = range(21)


def _team_rows(data):  # pragma: no cover - compiled; runs on every thread of torch's OpenMP team
    b = carray(data, _B_LEN, np.int64)
    K, rows, bf16 = b[_B_K], b[_B_ROWS], b[_B_BF16]
    S = carray(_omp.as_ptr(b[_B_S]), (b[_B_R], b[_B_G]), np.float32)
    zr = b[_B_ZR]
    Z = carray(_omp.as_ptr(b[_B_Z]), (zr, b[_B_G] if zr else 0), np.uint8)
    out16 = carray(_omp.as_ptr(b[_B_OUT]), (rows if bf16 else 0, K), np.uint16)
    out32 = carray(_omp.as_ptr(b[_B_OUT]), (0 if bf16 else rows, K), np.float32)
    nchunks = b[_B_CHUNKS]
    while True:
        i = _omp.claim(b)
        if i >= nchunks:
            return
        a, e = rows * i // nchunks, rows * (i + 1) // nchunks
        if b[_B_SIGNED]:
            _ranged(carray(_omp.as_ptr(b[_B_Q]), (b[_B_N], b[_B_KB]), np.int8), b[_B_BITS], K, S, Z, b[_B_ZERO],
                    b[_B_DIV], b[_B_GSIZE], b[_B_R0], out32, out16, a, e)
        else:
            _ranged(carray(_omp.as_ptr(b[_B_Q]), (b[_B_N], b[_B_KB]), np.uint8), b[_B_BITS], K, S, Z, b[_B_ZERO],
                    b[_B_DIV], b[_B_GSIZE], b[_B_R0], out32, out16, a, e)


_TEAM_KERNEL = _omp.TeamKernel(_team_rows)
_CHUNK_VALUES = 1 << 15  # values per claimed chunk at least: smaller hand-offs cost more than they save


def dequant_rows(q: np.ndarray, bits: int, signed8: bool, K: int, S: np.ndarray, Z: np.ndarray, zero: int,
                 row_div: int, r0: int, r1: int, out: np.ndarray, group: int = 0) -> np.ndarray:
    """Write rows ``r0..r1`` of the dequantized ``[N, K]`` weight into ``out`` (``[r1 - r0, K]``, float32, or
    uint16 holding bfloat16 bits); returns ``out``. The operands' form: module docstring. ``group``: codes per
    group along K, for groups that do not divide K (``G = ceil(K / group)``, the last group shorter); 0 means
    ``K // G``. Every operand is checked (dtype, C-contiguity, shape) before its address reaches the kernel: a
    ``TypeError`` / ``ValueError`` names it.
    """
    for name, a, dts in (("q", q, ("uint8",)), ("S", S, ("float32",)), ("Z", Z, ("uint8",)),
                         ("out", out, ("float32", "uint16"))):
        if not isinstance(a, np.ndarray) or a.ndim != 2:
            raise TypeError(f"{name} must be a 2-d NumPy array, got {type(a).__name__}")
        if a.dtype.name not in dts:
            raise TypeError(f"{name} must be {' or '.join(dts)}, got {a.dtype}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (the kernel addresses it by its shape)")
    if bits not in range(1, 9) or (signed8 and bits != 8):
        raise ValueError(f"bits must be 1..8 (8 for signed8 codes), got {bits} with signed8={signed8}")
    N, KB = q.shape
    if KB != (K * bits + 7) // 8:
        raise ValueError(f"q has rows of {KB} bytes, {K} codes of {bits} bits need {(K * bits + 7) // 8}")
    R, G = S.shape
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 0:
        raise ValueError(f"group must be an int >= 0, got {group!r}")
    groups_ok = K % G == 0 if group == 0 else G == -(-K // group)
    if not (G >= 1 and groups_ok and row_div >= 1 and R >= 1 and (N - 1) // row_div < R):
        raise ValueError(f"S must be [rows, groups] with groups dividing K={K} (or ceil(K / group) groups, "
                         f"group={group}) and (N-1) // row_div < rows; got {S.shape} and row_div={row_div} for N={N}")
    gsize = K // G if group == 0 else int(group)
    if Z.shape not in ((0, 0), (R, G)):
        raise ValueError(f"Z must be {[R, G]} or [0, 0], got {list(Z.shape)}")
    if not 0 <= r0 <= r1 <= N or out.shape != (r1 - r0, K):
        raise ValueError(f"rows {r0}..{r1} of {N} need out of shape {[r1 - r0, K]}, got {list(out.shape)}")
    rows = r1 - r0
    if rows == 0 or K == 0:
        return out
    bf16 = out.dtype == np.uint16
    nchunks = int(max(1, min(rows, rows * K // _CHUNK_VALUES, 16 * _omp.team_size())))
    block = np.array((0, nchunks, N, KB, K, R, G, Z.shape[0], bits, signed8, zero, row_div, r0, rows, bf16,
                      q.ctypes.data, S.ctypes.data, Z.ctypes.data, out.ctypes.data, gsize), np.int64)
    out32 = out if not bf16 else np.empty((0, K), np.float32)
    out16 = out if bf16 else np.empty((0, K), np.uint16)
    # without torch's team: the calling thread, or qcore's threads
    qk = q.view(np.int8) if signed8 else q
    _omp.run(nchunks, _TEAM_KERNEL, block, _ranged, (qk, bits, K, S, Z, zero, row_div, gsize, r0, out32, out16), rows,
             max(1, _CHUNK_VALUES // K))
    return out

