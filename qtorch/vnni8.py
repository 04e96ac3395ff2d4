"""8-bit codes multiplied as integers on AMX-INT8 tiles (``tdpbssd``), straight from memory: the ``vnni8`` layout's
kernel, any row count.

A leaf of :mod:`qtorch.layouts.vnni8`. The weight (symmetric int8 codes, a scale per output channel) is held in
the order of AMX's B operand: per tile of 64 output channels, two pairs of strips of 16 channels, each pair's
steps of 64 inputs one after the other (2 KB a step: a B tile of 1 KB per strip), row ``r`` of a B tile holding
inputs ``4 r .. 4 r + 3`` of its 16 channels (byte ``4 n + j`` = ``code[16 s + n, 4 r + j]``), so a tile load reads
the codes as they are stored, nothing is converted per call, and each pass of a pair of strips over K reads one
stream.
Each row of ``x`` is split into 2 to 4 signed 8-bit planes, ``q = round(x * 2^(P - e))`` with ``|x| < 2^e`` over
the whole row (balanced base-256 digits, ``P = 14, 22, 30``), plane ``p`` of row ``m`` stored as row ``p M + m`` of
the A tiles (rows of 64 inputs a step; ``ceil(parts M / 16)`` tiles). Per tile of 64 channels, pairs of A tiles
times pairs of strips (``tdpbssd``, four C tiles carried over K), a last single A tile times all four strips; the
32-bit sums ``sum q_p code`` over all of K are exact (``|q_p code| <= 128 * 127``; :data:`MAX_K`); each row's
planes are combined in float32 and scaled once, by ``2^(e - P)`` and the channel's scale. The one rounding is
``x``'s, under ``2^(e - P - 1)`` an element; :class:`Plan` says how many planes a call takes.

One row may instead take ``vpdpbusd`` on the same bytes (AVX512-VNNI, ``K`` up to :data:`DOT_MAX_K`; the layout
offers it as a path of its own, measured against the tiles): a B tile's row of 64 bytes is 4 inputs of 16
channels, what one ``vpdpbusd`` multiplies by a broadcast word of ``x``, so no tile is loaded or stored and the AMX
unit is not woken for a product of one row. Its operand of ``x`` is unsigned: the row's digits are those of ``v =
q + 2^P`` (``0 <= v <= 2^(P + 1)``), and ``2^P`` times each channel's code sum (:func:`colsums`, kept by the plan)
is taken off in 64-bit integers; the same planes and rounding of ``x`` as the tiles' (four for float32, for
bfloat16 / float16 the fewest that :class:`Plan` allows), the planes' exact sums combined in 64-bit integers and
scaled in float64.

Eligible where :func:`available` (AMX tiles granted to the process and AMX-INT8) for ``N % 64 == 0`` and ``K % 64
== 0`` up to :data:`MAX_K` (:func:`eligible`).

>>> import numpy as np
>>> codes = np.ones((64, 64), np.int8); codes[1] = -2                 # channel 1: every code -2
>>> w = pack(codes)
>>> x = np.zeros((2, 64), np.uint16); x[0] = 0x3F80; x[1, :2] = 0x4000  # bfloat16: row 0 ones, row 1 [2, 2, 0..]
>>> out = np.zeros((2, 64), np.float32)
>>> if available():
...     out = run(x, 1, w, np.full(64, 0.5, np.float32), out)
... else:
...     out[0, :2], out[1, :2] = (32, -64), (2, -4)
>>> out[:, :2].tolist()
[[32.0, -64.0], [2.0, -4.0]]
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _omp, vnni_amx
from ._ir import AMX_TILE, F32, I8, I16, I32, I64, host_has, prefetch_l2, vec
from ._ir import cached as _cached, touch as _touch
from .amx import _amx_fn as _fn  # an LLVM intrinsic's declaration in the module
from .amx import on_lines
from .gemv import _half_bits_to_float, _narrow, _native
from .planes import _RNE


__all__ = ["DOT_MAX_K", "MAX_K", "NT", "Chain", "Plan", "available", "colsums", "dot_eligible", "eligible", "pack",
           "planes", "run", "unpack"]

#: output channels of a tile: four strips of 16 (one C tile each)
NT = 64
#: inputs of a tile step (one A tile, four B tiles)
STEP = 64
#: bytes from one step of a pair of strips to the next (its two B tiles)
BSTEP = 2048
#: inputs at most: a plane's 32-bit sum over all of K stays exact (``128 * 127 * K < 2^31``)
MAX_K = 1 << 17
#: the exponent ``P`` of ``q = round(x * 2^(P - e))`` by number of planes (balanced base-256 digits hold ``|q| <=
#: 2^P``)
P_OF = {2: 14, 3: 22, 4: 30}
#: steps of a block of K, over which the C tiles stay in their registers (through ``cacc`` between blocks). Blocks
#: of 8 steps, whose A and B tiles would stay in L1, measured no faster than 64 on the AMX Xeon (4096 x 4096, 16
#: and 128 rows; nor did prefetching the next block's B lines into L1, nor one A tile by four strips)
KB = 64
#: bytes ahead of the step a call whose planes fill one A tile (a few rows: each line of the weight read once)
#: prefetches into L2: on the AMX Xeon, 4096 x 4096, one bfloat16 row, 2 threads, two runs: 0.35 / 0.36 ms at 2 KB
#: against 0.39 without (4-32 KB: 0.39-0.40)
PF = 2048


def available() -> bool:
    """Whether this process may run the kernel: AMX tiles granted and AMX-INT8 (:func:`qtorch.vnni_amx.available`)."""
    return vnni_amx.available()


def eligible(out_features: int, in_features: int) -> bool:
    """Whether the kernel serves a ``[out_features, in_features]`` weight: whole tiles and steps, K up to MAX_K."""
    return (out_features > 0 and out_features % NT == 0 and in_features > 0 and in_features % STEP == 0
            and in_features <= MAX_K)


def pack(codes):
    """int8 codes ``[N, K]`` (NumPy or torch) -> the kernel's order ``[N/64, 2, K/64, 2, 16, 64]``: tile ``t``, pair
    of strips ``p``, step ``k``, strip ``s`` of the pair, row ``r``, byte ``4 n + j`` = ``codes[64 t + 32 p + 16 s +
    n, 64 k + 4 r + j]``.

    >>> pack(np.arange(64 * 64).reshape(64, 64).astype(np.int8))[0, 0, 0, 0, 0, :8].tolist()
    [0, 1, 2, 3, 64, 65, 66, 67]
    """
    n, k = codes.shape
    c = codes.reshape(n // NT, 2, 2, 16, k // STEP, 16, 4)  # t, pair, s, n, k, r, j
    if isinstance(c, np.ndarray):
        return np.ascontiguousarray(c.transpose(0, 1, 4, 2, 5, 3, 6)).reshape(n // NT, 2, k // STEP, 2, 16, 64)
    return c.permute(0, 1, 4, 2, 5, 3, 6).contiguous().reshape(n // NT, 2, k // STEP, 2, 16, 64)


def unpack(w):
    """Inverse of :func:`pack`: ``[N, K]``."""
    t, ks = w.shape[0], w.shape[2]
    c = w.reshape(t, 2, ks, 2, 16, 16, 4)  # t, pair, k, s, r, n, j
    if isinstance(c, np.ndarray):
        return np.ascontiguousarray(c.transpose(0, 1, 3, 5, 2, 4, 6)).reshape(t * NT, ks * STEP)
    return c.permute(0, 1, 3, 5, 2, 4, 6).contiguous().reshape(t * NT, ks * STEP)


# -- the activations' planes


@njit(inline="always")
def _row_floats(x, kind, m, xf):  # pragma: no cover - compiled; row m of x as float32 (exactly)
    K = xf.shape[0]
    row = x[m]
    if kind == 0:
        for k in range(K):
            xf[k] = row[k]
    elif kind == 1:
        xi = xf.view(np.uint32)
        for k in range(K):
            xi[k] = np.uint32(row[k]) << np.uint32(16)
    else:
        for k in range(K):
            xf[k] = _half_bits_to_float(row[k])


@njit(inline="always")
def _max_bits(xf):  # pragma: no cover - compiled; the largest |x| by its bits (NaN and infinity above all)
    xb = xf.view(np.uint32)
    mb = np.uint32(0)
    for k in range(xf.shape[0]):
        v = xb[k] & np.uint32(0x7FFFFFFF)
        mb = v if v > mb else mb
    return mb


@njit(inline="always")
def _exponent(mb, P):  # pragma: no cover - compiled; e with |x| < 2^e, and 2^(e - P) a float32 (>= 2^-149)
    ex = np.int64(mb >> np.uint32(23))
    e = ex - 126 if ex > 0 else -126
    return e if e - P >= -149 else P - 149


@njit(cache=True, nogil=True, fastmath=True)
def _abs_sum(xf):  # pragma: no cover - compiled; sum |x| in any order (a bound's test: vectorised)
    total = np.float32(0)
    for k in range(xf.shape[0]):
        total += abs(xf[k])
    return np.float64(total)


@njit(inline="always")
def _need(xf, kind, mb):  # pragma: no cover - compiled
    # the fewest planes (2, 3 or 4) whose rounding of the row, under 2^(e - P - 1) an element, adds at most what
    # rounding the weight to x's own precision would: K 2^(e - P - 1) <= 2^-t sum |x| (the sum in float32, to a
    # few ulps: a margin the test does not need to be exact within)
    K = xf.shape[0]
    t = 24 if kind == 0 else (8 if kind == 1 else 11)
    total = _abs_sum(xf)
    for parts in (2, 3):
        P = 14 if parts == 2 else 22
        if math.ldexp(float(K), _exponent(mb, P) - P - 1 + t) <= total:
            return parts
    return 4


@njit(inline="always")
def _split_rows(x, kind, parts, xa, xm, need, r0, r1):  # pragma: no cover - compiled
    # rows r0..r1 of x as planes: q = round(x 2^(P - e)) in balanced base-256 digits, plane p (0: the most
    # significant) of row m in row p M + m of the A tiles (xa[a, step, row, byte]), and (where need has rows) the
    # planes each row needs (_need); 1 where x is not finite. With
    # u = q + 128 (1 + 256 + ...) over the lower digits, each lower digit is a byte of u less 128 and the top one
    # u shifted: every plane from u alone, in loops LLVM vectorises
    M, K = x.shape
    P = 14 if parts == 2 else (22 if parts == 3 else 30)
    bias = np.int32(0x80 if parts == 2 else (0x8080 if parts == 3 else 0x808080))
    xf = np.empty(K, np.float32)
    u = np.empty(K, np.int32)
    for m in range(r0, r1):
        _row_floats(x, kind, m, xf)
        mb = _max_bits(xf)
        if mb >= np.uint32(0x7F800000):
            return 1
        if need.shape[0]:
            need[m] = _need(xf, kind, mb)
        e = _exponent(mb, P)
        sc = math.ldexp(1.0, P - e)
        xm[m] = np.float32(math.ldexp(1.0, e - P))
        for k in range(K):
            u[k] = np.int32((np.float64(xf[k]) * sc + _RNE) - _RNE) + bias
        for p in range(parts):
            r = p * M + m
            a, rr = r // 16, r % 16
            sh = np.int32(8 * (parts - 1 - p))
            for c in range(K // STEP):
                dst = xa[a, c, rr]
                src = u[STEP * c:STEP * c + STEP]
                if p == 0:
                    for j in range(STEP):  # (from 0: a loop LLVM vectorises)
                        dst[j] = np.int8(src[j] >> sh)
                else:
                    for j in range(STEP):
                        dst[j] = np.int8(((src[j] >> sh) & 255) - 128)
    return 0


# -- the tiles


def _emit_block(builder, fns, apts, bpts, cptrs, first, zb, k0, k1, pf=None):
    """IR: the C tiles ``cptrs[a][s]`` (int32, 64-byte rows; zero where ``first``) plus, for steps ``k0 .. k1``,
    A tile ``a`` (``apts[a]`` + 1 KB a step) times B tile ``s`` (``bpts[s]`` + ``BSTEP`` a step), stored back.
    ``pf`` (with one A tile; 0: none): each step prefetches its B lines ``pf`` bytes ahead into L2. (A and C tiles
    of fewer rows for a lone A tile of one row's planes: with the shape a run-time value, or with shapes of 4 and
    16 rows in one function, LLVM ran out of tile registers or spilled them: 16-row calls twice as long.)"""
    load, store, dp = fns
    i64 = functools.partial(ir.Constant, I64)
    r16, c64 = ir.Constant(I16, 16), ir.Constant(I16, 64)
    ra = r16
    init = [[builder.call(load, [ra, c64, builder.select(first, zb, cp), builder.select(first, i64(0), i64(64))])
             for cp in row] for row in cptrs]
    entry = builder.block
    head = builder.append_basic_block("v8.head")
    body = builder.append_basic_block("v8.body")
    done = builder.append_basic_block("v8.done")
    builder.branch(head)
    builder.position_at_end(head)
    kk = builder.phi(I64)
    kk.add_incoming(k0, entry)
    accs = []
    for row in init:
        accs.append([])
        for v in row:
            accs[-1].append(builder.phi(AMX_TILE))
            accs[-1][-1].add_incoming(v, entry)
    builder.cbranch(builder.icmp_signed("<", kk, k1), body, done)
    builder.position_at_end(body)
    if pf is not None:  # the lines of the step pf bytes ahead, into L2 (0: none), in both pairs' streams
        with builder.if_then(builder.icmp_signed("!=", pf, i64(0))):
            for bp in bpts[::2]:
                base = builder.gep(bp, [builder.add(builder.mul(kk, i64(BSTEP)), pf)])
                for j in range(0, BSTEP, 64):
                    prefetch_l2(builder, builder.gep(base, [i64(j)]))
    new = [[None] * len(bpts) for _ in apts]
    ats = [builder.call(load, [ra, c64, builder.gep(ap, [builder.mul(kk, i64(1024))]), i64(64)]) for ap in apts]
    if len(apts) == 2:  # two A and two B tiles: four products
        bts = [builder.call(load, [r16, c64, builder.gep(bp, [builder.mul(kk, i64(BSTEP))]), i64(64)]) for bp in bpts]
        for a, at in enumerate(ats):
            for s, bt in enumerate(bts):
                new[a][s] = builder.call(dp, [r16, c64, c64, accs[a][s], at, bt])
    else:  # one A tile, four strips: two B tiles loaded before their products
        for pair in ((0, 1), (2, 3)):
            bts = [builder.call(load, [r16, c64, builder.gep(bpts[s], [builder.mul(kk, i64(BSTEP))]), i64(64)])
                   for s in pair]
            for s, bt in zip(pair, bts):
                new[0][s] = builder.call(dp, [ra, c64, c64, accs[0][s], ats[0], bt])
    nxt = builder.add(kk, i64(1))
    latch = builder.block
    builder.branch(head)
    kk.add_incoming(nxt, latch)
    for arow, nrow in zip(accs, new):
        for acc, v in zip(arow, nrow):
            acc.add_incoming(v, latch)
    builder.position_at_end(done)
    for arow, crow in zip(accs, cptrs):
        for acc, cp in zip(arow, crow):
            builder.call(store, [ra, c64, cp, i64(64), acc])


@intrinsic
def _tile(typingctx, xa, w, cacc, zero, t, M, parts, xm, scale, out, oc, kb, pf):
    """``out[m, 64 t + c] = 2^(e_m - P) scale[64 t + c] sum_p 256^(parts - 1 - p) sum_k q_p[m, k] code[64 t + c,
    k]`` for every row ``m < M``. ``xa``: int8 A tiles ``[nA, K/64, 16, 64]`` (plane ``p`` of row ``m`` in row ``p M
    + m``). Per block of ``kb`` steps, pairs of A tiles times pairs of strips (a last single A tile times all four
    strips), the int32 C tiles carried over the block in registers and through ``cacc`` (``[nA, 4, 16, 16]``)
    between blocks (the first block: ``zero``, 16 zeros read with a row stride of 0); at the end each row's planes'
    sums are combined in float32 and scaled into ``out`` from column ``oc`` on (``xm``: float32 ``[M]``, ``2^(e -
    P)``)."""
    if not isinstance(parts, types.IntegerLiteral):
        return None
    npl = parts.literal_value
    vi, vf = vec(I32, 16), vec(F32, 16)

    def codegen(context, builder, sig, args):
        xa_, wa, ca, za, ma, sa, oa = (context.make_array(sig.args[i])(context, builder, args[i])
                                       for i in (0, 1, 2, 3, 7, 8, 9))
        tt, mm, ocv, kbv, pfv = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (4, 5, 10, 11, 12))
        i64 = functools.partial(ir.Constant, I64)
        i8p = I8.as_pointer()
        fns = (_fn(builder, "llvm.x86.tileloadd64.internal", AMX_TILE, [I16, I16, i8p, I64]),
               _fn(builder, "llvm.x86.tilestored64.internal", ir.VoidType(), [I16, I16, i8p, I64, AMX_TILE]),
               _fn(builder, "llvm.x86.tdpbssd.internal", AMX_TILE, [I16, I16, I16, AMX_TILE, AMX_TILE, AMX_TILE]))
        na, ksteps, _, _ = cgutils.unpack_tuple(builder, xa_.shape, 4)
        _, ncols = cgutils.unpack_tuple(builder, oa.shape, 2)
        xb, wb, cb, zb = (builder.bitcast(a.data, i8p) for a in (xa_, wa, ca, za))
        wt = builder.gep(wb, [builder.mul(builder.mul(tt, ksteps), i64(4096))])  # the tile's 4 KB a step
        half = builder.mul(ksteps, i64(2048))  # a pair of strips over all of K
        bpts = [builder.gep(wt, [builder.add(builder.mul(i64(s // 2), half), i64(1024 * (s % 2)))]) for s in range(4)]
        npairs = builder.sdiv(na, i64(2))
        odd = builder.icmp_signed("!=", builder.srem(na, i64(2)), i64(0))
        nkb = builder.sdiv(builder.sub(builder.add(ksteps, kbv), i64(1)), kbv)

        def aptr(a):
            return builder.gep(xb, [builder.mul(builder.mul(a, ksteps), i64(1024))])

        def cptr(a, s):
            return builder.gep(cb, [builder.add(builder.mul(a, i64(4096)), i64(1024 * s))])

        with cgutils.for_range(builder, nkb) as kbl:
            k0 = builder.mul(kbl.index, kbv)
            k1 = builder.add(k0, kbv)
            k1 = builder.select(builder.icmp_signed("<", k1, ksteps), k1, ksteps)
            first = builder.icmp_signed("==", k0, i64(0))
            with cgutils.for_range(builder, npairs) as pl:  # two A tiles by two strips, twice
                a0 = builder.mul(pl.index, i64(2))
                a1 = builder.add(a0, i64(1))
                for sp in (0, 2):
                    _emit_block(builder, fns, [aptr(a0), aptr(a1)], bpts[sp:sp + 2],
                                [[cptr(a, s) for s in (sp, sp + 1)] for a in (a0, a1)], first, zb, k0, k1)
            with builder.if_then(odd):  # a last A tile by all four strips
                a = builder.sub(na, i64(1))
                _emit_block(builder, fns, [aptr(a)], bpts, [[cptr(a, s) for s in range(4)]], first, zb, k0, k1,
                            builder.select(builder.icmp_signed("==", na, i64(1)), pfv, i64(0)))
        # each row: its planes' sums combined (float32: the high plane's sum may pass 2^24) and scaled
        lanes0 = ir.Constant(vi, [0] * 16)
        with cgutils.for_range(builder, mm) as rows_loop:
            m = rows_loop.index
            mult = builder.load(builder.gep(ma.data, [m]))
            multv = builder.shuffle_vector(builder.insert_element(ir.Constant(vf, ir.Undefined), mult,
                                                                  ir.Constant(I32, 0)),
                                           ir.Constant(vf, ir.Undefined), lanes0)
            orow = builder.gep(oa.data, [builder.add(builder.mul(m, ncols), ocv)])
            for s in range(4):
                def crow(p):  # row p M + m of the C tiles of strip s
                    r = builder.add(builder.mul(i64(p), mm), m)
                    off = builder.add(builder.add(builder.mul(builder.sdiv(r, i64(16)), i64(1024)), i64(256 * s)),
                                      builder.mul(builder.srem(r, i64(16)), i64(16)))
                    return builder.sitofp(builder.load(builder.bitcast(builder.gep(ca.data, [off]), vi.as_pointer()),
                                                       align=4), vf)
                f = crow(0)
                for p in range(1, npl):  # Horner, most significant plane first
                    f = builder.fadd(builder.fmul(f, ir.Constant(vf, [256.0] * 16)), crow(p))
                sc = builder.load(builder.bitcast(builder.gep(sa.data, [builder.add(builder.mul(tt, i64(NT)),
                                                                                    i64(16 * s))]),
                                                  vf.as_pointer()), align=4)
                op = builder.bitcast(builder.gep(orow, [i64(16 * s)]), vf.as_pointer())
                builder.store(builder.fmul(f, builder.fmul(multv, sc)), op, align=4)
        return context.get_dummy_value()

    return types.void(xa, w, cacc, zero, t, M, parts, xm, scale, out, oc, kb, pf), codegen


_ZERO = np.zeros(16, np.int32)  # a C tile's first value: 16 zeros read with a row stride of 0


@_cached
@njit(cache=True, nogil=True)
def _tiles_range(xa, w, M, parts, xm, scale, out, o16, okind, t0, t1, kb, pf):  # pragma: no cover - compiled
    # the output: float32 out [M, N] (okind 0), else o16 [M, N], the bits of bfloat16 (1) / float16 (2) values,
    # each tile's float32 sums rounded into it
    cacc = np.empty(xa.shape[0] * 4 * 256, np.int32)
    o32 = out if okind == 0 else np.empty((M, NT), np.float32)
    for t in range(t0, t1):
        oc = t * NT if okind == 0 else 0
        if parts == 2:
            _tile(xa, w, cacc, _ZERO, t, M, 2, xm, scale, o32, oc, kb, pf)
        elif parts == 3:
            _tile(xa, w, cacc, _ZERO, t, M, 3, xm, scale, o32, oc, kb, pf)
        else:
            _tile(xa, w, cacc, _ZERO, t, M, 4, xm, scale, o32, oc, kb, pf)
        if okind:
            for m in range(M):
                _narrow(o32[m], o16[m, t * NT:t * NT + NT], okind, 0, NT)


# -- one row: ``vpdpbusd`` on the same bytes


#: inputs at most for the one-row ``vpdpbusd`` kernel (:func:`_row_tile`: its 32-bit sums of unsigned digits times
#: codes stay exact, ``255 * 128 * K < 2^31``)
DOT_MAX_K = 1 << 16
#: numba compiles for a CPU with AVX512-VNNI (every AMX-INT8 CPU has it; a numba target without it has no tiles
#: either)
_DOT = host_has("avx512vnni")


def dot_eligible(in_features: int) -> bool:
    """Whether one-row calls of a weight with ``in_features`` inputs may take the ``vpdpbusd`` kernel
    (:meth:`Plan.__call__` with ``dot``): AVX512-VNNI, and K up to :data:`DOT_MAX_K`."""
    return _DOT and 0 < in_features <= DOT_MAX_K


@njit(inline="always")
def _row_digits(x, kind, xd, xm):  # pragma: no cover - compiled
    # row 0 of x as unsigned digits: v = q + 2^P (q = round(x 2^(P - e)), |q| <= 2^P, so 0 <= v <= 2^(P + 1)),
    # digit p (0: the least significant) of every input in xd[p]; xm[0] = 2^(e - P). The planes: four for float32,
    # for bfloat16 / float16 the fewest whose rounding of the row stays within what rounding the weight to x's own
    # precision would add (_need). Returns the planes, 0 where x is not finite
    K = xd.shape[1]
    xf = np.empty(K, np.float32)
    _row_floats(x, kind, 0, xf)
    mb = _max_bits(xf)
    if mb >= np.uint32(0x7F800000):
        return 0
    parts = 4 if kind == 0 else _need(xf, kind, mb)
    P = 14 if parts == 2 else (22 if parts == 3 else 30)
    e = _exponent(mb, P)
    sc = math.ldexp(1.0, P - e)
    xm[0] = np.float32(math.ldexp(1.0, e - P))
    bias = np.int64(1) << np.int64(P)
    v = np.empty(K, np.int64)
    for k in range(K):
        v[k] = np.int64((np.float64(xf[k]) * sc + _RNE) - _RNE) + bias
    for p in range(parts):
        sh = np.int64(8 * p)
        dst = xd[p]
        for k in range(K):  # (a loop LLVM vectorises)
            dst[k] = np.uint8((v[k] >> sh) & np.int64(255))
    return parts


@intrinsic
def _row_tile(typingctx, w, t, xd, parts, colsum, xm, scale, out, oc, pf, touch):
    """``out[oc + c] = 2^(e - P) scale[64 t + c] (sum_p 256^p sum_k d_p[k] code[64 t + c, k] - 2^P colsum[64 t +
    c])`` for the 64 channels of tile ``t``: one row's unsigned digits ``xd`` (uint8 ``[4, K]``, :func:`_row_digits`)
    times the codes as they are stored, ``vpdpbusd`` (unsigned bytes of ``x`` by signed codes, four products summed
    into the 32-bit lane of their channel: a B tile's row of 64 bytes is 4 inputs of 16 channels). Both pairs of
    strips stream at once, each broadcast digit word serving four strips; the planes' exact 32-bit sums combine in
    64-bit integers, less ``2^P`` times the channel's code sum (``colsum``, int32 ``[N]``), then scale in float64.
    ``pf`` (bytes; 0: none): each row of a step prefetches its lines that far ahead into L2; ``touch`` > 0: each
    line is read once more, 4 bytes (:func:`qtorch.prefetch.vnni8_touch`)."""
    if not isinstance(parts, types.IntegerLiteral):
        return None
    npl = parts.literal_value
    P = P_OF[npl]
    vi, vl, vd, vf = vec(I32, 16), vec(I64, 16), vec(ir.DoubleType(), 16), vec(F32, 16)

    def codegen(context, builder, sig, args):
        wa, xa, ca, ma, sa, oa = (context.make_array(sig.args[i])(context, builder, args[i])
                                  for i in (0, 2, 4, 5, 6, 7))
        tt, ocv, pfv, tch = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 8, 9, 10))
        i64 = functools.partial(ir.Constant, I64)
        i8p = I8.as_pointer()
        _, _, ksteps, _, _, _ = cgutils.unpack_tuple(builder, wa.shape, 6)
        _, kk = cgutils.unpack_tuple(builder, xa.shape, 2)
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi, [vi, vi, vi]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        wb, xb = builder.bitcast(wa.data, i8p), builder.bitcast(xa.data, i8p)
        half = builder.mul(ksteps, i64(BSTEP))  # a pair of strips over all of K
        wt = builder.gep(wb, [builder.mul(tt, builder.mul(half, i64(2)))])
        pairs = [wt, builder.gep(wt, [half])]
        lanes0 = ir.Constant(vi, [0] * 16)
        zero = ir.Constant(vi, [0] * 16)
        do_pf = builder.icmp_signed("!=", pfv, i64(0))
        do_touch = builder.icmp_signed(">", tch, i64(0))

        def splat(v, ty):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(ty, ir.Undefined), v,
                                                                 ir.Constant(I32, 0)),
                                          ir.Constant(ty, ir.Undefined), lanes0)

        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(4)] for _ in range(npl)]
        with cgutils.for_range(builder, ksteps) as loop:
            k = loop.index
            steps = [builder.gep(pp, [builder.mul(k, i64(BSTEP))]) for pp in pairs]
            xk = builder.mul(k, i64(STEP))
            cur = [[builder.load(a) for a in row] for row in accs]
            for r in range(16):
                rows = [builder.gep(st, [i64(1024 * s + 64 * r)]) for st in steps for s in (0, 1)]  # strips 0..3
                with builder.if_then(do_pf, likely=True):
                    for rp in rows:
                        prefetch_l2(builder, builder.gep(rp, [pfv]))
                codes = [builder.load(builder.bitcast(rp, vi.as_pointer()), align=4) for rp in rows]
                with builder.if_then(do_touch, likely=True):
                    for rp in rows:
                        _touch(builder, rp)
                for p in range(npl):
                    at = builder.gep(xb, [builder.add(builder.add(builder.mul(i64(p), kk), xk), i64(4 * r))])
                    xw = splat(builder.load(builder.bitcast(at, I32.as_pointer()), align=4), vi)
                    for c in range(4):
                        cur[p][c] = builder.call(dp, [cur[p][c], xw, codes[c]])
            for p in range(npl):
                for c in range(4):
                    builder.store(cur[p][c], accs[p][c])
        mult = builder.fpext(builder.load(ma.data), ir.DoubleType())
        n0 = builder.mul(tt, i64(NT))
        for c in range(4):
            s64 = None
            for p in range(npl):
                a = builder.sext(builder.load(accs[p][c]), vl)
                if p:
                    a = builder.shl(a, ir.Constant(vl, [8 * p] * 16))
                s64 = a if s64 is None else builder.add(s64, a)
            cs = builder.load(builder.bitcast(builder.gep(ca.data, [builder.add(n0, i64(16 * c))]), vi.as_pointer()),
                              align=4)
            s64 = builder.sub(s64, builder.shl(builder.sext(cs, vl), ir.Constant(vl, [P] * 16)))
            sc = builder.load(builder.bitcast(builder.gep(sa.data, [builder.add(n0, i64(16 * c))]), vf.as_pointer()),
                              align=4)
            f = builder.fmul(builder.sitofp(s64, vd), builder.fmul(builder.fpext(sc, vd), splat(mult, vd)))
            op = builder.bitcast(builder.gep(oa.data, [builder.add(ocv, i64(16 * c))]), vf.as_pointer())
            builder.store(builder.fptrunc(f, vf), op, align=4)
        return context.get_dummy_value()

    return types.void(w, t, xd, parts, colsum, xm, scale, out, oc, pf, touch), codegen


@_cached
@njit(cache=True, nogil=True)
def _row_range(w, xd, parts, colsum, xm, scale, out, o16, okind, t0, t1, pf, touch):  # pragma: no cover - compiled
    o32 = out if okind == 0 else np.empty(NT, np.float32)
    for t in range(t0, t1):
        oc = t * NT if okind == 0 else 0
        if parts == 2:
            _row_tile(w, t, xd, 2, colsum, xm, scale, o32, oc, pf, touch)
        elif parts == 3:
            _row_tile(w, t, xd, 3, colsum, xm, scale, o32, oc, pf, touch)
        else:
            _row_tile(w, t, xd, 4, colsum, xm, scale, o32, oc, pf, touch)
        if okind:
            _narrow(o32, o16[t * NT:t * NT + NT], okind, 0, NT)


def colsums(w: np.ndarray) -> np.ndarray:
    """Each output channel's sum of codes (int32 ``[N]``) from the kernel's order (:func:`pack`): what the one-row
    kernel's unsigned digits of ``x`` add, taken off.

    >>> colsums(pack(np.ones((64, 128), np.int8)))[:3].tolist()
    [128, 128, 128]
    """
    t, ks = w.shape[0], w.shape[2]
    c = w.reshape(t, 2, ks, 2, 16, 16, 4)  # t, pair, k, s, r, n, j
    return np.ascontiguousarray(c.sum(axis=(2, 4, 6), dtype=np.int32).reshape(t * NT))


OPERANDS = _omp.Operands("vnni8", M=_omp.I64, K=_omp.I64, T=_omp.I64, meta=_omp.I64, pf=_omp.I64, x=_omp.ADDR,
                         xa=_omp.ADDR, xm=_omp.ADDR, need=_omp.ADDR, w=_omp.ADDR, scale=_omp.ADDR, colsum=_omp.ADDR,
                         out=_omp.ADDR)
_read = OPERANDS.read
#: the phases of a call of 5+ rows: the rows' planes, then the tiles
_SPLIT, _TILES = 1, 2


@njit(inline="always")
def _fields(m):  # pragma: no cover - compiled; the meta operand: x's kind, phase, planes, out's kind, steps a block
    return m & 3, (m >> 2) & 3, (m >> 4) & 7, (m >> 7) & 3, (m >> 16) & 0xFFFF


@njit(inline="always")
def _outs(address, M, N, okind):  # pragma: no cover - compiled; the output as float32 or as 16-bit values
    if okind == 0:
        return carray(address, (M, N), np.float32), carray(address, (0, 0), np.uint16)
    return carray(address, (0, 0), np.float32), carray(address, (M, N), np.uint16)


@njit(inline="always")
def _chunk(o, i, c0, c1, _a, _b):  # pragma: no cover - compiled; rows c0..c1 (the split) or tiles c0..c1
    M, K, T = o.M, o.K, o.T
    xkind, phase, parts, okind, kb = _fields(o.meta)
    na = (parts * M + 15) // 16
    xa = carray(o.xa, (na, K // STEP, 16, 64), np.int8)
    xm = carray(o.xm, M, np.float32)
    if phase == _SPLIT:
        need = carray(o.need, M if xkind else 0, np.int32)
        if xkind == 0:
            return _split_rows(carray(o.x, (M, K), np.float32), 0, parts, xa, xm, need, c0, c1)
        return _split_rows(carray(o.x, (M, K), np.uint16), xkind, parts, xa, xm, need, c0, c1)
    _tiles_range(xa, carray(o.w, (T, 2, K // STEP, 2, 16, 64), np.int8), M, parts, xm,
                 carray(o.scale, T * NT, np.float32), *_outs(o.out, M, T * NT, okind), okind, c0, c1, kb, o.pf)
    return 0


def _team(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _chunk, 0, 0, True)  # a lane of tiles (or rows) per thread: one stream each


_TEAM = _omp.TeamKernel(_team)


def _serial(block, lo, hi) -> None:
    _TEAM.ctypes()(block.ctypes.data)


@njit(inline="always")
def _few_chunk(o, i, t0, t1, _a, y):  # pragma: no cover - compiled; tiles t0..t1 with this thread's planes
    xa, xm, ok = y
    if not ok:
        return 1  # a NaN or an infinity in x: the caller takes another path
    M, K, T = o.M, o.K, o.T
    _, _, parts, okind, kb = _fields(o.meta)
    _tiles_range(xa, carray(o.w, (T, 2, K // STEP, 2, 16, 64), np.int8), M, parts, xm,
                 carray(o.scale, T * NT, np.float32), *_outs(o.out, M, T * NT, okind), okind, t0, t1, kb, o.pf)
    return 0


def _team_few(data):  # pragma: no cover - compiled
    # up to 4 rows: each thread splits all of x itself, once per call, then claims tiles (no phase of its own: a
    # decoding step's launch and the serial split cost more than every thread's split, 4 K inputs in a few us); a
    # chain of blocks (:class:`Chain`: one row, layers of one K and kind of x) goes on to the next block's tiles as
    # soon as it finds none left in this one, the same planes serving every layer
    team = _omp.chain_team(data)
    o = _read(carray(data, _omp.HEADER, np.int64))
    M, K = o.M, o.K
    xkind, _, parts, _, _ = _fields(o.meta)
    na = (parts * M + 15) // 16
    xa = np.empty((na, K // STEP, 16, 64), np.int8)
    xm = np.empty(M, np.float32)
    ok = True
    split = False
    none = np.empty(0, np.int32)  # no row's planes needed asked for
    while True:
        following = _omp.enter_block(data, team)
        head = carray(data, _omp.HEADER, np.int64)
        if not split and head[0] < head[1]:  # chunks left to claim (a block of none is the loader's probe)
            split = True
            if xkind == 0:
                ok = _split_rows(carray(o.x, (M, K), np.float32), 0, parts, xa, xm, none, 0, M) == 0
            else:
                ok = _split_rows(carray(o.x, (M, K), np.uint16), xkind, parts, xa, xm, none, 0, M) == 0
        _omp.claim_operands(data, _read, _few_chunk, 0, (xa, xm, ok), True)  # a lane of tiles per thread
        if following == 0:
            break
        data = _omp.as_ptr(following)


_TEAM_FEW = _omp.TeamKernel(_team_few)


def _serial_few(block, lo, hi) -> None:
    _TEAM_FEW.ctypes()(block.ctypes.data)



@njit(inline="always")
def _row_chunk(o, i, t0, t1, _a, y):  # pragma: no cover - compiled; tiles t0..t1 of a one-row call
    xd, xm, parts = y
    if parts == 0:
        return 1  # a NaN or an infinity in x: the caller takes another path
    K, T = o.K, o.T
    okind = (o.meta >> 7) & 3
    N = T * NT
    if okind == 0:
        out, o16 = carray(o.out, N, np.float32), carray(o.out, 0, np.uint16)
    else:
        out, o16 = carray(o.out, 0, np.float32), carray(o.out, N, np.uint16)
    _row_range(carray(o.w, (T, 2, K // STEP, 2, 16, 64), np.int8), xd, parts, carray(o.colsum, N, np.int32), xm,
               carray(o.scale, N, np.float32), out, o16, okind, t0, t1, o.pf, (o.meta >> 9) & 1)
    return 0


def _team_row(data):  # pragma: no cover - compiled
    # one row: each thread makes the row's digits itself, once per call (at its first chunk), then claims tiles; a
    # chain of blocks (:class:`Chain`, layers of one K and kind of x) goes on to the next block's tiles as soon as
    # it finds none left in this one, the same digits serving every layer; the first block's team size is every one's
    team = _omp.chain_team(data)
    o = _read(carray(data, _omp.HEADER, np.int64))
    K = o.K
    xkind = o.meta & 3
    xd = np.empty((4, K), np.uint8)
    xm = np.empty(1, np.float32)
    parts = -1  # (not made yet)
    while True:
        following = _omp.enter_block(data, team)
        head = carray(data, _omp.HEADER, np.int64)
        if parts < 0 and head[0] < head[1]:  # chunks left to claim (a block of none is the loader's probe)
            if xkind == 0:
                parts = _row_digits(carray(o.x, (1, K), np.float32), 0, xd, xm)
            else:
                parts = _row_digits(carray(o.x, (1, K), np.uint16), xkind, xd, xm)
        _omp.claim_operands(data, _read, _row_chunk, 0, (xd, xm, max(parts, 0)), True)  # a lane of tiles per thread
        if following == 0:
            break
        data = _omp.as_ptr(following)


_TEAM_ROW = _omp.TeamKernel(_team_row)


def _serial_row(block, lo, hi) -> None:
    _TEAM_ROW.ctypes()(block.ctypes.data)


def planes(xkind: int, rows: int, need=None) -> int:
    """The planes a call of ``rows`` rows needs: 4 for float32 (``xkind`` 0) and wherever four planes take no more
    tiles than two (up to 4 rows), else the most that any row needs (``need``: per row, see :class:`Plan`)."""
    if xkind == 0 or 4 * rows <= 16:
        return 4
    return int(need.max())


class _Scratch(threading.local):
    """A thread's arrays for its calls (the A tiles, each row's multiplier and planes needed) and their addresses,
    kept and grown: an address lookup costs about 1 us, a fresh array its pages' first touch."""

    def __init__(self):
        self.arrays = {}

    def get(self, name: str, n: int, dtype) -> tuple:
        a = self.arrays.get(name)
        if a is None or a[0].size < n:
            arr = on_lines(max(n, 1024), dtype)  # the A tiles' rows load one line each
            a = self.arrays[name] = (arr, arr.ctypes.data)
        return a


_SCRATCH = _Scratch()
_SUMS_LOCK = threading.Lock()
_SLOTS = {f: OPERANDS.slot(f) - 3 for f in OPERANDS.fields}  # a field's place in the operands tuple
_X, _OUT = OPERANDS.slot("x"), OPERANDS.slot("out")  # ... and in a block


class Plan:
    """One weight's calls: ``w`` (int8 ``[N/64, 2, K/64, 2, 16, 64]``, :func:`pack`) and ``scale`` (float32 ``[N]``)
    kept alive with their addresses; a call passes only ``x``'s and ``out``'s. Two phases on torch's team: the rows'
    planes (rows in parallel), then the tiles of 64 channels; up to 4 rows one, each thread splitting ``x`` itself.

    The planes: four for float32 rows (``x``'s rounding under ``2^-31`` of its row's largest magnitude) and up to
    four rows (they take no more tiles); for bfloat16 and float16 at least the fewest of two, three or four whose
    rounding of every row, ``K 2^(e - P - 1)`` at most, stays within what rounding the weight to ``x``'s own
    precision would add (``2^-t sum |x|``, ``t`` = 8 or 11 significant bits): two planes (``2^-15`` of a row's
    largest) where no row's largest magnitude is far above its mean. A call splits into the count the plan's last
    call needed, each row telling what it needs, and splits again with more where that was too few. ``touch``:
    the one-row ``vpdpbusd`` kernel reads each line of codes a second time (as measured faster on the machine by
    :func:`qtorch.prefetch.vnni8_touch`; no bit depends on it). ``colsum``: the codes' :func:`colsums`, where the
    caller has them (else made at the first ``vpdpbusd`` call)."""

    __slots__ = ("arrays", "T", "K", "ops", "parts", "natives", "registered", "row", "touch")

    def __init__(self, w: np.ndarray, scale: np.ndarray, touch: bool = False, colsum: np.ndarray | None = None):
        T = w.shape[0]
        self.T, self.K = T, w.shape[2] * STEP
        self.row = dot_eligible(self.K) and T > 0  # whether the one-row vpdpbusd kernel serves the weight
        self.arrays = (w, scale)
        self.parts = 2  # the planes the last call of 5+ bfloat16 / float16 rows needed
        self.ops = list(OPERANDS.pack(M=0, K=self.K, T=T, meta=0, pf=PF, x=0, xa=0, xm=0, need=0, w=w, scale=scale,
                                      colsum=0, out=0))
        self.natives = {}  # (xkind, okind, kb) -> the one-row launch as one native call (qtorch._launch), or None
        self.registered = set()  # the kinds whose launch qtorch.native_ops runs for an op's one-row calls
        self.touch = bool(touch)
        if colsum is not None:  # (kept alive with the codes, as _code_sums keeps its own)
            if colsum.dtype != np.int32 or colsum.shape != (T * NT,) or not colsum.flags.c_contiguous:
                raise ValueError(f"colsum must be a contiguous int32 array [{T * NT}]")
            self.arrays = (w, scale, colsum)
            self.ops[_SLOTS["colsum"]] = colsum.ctypes.data

    def one_row_native(self, xkind: int, okind: int, kb: int = KB, dot: bool = False):
        """The :class:`qtorch._launch.Native` of this weight's one-row calls of these kinds (made at the first
        ask; ``dot``: the ``vpdpbusd`` kernel where it serves the weight, else the tiles), or None where its launch
        never goes natively."""
        dot = dot and self.row
        key = (xkind, okind, kb, dot)
        try:
            return self.natives[key]
        except KeyError:
            pass
        template = self.row_template(xkind, okind, kb, dot)
        team = _TEAM_ROW if dot else _TEAM_FEW
        native = self.natives[key] = _native(team, self.T, [(template, 0)], (_X, _OUT, -1))
        return native

    def _code_sums(self) -> None:
        # each channel's code sum, which the vpdpbusd kernel takes off: made at its first call, not with the plan
        # (56 ms for a 4096 x 4096 weight, paid by every layer a model loads otherwise)
        if self.ops[_SLOTS["colsum"]] == 0:
            with _SUMS_LOCK:  # (made once: a template of another thread's may hold the address already)
                if self.ops[_SLOTS["colsum"]] == 0:
                    colsum = colsums(self.arrays[0])
                    self.arrays = self.arrays[:2] + (colsum,)
                    self.ops[_SLOTS["colsum"]] = colsum.ctypes.data

    def row_template(self, xkind: int, okind: int, kb: int = KB, dot: bool = False) -> np.ndarray:
        """The team block of a one-row call of these kinds (``dot``: for the vpdpbusd kernel), and a link slot after
        its trailer (what a native launch and a :class:`Chain` write); no sums."""
        if dot:
            self._code_sums()
        ops = self.ops.copy()
        ops[_SLOTS["M"]], ops[_SLOTS["meta"]] = 1, _few_meta(xkind, okind, kb, dot and self.touch)
        return np.append(_omp.new_block(self.T, self.T, ops), np.int64(0))

    def __call__(self, x: int, xkind: int, M: int, out: int, okind: int = 0, kb: int = KB,
                 dot: bool = False) -> bool:
        """``out = x @ W.T`` (``[M, N]`` at address ``out``: float32 for ``okind`` 0, else bfloat16 / float16 for 1
        / 2) for ``x`` ``[M, K]`` at address ``x`` (C-contiguous float32, or bfloat16 / float16 bits for ``xkind`` 1
        / 2; the caller keeps both alive). ``dot``: one row by the ``vpdpbusd`` kernel where it serves the weight
        (:func:`dot_eligible`), else by the tiles. False (``out`` unwritten) where ``x`` holds a NaN or an
        infinity, which the planes cannot hold."""
        K, T = self.K, self.T
        if M == 1:  # a decoding step: its launch as one native call where it can go so
            native = self.one_row_native(xkind, okind, kb, dot)
            if native is not None and native.run(x, out, 0, 0):
                return not native.blocks[0][_omp.HEADER:_omp.HEADER + T].any()
        ops = self.ops.copy()
        ops[_SLOTS["M"]], ops[_SLOTS["x"]], ops[_SLOTS["out"]] = M, x, out
        meta = _SLOTS["meta"]
        if 4 * M <= 16:  # four planes in one A tile (or one row's digits): one launch, every thread splitting x
            ops[meta] = _few_meta(xkind, okind, kb, dot and self.touch)
            if M == 1 and dot and self.row:
                self._code_sums()
                ops[_SLOTS["colsum"]] = self.ops[_SLOTS["colsum"]]
                block = np.append(_omp.new_block(T, T, ops), np.int64(0))  # (the row kernel reads a link slot: none)
                _omp.run(T, _TEAM_ROW, block, _serial_row, (block,), T, 1, nchunks=T)
            else:
                block = np.append(_omp.new_block(T, T, ops), np.int64(0))  # (the kernel reads a link slot: none)
                _omp.run(T, _TEAM_FEW, block, _serial_few, (block,), T, 1, nchunks=T)
            return not block[_omp.HEADER:_omp.HEADER + T].any()
        need, ops[_SLOTS["need"]] = _SCRATCH.get("need", M, np.int32)
        _, ops[_SLOTS["xm"]] = _SCRATCH.get("xm", M, np.float32)
        # bfloat16 / float16: split into the planes the last call needed, each row saying what it needs; split again
        # where a row needs more (a separate pass for the count took 30 us of a 16-row 4096 x 4096 call of 0.6 ms)
        parts = 4 if xkind == 0 else self.parts
        while True:
            _, ops[_SLOTS["xa"]] = _SCRATCH.get("xa", -(-parts * M // 16) * K * 16, np.int8)
            ops[meta] = xkind | _SPLIT << 2 | parts << 4 | okind << 7 | kb << 16
            block = _phase(M, ops)
            if block[_omp.HEADER:_omp.HEADER + M].any():
                return False
            if xkind == 0:
                break
            self.parts = wanted = planes(xkind, M, need[:M])
            if wanted <= parts:
                break
            parts = wanted
        ops[meta] = xkind | _TILES << 2 | parts << 4 | okind << 7 | kb << 16
        _phase(T, ops)
        return True


class Chain:
    """Two or three one-row calls (:meth:`Plan.__call__`) on one input row, as one native start of the thread team:
    ``Chain([(plan, xkind, okind, dot), ...])`` (plans of one ``K``, one kind of ``x``, one path: ``dot`` for the
    ``vpdpbusd`` kernel, which must serve every plan, else the tiles); ``chain(xa, oas)``: ``x`` at ``xa``, layer
    ``i``'s output at ``oas[i]``. False (nothing that counts written) where it cannot go natively or ``x`` is not
    finite: the caller then runs each plan itself. The same bits as each plan's own call."""

    __slots__ = ("templates", "plans", "native")

    def __init__(self, calls):
        calls = tuple(calls)
        if (not 2 <= len(calls) <= 3 or len({(p.K, xkind, bool(dot)) for p, xkind, _, dot in calls}) != 1
                or not all(p.row for p, _, _, dot in calls if dot)):
            raise ValueError("a Chain takes two or three plans of one K, one kind of x and one path (the dot kernel "
                             "serving each, or the tiles)")
        dot = bool(calls[0][3])
        self.plans = tuple(p for p, _, _, _ in calls)
        self.templates = [p.row_template(xkind, okind, dot=dot) for p, xkind, okind, _ in calls]
        self.native = _native(_TEAM_ROW if dot else _TEAM_FEW, sum(p.T for p in self.plans),
                              [(t, 0) for t in self.templates], (_X, _OUT, -1))
        if self.native is None:  # (no team of torch's here, or native launches off: nothing to chain)
            raise ValueError("a Chain runs as one native launch, which this process cannot make")

    def __call__(self, xa: int, oas) -> bool:
        native = self.native
        if native is None or not native.run(xa, *oas, *(0,) * (3 - len(oas))):
            return False
        return not native.blocks[0][_omp.HEADER:_omp.HEADER + self.plans[0].T].any()


def _few_meta(xkind: int, okind: int, kb: int, touch: bool = False) -> int:
    """The ``meta`` operand of a call of up to 4 rows: four planes in one A tile, one launch; ``touch``: the
    ``vpdpbusd`` kernel reads each line of codes a second time (bit 9)."""
    return xkind | 4 << 4 | okind << 7 | int(touch) << 9 | kb << 16


def _phase(n: int, ops) -> np.ndarray:
    block = _omp.new_block(n, n, ops)
    _omp.run(n, _TEAM, block, _serial, (block,), n, 1, nchunks=n)
    return block


def run(x: np.ndarray, xkind: int, w: np.ndarray, scale: np.ndarray, out: np.ndarray, kb: int = KB,
        dot: bool = False):
    """``out = x @ (codes * scale).T`` (float32 ``[M, N]``) for ``x`` ``[M, K]`` (float32, or the uint16 bits of
    bfloat16 / float16 values for ``xkind`` 1 / 2; C-contiguous), ``w`` int8 ``[N/64, 2, K/64, 2, 16, 64]``
    (:func:`pack`) and ``scale`` float32 ``[N]``, on torch's thread team (see :class:`Plan` for the planes; ``dot``:
    one row by ``vpdpbusd``). Returns ``out``, or None (``out`` unwritten) where ``x`` holds a NaN or an infinity."""
    if not available():  # a tile instruction without the tile state is SIGILL, not an error
        raise RuntimeError("this process cannot use AMX-INT8 tiles (no AMX-INT8 CPU, or Linux refused the tile state)")
    M, K = x.shape
    T = w.shape[0]
    want = np.float32 if xkind == 0 else np.uint16
    if (x.dtype != want or w.dtype != np.int8 or w.shape != (T, 2, K // STEP, 2, 16, 64) or not eligible(T * NT, K)
            or scale.shape != (T * NT,) or scale.dtype != np.float32 or out.shape != (M, T * NT)
            or out.dtype != np.float32 or not all(a.flags.c_contiguous for a in (x, w, scale, out))):
        raise ValueError(f"x must be contiguous {np.dtype(want)} [M, K] with K % 64 == 0, w int8 [N/64, 2, K/64, 2, "
                         f"16, 64], scale float32 [N], out float32 [M, N]; got x {x.dtype} {list(x.shape)}, w "
                         f"{w.dtype} {list(w.shape)}, scale {scale.dtype} {list(scale.shape)}, out {out.dtype} "
                         f"{list(out.shape)}")
    if M == 0 or T == 0:
        return out
    return out if Plan(w, scale)(x.ctypes.data, xkind, M, out.ctypes.data, 0, kb, dot) else None
