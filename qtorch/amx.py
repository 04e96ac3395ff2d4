"""Forward of the 8- and 4-bit blocked layouts on AMX tiles (Intel CPUs with AMX-BF16), any row count.

A leaf of :mod:`qtorch.layouts.blocked`. ``out[M, N] = x[M, K] @ ((code - zp) * scale).T`` from the blocked layout
(see ``layouts.blocked``): tiles ``wb[T, K, NT]`` (8 bits) or ``wb[T, K, NT/2]`` (4 bits, low nibble column ``j``,
high nibble column ``j + NT/2``; symmetric codes carry the offset 8), scale and zero point ``[G, N]``.

No dequantized weight is ever written: for a strip of 16 output channels and a block of K (``KB`` rows at most),
``code - zp`` (an integer of magnitude <= 255, exact in bfloat16) is converted into a small panel in the VNNI order
of AMX's B operand, ``B[kp][2n + j] = code[2kp + j][n] - zp``, that stays in L1 while every block of 16 rows of
``x`` is multiplied by it (``tdpbf16ps``, float32 accumulation in the C tiles, 2 x 2 tiles per step). The
activations are split exactly into bfloat16 parts, ``x = x_1 + x_2 + x_3`` (float32: three, each the bfloat16
rounding of what is left; float16: two; bfloat16: one): a product of two bfloat16 values is exact in float32, so
all parts accumulate into the same C tile and the result has float32 accuracy (AMX reads bfloat16 subnormals as
zero: a float32 whose last part falls below 2^-126 loses that part). At the end of each group the C tiles are
scaled into a float32 accumulator of the work unit, copied into the output at its end.

Eligible (:func:`eligible`) where K % 32 == 0 and each group holds a multiple of 32 rows of K, and the process
may use AMX (:func:`available`: numba compiles for a CPU with ``amx-tile`` and ``amx-bf16``, and Linux granted
the tile data state, ``arch_prctl(ARCH_REQ_XCOMP_PERM)``, asked once per process; a forked child inherits it).
Work units are the strips whose codes share a 64-byte line of a tile row (8 bits: up to 4 strips; 4 bits: both
nibbles of 32 bytes), so each line is fetched once; each block prefetches the next block's lines while it converts
and multiplies. The units are claimed by the threads of PyTorch's OpenMP team.

>>> import numpy as np
>>> wb = np.ones((1, 32, 16), np.int8)                     # one tile: K = 32, 16 output channels, codes 1
>>> x = np.stack([np.ones(32, np.float32), np.arange(32, dtype=np.float32)])
>>> out = np.empty((2, 16), np.float32)
>>> if available():
...     out = amx_blocked(x, wb, np.full((1, 16), 0.5, np.float32), np.zeros((0, 0), np.uint8), 32, 8, out)
... else:
...     out[:] = [[16.0], [248.0]]
>>> out[:, :2]
array([[ 16.,  16.],
       [248., 248.]], dtype=float32)
"""

from __future__ import annotations

import ctypes
import platform
import sys
import threading

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _omp
from ._ir import AMX_TILE, BF16, F32, I8, I16, I32, I64, host_has, vec

__all__ = ["available", "eligible", "amx_blocked", "amx_linear"]

KB = 256  # rows of K per panel at most: 16 channels x 256 rows = 8 KB of bfloat16; up to 4 strips stay in L1
_ROWS = 16  # rows of a tile (A and C), and K pairs of a B tile
#: rows of x per kernel call at most: bounds the temporary parts of x (3 x 1024 x K bfloat16 for float32) while
#: each weight panel still serves 1024 rows
ROW_CHUNK = 1024
_PARTS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}  # bfloat16 parts that hold the value exactly

# float32 -> bfloat16 by the CPU's conversion (AVX512-BF16): exact for the codes (small integers); for the parts
# of x it rounds to nearest even as the integer rounding does, and reads subnormals as zero, as AMX does anyway
_CVT = host_has("avx512bf16")
_LOCK = threading.Lock()
_AVAILABLE = None


def _request_tile_state() -> bool:
    """Ask Linux for the AMX tile data state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``): without it
    the first tile instruction kills the process. Granted per process, inherited by a fork."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sys_arch_prctl = {"x86_64": 158}.get(platform.machine().lower())  # SYS_arch_prctl
        if sys_arch_prctl is None:
            return False
        return libc.syscall(sys_arch_prctl, 0x1023, 18) == 0  # ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    except (OSError, AttributeError):  # pragma: no cover - no libc symbol
        return False


def available() -> bool:
    """Whether this process may run the AMX kernel: numba compiles for a CPU with AMX tiles and their bfloat16 dot
    product, and Linux granted the tile state (asked once)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        with _LOCK:
            if _AVAILABLE is None:
                _AVAILABLE = host_has("amx-tile") and host_has("amx-bf16") and _request_tile_state()
    return _AVAILABLE


def eligible(in_features: int, group_size: int) -> bool:
    """Whether the kernel serves a layer of ``in_features`` with groups of ``group_size`` along K (K itself for
    one group): whole 32-row steps of K inside each group. Says nothing about the CPU (:func:`available`).

    >>> eligible(384, 384), eligible(384, 128), eligible(4096, 48), eligible(100, 100)
    (True, True, False, False)
    """
    return in_features > 0 and in_features % 32 == 0 and group_size > 0 and group_size % 32 == 0


@intrinsic
def _vnni_panel(typingctx, wb, base, npairs, zp, zbase, buf, boff, pf, mode, has_zp):
    """buf[boff + 32 kp + 2 n + j] = bfloat16(code(k0 + 2 kp + j, n) - zp[n]) for 16 channels n and ``npairs``
    pairs of rows of K, read from ``wb`` at element offset ``base`` (row k0, the strip's first byte).

    ``mode`` (literal) 8: 16 bytes a row are 16 codes (int8 sign-extended, uint8 zero-extended); 0 / 1: 16 bytes
    a row, their low / high nibbles; 2: 8 bytes a row, low nibbles then high nibbles (a 4-bit tile of 16 columns).
    ``has_zp`` (literal): subtract ``zp[zbase:zbase+16]`` (uint8); else 4-bit codes subtract 8, 8-bit nothing.
    Each pair of rows also prefetches the pair ``pf`` bytes further on (the next block's: memory streams while
    this block converts and multiplies).
    """
    if not (isinstance(mode, types.IntegerLiteral) and isinstance(has_zp, types.BooleanLiteral)):
        return None
    m, with_zp = mode.literal_value, has_zp.literal_value
    signed = m == 8 and wb.dtype == types.int8

    def codegen(context, builder, sig, args):
        w = context.make_array(sig.args[0])(context, builder, args[0])
        za = context.make_array(sig.args[3])(context, builder, args[3])
        ba = context.make_array(sig.args[5])(context, builder, args[5])
        base, npairs, zbase, boff, pf = (context.cast(builder, args[i], sig.args[i], types.int64)
                                         for i in (1, 2, 4, 6, 7))
        prefetch = _amx_fn(builder, "llvm.prefetch.p0", ir.VoidType(), [I8.as_pointer(), I32, I32, I32])
        _, _, width = cgutils.unpack_tuple(builder, w.shape, 3)
        v16b, v16s, v32s = vec(I8, 16), vec(I16, 16), vec(I16, 32)
        inter = ir.Constant(vec(I32, 32), [i // 2 + (16 if i % 2 else 0) for i in range(32)])

        def codes(ptr):  # <16 x i16> codes of one row of K
            if m == 2:
                b8 = builder.load(builder.bitcast(ptr, vec(I8, 8).as_pointer()), align=1)
                both = builder.shuffle_vector(b8, ir.Constant(vec(I8, 8), ir.Undefined),
                                              ir.Constant(vec(I32, 16), list(range(8)) * 2))
                wide = builder.zext(both, v16s)
                lo = builder.and_(wide, ir.Constant(v16s, [15] * 16))
                hi = builder.lshr(wide, ir.Constant(v16s, [4] * 16))
                sel = ir.Constant(vec(ir.IntType(1), 16), [1] * 8 + [0] * 8)
                return builder.select(sel, lo, hi)
            b = builder.load(builder.bitcast(ptr, v16b.as_pointer()), align=1)
            wide = builder.sext(b, v16s) if signed else builder.zext(b, v16s)
            if m == 0:
                return builder.and_(wide, ir.Constant(v16s, [15] * 16))
            if m == 1:
                return builder.lshr(wide, ir.Constant(v16s, [4] * 16))
            return wide

        zvec = None
        if with_zp:
            zb = builder.load(builder.bitcast(builder.gep(za.data, [zbase]), v16b.as_pointer()), align=1)
            zvec = builder.zext(zb, v16s)
        elif m != 8:
            zvec = ir.Constant(v16s, [8] * 16)
        src = builder.gep(w.data, [base])
        dst = builder.gep(ba.data, [boff])
        v16i, v16f = vec(I32, 16), vec(F32, 16)
        if zvec is not None:
            zvec = builder.sext(zvec, v16i)

        def to_bf16(c):  # <16 x i32>, integers of at most 9 significant bits: exact in bfloat16
            f = builder.sitofp(c, v16f)
            if _CVT:
                return builder.bitcast(builder.fptrunc(f, vec(BF16, 16)), v16s)
            # without the CPU's conversion: the float32 bits end in 16 zeros, the upper half is the bfloat16
            return builder.trunc(builder.lshr(builder.bitcast(f, v16i), ir.Constant(v16i, [16] * 16)), v16s)

        with cgutils.for_range(builder, npairs) as loop:
            i = loop.index
            r0 = builder.gep(src, [builder.mul(builder.mul(i, ir.Constant(I64, 2)), width)])
            r1 = builder.gep(r0, [width])
            for r in (r0, r1):  # a prefetch never faults: past the end of the codes is harmless
                builder.call(prefetch, [builder.bitcast(builder.gep(r, [pf]), I8.as_pointer()), ir.Constant(I32, 0),
                                        ir.Constant(I32, 2), ir.Constant(I32, 1)])
            c0, c1 = (builder.sext(codes(r), v16i) for r in (r0, r1))
            if zvec is not None:
                c0, c1 = builder.sub(c0, zvec), builder.sub(c1, zvec)
            if _CVT:  # both rows in one conversion (vcvtne2ps2bf16), then one word permutation (vpermw)
                both = builder.shuffle_vector(builder.sitofp(c0, v16f), builder.sitofp(c1, v16f),
                                              ir.Constant(vec(I32, 32), list(range(32))))
                both = builder.bitcast(builder.fptrunc(both, vec(BF16, 32)), v32s)
                pair = builder.shuffle_vector(both, ir.Constant(v32s, ir.Undefined), inter)
            else:
                pair = builder.shuffle_vector(to_bf16(c0), to_bf16(c1), inter)  # rows of the pair interleaved
            out = builder.gep(dst, [builder.mul(i, ir.Constant(I64, 32))])
            builder.store(pair, builder.bitcast(out, v32s.as_pointer()), align=2)
        return context.get_dummy_value()

    return types.void(wb, base, npairs, zp, zbase, buf, boff, pf, mode, has_zp), codegen


def _amx_fn(builder, name, ret, argtys):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, argtys), name)


@intrinsic
def _amx_block(typingctx, xp, abase, rbs, pstride, nk, gl, buf, boff, bstride, cb, coff, ldc, first, last, acc, aoff0,
               aoff1, ldacc, scale, soff0, soff1, sld, zero, ns, nr, parts):
    """The rows ``nr`` x 16 and channels ``ns`` x 16 (literals, at most 2 x 2) of ``x @ B`` over ``nk`` rows of K
    (a multiple of 32), in runs of ``gl`` rows (``nk`` itself, or one group), each run's float32 C tiles kept in
    tile registers.

    A: bfloat16 bits ``xp`` (int16) in 1 KB tiles (:func:`split_rows`), part ``p``, row block ``r``, column ``kk`` at
    element ``abase + p pstride + r rbs + 16 kk``; B: the panel ``buf`` (int16) of strip ``s`` at ``boff + s
    bstride``, 32 elements per pair of K rows. A run starts from zero where ``first`` (else from the partial sums
    in ``cb``, float32 at ``coff + 16 r ldc + 16 s``) and ends in ``cb``; where ``last`` (the run ends its group,
    ``j``-th run: group row ``j`` of ``scale`` at ``soff_s + j sld``) the sums are then scaled into ``acc``
    (float32, row stride ``ldacc``, strip ``s`` at ``aoff_s``): ``acc += C * scale``. ``zero``: 16 zero float32 (a
    C tile loaded with row stride 0).
    """
    if not all(isinstance(v, types.IntegerLiteral) for v in (ns, nr, parts)):
        return None
    nstrips, nrows, nparts = ns.literal_value, nr.literal_value, parts.literal_value

    def codegen(context, builder, sig, args):
        xa = context.make_array(sig.args[0])(context, builder, args[0])
        ba = context.make_array(sig.args[6])(context, builder, args[6])
        ca = context.make_array(sig.args[9])(context, builder, args[9])
        aa = context.make_array(sig.args[14])(context, builder, args[14])
        sa = context.make_array(sig.args[18])(context, builder, args[18])
        za = context.make_array(sig.args[22])(context, builder, args[22])
        (abase, rbs, pstride, nk, gl, boff, bstride, coff, ldc, first, last, aoff0, aoff1, ldacc, soff0, soff1,
         sld) = (context.cast(builder, args[i], sig.args[i], types.int64)
                 for i in (1, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 15, 16, 17, 19, 20, 21))
        aoffs, soffs = (aoff0, aoff1), (soff0, soff1)
        i8p = I8.as_pointer()
        load = _amx_fn(builder, "llvm.x86.tileloadd64.internal", AMX_TILE, [I16, I16, i8p, I64])
        store = _amx_fn(builder, "llvm.x86.tilestored64.internal", ir.VoidType(), [I16, I16, i8p, I64, AMX_TILE])
        dp = _amx_fn(builder, "llvm.x86.tdpbf16ps.internal", AMX_TILE, [I16, I16, I16, AMX_TILE, AMX_TILE, AMX_TILE])
        rows, cols = ir.Constant(I16, _ROWS), ir.Constant(I16, 64)
        v16f = vec(F32, 16)

        def c64(v):
            return ir.Constant(I64, v)

        def cptr(r, s):
            off = builder.add(coff, builder.add(builder.mul(c64(16 * r), ldc), c64(16 * s)))
            return builder.gep(ca.data, [off])

        cstride = builder.mul(ldc, c64(4))
        is_first = builder.icmp_signed("!=", first, c64(0))
        zptr = builder.bitcast(za.data, i8p)
        init_stride = builder.select(is_first, c64(0), cstride)
        with cgutils.for_range(builder, builder.sdiv(nk, gl)) as runs:
            j = runs.index
            k0 = builder.mul(j, gl)
            k1 = builder.add(k0, gl)
            init = {(r, s): builder.call(load, [rows, cols, builder.select(is_first, zptr, builder.bitcast(cptr(r, s),
                                                                                                          i8p)),
                                                init_stride])
                    for r in range(nrows) for s in range(nstrips)}
            entry = builder.block
            head = builder.append_basic_block("amx.head")
            body = builder.append_basic_block("amx.body")
            done = builder.append_basic_block("amx.done")
            builder.branch(head)
            builder.position_at_end(head)
            kk = builder.phi(I64)
            kk.add_incoming(k0, entry)
            accs = {}
            for key, v in init.items():
                accs[key] = builder.phi(AMX_TILE)
                accs[key].add_incoming(v, entry)
            builder.cbranch(builder.icmp_signed("<", kk, k1), body, done)
            builder.position_at_end(body)
            btiles = []
            for s in range(nstrips):
                off = builder.add(builder.add(boff, builder.mul(c64(s), bstride)), builder.mul(kk, c64(16)))
                btiles.append(builder.call(load, [rows, cols, builder.bitcast(builder.gep(ba.data, [off]), i8p),
                                                  c64(64)]))
            new = dict(accs)
            for p in range(nparts):
                for r in range(nrows):
                    off = builder.add(builder.add(abase, builder.mul(c64(p), pstride)),
                                      builder.add(builder.mul(c64(r), rbs), builder.mul(kk, c64(16))))
                    a = builder.call(load, [rows, cols, builder.bitcast(builder.gep(xa.data, [off]), i8p), c64(64)])
                    for s in range(nstrips):
                        new[(r, s)] = builder.call(dp, [rows, cols, cols, new[(r, s)], a, btiles[s]])
            nxt = builder.add(kk, c64(32))
            latch = builder.block
            builder.branch(head)
            kk.add_incoming(nxt, latch)
            for key in accs:
                accs[key].add_incoming(new[key], latch)
            builder.position_at_end(done)
            for (r, s), v in accs.items():
                builder.call(store, [rows, cols, builder.bitcast(cptr(r, s), i8p), cstride, v])
            with builder.if_then(builder.icmp_signed("!=", last, c64(0))):
                for s in range(nstrips):
                    sp = builder.gep(sa.data, [builder.add(soffs[s], builder.mul(j, sld))])
                    sc = builder.load(builder.bitcast(sp, v16f.as_pointer()), align=4)
                    for r in range(nrows):
                        for i in range(16):
                            row = 16 * r + i
                            cp = builder.gep(ca.data, [builder.add(coff, builder.add(builder.mul(c64(row), ldc),
                                                                                     c64(16 * s)))])
                            ap = builder.gep(aa.data, [builder.add(aoffs[s], builder.mul(c64(row), ldacc))])
                            cv = builder.load(builder.bitcast(cp, v16f.as_pointer()), align=4)
                            ap = builder.bitcast(ap, v16f.as_pointer())
                            builder.store(builder.fadd(builder.load(ap, align=4), builder.fmul(cv, sc)), ap, align=4)
        return context.get_dummy_value()

    return (types.void(xp, abase, rbs, pstride, nk, gl, buf, boff, bstride, cb, coff, ldc, first, last, acc, aoff0,
                       aoff1, ldacc, scale, soff0, soff1, sld, zero, ns, nr, parts), codegen)


@njit(inline="always")
def _panel(wb, base, npairs, zp, zbase, buf, boff, pf, mode, has_zp):  # pragma: no cover - compiled
    if mode == 8:
        _vnni_panel(wb, base, npairs, zp, zbase, buf, boff, pf, 8, has_zp)
    elif mode == 0:
        _vnni_panel(wb, base, npairs, zp, zbase, buf, boff, pf, 0, has_zp)
    elif mode == 1:
        _vnni_panel(wb, base, npairs, zp, zbase, buf, boff, pf, 1, has_zp)
    else:
        _vnni_panel(wb, base, npairs, zp, zbase, buf, boff, pf, 2, has_zp)


@njit(inline="always")
def _block(xp, abase, rbs, pstride, nk, gl, buf, boff, bstride, cb, coff, ldc, first, last, acc, aoff0, aoff1, ldacc,
           scale, soff0, soff1, sld, zero, ns, nr, parts):  # pragma: no cover - compiled
    # literal dispatch: strips x row blocks x parts; two or three parts take one row block (nr = 1): 7.0 against
    # 9.0 ns per tdpbf16ps for 2 x 2 tiles (three parts, one thread, operands in cache)
    if parts == 3:
        if ns == 2:
            _amx_block(xp, abase, rbs, pstride, nk, gl, buf, boff, bstride, cb, coff, ldc, first, last, acc,
                       aoff0, aoff1, ldacc, scale, soff0, soff1, sld, zero, 2, 1, 3)
        else:
            _amx_block(xp, abase, rbs, pstride, nk, gl, buf, boff, bstride, cb, coff, ldc, first, last, acc,
                       aoff0, aoff1, ldacc, scale, soff0, soff1, sld, zero, 1, 1, 3)
    elif parts == 2:
        if ns == 2:
            _amx_block(xp, abase, rbs, pstride, nk, gl, buf, boff, bstride, cb, coff, ldc, first, last, acc,
                       aoff0, aoff1, ldacc, scale, soff0, soff1, sld, zero, 2, 1, 2)
        else:
            _amx_block(xp, abase, rbs, pstride, nk, gl, buf, boff, bstride, cb, coff, ldc, first, last, acc,
                       aoff0, aoff1, ldacc, scale, soff0, soff1, sld, zero, 1, 1, 2)
    elif ns == 2 and nr == 2:
        _amx_block(xp, abase, rbs, pstride, nk, gl, buf, boff, bstride, cb, coff, ldc, first, last, acc,
                   aoff0, aoff1, ldacc, scale, soff0, soff1, sld, zero, 2, 2, 1)
    elif ns == 2:
        _amx_block(xp, abase, rbs, pstride, nk, gl, buf, boff, bstride, cb, coff, ldc, first, last, acc,
                   aoff0, aoff1, ldacc, scale, soff0, soff1, sld, zero, 2, 1, 1)
    elif nr == 2:
        _amx_block(xp, abase, rbs, pstride, nk, gl, buf, boff, bstride, cb, coff, ldc, first, last, acc,
                   aoff0, aoff1, ldacc, scale, soff0, soff1, sld, zero, 1, 2, 1)
    else:
        _amx_block(xp, abase, rbs, pstride, nk, gl, buf, boff, bstride, cb, coff, ldc, first, last, acc,
                   aoff0, aoff1, ldacc, scale, soff0, soff1, sld, zero, 1, 1, 1)


@njit(inline="always")
def _unit_shape(W, bits):  # pragma: no cover - compiled
    """(bytes of a tile row per unit, strips of 16 channels per unit): a unit reads whole 64-byte lines (8 bits)
    or half lines holding both nibbles of its channels (4 bits), so no line is fetched twice."""
    if bits == 8:
        nb = min(W, 64)
        return nb, nb // 16
    if W == 8:  # a 4-bit tile of 16 channels: both nibbles of 8 bytes are one strip
        return 8, 1
    nb = min(W, 32)
    return nb, 2 * (nb // 16)


@njit(cache=True, nogil=True)
def _amx_units(xp, parts, M, wb, scale, zp, gsize, bits, out, u0, u1):  # pragma: no cover - compiled
    # work unit u: the S strips of 16 output channels whose codes lie in one byte range of a tile row, all rows
    _, blocks, rbs = xp.shape
    Mp = blocks * 16
    T, K, W = wb.shape
    NT = W * 2 if bits == 4 else W
    N = T * NT
    nb, S = _unit_shape(W, bits)
    per_tile = W // nb
    has_zp = zp.shape[0] > 0
    cw = 16 * S
    cb = np.empty((Mp, cw), np.float32)  # partial sums of a group
    acc = np.empty((Mp, cw), np.float32)  # the unit's output: sums of the groups' scaled sums
    zero = np.zeros(16, np.float32)
    bstride = KB * 16  # int16 elements of one strip's panel (KB / 2 pairs x 32)
    buf = np.empty(S * bstride, np.int16)
    cols = np.empty(S, np.int64)  # the strips' first columns within the tile
    xf = xp.reshape(-1)
    cf = cb.reshape(-1)
    af = acc.reshape(-1)
    sf = scale.reshape(-1)
    pstride = blocks * rbs
    whole = gsize <= KB  # blocks of whole groups (else: blocks inside one group)
    for u in range(u0, u1):
        t = u // per_tile
        b0 = (u % per_tile) * nb  # the unit's first byte of a tile row
        for i in range(S):
            if bits == 8 or W == 8 or i < S // 2:
                cols[i] = b0 + 16 * i
            else:
                cols[i] = W + b0 + 16 * (i - S // 2)
        acc[:] = 0
        k = 0
        while k < K:
            g0 = k // gsize
            if whole:
                nk = min((KB // gsize) * gsize, K - k)
                gl = gsize
                first = 1
                last = 1
            else:
                gend = (g0 + 1) * gsize
                nk = min(KB, gend - k)
                gl = nk
                first = 1 if k == g0 * gsize else 0
                last = 1 if k + nk == gend else 0
            for i in range(S):
                pf = nk * W if i == 0 else 0  # the unit's first strip prefetches the next block's lines
                if bits == 8:
                    mode = 8
                    base = (t * K + k) * W + cols[i]
                elif W == 8:
                    mode = 2
                    base = (t * K + k) * W
                elif i < S // 2:
                    mode = 0
                    base = (t * K + k) * W + cols[i]
                else:
                    mode = 1
                    base = (t * K + k) * W + cols[i] - W
                for j in range(nk // gl):  # each group's own zero points
                    zb = (g0 + j) * zp.shape[1] + t * NT + cols[i]
                    if has_zp:
                        _panel(wb, base + j * gl * W, gl // 2, zp, zb, buf, i * bstride + j * gl * 16, pf, mode, True)
                    else:
                        _panel(wb, base + j * gl * W, gl // 2, zp, zb, buf, i * bstride + j * gl * 16, pf, mode, False)
            for sp in range(0, S, 2):
                ns = min(2, S - sp)
                s1 = sp + ns - 1
                m0 = 0
                while m0 < Mp:
                    nr = 2 if Mp - m0 >= 32 and parts == 1 else 1
                    _block(xf, m0 * K + 16 * k, rbs, pstride, nk, gl, buf, sp * bstride, bstride, cf,
                           m0 * cw + 16 * sp, cw, first, last, af, m0 * cw + 16 * sp, m0 * cw + 16 * s1, cw, sf,
                           g0 * N + t * NT + cols[sp], g0 * N + t * NT + cols[s1], N, zero, ns, nr, parts)
                    m0 += 16 * nr
            k += nk
        for i in range(S):
            n0 = t * NT + cols[i]
            for m in range(M):
                o = out[m, n0:n0 + 16]
                a = acc[m, 16 * i:16 * i + 16]
                for j in range(16):
                    o[j] = a[j]


#: the team kernel's operands (its chunks are the work units); wb's dtype is the kernel's own
OPERANDS = _omp.Operands("amx", parts=_omp.I64, M=_omp.I64, T=_omp.I64, K=_omp.I64, W=_omp.I64,
                         gsize=_omp.I64, bits=_omp.I64, zp_rows=_omp.I64, x=_omp.ADDR, wb=_omp.ADDR,
                         scale=_omp.ADDR, zp=_omp.ADDR, out=_omp.ADDR)
_read = OPERANDS.read


@njit(inline="always")
def _amx_chunk(o, i, u0, u1, wdt, _y):  # pragma: no cover - compiled; units u0..u1 on a thread of torch's team
    M, T, K, W, G, bits = o.M, o.T, o.K, o.W, o.K // o.gsize, o.bits
    NT = W * 2 if bits == 4 else W
    Mp = (M + 15) // 16 * 16
    zrows = o.zp_rows
    _amx_units(carray(o.x, (o.parts, Mp // 16, 16 * K), np.int16), o.parts, M, carray(o.wb, (T, K, W), wdt),
               carray(o.scale, (G, T * NT), np.float32), carray(o.zp, (zrows, T * NT if zrows else 0), np.uint8),
               o.gsize, bits, carray(o.out, (M, T * NT), np.float32), u0, u1)
    return 0


def _team_amx_i8(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _amx_chunk, np.int8, 0)


def _team_amx_u8(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _amx_chunk, np.uint8, 0)


_TEAM_KERNELS = {True: _omp.TeamKernel(_team_amx_i8), False: _omp.TeamKernel(_team_amx_u8)}  # by signedness


def _units(T: int, W: int, bits: int) -> int:
    per_row = min(W, 64) if bits == 8 else (8 if W == 8 else min(W, 32))
    return T * (W // per_row)


@intrinsic
def _split_rows(typingctx, x, xp, parts, kind):
    """The bfloat16 parts of ``x`` (``kind`` 0: float32; 1: float16 bits, 2: bfloat16 bits, as int16 ``[M, K]``,
    K % 32 == 0) into ``xp`` (int16 ``[P, Mp / 16, 16 K]``) in A tiles: row ``m``, column ``k`` of part ``p`` at
    ``xp[p, m // 16, 512 (k // 32) + 32 (m % 16) + k % 32]``. Each part is the bfloat16 rounding (to nearest even)
    of what the parts before it left."""
    if not isinstance(parts, types.IntegerLiteral) or not isinstance(kind, types.IntegerLiteral):
        return None
    nparts, src = parts.literal_value, kind.literal_value
    if x.dtype != (types.float32 if src == 0 else types.int16):
        return None

    def codegen(context, builder, sig, args):
        xa = context.make_array(sig.args[0])(context, builder, args[0])
        pa = context.make_array(sig.args[1])(context, builder, args[1])
        M, K = cgutils.unpack_tuple(builder, xa.shape, 2)
        _, blocks, rbs = cgutils.unpack_tuple(builder, pa.shape, 3)
        v16f, v16i, v16s = vec(F32, 16), vec(I32, 16), vec(I16, 16)
        pstride = builder.mul(blocks, rbs)

        def c(v):
            return ir.Constant(v16i, [v] * 16)

        def c64(v):
            return ir.Constant(I64, v)

        def to_bf16(f):  # <16 x i16>, rounded to nearest even
            if _CVT:
                return builder.bitcast(builder.fptrunc(f, vec(BF16, 16)), v16s)
            u = builder.bitcast(f, v16i)
            odd = builder.and_(builder.lshr(u, c(16)), c(1))
            return builder.trunc(builder.lshr(builder.add(builder.add(u, c(0x7FFF)), odd), c(16)), v16s)

        with cgutils.for_range(builder, M) as rows:
            m = rows.index
            row0 = builder.add(builder.mul(builder.udiv(m, c64(16)), rbs), builder.mul(builder.urem(m, c64(16)),
                                                                                       c64(32)))
            with cgutils.for_range(builder, builder.udiv(K, c64(16))) as steps:
                k = builder.mul(steps.index, c64(16))
                ptr = builder.gep(xa.data, [builder.add(builder.mul(m, K), k)])
                ty = F32 if src == 0 else I16
                rest = builder.load(builder.bitcast(ptr, vec(ty, 16).as_pointer()), align=2)
                # k // 32 * 512 + k % 32, k a multiple of 16
                col = builder.add(builder.mul(builder.udiv(k, c64(32)), c64(512)), builder.urem(k, c64(32)))
                dst = builder.gep(pa.data, [builder.add(row0, col)])
                if src == 2:  # bfloat16: its bits, as they are
                    builder.store(rest, builder.bitcast(dst, v16s.as_pointer()), align=2)
                    nparts_here = 0
                else:
                    nparts_here = nparts
                if src == 1:
                    rest = builder.fpext(builder.bitcast(rest, vec(ir.HalfType(), 16)), v16f)
                for p in range(nparts_here):
                    h = to_bf16(rest)
                    builder.store(h, builder.bitcast(builder.gep(dst, [builder.mul(pstride, c64(p))]),
                                                     v16s.as_pointer()), align=2)
                    if p + 1 < nparts:  # exact: the part holds the leading bits of rest
                        back = builder.bitcast(builder.shl(builder.zext(h, v16i), c(16)), v16f)
                        # an infinite x leaves 0, not inf - inf = NaN: the parts then multiply as x itself does
                        same = builder.fcmp_ordered("==", rest, back)
                        rest = builder.select(same, ir.Constant(v16f, [0.0] * 16), builder.fsub(rest, back))
        return context.get_dummy_value()

    return types.void(x, xp, parts, kind), codegen


@njit(cache=True, nogil=True)
def _split_f32(x, xp):  # pragma: no cover - compiled
    _split_rows(x, xp, 3, 0)


@njit(cache=True, nogil=True)
def _split_f16(x, xp):  # pragma: no cover - compiled
    _split_rows(x, xp, 2, 1)


@njit(cache=True, nogil=True)
def _split_bf16(x, xp):  # pragma: no cover - compiled
    _split_rows(x, xp, 1, 2)


def split_rows(x: torch.Tensor) -> torch.Tensor:
    """``x[M, K]`` (float32, float16 or bfloat16; K a multiple of 32) as bfloat16 parts whose sum is ``x`` (P = 3,
    2, 1; each part the bfloat16 rounding of what the parts before it left), laid out as AMX A tiles:
    ``[P, Mp / 16, 16 K]``, each 16 rows x 32 columns contiguous (one tile load reads 1 KB, not 16 rows K apart),
    rows padded with zeros to ``Mp``, a multiple of 16. :func:`tile_rows` undoes the layout.

    >>> p = split_rows(torch.tensor([[1 + 2.0**-10 + 2.0**-20] * 32]))
    >>> p.shape, p[:, 0, 0].tolist(), float(p[:, 0, 0].double().sum()) == 1 + 2.0**-10 + 2.0**-20
    (torch.Size([3, 1, 512]), [1.0, 0.0009765625, 9.5367431640625e-07], True)
    """
    M, K = x.shape
    parts = _PARTS[x.dtype]
    blocks = -(-M // _ROWS)
    buf = torch.empty((parts, blocks, _ROWS * K), dtype=torch.bfloat16)
    if M % _ROWS:
        buf[:, -1] = 0  # the padding rows of the last block
    x = x.detach().contiguous()
    split = {torch.float32: _split_f32, torch.float16: _split_f16, torch.bfloat16: _split_bf16}[x.dtype]
    split((x if x.dtype == torch.float32 else x.view(torch.int16)).numpy(), buf.view(torch.int16).numpy())
    return buf


def tile_rows(xp: torch.Tensor, k: int) -> torch.Tensor:
    """The parts ``[P, Mp, K]`` of :func:`split_rows`'s tiled ``xp``, rows in order (for tests and checks)."""
    P, blocks, _ = xp.shape
    return xp.reshape(P, blocks, k // 32, _ROWS, 32).permute(0, 1, 3, 2, 4).reshape(P, blocks * _ROWS, k)


def amx_blocked(x: np.ndarray, wb: np.ndarray, scale: np.ndarray, zp: np.ndarray, gsize: int, bits: int,
                out: np.ndarray) -> np.ndarray:
    """``out = x @ ((code - zp) * scale).T`` for float32 ``x[M, K]`` from the blocked layout; returns ``out``.

    Operands as :func:`qtorch.gemm.gemm_blocked` (checked: a ``TypeError`` / ``ValueError`` names the operand);
    K and the group size must be multiples of 32 (:func:`eligible`), and the process able to use AMX
    (:func:`available`; otherwise a ``RuntimeError``)."""
    T, K, W = wb.shape if getattr(wb, "ndim", 0) == 3 else (0, 0, 0)
    M = x.shape[0] if getattr(x, "ndim", 0) == 2 else 0
    _omp.check_operands(wb, scale, zp, gsize, bits, out, (M, T * (W * 2 if bits == 4 else W)), x=x, x_shape=(M, K))
    if not eligible(K, gsize):
        raise ValueError(f"the AMX kernel needs K and the group size to be multiples of 32, got K={K}, "
                         f"group size {gsize}")
    if W % (16 if bits == 8 else 8):
        raise ValueError(f"tile rows of {W} bytes: the kernel reads strips of 16 channels")
    xp = split_rows(torch.from_numpy(x))
    _run(xp, wb, scale, zp, gsize, bits, out)
    return out


def amx_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """The forward on CPU torch tensors that ``layouts.blocked`` built (``scale`` / ``zero_point`` already
    ``[G, N]``): float32 ``[M, N]``. Rows go ``ROW_CHUNK`` at a time: the bfloat16 parts of ``x`` take up to 1.5x its
    float32 bytes, held for one chunk only."""
    M = x.shape[0]
    out = torch.empty((M, out_features), dtype=torch.float32)
    wb, sc, zp = qweight.numpy(), scale.numpy(), zero_point.numpy()
    for r0 in range(0, M, ROW_CHUNK):
        r1 = min(M, r0 + ROW_CHUNK)
        _run(split_rows(x[r0:r1]), wb, sc, zp, group_size, bits, out[r0:r1].numpy())
    return out


def _run(xp: torch.Tensor, wb, scale, zp, gsize, bits, out) -> None:
    if not (_AVAILABLE or available()):  # a tile instruction without the tile state is SIGILL, not an error
        raise RuntimeError("this process cannot use AMX tiles (no AMX-BF16 CPU, or Linux refused the tile state)")
    P = xp.shape[0]
    T, K, W = wb.shape
    M = out.shape[0]
    if M == 0 or T == 0:
        return
    NT = W * 2 if bits == 4 else W
    units = _units(T, W, bits)
    xi = xp.view(torch.int16).numpy()
    block = _omp.new_block(units, units, OPERANDS.pack(parts=P, M=M, T=T, K=K, W=W, gsize=gsize, bits=bits,
                                                       zp_rows=zp.shape[0], x=xi.ctypes.data, wb=wb.ctypes.data,
                                                       scale=scale.ctypes.data, zp=zp.ctypes.data,
                                                       out=out.ctypes.data))
    _omp.run(units, _TEAM_KERNELS[wb.dtype == np.int8], block, _amx_units, (xi, P, M, wb, scale, zp, gsize, bits, out),
             units, 1, nchunks=units)
