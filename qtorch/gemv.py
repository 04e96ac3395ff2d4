"""One-row forward (``rows == 1``: decoding) of the 8- and 4-bit blocked layouts, at memory speed on the CPU.

A leaf of :mod:`qtorch.layouts.blocked`, which calls it for single-row inputs. The layout is the one
``layouts.blocked`` builds: tiles of ``NT`` output channels stored K-major, ``wb[T, K, NT]`` (8 bits: int8
symmetric, uint8 with zero points) or ``wb[T, K, NT/2]`` (4 bits: byte ``j`` holds column ``j`` in its low nibble
and column ``j + NT/2`` in its high one); scale and zero point ``[G, N]``.

The inner loop is written as LLVM vector IR (``_dot_rows``): per row of a tile it loads the codes of up to 128
columns, widens them to 32-bit integers, converts and multiply-adds them (FMA) into accumulators that stay in
registers for a whole group, then adds the group's sums times its scales to the output (vector operations, the
same ones per column as a scalar loop). On AVX-512, 4-bit codes with no zero point to subtract per code
(symmetric, or folded) become floats by a table lookup, ``vpermps`` on the 16 values of a nibble (one instruction
instead of a mask, a subtraction and a conversion; the same values): 10-25% less time from L2. A tile row of 64 bytes
is then read as 16 dwords, not widened byte by byte: each nibble is shifted to the low bits of its dword for the
lookup (``vpermps`` reads only those), its accumulator holds every fourth column, and the columns are put back in
order once per group, every column summed as before, to the bit (4096x4096 g128 float32 on a 2-core Zen 4: 0.57
against 0.63-0.66 ms on one thread, hot; 0.28-0.30 against 0.34 on both). Vectors are of 16 floats where the CPU
numba compiles for has AVX-512
(:data:`WIDE`: half the instructions per code of 8), else of 8 (AVX2; LLVM splits 16-float vectors where a CPU
lacks them, so either width runs anywhere, with the same bits: each column sees the same operations in the same
order). numba's own loop over the same arrays keeps the accumulators in memory and re-checks aliasing on every row:
2-3x more instructions per code. Accumulation is float32. The zero point is subtracted from the codes in integers
(exact, as in every other path), or once per group (``fold``): 4-bit codes are then looked up centred, ``code - 8``
(exact), and ``(z - 8) * sum(x)`` is subtracted per group, every term within the bound of the exact subtraction
(``|code - 8|, |z - 8| <= 8``), so float32 rows fold too (0.355 against 0.419 ms for 4096x4096 g128 on a 2-core
Zen 4); 8-bit codes fold as ``z * sum(x)`` for bfloat16/float16 rows only, whose own rounding is coarser than
that of codes up to 255. Where numba compiles for a CPU without AVX-512 (:data:`MASKED`: no ``vpermps``), folded
4-bit codes are read as dwords and each nibble is masked in place: its int32 is ``code 2^(4 p)`` for nibble ``p``
(the top one shifted down), converted exactly and multiplied into accumulator ``p``, which is scaled by ``2^(-4 p)``
once per group (exact barring overflow past 2^100 or float32 subnormals); one AND, one conversion and one FMA per 8
codes, against widening, masking and centring them (4.5 operations). The codes are then not centred: the group sums
subtract ``z * sum(x)`` (or ``8 * sum(x)`` for symmetric codes), terms up to ``15 |x|``, so the float32 rounding
bound of a sum is at most about twice that of the centred sums (still a float32 dot product's; the tests bound
every path by it). On a 2-core Zen 3, 4096x4096 4-bit g128 float32, hot: one thread 1.22 -> 0.82 ms, both 0.62-0.69
-> 0.48-0.50; ``bench_decode`` w4a16 18.4 -> 16.6 ms a token in bfloat16, 20.1 -> 17.4 in float32. On CPUs with
AVX512-BF16, 4-bit codes of bfloat16 rows also have a dot-product variant (``run_plan(..., dot=True)``, the
blocked layout's ``bf16dot`` path at one row, chosen by measurement): one ``vdpbf16ps`` per 32 codes (two rows of K,
16 columns) where the float path takes two conversions and two FMAs. The two rows' bytes are interleaved by
16-bit words, so that each 32-bit lane holds the same two bytes of both rows; a shift and one mask-and-or then make
the bfloat16 ``1 + code / 16`` of one nibble of both (exact; no table, no widening), and each group's sums are
corrected once, ``16 (acc - sum x) - z sum x``. On a 2-core Zen 4, 4096x4096 g128, one thread: 0.32-0.37 ms hot and
0.44-0.49 from memory, against 0.44-0.52 / 0.59-0.66 for the earlier variant (bytes widened to 16 bits, nibbles
looked up by ``vpermw``); both threads: 0.29-0.33 ms from memory either way, at memory speed there (a torch sum of
the same 8 MB took 0.22-0.29 ms).

Where numba compiles for a CPU with AVX2 and without AVX-512 (:data:`PLANES`), 4-bit codes of bfloat16 and float16
rows have an integer variant instead (``run_plan(..., dot=True)``, the blocked layout's ``int8dot`` path at one row,
chosen by measurement): each thread splits ``x`` per block of up to 128 inputs into two signed-byte planes
(:mod:`qtorch.planes`: ``q = round(x 2^(14 - e)) = 256 h + l``, ``2^e`` above the block's largest ``|x|``; the one
rounding, at most ``2^-15`` of that largest), the 32 bytes of rows ``k`` and ``k + 1`` are paired (``vpunpcklbw`` /
``vpunpckhbw``: one 16-bit lane per column), the nibbles masked, and ``vpmaddubsw`` multiplies each by the pair
``h_k, h_k+1`` and by ``l_k, l_k+1``: 32 codes per instruction, no conversion. Eight pairs of rows are summed in
16 bits (at most ``8 * 2 * 15 * 128 < 2^15``), then widened by ``vpmaddwd`` as ``l + 256 h`` into 32-bit sums,
exact per block; ``z sum q`` is subtracted and each block's sums scaled once. On a 2-core Zen 3, bfloat16, hot,
g128: 4096x4096 one thread 0.82 -> 0.50 ms, both 0.455 -> 0.30; 2048x5632 both 0.336 -> 0.227. A row holding a NaN
or an infinity takes the float path; float32 rows keep it (three planes, built and measured: 0.79-1.07x).

A tile's rows are contiguous (K-major): each thread streams one tile at a time from memory. On the wide path every
row also prefetches the lines :data:`PREFETCH` bytes ahead into L2: the hardware prefetchers stop at each 4 KB
page, and a decoding step reads every byte of a layer once, from memory. On the AVX-512 Xeon the prefetch gave
more than the wider vectors (a 4096x4096 layer read from memory, one thread: 8 bits 2.3 ms before, 2.0 with the
wider vectors, 1.4 with both; torch's ``_weight_int8pack_mm`` 1.6).

Per call (:func:`run_plan`): ``x`` is read in its own dtype (float32, bfloat16 or float16; each thread widens it to
float32 for itself, exactly, and sums its groups for the folded zero point), and each tile rounds its float32 sums
into the output's dtype once they are done (to nearest even, as ``.to()`` does): no conversion before or after the
call, no NumPy call in Python (a hot 512x512 4-bit bfloat16 layer call: 31 us before, 16 after).

Threads: the tiles are claimed one at a time by the threads of PyTorch's own OpenMP team (:mod:`qtorch._omp`:
no second pool competes with torch's spinning workers), or by qcore's thread splitter where torch has no such
team.

>>> import numpy as np
>>> wb = np.ones((1, 128, 64), np.int8)                    # one tile: K = 128, 64 output channels, codes 1
>>> scale = np.full((1, 64), 0.5, np.float32)
>>> out = np.empty(64, np.float32)
>>> gemv_blocked(np.ones(128, np.float32), wb, scale, np.zeros((0, 0), np.uint8), 128, 8, out)[:3]
array([64., 64., 64.], dtype=float32)
"""

from __future__ import annotations

import functools
import os
import threading

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _launch, _omp
from ._ir import BF16 as _BF16, F32 as _F32, I8 as _I8, I16 as _I16, I32 as _I32, I64 as _I64, host_has, vec
from ._ir import prefetch_at, prefetch_l2
from ._ir import cached as _cached
from .planes import block_size, block_size_of, split_row

__all__ = ["Chain", "Launcher", "Plan", "eligible", "gemv_blocked"]

# vpermps on 16 floats (AVX-512F): an instruction, so only where numba compiles for a CPU that has it (a 16-float
# vector elsewhere is split by LLVM; an intrinsic is not)
_PERMPS = host_has("avx512f")
#: where numba compiles for a CPU without AVX-512 (no vpermps lookup of nibbles), folded 4-bit codes are read as
#: dwords and each nibble masked in place: one AND (or one shift, for the top nibble), a conversion and an FMA per
#: 8 codes, where widening, masking and centring them took 4.5 operations (:func:`_dot_rows`)
MASKED = not _PERMPS
#: vdpbf16ps (AVX512-BF16) and shuffles of 16-bit words (AVX512-BW): the dot-product variant for bfloat16 rows
#: (:func:`dot_available`)
_DP = _PERMPS and host_has("avx512bf16") and host_has("avx512bw")


def dot_available() -> bool:
    """Whether the one-row kernel's dot-product variant can run here (numba compiles for a CPU with AVX512-BF16
    and AVX512-BW): 4-bit codes of bfloat16 rows, two rows of K per ``vdpbf16ps``."""
    return _DP


def eligible(bits: int, tile_bytes: int) -> bool:
    """True when :func:`gemv_blocked` serves a blocked layout of ``bits`` with ``tile_bytes`` bytes per row of a
    tile (the chunk the inner loop reads: 64 bytes at 8 bits, 32 at 4 bits)."""
    return (bits == 8 and tile_bytes % 64 == 0) or (bits == 4 and tile_bytes % 32 == 0)


@intrinsic
def _dot_rows(typingctx, wb, t, k0, col0, nk, x, out, lo, hi, zp, scale, g, n0, xsg, pf, bits, chunk, zmode,
              lanes):
    """out[n0 + c] += scale[g, n0 + c] * sum over rows k0..k0+nk of x[k] * (code - zero point), for the columns
    ``c`` of wb[t, k, col0:col0+chunk], the sum in registers (float32).

    8 bits: ``chunk`` codes per row into the columns ``lo..lo+chunk``. 4 bits: ``chunk`` bytes per row; the low
    nibbles are the columns ``lo..lo+chunk``, the high ones ``hi..hi+chunk``. int8 codes are sign-extended.
    ``lanes`` (8 or 16) floats per vector: a load of ``lanes`` bytes. ``zmode`` 0: no zero point; 1: ``zp[g, n0 +
    c]`` and 2: the constant 8 (symmetric 4-bit codes), subtracted from the codes in integers, exactly, as
    everywhere else; 3: the zero point folded in once per group as ``z * xsg`` (``xsg``: the group's sum of x);
    7 (4 bits): the codes centred, ``code - 8`` (exact, as for 2), and ``(z - 8) * xsg`` folded in per group:
    every term within the bound of the exact subtraction's (``|code - 8|, |z - 8| <= 8``). ``pf`` > 0: each row
    prefetches the lines ``pf`` bytes ahead of it. A whole row per call where it fits the vector registers: reading
    half rows of a 128-byte row in two passes cost 20% more time at 1 row (the strided passes stream worse from
    memory).
    """
    if not all(isinstance(a, types.IntegerLiteral) for a in (bits, chunk, zmode, lanes)):
        return None
    nbits, nbytes, zm, L = bits.literal_value, chunk.literal_value, zmode.literal_value, lanes.literal_value
    if zm in (5, 6):  # zmodes 7 and 2 by bfloat16 dot products (:func:`_emit_dot_rows_magic`), where they apply
        zm = 7 if zm == 5 else 2
        if nbits == 4 and L == 16 and _DP:
            sig = types.void(wb, t, k0, col0, nk, x, out, lo, hi, zp, scale, g, n0, xsg, pf, bits, chunk, zmode,
                             lanes)
            return sig, functools.partial(_emit_dot_rows_magic, nbytes, zm)
    if zm == 7 and nbits == 8:
        zm = 3  # (8-bit call sites of the same loop: never run with this mode)
    # 4-bit codes folded (zmode 7, or 9: symmetric with the group sums of x at hand) where numba compiles for a CPU
    # without AVX-512: each nibble masked in place in its dword (:data:`MASKED`)
    masked = nbits == 4 and zm in (7, 9) and MASKED
    if zm == 9 and not masked:
        zm = 2  # symmetric codes centred, as without the sums of x
    signed = wb.dtype == types.int8
    nload = nbytes // L  # loads of L bytes per row
    nacc = nload if nbits == 8 else 2 * nload  # <L x float> accumulators
    # 4-bit codes with no per-column zero point to subtract first (symmetric, or folded): their floats by a table
    # lookup (vpermps: one instruction, the same values) instead of a mask, a subtraction and a conversion
    lookup = nbits == 4 and L == 16 and zm in (2, 7) and _PERMPS
    vf, vi, vb = vec(_F32, L), vec(_I32, L), vec(_I8, L)

    def codegen(context, builder, sig, args):
        w = context.make_array(sig.args[0])(context, builder, args[0])
        xa = context.make_array(sig.args[5])(context, builder, args[5])
        oa = context.make_array(sig.args[6])(context, builder, args[6])
        za = context.make_array(sig.args[9])(context, builder, args[9])
        sa = context.make_array(sig.args[10])(context, builder, args[10])
        tt, kk0, c0, n, lo, hi, g, n0, pfd = (context.cast(builder, args[i], sig.args[i], types.int64)
                                              for i in (1, 2, 3, 4, 7, 8, 11, 12, 14))
        xs = args[13]
        _, zcols = cgutils.unpack_tuple(builder, za.shape, 2)
        _, scols = cgutils.unpack_tuple(builder, sa.shape, 2)
        zrow = builder.gep(za.data, [builder.add(builder.mul(g, zcols), n0)])
        srow = builder.gep(sa.data, [builder.add(builder.mul(g, scols), n0)])
        orow = builder.gep(oa.data, [n0])
        _, k_all, width = cgutils.unpack_tuple(builder, w.shape, 3)
        wp = builder.gep(w.data, [builder.add(builder.mul(builder.add(builder.mul(tt, k_all), kk0), width), c0)])
        xp = builder.gep(xa.data, [kk0])
        offs, zvec = [], []
        for i in range(nacc):  # accumulator i: L columns of the tile, from column off on
            base, j = (lo, i) if nbits == 8 or i < nload else (hi, i - nload)
            off = builder.add(base, ir.Constant(_I64, L * j))
            offs.append(off)
            zvec.append(None)
            if zm == 1:
                zb = builder.load(builder.bitcast(builder.gep(zrow, [off]), vb.as_pointer()), align=1)
                zvec[i] = builder.zext(zb, vi)
            elif zm in (2, 7):
                zvec[i] = ir.Constant(vi, [8] * L)
        zero = ir.Constant(vf, [0.0] * L)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(nacc)]  # -> registers
        # a 64-byte row of 4-bit codes read as 16 dwords, nibble p of each into accumulator p (columns 4 i + p // 2
        # of the low or high nibbles): no widening; put back in column order once per group
        dwords = lookup and nbytes == 64
        daccs = [cgutils.alloca_once_value(builder, zero) for _ in range(8)] if dwords else []
        D = nbytes // 4  # masked: the row's dwords, one lane each
        vfd, vid = vec(_F32, D), vec(_I32, D)
        maccs = [cgutils.alloca_once_value(builder, ir.Constant(vfd, [0.0] * D)) for _ in range(8)] if masked else []
        lanes0 = ir.Constant(vi, [0] * L)
        if lookup:  # the float of each nibble, centred: code - 8 (symmetric codes' offset, or folded codes)
            table = ir.Constant(vf, [float(i - 8) for i in range(16)])
            permps = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vi]),
                                                    "llvm.x86.avx512.permvar.sf.512")
        do_pf = builder.icmp_signed(">", pfd, ir.Constant(_I64, 0))
        lines = list(range(0, max(nbytes, 1), 64))  # the 64-byte lines a chunk of a row touches
        with cgutils.for_range(builder, n) as loop:
            i = loop.index
            row = builder.gep(wp, [builder.mul(i, width)])
            with builder.if_then(do_pf, likely=True):
                for ln in lines:
                    p = builder.gep(row, [builder.add(pfd, ir.Constant(_I64, ln))])
                    # into L2: faster than into L1 at every distance measured; past the end of the codes is harmless
                    prefetch_l2(builder, p)
            xv = builder.load(builder.gep(xp, [i]))
            xb = builder.shuffle_vector(builder.insert_element(ir.Constant(vf, ir.Undefined), xv, ir.Constant(_I32, 0)),
                                        ir.Constant(vf, ir.Undefined), lanes0)
            if dwords:  # the row's 64 bytes as 16 dwords; nibble p of each, shifted to the low bits, looked up
                d = builder.load(builder.bitcast(row, vi.as_pointer()), align=1)
                for p in range(8):
                    iv = d if p == 0 else builder.lshr(d, ir.Constant(vi, [4 * p] * L))
                    prod = builder.fmul(xb, builder.call(permps, [table, iv]), flags=("contract",))
                    builder.store(builder.fadd(builder.load(daccs[p]), prod, flags=("contract",)), daccs[p])
            if masked:  # nibble p of each dword, in place: the int32 code 2^(4 p) (the top one shifted down)
                d = builder.load(builder.bitcast(row, vid.as_pointer()), align=1)
                xbd = builder.shuffle_vector(builder.insert_element(ir.Constant(vfd, ir.Undefined), xv,
                                                                    ir.Constant(_I32, 0)),
                                             ir.Constant(vfd, ir.Undefined), ir.Constant(vid, [0] * D))
                for p in range(8):
                    t = (builder.lshr(d, ir.Constant(vid, [28] * D)) if p == 7
                         else builder.and_(d, ir.Constant(vid, [15 << (4 * p)] * D)))
                    prod = builder.fmul(xbd, builder.sitofp(t, vfd), flags=("contract",))
                    builder.store(builder.fadd(builder.load(maccs[p]), prod, flags=("contract",)), maccs[p])
            for v in range(0 if dwords or masked else nload):
                b = builder.load(builder.bitcast(builder.gep(row, [ir.Constant(_I64, L * v)]), vb.as_pointer()),
                                 align=1)
                if nbits == 8:
                    parts = [(builder.sext(b, vi) if signed else builder.zext(b, vi), v)]
                elif lookup:  # vpermps reads the low 4 bits of each index: the low nibble needs no mask
                    z = builder.zext(b, vi)
                    parts = [(z, v), (builder.lshr(z, ir.Constant(vi, [4] * L)), v + nload)]
                else:
                    z = builder.zext(b, vi)
                    parts = [(builder.and_(z, ir.Constant(vi, [15] * L)), v),
                             (builder.lshr(z, ir.Constant(vi, [4] * L)), v + nload)]
                for iv, a in parts:
                    if lookup:
                        f = builder.call(permps, [table, iv])
                    else:
                        if zvec[a] is not None:
                            iv = builder.sub(iv, zvec[a])
                        f = builder.sitofp(iv, vf)
                    # 'contract': one FMA where the CPU has it, a multiply and an add where it has not
                    prod = builder.fmul(xb, f, flags=("contract",))
                    builder.store(builder.fadd(builder.load(accs[a]), prod, flags=("contract",)), accs[a])
        if masked:  # scaled back by 2^(-4 p) (exact), then in column order: byte c in dword c // 4, nibble
            # 2 (c % 4) + h (h = 0: the low nibbles' columns, 1: the high ones')
            for p in range(7):
                builder.store(builder.fmul(builder.load(maccs[p]), ir.Constant(vfd, [2.0 ** (-4 * p)] * D)),
                              maccs[p])
            for par in (0, 1):
                allv = _concat(builder, [builder.load(maccs[p]) for p in range(par, 8, 2)])
                for v in range(nload):
                    idx = [D * (c % 4) + c // 4 for c in range(L * v, L * v + L)]
                    builder.store(builder.shuffle_vector(allv, ir.Constant(allv.type, ir.Undefined),
                                                         ir.Constant(vi, idx)), accs[v + nload * par])
        if dwords:  # back in column order: accumulators v (low nibbles, columns lo + 16 v ..) and v + 4 (high)
            for par in (0, 1):
                allv = _concat(builder, [builder.load(daccs[p]) for p in range(par, 8, 2)])
                for v in range(4):  # column c = 4 i + q lies in accumulator p = 2 q + par, lane i
                    idx = [16 * (c % 4) + c // 4 for c in range(16 * v, 16 * v + 16)]
                    builder.store(builder.shuffle_vector(allv, ir.Constant(allv.type, ir.Undefined),
                                                         ir.Constant(vi, idx)), accs[v + 4 * par])
        # masked codes are not centred: the zero point (zmode 3) or the offset 8 (zmode 8) times the sum of x
        _emit_group_sums(builder, accs, offs, srow, orow, zrow, xs, (3 if zm == 7 else 8) if masked else zm, L)
        return context.get_dummy_value()

    sig = types.void(wb, t, k0, col0, nk, x, out, lo, hi, zp, scale, g, n0, xsg, pf, bits, chunk, zmode, lanes)
    return sig, codegen


def _concat(builder, vectors: list):
    """IR: one vector of the ``vectors`` (a power of two of them, of one type) end to end, joined pairwise."""
    while len(vectors) > 1:
        n = 2 * vectors[0].type.count
        vectors = [builder.shuffle_vector(vectors[i], vectors[i + 1], ir.Constant(vec(_I32, n), list(range(n))))
                   for i in range(0, len(vectors), 2)]
    return vectors[0]


def _magic_cols(nbytes: int) -> dict:
    """:func:`_emit_dot_rows_magic`'s accumulators ``(h, p)`` (interleave half ``h``, nibble ``p`` of a 16-bit
    word) -> the byte offset in the chunk of each lane's column (the low nibbles' columns for even ``p``, the high
    nibbles' for odd ``p``). 64 bytes: lane ``4 L + d`` of half ``h`` holds word ``8 L + 4 h + d`` (the 128-bit
    lanes of ``vpunpck{l,h}wd``); 32 bytes: lane ``i`` holds word ``i``."""
    if nbytes == 64:
        return {(h, p): [16 * (i // 4) + 8 * h + 2 * (i % 4) + (p >> 1) for i in range(16)]
                for h in (0, 1) for p in range(4)}
    return {(0, p): [2 * i + (p >> 1) for i in range(16)] for p in range(4)}


def _magic_order(nbytes: int, parity: int) -> tuple:
    """The accumulators of one nibble parity, and for each column of the chunk (in order) its lane in their
    concatenation: the shuffle that puts them back in column order."""
    cols = _magic_cols(nbytes)
    keys = [key for key in cols if key[1] % 2 == parity]
    where = {c: 16 * a + i for a, key in enumerate(keys) for i, c in enumerate(cols[key])}
    return keys, [where[c] for c in range(nbytes)]


def _emit_dot_rows_magic(nbytes, zm, context, builder, sig, args):
    """:func:`_dot_rows` for 4-bit codes of bfloat16 rows (``zm`` 7 or 2) by ``vdpbf16ps``, two rows of K at a
    time, with no byte widened and no table: the ``nbytes`` (32 or 64) bytes of rows ``k`` and ``k + 1``
    interleaved by 16-bit words (64: ``vpunpcklwd`` / ``vpunpckhwd``; 32: one ``vpermt2w``), so that each 32-bit
    lane holds the same two bytes of both rows in its two halves; one 32-bit shift brings nibble ``p`` of both
    halves to bits 3-6 of each, and ``(v & 0x00780078) | 0x3F803F80`` (one ``vpternlogd``) makes both the bfloat16
    ``1 + code / 16`` (exact). One ``vdpbf16ps`` per 32 codes, ``acc[n] += x[k] m[k][n] + x[k + 1] m[k + 1][n]``
    (exact products, float32 sums) with ``x[k], x[k + 1]`` broadcast as one pair; two integer operations a vector
    and no shuffle but the interleave (a widening and a ``vpermw`` table lookup per 32 codes took a third more time
    on one thread of a Zen 4). The sums give ``sum x (code - z) = 16 (acc - sum x) - z sum x`` per group (``z`` the
    zero point, or 8 for symmetric codes). The accumulators hold the columns in the interleave's order
    (:func:`_magic_cols`) and are put back in column order once per group. ``x`` is float32 holding bfloat16
    values; ``nk`` is even."""
    w = context.make_array(sig.args[0])(context, builder, args[0])
    xa = context.make_array(sig.args[5])(context, builder, args[5])
    oa = context.make_array(sig.args[6])(context, builder, args[6])
    za = context.make_array(sig.args[9])(context, builder, args[9])
    sa = context.make_array(sig.args[10])(context, builder, args[10])
    tt, kk0, c0, n, lo, hi, g, n0, pfd = (context.cast(builder, args[i], sig.args[i], types.int64)
                                          for i in (1, 2, 3, 4, 7, 8, 11, 12, 14))
    xs = args[13]
    vf, vi, vbf, vrow = vec(_F32, 16), vec(_I32, 16), vec(_BF16, 32), vec(_I8, nbytes)
    vs = vec(_I16, nbytes // 2)
    _, zcols = cgutils.unpack_tuple(builder, za.shape, 2)
    _, scols = cgutils.unpack_tuple(builder, sa.shape, 2)
    zrow = builder.gep(za.data, [builder.add(builder.mul(g, zcols), n0)])
    srow = builder.gep(sa.data, [builder.add(builder.mul(g, scols), n0)])
    orow = builder.gep(oa.data, [n0])
    _, k_all, width = cgutils.unpack_tuple(builder, w.shape, 3)
    wp = builder.gep(w.data, [builder.add(builder.mul(builder.add(builder.mul(tt, k_all), kk0), width), c0)])
    xp = builder.bitcast(builder.gep(xa.data, [kk0]), _I32.as_pointer())
    zero = ir.Constant(vf, [0.0] * 16)
    halves = (0, 1) if nbytes == 64 else (0,)
    keys = [(h, p) for h in halves for p in range(4)]
    accs = {key: cgutils.alloca_once_value(builder, zero) for key in keys}
    fn = functools.partial(cgutils.get_or_insert_function, builder.module)
    dp = fn(ir.FunctionType(vf, [vf, vbf, vbf]), "llvm.x86.avx512bf16.dpbf16ps.512")
    do_pf = builder.icmp_signed(">", pfd, ir.Constant(_I64, 0))
    c16 = ir.Constant(_I32, 16)
    mask = ir.Constant(vi, [0x00780078] * 16)
    ones = ir.Constant(vi, [0x3F803F80] * 16)
    # each word of row k followed by the same word of row k + 1: 64 bytes, vpunpck{l,h}wd (words 0-3 / 4-7 of each
    # 128-bit lane); 32 bytes, all 16 words in one vector
    if nbytes == 64:
        unpack = {h: ir.Constant(vec(_I32, 32), [8 * (i // 8) + 4 * h + (i % 8) // 2 + (32 if i % 2 else 0)
                                                for i in range(32)]) for h in halves}
    else:
        unpack = {0: ir.Constant(vec(_I32, 32), [i // 2 + (16 if i % 2 else 0) for i in range(32)])}

    def pair_step(i, cur):  # rows 2i, 2i + 1 of the group into the accumulator values cur
        row0 = builder.gep(wp, [builder.mul(builder.mul(i, ir.Constant(_I64, 2)), width)])
        row1 = builder.gep(row0, [width])
        with builder.if_then(do_pf, likely=True):
            for r in (row0, row1):
                prefetch_l2(builder, builder.gep(r, [pfd]))
        # x[k], x[k + 1]: their bfloat16 bits (the upper halves of the float32 values) as one 32-bit pair
        k2 = builder.mul(i, ir.Constant(_I64, 2))
        pair = builder.load(builder.gep(xp, [k2]))
        pair1 = builder.load(builder.gep(xp, [builder.add(k2, ir.Constant(_I64, 1))]))
        xv = builder.or_(builder.lshr(pair, c16), builder.and_(pair1, ir.Constant(_I32, 0xFFFF0000)))
        xb = builder.bitcast(builder.shuffle_vector(builder.insert_element(ir.Constant(vi, ir.Undefined), xv,
                                                                         ir.Constant(_I32, 0)),
                                                    ir.Constant(vi, ir.Undefined), ir.Constant(vi, [0] * 16)), vbf)
        a, b = (builder.bitcast(builder.load(builder.bitcast(r, vrow.as_pointer()), align=1), vs)
                for r in (row0, row1))
        for h in halves:
            v = builder.bitcast(builder.shuffle_vector(a, b, unpack[h]), vi)
            for p in range(4):
                sh = 4 * p - 3  # nibble p of each half to bits 3-6
                t = (builder.shl(v, ir.Constant(vi, [3] * 16)) if sh < 0
                     else builder.lshr(v, ir.Constant(vi, [sh] * 16)))
                val = builder.bitcast(builder.or_(builder.and_(t, mask), ones), vbf)
                cur[(h, p)] = builder.call(dp, [cur[(h, p)], xb, val])

    # one set of accumulators (a second one alternating with it, as for chunks of 32 bytes before, ran 10% slower)
    with cgutils.for_range(builder, builder.sdiv(n, ir.Constant(_I64, 2))) as loop:
        cur = {key: builder.load(a) for key, a in accs.items()}
        pair_step(loop.index, cur)
        for key, a in accs.items():
            builder.store(cur[key], a)
    # back in column order: per nibble half (even p: columns lo + j, odd p: hi + j), nbytes columns
    xsb = builder.shuffle_vector(builder.insert_element(ir.Constant(vf, ir.Undefined), xs, ir.Constant(_I32, 0)),
                                 ir.Constant(vf, ir.Undefined), ir.Constant(vi, [0] * 16))
    sixteen = ir.Constant(vf, [16.0] * 16)
    for par, base in ((0, lo), (1, hi)):
        order, where = _magic_order(nbytes, par)
        allv = _concat(builder, [builder.load(accs[key]) for key in order])
        for q in range(nbytes // 16):
            v = builder.shuffle_vector(allv, ir.Constant(allv.type, ir.Undefined),
                                       ir.Constant(vi, where[16 * q:16 * q + 16]))
            off = builder.add(base, ir.Constant(_I64, 16 * q))
            s = builder.load(builder.bitcast(builder.gep(srow, [off]), vf.as_pointer()), align=4)
            op = builder.bitcast(builder.gep(orow, [off]), vf.as_pointer())
            if zm == 7:
                zb = builder.load(builder.bitcast(builder.gep(zrow, [off]), vec(_I8, 16).as_pointer()), align=1)
                z = builder.uitofp(zb, vf)
            else:  # symmetric codes carry the offset 8
                z = ir.Constant(vf, [8.0] * 16)
            v = builder.fsub(builder.fmul(builder.fsub(v, xsb), sixteen), builder.fmul(z, xsb))
            builder.store(builder.fadd(builder.load(op, align=4), builder.fmul(v, s)), op, align=4)
    return context.get_dummy_value()


def _emit_group_sums(builder, accs, offs, srow, orow, zrow, xs, zm, L):
    """IR: a group's sums (``accs``, ``<L x float>`` allocas for the columns at ``offs``) into the output row
    ``orow``, times the scales ``srow``, the zero point folded where ``zm`` is 3 (``zrow``, times the group's sum
    of x ``xs``) or 7 (``zrow - 8`` times it: centred codes): the same operations as a scalar loop (no
    contraction), lane by lane."""
    vf, vi, vb = vec(_F32, L), vec(_I32, L), vec(_I8, L)
    xsb = None
    if zm in (3, 7, 8):
        xsb = builder.shuffle_vector(builder.insert_element(ir.Constant(vf, ir.Undefined), xs, ir.Constant(_I32, 0)),
                                     ir.Constant(vf, ir.Undefined), ir.Constant(vi, [0] * L))
    for a, off in zip(accs, offs):
        s = builder.load(builder.bitcast(builder.gep(srow, [off]), vf.as_pointer()), align=4)
        op = builder.bitcast(builder.gep(orow, [off]), vf.as_pointer())
        v = builder.load(a)
        if zm == 8:  # symmetric codes as stored: their offset 8
            v = builder.fsub(v, builder.fmul(ir.Constant(vf, [8.0] * L), xsb))
        elif zm in (3, 7):
            zb = builder.load(builder.bitcast(builder.gep(zrow, [off]), vb.as_pointer()), align=1)
            z = builder.uitofp(zb, vf)
            if zm == 7:  # z - 8: exact
                z = builder.fsub(z, ir.Constant(vf, [8.0] * L))
            v = builder.fsub(v, builder.fmul(z, xsb))
        builder.store(builder.fadd(builder.load(op, align=4), builder.fmul(v, s)), op, align=4)


@njit(inline="always")
def _dot_group(wb, t, k0, gsize, x, out, zp, scale, g, n0, xsg, pf, bits, W, zmode, lanes):  # pragma: no cover
    # one group of rows of tile t into out (zmode and lanes arrive as literals from the call sites): whole rows per
    # call where they fit the registers (16 vectors of 8 floats, or 8 of 16 floats: the loop's temporaries too)
    if bits == 4:
        step = 64 if lanes == 16 and W % 64 == 0 else 32
        for c in range(0, W, step):
            if step == 64:
                _dot_rows(wb, t, k0, c, gsize, x, out, c, W + c, zp, scale, g, n0, xsg, pf, 4, 64, zmode, lanes)
            else:
                _dot_rows(wb, t, k0, c, gsize, x, out, c, W + c, zp, scale, g, n0, xsg, pf, 4, 32, zmode, lanes)
    elif W % 128 == 0:
        for c in range(0, W, 128):
            _dot_rows(wb, t, k0, c, gsize, x, out, c, c, zp, scale, g, n0, xsg, pf, 8, 128, zmode, lanes)
    else:
        for c in range(0, W, 64):
            _dot_rows(wb, t, k0, c, gsize, x, out, c, c, zp, scale, g, n0, xsg, pf, 8, 64, zmode, lanes)


#: groups ahead of the one being summed whose scale and zero-point lines each tile prefetches (with the rows). Two
#: measured best on the AVX-512 Xeon (16 layers of 5504x2048 4-bit g128 in rotation, 2 threads, from memory:
#: float32 314 us none, 300 one, 301 two, 300 four; bfloat16 344 / 327 / 321 / 326)
PARAMS_AHEAD = 2


@njit(inline="always")
def _prefetch_params(scale, zp, g, n0, NT):  # pragma: no cover - compiled
    # where rows are prefetched, so are the scale and zero-point lines of a group ahead (PARAMS_AHEAD): rows of
    # [G, N] lie N elements apart, so no hardware prefetcher follows them, and each group met them cold
    G, N = scale.shape
    if g < G:
        for c in range(0, NT, 16):
            prefetch_at(scale, g * N + n0 + c)
        if zp.shape[0]:
            for c in range(0, NT, 64):
                prefetch_at(zp, g * N + n0 + c)


@njit(inline="always")
def _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, zmode, lanes):  # pragma: no cover - compiled
    T, K, W = wb.shape
    NT = W * 2 if bits == 4 else W
    n0 = t * NT
    out[n0:n0 + NT] = 0
    for g in range(scale.shape[0]):
        if pf:
            _prefetch_params(scale, zp, g + PARAMS_AHEAD, n0, NT)
        xsg = xs[g] if zmode >= 3 else np.float32(0)
        _dot_group(wb, t, g * gsize, gsize, x, out, zp, scale, g, n0, xsg, pf, bits, W, zmode, lanes)


@_cached
@njit(cache=True, nogil=True)
def _gemv_range(x, xs, wb, scale, zp, gsize, bits, out, pf, wide, dot, t0, t1):  # pragma: no cover - compiled
    # out[n] = sum_k x[k] (code[n, k] - zp) * scale for the output channels of tiles t0..t1. With group sums of x
    # (xs, one per group; empty otherwise) the zero point is folded in afterwards: sum x c - z sum x. ``wide``:
    # vectors of 16 floats (AVX-512) instead of 8. ``dot``: 4-bit codes of bfloat16 rows by dot products.
    has_zp = zp.shape[0] > 0
    fold = xs.shape[0] > 0
    for t in range(t0, t1):
        if dot and fold and bits == 4:  # bfloat16 rows by dot products (zmodes 7 / 2)
            if has_zp:
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 5, 16)
            else:
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 6, 16)
        elif wide:
            if fold and has_zp and bits == 4:  # centred codes, (z - 8) sum x
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 7, 16)
            elif fold and has_zp:
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 3, 16)
            elif has_zp:
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 1, 16)
            elif bits == 4 and fold:  # symmetric 4-bit codes carry the offset 8 (9: the sums of x at hand)
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 9, 16)
            elif bits == 4:
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 2, 16)
            else:
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 0, 16)
        else:
            if fold and has_zp and bits == 4:
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 7, 8)
            elif fold and has_zp:
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 3, 8)
            elif has_zp:
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 1, 8)
            elif bits == 4 and fold:  # symmetric 4-bit codes carry the offset 8 (9: the sums of x at hand)
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 9, 8)
            elif bits == 4:
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 2, 8)
            else:
                _tile(wb, t, x, xs, scale, zp, gsize, bits, out, pf, 0, 8)


# -- the integer variant of 4-bit codes of 16-bit rows (CPUs with AVX2 and without AVX-512)

#: bfloat16 / float16 rows of 4-bit codes as integer dot products where numba compiles for a CPU with AVX2 and
#: without AVX-512 (the blocked layout's ``int8dot`` path at one row; :func:`planes_available`): ``x`` split into two
#: signed-byte planes per block of inputs (:mod:`qtorch.planes`), the codes of two rows of K paired by bytes and
#: multiplied by ``vpmaddubsw``
PLANES = MASKED and host_has("avx2")
_MADD_UB = "llvm.x86.avx2.pmadd.ub.sw"
_MADD_WD = "llvm.x86.avx2.pmadd.wd"
#: 32 bytes of two rows paired as ``vpunpcklbw`` / ``vpunpckhbw`` do within each 16-byte half: byte i of row k,
#: then byte i of row k + 1 (one 16-bit lane per column), bytes 0-7 (``_PAIR_LO``) or 8-15 of each half
_PAIR_LO = [h * 16 + i // 2 + (32 if i % 2 else 0) for h in (0, 1) for i in range(16)]
_PAIR_HI = [v + 8 for v in _PAIR_LO]
#: 16-bit lanes of two vectors interleaved as ``vpunpcklwd`` / ``vpunpckhwd`` do within each 128-bit half
_LOW_WORDS = [v for i in (0, 1, 2, 3, 8, 9, 10, 11) for v in (i, i + 16)]
_HIGH_WORDS = [v for i in (4, 5, 6, 7, 12, 13, 14, 15) for v in (i, i + 16)]


def planes_available() -> bool:
    """Whether the one-row kernel's integer variant runs here (:data:`PLANES`: numba compiles for a CPU with AVX2
    and without AVX-512): 4-bit codes of bfloat16 / float16 rows, ``x`` in two 8-bit planes."""
    return PLANES


@intrinsic
def _planes_block(typingctx, wb, t, k0, nunits, units, xq, xm, xs, b, zp, g, n0, gacc, pf, zmode):
    """``gacc[c] += 2^(e_b - P) * sum_k q_k (code[n0 + c, k] - z)`` over the rows ``k0 .. k0 + 2 units nunits`` of
    block ``b`` of ``x``'s planes (``xq`` int8 ``[2, K]``: ``q = 256 h + l``; ``xm[b] = 2^(e_b - P)``, ``xs[b, 0] =
    sum q``), for the ``NT`` columns of tile ``t`` (``gacc`` float32 ``[NT]``). Per 32 bytes of two rows: the
    bytes paired row by row (a column a 16-bit lane), the nibbles masked, ``vpmaddubsw`` by each plane's two values
    (``code_k x_k + code_k+1 x_k+1``, at most ``2 * 15 * 128``: no saturation); ``units`` pairs of rows (4 or 8)
    are summed in 16 bits (at most ``8 * 3840 < 2^15``), then widened by ``vpmaddwd`` as ``l + 256 h`` into
    32-bit sums (exact: ``|q| <= 2^14``, 128 rows a block). ``zmode`` 0: ``z = zp[g, n0 + c]``; 1: 8."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (units, zmode)):
        return None
    U, zm = units.literal_value, zmode.literal_value
    v32, w16, d8, f8 = vec(_I8, 32), vec(_I16, 16), vec(_I32, 8), vec(_F32, 8)

    def codegen(context, builder, sig, args):
        wa, xa, ma, sa, za, ga = (context.make_array(sig.args[i])(context, builder, args[i])
                                  for i in (0, 5, 6, 7, 9, 12))
        tt, kk0, nu, bb, gg, nn0, pfd = (context.cast(builder, args[i], sig.args[i], types.int64)
                                         for i in (1, 2, 3, 8, 10, 11, 13))
        i64 = functools.partial(ir.Constant, _I64)
        ntiles, kk, ww = cgutils.unpack_tuple(builder, wa.shape, 3)
        N = builder.mul(builder.mul(ntiles, ww), i64(2))
        madd_ub = cgutils.get_or_insert_function(builder.module, ir.FunctionType(w16, [v32, v32]), _MADD_UB)
        madd_wd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(d8, [w16, w16]), _MADD_WD)
        wbase = builder.bitcast(builder.gep(wa.data, [builder.mul(builder.add(builder.mul(tt, kk), kk0), ww)]),
                                _I8.as_pointer())
        xbase = builder.bitcast(xa.data, _I8.as_pointer())
        xrows = [builder.gep(xbase, [builder.add(builder.mul(i64(p), kk), kk0)]) for p in (0, 1)]
        nib = ir.Constant(v32, [0x0F] * 32)
        four = ir.Constant(w16, [4] * 16)
        l256 = ir.Constant(w16, [1, 256] * 8)
        zero16, zero32 = ir.Constant(w16, [0] * 16), ir.Constant(d8, [0] * 8)

        def splat(v, ty, n):
            ins = builder.insert_element(ir.Constant(ty, ir.Undefined), v, ir.Constant(_I32, 0))
            return builder.shuffle_vector(ins, ir.Constant(ty, ir.Undefined), ir.Constant(vec(_I32, n), [0] * n))

        qsum = splat(builder.load(builder.gep(sa.data, [builder.mul(bb, i64(2))])), d8, 8)
        mult = splat(builder.load(builder.gep(ma.data, [bb])), f8, 8)
        eight = ir.Constant(d8, [8] * 8)
        do_pf = builder.icmp_signed(">", pfd, i64(0))
        # 32-bit sums of a chunk by (low / high nibbles) x (bytes 0-7 / 8-15 of each 16-byte half) x (the two
        # word interleavings of the flush)
        accs = [[cgutils.alloca_once_value(builder, zero32) for _ in range(2)] for _ in range(4)]
        nch = builder.sdiv(ww, i64(32))
        bsz = builder.mul(nu, i64(2 * U))  # rows of the block
        with cgutils.for_range(builder, nch) as chunks:
            cb = builder.mul(chunks.index, i64(32))
            # the lines pf bytes ahead, one a pair of rows in every pass: pass ch over the block's chunk ch of its
            # bytes (a chunk's 32 bytes a row: as many lines a pass as pairs), so that misses are in flight all along
            pfbase = builder.gep(wbase, [builder.add(pfd, builder.mul(builder.mul(chunks.index, bsz), i64(32)))])
            for pair in accs:
                for a in pair:
                    builder.store(zero32, a)
            with cgutils.for_range(builder, nu) as loop:
                r0 = builder.mul(loop.index, i64(2 * U))
                sums = [[zero16, zero16] for _ in range(4)]  # per code vector: (plane h, plane l), 16-bit
                for j in range(U):
                    r = builder.add(r0, i64(2 * j))
                    at = builder.gep(wbase, [builder.add(builder.mul(r, ww), cb)])
                    with builder.if_then(do_pf, likely=True):
                        prefetch_l2(builder, builder.gep(pfbase, [builder.mul(r, i64(32))]))
                    a = builder.load(builder.bitcast(at, v32.as_pointer()), align=1)
                    c = builder.load(builder.bitcast(builder.gep(at, [ww]), v32.as_pointer()), align=1)
                    ys = [builder.shuffle_vector(a, c, ir.Constant(vec(_I32, 32), m)) for m in (_PAIR_LO, _PAIR_HI)]
                    codes = [builder.and_(y, nib) for y in ys]
                    codes += [builder.and_(builder.bitcast(builder.lshr(builder.bitcast(y, w16), four), v32), nib)
                              for y in ys]
                    xv = []
                    for p in (0, 1):
                        pair = builder.load(builder.bitcast(builder.gep(xrows[p], [r]), _I16.as_pointer()), align=1)
                        xv.append(builder.bitcast(splat(pair, w16, 16), v32))
                    sums = [[builder.add(sums[v][p], builder.call(madd_ub, [codes[v], xv[p]])) for p in (0, 1)]
                            for v in range(4)]
                for v in range(4):  # l + 256 h per column, in 32 bits
                    hs, ls = sums[v]
                    for m, mask in enumerate((_LOW_WORDS, _HIGH_WORDS)):
                        pr = builder.shuffle_vector(ls, hs, ir.Constant(vec(_I32, 16), mask))
                        acc = accs[v][m]
                        builder.store(builder.add(builder.load(acc), builder.call(madd_wd, [pr, l256])), acc)
            # the chunk's block sums: columns back in order, minus z sum q, scaled by 2^(e - P) into gacc. Code
            # vector v: bytes 0-7 (v even) or 8-15 (odd) of each 16-byte half, low nibbles (v < 2) or high (the
            # columns NT/2 on); its sums hold columns 0-3 and 16-19 (first interleaving), 4-7 and 20-23 (second)
            for v in range(4):
                a1, a2 = builder.load(accs[v][0]), builder.load(accs[v][1])
                col = builder.add(builder.add(cb, builder.mul(ww, i64(v // 2))), i64(8 * (v % 2)))
                for half, mask in ((0, [0, 1, 2, 3, 8, 9, 10, 11]), (16, [4, 5, 6, 7, 12, 13, 14, 15])):
                    s = builder.shuffle_vector(a1, a2, ir.Constant(vec(_I32, 8), mask))
                    c8 = builder.add(col, i64(half))
                    if zm == 0:
                        zptr = builder.gep(za.data, [builder.add(builder.mul(gg, N), builder.add(nn0, c8))])
                        z = builder.zext(builder.load(builder.bitcast(zptr, vec(_I8, 8).as_pointer()), align=1), d8)
                    else:
                        z = eight
                    f = builder.fmul(builder.sitofp(builder.sub(s, builder.mul(z, qsum)), f8), mult)
                    gp = builder.bitcast(builder.gep(ga.data, [c8]), f8.as_pointer())
                    builder.store(builder.fadd(builder.load(gp, align=4), f), gp, align=4)
        return context.get_dummy_value()

    return types.void(wb, t, k0, nunits, units, xq, xm, xs, b, zp, g, n0, gacc, pf, zmode), codegen


@njit(inline="always")
def _planes_tile(wb, t, xq, xm, xqs, scale, zp, gsize, bsize, out, pf, gacc, units, zmode):  # pragma: no cover
    T, K, W = wb.shape
    NT = 2 * W
    n0 = t * NT
    out[n0:n0 + NT] = 0
    nbg = gsize // bsize
    nunits = bsize // (2 * units)
    for g in range(scale.shape[0]):
        if pf:
            _prefetch_params(scale, zp, g + PARAMS_AHEAD, n0, NT)
        gacc[:] = 0
        for j in range(nbg):
            b = g * nbg + j
            _planes_block(wb, t, b * bsize, nunits, units, xq, xm, xqs, b, zp, g, n0, gacc, pf, zmode)
        for c in range(NT):
            out[n0 + c] += gacc[c] * scale[g, n0 + c]


@_cached
@njit(cache=True, nogil=True)
def _planes_range(xq, xm, xqs, wb, scale, zp, gsize, bsize, out, pf, gacc, t0, t1):  # pragma: no cover - compiled
    # the integer variant's tiles t0..t1 (4-bit codes; 16 rows summed in 16 bits where a block's pairs allow)
    sym = zp.shape[0] == 0
    eight = (bsize // 2) % 8 == 0
    for t in range(t0, t1):
        if eight:
            if sym:
                _planes_tile(wb, t, xq, xm, xqs, scale, zp, gsize, bsize, out, pf, gacc, 8, 1)
            else:
                _planes_tile(wb, t, xq, xm, xqs, scale, zp, gsize, bsize, out, pf, gacc, 8, 0)
        else:
            if sym:
                _planes_tile(wb, t, xq, xm, xqs, scale, zp, gsize, bsize, out, pf, gacc, 4, 1)
            else:
                _planes_tile(wb, t, xq, xm, xqs, scale, zp, gsize, bsize, out, pf, gacc, 4, 0)


#: the team kernel's operands (its chunks are tiles: the block's total is T); wb's dtype is the kernel's own.
#: ``flags``: fold (bit 0), wide (bit 1), dot (bit 2), x's kind (bits 3-4) and out's (bits 5-6) as in :data:`KINDS`,
#: the prefetch distance in bytes (from bit 7 on). ``scratch``: float32 ``[N]``, the sums of an output that is not
#: float32 (each tile converts its own columns into ``out`` once they are done)
OPERANDS = _omp.Operands("gemv", K=_omp.I64, W=_omp.I64, gsize=_omp.I64, bits=_omp.I64, zp_rows=_omp.I64,
                         flags=_omp.I64, tiles=_omp.I64, x=_omp.ADDR, scratch=_omp.ADDR, wb=_omp.ADDR,
                         scale=_omp.ADDR, zp=_omp.ADDR, out=_omp.ADDR)
_read = OPERANDS.read
#: the element types of ``x`` and ``out`` a call reads and writes, as the kernel numbers them
KINDS = {"float32": 0, "bfloat16": 1, "float16": 2}
TORCH_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_PF_SHIFT = 7


@intrinsic
def _half_bits_to_float(typingctx, h):
    """float32 of the float16 whose bits are the uint16 ``h`` (exact: LLVM's ``fpext``, ``vcvtph2ps``)."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)
    return types.float32(types.uint16), codegen


@intrinsic
def _float_to_half_bits(typingctx, f):
    """The bits of the float16 rounding (to nearest even) of the float32 ``f``, as torch's ``.to(float16)``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)
    return types.uint16(types.float32), codegen


@njit(inline="always")
def _widen_row(o, xf):  # pragma: no cover - compiled; x (its kind from flags) as float32, exactly
    K = o.K
    kind = (o.flags >> 3) & 3
    if kind == 0:
        src = carray(o.x, K, np.float32)
        for k in range(K):
            xf[k] = src[k]
    elif kind == 1:  # bfloat16: the upper half of a float32
        bits = carray(o.x, K, np.uint16)
        xi = xf.view(np.uint32)
        for k in range(K):
            xi[k] = np.uint32(bits[k]) << np.uint32(16)
    else:
        bits = carray(o.x, K, np.uint16)
        for k in range(K):
            xf[k] = _half_bits_to_float(bits[k])


@njit(inline="always")
def _block_sum(xf, k0, n):  # pragma: no cover - compiled; n <= 128 values from k0: 8 lanes, then pairwise
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = np.float32(0)
    n8 = n // 8 * 8
    for k in range(k0, k0 + n8, 8):
        p0 += xf[k]
        p1 += xf[k + 1]
        p2 += xf[k + 2]
        p3 += xf[k + 3]
        p4 += xf[k + 4]
        p5 += xf[k + 5]
        p6 += xf[k + 6]
        p7 += xf[k + 7]
    s = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))
    for k in range(k0 + n8, k0 + n):
        s += xf[k]
    return s


@njit(inline="always")
def _row_sums(xf, gsize, xs):  # pragma: no cover - compiled
    # float32 sums of each group of x: blocks of 128 summed in 8 lanes, the blocks' sums added pairwise (a tree),
    # so the rounding grows with log2 of the group size (as in NumPy's pairwise sum, not always to its bits)
    nb = (gsize + 127) // 128
    sums = np.empty(nb, np.float32)
    for g in range(xs.shape[0]):
        k0 = g * gsize
        for b in range(nb):
            sums[b] = _block_sum(xf, k0 + 128 * b, min(128, gsize - 128 * b))
        m = nb
        while m > 1:
            h = m // 2
            for b in range(h):
                sums[b] = sums[2 * b] + sums[2 * b + 1]
            if m % 2:
                sums[h] = sums[m - 1]
            m = h + m % 2
        xs[g] = sums[0]


@njit(inline="always")
def _prep(o):  # pragma: no cover - compiled; per thread, once per call: x as float32 and its group sums
    xf = np.empty(o.K, np.float32)
    _widen_row(o, xf)
    if PLANES and (o.flags >> 2) & 1:  # the integer variant: x's two planes, and a tile's group sums
        bsize = block_size_of(o.gsize)
        nb = o.K // bsize
        xq, xm, xqs = np.empty((2, o.K), np.int8), np.empty(nb, np.float32), np.empty((nb, 2), np.int32)
        if split_row(xf, bsize, 14, 2, xq, xm, xqs):  # (False for a NaN or an infinity: the float path)
            return xf, xm[:0], xq, xm, xqs, np.empty(2 * o.W, np.float32), True
    xs = np.empty(o.K // o.gsize if o.flags & 1 else 0, np.float32)
    _row_sums(xf, o.gsize, xs)
    return xf, xs, np.empty((0, 0), np.int8), xs[:0], np.empty((0, 2), np.int32), xs[:0], False


@njit(inline="always")
def _narrow(src, dst, kind, n0, n1):  # pragma: no cover - compiled; float32 sums into out's kind
    if kind == 1:  # bfloat16, to nearest even, NaN as torch writes it
        si = src.view(np.uint32)
        for n in range(n0, n1):
            u = si[n]
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                dst[n] = np.uint16(0x7FC0)
            else:
                dst[n] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    else:
        for n in range(n0, n1):
            dst[n] = _float_to_half_bits(src[n])


@njit(inline="always")
def _gemv_chunk(o, i, t0, t1, wdt, y):  # pragma: no cover - compiled; tiles t0..t1 on a thread of torch's team
    T, K, W, G = o.tiles, o.K, o.W, o.K // o.gsize
    NT = W * 2 if o.bits == 4 else W
    zrows = o.zp_rows
    okind = (o.flags >> 5) & 3
    xf, xs, xq, xm, xqs, gacc, planes = y
    sums = carray(o.scratch if okind else o.out, T * NT, np.float32)
    wb = carray(o.wb, (T, K, W), wdt)
    scale = carray(o.scale, (G, T * NT), np.float32)
    zp = carray(o.zp, (zrows, T * NT if zrows else 0), np.uint8)
    dot = (o.flags >> 2) & 1
    if planes:
        _planes_range(xq, xm, xqs, wb, scale, zp, o.gsize, K // xm.shape[0], sums, o.flags >> _PF_SHIFT, gacc, t0, t1)
    else:  # (where the dot flag means the integer variant, a row it cannot hold takes the float path)
        _gemv_range(xf, xs, wb, scale, zp, o.gsize, o.bits, sums, o.flags >> _PF_SHIFT, (o.flags >> 1) & 1,
                    dot and not PLANES, t0, t1)
    if okind:
        _narrow(sums, carray(o.out, T * NT, np.uint16), okind, t0 * NT, t1 * NT)
    return 0


@njit(inline="always")
def _team_body(data, wdt):  # pragma: no cover - compiled
    # a chain of blocks (:class:`Chain`): each thread runs its share of one layer's tiles, then goes on to the next
    # block's without waiting for the others; the team size of the first block is every block's
    team = _omp.chain_team(data)
    while True:
        following = _omp.enter_block(data, team)
        head = carray(data, _omp.HEADER, np.int64)
        if head[0] < head[1]:  # chunks left to claim: this thread's own x (a block of none is the loader's probe)
            y = _prep(_read(head))
        else:
            e = np.empty(0, np.float32)
            y = (e, e, np.empty((0, 0), np.int8), e, np.empty((0, 2), np.int32), e, False)
        _omp.claim_operands(data, _read, _gemv_chunk, wdt, y, True)  # a lane of tiles per thread: one stream each
        if following == 0:
            break
        data = _omp.as_ptr(following)


def _team_gemv_i8(data):  # pragma: no cover - compiled
    _team_body(data, np.int8)


def _team_gemv_u8(data):  # pragma: no cover - compiled
    _team_body(data, np.uint8)


_TEAM_KERNELS = {True: _omp.TeamKernel(_team_gemv_i8), False: _omp.TeamKernel(_team_gemv_u8)}  # by signedness



#: vectors of 16 floats where the CPU numba compiles for has AVX-512 (half the instructions per code), else 8
WIDE = host_has("avx512f")
#: bytes ahead of the row being read that each row prefetches into L2 (0: none). Measured on the AVX-512 Xeon (one
#: thread, CPU time, eight 4096x4096 layers in rotation so that each call reads from memory; 8-bit / 4-bit f32):
#: none 2.05 / 2.60 ms, 2 KB 1.56 / 1.00, 8 KB 1.43 / 0.96, 32 KB 1.41 / 0.93, 128 KB 1.43 / 0.90; into L1
#: instead 1.55-1.75 ms at 8 bits at every distance, non-temporal 2.2-3.2 ms. None on the AVX2 path: unmeasured
#: on such CPUs. The distance where nothing is measured (``QTORCH_AUTOTUNE=0``, :func:`gemv_blocked`'s own calls):
#: the blocked layout's plans take the one measured on the machine (:func:`qtorch.prefetch.distance`).
PREFETCH = 32768 if WIDE else 0


def gemv_blocked(x: np.ndarray, wb: np.ndarray, scale: np.ndarray, zp: np.ndarray, gsize: int, bits: int,
                 out: np.ndarray, fold: bool = False, *, wide: bool | None = None,
                 prefetch: int | None = None) -> np.ndarray:
    """``out[n] = sum_k x[k] * (code[n, k] - zp) * scale`` for one float32 row ``x[K]`` (see the module docstring).

    ``wb`` int8/uint8 ``[T, K, W]`` with ``eligible(bits, W)``, ``scale`` float32 ``[G, T*NT]``, ``zp`` uint8
    ``[G, T*NT]`` or ``[0, 0]``, ``gsize * G == K``, ``out`` float32 ``[T*NT]``, all C-contiguous (checked: a
    ``TypeError`` / ``ValueError`` names the operand). Returns ``out``.

    ``fold=True`` subtracts the zero point once per group instead of from every code: 4-bit codes centred
    (``code - 8`` looked up, ``(z - 8) * sum(x)`` per group: within the exact subtraction's bound, 15-30%
    faster), 8-bit ones as ``z * sum(x)``, whose float32 rounding then scales with the codes (up to 255) instead
    of with ``code - zp``. The forward folds 4-bit codes always and 8-bit ones for bfloat16/float16 inputs, whose
    own rounding is coarser than that.

    ``wide`` (default :data:`WIDE`: the host has AVX-512) reads the codes in vectors of 16 floats instead of 8;
    ``prefetch`` (default :data:`PREFETCH`) bytes ahead. Neither changes a bit of the result.
    """
    T, K, W = wb.shape if getattr(wb, "ndim", 0) == 3 else (0, 0, 0)
    _omp.check_operands(wb, scale, zp, gsize, bits, out, (T * (W * 2 if bits == 4 else W),), x=x, x_shape=(K,))
    if not eligible(bits, W):
        raise ValueError(f"the one-row kernel reads {64 if bits == 8 else 32}-byte chunks of a tile row; "
                         f"{W} bytes per row is not a multiple")
    if prefetch is not None and (isinstance(prefetch, bool) or not isinstance(prefetch, int)
                                 or not 0 <= prefetch <= _MAX_PREFETCH):
        raise ValueError(f"prefetch must be an int of bytes in [0, {_MAX_PREFETCH}], got {prefetch!r}")
    _run(wb, scale, zp, gsize, bits, fold, x.ctypes.data, 0, wb.ctypes.data, scale.ctypes.data, zp.ctypes.data,
         out.ctypes.data, 0, wide, prefetch)
    return out


_MAX_PREFETCH = 1 << 20


def _gemv_tensors(x, wb, scale, zp, gsize: int, bits: int, out, fold: bool, dot: bool = False):
    """:func:`gemv_blocked` on CPU torch tensors that ``layouts.blocked`` built (contiguous, of the layout's
    dtypes and shapes; ``x`` / ``out`` ``[1, K]`` / ``[1, N]`` of float32, bfloat16 or float16, each of its own):
    the forward's entry, where a tensor's address costs less to get than an array's."""
    _run(wb.numpy(), scale.numpy(), zp.numpy(), gsize, bits, fold, x.data_ptr(), TORCH_KINDS[x.dtype],
         wb.data_ptr(), scale.data_ptr(), zp.data_ptr(), out.data_ptr(), TORCH_KINDS[out.dtype], dot=dot)
    return out


def _run(wb, scale, zp, gsize, bits, fold, xa, xkind, wa, sa, za, oa, okind, wide=None, prefetch=None,
         dot=False) -> None:
    # the arrays (kept alive by the plan) and the addresses (for the team kernel's block) of the same operands
    T, K, W = wb.shape
    if T == 0 or K == 0:
        if T:
            _zero_out(oa, okind, T * (W * 2 if bits == 4 else W))
        return
    run_plan(Plan(wb, scale, zp, gsize, bits, wa, sa, za, wide=wide, prefetch=prefetch), xa, xkind, oa, okind, fold,
             dot)


def _zero_out(oa: int, okind: int, n: int) -> None:
    # K = 0: every sum is empty (zero bits are zero in every kind)
    import ctypes

    ctypes.memset(oa, 0, n * (4 if okind == 0 else 2))


class Plan:
    """The part of a one-row call that depends on the layer only: its arrays (kept alive), their addresses in
    the team block, and the block's other fixed fields. The blocked layout builds it once (``layouts.blocked``'s ``plan``),
    which saves about 15 us of a call's Python (a 768x768 layer's kernel takes about 18 us). ``wide`` and
    ``prefetch`` as in :func:`gemv_blocked`."""

    __slots__ = ("wb", "scale", "zp", "gsize", "bits", "T", "K", "N", "G", "fold_ok", "dot_ok", "min_part", "block",
                 "addresses", "kernel", "wide", "prefetch")

    def __init__(self, wb, scale, zp, gsize: int, bits: int, wa: int, sa: int, za: int, *,
                 wide: bool | None = None, prefetch: int | None = None):
        T, K, W = wb.shape
        self.wb, self.scale, self.zp, self.gsize, self.bits = wb, scale, zp, gsize, bits
        self.T, self.K, self.G = T, K, scale.shape[0]
        self.N = T * (W * 2 if bits == 4 else W)
        self.fold_ok = bool(zp.shape[0] or bits == 4)
        self.min_part = max(1, (1 << 21) // max(1, K * W))  # tiles a thread of qcore's takes at least (no team)
        self.wide = WIDE if wide is None else bool(wide)
        self.prefetch = PREFETCH if prefetch is None else int(prefetch)
        self.dot_ok = (_DP and self.wide and bits == 4 and gsize % 2 == 0
                       or PLANES and bits == 4 and W % 16 == 0 and block_size(gsize) > 0)
        flags = (self.prefetch << _PF_SHIFT) | (int(self.wide) << 1)
        block = _omp.new_block(T, T, OPERANDS.pack(K=K, W=W, gsize=gsize, bits=bits, zp_rows=zp.shape[0],
                                                   flags=flags, tiles=T, x=0, scratch=0, wb=wa, scale=sa, zp=za,
                                                   out=0))
        self.block = np.append(block, np.int64(0))  # after the trailer: the next block's address in a Chain, or 0
        self.addresses = (wa, sa, za)
        self.kernel = _TEAM_KERNELS[wb.dtype == np.int8]


_FLAGS, _X, _SCRATCH, _OUT = (OPERANDS.slot(f) for f in ("flags", "x", "scratch", "out"))
_SUMS = threading.local()  # each calling thread's float32 sums of a call whose output is not float32


def _sums_address(n: int) -> int:
    buf = getattr(_SUMS, "buf", None)
    if buf is None or buf.size < n:
        buf = _SUMS.buf = np.empty(max(n, 1024), np.float32)
        _SUMS.addr = buf.ctypes.data
    return _SUMS.addr


def run_plan(p: Plan, xa: int, xkind: int, oa: int, okind: int, fold: bool, dot: bool = False) -> None:
    """``out = x @ W.T`` for the layer of ``p``: ``x`` ``[K]`` at address ``xa`` and ``out`` ``[N]`` at ``oa``, of
    the :data:`KINDS` ``xkind`` / ``okind`` (float32, bfloat16 or float16: each thread widens ``x`` to float32 for
    itself, and each tile rounds its own float32 sums into ``out``, to nearest even, as ``.to()`` does); ``fold``
    as in :func:`gemv_blocked`. ``dot``: the 4-bit codes go by dot products where the layer allows, else by the
    float path: on CPUs with AVX512-BF16 ``x`` holds bfloat16 values (:func:`dot_available`: 16-float vectors,
    groups of even size); on CPUs with AVX2 and without AVX-512 ``x`` is bfloat16 or float16 (``xkind`` 1 or 2),
    split into two 8-bit planes (:func:`planes_available`: 16-byte tile rows, groups with a
    :func:`qtorch.planes.block_size`; a row holding a NaN or an infinity takes the float path).
    The caller keeps ``x`` and ``out`` alive."""
    block = p.block.copy()  # per call: a module may run on several threads at once
    block[_FLAGS] |= _call_flags(p, xkind, okind, fold, dot)
    block[_X], block[_OUT] = xa, oa
    if okind:
        block[_SCRATCH] = _sums_address(p.N)
    team = p.kernel
    _omp.run(p.T, team, block, _omp.on_caller, (team, block), p.T, p.min_part, nchunks=p.T)


def _call_flags(p: Plan, xkind: int, okind: int, fold: bool, dot: bool) -> int:
    fold = bool(fold) and p.fold_ok
    # the integer variant takes 16-bit rows (two planes); the bfloat16 dot products a row of bfloat16 values, in
    # bfloat16 or float32, never a float16 one
    dot = bool(dot) and fold and p.dot_ok and (xkind in (1, 2) if PLANES else xkind != 2)
    return fold | dot << 2 | xkind << 3 | okind << 5


#: one-row launches go as one native call where they can (:mod:`qtorch._launch`); ``QTORCH_NATIVE_LAUNCH=0`` keeps
#: them in Python (the same numbers either way)
NATIVE_LAUNCH = os.environ.get("QTORCH_NATIVE_LAUNCH", "1").strip() != "0"


def _native(team_kernel, units: int, layers, slots: tuple = (_X, _OUT, _SCRATCH)):
    """The native launch of these layers' blocks (:class:`qtorch._launch.Native`), or None where their launch never
    goes natively: one work unit (the caller runs it alone), more layers than one native call chains, no OpenMP
    team of torch's, or :data:`NATIVE_LAUNCH` off. ``slots``: where a block holds the row's, the output's and the
    sums' addresses (this module's blocks by default; :mod:`qtorch.vnni` passes its own)."""
    if not NATIVE_LAUNCH or units < 2 or len(layers) > _launch.MAX_LAYERS or not _omp.available():
        return None
    native = _launch.Native(team_kernel(), layers, slots)
    return native if native.available() else None


_UNUSED_OUTS = ((), (0, 0), (0,), ())  # a native chain of 1, 2 or 3 layers: the output addresses it does not read


class Launcher:
    """:func:`run_plan` with every argument but the addresses fixed: ``launcher(xa, oa)``. What the blocked
    layout's decoder calls once per decoding step of each layer, so it does the least Python a call allows: the
    block's flags are set once, and blocks are reused (refilled from a template) with their addresses known.
    Why: inside a model each call's Python runs on caches the previous layer's weights just streamed through,
    where every step costs several times its hot time; SmolLM2 w4a16-g64 decoding on ``blocked``, each step right
    after a dense one on the AVX-512 Xeon, 29.2 against 28.0 ms a step with this launch (against :func:`run_plan`:
    a copied block, its address read through ``.ctypes``, 0.9 us hot alone, the flags computed per call).

    >>> import numpy as np
    >>> wb, scale = np.ones((1, 128, 64), np.int8), np.full((1, 64), 0.5, np.float32)
    >>> zp, x, out = np.zeros((0, 0), np.uint8), np.ones(128, np.float32), np.empty(64, np.float32)
    >>> p = Plan(wb, scale, zp, 128, 8, wb.ctypes.data, scale.ctypes.data, zp.ctypes.data)
    >>> Launcher(p, 0, 0, False)(x.ctypes.data, out.ctypes.data); out[:2].tolist()
    [64.0, 64.0]
    """

    __slots__ = ("plan", "template", "free", "scratch", "native")

    def __init__(self, plan: Plan, xkind: int, okind: int, fold: bool, dot: bool = False):
        self.plan = plan
        self.template = plan.block.copy()
        self.template[_FLAGS] |= _call_flags(plan, xkind, okind, fold, dot)
        self.scratch = bool(okind)
        self.free = []  # (block, its address): blocks of calls that are over; a call on another thread takes its own
        self.native = _native(plan.kernel, plan.T, [(self.template, plan.N if okind else 0)])

    def __call__(self, xa: int, oa: int) -> None:
        native = self.native
        if native is not None and native.run(xa, oa, 0, 0):  # the plain case as one native call (qtorch._launch)
            return
        p = self.plan
        block, address = _omp.take_block(self.template, self.free)
        block[_X] = xa
        block[_OUT] = oa
        if self.scratch:
            block[_SCRATCH] = _sums_address(p.N)
        team = p.kernel
        _omp.run(p.T, team, block, _omp.on_caller, (team, block), p.T, p.min_part, p.T, address)
        _omp.give_block(self.free, block, address)


class Chain:
    """Several layers' :class:`Launcher` calls on one input row, as one start of the thread team: their blocks are
    linked (each block's last slot holds the next one's address), so that each thread goes on to the next layer's
    tiles as soon as it finds none left in this one, and the team meets once, after the last. What a decoding step
    runs for the layers that read the same row (attention's query, key and value; an MLP's gate and up): each
    launch of its own starts the team and waits for its slowest thread. ``chain(xa, oas)``: ``x`` at ``xa`` (every
    layer's ``K`` values) and layer ``i``'s output at ``oas[i]``; the same bits as each launcher's own call.

    The layers share the team kernel (all codes signed, or all unsigned); each thread widens ``x`` once per layer.

    >>> import numpy as np
    >>> wb, scale = np.ones((1, 128, 64), np.int8), np.full((1, 64), 0.5, np.float32)
    >>> zp, x = np.zeros((0, 0), np.uint8), np.ones(128, np.float32)
    >>> p = Plan(wb, scale, zp, 128, 8, wb.ctypes.data, scale.ctypes.data, zp.ctypes.data)
    >>> out = np.empty((2, 64), np.float32)
    >>> Chain([Launcher(p, 0, 0, False)] * 2)(x.ctypes.data, (out[0].ctypes.data, out[1].ctypes.data))
    >>> out[:, :2].tolist()
    [[64.0, 64.0], [64.0, 64.0]]
    """

    __slots__ = ("launchers", "kernel", "units", "sums", "native")

    def __init__(self, launchers):
        launchers = tuple(launchers)
        if not launchers or not all(isinstance(la, Launcher) for la in launchers):
            raise TypeError("a Chain takes one or more Launchers")
        if len({la.plan.kernel for la in launchers}) != 1:
            raise ValueError("a Chain's layers share one team kernel: their codes all signed or all unsigned")
        self.launchers = launchers
        self.kernel = launchers[0].plan.kernel
        self.units = sum(la.plan.T for la in launchers)
        self.sums = sum(la.plan.N for la in launchers if la.scratch)  # float32 sums of the outputs not float32
        self.native = _native(self.kernel, self.units, [(la.template, la.plan.N if la.scratch else 0)
                                                        for la in launchers])

    def __call__(self, xa: int, oas) -> None:
        native = self.native
        if native is not None and native.run(xa, *oas, *_UNUSED_OUTS[len(oas)]):  # one native call (qtorch._launch)
            return
        taken = [_omp.take_block(la.template, la.free) for la in self.launchers]  # (a launcher twice: two blocks)
        sums = _sums_address(self.sums) if self.sums else 0
        for i, (la, (block, _)) in enumerate(zip(self.launchers, taken)):
            block[_X] = xa
            block[_OUT] = oas[i]
            if la.scratch:  # each layer its own stretch of the thread's sums: threads work on two layers at once
                block[_SCRATCH] = sums
                sums += 4 * la.plan.N
            block[-1] = taken[i + 1][1] if i + 1 < len(taken) else 0
        first, address = taken[0]
        p = self.launchers[0].plan
        team = self.kernel
        _omp.run(self.units, team, first, _omp.on_caller, (team, first), p.T, p.min_part, p.T, address)
        for la, (block, address) in zip(self.launchers, taken):
            _omp.give_block(la.free, block, address)
