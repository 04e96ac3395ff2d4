"""Forward of the 8- and 4-bit blocked layouts on AMX tiles (Intel CPUs with AMX-BF16), any row count.

A leaf of :mod:`qtorch.layouts.blocked`. ``out[M, N] = x[M, K] @ ((code - zp) * scale).T`` from the blocked layout
(see ``layouts.blocked``): tiles ``wb[T, K, NT]`` (8 bits) or ``wb[T, K, NT/2]`` (4 bits, low nibble column ``j``,
high nibble column ``j + NT/2``; symmetric codes carry the offset 8), scale and zero point ``[G, N]``.

No dequantized weight is ever written: for the strips of 16 output channels of a work unit and a block of K
(``KB`` rows at most), ``code - zp`` (an integer of magnitude <= 255, exact in bfloat16) is converted into small
panels in the VNNI order of AMX's B operand, ``B[kp][2n + j] = code[2kp + j][n] - zp``, that stay in L1 while every
block of 16 rows of ``x`` is multiplied by them (``tdpbf16ps``, float32 accumulation in the C tiles: 4 strips x 1
row block per step at 16 rows, else 2 x 2). The conversion runs inside the tile loop, two steps (of 32 rows of K)
ahead, so the vector units convert while the tile unit multiplies: 4-bit codes by a table lookup of ``code - zp``
(mod 32) in one register (``vpermw``: no float conversion), 8-bit codes widened and converted 32 at a time
(``vcvtne2ps2bf16``), the two rows of each pair interleaved as bytes before widening. The activations are split
exactly into bfloat16 parts, ``x = x_1 + x_2 + x_3`` (float32: three, each the bfloat16 rounding of what is left;
float16: two; bfloat16: one): a product of two bfloat16 values is exact in float32, so all parts accumulate into
the same C tile and the result has float32 accuracy (AMX reads bfloat16 subnormals as zero: a float32 whose last
part falls below 2^-126 loses that part). The split runs on PyTorch's thread team, a row block per chunk, where
x is large (:func:`split_into`). At the end of each group the C tiles are scaled into a float32 accumulator of the
work unit (one fused multiply-add a row), copied into the output at its end. bfloat16 calls of
32 rows or more on layers with several groups convert the dequantized weight instead, ``bfloat16((code - zp) *
scale)`` (the weight F.linear multiplies in bfloat16), and accumulate all of K before one store
(:func:`dequantizes`); bfloat16 rows in whole tiles are read as A tiles from x itself.

Eligible (:func:`eligible`) where K % 32 == 0 and each group holds a multiple of 32 rows of K, and the process
may use AMX (:func:`available`: numba compiles for a CPU with ``amx-tile`` and ``amx-bf16``, and Linux granted
the tile data state, ``arch_prctl(ARCH_REQ_XCOMP_PERM)``, asked once per process; a forked child inherits it).
Work units are the strips whose codes share a 64-byte line of a tile row (8 bits: up to 4 strips; 4 bits: both
nibbles of 32 bytes), so each line is fetched once; each block prefetches the next block's lines while it converts
and multiplies. The threads of PyTorch's OpenMP team claim whole tiles where there are 4 a thread or more
(:func:`_chunks`): the units of a tile share its 64-byte lines (4 bits) or their 128-byte pairs, which the CPU
fetches together; claimed one by one, two cores fetched each line (8-10% of a 16-row call on two cores).

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
import functools
import platform
import sys
import threading

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from qcore._jitcache import keyed_cfunc

from . import _omp
from ._ir import AMX_TILE, BF16, F32, I8, I16, I32, I64, host_has, prefetch_l2, to_bf16x32, vec
from ._ir import cached as _cached
from .gemv import TORCH_KINDS

__all__ = ["available", "eligible", "amx_blocked", "amx_linear"]

KB = 256  # rows of K per panel at most: 16 channels x 256 rows = 8 KB of bfloat16; up to 4 strips stay in L1
_ROWS = 16  # rows of a tile (A and C), and K pairs of a B tile
#: steps (32 rows of K) the panel conversion runs ahead of the tile products: at one, the tile loads of the next
#: step wait for the stores of the step just converted
_AHEAD = 2
#: bfloat16 calls of this many rows and more, of layers with several groups, multiply dequantized panels
_DEQ_ROWS = 32
#: rows of x per kernel call at most: bounds the temporary parts of x (3 x 1024 x K bfloat16 for float32) while
#: each weight panel still serves 1024 rows
ROW_CHUNK = 1024
_PARTS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}  # bfloat16 parts that hold the value exactly

# float32 -> bfloat16 by the CPU's conversion (AVX512-BF16): exact for the codes (small integers); for the parts
# of x it rounds to nearest even as the integer rounding does, and reads subnormals as zero, as AMX does anyway
_CVT = host_has("avx512bf16")
# vpermw (AVX512-BW, on every AMX CPU): the 4-bit panels' table lookup; without it, a float conversion
_BW = host_has("avx512bw")
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


def _amx_fn(builder, name, ret, argtys):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, argtys), name)


def _pairs_of(builder, z, first, n, width):
    """``<2n x iW>``: bytes ``first .. first + n`` of the ``<16 x i8>`` ``z``, each twice (one per row of a pair),
    zero-extended."""
    idx = ir.Constant(vec(I32, 2 * n), [first + i // 2 for i in range(2 * n)])
    return builder.zext(builder.shuffle_vector(z, ir.Constant(vec(I8, 16), ir.Undefined), idx), vec(width, 2 * n))


# bfloat16 of d for d = i (i < 16) or i - 32: the 4-bit panels look ``d = code - zp`` (-15..15) up by its low 5
# bits, ``i = d mod 32`` (vpermw reads no more): one subtraction a vector, no offset to add
_DIFF_BF16 = [int(np.array([i if i < 16 else i - 32], np.float32).view(np.uint32)[0] >> 16) for i in range(32)]


def _to_bf16x32(builder, h0, h1):
    """:func:`qtorch._ir.to_bf16x32` by this CPU's instruction where it has one."""
    return to_bf16x32(builder, h0, h1, _CVT)


def _emit_pair(builder, r0, r1, dst, dst_hi, mode, signed, zlo, zhi, scales=None):
    """IR: one pair of rows of K (``r0``, ``r1``: i8 pointers to a strip's codes) as 32 bfloat16 ``code - zp`` in
    VNNI order (``B[2 n + j]`` = row ``j``, channel ``n``) at ``dst`` (i16 pointer).

    ``mode`` 8 / 9: 16 codes a row (9: minus ``zlo`` / ``zhi``, the zero points of channels 0-7 / 8-15 as
    ``<16 x i32>`` pairs); 3: 16 bytes a row, low nibbles to ``dst`` and high nibbles to ``dst_hi`` (``zlo`` /
    ``zhi``: ``zp`` as ``<32 x i16>`` pairs); 2: 8 bytes a row, low nibbles channels 0-7 and high nibbles 8-15
    (``zlo``: ``zp`` of channels 0-15 as pairs). Every value is an integer of at most 9 bits: exact in
    bfloat16. ``scales``: per output, the scales of its channels 0-7 and 8-15 as ``<16 x float>`` pairs: the panel
    then holds ``bfloat16((code - zp) * scale)``, the dequantized weight as a bfloat16 matmul reads it.
    """
    nb = 8 if mode == 2 else 16
    vb, v32s = vec(I8, nb), vec(I16, 32)
    a, b = (builder.load(builder.bitcast(r, vb.as_pointer()), align=1) for r in (r0, r1))
    # the two rows' bytes interleaved before widening: each code's pair partner is the next element, as B wants
    if mode in (8, 9):
        v16i, v16f = vec(I32, 16), vec(F32, 16)
        halves = []
        for h, z in ((0, zlo), (8, zhi)):  # channels 0-7, then 8-15: vpunpcklbw / vpunpckhbw, then one widening
            idx = ir.Constant(vec(I32, 16), [h + i // 2 + (16 if i % 2 else 0) for i in range(16)])
            part = builder.shuffle_vector(a, b, idx)
            wide = builder.sext(part, v16i) if signed else builder.zext(part, v16i)
            if mode == 9:
                wide = builder.sub(wide, z)
            halves.append(builder.sitofp(wide, v16f))
        if scales is not None:
            halves = [builder.fmul(h, sv) for h, sv in zip(halves, scales[0])]
        builder.store(_to_bf16x32(builder, *halves), builder.bitcast(dst, v32s.as_pointer()), align=2)
        return
    inter = ir.Constant(vec(I32, 2 * nb), [i // 2 + (nb if i % 2 else 0) for i in range(2 * nb)])
    vw = vec(I16, 2 * nb)
    wide = builder.zext(builder.shuffle_vector(a, b, inter), vw)
    lo = builder.and_(wide, ir.Constant(vw, [15] * (2 * nb)))
    hi = builder.lshr(wide, ir.Constant(vw, [4] * (2 * nb)))
    if mode == 2:
        lo = builder.shuffle_vector(lo, hi, ir.Constant(vec(I32, 32), list(range(32))))
    outs = [(builder.sub(lo, zlo), dst)] + ([(builder.sub(hi, zhi), dst_hi)] if mode == 3 else [])
    for o, (idx, ptr) in enumerate(outs):  # idx = code - zp, in -15..15
        if scales is not None:
            f = builder.sitofp(idx, vec(F32, 32))
            h0, h1 = (builder.fmul(builder.shuffle_vector(f, f, ir.Constant(vec(I32, 16), list(range(h, h + 16)))),
                                   sv) for h, sv in zip((0, 16), scales[o]))
            val = _to_bf16x32(builder, h0, h1)
        elif _BW:  # a table lookup in one register (vpermw): no conversion
            fn = _amx_fn(builder, "llvm.x86.avx512.permvar.hi.512", v32s, [v32s, v32s])
            val = builder.call(fn, [ir.Constant(v32s, _DIFF_BF16), idx])
        else:
            v32i = vec(I32, 32)
            f = builder.sitofp(idx, vec(F32, 32))
            val = builder.trunc(builder.lshr(builder.bitcast(f, v32i), ir.Constant(v32i, [16] * 32)), v32s)
        builder.store(val, builder.bitcast(ptr, v32s.as_pointer()), align=2)


def _emit_steps(builder, w, signed, bdata, coldata, zdata, base, zoff, nstrips, bstride, kk0, npairs, pf, mode,
                sdata=None, soff=None):
    """IR: the panels of pairs ``kk0 / 2`` .. ``kk0 / 2 + npairs`` of a block for every strip of a unit (codes from
    element ``base`` of ``wb``, the block's first row of the unit's tile; strip ``i`` at column ``cols[i]``, its
    panel at ``i bstride``; its zero points at ``zp[zoff + cols[i]]``, uint8), see :func:`_emit_pair`. The first
    strip's rows also prefetch ``pf`` bytes further on (the next block's lines: memory streams while this block
    converts and multiplies). With ``sdata``: dequantized panels (:func:`_emit_pair`), the scales at
    ``scale[soff + cols[i]]``."""
    c64 = functools.partial(ir.Constant, I64)
    _, _, width = cgutils.unpack_tuple(builder, w.shape, 3)
    reads = builder.sdiv(nstrips, c64(2)) if mode == 3 else (c64(1) if mode == 2 else nstrips)
    with cgutils.for_range(builder, reads) as strips:
        i = strips.index
        col = builder.load(builder.gep(coldata, [i]))
        src = builder.gep(w.data, [builder.add(builder.add(base, col), builder.mul(kk0, width))])
        dst = builder.gep(bdata, [builder.add(builder.mul(i, bstride), builder.mul(kk0, c64(16)))])
        dhi = builder.gep(dst, [builder.mul(builder.sdiv(nstrips, c64(2)), bstride)])
        pfi = builder.select(builder.icmp_signed("==", i, c64(0)), pf, c64(0))
        zlo = zhi = None
        if mode != 8:
            zp = builder.gep(zdata, [builder.add(zoff, col)])
            z = builder.load(builder.bitcast(zp, vec(I8, 16).as_pointer()), align=1)
            if mode == 9:
                zlo, zhi = _pairs_of(builder, z, 0, 8, I32), _pairs_of(builder, z, 8, 8, I32)
            elif mode == 2:
                zlo = _pairs_of(builder, z, 0, 16, I16)
            else:  # the high nibbles' channels lie W columns further on
                zh = builder.load(builder.bitcast(builder.gep(zp, [width]), vec(I8, 16).as_pointer()), align=1)
                zlo = _pairs_of(builder, z, 0, 16, I16)
                zhi = _pairs_of(builder, zh, 0, 16, I16)
        scales = None
        if sdata is not None:
            v16f = vec(F32, 16)
            sp = builder.gep(sdata, [builder.add(soff, col)])
            pairs = [ir.Constant(vec(I32, 16), [h + i // 2 for i in range(16)]) for h in (0, 8)]

            def strip_scales(ptr):
                sv = builder.load(builder.bitcast(ptr, v16f.as_pointer()), align=4)
                return [builder.shuffle_vector(sv, sv, idx) for idx in pairs]

            scales = [strip_scales(sp)] + ([strip_scales(builder.gep(sp, [width]))] if mode == 3 else [])
        with cgutils.for_range(builder, npairs) as loop:
            p = loop.index
            r0 = builder.gep(src, [builder.mul(builder.mul(p, c64(2)), width)])
            r1 = builder.gep(r0, [width])
            for r in (r0, r1):  # a prefetch never faults: past the end of the codes is harmless
                prefetch_l2(builder, builder.gep(r, [pfi]))
            at = builder.mul(p, c64(32))
            _emit_pair(builder, r0, r1, builder.gep(dst, [at]), builder.gep(dhi, [at]), mode, signed, zlo, zhi,
                       scales)


@intrinsic
def _panel_steps(typingctx, wb, buf, cols, zp, scale, base, zoff, soff, nstrips, bstride, kk0, npairs, pf, mode, deq):
    """:func:`_emit_steps` as a call: ``npairs`` pairs of rows from row ``kk0`` of the block, every strip
    (``deq``, literal: dequantized panels, the scales at ``scale[soff + cols[i]]``)."""
    if not (isinstance(mode, types.IntegerLiteral) and isinstance(deq, types.IntegerLiteral)):
        return None
    m, dq = mode.literal_value, deq.literal_value
    signed = wb.dtype == types.int8

    def codegen(context, builder, sig, args):
        w, ba, ca, za, sa = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(5))
        base, zoff, soff, nstrips, bstride, kk0, npairs, pf = (
            context.cast(builder, args[i], sig.args[i], types.int64) for i in range(5, 13))
        _emit_steps(builder, w, signed, ba.data, ca.data, za.data, base, zoff, nstrips, bstride, kk0, npairs, pf,
                    m, sa.data if dq else None, soff)
        return context.get_dummy_value()

    return (types.void(wb, buf, cols, zp, scale, base, zoff, soff, nstrips, bstride, kk0, npairs, pf, mode, deq),
            codegen)


@intrinsic
def _amx_block(typingctx, xp, wb, buf, cb, acc, scale, zp, cols, zero, q, ns, nr, parts, cmode, deq):
    """The rows ``nr`` x 16 and channels ``ns`` x 16 (literals: 4 x 1 or at most 2 x 2) of ``x @ B`` over ``nk``
    rows of K (a multiple of 32), in runs of ``gl`` rows (``nk`` itself, or one group), each run's float32 C tiles
    kept in tile registers.

    ``q``: the int64 scalars ``(abase, rbs, pstride, nk, gl, boff, bstride, coff, ldc, first, last, aoff, ldacc,
    soff, c0, sld, conv, wbase, nstrips, pf, k, gsize, zstride, zcol, akmul, astride)``. A: bfloat16 bits ``xp``
    (int16) in 1 KB tiles (:func:`split_rows`; ``akmul`` 16, ``astride`` 64 bytes) or x itself (``akmul`` 1,
    ``astride`` 2 K bytes), part ``p``, row block ``r``, column ``kk`` at element ``abase + p pstride + r rbs +
    akmul kk``; B: the panel ``buf`` (int16) of strip ``s`` at ``boff + s bstride``, 32 elements per pair of K rows. A
    run starts from zero where ``first`` (else from the partial sums in ``cb``, float32 at ``coff + 16 r ldc + 16
    s``) and ends in ``cb``; where ``last`` (the run ends its group, ``j``-th run) the sums are then scaled into
    ``acc`` (float32, row stride ``ldacc``, strip ``s`` at ``aoff + 16 s``): ``acc += C * scale``, the scale of
    strip ``s`` at ``soff + cols[c0 + s] + j sld``. ``zero``: 16 zero float32 (a C tile loaded with row stride 0).

    Where ``conv``, each step also converts the panels ``_AHEAD`` steps on, the unit's ``nstrips`` strips, while
    the tile unit multiplies (:func:`_emit_steps` in ``cmode``, a literal; codes from ``wbase``, block row ``k``, zero
    points of group ``(k + kk) // gsize`` at ``zp[group * zstride + zcol + cols[i]]``). ``deq`` (literal): the
    panels are dequantized (scales of that group at ``scale[group * sld + zcol + cols[i]]``) and the sums are added
    to ``acc`` unscaled.
    """
    if not all(isinstance(v, types.IntegerLiteral) for v in (ns, nr, parts, cmode, deq)):
        return None
    dq = deq.literal_value
    if not (isinstance(q, types.UniTuple) and q.count == 26 and q.dtype == types.int64):
        return None
    nstrips, nrows, nparts, cm = ns.literal_value, nr.literal_value, parts.literal_value, cmode.literal_value
    signed = wb.dtype == types.int8

    def codegen(context, builder, sig, args):
        xa, wa, ba, ca, aa, sa, zpa, cola, za = (context.make_array(sig.args[i])(context, builder, args[i])
                                                 for i in range(9))
        (abase, rbs, pstride, nk, gl, boff, bstride, coff, ldc, first, last, aoff, ldacc, soff, c0, sld, conv, wbase,
         unit_strips, pf, kblock, gsize, zstride, zcol, akmul, astride) = cgutils.unpack_tuple(builder, args[9], 26)
        i8p = I8.as_pointer()
        load = _amx_fn(builder, "llvm.x86.tileloadd64.internal", AMX_TILE, [I16, I16, i8p, I64])
        store = _amx_fn(builder, "llvm.x86.tilestored64.internal", ir.VoidType(), [I16, I16, i8p, I64, AMX_TILE])
        dp = _amx_fn(builder, "llvm.x86.tdpbf16ps.internal", AMX_TILE, [I16, I16, I16, AMX_TILE, AMX_TILE, AMX_TILE])
        rows, cols = ir.Constant(I16, _ROWS), ir.Constant(I16, 64)
        v16f = vec(F32, 16)
        fma = _amx_fn(builder, "llvm.fma.v16f32", v16f, [v16f, v16f, v16f])

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

            def btile(s):
                off = builder.add(builder.add(boff, builder.mul(c64(s), bstride)), builder.mul(kk, c64(16)))
                return builder.call(load, [rows, cols, builder.bitcast(builder.gep(ba.data, [off]), i8p), c64(64)])

            # 4 x 1: each B tile is used once (loaded where used: 4 C + A + B fit the 8 tile registers); 2 x 2:
            # each B tile serves both row blocks
            btiles = [btile(s) for s in range(nstrips)] if nstrips <= 2 else None
            new = dict(accs)
            for p in range(nparts):
                for r in range(nrows):
                    off = builder.add(builder.add(abase, builder.mul(c64(p), pstride)),
                                      builder.add(builder.mul(c64(r), rbs), builder.mul(kk, akmul)))
                    a = builder.call(load, [rows, cols, builder.bitcast(builder.gep(xa.data, [off]), i8p), astride])
                    for s in range(nstrips):
                        bt = btiles[s] if btiles is not None else btile(s)
                        new[(r, s)] = builder.call(dp, [rows, cols, cols, new[(r, s)], a, bt])
            nxt = builder.add(kk, c64(32))
            # the unit's panels of the step after the next, while the tile unit multiplies this one (the next
            # one's stores have had a whole step to reach L1, where the tile loads read them)
            ahead = builder.add(kk, c64(32 * _AHEAD))
            more = builder.and_(builder.icmp_signed("!=", conv, c64(0)), builder.icmp_signed("<", ahead, nk))
            with builder.if_then(more):
                group = builder.sdiv(builder.add(kblock, ahead), gsize)
                zoff = builder.add(builder.mul(group, zstride), zcol)
                _emit_steps(builder, wa, signed, ba.data, cola.data, zpa.data, wbase, zoff, unit_strips, bstride,
                            ahead, c64(16), pf, cm, sa.data if dq else None,
                            builder.add(builder.mul(group, sld), zcol))
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
                    col = builder.load(builder.gep(cola.data, [builder.add(c0, c64(s))]))
                    idx = builder.add(builder.add(soff, col), builder.mul(j, sld))
                    sc = builder.load(builder.bitcast(builder.gep(sa.data, [idx]), v16f.as_pointer()), align=4)
                    for r in range(nrows):
                        for i in range(16):
                            row = 16 * r + i
                            cp = builder.gep(ca.data, [builder.add(coff, builder.add(builder.mul(c64(row), ldc),
                                                                                     c64(16 * s)))])
                            ap = builder.gep(aa.data, [builder.add(builder.add(aoff, c64(16 * s)),
                                                                   builder.mul(c64(row), ldacc))])
                            cv = builder.load(builder.bitcast(cp, v16f.as_pointer()), align=4)
                            ap = builder.bitcast(ap, v16f.as_pointer())
                            av = builder.load(ap, align=4)
                            builder.store(builder.fadd(av, cv) if dq else builder.call(fma, [cv, sc, av]), ap,
                                          align=4)
        return context.get_dummy_value()

    return types.void(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, ns, nr, parts, cmode, deq), codegen


@njit(inline="always")
def _block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, ns, nr, parts, cmode,
           deq):  # pragma: no cover - compiled
    # literal dispatch: parts x strips x row blocks x conversion mode (x dequantized panels, one part only); two or
    # three parts take one row block (nr = 1): 7.0 against 9.0 ns per tdpbf16ps for 2 x 2 tiles (three parts, one
    # thread, operands in cache)
    if parts == 3:
        if ns == 2 and nr == 1:
            if cmode == 8:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 3, 8, 0)
            elif cmode == 9:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 3, 9, 0)
            elif cmode == 3:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 3, 3, 0)
            else:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 3, 2, 0)
        else:
            if cmode == 8:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 3, 8, 0)
            elif cmode == 9:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 3, 9, 0)
            elif cmode == 3:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 3, 3, 0)
            else:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 3, 2, 0)
    elif parts == 2:
        if ns == 2 and nr == 1:
            if cmode == 8:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 2, 8, 0)
            elif cmode == 9:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 2, 9, 0)
            elif cmode == 3:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 2, 3, 0)
            else:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 2, 2, 0)
        else:
            if cmode == 8:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 2, 8, 0)
            elif cmode == 9:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 2, 9, 0)
            elif cmode == 3:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 2, 3, 0)
            else:
                _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 2, 2, 0)
    else:
        if ns == 4 and nr == 1:
            if deq:
                if cmode == 8:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 4, 1, 1, 8, 1)
                elif cmode == 9:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 4, 1, 1, 9, 1)
                elif cmode == 3:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 4, 1, 1, 3, 1)
                else:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 4, 1, 1, 2, 1)
            else:
                if cmode == 8:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 4, 1, 1, 8, 0)
                elif cmode == 9:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 4, 1, 1, 9, 0)
                elif cmode == 3:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 4, 1, 1, 3, 0)
                else:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 4, 1, 1, 2, 0)
        elif ns == 2 and nr == 2:
            if deq:
                if cmode == 8:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 2, 1, 8, 1)
                elif cmode == 9:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 2, 1, 9, 1)
                elif cmode == 3:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 2, 1, 3, 1)
                else:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 2, 1, 2, 1)
            else:
                if cmode == 8:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 2, 1, 8, 0)
                elif cmode == 9:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 2, 1, 9, 0)
                elif cmode == 3:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 2, 1, 3, 0)
                else:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 2, 1, 2, 0)
        elif ns == 2 and nr == 1:
            if deq:
                if cmode == 8:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 1, 8, 1)
                elif cmode == 9:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 1, 9, 1)
                elif cmode == 3:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 1, 3, 1)
                else:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 1, 2, 1)
            else:
                if cmode == 8:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 1, 8, 0)
                elif cmode == 9:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 1, 9, 0)
                elif cmode == 3:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 1, 3, 0)
                else:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 2, 1, 1, 2, 0)
        elif ns == 1 and nr == 2:
            if deq:
                if cmode == 8:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 2, 1, 8, 1)
                elif cmode == 9:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 2, 1, 9, 1)
                elif cmode == 3:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 2, 1, 3, 1)
                else:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 2, 1, 2, 1)
            else:
                if cmode == 8:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 2, 1, 8, 0)
                elif cmode == 9:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 2, 1, 9, 0)
                elif cmode == 3:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 2, 1, 3, 0)
                else:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 2, 1, 2, 0)
        else:
            if deq:
                if cmode == 8:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 1, 8, 1)
                elif cmode == 9:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 1, 9, 1)
                elif cmode == 3:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 1, 3, 1)
                else:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 1, 2, 1)
            else:
                if cmode == 8:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 1, 8, 0)
                elif cmode == 9:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 1, 9, 0)
                elif cmode == 3:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 1, 3, 0)
                else:
                    _amx_block(xp, wb, buf, cb, acc, scale, zp, cols, zero, q, 1, 1, 1, 2, 0)


@njit(inline="always")
def _steps(wb, buf, cols, zp, scale, base, zoff, soff, nstrips, bstride, kk0, npairs, pf, cmode,
           deq):  # pragma: no cover - compiled
    if deq:
        if cmode == 8:
            _panel_steps(wb, buf, cols, zp, scale, base, zoff, soff, nstrips, bstride, kk0, npairs, pf, 8, 1)
        elif cmode == 9:
            _panel_steps(wb, buf, cols, zp, scale, base, zoff, soff, nstrips, bstride, kk0, npairs, pf, 9, 1)
        elif cmode == 3:
            _panel_steps(wb, buf, cols, zp, scale, base, zoff, soff, nstrips, bstride, kk0, npairs, pf, 3, 1)
        else:
            _panel_steps(wb, buf, cols, zp, scale, base, zoff, soff, nstrips, bstride, kk0, npairs, pf, 2, 1)
    else:
        if cmode == 8:
            _panel_steps(wb, buf, cols, zp, scale, base, zoff, soff, nstrips, bstride, kk0, npairs, pf, 8, 0)
        elif cmode == 9:
            _panel_steps(wb, buf, cols, zp, scale, base, zoff, soff, nstrips, bstride, kk0, npairs, pf, 9, 0)
        elif cmode == 3:
            _panel_steps(wb, buf, cols, zp, scale, base, zoff, soff, nstrips, bstride, kk0, npairs, pf, 3, 0)
        else:
            _panel_steps(wb, buf, cols, zp, scale, base, zoff, soff, nstrips, bstride, kk0, npairs, pf, 2, 0)


@intrinsic
def _store_sums(typingctx, a, ai, b, bi, o, oi, kind, with_bias):
    """``o.flat[oi:oi + 16] = a.flat[ai:ai + 16] (+ b.flat[bi:bi + 16])``: 16 float32 sums, plus the bias where
    ``with_bias``, stored as float32 (``kind`` 0) or as the bits of their bfloat16 (1) / float16 (2) rounding to
    nearest even, as ``.to()`` rounds (a NaN stays NaN). Vector IR on the arrays' own addresses: no array view made
    in the kernel's epilogue, whose reference counting calls made LLVM reload the tile configuration after each
    (twice the time of a 104-row call)."""
    if not (isinstance(kind, types.IntegerLiteral) and isinstance(with_bias, types.IntegerLiteral)):
        return None
    k, wb = kind.literal_value, with_bias.literal_value

    def codegen(context, builder, sig, args):
        v16f, v16i, v16h = vec(F32, 16), vec(I32, 16), vec(I16, 16)

        def at(i, ty):
            arr = context.make_array(sig.args[i])(context, builder, args[i])
            idx = context.cast(builder, args[i + 1], sig.args[i + 1], types.int64)
            return builder.bitcast(builder.gep(arr.data, [idx]), ty.as_pointer())

        v = builder.load(at(0, v16f), align=4)
        if wb:
            v = builder.fadd(v, builder.load(at(2, v16f), align=4))
        if k == 0:
            builder.store(v, at(4, v16f), align=4)
            return context.get_dummy_value()
        if k == 1:
            u = builder.bitcast(v, v16i)
            c = functools.partial(ir.Constant, v16i)
            odd = builder.and_(builder.lshr(u, c([16] * 16)), c([1] * 16))
            r = builder.lshr(builder.add(builder.add(u, c([0x7FFF] * 16)), odd), c([16] * 16))
            nan = builder.icmp_unsigned(">", builder.and_(u, c([0x7FFFFFFF] * 16)), c([0x7F800000] * 16))
            bits = builder.trunc(builder.select(nan, c([0x7FC0] * 16), r), v16h)
        else:
            bits = builder.bitcast(builder.fptrunc(v, vec(ir.HalfType(), 16)), v16h)
        builder.store(bits, at(4, v16h), align=2)
        return context.get_dummy_value()

    return types.void(a, ai, b, bi, o, oi, kind, with_bias), codegen


@njit(inline="always")
def _store_unit(acc, cw, S, cols, n_tile, M, N, out, outb, okind, bias):  # pragma: no cover - compiled
    """A work unit's output: rows ``0..M`` of its sums ``acc`` (float32 ``[Mp, cw]``, strip ``i`` in columns
    ``16 i..16 i + 16``) plus the bias (float32 ``[N]``, or empty) into the output's columns ``n_tile + cols[i]``:
    float32 ``out`` (``okind`` 0) or the bfloat16 / float16 bits ``outb`` (1 / 2), by :func:`_store_sums` (the AMX
    kernel's and the AVX512-BF16 kernel's epilogue)."""
    has_bias = bias.shape[0] > 0
    for i in range(S):
        n0 = n_tile + cols[i]
        for m in range(M):
            ai, oi = m * cw + 16 * i, m * N + n0
            if okind == 0:
                if has_bias:
                    _store_sums(acc, ai, bias, n0, out, oi, 0, 1)
                else:
                    _store_sums(acc, ai, bias, n0, out, oi, 0, 0)
            elif okind == 1:
                if has_bias:
                    _store_sums(acc, ai, bias, n0, outb, oi, 1, 1)
                else:
                    _store_sums(acc, ai, bias, n0, outb, oi, 1, 0)
            elif has_bias:
                _store_sums(acc, ai, bias, n0, outb, oi, 2, 1)
            else:
                _store_sums(acc, ai, bias, n0, outb, oi, 2, 0)


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


@_cached
@njit(cache=True, nogil=True)
def _amx_units(xp, parts, M, wb, scale, zp, gsize, bits, direct, deq, out, outb, okind, bias, u0,
               u1):  # pragma: no cover - compiled
    # work unit u: the S strips of 16 output channels whose codes lie in one byte range of a tile row, all rows.
    # zp: [G, N] zero points, or one row of them for every group (4-bit symmetric: 8), or none (8-bit symmetric).
    # direct: xp holds x itself ([1, M / 16, 16 K], bfloat16 bits), its rows read as A tiles 2 K bytes apart.
    # deq (one part only): dequantized panels, all of K one accumulation (:func:`dequantizes`). The epilogue: bias
    # (float32 [N], or empty) added to each row's float32 sums, which then go to out (okind 0), or to outb as
    # bfloat16 / float16 bits (okind 1 / 2, rounded as torch rounds): no second pass over the output
    _, blocks, rbs = xp.shape
    Mp = blocks * 16
    T, K, W = wb.shape
    NT = W * 2 if bits == 4 else W
    N = T * NT
    nb, S = _unit_shape(W, bits)
    per_tile = W // nb
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
    zf = zp.reshape(-1)
    zstride = N if zp.shape[0] > 1 else 0
    cmode = (9 if zp.shape[0] else 8) if bits == 8 else (2 if W == 8 else 3)
    pstride = blocks * rbs
    gacc = K if deq else gsize  # rows of K accumulated in float32 before a scaling
    whole = gacc <= KB  # blocks of whole groups (else: blocks inside one group)
    # strips per AMX block: at 16 rows one tile of A serves four strips (more C tiles in flight); else 2 x 2
    wide = 4 if parts == 1 and Mp == 16 else 2
    akmul, astride = (1, 2 * K) if direct else (16, 64)
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
            g0 = k // gacc
            if whole:
                nk = min((KB // gacc) * gacc, K - k)
                gl = gacc
                first = 1
                last = 1
            else:
                gend = (g0 + 1) * gacc
                nk = min(KB, gend - k)
                gl = nk
                first = 1 if k == g0 * gacc else 0
                last = 1 if k + nk == gend else 0
            # the first step's panels here; each step converts the next one while the tiles multiply
            for a in range(min(_AHEAD, nk // 32)):
                ga = (k + 32 * a) // gsize
                _steps(wb, buf, cols, zf, sf, (t * K + k) * W, ga * zstride + t * NT, ga * N + t * NT, S, bstride,
                       32 * a, 16, nk * W, cmode, deq)
            for sp in range(0, S, wide):
                ns = min(wide, S - sp)
                m0 = 0
                while m0 < Mp:
                    nr = 2 if Mp - m0 >= 32 and parts == 1 and ns == 2 else 1
                    conv = 1 if sp == 0 and m0 == 0 else 0
                    # whole runs keep no partial sums between calls: their C tiles pass through the first rows
                    # of cb (they stay in L1)
                    q = (m0 * K + akmul * k, rbs, pstride, nk, gl, sp * bstride, bstride,
                         (0 if whole else m0 * cw) + 16 * sp, cw, first, last, m0 * cw + 16 * sp, cw,
                         g0 * N + t * NT, sp, N, conv, (t * K + k) * W, S, nk * W, k, gsize, zstride, t * NT, akmul,
                         astride)
                    _block(xf, wb, buf, cf, af, sf, zf, cols, zero, q, ns, nr, parts, cmode, deq)
                    m0 += 16 * nr
            k += nk
        _store_unit(acc, cw, S, cols, t * NT, M, N, out, outb, okind, bias)


#: the team kernel's operands (its chunks are the work units); wb's dtype is the kernel's own. ``flags``: bits |
#: direct << 8 | deq << 9 | the output's kind << 10 (:data:`qtorch.gemv.TORCH_KINDS`) | a bias << 12 | zero point
#: rows << 16 (a block holds at most 13 operands); ``bias``: float32 ``[N]`` where there is one
OPERANDS = _omp.Operands("amx", parts=_omp.I64, M=_omp.I64, T=_omp.I64, K=_omp.I64, W=_omp.I64,
                         gsize=_omp.I64, flags=_omp.I64, bias=_omp.ADDR, x=_omp.ADDR, wb=_omp.ADDR,
                         scale=_omp.ADDR, zp=_omp.ADDR, out=_omp.ADDR)
_read = OPERANDS.read


@njit(inline="always")
def _amx_chunk(o, i, u0, u1, wdt, _y):  # pragma: no cover - compiled; units u0..u1 on a thread of torch's team
    M, T, K, W, G, bits = o.M, o.T, o.K, o.W, o.K // o.gsize, o.flags & 255
    NT = W * 2 if bits == 4 else W
    Mp = (M + 15) // 16 * 16
    zrows, okind = o.flags >> 16, (o.flags >> 10) & 3
    _amx_units(carray(o.x, (o.parts, Mp // 16, 16 * K), np.int16), o.parts, M, carray(o.wb, (T, K, W), wdt),
               carray(o.scale, (G, T * NT), np.float32), carray(o.zp, (zrows, T * NT if zrows else 0), np.uint8),
               o.gsize, bits, (o.flags >> 8) & 1, (o.flags >> 9) & 1,
               carray(o.out, (M, T * NT) if okind == 0 else (0, 0), np.float32),
               carray(o.out, (M, T * NT) if okind else (0, 0), np.uint16), okind,
               carray(o.bias, T * NT if (o.flags >> 12) & 1 else 0, np.float32), u0, u1)
    return 0


def _team_amx_i8(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _amx_chunk, np.int8, 0)


def _team_amx_u8(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _amx_chunk, np.uint8, 0)


_TEAM_KERNELS = {True: _omp.TeamKernel(_team_amx_i8), False: _omp.TeamKernel(_team_amx_u8)}  # by signedness


def _units(T: int, W: int, bits: int) -> int:
    per_row = min(W, 64) if bits == 8 else (8 if W == 8 else min(W, 32))
    return T * (W // per_row)


def _chunks(T: int, units: int, threads: int) -> int:
    """Chunks the team claims (chunk ``i``: units ``units i / n .. units (i + 1) / n``): one per tile where the
    tiles are at least 4 a thread, so a tile's units run in turn on one core and each line of codes is fetched by
    that core alone (the second unit finds in L2 what the first one's fetches brought: the other half of a 64-byte
    line at 4 bits, the adjacent line of a 128-byte pair); else one per unit, every thread busy.

    >>> _chunks(32, 128, 2), _chunks(4, 16, 2)
    (32, 16)
    """
    return T if T >= 4 * threads else units


@intrinsic
def _split_rows(typingctx, x, xp, parts, kind, b0, b1):
    """The bfloat16 parts of ``x`` (``kind`` 0: float32; 1: float16 bits, 2: bfloat16 bits, as int16 ``[M, K]``,
    K % 32 == 0) into ``xp`` (int16 ``[P, Mp / 16, 16 K]``) in A tiles: row ``m``, column ``k`` of part ``p`` at
    ``xp[p, m // 16, 512 (k // 32) + 32 (m % 16) + k % 32]``, for the rows of blocks ``b0 .. b1`` (16 rows each).
    Each part is the bfloat16 rounding (to nearest even) of what the parts before it left."""
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

        # in the tiles' order (a row block, then 16 columns of its rows in turn): the stores fill each 1 KB tile
        # line by line. Row by row, they went to K / 32 tiles 1 KB apart, a few cache sets (float32: 2-3x slower)
        b0 = context.cast(builder, args[4], sig.args[4], types.int64)
        b1 = context.cast(builder, args[5], sig.args[5], types.int64)
        with cgutils.for_range(builder, builder.sub(b1, b0)) as mblocks, \
                cgutils.for_range(builder, builder.udiv(K, c64(16))) as steps:
            blk = builder.add(mblocks.index, b0)
            mb = builder.mul(blk, c64(16))
            k = builder.mul(steps.index, c64(16))
            nrows = builder.select(builder.icmp_signed("<", builder.sub(M, mb), c64(16)), builder.sub(M, mb),
                                   c64(16))
            with cgutils.for_range(builder, nrows) as rows:
                m = builder.add(mb, rows.index)
                row0 = builder.add(builder.mul(blk, rbs), builder.mul(rows.index, c64(32)))
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

    return types.void(x, xp, parts, kind, types.int64, types.int64), codegen


@njit(inline="always")
def _zero_padding(xp, M):  # pragma: no cover - compiled
    # rows M .. Mp of the last block: A tiles are read 16 rows at a time, and the parts buffer may be reused
    P, blocks, rbs = xp.shape
    r0 = M - (blocks - 1) * _ROWS
    if blocks == 0 or r0 == _ROWS:
        return
    for p in range(P):
        for kb in range(rbs // 512):
            xp[p, blocks - 1, 512 * kb + 32 * r0:512 * kb + 512] = 0


@njit(inline="always")
def _split_blocks(x, xp, M, K, kind, b0, b1):  # pragma: no cover - compiled
    # row blocks b0 .. b1 of x (at address x) into the parts at address xp; the last block also zeroes its padding
    blocks = (M + 15) // 16
    if kind == 0:
        parts = carray(xp, (3, blocks, 16 * K), np.int16)
        _split_rows(carray(x, (M, K), np.float32), parts, 3, 0, b0, b1)
    elif kind == 1:
        parts = carray(xp, (2, blocks, 16 * K), np.int16)
        _split_rows(carray(x, (M, K), np.int16), parts, 2, 1, b0, b1)
    else:
        parts = carray(xp, (1, blocks, 16 * K), np.int16)
        _split_rows(carray(x, (M, K), np.int16), parts, 1, 2, b0, b1)
    if b1 == blocks:
        _zero_padding(parts, M)


def _split_f32(x, xp, M, K):  # pragma: no cover - compiled
    _split_blocks(x, xp, M, K, 0, 0, (M + 15) // 16)


def _split_f16(x, xp, M, K):  # pragma: no cover - compiled
    _split_blocks(x, xp, M, K, 1, 0, (M + 15) // 16)


def _split_bf16(x, xp, M, K):  # pragma: no cover - compiled
    _split_blocks(x, xp, M, K, 2, 0, (M + 15) // 16)


_SPLIT_PY = {torch.float32: _split_f32, torch.float16: _split_f16, torch.bfloat16: _split_bf16}

#: the split's team kernel operands: chunk ``i`` is row block ``i`` (16 rows of x, all of its parts)
SPLIT_OPERANDS = _omp.Operands("split", M=_omp.I64, K=_omp.I64, x=_omp.ADDR, xp=_omp.ADDR)
_read_split = SPLIT_OPERANDS.read


@njit(inline="always")
def _split_chunk(o, i, b0, b1, kind, _y):  # pragma: no cover - compiled; row blocks b0..b1 on a team thread
    _split_blocks(o.x, o.xp, o.M, o.K, kind, b0, b1)
    return 0


def _team_split_f32(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read_split, _split_chunk, 0, 0)


def _team_split_f16(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read_split, _split_chunk, 1, 0)


def _team_split_bf16(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read_split, _split_chunk, 2, 0)


_SPLIT_TEAMS = {torch.float32: _omp.TeamKernel(_team_split_f32), torch.float16: _omp.TeamKernel(_team_split_f16),
                torch.bfloat16: _omp.TeamKernel(_team_split_bf16)}
#: values written (elements of x times parts) from which the split runs on torch's team, a row block per chunk;
#: below, on the calling thread: the team's call costs about 5 us, and the crossing was near 1.5-2.3 x 10^5 values
#: (AMX Xeon: float32 152 x 384 took 12.4 us alone and 11.3 on two threads; 128 x 4096, 188 against 93 us)
TEAM_SPLIT_MIN = 3 << 16


def split_into(dtype: torch.dtype, xaddr: int, paddr: int, M: int, K: int) -> None:
    """The parts of contiguous ``x[M, K]`` (``dtype``, at ``xaddr``) into the parts buffer at ``paddr`` (int16,
    ``parts * Mp * K``; :func:`split_rows`' layout), on torch's team where x is large enough (a row block per
    chunk), else on the calling thread. The caller holds both until it returns."""
    blocks = -(-M // _ROWS)
    if blocks < 2 or M * K * _PARTS[dtype] < TEAM_SPLIT_MIN:
        _splitter(dtype)(xaddr, paddr, M, K)
        return
    team = _SPLIT_TEAMS[dtype]
    block = _omp.new_block(blocks, blocks, (M, K, xaddr, paddr))
    _omp.run(blocks, team, block, _omp.on_caller, (team, block), blocks, 1, nchunks=blocks)


_SPLITS: dict = {}  # dtype -> the compiled split as a ctypes function (x address, parts address, M, K)


def _splitter(dtype: torch.dtype):
    """The split of ``dtype`` rows as a C callback, compiled (or loaded from numba's cache) on first use: a ctypes
    call costs ~1 us where numba's dispatcher takes 7-11 us to match its arguments."""
    fn = _SPLITS.get(dtype)
    if fn is None:
        with _LOCK:
            fn = _SPLITS.get(dtype)
            if fn is None:
                sig = types.void(types.voidptr, types.voidptr, types.int64, types.int64)
                fn = _SPLITS[dtype] = keyed_cfunc(_SPLIT_PY[dtype], sig, _cached.key, nogil=True).ctypes
    return fn


class _Scratch(threading.local):
    """One parts buffer per thread, reused by the calls of that thread: a call of 104 rows paid more for a fresh
    buffer and its zeroed padding than for a third of its products. It never leaves :func:`amx_linear`."""

    def __init__(self):
        self.buf = None
        self.addr = 0
        self.busy = False  # a call in progress on this thread (re-entered from a signal handler or a finalizer)


_SCRATCH = _Scratch()
#: a thread keeps a parts buffer of at most this many bytes (3 x 1024 rows x K = 1536 of float32 take 9 MiB)
SCRATCH_BYTES = 4 << 20


def on_lines(n: int, dtype=np.int16) -> np.ndarray:
    """A new array of ``n`` elements of ``dtype`` starting on a 64-byte line, for what AMX tiles load: each 64-byte
    tile row then loads one line (NumPy aligns to 16 bytes, and a row across two lines loads both: a 128-row
    ``vnni8`` call took 3.5 ms in the processes where its planes fell so, 2.2 elsewhere).

    >>> on_lines(100, np.int8).ctypes.data % 64
    0
    """
    size = n * np.dtype(dtype).itemsize
    raw = np.empty(size + 64, np.uint8)
    off = -raw.ctypes.data % 64
    return raw[off:off + size].view(dtype)


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
    buf = torch.empty((parts, -(-M // _ROWS), _ROWS * K), dtype=torch.bfloat16, device="cpu")
    x = x.detach().contiguous()  # held: the split reads it by address
    if buf.numel():
        _splitter(x.dtype)(x.data_ptr(), buf.data_ptr(), M, K)
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
    if not (_AVAILABLE or available()):
        raise RuntimeError(_NO_TILES)
    if M and T:
        xp = split_rows(torch.from_numpy(x))
        if bits == 4 and zp.shape[0] == 0:
            zp = _eights(out.shape[1])[0]
        _run(xp.data_ptr(), xp.shape[0], M, wb.ctypes.data, wb.dtype == np.int8, T, K, W, scale.ctypes.data,
             zp.ctypes.data, zp.shape[0], gsize, bits, out.ctypes.data)
    return out


def dequantizes(dtype: torch.dtype, rows: int, in_features: int, group_size: int) -> bool:
    """Whether a call multiplies dequantized bfloat16 panels, ``bfloat16((code - zp) * scale)``, accumulating all
    of K at once: bfloat16 activations, ``_DEQ_ROWS`` rows or more, several groups. Scaling the float32 sums at
    the end of every group (one multiply-add per row and channel) then costs more than the conversion; the weight
    is rounded to bfloat16 as the activations are, as F.linear on the dequantized bfloat16 weight computes. Decided
    per call (all its row chunks alike), so a row's result does not depend on how the call is chunked.

    >>> dequantizes(torch.bfloat16, 128, 4096, 128), dequantizes(torch.bfloat16, 16, 4096, 128)
    (True, False)
    >>> dequantizes(torch.bfloat16, 128, 4096, 4096), dequantizes(torch.float32, 128, 4096, 128)
    (False, False)
    """
    return dtype == torch.bfloat16 and rows >= _DEQ_ROWS and group_size < in_features


def amx_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               group_size: int, bits: int, out_features: int, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The forward on CPU torch tensors that ``layouts.blocked`` built (``scale`` / ``zero_point`` already
    ``[G, N]``, all three contiguous): ``[M, N]``, a new tensor, in ``out_dtype`` (default float32; bfloat16 or
    float16: the float32 sums rounded to nearest even by the kernel as it stores them, as ``.to()`` rounds), with
    ``bias`` (``[N]``, any float dtype; its float32 value) added to the float32 sums before that rounding, as
    F.linear adds it: the kernel's own stores, no second pass over the output. Rows go ``ROW_CHUNK`` at a time: the
    bfloat16 parts of ``x`` take up to 1.5x its float32 bytes, held for one chunk only (in a buffer the calling
    thread reuses, up to ``SCRATCH_BYTES``).

    The operands reach the kernel as addresses read on every call (``data_ptr``, 0.05 us): nothing about a weight
    is cached, so a weight moved, reloaded or rebuilt is read where it now is."""
    if not (_AVAILABLE or available()):  # a tile instruction without the tile state is SIGILL, not an error
        raise RuntimeError(_NO_TILES)
    parts = _PARTS.get(x.dtype)
    if parts is None or not (x.is_cpu and qweight.is_cpu and scale.is_cpu and zero_point.is_cpu):
        raise TypeError(f"the AMX kernel takes CPU float32, float16 or bfloat16 rows, got {x.dtype} on {x.device}")
    odt = torch.float32 if out_dtype is None else out_dtype
    if odt not in TORCH_KINDS or bias is not None and (not bias.is_cpu or tuple(bias.shape) != (out_features,)):
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16 and bias a CPU tensor of {out_features} "
                        f"values, got {odt} and {None if bias is None else (tuple(bias.shape), str(bias.device))}")
    return _Prepared(qweight, scale, zero_point, group_size, bits, out_features)(x.contiguous(), bias, odt)


class _Prepared:
    """What a layer's calls share: the weight's operands as the kernel reads them (addresses, shapes), for
    :func:`amx_linear`, or kept by :func:`runner` for all of a layer's calls (which saves their Python: a 32 x 64
    float32 call took 66 us through the layer, against 26 for dense F.linear). Holds the tensors it addresses.
    :mod:`qtorch.bf16dot` subclasses it for its kernel (``_kernel``; ``_DIRECT``: bfloat16 rows in whole tiles
    read where they lie)."""

    __slots__ = ("tensors", "wa", "signed", "T", "K", "W", "sa", "zaddr", "zrows", "group", "bits", "N")
    _DIRECT = True

    @staticmethod
    def _kernel(*args, **kwargs) -> None:
        _run(*args, **kwargs)

    def __init__(self, qweight, scale, zero_point, group_size: int, bits: int, out_features: int):
        self.tensors = (qweight, scale, zero_point)
        self.T, self.K, self.W = qweight.shape
        self.zrows = zero_point.shape[0]
        if bits == 4 and self.zrows == 0:  # symmetric 4-bit codes carry the offset 8: one row of 8s serves all groups
            self.zaddr, self.zrows = _eights(out_features)[1], 1
        else:
            self.zaddr = zero_point.data_ptr()
        self.wa, self.sa, self.signed = qweight.data_ptr(), scale.data_ptr(), qweight.dtype == torch.int8
        self.group, self.bits, self.N = group_size, bits, out_features

    def __call__(self, x: torch.Tensor, bias, odt: torch.dtype) -> torch.Tensor:
        """``x [M, K]`` (contiguous, float32/bfloat16/float16, checked by the caller) -> ``[M, N]`` of ``odt``."""
        M, K, N = x.shape[0], self.K, self.N
        # on the CPU whatever the default device (under ``torch.device("meta")`` a bare empty has no memory to write)
        out = torch.empty((M, N), dtype=odt, device="cpu")
        if M == 0 or self.T == 0:  # (T == 0 only where N == 0)
            return out
        if bias is not None and (bias.dtype != torch.float32 or bias.requires_grad or not bias.is_contiguous()):
            bias = bias.detach().to(torch.float32).contiguous()  # held until the kernel returns
        okind, baddr = TORCH_KINDS[odt], 0 if bias is None else bias.data_ptr()
        dt = x.dtype
        parts, deq = _PARTS[dt], int(dequantizes(dt, M, K, self.group))
        xa, oa, xsize, osize = x.data_ptr(), out.data_ptr(), x.element_size(), out.element_size()
        fixed = (self.wa, self.signed, self.T, K, self.W, self.sa, self.zaddr, self.zrows, self.group, self.bits)
        scratch = _SCRATCH
        own = not scratch.busy
        scratch.busy = True
        try:
            for r0 in range(0, M, ROW_CHUNK):
                m = min(M, r0 + ROW_CHUNK) - r0
                x0, o0 = xa + r0 * K * xsize, oa + r0 * N * osize
                if self._DIRECT and dt == torch.bfloat16 and m % _ROWS == 0:
                    # bfloat16 rows in whole tiles need no split: the A tiles are read from x, a row 2 K bytes apart
                    self._kernel(x0, 1, m, *fixed, o0, direct=1, deq=deq, okind=okind, bias=baddr)
                    continue
                n = parts * -(-m // _ROWS) * _ROWS * K
                if not own or 2 * n > SCRATCH_BYTES:
                    buf = on_lines(n)  # a call re-entered on this thread, or too large to keep
                    pa = buf.ctypes.data
                else:
                    if scratch.buf is None or scratch.buf.size < n:
                        scratch.buf = on_lines(n)
                        scratch.addr = scratch.buf.ctypes.data  # 0.8 us a read
                    pa = scratch.addr
                split_into(dt, x0, pa, m, K)
                self._kernel(pa, parts, m, *fixed, o0, deq=deq, okind=okind, bias=baddr)
        finally:
            if own:
                scratch.busy = False
        return out


def runner(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int, bits: int,
           out_features: int, dtype: torch.dtype, prepared=_Prepared):
    """:func:`amx_linear` of one layer for ``dtype`` rows, its weight's operands read once: ``f(x, bias)`` for a
    contiguous ``x [M, K]`` of ``dtype``, the output in ``dtype``. The caller keeps it while the weight's tensors
    are the same (their addresses are fixed in it) and checks ``x``. ``prepared``: the kernel's :class:`_Prepared`
    (:mod:`qtorch.bf16dot` passes its own)."""
    if not (_AVAILABLE or available()) and prepared is _Prepared:
        raise RuntimeError(_NO_TILES)
    if dtype not in _PARTS or not (qweight.is_cpu and scale.is_cpu and zero_point.is_cpu):
        raise TypeError(f"the kernel takes CPU float32, float16 or bfloat16 rows, got {dtype}")
    call = prepared(qweight, scale, zero_point, group_size, bits, out_features)
    return lambda x, bias: call(x, bias, dtype)


_NO_TILES = "this process cannot use AMX tiles (no AMX-BF16 CPU, or Linux refused the tile state)"



def _run(xaddr: int, parts: int, M: int, wb: int, signed: bool, T: int, K: int, W: int, scale: int, zp: int,
         zp_rows: int, gsize: int, bits: int, out: int, direct: int = 0, deq: int = 0, okind: int = 0,
         bias: int = 0) -> None:
    """One kernel call on addresses: parts of x (or x itself, ``direct``), codes ``[T, K, W]``, scale and zero
    points ``[G or zp_rows, N]``, out ``[M, N]`` of the kind ``okind`` (:data:`qtorch.gemv.TORCH_KINDS`), ``bias``
    float32 ``[N]`` or 0 (none). The caller holds every operand until it returns."""
    units = _units(T, W, bits)
    nchunks = _chunks(T, units, _omp.team_size())
    flags = bits | direct << 8 | deq << 9 | okind << 10 | (1 if bias else 0) << 12 | zp_rows << 16
    # OPERANDS' fields in order (OPERANDS.pack checks names and kinds at ~2.5 us a call; a test pins the order)
    block = _omp.new_block(nchunks, units, (parts, M, T, K, W, gsize, flags, bias, xaddr, wb, scale, zp, out))
    team = _TEAM_KERNELS[signed]
    _omp.run(units, team, block, _omp.on_caller, (team, block), units, 1, nchunks=nchunks)


@functools.lru_cache(maxsize=16)
def _eights(n: int) -> tuple:
    z = np.full((1, n), 8, np.uint8)  # never written: the kernels only read zero points
    return z, z.ctypes.data
