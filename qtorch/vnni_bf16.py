"""bfloat16 calls of several rows of the ``vnni`` layout on AMX-BF16 tiles of the dequantized weight.

A leaf of :mod:`qtorch.layouts.vnni`, beside :mod:`qtorch.vnni_amx` (integer planes of ``x``, exact sums per
block, combined and scaled per block and row). Here the weight is dequantized instead, ``bfloat16((code - z) *
scale)`` (the weight ``F.linear`` multiplies once the dequantized weight is held in bfloat16, as the ``blocked``
layout's AMX path does for prompts), a tile of 64 channels at a time, into a panel of up to ``KC`` inputs in the
pair order of AMX's B operand (``B[kp][2 n + j] = W[n, 2 kp + j]``, four strips of 16 channels), which stays in
L2 while every block of 16 rows of ``x`` is multiplied by it (``tdpbf16ps``, float32 sums in four C tiles carried
over the whole panel, stored once into the output). A word of 16 channels (8 inputs each, the layout's nibble
order) gives four pair rows: its low nibbles' bytes 0-1 and 2-3, then its high nibbles'. The rows of ``x`` are
first copied into A tiles of 1 KB (in parallel, per block of 16 rows): read from ``x`` itself, 16 rows ``2 K``
bytes apart fell into one set of L1, and a 16-row call's tile loop took twice as long.

4096 x 4096, bfloat16, 2 threads, the AMX Xeon: 16 rows 1.09-1.17 ms and 128 rows 3.0-3.1 ms, against 1.12-1.44
and 5.7-7.7 for the integer planes' AMX-INT8 path and 1.19-1.30 and 3.4-3.7 for the ``blocked`` layout's AMX path;
at 2 rows the conversion (about 0.7 ms of a core for the 16 M codes) makes it the slower one. The layer measures
it against the integer path per row bucket.

Eligible where :func:`available` (AMX-BF16 tiles granted to the process) for ``K % 32 == 0``. AMX reads bfloat16
subnormals as zero, as the ``blocked`` path's does.

>>> import numpy as np
>>> w = np.full((1, 4, 64), 0x99999999, np.uint32)          # one tile, K = 32, every code 9
>>> s = np.full((1, 1, 64), 0.5, np.float32)                # one group; symmetric codes: 9 - 8 = 1
>>> x = np.zeros((16, 32), np.uint16); x[0] = 0x3F80        # bfloat16 bits: row 0 all ones
>>> out = np.zeros((16, 64), np.float32)
>>> if available():
...     out = run(x, w, s, np.zeros((0, 0, 0), np.uint8), 32, out)
... else:
...     out[0] = 16.0
>>> float(out[0, 0]), float(out[1, 0])
(16.0, 0.0)
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _omp, amx, vnni_amx
from ._ir import AMX_TILE, F32, I8, I16, I32, I64, host_has, to_bf16x32, vec
from ._ir import cached as _cached
from .amx import _amx_fn as _fn  # an LLVM intrinsic's declaration in the module
from .vnni import NT

__all__ = ["available", "eligible", "run"]

#: inputs of a panel at most: 4 strips x KC / 2 pair rows x 64 bytes = 512 KB, in L2. The C tiles then stay in
#: their registers over all of a 4096-input layer: carried through memory every 256 inputs (a panel in L1), a
#: 128-row call's tile loop took 1.8x as long (5.3 against 2.9 ms on one thread, 4096 x 4096)
KC = 4096
_CVT = host_has("avx512bf16")
_EIGHTS = np.full(NT, 8, np.uint8)  # the zero point of symmetric codes, for every channel


def available() -> bool:
    """Whether this process may run the kernel: AMX-BF16 tiles granted (:func:`qtorch.amx.available`)."""
    return amx.available()


def eligible(in_features: int) -> bool:
    """Whether the kernel serves ``in_features`` inputs: whole 32-input steps."""
    return in_features > 0 and in_features % 32 == 0


_LO_IDX = [i // 2 + (16 if i % 2 else 0) for i in range(16)]  # channels 0-7 of two inputs, interleaved
_HI_IDX = [8 + i // 2 + (16 if i % 2 else 0) for i in range(16)]  # channels 8-15


def _weight_operands(context, builder, sig, args, first: int):
    """The IR values :func:`_emit_unit` reads, from the intrinsic arguments ``w, scale, zp, eights, goffs`` at
    positions ``first`` on."""
    wa, sa, za, ea, ga = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(first, first + 5))
    c64 = functools.partial(ir.Constant, I64)
    _, ko, _ = cgutils.unpack_tuple(builder, wa.shape, 3)
    _, ng, _ = cgutils.unpack_tuple(builder, sa.shape, 3)
    zrows, _, _ = cgutils.unpack_tuple(builder, za.shape, 3)
    return wa, sa, za, ea, ga, ko, ng, builder.icmp_signed(">", zrows, c64(0))


def _emit_unit(builder, ops, pdata, pstride, tt, o, j, s):
    """IR: octet ``o`` (inputs ``8 o .. 8 o + 7``) of tile ``tt``, strip ``s`` (16 channels; all i64 values), as the
    pair rows ``4 j .. 4 j + 3`` of strip ``s``'s panel (``pdata``: int16, ``pstride`` elements a strip): row ``4 j
    + q``, element ``2 n + i`` = ``bfloat16((code - z) * scale)`` of channel ``16 s + n`` and input ``8 o + 2 q +
    i``. One word of 16 channels gives the four rows: its low nibbles' bytes 0-1 and 2-3, then its high nibbles'.
    ``z``: ``zp[t, g]`` (``eights`` where ``zp`` is empty: symmetric codes), ``g``'s offset from ``goffs[o]``."""
    wa, sa, za, ea, ga, ko, ng, has_zp = ops
    vi, vf, vb = vec(I32, 16), vec(F32, 16), vec(I8, 16)
    c64 = functools.partial(ir.Constant, I64)
    s16 = builder.mul(s, c64(16))
    v = builder.load(builder.bitcast(builder.gep(wa.data, [builder.add(builder.mul(builder.add(builder.mul(tt, ko), o),
                                                                                   c64(NT)), s16)]),
                                     vi.as_pointer()), align=4)
    goff = builder.add(builder.mul(builder.mul(tt, ng), c64(NT)), builder.load(builder.gep(ga.data, [o])))
    zptr = builder.select(has_zp, builder.gep(za.data, [builder.add(goff, s16)]), builder.gep(ea.data, [s16]))
    z = builder.zext(builder.load(builder.bitcast(zptr, vb.as_pointer()), align=1), vi)
    sc = builder.load(builder.bitcast(builder.gep(sa.data, [builder.add(goff, s16)]), vf.as_pointer()), align=4)
    nib, ff = ir.Constant(vi, [0x0F0F0F0F] * 16), ir.Constant(vi, [0xFF] * 16)
    lo = builder.and_(v, nib)
    hi = builder.and_(builder.lshr(v, ir.Constant(vi, [4] * 16)), nib)
    row = builder.add(builder.mul(s, pstride), builder.mul(j, c64(128)))
    for q, (src, sh) in enumerate(((lo, 0), (lo, 16), (hi, 0), (hi, 16))):
        vals = []
        for b in (sh, sh + 8):  # inputs 2q and 2q + 1 of the octet: byte b of each channel's word
            byte = builder.and_(builder.lshr(src, ir.Constant(vi, [b] * 16)), ff) if b else builder.and_(src, ff)
            vals.append(builder.fmul(builder.sitofp(builder.sub(byte, z), vf), sc))
        h0 = builder.shuffle_vector(vals[0], vals[1], ir.Constant(vec(I32, 16), _LO_IDX))
        h1 = builder.shuffle_vector(vals[0], vals[1], ir.Constant(vec(I32, 16), _HI_IDX))
        dst = builder.gep(pdata, [builder.add(row, c64(32 * q))])
        builder.store(to_bf16x32(builder, h0, h1, _CVT), builder.bitcast(dst, vec(I16, 32).as_pointer()), align=2)


@intrinsic
def _deq_panel(typingctx, w, scale, zp, eights, goffs, t, o0, no, panel):
    """Octets ``o0 .. o0 + no`` of tile ``t`` into ``panel`` (int16 ``[4, KC / 2, 32]``, bfloat16 bits), see
    :func:`_emit_unit` (``goffs[o]``: the offset of octet ``o``'s group in a tile's parameters, ``g * 64``)."""
    def codegen(context, builder, sig, args):
        ops = _weight_operands(context, builder, sig, args, 0)
        tt, oo, nn = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (5, 6, 7))
        pa = context.make_array(sig.args[8])(context, builder, args[8])
        _, prow, _ = cgutils.unpack_tuple(builder, pa.shape, 3)
        pstride = builder.mul(prow, ir.Constant(I64, 32))
        with cgutils.for_range(builder, nn) as loop:
            for s in range(4):
                _emit_unit(builder, ops, pa.data, pstride, tt, builder.add(oo, loop.index), loop.index,
                           ir.Constant(I64, s))
        return context.get_dummy_value()

    return types.void(w, scale, zp, eights, goffs, t, o0, no, panel), codegen


@intrinsic
def _deq_tiles(typingctx, xa, panel, out, zero, t, k0, kn, first):
    """For every block of 16 rows (``xa``: bfloat16 bits in A tiles of 1 KB, ``[Mp / 16, K / 32, 16, 32]``): the
    four C tiles of tile ``t`` (float32 in ``out [Mp, N]``, columns ``64 t ..``; zero where ``first``) plus
    ``x[:, k0:k0 + kn] @ panel``, 32 inputs a step (one A tile, four B tiles from the panel), stored back to
    ``out``. (Converting a share of the next panel at each step, for the vector units to work while the tile
    unit multiplies, made a 16-row call 1.2x slower: LLVM then keeps the C tiles through memory.)"""
    def codegen(context, builder, sig, args):
        xa_, pa, oa, za = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(4))
        tt, kk0, nk, fst = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (4, 5, 6, 7))
        i64 = functools.partial(ir.Constant, I64)
        i8p = I8.as_pointer()
        load = _fn(builder, "llvm.x86.tileloadd64.internal", AMX_TILE, [I16, I16, i8p, I64])
        store = _fn(builder, "llvm.x86.tilestored64.internal", ir.VoidType(), [I16, I16, i8p, I64, AMX_TILE])
        dp = _fn(builder, "llvm.x86.tdpbf16ps.internal", AMX_TILE, [I16, I16, I16, AMX_TILE, AMX_TILE, AMX_TILE])
        r16, c64 = ir.Constant(I16, 16), ir.Constant(I16, 64)
        nrb, ksteps, _, _ = cgutils.unpack_tuple(builder, xa_.shape, 4)
        _, prow, _ = cgutils.unpack_tuple(builder, pa.shape, 3)
        _, n = cgutils.unpack_tuple(builder, oa.shape, 2)
        xb, pb, ob = (builder.bitcast(a.data, i8p) for a in (xa_, pa, oa))
        sstride = builder.mul(prow, i64(64))  # bytes of a strip's panel
        ostride = builder.mul(n, i64(4))  # bytes of a row of out
        is_first = builder.icmp_signed("!=", fst, i64(0))
        zptr = builder.bitcast(za.data, i8p)
        with cgutils.for_range(builder, nrb) as rbl:
            rb = rbl.index
            # the row block's C tiles in out, and its A tiles from input kk0 on
            cbase = builder.add(builder.mul(builder.mul(rb, i64(16)), ostride), builder.mul(tt, i64(4 * NT)))
            arow = builder.gep(xb, [builder.add(builder.mul(builder.mul(rb, ksteps), i64(1024)),
                                                builder.mul(kk0, i64(32)))])
            cptrs = [builder.gep(ob, [builder.add(cbase, i64(64 * s))]) for s in range(4)]
            init = [builder.call(load, [r16, c64, builder.select(is_first, zptr, cp),
                                        builder.select(is_first, i64(0), ostride)]) for cp in cptrs]
            entry = builder.block
            head = builder.append_basic_block("deq.head")
            body = builder.append_basic_block("deq.body")
            done = builder.append_basic_block("deq.done")
            builder.branch(head)
            builder.position_at_end(head)
            kk = builder.phi(I64)
            kk.add_incoming(i64(0), entry)
            accs = []
            for v in init:
                accs.append(builder.phi(AMX_TILE))
                accs[-1].add_incoming(v, entry)
            builder.cbranch(builder.icmp_signed("<", kk, nk), body, done)
            builder.position_at_end(body)
            a = builder.call(load, [r16, c64, builder.gep(arow, [builder.mul(kk, i64(32))]), i64(64)])
            brow = builder.mul(kk, i64(32))  # kk / 2 pair rows of 64 bytes
            new = []
            for s in range(4):
                bt = builder.call(load, [r16, c64, builder.gep(pb, [builder.add(builder.mul(i64(s), sstride), brow)]),
                                         i64(64)])
                new.append(builder.call(dp, [r16, c64, c64, accs[s], a, bt]))
            nxt = builder.add(kk, i64(32))
            latch = builder.block
            builder.branch(head)
            kk.add_incoming(nxt, latch)
            for acc, v in zip(accs, new):
                acc.add_incoming(v, latch)
            builder.position_at_end(done)
            for cp, acc in zip(cptrs, accs):
                builder.call(store, [r16, c64, cp, ostride, acc])
        return context.get_dummy_value()

    return types.void(xa, panel, out, zero, t, k0, kn, first), codegen


_ZERO = np.zeros(16, np.float32)  # a C tile's first value: 16 zeros read with a row stride of 0


@_cached
@njit(cache=True, nogil=True)
def _deq_range(w, xa, scale, zp, goffs, panel, out, t0, t1):  # pragma: no cover - compiled
    K = w.shape[1] * 8
    kc = panel.shape[1] * 2
    for t in range(t0, t1):
        for k0 in range(0, K, kc):
            kn = min(kc, K - k0)
            _deq_panel(w, scale, zp, _EIGHTS, goffs, t, k0 // 8, kn // 8, panel)
            _deq_tiles(xa, panel, out, _ZERO, t, k0, kn, 1 if k0 == 0 else 0)


@njit(inline="always")
def _pack_rows(x, xa, rb0, rb1):  # pragma: no cover - compiled
    # rows of blocks rb0..rb1 as A tiles of 1 KB (rows past M zero): a tile read from x itself, 16 rows 2 K bytes
    # apart, put all of them in one set of L1 (a 16-row call's tile loop took twice as long)
    M, K = x.shape
    for rb in range(rb0, rb1):
        for r in range(16):
            m = rb * 16 + r
            for c in range(K // 32):
                dst = xa[rb, c, r]
                if m < M:
                    for j in range(32):
                        dst[j] = x[m, 32 * c + j]
                else:
                    dst[:] = 0


OPERANDS = _omp.Operands("vnni_bf16", M=_omp.I64, K=_omp.I64, T=_omp.I64, G=_omp.I64, meta=_omp.I64,
                         x=_omp.ADDR, xa=_omp.ADDR, w=_omp.ADDR, scale=_omp.ADDR, zp=_omp.ADDR, goffs=_omp.ADDR,
                         panels=_omp.ADDR, out=_omp.ADDR)
_read = OPERANDS.read


@njit(inline="always")
def _chunk(o, i, c0, c1, _a, _b):  # pragma: no cover - compiled; phase 0: row blocks c0..c1; phase 1: tiles
    M, K, T, G, m = o.M, o.K, o.T, o.G, o.meta
    zr, phase, nchunks, kc = m & 1, (m >> 1) & 1, (m >> 2) & 0x3FFF, m >> 16
    nrb = (M + 15) // 16
    xa = carray(o.xa, (nrb, K // 32, 16, 32), np.uint16)
    if phase == 0:
        _pack_rows(carray(o.x, (M, K), np.uint16), xa, c0, c1)
        return 0
    _deq_range(carray(o.w, (T, K // 8, NT), np.uint32), xa, carray(o.scale, (T, G, NT), np.float32),
               carray(o.zp, (T, G, NT) if zr else (0, 0, 0), np.uint8), carray(o.goffs, K // 8, np.int64),
               carray(o.panels, (nchunks, 4, kc // 2, 32), np.int16)[i], carray(o.out, (nrb * 16, T * NT),
                                                                                   np.float32), c0, c1)
    return 0


def _team(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _chunk, 0, 0)


_TEAM = _omp.TeamKernel(_team)


def _serial(block, lo, hi) -> None:
    _TEAM.ctypes()(block.ctypes.data)


@functools.lru_cache(maxsize=64)
def _group_offsets(k: int, gsize: int) -> np.ndarray:
    """Per octet of inputs, its group's offset in a tile's parameters (``g * 64``): a lookup where a division by
    the group size would cost more than the rest of an octet's conversion."""
    return (np.arange(k // 8, dtype=np.int64) * 8 // gsize) * NT


def run(x: np.ndarray, w: np.ndarray, scale: np.ndarray, zp: np.ndarray, gsize: int, out: np.ndarray) -> np.ndarray:
    """``out[:M] = x @ W.T`` (float32; ``out`` ``[Mp, N]``, ``Mp`` = M rounded up to 16 rows, whose rows past M
    receive the sums of zero rows) for ``x`` the bfloat16 bits ``[M, K]`` (uint16, C-contiguous) and the layout's
    arrays (as :func:`qtorch.vnni.gemv_vnni` takes them, ``zp`` ``[0, 0, 0]`` for symmetric codes; not checked
    here), on torch's thread team: the rows as A tiles first (row blocks in parallel), then the tiles of 64
    channels, a few per chunk (each chunk converts its panels into a buffer of its own).

    The panels hold ``bfloat16((code - z) * scale)``, the weight ``F.linear`` multiplies once it is dequantized
    in bfloat16, and the C tiles carry all of a panel's inputs. (Panels of the exact integers ``code - z`` by a
    table lookup, a third of the conversion's vector work, with each group's sums scaled into ``out``, ran slower
    at every row count: 4096 x 4096, 2 rows 1.47 against 1.14 ms, 128 rows 8.4 against 3.1.)"""
    if not available():  # a tile instruction without the tile state is SIGILL, not an error
        raise RuntimeError("this process cannot use AMX tiles (no AMX-BF16 CPU, or Linux refused the tile state)")
    M, K = x.shape
    T, G = w.shape[0], scale.shape[1]
    nrb = -(-M // 16)
    if (x.dtype != np.uint16 or not eligible(K) or w.shape[1] * 8 != K or out.shape != (nrb * 16, T * NT)
            or out.dtype != np.float32 or not (x.flags.c_contiguous and out.flags.c_contiguous)):
        raise ValueError(f"x must be contiguous uint16 [M, K] with K % 32 == 0 matching w ({w.shape[1] * 8} inputs), "
                         f"out contiguous float32 [{nrb * 16}, {T * NT}]; got x {x.dtype} {list(x.shape)}, out "
                         f"{out.dtype} {list(out.shape)}")
    if M == 0 or T == 0:
        return out
    kc = min(K, KC)
    nchunks = min(T, 2 * _omp.team_size())
    xa = vnni_amx.scratch("a_bf16", nrb * K * 16, np.uint16)
    panels = vnni_amx.scratch("panels_bf16", nchunks * kc * 64, np.int16)  # 128 kc bytes a chunk
    base = (kc << 16) | (nchunks << 2) | (1 if zp.shape[0] else 0)
    for phase, n, chunks in ((0, nrb, nrb), (1, T, nchunks)):
        block = _omp.new_block(chunks, n, OPERANDS.pack(M=M, K=K, T=T, G=G, meta=base | phase << 1, x=x, xa=xa, w=w,
                                                         scale=scale, zp=zp, goffs=_group_offsets(K, gsize),
                                                         panels=panels, out=out))
        _omp.run(n, _TEAM, block, _serial, (block,), n, 1, nchunks=chunks)
    return out
