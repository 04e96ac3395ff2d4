"""Dequantize tiles of the 8- and 4-bit blocked layouts to float32, for the many-rows forward and the backward.

A leaf of :mod:`qtorch.layouts.blocked` (``tiles_blocked`` multiplies the result by ``torch.mm``). For tiles ``t0..t1`` of
``wb[T, K, W]`` it writes ``out[k, (t - t0) * NT + j] = (code - zero_point) * scale`` as float32 ``[K, (t1-t0)*NT]``,
which is ``W.T`` for those output channels. ``code - zero_point`` is formed in integers and converted exactly, so
the values equal the canonical dequantization bit for bit (one rounding: the product).

One row of a tile is written by ``_dequant_row``, LLVM vector IR: 8 codes per step widened to ``<8 x i32>``, the
zero point subtracted, converted and scaled. numba's own loop over the same arrays vectorised only partly (1.5
G values/s on one core where this kernel is memory-bound). Chunks of K rows are claimed by the threads of
PyTorch's OpenMP team (:mod:`qtorch._omp`), or by qcore's thread splitter where torch has no such team.

>>> import numpy as np
>>> wb = np.arange(-16, 16, dtype=np.int8).reshape(1, 2, 16)  # one tile: K = 2 rows of NT = 16 columns
>>> out = np.empty((2, 16), np.float32)
>>> dequant_tiles(wb, 8, np.full((1, 16), 0.5, np.float32), np.zeros((0, 0), np.uint8), 0, 1, out)[:, :3]
array([[-8. , -7.5, -7. ],
       [ 0. ,  0.5,  1. ]], dtype=float32)
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _omp
from ._ir import I64 as _I64, V8B as _V8B, V8F as _V8F, V8I as _V8I

__all__ = ["dequant_tiles"]



@intrinsic
def _dequant_row(typingctx, wb, t, k, out, orow, ocol, scale, zp, g, n0, bits, has_zp):
    """out[orow, ocol:ocol+NT] = (codes of wb[t, k] - zp[g, n0:n0+NT]) * scale[g, n0:n0+NT], 8 values a step.

    4 bits: byte j of the row holds column j (low nibble) and column j + W (high nibble); without zero points the
    codes carry the offset 8.
    """
    if not (isinstance(bits, types.IntegerLiteral) and isinstance(has_zp, types.BooleanLiteral)):
        return None
    nbits, with_zp = bits.literal_value, has_zp.literal_value
    signed = wb.dtype == types.int8

    def codegen(context, builder, sig, args):
        w = context.make_array(sig.args[0])(context, builder, args[0])
        o = context.make_array(sig.args[3])(context, builder, args[3])
        sa = context.make_array(sig.args[6])(context, builder, args[6])
        za = context.make_array(sig.args[7])(context, builder, args[7])
        tt, kk, orow, ocol, g, n0 = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 4, 5, 8, 9))
        _, k_all, width = cgutils.unpack_tuple(builder, w.shape, 3)
        _, ocols = cgutils.unpack_tuple(builder, o.shape, 2)
        _, scols = cgutils.unpack_tuple(builder, sa.shape, 2)
        _, zcols = cgutils.unpack_tuple(builder, za.shape, 2)
        wp = builder.gep(w.data, [builder.mul(builder.add(builder.mul(tt, k_all), kk), width)])
        op = builder.gep(o.data, [builder.add(builder.mul(orow, ocols), ocol)])
        sp = builder.gep(sa.data, [builder.add(builder.mul(g, scols), n0)])
        zp_ = builder.gep(za.data, [builder.add(builder.mul(g, zcols), n0)])

        def vload(ptr, ty, off):
            return builder.load(builder.bitcast(builder.gep(ptr, [off]), ty.as_pointer()), align=1)

        def emit(ints, col):  # ints: <8 x i32> codes of columns col..col+8
            if with_zp:
                ints = builder.sub(ints, builder.zext(vload(zp_, _V8B, col), _V8I))
            elif nbits == 4:
                ints = builder.sub(ints, ir.Constant(_V8I, [8] * 8))
            val = builder.fmul(builder.sitofp(ints, _V8F), vload(sp, _V8F, col))
            builder.store(val, builder.bitcast(builder.gep(op, [col]), _V8F.as_pointer()), align=4)

        with cgutils.for_range(builder, builder.udiv(width, ir.Constant(_I64, 8))) as loop:
            col = builder.mul(loop.index, ir.Constant(_I64, 8))
            b = vload(wp, _V8B, col)
            if nbits == 8:
                emit(builder.sext(b, _V8I) if signed else builder.zext(b, _V8I), col)
            else:
                z = builder.zext(b, _V8I)
                emit(builder.and_(z, ir.Constant(_V8I, [15] * 8)), col)
                emit(builder.lshr(z, ir.Constant(_V8I, [4] * 8)), builder.add(col, width))
        return context.get_dummy_value()

    return types.void(wb, t, k, out, orow, ocol, scale, zp, g, n0, bits, has_zp), codegen


@njit(cache=True, nogil=True)
def _dequant_range(wb, bits, scale, zp, t0, t1, out, k0, k1):  # pragma: no cover - compiled
    # rows k0..k1 of W.T for the output channels of tiles t0..t1 (the layout: module docstring)
    T, K, W = wb.shape
    NT = W * 2 if bits == 4 else W
    gsize = K // scale.shape[0]
    has_zp = zp.shape[0] > 0
    for k in range(k0, k1):
        g = k // gsize
        for t in range(t0, t1):
            oc = (t - t0) * NT
            if bits == 4:
                if has_zp:
                    _dequant_row(wb, t, k, out, k, oc, scale, zp, g, t * NT, 4, True)
                else:
                    _dequant_row(wb, t, k, out, k, oc, scale, zp, g, t * NT, 4, False)
            elif has_zp:
                _dequant_row(wb, t, k, out, k, oc, scale, zp, g, t * NT, 8, True)
            else:
                _dequant_row(wb, t, k, out, k, oc, scale, zp, g, t * NT, 8, False)


# The argument block of the team kernel (int64): the chunk counter, shapes, then data addresses.
_B_NEXT, _B_CHUNKS, _B_T, _B_K, _B_W, _B_G, _B_BITS, _B_SIGNED, _B_ZPROWS, _B_T0, _B_T1, _B_WB, _B_SCALE, _B_ZP, \
    _B_OUT = range(15)


def _team_dequant(data):  # pragma: no cover - compiled; runs on every thread of torch's OpenMP team
    b = carray(data, 15, np.int64)
    T, K, W, G, bits = b[_B_T], b[_B_K], b[_B_W], b[_B_G], b[_B_BITS]
    NT = W * 2 if bits == 4 else W
    t0, t1 = b[_B_T0], b[_B_T1]
    scale = carray(_omp.as_ptr(b[_B_SCALE]), (G, T * NT), np.float32)
    zrows = b[_B_ZPROWS]
    zp = carray(_omp.as_ptr(b[_B_ZP]), (zrows, T * NT if zrows else 0), np.uint8)
    out = carray(_omp.as_ptr(b[_B_OUT]), (K, (t1 - t0) * NT), np.float32)
    nchunks = b[_B_CHUNKS]
    while True:
        i = _omp.claim(b)
        if i >= nchunks:
            return
        k0, k1 = K * i // nchunks, K * (i + 1) // nchunks
        if b[_B_SIGNED]:
            _dequant_range(carray(_omp.as_ptr(b[_B_WB]), (T, K, W), np.int8), bits, scale, zp, t0, t1, out, k0, k1)
        else:
            _dequant_range(carray(_omp.as_ptr(b[_B_WB]), (T, K, W), np.uint8), bits, scale, zp, t0, t1, out, k0, k1)


_TEAM_KERNEL = _omp.TeamKernel(_team_dequant)
_CHUNK_VALUES = 1 << 16  # values per claimed chunk at least (smaller: the hand-off costs more than it saves)


def dequant_tiles(wb: np.ndarray, bits: int, scale: np.ndarray, zp: np.ndarray, t0: int, t1: int,
                  out: np.ndarray) -> np.ndarray:
    """Write ``W.T`` for tiles ``t0..t1`` into ``out`` (float32 ``[K, (t1-t0)*NT]``, C-contiguous); returns ``out``.

    ``wb`` int8/uint8 ``[T, K, W]`` (``W`` a multiple of 8: tiles of 16 columns and up), ``scale`` float32
    ``[G, T*NT]``, ``zp`` uint8 ``[G, T*NT]`` or ``[0, 0]``, all C-contiguous (checked: a ``TypeError`` /
    ``ValueError`` names the operand).
    """
    T, K, W = wb.shape if getattr(wb, "ndim", 0) == 3 else (0, 0, 0)
    G = scale.shape[0] if getattr(scale, "ndim", 0) == 2 and scale.shape[0] else 1
    if not 0 <= t0 <= t1 <= T:
        raise ValueError(f"tiles {t0}..{t1} are not within the {T} tiles of wb")
    NT = W * 2 if bits == 4 else W
    _omp.check_operands(wb, scale, zp, K // G, bits, out, (K, (t1 - t0) * NT))
    if W % 8:
        raise ValueError(f"tile rows of {W} bytes: the kernel reads 8 bytes at a time")
    if K == 0 or t1 == t0:
        return out
    per_row = (t1 - t0) * NT
    nchunks = int(min(K, max(1, K * per_row // _CHUNK_VALUES), 16 * _omp.team_size()))
    block = np.array((0, nchunks, T, K, W, scale.shape[0], bits, wb.dtype == np.int8, zp.shape[0], t0, t1,
                      wb.ctypes.data, scale.ctypes.data, zp.ctypes.data, out.ctypes.data), np.int64)
    _omp.run(nchunks, _TEAM_KERNEL, block, _dequant_range, (wb, bits, scale, zp, t0, t1, out), K,
             max(1, _CHUNK_VALUES // per_row))
    return out
