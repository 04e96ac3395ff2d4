"""Calls of several rows of the ``vnni`` layout on AMX tiles of 8-bit integers (``tdpbssd``): the weight's codes
never become floats.

A leaf of :mod:`qtorch.layouts.vnni`, beside :mod:`qtorch.vnni` (the layout, the activations' integer planes and
the one-row kernel). Each row of ``x`` is split as the one-row kernel splits it (per block of ``B`` inputs, ``B`` a
multiple of 64 here: a tile step is 64 inputs), and the planes of ``R`` rows are stacked as the 16 rows of one A
tile (``R = 8`` rows of two planes, or 5 of three: plane ``p`` of row ``i`` in tile row ``p R + i``), so one
``tdpbssd`` per step and strip of 16 channels multiplies every plane. B tiles come from the weight's words: a mask
(or a shift and a mask) of 16 words is one 64-byte row of a B tile, four consecutive inputs of 16 channels (the
kernel order of :func:`qtorch.layouts.vnni._kernel_words`), minus each channel's zero point (a signed byte,
-15..15), unpacked once per tile of 64 channels into a buffer that stays in L2 while every block of rows reads it.
Per block of inputs the 32-bit sums ``sum q (code - z)`` are exact; they are combined per row, ``256 S_h + S_l``
(three planes: ``65536 S_h + (256 S_m + S_l)`` in float32), and scaled once into the float32 output: for groups of
one block, the one-row kernel's numbers for each row, to the bit.

Eligible where :func:`qtorch.amx.available` (AMX tiles granted to the process) and the CPU has AMX-INT8, for
blocks of 64 or 128 inputs (:func:`eligible`).
"""

from __future__ import annotations

import functools
import threading

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _omp, amx
from ._ir import AMX_TILE, F32 as _F32, I8 as _I8, I16 as _I16, I32 as _I32, I64 as _I64, host_has, vec
from ._ir import cached as _cached
from .vnni import NT, _split_bits, _split_row, block_size, meta

__all__ = ["available", "eligible", "rows_per_tile", "run"]

_INT8 = host_has("amx-int8")


def available() -> bool:
    """Whether this process may run the kernel: AMX tiles granted (:func:`qtorch.amx.available`) and AMX-INT8."""
    return _INT8 and amx.available()


def eligible(group: int) -> bool:
    """Whether the kernel serves groups of ``group`` inputs (K for one group): blocks of 64 or 128."""
    return block_size(group) in (64, 128)


def rows_per_tile(parts: int) -> int:
    """Rows of ``x`` whose planes one A tile holds: 8 of two planes, 5 of three."""
    return 16 // parts


def _fn(builder, name, ret, argtys):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, argtys), name)


@intrinsic
def _unpack(typingctx, w, t, zp, ngroups, bbuf):
    """The B tiles of tile ``t`` into ``bbuf`` (int8 ``[4, K/4, 64]``: strip ``s``, row ``r`` = inputs ``4 r ..
    4 r + 3`` of its 16 channels): word octet ``o`` of 16 channels gives rows ``2 o`` (its low nibbles) and ``2 o +
    1`` (its high nibbles), each code minus its zero point (``zp[t, g, c]``, or 8 where ``zp`` is empty: symmetric
    codes), a signed byte in -15..15. The sums then need no ``z * sum q`` term."""
    vi, vb, v64 = vec(_I32, 16), vec(_I8, 16), vec(_I8, 64)

    def codegen(context, builder, sig, args):
        wa, za, ba = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 2, 4))
        tt, ng = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 3))
        i64 = functools.partial(ir.Constant, _I64)
        _, ko, _ = cgutils.unpack_tuple(builder, wa.shape, 3)
        zrows, _, _ = cgutils.unpack_tuple(builder, za.shape, 3)
        has_zp = builder.icmp_signed(">", zrows, i64(0))
        base = builder.gep(wa.data, [builder.mul(builder.mul(tt, ko), i64(NT))])
        rows = builder.mul(ko, i64(2))  # K/4 rows of a strip
        og = builder.sdiv(ko, ng)  # octets of a group
        nib, four = ir.Constant(vi, [0x0F0F0F0F] * 16), ir.Constant(vi, [4] * 16)
        eights = ir.Constant(vi, [0x08080808] * 16)
        with cgutils.for_range(builder, ko) as loop:
            o = loop.index
            prow = builder.mul(builder.add(builder.mul(tt, ng), builder.sdiv(o, og)), i64(NT))
            for s in range(4):
                v = builder.load(builder.bitcast(builder.gep(base, [builder.add(builder.mul(o, i64(NT)), i64(16 * s))]),
                                                 vi.as_pointer()), align=4)
                zp_ptr = builder.gep(za.data, [builder.add(prow, i64(16 * s))])
                zb = builder.zext(builder.load(builder.bitcast(zp_ptr, vb.as_pointer()), align=1), vi)
                # each channel's zero point in the 4 bytes of its lane (where there is no zp array: 8)
                z = builder.select(has_zp, builder.mul(zb, ir.Constant(vi, [0x01010101] * 16)), eights)
                dst = builder.mul(builder.add(builder.mul(i64(s), rows), builder.mul(o, i64(2))), i64(64))
                lo = builder.and_(v, nib)
                hi = builder.and_(builder.lshr(v, four), nib)
                for h, val in ((0, lo), (1, hi)):
                    c = builder.sub(builder.bitcast(val, v64), builder.bitcast(z, v64))  # bytes: code - z
                    p = builder.gep(ba.data, [builder.add(dst, i64(64 * h))])
                    builder.store(c, builder.bitcast(p, v64.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(w, t, zp, ngroups, bbuf), codegen


@intrinsic
def _tile_blocks(typingctx, xa, bbuf, cbuf, t, M, scale, xm, out, nbb, steps, parts):
    """``out[m, 64 t + c] += sum over every block b of 2^(e - P) scale[t, g(b), c] sum q (code - z)`` for every row
    ``m < M``: per block of ``64 steps`` inputs (outer loop: its B tiles stay in L1) and block of ``16 // parts``
    rows, one ``tdpbsud`` per step and strip into four int32 C tiles, stored to ``cbuf`` and combined per row
    (exact), then scaled into ``out``. ``xa``: int8 ``[nrb, K/64, 16, 64]`` (the A tiles); ``nbb``: blocks per
    group."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (steps, parts)):
        return None
    ns, P = steps.literal_value, parts.literal_value
    R = 16 // P
    vi, vf = vec(_I32, 16), vec(_F32, 16)

    def codegen(context, builder, sig, args):
        xa_, ba, ca, sa, ma, oa = (context.make_array(sig.args[i])(context, builder, args[i])
                                   for i in (0, 1, 2, 5, 6, 7))
        tt, mm, nbbv = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (3, 4, 8))
        i64 = functools.partial(ir.Constant, _I64)
        i8p = _I8.as_pointer()
        load = _fn(builder, "llvm.x86.tileloadd64.internal", AMX_TILE, [_I16, _I16, i8p, _I64])
        store = _fn(builder, "llvm.x86.tilestored64.internal", ir.VoidType(), [_I16, _I16, i8p, _I64, AMX_TILE])
        tzero = _fn(builder, "llvm.x86.tilezero.internal", AMX_TILE, [_I16, _I16])
        dp = _fn(builder, "llvm.x86.tdpbssd.internal", AMX_TILE, [_I16, _I16, _I16, AMX_TILE, AMX_TILE, AMX_TILE])
        r16, c64b = ir.Constant(_I16, 16), ir.Constant(_I16, 64)
        _, ksteps, _, _ = cgutils.unpack_tuple(builder, xa_.shape, 4)
        kk = builder.mul(ksteps, i64(64))
        _, ngroups, _ = cgutils.unpack_tuple(builder, sa.shape, 3)
        _, nb_all = cgutils.unpack_tuple(builder, ma.shape, 2)
        _, ncols = cgutils.unpack_tuple(builder, oa.shape, 2)
        qrows = builder.sdiv(kk, i64(4))  # B rows of a strip
        nrb = builder.sdiv(builder.add(mm, i64(R - 1)), i64(R))
        lanes0 = ir.Constant(vi, [0] * 16)
        eight = ir.Constant(vi, [8] * 16)

        def splat(v, ty):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(ty, ir.Undefined), v,
                                                                 ir.Constant(_I32, 0)),
                                          ir.Constant(ty, ir.Undefined), lanes0)

        blocks = cgutils.for_range(builder, nb_all)
        b = blocks.__enter__().index
        k0 = builder.mul(b, i64(64 * ns))
        g = builder.sdiv(b, nbbv)
        prow = builder.mul(builder.add(builder.mul(tt, ngroups), g), i64(NT))
        svs = [builder.load(builder.bitcast(builder.gep(sa.data, [builder.add(prow, i64(16 * s))]), vf.as_pointer()),
                            align=4) for s in range(4)]
        def flush(rbv):  # the sums of row block rbv (stored in cbuf) into out, row by row
            nr = builder.sub(mm, builder.mul(rbv, i64(R)))
            nr = builder.select(builder.icmp_signed("<", nr, i64(R)), nr, i64(R))
            with cgutils.for_range(builder, nr) as rows_loop:
                i = rows_loop.index
                m = builder.add(builder.mul(rbv, i64(R)), i)
                mb = builder.add(builder.mul(m, nb_all), b)
                mult = splat(builder.load(builder.gep(ma.data, [mb])), vf)
                orow = builder.gep(oa.data, [builder.add(builder.mul(m, ncols), builder.mul(tt, i64(NT)))])
                for s in range(4):
                    def crow(p):  # tile row p R + i of strip s: plane p of row i
                        off = builder.add(i64(256 * s), builder.mul(builder.add(i64(p * R), i), i64(16)))
                        return builder.load(builder.bitcast(builder.gep(ca.data, [off]), vi.as_pointer()), align=4)

                    if P == 2:
                        f = builder.sitofp(builder.add(builder.shl(crow(0), eight), crow(1)), vf)
                    else:
                        lo = builder.add(builder.shl(crow(1), eight), crow(2))
                        f = builder.fadd(builder.fmul(builder.sitofp(crow(0), vf), ir.Constant(vf, [65536.0] * 16)),
                                         builder.sitofp(lo, vf))
                    op = builder.bitcast(builder.gep(orow, [i64(16 * s)]), vf.as_pointer())
                    builder.store(builder.fadd(builder.load(op, align=4), builder.fmul(f, builder.fmul(mult, svs[s]))),
                                  op, align=4)

        # each row block's tiles, then its sums (combining the previous block's sums while the next block's tiles
        # ran, from the other half of a double buffer, took 2.0-2.2 ms against 1.35: 2048x2048 bfloat16, 128 rows)
        with cgutils.for_range(builder, nrb) as rbloop:
            rbv = rbloop.index
            abase = builder.mul(rbv, builder.mul(kk, i64(16)))  # the row block's K/64 tiles of 1 KB
            cs = [builder.call(tzero, [r16, c64b]) for _ in range(4)]
            for st in range(ns):
                kk0 = builder.add(k0, i64(64 * st))
                at = builder.gep(xa_.data, [builder.add(abase, builder.mul(kk0, i64(16)))])
                a = builder.call(load, [r16, c64b, at, i64(64)])
                for pair in ((0, 1), (2, 3)):  # two B tiles loaded before their products: no wait on one register
                    bts = []
                    for s in pair:
                        brow = builder.add(builder.mul(i64(s), qrows), builder.sdiv(kk0, i64(4)))
                        bts.append(builder.call(load, [r16, c64b, builder.gep(ba.data, [builder.mul(brow, i64(64))]),
                                                       i64(64)]))
                    for s, bt in zip(pair, bts):
                        cs[s] = builder.call(dp, [r16, c64b, c64b, cs[s], a, bt])
            for s in range(4):
                cp = builder.gep(ca.data, [i64(256 * s)])
                builder.call(store, [r16, c64b, builder.bitcast(cp, i8p), i64(64), cs[s]])
            flush(rbv)
        blocks.__exit__(None, None, None)
        return context.get_dummy_value()

    sig = types.void(xa, bbuf, cbuf, t, M, scale, xm, out, nbb, steps, parts)
    return sig, codegen


@njit(inline="always")
def _tile_rows(xa, bbuf, cbuf, t, M, scale, xm, out, nbb, steps, parts):  # pragma: no cover - compiled
    for m in range(M):
        for c in range(NT):
            out[m, t * NT + c] = 0
    _tile_blocks(xa, bbuf, cbuf, t, M, scale, xm, out, nbb, steps, parts)


@_cached
@njit(cache=True, nogil=True)
def _amx_range(w, xa, M, parts, scale, zp, xm, out, bsize, t0, t1):  # pragma: no cover - compiled
    K = w.shape[1] * 8
    G = scale.shape[1]
    nbb = K // G // bsize
    bbuf = np.empty((4, K // 4, 64), np.int8)
    cbuf = np.empty(4 * 256, np.int32)
    for t in range(t0, t1):
        _unpack(w, t, zp, G, bbuf)
        if bsize == 64:
            if parts == 2:
                _tile_rows(xa, bbuf, cbuf, t, M, scale, xm, out, nbb, 1, 2)
            else:
                _tile_rows(xa, bbuf, cbuf, t, M, scale, xm, out, nbb, 1, 3)
        elif parts == 2:
            _tile_rows(xa, bbuf, cbuf, t, M, scale, xm, out, nbb, 2, 2)
        else:
            _tile_rows(xa, bbuf, cbuf, t, M, scale, xm, out, nbb, 2, 3)


@njit(inline="always")
def _split_rows(x, kind, bsize, parts, xa, xm, xs, rb0, rb1):  # pragma: no cover - compiled
    # the planes of rows rb0 * R .. rb1 * R as A tiles of 1 KB (plane p of row i: tile row p R + i; the rows of no
    # row are zero): rows of K bytes a tile row apart put 16 rows of a step in two sets of L1, which evicted them
    M, K = x.shape
    R = 16 // parts
    P = 14 if parts == 2 else 22
    xq = np.empty((parts, K), np.int8)
    for rb in range(rb0, rb1):
        n = min(R, M - rb * R)
        for i in range(n):
            m = rb * R + i
            if kind == 0:
                ok = _split_row(x[m], bsize, P, parts, xq, xm[m], xs[m])
            else:
                ok = _split_bits(x[m], kind, bsize, P, parts, xq, xm[m], xs[m])
            if not ok:
                return 1
            for p in range(parts):
                src = xq[p]
                for c in range(K // 64):
                    dst = xa[rb, c, p * R + i]
                    for j in range(64):  # (from 0: a loop LLVM vectorises)
                        dst[j] = src[64 * c + j]
        for r in range(16):
            if r % R >= n or r >= parts * R:
                xa[rb, :, r, :] = 0
    return 0


OPERANDS = _omp.Operands("vnni_amx", M=_omp.I64, K=_omp.I64, T=_omp.I64, meta=_omp.I64, x=_omp.ADDR, xa=_omp.ADDR,
                         xm=_omp.ADDR, xs=_omp.ADDR, w=_omp.ADDR, scale=_omp.ADDR, zp=_omp.ADDR, out=_omp.ADDR)
_read = OPERANDS.read


@njit(inline="always")
def _views(o):  # pragma: no cover - compiled
    M, K, T, m = o.M, o.K, o.T, o.meta
    gsize, bsize, parts, xkind, phase = m & 0xFFFFFF, (m >> 24) & 0xFF, (m >> 32) & 0xF, (m >> 41) & 3, m >> 48
    R = 16 // parts
    nrb = (M + R - 1) // R
    nb = K // bsize
    xa = carray(o.xa, (nrb, K // 64, 16, 64), np.int8)
    xm = carray(o.xm, (M, nb), np.float32)
    xs = carray(o.xs, (M, nb, 2), np.int32)
    return M, K, T, gsize, bsize, parts, xkind, phase, xa, xm, xs


@njit(inline="always")
def _chunk(o, i, c0, c1, _a, _b):  # pragma: no cover - compiled; phase 0: row blocks c0..c1; phase 1: tiles
    M, K, T, gsize, bsize, parts, xkind, phase, xa, xm, xs = _views(o)
    if phase == 0:
        if xkind == 0:
            return _split_rows(carray(o.x, (M, K), np.float32), 0, bsize, parts, xa, xm, xs, c0, c1)
        return _split_rows(carray(o.x, (M, K), np.uint16), xkind, bsize, parts, xa, xm, xs, c0, c1)
    G = K // gsize
    zrows = G if (o.meta >> 40) & 1 else 0
    _amx_range(carray(o.w, (T, K // 8, NT), np.uint32), xa, M, parts, carray(o.scale, (T, G, NT), np.float32),
               carray(o.zp, (T, G, NT) if zrows else (0, 0, 0), np.uint8), xm, carray(o.out, (M, T * NT), np.float32),
               bsize, c0, c1)
    return 0


def _team(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _chunk, 0, 0)


_TEAM = _omp.TeamKernel(_team)


def _serial(block, lo, hi) -> None:
    _TEAM.ctypes()(block.ctypes.data)


_SCRATCH = threading.local()


def scratch(name: str, n: int, dtype) -> np.ndarray:
    """The calling thread's array ``name`` of at least ``n`` elements of ``dtype`` (its first ``n``, starting on a
    64-byte line), kept across calls: a fresh one per call met its pages for the first time (a 128-row call of a
    2048x2048 layer spent about 0.3 ms of 1.8 in page faults of its planes and its float32 output)."""
    cache = getattr(_SCRATCH, "arrays", None)
    if cache is None:
        cache = _SCRATCH.arrays = {}
    a = cache.get(name)
    if a is None or a.size < n or a.dtype != dtype:  # on a 64-byte line: AMX tile rows load whole lines
        a = cache[name] = amx.on_lines(max(n, 1024), dtype)
    return a[:n]


def run(x: np.ndarray, xkind: int, w: np.ndarray, scale: np.ndarray, zp: np.ndarray, gsize: int,
        out: np.ndarray) -> bool:
    """``out = x @ W.T`` (float32 ``[M, N]``) for ``x`` ``[M, K]`` (float32, or the uint16 bits of bfloat16 /
    float16 values for ``xkind`` 1 / 2) and the layout's arrays (as :func:`qtorch.vnni.gemv_vnni` takes them, ``zp``
    ``[0, 0, 0]`` for symmetric codes; not checked here), on torch's thread team: the rows' planes first (row
    blocks in parallel), then the tiles. False (``out`` unwritten) where ``x`` holds a NaN or an infinity."""
    M, K = x.shape
    T = w.shape[0]
    parts = 3 if xkind == 0 else 2
    R = 16 // parts
    nrb = -(-M // R)
    bsize = block_size(gsize)
    nb = K // bsize
    xa = scratch("xa", nrb * K * 16, np.int8).reshape(nrb, K // 64, 16, 64)
    xm = scratch("xm", M * nb, np.float32).reshape(M, nb)
    xs = scratch("xs", M * nb * 2, np.int32).reshape(M, nb, 2)
    base = meta(gsize, bsize, parts, 0, zp.shape[0] > 0, xkind)
    for phase, n in ((0, nrb), (1, T)):
        block = _omp.new_block(n, n, OPERANDS.pack(M=M, K=K, T=T, meta=base | phase << 48, x=x, xa=xa, xm=xm,
                                                   xs=xs, w=w, scale=scale, zp=zp, out=out))
        _omp.run(n, _TEAM, block, _serial, (block,), n, 1, nchunks=n)
        if phase == 0 and block[_omp.HEADER:_omp.HEADER + n].any():
            return False
    return True
