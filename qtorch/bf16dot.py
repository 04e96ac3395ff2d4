"""Forward of the 8- and 4-bit blocked layouts by AVX512-BF16 dot products (``vdpbf16ps``): bfloat16 and float16
rows on CPUs that have AVX512-BF16 but no AMX (AMD Zen 4 and later; Intel Cooper Lake).

A leaf of :mod:`qtorch.layouts.blocked`, and the sibling of :mod:`qtorch.amx`, whose panels and row split it shares:
for the strips of 16 output channels of a work unit and a block of K (``KB`` rows), ``code - zp`` is converted once
into bfloat16 panels in VNNI order, ``B[kp][2n + j] = code[2kp + j][n] - zp`` (exact: integers of at most 9 bits),
and one pair of K rows of a strip is then exactly one 512-bit operand of ``vdpbf16ps``. For every 4 rows of ``x``
(2 or 1 at the end) and the unit's 4 strips, 16 float32 accumulators stay in registers over a group: each pair of
K rows costs 4 panel loads, 4 broadcasts of a row's two bfloat16 values and 16 ``vdpbf16ps``. Every code is
converted once per call and serves all rows, where a float32 kernel converts it per block of rows and needs two FMAs
for what one ``vdpbf16ps`` does. Where a block's calls have about one pair of K rows for each pair of the next
block's 8-bit panels (13-20 rows at 128 rows of K a block; fewer before a short last block), the next block is
converted in between the products, one pair of a strip after each pair's 16 ``vdpbf16ps``, into a second buffer: the
conversion's instructions then run beside the dot products instead of before them. Each group's sums are scaled once
into a float32 accumulator of the work unit; bfloat16 calls of 32+ rows on layers with several groups convert the
dequantized weight instead and sum all of K (:func:`qtorch.amx.dequantizes`), as F.linear on the dequantized
bfloat16 weight does. float16 rows are split exactly into two bfloat16 parts (:func:`qtorch.amx.split_rows`),
accumulated into the same registers. Like AMX, ``vdpbf16ps`` reads bfloat16 subnormals as zero.

Eligible where :func:`qtorch.amx.eligible` is (K and the group size multiples of 32) and :func:`available`.

>>> import numpy as np, torch
>>> wb = torch.ones((1, 32, 16), dtype=torch.int8)          # one tile: K = 32, 16 output channels, codes 1
>>> x = torch.stack([torch.ones(32), torch.arange(32.0)]).to(torch.bfloat16)
>>> if available():
...     out = bf16dot_linear(x, wb, torch.full((1, 16), 0.5), torch.zeros((0, 0), dtype=torch.uint8), 32, 8, 16)
... else:
...     out = torch.tensor([[16.0] * 16, [248.0] * 16])
>>> out[:, :2].tolist()
[[16.0, 16.0], [248.0, 248.0]]
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _omp
from ._ir import BF16, F32, I8, I32, I64, host_has, prefetch_at, vec
from .amx import _Prepared as _AmxPrepared
from .amx import _chunks, _emit_pair, _pairs_of, _steps, _store_unit, _unit_shape, _units, eligible
from .amx import runner as _amx_runner
from ._ir import cached as _cached

__all__ = ["available", "eligible", "bf16dot_linear"]

#: rows of K per block: the panels of a unit's 4 strips (4 x 16 channels x 128 rows of bfloat16 = 16 KB) and 16
#: rows of x (4 KB) stay in L1 (32 KB on Zen 4) while every block of rows passes over them; where the next block's
#: 8-bit panels are written meanwhile (a second 16 KB buffer), the two blocks' panels and x exceed L1 a little
KB = 128
#: rows per register block: 4 strips x 4 rows = 16 float32 accumulators of the 32 registers, which leaves room for
#: the next block's conversion between the products (:func:`_emit_next`); each broadcast of x serves four strips
#: and each panel load four rows (0.5 loads per vdpbf16ps). Measured on a 2-core Zen 4, K = N = 4096 bfloat16: 6
#: rows (24 accumulators) took the same time as 4 at 16 and 128 rows (1.78-1.82 and 10.5-10.6 ms), 2 strips x 12
#: rows 13.2-14.1 ms at 128 rows
MR = 4
_LOCK = threading.Lock()
_AVAILABLE = None


def available() -> bool:
    """Whether numba compiles for a CPU with AVX512-BF16 (``vdpbf16ps``, ``vcvtne2ps2bf16``) and AVX512-BW (the
    4-bit panels' ``vpermw`` lookup)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        with _LOCK:
            if _AVAILABLE is None:
                _AVAILABLE = host_has("avx512bf16") and host_has("avx512bw")
    return _AVAILABLE


def _emit_next(builder, mode, signed, wdata, bdata, zdata, coldata, cidx, cc1, shift, cbase, nboff, width, zbase):
    """IR: one conversion of the next block's 8-bit panels (``mode`` 8 or 9, :func:`qtorch.amx._emit_pair`), the
    ``cidx``-th (an i64 slot that counts them): pair ``pk`` of strip ``i`` (of ``2^shift``) is conversion
    ``pk 2^shift + i``, its codes from ``cbase`` (the block's first row of the tile), its panel at ``nboff`` in
    ``bdata``, its zero points (the block lies in one group) at ``zdata[zbase + column]``. Branch-free: past ``cc1``
    the last one is converted again (the same values to the same place); a branch let LLVM sink the products below
    it, their operands spilled to the stack."""
    c64 = functools.partial(ir.Constant, I64)
    ci = builder.load(cidx)
    ce = builder.select(builder.icmp_signed("<", ci, cc1), ci, builder.sub(cc1, c64(1)))
    strip = builder.and_(ce, builder.sub(builder.shl(c64(1), shift), c64(1)))
    pk = builder.ashr(ce, shift)
    col = builder.load(builder.gep(coldata, [strip]))
    src = builder.gep(wdata, [builder.add(builder.add(cbase, col), builder.mul(builder.mul(pk, c64(2)), width))])
    dst = builder.gep(bdata, [builder.add(builder.add(nboff, builder.mul(strip, c64(KB * 16))),
                                          builder.mul(pk, c64(32)))])
    zlo = zhi = None
    if mode == 9:  # the zero points of the block's group
        zp = builder.gep(zdata, [builder.add(zbase, col)])
        z = builder.load(builder.bitcast(zp, vec(I8, 16).as_pointer()), align=1)
        zlo, zhi = _pairs_of(builder, z, 0, 8, I32), _pairs_of(builder, z, 8, 8, I32)
    _emit_pair(builder, src, builder.gep(src, [width]), dst, None, mode, signed, zlo, zhi)
    builder.store(builder.add(ci, c64(1)), cidx)


@intrinsic
def _dp_rows(typingctx, xf, buf, cf, af, sf, cols, q, wb, zf, cq, parts, ns, mr, conv):
    """``mr`` rows x ``ns`` strips of 16 channels (literals) over ``nk`` rows of K (a multiple of 32), in runs of
    ``gl`` rows (one group, or ``nk``), each run's float32 sums in ``mr * ns`` registers.

    ``q``: int64 ``(m0, rbs, arow, astep, pstride, kbase, nk, gl, boff, bstride, coff, ldc, first, last, soff, sld,
    c0, deq)``. A: bfloat16 bits (int16) of part ``p``, row ``m``, column ``k`` of the block at ``xf[p pstride +
    (m // 16) rbs + (m % 16) arow + kbase + (k // 32) astep + k % 32]`` for rows ``m0 .. m0 + mr``; B: strip ``s``'s
    panel at ``buf[boff + s bstride]``, 32 elements per pair of K rows. A run starts from zero where ``first``, else
    from the partial sums ``cf[coff + r ldc + 16 s]``; where ``last`` (the run ends its group, the ``j``-th run)
    its sums go into the unit's totals ``af`` (same offsets): ``+= C * scale`` with strip ``s``'s 16 scales at
    ``sf[soff + cols[c0 + s] + j sld]``, or ``+= C`` where ``deq`` (dequantized panels); else they are stored to
    ``cf``. ``conv`` (literal): 0, or the mode (8, 9) of the next block's panels, one of which is converted after
    each pair of K rows (:func:`_emit_next`; ``cq``: ``(cbase, first, end, shift, nboff, W, zbase)``, ``wb`` and
    ``zf`` the flat codes and zero points)."""
    if not all(isinstance(v, types.IntegerLiteral) for v in (parts, ns, mr, conv)):
        return None
    if not (isinstance(q, types.UniTuple) and q.count == 18 and q.dtype == types.int64):
        return None
    if not (isinstance(cq, types.UniTuple) and cq.count == 7 and cq.dtype == types.int64):
        return None
    nparts, nstrips, nrows = parts.literal_value, ns.literal_value, mr.literal_value
    signed = wb.dtype == types.int8
    cmode = conv.literal_value  # 0: no conversion, else the next block's panels' mode (8 or 9, :func:`_emit_next`)

    def codegen(context, builder, sig, args):
        xa, ba, ca, aa, sa, cola = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(6))
        (m0, rbs, arow, astep, pstride, kbase, nk, gl, boff, bstride, coff, ldc, first, last, soff, sld, c0,
         deq) = cgutils.unpack_tuple(builder, args[6], 18)
        wa, za = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (7, 8))
        v16f, v16i, vbf = vec(F32, 16), vec(I32, 16), vec(BF16, 32)
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, vbf, vbf]),
                                            "llvm.x86.avx512bf16.dpbf16ps.512")
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v16f, v16f]),
                                             "llvm.fma.v16f32")
        zero = ir.Constant(v16f, [0.0] * 16)

        def c64(v):
            return ir.Constant(I64, v)

        cbase, cc0, cc1, shift, nboff, width, zbase = cgutils.unpack_tuple(builder, args[9], 7)
        cidx = cgutils.alloca_once_value(builder, cc0)

        def fptr(arr, off):
            return builder.bitcast(builder.gep(arr, [off]), v16f.as_pointer())

        def cell(r, s):  # offset of row r, strip s in cf / af
            return builder.add(builder.add(coff, builder.mul(c64(r), ldc)), c64(16 * s))

        is_first = builder.icmp_signed("!=", first, c64(0))
        keys = [(r, s) for r in range(nrows) for s in range(nstrips)]
        accs = {key: cgutils.alloca_once_value(builder, zero) for key in keys}  # -> registers (mem2reg)
        rows = []  # the A rows' first elements (part p, row r) at the block's first column
        for p in range(nparts):
            rows.append([])
            for r in range(nrows):
                m = builder.add(m0, c64(r))
                off = builder.add(builder.mul(builder.sdiv(m, c64(16)), rbs), builder.mul(builder.srem(m, c64(16)),
                                                                                         arow))
                off = builder.add(off, builder.add(kbase, builder.mul(c64(p), pstride)))
                rows[p].append(builder.gep(xa.data, [off]))
        with cgutils.for_range(builder, builder.sdiv(nk, gl)) as runs:
            j = runs.index
            for r, s in keys:
                prev = builder.load(fptr(ca.data, cell(r, s)), align=4)
                builder.store(builder.select(is_first, zero, prev), accs[(r, s)])
            s0 = builder.sdiv(builder.mul(j, gl), c64(32))
            with cgutils.for_range(builder, builder.sdiv(gl, c64(32))) as steps:
                st = builder.add(s0, steps.index)
                bsteps = [builder.gep(ba.data, [builder.add(builder.add(boff, builder.mul(c64(s), bstride)),
                                                            builder.mul(st, c64(512)))]) for s in range(nstrips)]
                aoffs = builder.mul(st, astep)
                cur = {key: builder.load(a) for key, a in accs.items()}
                for pair in range(16):
                    bs = [builder.load(builder.bitcast(builder.gep(bp, [c64(32 * pair)]), vbf.as_pointer()), align=2)
                          for bp in bsteps]
                    for p in range(nparts):
                        for r in range(nrows):
                            ap = builder.gep(rows[p][r], [builder.add(aoffs, c64(2 * pair))])
                            xv = builder.load(builder.bitcast(ap, I32.as_pointer()), align=2)
                            splat = builder.shuffle_vector(
                                builder.insert_element(ir.Constant(v16i, ir.Undefined), xv, ir.Constant(I32, 0)),
                                ir.Constant(v16i, ir.Undefined), ir.Constant(v16i, [0] * 16))
                            a = builder.bitcast(splat, vbf)
                            for s in range(nstrips):
                                cur[(r, s)] = builder.call(dp, [cur[(r, s)], a, bs[s]])
                    if cmode:
                        _emit_next(builder, cmode, signed, wa.data, ba.data, za.data, cola.data, cidx, cc1, shift,
                                   cbase, nboff, width, zbase)
                for key, a in accs.items():
                    builder.store(cur[key], a)
            with builder.if_else(builder.icmp_signed("!=", last, c64(0))) as (then, otherwise):
                with then:
                    unscaled = builder.icmp_signed("!=", deq, c64(0))
                    for s in range(nstrips):
                        col = builder.load(builder.gep(cola.data, [builder.add(c0, c64(s))]))
                        sc = builder.load(fptr(sa.data, builder.add(builder.add(soff, col), builder.mul(j, sld))),
                                          align=4)
                        sc = builder.select(unscaled, ir.Constant(v16f, [1.0] * 16), sc)
                        for r in range(nrows):
                            ptr = fptr(aa.data, cell(r, s))
                            builder.store(builder.call(fma, [builder.load(accs[(r, s)]), sc,
                                                             builder.load(ptr, align=4)]), ptr, align=4)
                with otherwise:
                    for r, s in keys:
                        builder.store(builder.load(accs[(r, s)]), fptr(ca.data, cell(r, s)), align=4)
        return context.get_dummy_value()

    return types.void(xf, buf, cf, af, sf, cols, q, wb, zf, cq, parts, ns, mr, conv), codegen


@njit(inline="always")
def _prefetch_params(sf, zf, cols, S, N, zstride, col0, g0, g1):  # pragma: no cover - compiled
    # the scale and zero-point lines of groups g0..g1 for a unit's strips: rows of [G, N] lie N elements apart, so
    # no hardware prefetcher follows them, and a block that met them cold waited on memory for each
    for g in range(g0, g1):
        for i in range(S):
            prefetch_at(sf, g * N + col0 + cols[i])
            if zstride:
                prefetch_at(zf, g * zstride + col0 + cols[i])


@njit(inline="always")
def _rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, parts, ns, mr, conv):  # pragma: no cover - compiled
    # literal dispatch: parts x strips x rows of this block (conv: 4 strips of one part, converting as they go)
    if conv == 8:
        if mr == MR:
            _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 4, MR, 8)
        elif mr == 2:
            _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 4, 2, 8)
        else:
            _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 4, 1, 8)
    elif conv == 9:
        if mr == MR:
            _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 4, MR, 9)
        elif mr == 2:
            _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 4, 2, 9)
        else:
            _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 4, 1, 9)
    elif parts == 1:
        if ns == 4:
            if mr == MR:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 4, MR, 0)
            elif mr == 2:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 4, 2, 0)
            else:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 4, 1, 0)
        elif ns == 2:
            if mr == MR:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 2, MR, 0)
            elif mr == 2:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 2, 2, 0)
            else:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 2, 1, 0)
        else:
            if mr == MR:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 1, MR, 0)
            elif mr == 2:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 1, 2, 0)
            else:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 1, 1, 1, 0)
    else:
        if ns == 4:
            if mr == MR:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 2, 4, MR, 0)
            elif mr == 2:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 2, 4, 2, 0)
            else:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 2, 4, 1, 0)
        elif ns == 2:
            if mr == MR:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 2, 2, MR, 0)
            elif mr == 2:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 2, 2, 2, 0)
            else:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 2, 2, 1, 0)
        else:
            if mr == MR:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 2, 1, MR, 0)
            elif mr == 2:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 2, 1, 2, 0)
            else:
                _dp_rows(xf, buf, cf, af, sf, cols, q, wb, zf, cq, 2, 1, 1, 0)


@njit(inline="always")
def _block_len(k, K, gacc, whole):  # pragma: no cover - compiled
    # rows of K of the block from k: whole groups up to KB rows, else up to KB rows within one group
    if whole:
        return min((KB // gacc) * gacc, K - k)
    return min(KB, (k // gacc + 1) * gacc - k)


@njit(inline="always")
def _block_rows(rem, m0, Mp):  # pragma: no cover - compiled
    # rows of the next register block: MR (4), 2 or 1, rounding a tail of 3 up into the zero rows of the padding
    if rem >= MR or (rem == 3 and m0 + MR <= Mp):
        return MR
    return 2 if rem >= 2 else 1


@_cached
@njit(cache=True, nogil=True)
def _dp_units(xp, parts, M, wb, scale, zp, gsize, bits, deq, out, outb, okind, bias, u0,
              u1):  # pragma: no cover - compiled
    # work unit u: the S strips of 16 output channels whose codes lie in one byte range of a tile row, all rows
    # (as qtorch.amx's units). xp: [P, Mp / 16, 16 K] bfloat16 bits in A-tile order: 16 rows x 32 columns
    # contiguous (x's own rows, 2 K bytes apart, thrashed one L1 set). The float32 sums plus the bias (float32
    # [N], or empty) go to outb as bfloat16 / float16 bits (okind 1 / 2, rounded as torch rounds), out untouched,
    # or to out as float32 (okind 0)
    _, blocks, rbs = xp.shape
    Mp = blocks * 16
    T, K, W = wb.shape
    NT = W * 2 if bits == 4 else W
    N = T * NT
    nb, S = _unit_shape(W, bits)
    per_tile = W // nb
    cw = 16 * S
    cb = np.empty((Mp, cw), np.float32)  # partial sums of a group that spans blocks
    acc = np.zeros((Mp, cw), np.float32)  # the unit's output: sums of the groups' scaled sums
    bstride = KB * 16  # int16 elements of one strip's panel
    cols = np.empty(S, np.int64)
    xf = xp.reshape(-1)
    cf = cb.reshape(-1)
    af = acc.reshape(-1)
    sf = scale.reshape(-1)
    zf = zp.reshape(-1)
    G = K // gsize
    zstride = N if zp.shape[0] > 1 else 0
    cmode = (9 if zp.shape[0] else 8) if bits == 8 else (2 if W == 8 else 3)
    pstride = blocks * rbs
    gacc = K if deq else gsize
    whole = gacc <= KB
    arow, astep = np.int64(32), np.int64(512)  # the next row in a 16 x 32 block; the next block of 32 columns
    # the next block's lines of codes are prefetched a few before each register block's products (a burst of all of
    # them at once overflowed the core's queue of misses: most came late, from memory, at the next conversion)
    nrb = 0
    m0 = 0
    while m0 < M:
        m0 += _block_rows(M - m0, m0, Mp)
        nrb += 1
    calls = ((S + 3) // 4) * nrb
    rs = max(1, 64 // W)  # rows of a tile per 64-byte line
    wf = wb.reshape(-1)
    sb = S * bstride
    # 8-bit panels of the next block are converted during this block's products, one pair of K rows of a strip
    # with each pair's products (16 vdpbf16ps), where the calls of a block have about as many pairs as there are
    # to convert (13-20 rows when the next block is a whole one): hot, 4096 x 4096, 16 rows: 1.78-1.86 -> 1.52-1.65
    # ms. Not at 4 bits: a table lookup converts those, and interleaving it measured 10-20% slower than converting
    # the block before its products
    ovl = cmode if (cmode == 8 or cmode == 9) and deq == 0 and parts == 1 and S == 4 else 0
    # one block's panels, or two where the next one is converted while this one multiplies
    buf = np.empty(2 * sb if ovl else sb, np.int16)
    for u in range(u0, u1):
        t = u // per_tile
        b0 = (u % per_tile) * nb
        for i in range(S):
            if bits == 8 or W == 8 or i < S // 2:
                cols[i] = b0 + 16 * i
            else:
                cols[i] = W + b0 + 16 * (i - S // 2)
        acc[:] = 0
        k = 0
        cur = 0
        ready = False
        while k < K:
            g0 = k // gacc
            nk = _block_len(k, K, gacc, whole)
            if whole:
                gl = gacc
                first = 1
                last = 1
            else:
                gl = nk
                first = 1 if k == g0 * gacc else 0
                last = 1 if k + nk == (g0 + 1) * gacc else 0
            if not ready:
                bcur = buf[cur:]
                for a in range(nk // 32):  # the block's panels, every strip (32 rows of K lie in one group)
                    ga = (k + 32 * a) // gsize
                    _steps(wb, bcur, cols, zf, sf, (t * K + k) * W, ga * zstride + t * NT, ga * N + t * NT, S,
                           bstride, 32 * a, 16, 0, cmode, deq)
            kn = k + nk
            nkn = 0
            if kn < K:  # the next block's scales and zero points arrive while this one multiplies
                _prefetch_params(sf, zf, cols, S, N, zstride, t * NT, kn // gsize, min(G, (kn + KB - 1) // gsize + 1))
                nkn = _block_len(kn, K, gacc, whole)
            total = S * (nkn // 2)  # the next block's conversions, shared out among this block's calls
            per = (total + calls - 1) // calls
            have = nk // 2  # a call's pairs of K rows: at most a quarter of its conversions are repeats
            overlap = (ovl > 0 and nkn > 0 and 3 * have <= 4 * per <= 4 * have  # asymmetric: one group, one row
                       and (ovl == 8 or kn // gsize == (kn + nkn - 1) // gsize))  # of zero points
            nxt = sb - cur
            # the lines prefetched during this block: the next block's, or the one after it where the next one is
            # read (converted) during this one; past the unit's last block, the next unit's first
            kp = kn + nkn if overlap else kn
            prow = 0
            pbase = 0
            if kp < K:
                pbase = (t * K + kp) * W + b0
                prow = min(KB, K - kp)
            elif u + 1 < u1:
                pbase = ((u + 1) // per_tile) * K * W + ((u + 1) % per_tile) * nb
                prow = min(KB, K)
            nlines = (prow + rs - 1) // rs
            per_call = (nlines + calls - 1) // calls
            li = 0
            ci = 0
            for s in range(0, S, 4):
                ns = min(4, S - s)
                m0 = 0
                while m0 < M:
                    for _ in range(per_call):
                        if li < nlines:
                            prefetch_at(wf, pbase + li * rs * W)
                            li += 1
                    mr = _block_rows(M - m0, m0, Mp)
                    q = (m0, rbs, arow, astep, pstride, (k // 32) * astep, nk, gl, cur + s * bstride, bstride,
                         m0 * cw + 16 * s, cw, first, last, g0 * N + t * NT, N, s, deq)
                    c0 = min(total, ci * per) if overlap else 0
                    c1 = min(total, c0 + per) if overlap else 0
                    cq = ((t * K + kn) * W, c0, c1, np.int64(2), nxt, W, (kn // gsize) * zstride + t * NT)
                    _rows(xf, buf, cf, af, sf, cols, q, wf, zf, cq, parts, ns, mr, ovl if c1 > c0 else 0)
                    m0 += mr
                    ci += 1
            ready = overlap
            if overlap:
                cur = nxt
            k += nk
        _store_unit(acc, cw, S, cols, t * NT, M, N, out, outb, okind, bias)


#: the team kernel's operands (its chunks are the work units); ``flags``: bits | deq << 9 | the output's kind << 10
#: (:data:`qtorch.gemv.TORCH_KINDS`: 0 float32, 1 bfloat16, 2 float16) | a bias << 12 | zero point rows << 16;
#: ``bias``: float32 ``[N]`` where there is one
OPERANDS = _omp.Operands("bf16dot", parts=_omp.I64, M=_omp.I64, T=_omp.I64, K=_omp.I64, W=_omp.I64,
                         gsize=_omp.I64, flags=_omp.I64, bias=_omp.ADDR, x=_omp.ADDR, wb=_omp.ADDR,
                         scale=_omp.ADDR, zp=_omp.ADDR, out=_omp.ADDR)
_read = OPERANDS.read


@njit(inline="always")
def _dp_chunk(o, i, u0, u1, wdt, _y):  # pragma: no cover - compiled; units u0..u1 on a thread of torch's team
    M, T, K, W, G, bits = o.M, o.T, o.K, o.W, o.K // o.gsize, o.flags & 255
    NT = W * 2 if bits == 4 else W
    Mp = (M + 15) // 16 * 16
    zrows, okind = o.flags >> 16, (o.flags >> 10) & 3
    _dp_units(carray(o.x, (o.parts, Mp // 16, 16 * K), np.int16), o.parts, M, carray(o.wb, (T, K, W), wdt),
              carray(o.scale, (G, T * NT), np.float32), carray(o.zp, (zrows, T * NT if zrows else 0), np.uint8),
              o.gsize, bits, (o.flags >> 9) & 1, carray(o.out, (M, T * NT) if okind == 0 else (0, 0), np.float32),
              carray(o.out, (M, T * NT) if okind else (0, 0), np.uint16), okind,
              carray(o.bias, T * NT if (o.flags >> 12) & 1 else 0, np.float32), u0, u1)
    return 0


def _team_dp_i8(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _dp_chunk, np.int8, 0)


def _team_dp_u8(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _dp_chunk, np.uint8, 0)


_TEAM_KERNELS = {True: _omp.TeamKernel(_team_dp_i8), False: _omp.TeamKernel(_team_dp_u8)}  # by signedness



def _run(xaddr: int, parts: int, M: int, wb: int, signed: bool, T: int, K: int, W: int, scale: int, zp: int,
         zp_rows: int, gsize: int, bits: int, out: int, deq: int = 0, okind: int = 0, bias: int = 0) -> None:
    """One kernel call on addresses (as :func:`qtorch.amx._run`); the caller holds every operand. ``okind``: the
    output's kind at ``out`` (:data:`qtorch.gemv.TORCH_KINDS`); ``bias``: float32 ``[N]``, or 0 for none."""
    units = _units(T, W, bits)
    nchunks = _chunks(T, units, _omp.team_size())
    flags = bits | deq << 9 | okind << 10 | (1 if bias else 0) << 12 | zp_rows << 16
    block = _omp.new_block(nchunks, units, (parts, M, T, K, W, gsize, flags, bias, xaddr, wb, scale, zp, out))
    team = _TEAM_KERNELS[signed]
    _omp.run(units, team, block, _omp.on_caller, (team, block), units, 1, nchunks=nchunks)


_NO_BF16 = "this process cannot run AVX512-BF16 dot products (numba does not compile for such a CPU)"


def bf16dot_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   group_size: int, bits: int, out_features: int,
                   out_dtype: torch.dtype | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The forward on CPU torch tensors that ``layouts.blocked`` built (``scale`` / ``zero_point`` already
    ``[G, N]``, all three contiguous; K and the group size multiples of 32): ``[M, N]``, a new tensor, for
    bfloat16 or float16 ``x[M, K]``, in ``x``'s dtype (the float32 sums rounded to nearest even by the kernel as it
    stores them, as ``.to()`` rounds), or float32 where ``out_dtype`` is ``torch.float32`` (the sums themselves),
    ``bias`` (``[N]``, its float32 value) added to the float32 sums as they are stored. Rows are first laid out
    (float16: split into two bfloat16 parts) ``ROW_CHUNK`` rows at a time, in a buffer the calling thread reuses."""
    if not (_AVAILABLE or available()):  # the instruction on a CPU without it is SIGILL, not an error
        raise RuntimeError(_NO_BF16)
    if x.dtype not in (torch.bfloat16, torch.float16) or not (x.is_cpu and qweight.is_cpu and scale.is_cpu
                                                              and zero_point.is_cpu):
        raise TypeError(f"the AVX512-BF16 kernel takes CPU bfloat16 or float16 rows, got {x.dtype} on {x.device}")
    K = x.shape[1]
    if not eligible(K, group_size) or qweight.shape[1] != K:
        raise ValueError(f"the AVX512-BF16 kernel needs K and the group size to be multiples of 32, got K={K}, "
                         f"group size {group_size}")
    if out_dtype not in (None, torch.float32, x.dtype):
        raise ValueError(f"out_dtype must be None, torch.float32 or x's dtype ({x.dtype}), got {out_dtype}")
    if bias is not None and (not bias.is_cpu or tuple(bias.shape) != (out_features,)):
        raise TypeError(f"bias must be a CPU tensor of {out_features} values, got {tuple(bias.shape)} on "
                        f"{bias.device}")
    odt = x.dtype if out_dtype is None else out_dtype
    return _Prepared(qweight, scale, zero_point, group_size, bits, out_features)(x.contiguous(), bias, odt)


class _Prepared(_AmxPrepared):
    """:class:`qtorch.amx._Prepared` for this kernel: every row block laid out first (x's own rows thrash L1)."""

    __slots__ = ()
    _DIRECT = False

    @staticmethod
    def _kernel(*args, **kwargs) -> None:
        _run(*args, **kwargs)


def runner(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int, bits: int,
           out_features: int, dtype: torch.dtype):
    """:func:`bf16dot_linear` of one layer for ``dtype`` rows (bfloat16 / float16), its weight's operands read once:
    ``f(x, bias)`` (as :func:`qtorch.amx.runner`)."""
    if not (_AVAILABLE or available()):
        raise RuntimeError(_NO_BF16)
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"the AVX512-BF16 kernel takes CPU bfloat16 or float16 rows, got {dtype}")
    return _amx_runner(qweight, scale, zero_point, group_size, bits, out_features, dtype, prepared=_Prepared)

