"""Few-rows forward (2..``CPU_MAX_ROWS_NUMBA`` rows: short prompts, small batches) of the 8- and 4-bit blocked
layouts on the CPU: a register-blocked GEMM that decodes every code once per block of rows.

A leaf of :mod:`qtorch.layouts.blocked`. ``out[M, N] = x[M, K] @ ((code - zp) * scale).T`` from the blocked layout
(see ``layouts.blocked``): tiles ``wb[T, K, NT]`` (8 bits) or ``wb[T, K, NT/2]`` (4 bits, low nibble column ``j``,
high nibble column ``j + NT/2``), scale and zero point ``[G, N]``.

The micro-kernel ``_rows_strip`` is LLVM vector IR: for up to 6 rows of ``x`` and a strip of 16 output columns it
keeps 12 ``<8 x float>`` accumulators in registers while it walks a block of K: per step one load of 16 codes,
``code - zero_point`` in integers (exact), two conversions, then 6 broadcasts and 12 FMAs. Each group's sums are
scaled once into a float32 tile of totals. numba's own loop over the same arrays (the previous kernel) kept its
accumulators in memory: about twice the loads per FMA. Where numba compiles for AVX-512 (:data:`WIDE`) and a tile
row holds whole strips of 32 columns, the same kernel runs on ``<16 x float>`` vectors over up to 12 rows (24
accumulators of the 32 registers), and rows are chunked on multiples of 12: each conversion of codes serves twice
the rows, with the same sums in the same order, so the same bits. On a 2-core Zen 4 (104 rows, MiniLM's shapes) it
took 4-bit layers from 0.72-0.87x to 0.88-1.11x of MKL's float32 matmul and the main job from 0.85x to 1.1x. Work
units (a tile and a range of rows) are claimed by the threads of PyTorch's OpenMP team (:mod:`qtorch._omp`), or by
qcore's threads where torch has no such team.

Where a work unit has :data:`PANEL_BLOCKS` blocks of rows or more, each strip's codes are decoded once per block of K
into a float32 panel (16 KB, or 32 with 16-float vectors: in L1) that every block of rows then reads by FMAs with a
memory operand: a code is converted once a call instead of once per block of rows, and the conversions no longer
share the FMA ports. The same operations on each sum in the same order, so the same bits. On a 2-core Zen 3 (AVX2,
both threads): 104 rows of MiniLM's 1536 x 384 and 384 x 1536 layers 13-17% (8 bits) and 24-25% (4 bits) less time,
4096 x 4096 at 104 rows 16% / 23%, at 24 rows 5% / 13%; one block of rows (2-6 rows) took 13-22% more, hence the
threshold. The bias of float32 rows is added as the sums are stored (``bias``), not in a pass after.

>>> import numpy as np
>>> wb = np.ones((1, 4, 16), np.int8)                      # one tile: K = 4, 16 output channels, codes 1
>>> out = np.empty((2, 16), np.float32)
>>> x = np.array([[1, 2, 3, 4], [1, 1, 1, 1]], np.float32)
>>> gemm_blocked(x, wb, np.full((1, 16), 0.5, np.float32), np.zeros((0, 0), np.uint8), 4, 8, out)[:, :2]
array([[5., 5.],
       [2., 2.]], dtype=float32)
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _omp
from ._ir import F32 as _F32, I8 as _I8, I32 as _I32, I64 as _I64, host_has, vec
from ._ir import cached as _cached

__all__ = ["gemm_blocked", "wide_strips"]

MR = 6  # rows per micro-kernel call: 12 accumulators + 2 weight vectors + 1 broadcast = 15 of the 16 registers
# (with zero points 2 more vectors: LLVM keeps them in memory operands or spills; not measured separately)
#: where numba compiles for a CPU with AVX-512: strips of 2 x 16 columns and up to 12 rows, 24 accumulators of the
#: 32 registers, so each conversion of codes serves twice the rows and each FMA does twice the work
WIDE = host_has("avx512f")
MR_WIDE = 12
QUANTA = 4  # work units per thread at least (where the rows allow): the threads' shares even out
KB = 256  # rows of K per call at most: the codes of a block stay in L1 while the row blocks pass over them
#: the strips' codes decoded once into a float32 panel (per block of K) that every row block then reads, where a work
#: unit has at least this many row blocks: 0 never, 1 where a unit has PANEL_BLOCKS blocks of rows, 2 always
PANEL = 1
PANEL_BLOCKS = 3


def _vload(builder, ptr, ty, off):
    """IR: an unaligned load of a ``ty`` vector at ``ptr + off``."""
    return builder.load(builder.bitcast(builder.gep(ptr, [off]), ty.as_pointer()), align=1)


def _strip_zero_points(builder, za, g, n0, col, second, nbits: int, with_zp: bool, L: int) -> list:
    """IR: the two int32 vectors subtracted from a strip's codes (its zero points, the offset 8 of symmetric 4-bit
    codes), or ``[None, None]`` (signed 8-bit codes)."""
    vi, vb = vec(_I32, L), vec(_I8, L)
    if with_zp:
        _, zcols = cgutils.unpack_tuple(builder, za.shape, 2)
        zbase = builder.gep(za.data, [builder.add(builder.mul(g, zcols), builder.add(n0, col))])
        return [builder.zext(_vload(builder, zbase, vb, ir.Constant(_I64, 0)), vi),
                builder.zext(_vload(builder, zbase, vb, second), vi)]
    if nbits == 4:
        return [ir.Constant(vi, [8] * L)] * 2
    return [None, None]


def _strip_floats(builder, row, zvec, nbits: int, signed: bool, L: int) -> list:
    """IR: the floats ``code - zero point`` of a strip's ``2 L`` columns in one tile row at ``row`` (8 bits: two
    loads of ``L`` codes; 4 bits: ``L`` bytes, low nibbles then high), subtracted in integers (exact)."""
    vf, vi, vb = vec(_F32, L), vec(_I32, L), vec(_I8, L)
    if nbits == 8:
        ints = [builder.sext(_vload(builder, row, vb, ir.Constant(_I64, v * L)), vi) if signed
                else builder.zext(_vload(builder, row, vb, ir.Constant(_I64, v * L)), vi) for v in (0, 1)]
    else:
        z = builder.zext(_vload(builder, row, vb, ir.Constant(_I64, 0)), vi)
        ints = [builder.and_(z, ir.Constant(vi, [15] * L)), builder.lshr(z, ir.Constant(vi, [4] * L))]
    if zvec[0] is not None:
        ints = [builder.sub(v, zv) for v, zv in zip(ints, zvec)]
    return [builder.sitofp(v, vf) for v in ints]


@intrinsic
def _rows_strip(typingctx, wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, mr, has_zp, lanes):
    """tot[m0+i, tcol.. (2 vectors)] += scale * sum_{k in k0..k0+nk} x[m0+i, k] * (code - zp), i < mr.

    ``lanes`` L (8, or 16 on AVX-512) floats per vector. 8 bits: codes wb[t, k, col:col+2L] are columns
    col..col+2L of the tile. 4 bits: bytes wb[t, k, col:col+L] hold columns col..col+L (low nibbles) and
    col+W..col+W+L (high nibbles); without zero points the offset is 8. ``tot`` is float32 [rows, NT], the second
    vector of a row at tcol+L (8 bits) or tcol+W (4 bits).
    """
    if not (isinstance(bits, types.IntegerLiteral) and isinstance(mr, types.IntegerLiteral)
            and isinstance(has_zp, types.BooleanLiteral) and isinstance(lanes, types.IntegerLiteral)):
        return None
    nbits, nrows, with_zp, L = bits.literal_value, mr.literal_value, has_zp.literal_value, lanes.literal_value
    signed = wb.dtype == types.int8
    _V8F, _V8I = vec(_F32, L), vec(_I32, L)  # L lanes (8: one AVX2 register)

    def codegen(context, builder, sig, args):
        w = context.make_array(sig.args[0])(context, builder, args[0])
        xa = context.make_array(sig.args[5])(context, builder, args[5])
        ta = context.make_array(sig.args[7])(context, builder, args[7])
        sa = context.make_array(sig.args[9])(context, builder, args[9])
        za = context.make_array(sig.args[10])(context, builder, args[10])
        tt, kk0, n, col, m0, tcol, g, n0 = (context.cast(builder, args[i], sig.args[i], types.int64)
                                            for i in (1, 2, 3, 4, 6, 8, 11, 12))
        _, k_all, width = cgutils.unpack_tuple(builder, w.shape, 3)
        _, xk = cgutils.unpack_tuple(builder, xa.shape, 2)
        _, tn = cgutils.unpack_tuple(builder, ta.shape, 2)
        _, scols = cgutils.unpack_tuple(builder, sa.shape, 2)
        second = ir.Constant(_I64, L) if nbits == 8 else width  # offset of the strip's second L columns
        wp = builder.gep(w.data, [builder.add(builder.mul(builder.add(builder.mul(tt, k_all), kk0), width), col)])
        xrows = [builder.gep(xa.data, [builder.add(builder.mul(builder.add(m0, ir.Constant(_I64, i)), xk), kk0)])
                 for i in range(nrows)]

        zvec = _strip_zero_points(builder, za, g, n0, col, second, nbits, with_zp, L)
        zero = ir.Constant(_V8F, [0.0] * L)
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(2)] for _ in range(nrows)]  # -> registers
        lanes0 = ir.Constant(_V8I, [0] * L)
        with cgutils.for_range(builder, n) as loop:
            i = loop.index
            ws = _strip_floats(builder, builder.gep(wp, [builder.mul(i, width)]), zvec, nbits, signed, L)
            for r in range(nrows):
                xv = builder.load(builder.gep(xrows[r], [i]))
                xb = builder.shuffle_vector(builder.insert_element(ir.Constant(_V8F, ir.Undefined), xv,
                                                                   ir.Constant(_I32, 0)),
                                            ir.Constant(_V8F, ir.Undefined), lanes0)
                for v in (0, 1):
                    prod = builder.fmul(xb, ws[v], flags=("contract",))
                    builder.store(builder.fadd(builder.load(accs[r][v]), prod, flags=("contract",)), accs[r][v])
        # epilogue: the group's scale, once per block of K
        sbase = builder.gep(sa.data, [builder.add(builder.mul(g, scols), builder.add(n0, col))])
        scl = [builder.load(builder.bitcast(builder.gep(sbase, [off]), _V8F.as_pointer()), align=4)
               for off in (ir.Constant(_I64, 0), second)]
        for r in range(nrows):
            trow = builder.gep(ta.data, [builder.add(builder.mul(builder.add(m0, ir.Constant(_I64, r)), tn), tcol)])
            for v, off in ((0, ir.Constant(_I64, 0)), (1, second)):
                p = builder.bitcast(builder.gep(trow, [off]), _V8F.as_pointer())
                builder.store(builder.fadd(builder.load(p, align=4), builder.fmul(builder.load(accs[r][v]), scl[v])),
                              p, align=4)
        return context.get_dummy_value()

    return types.void(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, mr, has_zp, lanes), codegen


@intrinsic
def _decode_strip(typingctx, wb, t, k0, nk, col, zp, g, n0, panel, bits, has_zp, lanes):
    """panel[k, 0:2L] = the floats ``code - zp`` of the strip's ``2 L`` columns at rows k0..k0+nk of tile t (the
    values :func:`_rows_strip` computes per step, stored once for all the row blocks of a call)."""
    if not (isinstance(bits, types.IntegerLiteral) and isinstance(has_zp, types.BooleanLiteral)
            and isinstance(lanes, types.IntegerLiteral)):
        return None
    nbits, with_zp, L = bits.literal_value, has_zp.literal_value, lanes.literal_value
    signed = wb.dtype == types.int8
    vf = vec(_F32, L)

    def codegen(context, builder, sig, args):
        w = context.make_array(sig.args[0])(context, builder, args[0])
        za = context.make_array(sig.args[5])(context, builder, args[5])
        pa = context.make_array(sig.args[8])(context, builder, args[8])
        tt, kk0, n, col, g, n0 = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 3, 4, 6, 7))
        _, k_all, width = cgutils.unpack_tuple(builder, w.shape, 3)
        second = ir.Constant(_I64, L) if nbits == 8 else width
        wp = builder.gep(w.data, [builder.add(builder.mul(builder.add(builder.mul(tt, k_all), kk0), width), col)])
        zvec = _strip_zero_points(builder, za, g, n0, col, second, nbits, with_zp, L)
        with cgutils.for_range(builder, n) as loop:
            i = loop.index
            ws = _strip_floats(builder, builder.gep(wp, [builder.mul(i, width)]), zvec, nbits, signed, L)
            prow = builder.gep(pa.data, [builder.mul(i, ir.Constant(_I64, 2 * L))])
            for v, f in enumerate(ws):
                p = builder.bitcast(builder.gep(prow, [ir.Constant(_I64, v * L)]), vf.as_pointer())
                builder.store(f, p, align=32)
        return context.get_dummy_value()

    return types.void(wb, t, k0, nk, col, zp, g, n0, panel, bits, has_zp, lanes), codegen


@intrinsic
def _panel_strip(typingctx, panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, mr, lanes):
    """:func:`_rows_strip` on a decoded panel (:func:`_decode_strip`): tot[m0+i, tcol (+ second)] += scale *
    sum over the panel's rows of x[m0+i, k0+k] * panel[k], ``mr`` rows; the same operations in the same order."""
    if not (isinstance(mr, types.IntegerLiteral) and isinstance(lanes, types.IntegerLiteral)):
        return None
    nrows, L = mr.literal_value, lanes.literal_value
    vf, vi = vec(_F32, L), vec(_I32, L)

    def codegen(context, builder, sig, args):
        pa = context.make_array(sig.args[0])(context, builder, args[0])
        xa = context.make_array(sig.args[3])(context, builder, args[3])
        ta = context.make_array(sig.args[5])(context, builder, args[5])
        sa = context.make_array(sig.args[8])(context, builder, args[8])
        n, kk0, m0, tcol, sec, g, n0 = (context.cast(builder, args[i], sig.args[i], types.int64)
                                        for i in (1, 2, 4, 6, 7, 9, 10))
        _, xk = cgutils.unpack_tuple(builder, xa.shape, 2)
        _, tn = cgutils.unpack_tuple(builder, ta.shape, 2)
        _, scols = cgutils.unpack_tuple(builder, sa.shape, 2)
        xrows = [builder.gep(xa.data, [builder.add(builder.mul(builder.add(m0, ir.Constant(_I64, i)), xk), kk0)])
                 for i in range(nrows)]
        zero = ir.Constant(vf, [0.0] * L)
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(2)] for _ in range(nrows)]
        lanes0 = ir.Constant(vi, [0] * L)
        with cgutils.for_range(builder, n) as loop:
            i = loop.index
            prow = builder.gep(pa.data, [builder.mul(i, ir.Constant(_I64, 2 * L))])
            ws = [builder.load(builder.bitcast(builder.gep(prow, [ir.Constant(_I64, v * L)]), vf.as_pointer()),
                               align=32) for v in (0, 1)]
            for r in range(nrows):
                xv = builder.load(builder.gep(xrows[r], [i]))
                xb = builder.shuffle_vector(builder.insert_element(ir.Constant(vf, ir.Undefined), xv,
                                                                   ir.Constant(_I32, 0)),
                                            ir.Constant(vf, ir.Undefined), lanes0)
                for v in (0, 1):
                    prod = builder.fmul(xb, ws[v], flags=("contract",))
                    builder.store(builder.fadd(builder.load(accs[r][v]), prod, flags=("contract",)), accs[r][v])
        sbase = builder.gep(sa.data, [builder.add(builder.mul(g, scols), builder.add(n0, tcol))])
        scl = [builder.load(builder.bitcast(builder.gep(sbase, [off]), vf.as_pointer()), align=4)
               for off in (ir.Constant(_I64, 0), sec)]
        for r in range(nrows):
            trow = builder.gep(ta.data, [builder.add(builder.mul(builder.add(m0, ir.Constant(_I64, r)), tn), tcol)])
            for v, off in ((0, ir.Constant(_I64, 0)), (1, sec)):
                p = builder.bitcast(builder.gep(trow, [off]), vf.as_pointer())
                builder.store(builder.fadd(builder.load(p, align=4), builder.fmul(builder.load(accs[r][v]), scl[v])),
                              p, align=4)
        return context.get_dummy_value()

    return types.void(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, mr, lanes), codegen


@njit(inline="always")
def _pstrip(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, mr, wide):  # pragma: no cover - compiled
    if wide:
        if mr == 12:
            _panel_strip(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, 12, 16)
        elif mr == 8:
            _panel_strip(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, 8, 16)
        elif mr == 4:
            _panel_strip(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, 4, 16)
        elif mr == 2:
            _panel_strip(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, 2, 16)
        else:
            _panel_strip(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, 1, 16)
    elif mr == 6:
        _panel_strip(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, 6, 8)
    elif mr == 5:
        _panel_strip(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, 5, 8)
    elif mr == 4:
        _panel_strip(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, 4, 8)
    elif mr == 3:
        _panel_strip(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, 3, 8)
    elif mr == 2:
        _panel_strip(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, 2, 8)
    else:
        _panel_strip(panel, nk, k0, x, m0, tot, tcol, second, scale, g, n0, 1, 8)


@njit(inline="always")
def _decode(wb, t, k0, nk, col, zp, g, n0, panel, bits, has_zp, wide):  # pragma: no cover - compiled
    if wide:
        _decode_strip(wb, t, k0, nk, col, zp, g, n0, panel, bits, has_zp, 16)
    else:
        _decode_strip(wb, t, k0, nk, col, zp, g, n0, panel, bits, has_zp, 8)


@njit(inline="always")
def _strip(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, mr, has_zp, wide):  # pragma: no cover
    # literal dispatch on the rows of this block and the lanes; bits and has_zp arrive as literals from the call
    # sites. Wide blocks take 12, 8, 4, 2 or 1 rows (:func:`_block_rows`), narrow ones 1..6
    if wide:
        if mr == 12:
            _rows_strip(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, 12, has_zp, 16)
        elif mr == 8:
            _rows_strip(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, 8, has_zp, 16)
        elif mr == 4:
            _rows_strip(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, 4, has_zp, 16)
        elif mr == 2:
            _rows_strip(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, 2, has_zp, 16)
        else:
            _rows_strip(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, 1, has_zp, 16)
    elif mr == 6:
        _rows_strip(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, 6, has_zp, 8)
    elif mr == 5:
        _rows_strip(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, 5, has_zp, 8)
    elif mr == 4:
        _rows_strip(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, 4, has_zp, 8)
    elif mr == 3:
        _rows_strip(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, 3, has_zp, 8)
    elif mr == 2:
        _rows_strip(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, 2, has_zp, 8)
    else:
        _rows_strip(wb, t, k0, nk, col, x, m0, tot, tcol, scale, zp, g, n0, bits, 1, has_zp, 8)


@njit(inline="always")
def _block_rows(rem, wide):  # pragma: no cover - compiled
    # rows of the next register block: up to MR (narrow), or the largest of 12, 8, 4, 2, 1 that fits (wide)
    if not wide:
        return min(MR, rem)
    if rem >= MR_WIDE:
        return MR_WIDE
    if rem >= 8:
        return 8
    if rem >= 4:
        return 4
    return 2 if rem >= 2 else 1


@njit(inline="always")
def _chunk_start(M, c, mchunks, wide):  # pragma: no cover - compiled
    # first row of chunk c of M rows: wide chunks start on multiples of MR_WIDE, so they split into whole
    # 12-row blocks (104 rows in 3 chunks: 36 + 36 + 32 rows, not 34 + 35 + 35 with 2- and 1-row tails)
    if c >= mchunks:
        return M
    r = M * c // mchunks
    return min(M, (r + MR_WIDE // 2) // MR_WIDE * MR_WIDE) if wide else r


@_cached
@njit(cache=True, nogil=True)
def _gemm_units(x, wb, scale, zp, gsize, bits, out, bias, mchunks, wide, panel, u0, u1):  # pragma: no cover - compiled
    # work unit u: tile u // mchunks, rows chunk u % mchunks of x; ``wide``: 16-float vectors (the caller checked
    # that a tile row holds whole strips of 32 columns)
    M, K = x.shape
    T, _, W = wb.shape
    NT = W * 2 if bits == 4 else W
    has_zp = zp.shape[0] > 0
    lanes = 16 if wide else 8
    step = 2 * lanes if bits == 8 else lanes  # bytes of a tile row per strip (2 x lanes columns)
    second = lanes if bits == 8 else W  # the strip's second vector: columns and scales this far on
    pan = np.empty(KB * 2 * lanes, np.float32) if panel else np.empty(0, np.float32)  # 16 / 32 KB: L1
    for u in range(u0, u1):
        t = u // mchunks
        c = u % mchunks
        r0 = _chunk_start(M, c, mchunks, wide)
        r1 = _chunk_start(M, c + 1, mchunks, wide)
        n0 = t * NT
        tot = np.zeros((r1 - r0, NT), np.float32)
        xs = x[r0:r1]
        # decode into a panel where at least PANEL_BLOCKS row blocks share it (else as many decodes as blocks)
        use_panel = panel == 2 or (panel == 1 and r1 - r0 >= PANEL_BLOCKS * (MR_WIDE if wide else MR))
        k = 0
        while use_panel and k < K:  # each strip's codes decoded once into a float32 panel, then every row block
            g = k // gsize
            nk = min(KB, (g + 1) * gsize - k)
            for col in range(0, W, step):
                if bits == 8 and has_zp:
                    _decode(wb, t, k, nk, col, zp, g, n0, pan, 8, True, wide)
                elif bits == 8:
                    _decode(wb, t, k, nk, col, zp, g, n0, pan, 8, False, wide)
                elif has_zp:
                    _decode(wb, t, k, nk, col, zp, g, n0, pan, 4, True, wide)
                else:
                    _decode(wb, t, k, nk, col, zp, g, n0, pan, 4, False, wide)
                m0 = 0
                while m0 < r1 - r0:
                    mr = _block_rows(r1 - r0 - m0, wide)
                    _pstrip(pan, nk, k, xs, m0, tot, col, second, scale, g, n0, mr, wide)
                    m0 += mr
            k += nk
        while not use_panel and k < K:
            g = k // gsize
            nk = min(KB, (g + 1) * gsize - k)
            m0 = 0
            while m0 < r1 - r0:
                mr = _block_rows(r1 - r0 - m0, wide)
                for col in range(0, W, step):
                    if bits == 8 and has_zp:
                        _strip(wb, t, k, nk, col, xs, m0, tot, col, scale, zp, g, n0, 8, mr, True, wide)
                    elif bits == 8:
                        _strip(wb, t, k, nk, col, xs, m0, tot, col, scale, zp, g, n0, 8, mr, False, wide)
                    elif has_zp:
                        _strip(wb, t, k, nk, col, xs, m0, tot, col, scale, zp, g, n0, 4, mr, True, wide)
                    else:
                        _strip(wb, t, k, nk, col, xs, m0, tot, col, scale, zp, g, n0, 4, mr, False, wide)
                m0 += mr
            k += nk
        for i in range(r1 - r0):
            o = out[r0 + i, n0:n0 + NT]
            tr = tot[i]
            if bias.shape[0]:  # the bias added as the sums are stored: the same float32 sum as adding it after
                b = bias[n0:n0 + NT]
                for j in range(NT):
                    o[j] = tr[j] + b[j]
            else:
                for j in range(NT):
                    o[j] = tr[j]


#: the team kernel's operands (its chunks are the work units: the block's total); wb's dtype is the kernel's own;
#: ``bits``: the code width, | 256 for 16-float vectors, | the panel mode (:data:`PANEL`) << 9, | 2048 where there
#: are zero points (a row per group), | 4096 where ``bias`` is one (float32 ``[N]``)
OPERANDS = _omp.Operands("gemm", row_chunks=_omp.I64, M=_omp.I64, T=_omp.I64, K=_omp.I64, W=_omp.I64,
                         gsize=_omp.I64, bits=_omp.I64, x=_omp.ADDR, wb=_omp.ADDR,
                         scale=_omp.ADDR, zp=_omp.ADDR, out=_omp.ADDR, bias=_omp.ADDR)
_read = OPERANDS.read


@njit(inline="always")
def _gemm_chunk(o, i, u0, u1, wdt, _y):  # pragma: no cover - compiled; units u0..u1 on a thread of torch's team
    M, T, K, W, G, bits = o.M, o.T, o.K, o.W, o.K // o.gsize, o.bits & 255
    NT = W * 2 if bits == 4 else W
    zrows = G if (o.bits >> 11) & 1 else 0
    _gemm_units(carray(o.x, (M, K), np.float32), carray(o.wb, (T, K, W), wdt),
                carray(o.scale, (G, T * NT), np.float32), carray(o.zp, (zrows, T * NT if zrows else 0), np.uint8),
                o.gsize, bits, carray(o.out, (M, T * NT), np.float32),
                carray(o.bias, (T * NT if (o.bits >> 12) & 1 else 0,), np.float32), o.row_chunks, (o.bits >> 8) & 1,
                (o.bits >> 9) & 3, u0, u1)
    return 0


def _team_gemm_i8(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _gemm_chunk, np.int8, 0)


def _team_gemm_u8(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _gemm_chunk, np.uint8, 0)


_TEAM_KERNELS = {True: _omp.TeamKernel(_team_gemm_i8), False: _omp.TeamKernel(_team_gemm_u8)}  # by signedness


def _row_chunks(M: int, T: int, nthreads: int, mr: int = MR) -> int:
    """Chunks of rows per tile: enough work units for the threads (4 per thread), each at least ``mr`` rows."""
    want = -(-QUANTA * nthreads // max(T, 1))
    return max(1, min(want, M // mr))


def wide_strips(W: int, bits: int) -> bool:
    """Whether the kernel reads tiles of ``W`` bytes a row in 16-float vectors: the host has AVX-512 and a row
    holds whole strips of 32 columns (32 bytes at 8 bits, 16 at 4 bits); else 8-float vectors.

    >>> wide_strips(64, 8) == WIDE, wide_strips(16, 8), wide_strips(8, 4)
    (True, False, False)
    """
    return WIDE and W % (32 if bits == 8 else 16) == 0


def gemm_blocked(x: np.ndarray, wb: np.ndarray, scale: np.ndarray, zp: np.ndarray, gsize: int, bits: int,
                 out: np.ndarray, *, wide: bool | None = None, panel: bool | None = None,
                 bias: np.ndarray | None = None) -> np.ndarray:
    """``out = x @ ((code - zp) * scale).T`` for float32 ``x[M, K]`` from the blocked layout; returns ``out``.

    ``wb`` int8/uint8 ``[T, K, W]`` (``W`` a multiple of 16 at 8 bits, of 8 at 4 bits), ``scale`` float32
    ``[G, T*NT]``, ``zp`` uint8 ``[G, T*NT]`` or ``[0, 0]``, ``gsize * G == K``, ``out`` float32 ``[M, T*NT]``; all
    C-contiguous (checked: a ``TypeError`` / ``ValueError`` names the operand). ``wide`` (default: the host
    has AVX-512, :func:`wide_strips`) reads 16-float vectors where a tile row allows it; same sums either way.
    ``panel`` (default: where a work unit has :data:`PANEL_BLOCKS` blocks of rows) decodes each strip's codes once
    per block of K into a float32 panel that every block of rows reads; the same sums again. ``bias`` (float32
    ``[T*NT]``, C-contiguous) is added to the sums as they are stored: ``out`` is then ``x @ W.T + bias``, the
    same bits as adding it after.
    """
    if panel is not None and not isinstance(panel, bool):
        raise TypeError(f"panel must be a bool or None, got {type(panel).__name__}")
    T, K, W = wb.shape if getattr(wb, "ndim", 0) == 3 else (0, 0, 0)
    M = x.shape[0] if getattr(x, "ndim", 0) == 2 else 0
    _omp.check_operands(wb, scale, zp, gsize, bits, out, (M, T * (W * 2 if bits == 4 else W)), x=x, x_shape=(M, K))
    if W % (16 if bits == 8 else 8):
        raise ValueError(f"tile rows of {W} bytes: the kernel reads strips of {16 if bits == 8 else 8} bytes")
    if bias is not None:
        if not isinstance(bias, np.ndarray) or bias.dtype != np.float32:
            raise TypeError(f"bias must be a float32 NumPy array, got {getattr(bias, 'dtype', type(bias).__name__)}")
        if bias.shape != (out.shape[1],) or not bias.flags.c_contiguous:
            raise ValueError(f"bias must be C-contiguous of shape ({out.shape[1]},), got {bias.shape}")
    _run(x, wb, scale, zp, gsize, bits, out, x.ctypes.data, wb.ctypes.data, scale.ctypes.data, zp.ctypes.data,
         out.ctypes.data, wide, None if panel is None else 2 * panel, bias)
    return out


def _gemm_tensors(x, wb, scale, zp, gsize: int, bits: int, out, bias=None):
    """:func:`gemm_blocked` on CPU torch tensors that ``layouts.blocked`` built (contiguous, of the
    layout's dtypes and shapes): the forward's entry, where a tensor's address costs less to get than an array's.
    ``bias``: a contiguous float32 tensor ``[N]`` added to the sums as they are stored, or None."""
    _run(x.numpy(), wb.numpy(), scale.numpy(), zp.numpy(), gsize, bits, out.numpy(), x.data_ptr(), wb.data_ptr(),
         scale.data_ptr(), zp.data_ptr(), out.data_ptr(), bias=None if bias is None else bias.numpy())
    return out


_NO_BIAS = np.empty(0, np.float32)


def _run(x, wb, scale, zp, gsize, bits, out, xa, wa, sa, za, oa, wide=None, panel=None, bias=None) -> None:
    # the arrays (for qcore's threads) and their addresses (for the team kernel's block) of the same operands
    M, K = x.shape
    T, _, W = wb.shape
    if K == 0:
        out[:] = 0 if bias is None else bias
        return
    if M == 0 or T == 0:
        return
    wide = wide_strips(W, bits) if wide is None else bool(wide) and W % (32 if bits == 8 else 16) == 0
    mch = _row_chunks(M, T, _omp.team_size(), MR_WIDE if wide else MR)
    pan = PANEL if panel is None else int(panel)
    units = T * mch
    bias = _NO_BIAS if bias is None else bias
    block = _omp.new_block(units, units, OPERANDS.pack(row_chunks=mch, M=M, T=T, K=K, W=W, gsize=gsize,
                                                       bits=(bits | wide << 8 | pan << 9 | (zp.shape[0] > 0) << 11
                                                             | (bias.size > 0) << 12),
                                                       x=xa, wb=wa, scale=sa, zp=za, out=oa,
                                                       bias=bias.ctypes.data if bias.size else 0))
    _omp.run(units, _TEAM_KERNELS[wb.dtype == np.int8], block, _gemm_units,
             (x, wb, scale, zp, gsize, bits, out, bias, mch, wide, pan), units, 1, nchunks=units)



_X, _OUT, _BIAS, _BITS = (OPERANDS.slot(f) for f in ("x", "out", "bias", "bits"))


class Runner:
    """The few-rows call of one layer's blocked buffers with everything but ``x``, the output and the bias fixed:
    ``runner(xa, M, oa, ba)`` computes ``out[M, N] = x[M, K] @ W.T (+ bias)`` (float32, C-contiguous, at the
    addresses ``xa`` / ``oa``; ``ba``: the float32 bias ``[N]``, or 0). What ``layouts.blocked``'s runner calls for
    every call of several rows: the team block of each row count is built once and reused (a 104 x 384 call on a
    384 x 384 layer, 2-core Zen 3: 229-281 us with the bias, against 287-357 through ``gemm_blocked_impl`` and an
    ``add_`` of the bias after it, medians of calls in turn).

    >>> wb, scale = np.ones((1, 4, 16), np.int8), np.full((1, 16), 0.5, np.float32)
    >>> zp, x, out = np.zeros((0, 0), np.uint8), np.ones((2, 4), np.float32), np.empty((2, 16), np.float32)
    >>> r = Runner(wb, scale, zp, 4, 8, wb.ctypes.data, scale.ctypes.data, zp.ctypes.data)
    >>> r(x.ctypes.data, 2, out.ctypes.data, 0); out[:, 0].tolist()
    [2.0, 2.0]
    """

    __slots__ = ("arrays", "T", "wide", "operands", "team", "blocks")

    #: row counts whose blocks are kept (a model calls with a few; past this many, the kept ones are dropped)
    KEPT_ROWS = 16

    def __init__(self, wb, scale, zp, gsize: int, bits: int, wa: int, sa: int, za: int):
        T, K, W = wb.shape
        self.arrays = (wb, scale, zp)  # kept alive while the addresses are in use
        self.T = T
        self.wide = wide_strips(W, bits)
        self.operands = dict(row_chunks=0, M=0, T=T, K=K, W=W, gsize=gsize,
                             bits=bits | self.wide << 8 | PANEL << 9 | (zp.shape[0] > 0) << 11, x=0, wb=wa,
                             scale=sa, zp=za, out=0, bias=0)
        self.team = _TEAM_KERNELS[wb.dtype == np.int8]
        self.blocks = {}  # rows -> (template block, free blocks, work units)

    def _template(self, M: int) -> tuple:
        mch = _row_chunks(M, self.T, _omp.team_size(), MR_WIDE if self.wide else MR)
        units = self.T * mch
        template = _omp.new_block(units, units, OPERANDS.pack(**dict(self.operands, row_chunks=mch, M=M)))
        if len(self.blocks) >= self.KEPT_ROWS:
            self.blocks.clear()
        entry = self.blocks[M] = (template, [], units)
        return entry

    def __call__(self, xa: int, M: int, oa: int, ba: int) -> None:
        entry = self.blocks.get(M)
        if entry is None:
            entry = self._template(M)
        template, free, units = entry
        block, address = _omp.take_block(template, free)
        block[_X], block[_OUT] = xa, oa
        if ba:
            block[_BIAS] = ba
            block[_BITS] |= 1 << 12
        team = self.team
        _omp.run(units, team, block, _omp.on_caller, (team, block), units, 1, units, address)
        _omp.give_block(free, block, address)
