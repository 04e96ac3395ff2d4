"""Dequantize tiles of the 8- and 4-bit blocked layouts to float32, bfloat16 or float16, for the many-rows forward
and the backward.

A leaf of :mod:`qtorch.layouts.blocked` (its tiles paths multiply the result by ``torch.mm``). For tiles ``t0..t1``
of ``wb[T, K, W]`` it writes ``out[k, (t - t0) * NT + j] = (code - zero_point) * scale`` as ``[K, (t1-t0)*NT]``,
which is ``W.T`` for those output channels. ``code - zero_point`` is formed in integers and converted exactly, so
the float32 values equal the canonical dequantization bit for bit (one rounding: the product). bfloat16 and
float16 round that float32 value once more, to nearest even: bit for bit ``dequantize(...).to(dtype)``.

The format is the dtype of ``out``: float32, float16, or uint16 holding bfloat16 bits (NumPy has no bfloat16; a
torch bfloat16 tensor viewed as ``int16`` then ``uint16`` is one).

A chunk of rows is written by ``_dequant_block``, LLVM vector IR: 16 codes per step (8 in the last step of a row
of 8 bytes) widened to ``<16 x i32>``, the zero point subtracted, converted, scaled and stored in the output
format (bfloat16: the CPU's ``vcvtneps2bf16`` where it has AVX512-BF16 and the chunk's scales are normal, else
the rounding in integers as :mod:`qtorch.dequant_rows` does; float16: ``fptrunc``, which rounds to nearest even).
Measured on one core of the AMX Xeon (8 MB chunks, busy machine): 7.0 G values/s into bfloat16 at 8 and 4 bits
(6.6 / 5.7 with the integer rounding), about 1.2x the time of ``np.copyto`` of the same output bytes. numba's own
loop over the same arrays vectorised only partly (1.5 G values/s on one core where this kernel is memory-bound). Chunks of K rows are claimed by the threads of PyTorch's OpenMP team
(:mod:`qtorch._omp`, an :class:`~qcore._team.Operands` block: the team is capped after a call that starved a
thread), or by qcore's thread splitter where torch has no such team.

>>> import numpy as np
>>> wb = np.arange(-16, 16, dtype=np.int8).reshape(1, 2, 16)  # one tile: K = 2 rows of NT = 16 columns
>>> out = np.empty((2, 16), np.float32)
>>> dequant_tiles(wb, 8, np.full((1, 16), 0.5, np.float32), np.zeros((0, 0), np.uint8), 0, 1, out)[:, :3]
array([[-8. , -7.5, -7. ],
       [ 0. ,  0.5,  1. ]], dtype=float32)
>>> half = np.empty((2, 16), np.float16)
>>> dequant_tiles(wb, 8, np.full((1, 16), 0.1, np.float32), np.zeros((0, 0), np.uint8), 0, 1, half)[1, :3]
array([0. , 0.1, 0.2], dtype=float16)
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _omp
from ._ir import BF16, F16, F32, I8, I16, I32, I64, host_has, vec
from ._ir import cached as _cached

__all__ = ["dequant_tiles", "OUT_DTYPES"]

#: the output formats, by the dtype of ``out``
OUT_DTYPES = ("float32", "float16", "uint16")
_F32, _BF16, _F16, _BF16_CVT = 0, 1, 2, 3  # the kernel's format codes (uint16 out: bfloat16 / float16 bits)
# bfloat16 by the CPU's conversion (AVX512-BF16 ``vcvtneps2bf16``: 1 instruction for 16 values where the rounding in
# integers takes 7). It reads float32 subnormals as zero, so it serves only chunks whose scales are all normal:
# then every value is 0 or at least the smallest normal in magnitude (|code - zp| >= 1), and the two agree bit for bit
_TINY = np.finfo(np.float32).tiny
_CVT = None  # whether the CPU numba compiles for has it (asked once)


def _bf16_format(scale: np.ndarray, c0: int, c1: int) -> int:
    global _CVT
    if _CVT is None:
        _CVT = host_has("avx512bf16")
    return _BF16_CVT if _CVT and scale[:, c0:c1].min() >= _TINY else _BF16


def _native_f16() -> bool:
    """Whether LLVM converts float32 to float16 in instructions here (x86: F16C; Arm64 has them): elsewhere it
    calls a runtime function that numba's JIT cannot link, so float16 tiles are float32 ones cast by NumPy."""
    return host_has("f16c") or platform.machine().lower() in ("aarch64", "arm64")


@intrinsic
def _dequant_block(typingctx, wb, t0, t1, k0, k1, out, scale, zp, bits, fmt):
    """out[k, (t - t0) * NT + j] = (code j of wb[t, k] - zp[g, t * NT + j]) * scale[g, t * NT + j] for rows
    k0..k1 and tiles t0..t1 (g = k // (K // G)), 16 values a step; one call for a whole chunk.

    4 bits: byte j of a tile row holds column j (low nibble) and column j + W (high nibble); without zero points
    the codes carry the offset 8. ``fmt`` (a literal): 0 float32 (``out`` float32), 1 bfloat16, 2 float16, 3
    bfloat16 by the CPU's conversion (``out`` uint16; 3 only for normal scales, and the same as 1 on a CPU without
    AVX512-BF16). Bit widths and zero points are run-time branches around whole loop nests.
    """
    if not isinstance(fmt, types.IntegerLiteral):
        return None
    form = fmt.literal_value
    if out.dtype != (types.float32 if form == _F32 else types.uint16):
        return None
    signed = wb.dtype == types.int8
    # formats never chosen on this CPU compile as the integer rounding: no runtime call for LLVM to emit
    if form == _BF16_CVT and not host_has("avx512bf16") or form == _F16 and not _native_f16():
        form = _BF16

    def codegen(context, builder, sig, args):
        w = context.make_array(sig.args[0])(context, builder, args[0])
        o = context.make_array(sig.args[5])(context, builder, args[5])
        sa = context.make_array(sig.args[6])(context, builder, args[6])
        za = context.make_array(sig.args[7])(context, builder, args[7])
        t0, t1, k0, k1, nbits_rt = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 3, 4, 8))
        _, k_all, width = cgutils.unpack_tuple(builder, w.shape, 3)
        _, ocols = cgutils.unpack_tuple(builder, o.shape, 2)
        srows, scols = cgutils.unpack_tuple(builder, sa.shape, 2)
        zrows, zcols = cgutils.unpack_tuple(builder, za.shape, 2)
        gsize = builder.udiv(k_all, srows)
        zero = ir.Constant(I64, 0)

        def const(v):
            return ir.Constant(I64, v)

        def splat(lanes, value):
            return ir.Constant(vec(I32, lanes), [value] * lanes)

        def vload(ptr, ty, off):
            return builder.load(builder.bitcast(builder.gep(ptr, [off]), ty.as_pointer()), align=1)

        def store(op, val, col, lanes):  # val: <lanes x float>
            dst = builder.gep(op, [col])
            if form == _F32:
                builder.store(val, builder.bitcast(dst, val.type.as_pointer()), align=4)
                return
            if form in (_F16, _BF16_CVT):
                half = builder.bitcast(builder.fptrunc(val, vec(F16 if form == _F16 else BF16, lanes)), vec(I16, lanes))
            else:  # bfloat16: round to nearest even on the bits (finite values: scales are validated)
                u = builder.bitcast(val, vec(I32, lanes))
                odd = builder.and_(builder.lshr(u, splat(lanes, 16)), splat(lanes, 1))
                u = builder.lshr(builder.add(builder.add(u, splat(lanes, 0x7FFF)), odd), splat(lanes, 16))
                half = builder.trunc(u, vec(I16, lanes))
            builder.store(half, builder.bitcast(dst, half.type.as_pointer()), align=2)

        def nest(nbits, with_zp):
            nt = builder.mul(width, const(2)) if nbits == 4 else width

            def emit(ptrs, ints, col, lanes):  # ints: <lanes x i32> codes of columns col..col+lanes
                op, sp, zp_ = ptrs
                if with_zp:
                    ints = builder.sub(ints, builder.zext(vload(zp_, vec(I8, lanes), col), vec(I32, lanes)))
                elif nbits == 4:
                    ints = builder.sub(ints, splat(lanes, 8))
                val = builder.fmul(builder.sitofp(ints, vec(F32, lanes)), vload(sp, vec(F32, lanes), col))
                store(op, val, col, lanes)

            def step(wp, ptrs, col, lanes):  # the codes of `lanes` bytes of a tile row from byte col
                b = vload(wp, vec(I8, lanes), col)
                if nbits == 8:
                    ints = builder.sext(b, vec(I32, lanes)) if signed else builder.zext(b, vec(I32, lanes))
                    emit(ptrs, ints, col, lanes)
                else:
                    z = builder.zext(b, vec(I32, lanes))
                    emit(ptrs, builder.and_(z, splat(lanes, 15)), col, lanes)
                    emit(ptrs, builder.lshr(z, splat(lanes, 4)), builder.add(col, width), lanes)

            with cgutils.for_range(builder, builder.sub(k1, k0)) as kl:
                k = builder.add(k0, kl.index)
                g = builder.udiv(k, gsize)
                orow = builder.gep(o.data, [builder.mul(k, ocols)])
                srow = builder.gep(sa.data, [builder.add(builder.mul(g, scols), builder.mul(t0, nt))])
                zrow = builder.gep(za.data, [builder.add(builder.mul(g, zcols), builder.mul(t0, nt))]) if with_zp else None
                with cgutils.for_range(builder, builder.sub(t1, t0)) as tl:
                    wp = builder.gep(w.data, [builder.mul(builder.add(builder.mul(builder.add(t0, tl.index), k_all), k),
                                                          width)])
                    off = builder.mul(tl.index, nt)
                    ptrs = (builder.gep(orow, [off]), builder.gep(srow, [off]),
                            builder.gep(zrow, [off]) if with_zp else None)
                    with cgutils.for_range(builder, builder.udiv(width, const(16))) as loop:
                        step(wp, ptrs, builder.mul(loop.index, const(16)), 16)
                    tail = builder.and_(width, const(8))  # rows of 8 (mod 16) bytes: 4-bit tiles of 16 columns
                    with builder.if_then(builder.icmp_unsigned("!=", tail, zero)):
                        step(wp, ptrs, builder.sub(width, const(8)), 8)

        has_zp = builder.icmp_unsigned("!=", zrows, zero)
        for nbits in (8, 4):
            for with_zp in (True, False):
                cond = builder.and_(builder.icmp_signed("==", nbits_rt, const(nbits)),
                                    has_zp if with_zp else builder.not_(has_zp))
                with builder.if_then(cond):
                    nest(nbits, with_zp)
        return context.get_dummy_value()

    return types.void(wb, t0, t1, k0, k1, out, scale, zp, bits, fmt), codegen


def _block(wb, t0, t1, k0, k1, out, scale, zp, bits, fmt):  # pragma: no cover - compiled only
    raise NotImplementedError


@overload(_block, inline="always")
def _block_typed(wb, t0, t1, k0, k1, out, scale, zp, bits, fmt):
    """``_dequant_block`` with the format as a literal, picked at run time among those of ``out``'s dtype."""
    if out.dtype == types.float32:
        def block32(wb, t0, t1, k0, k1, out, scale, zp, bits, fmt):
            _dequant_block(wb, t0, t1, k0, k1, out, scale, zp, bits, 0)
        return block32

    def block16(wb, t0, t1, k0, k1, out, scale, zp, bits, fmt):
        if fmt == 3:
            _dequant_block(wb, t0, t1, k0, k1, out, scale, zp, bits, 3)
        elif fmt == 2:
            _dequant_block(wb, t0, t1, k0, k1, out, scale, zp, bits, 2)
        else:
            _dequant_block(wb, t0, t1, k0, k1, out, scale, zp, bits, 1)
    return block16


@_cached
@njit(cache=True, nogil=True)
def _dequant_range(wb, bits, scale, zp, t0, t1, out, fmt, k0, k1):  # pragma: no cover - compiled
    # rows k0..k1 of W.T for the output channels of tiles t0..t1 (the layout: module docstring)
    _block(wb, t0, t1, k0, k1, out, scale, zp, bits, fmt)


#: the team kernel's operands (its chunks are ranges of K: the block's total); wb's dtype is the kernel's own
OPERANDS = _omp.Operands("dequant", T=_omp.I64, K=_omp.I64, W=_omp.I64, groups=_omp.I64, bits=_omp.I64,
                         zp_rows=_omp.I64, t0=_omp.I64, t1=_omp.I64, fmt=_omp.I64, wb=_omp.ADDR, scale=_omp.ADDR,
                         zp=_omp.ADDR, out=_omp.ADDR)
_read = OPERANDS.read


@njit(inline="always")
def _dequant_chunk(o, i, k0, k1, wdt, _y):  # pragma: no cover - compiled; rows k0..k1 on a thread of torch's team
    T, K, W, G, bits, t0, t1 = o.T, o.K, o.W, o.groups, o.bits, o.t0, o.t1
    NT = W * 2 if bits == 4 else W
    zrows = o.zp_rows
    wb = carray(o.wb, (T, K, W), wdt)
    scale = carray(o.scale, (G, T * NT), np.float32)
    zp = carray(o.zp, (zrows, T * NT if zrows else 0), np.uint8)
    if o.fmt == _F32:
        _dequant_range(wb, bits, scale, zp, t0, t1, carray(o.out, (K, (t1 - t0) * NT), np.float32), o.fmt, k0, k1)
    else:
        _dequant_range(wb, bits, scale, zp, t0, t1, carray(o.out, (K, (t1 - t0) * NT), np.uint16), o.fmt, k0, k1)
    return 0


def _team_dequant_i8(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _dequant_chunk, np.int8, 0)


def _team_dequant_u8(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _dequant_chunk, np.uint8, 0)


_TEAM_KERNELS = {True: _omp.TeamKernel(_team_dequant_i8), False: _omp.TeamKernel(_team_dequant_u8)}  # by signedness
_CHUNK_VALUES = 1 << 16  # values per claimed chunk at least (smaller: the hand-off costs more than it saves)
_NO_OUT = np.empty(0, np.float32)  # stands in for `out` in _omp.check_operands, which knows float32 outputs only


def dequant_tiles(wb: np.ndarray, bits: int, scale: np.ndarray, zp: np.ndarray, t0: int, t1: int,
                  out: np.ndarray) -> np.ndarray:
    """Write ``W.T`` for tiles ``t0..t1`` into ``out`` (``[K, (t1-t0)*NT]``, C-contiguous, float32, float16, or
    uint16 for bfloat16 bits); returns ``out``.

    ``wb`` int8/uint8 ``[T, K, W]`` (``W`` a multiple of 8: tiles of 16 columns and up), ``scale`` float32
    ``[G, T*NT]``, ``zp`` uint8 ``[G, T*NT]`` or ``[0, 0]``, all C-contiguous (checked: a ``TypeError`` /
    ``ValueError`` names the operand).
    """
    T, K, W = wb.shape if getattr(wb, "ndim", 0) == 3 else (0, 0, 0)
    G = scale.shape[0] if getattr(scale, "ndim", 0) == 2 and scale.shape[0] else 1
    if not 0 <= t0 <= t1 <= T:
        raise ValueError(f"tiles {t0}..{t1} are not within the {T} tiles of wb")
    NT = W * 2 if bits == 4 else W
    _omp.check_operands(wb, scale, zp, K // G, bits, _NO_OUT, (0,))
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.dtype.name not in OUT_DTYPES:
        raise TypeError(f"out must be {', '.join(OUT_DTYPES)} (uint16: bfloat16 bits), got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous (the kernel addresses it by its shape)")
    if out.shape != (K, (t1 - t0) * NT):
        raise ValueError(f"out must be {[K, (t1 - t0) * NT]}, got {list(out.shape)}")
    if W % 8:
        raise ValueError(f"tile rows of {W} bytes: the kernel reads 8 bytes at a time")
    if K == 0 or t1 == t0:
        return out
    fmt = {"float32": _F32, "uint16": _BF16, "float16": _F16}[out.dtype.name]
    if fmt == _F16 and not _native_f16():
        out[...] = dequant_tiles(wb, bits, scale, zp, t0, t1, np.empty(out.shape, np.float32))  # rounds to nearest even
        return out
    if fmt == _BF16:
        fmt = _bf16_format(scale, t0 * NT, t1 * NT)
    o = out if fmt == _F32 else out.view(np.uint16)
    per_row = (t1 - t0) * NT
    nchunks = int(min(K, max(1, K * per_row // _CHUNK_VALUES), 16 * _omp.team_size()))
    block = _omp.new_block(nchunks, K, OPERANDS.pack(T=T, K=K, W=W, groups=scale.shape[0], bits=bits,
                                                     zp_rows=zp.shape[0], t0=t0, t1=t1, fmt=fmt, wb=wb, scale=scale,
                                                     zp=zp, out=o))
    _omp.run(nchunks, _TEAM_KERNELS[wb.dtype == np.int8], block, _dequant_range, (wb, bits, scale, zp, t0, t1, o, fmt),
             K, max(1, _CHUNK_VALUES // per_row), nchunks=nchunks)
    return out
