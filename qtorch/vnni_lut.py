"""bfloat16 calls of a few rows of the ``vnni`` layout on AMX-BF16 tiles whose rows are the weight's channels,
each 32 codes looked up in one instruction, a step ahead of the tile unit.

A leaf of :mod:`qtorch.layouts.vnni`, beside :mod:`qtorch.vnni_bf16` (which puts the weight in the B tiles: 16
channels a register, each code converted and scaled on its own, about 0.7 ms of a core for 16 M codes). Here the
product is computed transposed, ``C^T[n, m] = sum_k W[n, k] x[m, k]``: an A tile row is one channel's 32 inputs of
one step, all in one group, so one ``vpermw`` looks 32 codes up in that channel's table of 16 bfloat16 values,
``bfloat16((q - z) * scale)`` for ``q`` = 0..15 (the weight ``F.linear`` multiplies once the dequantized weight is
held in bfloat16; two channels' tables share a register, the lane's half choosing). The layout's words hold 8
inputs of one channel and a 64-byte row of them 16 channels: a 4 x 4 transpose of 32-bit words within 128-bit
lanes gives each channel's 4 words of a step (16 bytes, 32 codes), in the order the B tiles of ``x`` follow
(:data:`PAIRS`). Per tile of 64 channels and pair of blocks of 16 rows of ``x`` (two strips of 16 channels a
pass: each A tile serves two products; a last single block takes all four strips), each step of 32 inputs
converts the next step's A tiles into a ring of two while the tile unit multiplies this one's (``tdpbf16ps``,
float32 sums in four C tiles carried over all of K), then the C tiles are transposed into the output. Calls of
more than two row blocks go by groups of up to :data:`GROUP_BLOCKS` blocks (:func:`_tiles_grouped`): each pair of
strips converted once, a panel of :data:`PANEL_STEPS` steps at a time, then multiplied by every pair of the
group's blocks, their C tiles carried between panels in L1 (the conversion, not the tile unit, bounds these calls).
The layer times this path against ``vnni_bf16`` and ``vnni_mm`` per row bucket.

4096 x 4096 in groups of 128, 2 threads, the AMX Xeon, alternating in one process: 16 rows 0.42-0.48 ms against
``vnni_bf16``'s 0.91-0.99, 32 rows 0.56-0.57 against 0.97-1.00; 128 rows 1.56-1.74 against 2.05-2.30 converting
per pair of blocks (and ``vnni_bf16``'s 2.13-2.26 in an earlier session).

Eligible where :func:`available` for ``K % 32 == 0`` and groups of a multiple of 32 inputs (or one group a
channel). AMX reads bfloat16 subnormals as zero, as the other AMX paths do.

>>> import numpy as np
>>> w = np.full((1, 4, 64), 0x99999999, np.uint32)          # one tile, K = 32, every code 9
>>> s = np.full((1, 1, 64), 0.5, np.float32)                # one group; symmetric codes: 9 - 8 = 1
>>> x = np.zeros((2, 32), np.uint16); x[0] = 0x3F80         # bfloat16 bits: a row of ones, a row of zeros
>>> out = np.zeros((2, 64), np.float32)
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
from ._ir import AMX_TILE, F32, I8, I16, I32, I64, host_has, prefetch_l2, to_bf16x32, vec
from ._ir import cached as _cached
from .amx import _amx_fn as _fn  # an LLVM intrinsic's declaration in the module
from .vnni import NT

__all__ = ["available", "eligible", "run"]

_CVT = host_has("avx512bf16")
_BW = host_has("avx512bw")  # vpermw
_EIGHTS = np.full(NT, 8, np.uint8)  # the zero point of symmetric codes, for every channel


def available() -> bool:
    """Whether this process may run the kernel: AMX-BF16 tiles granted (:func:`qtorch.amx.available`) and
    AVX512-BW (the table lookup)."""
    return _BW and amx.available()


def eligible(in_features: int, group_size: int) -> bool:
    """Whether the kernel serves a layer of ``in_features`` inputs in groups of ``group_size``: whole steps of 32
    inputs, each inside one group."""
    return (in_features > 0 and in_features % 32 == 0
            and (group_size >= in_features or group_size > 0 and group_size % 32 == 0))


def _input(e: int) -> int:
    """The input (of a step's 32) that element ``e`` of an A tile row holds: byte ``e % 16`` of the channel's four
    words (word ``o``'s byte ``b``: inputs ``8 o + b`` in its low nibble, ``8 o + 4 + b`` in its high one), low
    nibbles first."""
    b = e % 16
    return 8 * (b // 4) + b % 4 + (4 if e >= 16 else 0)


#: per pair row ``p`` of a B tile (elements ``2 p``, ``2 p + 1``: two consecutive inputs), the pair of inputs of
#: the step it holds, counted in pairs: ``x``'s 32-bit words of the step in this order are the B tile's rows
PAIRS = np.array([_input(2 * p) // 2 for p in range(16)], np.int64)

# the 4 x 4 transpose of 32-bit words within each 128-bit lane: words, then pairs of words, of two registers
_W_LO = [x for l in range(4) for x in (4 * l, 16 + 4 * l, 4 * l + 1, 17 + 4 * l)]
_W_HI = [x for l in range(4) for x in (4 * l + 2, 18 + 4 * l, 4 * l + 3, 19 + 4 * l)]
_P_LO = [x for l in range(4) for x in (4 * l, 4 * l + 1, 16 + 4 * l, 17 + 4 * l)]
_P_HI = [x for l in range(4) for x in (4 * l + 2, 4 * l + 3, 18 + 4 * l, 19 + 4 * l)]


def _transpose_masks() -> list:
    """Masks of a 16 x 16 transpose in four stages of two-register shuffles: at distance ``h`` (8, 4, 2, 1) rows
    ``i`` and ``i + h`` (``i & h == 0``) swap their off-diagonal ``h x h`` blocks."""
    stages = []
    for h in (8, 4, 2, 1):
        lo = [c if c & h == 0 else 16 + c - h for c in range(16)]
        hi = [c + h if c & h == 0 else 16 + c for c in range(16)]
        stages.append((h, lo, hi))
    return stages


_TRANSPOSE = _transpose_masks()


def _emit_tables(builder, ops, g, tabs, strips) -> None:
    """IR: the lookup tables of group ``g`` of the tile's ``strips`` (of 16 channels) into ``tabs`` (int16 pointer,
    32 registers of 32 values): register ``8 s + 2 i + h`` holds channel ``16 s + 8 h + i`` in its low half and
    ``16 s + 8 h + 4 + i`` in its high half, ``bfloat16((q - z) * scale)`` for ``q`` = 0..15."""
    wa, sa, za, ea, has_zp, ko, ng, tt = ops
    c64 = functools.partial(ir.Constant, I64)
    vi, vf, vb, v32s = vec(I32, 16), vec(F32, 16), vec(I8, 16), vec(I16, 32)
    codes = ir.Constant(vf, [float(q) for q in range(16)])
    for s in strips:
        prow = builder.add(builder.mul(builder.add(builder.mul(tt, ng), g), c64(NT)), c64(16 * s))
        zptr = builder.select(has_zp, builder.gep(za.data, [prow]), builder.gep(ea.data, [c64(16 * s)]))
        zf = builder.uitofp(builder.zext(builder.load(builder.bitcast(zptr, vb.as_pointer()), align=1), vi), vf)
        sv = builder.load(builder.bitcast(builder.gep(sa.data, [prow]), vf.as_pointer()), align=4)

        def table(c):
            lane = ir.Constant(vi, [c] * 16)
            z = builder.shuffle_vector(zf, ir.Constant(vf, ir.Undefined), lane)
            sc = builder.shuffle_vector(sv, ir.Constant(vf, ir.Undefined), lane)
            return builder.fmul(builder.fsub(codes, z), sc)  # (q - z) exact, one rounding as dequantize has it

        for i in range(4):
            for h in range(2):
                val = to_bf16x32(builder, table(8 * h + i), table(8 * h + 4 + i), _CVT)
                dst = builder.gep(tabs, [c64(32 * (8 * s + 2 * i + h))])
                builder.store(val, builder.bitcast(dst, v32s.as_pointer()), align=2)


def _emit_step(builder, ops, ks, tabs, dst, strips, pf) -> None:
    """IR: step ``ks`` (inputs ``32 ks ..``) of the tile's ``strips`` as A tiles at ``dst`` (int16 pointer,
    ``[4, 16, 32]``: strip ``s``, row = channel ``16 s + r``, element ``e`` = input :func:`_input` ``(e)``); the
    strips' lines ``pf`` words further on prefetched (a tile's words are one stream, 1 KB a step)."""
    wa, sa, za, ea, has_zp, ko, ng, tt = ops
    c64 = functools.partial(ir.Constant, I64)
    vi, v32s, v16s = vec(I32, 16), vec(I16, 32), vec(I16, 16)
    perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32s, [v32s, v32s]),
                                          "llvm.x86.avx512.permvar.hi.512")
    half_sel = ir.Constant(v32s, [0] * 16 + [16] * 16)  # the high half's lanes read the second table
    nibble, four = ir.Constant(v32s, [15] * 32), ir.Constant(v32s, [4] * 32)
    row0 = builder.mul(builder.add(builder.mul(tt, ko), builder.mul(ks, c64(4))), c64(NT))
    for s in strips:
        for o in range(4):  # a prefetch never faults: past the end of the words is harmless
            prefetch_l2(builder, builder.gep(wa.data, [builder.add(builder.add(row0, pf), c64(NT * o + 16 * s))]))
        words = [builder.load(builder.bitcast(builder.gep(wa.data, [builder.add(row0, c64(NT * o + 16 * s))]),
                                              vi.as_pointer()), align=4) for o in range(4)]
        a0, a1 = (builder.shuffle_vector(words[0], words[1], ir.Constant(vi, m)) for m in (_W_LO, _W_HI))
        a2, a3 = (builder.shuffle_vector(words[2], words[3], ir.Constant(vi, m)) for m in (_W_LO, _W_HI))
        # lane l of chan[i]: channel 4 l + i's four words of the step
        chan = [builder.shuffle_vector(a, b, ir.Constant(vi, m))
                for a, b in ((a0, a2), (a1, a3)) for m in (_P_LO, _P_HI)]
        for i in range(4):
            by = builder.bitcast(chan[i], vec(I8, 64))
            for h in range(2):  # lanes 2 h, 2 h + 1: channels 8 h + i and 8 h + 4 + i
                tab = builder.load(builder.bitcast(builder.gep(tabs, [c64(32 * (8 * s + 2 * i + h))]),
                                                   v32s.as_pointer()), align=2)
                idx = builder.zext(builder.shuffle_vector(by, ir.Constant(vec(I8, 64), ir.Undefined),
                                                          ir.Constant(vec(I32, 32), list(range(32 * h, 32 * h + 32)))),
                                   v32s)
                for nib, src in ((0, builder.and_(idx, nibble)), (1, builder.lshr(idx, four))):
                    val = builder.call(perm, [tab, builder.or_(src, half_sel)])
                    for part, ch in ((0, 8 * h + i), (1, 8 * h + 4 + i)):
                        v = builder.shuffle_vector(val, ir.Constant(v32s, ir.Undefined),
                                                   ir.Constant(vec(I32, 16), list(range(16 * part, 16 * part + 16))))
                        p = builder.gep(dst, [c64(512 * s + 32 * ch + 16 * nib)])
                        builder.store(v, builder.bitcast(p, v16s.as_pointer()), align=2)


def _emit_store_transposed(builder, ct, tiles, out, ostride, m_rows, bf16: bool) -> None:
    """IR: C^T tiles (16 channels x 16 rows of float32) at ``ct`` (float pointer) into ``out`` (pointer to row 0
    of the block, channel 0 of the tile; ``ostride`` elements a row), rows ``0 .. m_rows - 1``; ``tiles``: per
    tile, its offset in ``ct`` (floats) and its first channel, in order of channels, strips of consecutive
    channels. float32, or (``bf16``) the bits of bfloat16 rounded to nearest even, as ``Tensor.to`` rounds."""
    c64 = functools.partial(ir.Constant, I64)
    vf = vec(F32, 16)
    rows = [_transposed(builder, [builder.load(builder.bitcast(builder.gep(ct, [c64(off + 16 * r)]),
                                                               vf.as_pointer()), align=4) for r in range(16)])
            for off, _ in tiles]
    for m in range(16):
        with builder.if_then(builder.icmp_signed("<", c64(m), m_rows)):
            row = builder.gep(out, [builder.mul(c64(m), ostride)])
            if bf16:  # two strips' 32 channels a store
                for j in range(0, len(tiles), 2):
                    val = to_bf16x32(builder, rows[j][m], rows[j + 1][m], False)
                    builder.store(val, builder.bitcast(builder.gep(row, [c64(tiles[j][1])]),
                                                       vec(I16, 32).as_pointer()), align=2)
            else:
                for j, (_, ch) in enumerate(tiles):
                    builder.store(rows[j][m], builder.bitcast(builder.gep(row, [c64(ch)]), vf.as_pointer()), align=4)


def _emit_blocks_out(builder, ct, tiles, strips, nblocks, rb, t, oa, bf16: bool) -> None:
    """IR: the C tiles at ``ct`` (float pointer, tile ``j`` of ``tiles``, ``(strip, block)`` pairs, 1 KB apart)
    transposed into ``oa`` (the output array), rows of blocks ``rb .. rb + nblocks - 1``, channels of the strips
    of tile ``t`` (:func:`_emit_store_transposed`)."""
    i64 = functools.partial(ir.Constant, I64)
    mrows, ncols = cgutils.unpack_tuple(builder, oa.shape, 2)
    for r in range(nblocks):
        block = builder.add(rb, i64(r))
        m_rows = builder.sub(mrows, builder.mul(block, i64(16)))
        base = builder.add(builder.mul(builder.mul(block, i64(16)), ncols), builder.mul(t, i64(NT)))
        mine = [(256 * tiles.index((s, r)), 16 * s) for s in strips]
        _emit_store_transposed(builder, ct, mine, builder.gep(oa.data, [base]), ncols, m_rows, bf16)


@intrinsic
def _tile_pass(typingctx, w, scale, zp, eights, xa, ring, tabs, ct, out, t, rb, gsize, pf, first, nstrips):
    """``out[16 r + m, 64 t + c] = sum_k W[64 t + c, k] x[16 r + m, k]`` for the channels of strips ``first ..
    first + nstrips - 1`` of tile ``t`` (literals: 0 and 4, one row block ``r = rb``; or 0 or 2 and 2, the blocks
    ``rb`` and ``rb + 1``: four C tiles either way, and with two blocks each A tile serves two products), the rows
    of ``out`` (``xa``: the B tiles, uint16 ``[M / 16, K/32, 16, 32]``). The tables and the first step's A tiles,
    then per step the products and the next step's conversion (into the other half of ``ring``, int16 ``[2, 4,
    16, 32]``; ``tabs`` int16 ``[32, 32]``, ``ct`` float32 ``[64, 16]``: scratch; ``pf``: words of the weight
    prefetched ahead)."""
    if not (isinstance(first, types.IntegerLiteral) and isinstance(nstrips, types.IntegerLiteral)):
        return None
    strips = list(range(first.literal_value, first.literal_value + nstrips.literal_value))
    nblocks = 4 // len(strips)
    bf16 = out.dtype == types.uint16

    def codegen(context, builder, sig, args):
        wa, sa, za, ea, xa_, ra, ta, ca, oa = (context.make_array(sig.args[i])(context, builder, args[i])
                                               for i in range(9))
        tt, rbv, gs, pfw = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (9, 10, 11, 12))
        i64 = functools.partial(ir.Constant, I64)
        i8p = I8.as_pointer()
        _, ko, _ = cgutils.unpack_tuple(builder, wa.shape, 3)
        _, ng, _ = cgutils.unpack_tuple(builder, sa.shape, 3)
        zrows, _, _ = cgutils.unpack_tuple(builder, za.shape, 3)
        ops = (wa, sa, za, ea, builder.icmp_signed(">", zrows, i64(0)), ko, ng, tt)
        load = _fn(builder, "llvm.x86.tileloadd64.internal", AMX_TILE, [I16, I16, i8p, I64])
        store = _fn(builder, "llvm.x86.tilestored64.internal", ir.VoidType(), [I16, I16, i8p, I64, AMX_TILE])
        tzero = _fn(builder, "llvm.x86.tilezero.internal", AMX_TILE, [I16, I16])
        dp = _fn(builder, "llvm.x86.tdpbf16ps.internal", AMX_TILE, [I16, I16, I16, AMX_TILE, AMX_TILE, AMX_TILE])
        r16, c64 = ir.Constant(I16, 16), ir.Constant(I16, 64)
        steps = builder.sdiv(ko, i64(4))
        group_steps = builder.sdiv(gs, i64(32))
        xp, rp = builder.bitcast(xa_.data, i8p), builder.bitcast(ra.data, i8p)
        xblock = builder.mul(steps, i64(1024))  # bytes of a row block's B tiles
        _emit_tables(builder, ops, i64(0), ta.data, strips)
        _emit_step(builder, ops, i64(0), ta.data, ra.data, strips, pfw)
        tiles = [(s, r) for r in range(nblocks) for s in strips]
        init = [builder.call(tzero, [r16, c64]) for _ in tiles]
        entry = builder.block
        head, body, nxt, tables, convert, latch, done = (builder.append_basic_block(f"lut.{n}") for n in (
            "head", "body", "next", "tables", "convert", "latch", "done"))
        builder.branch(head)
        builder.position_at_end(head)
        kk = builder.phi(I64)
        kk.add_incoming(i64(0), entry)
        accs = []
        for v in init:
            accs.append(builder.phi(AMX_TILE))
            accs[-1].add_incoming(v, entry)
        builder.cbranch(builder.icmp_signed("<", kk, steps), body, done)
        builder.position_at_end(body)
        slot = builder.and_(kk, i64(1))
        bs = [builder.call(load, [r16, c64, builder.gep(xp, [builder.add(builder.mul(builder.add(rbv, i64(r)), xblock),
                                                                          builder.mul(kk, i64(1024)))]), i64(64)])
              for r in range(nblocks)]
        new = [None] * len(tiles)
        for s in strips:  # the products first: the tile unit runs them while the next step converts
            a = builder.call(load, [r16, c64, builder.gep(rp, [builder.add(builder.mul(slot, i64(4096)),
                                                                          i64(1024 * s))]), i64(64)])
            for r in range(nblocks):
                j = tiles.index((s, r))
                new[j] = builder.call(dp, [r16, c64, c64, accs[j], a, bs[r]])
        k1 = builder.add(kk, i64(1))
        builder.cbranch(builder.icmp_signed("<", k1, steps), nxt, latch)
        builder.position_at_end(nxt)
        builder.cbranch(builder.icmp_signed("==", builder.srem(k1, group_steps), i64(0)), tables, convert)
        builder.position_at_end(tables)
        _emit_tables(builder, ops, builder.sdiv(k1, group_steps), ta.data, strips)
        builder.branch(convert)
        builder.position_at_end(convert)
        _emit_step(builder, ops, k1, ta.data, builder.gep(ra.data, [builder.mul(builder.sub(i64(1), slot),
                                                                               i64(2048))]), strips, pfw)
        builder.branch(latch)
        builder.position_at_end(latch)
        kk.add_incoming(k1, latch)
        for acc, v in zip(accs, new):
            acc.add_incoming(v, latch)
        builder.branch(head)
        builder.position_at_end(done)
        cp = builder.bitcast(ca.data, i8p)
        for j, acc in enumerate(accs):
            builder.call(store, [r16, c64, builder.gep(cp, [i64(1024 * j)]), i64(64), acc])
        _emit_blocks_out(builder, ca.data, tiles, strips, nblocks, rbv, tt, oa, bf16)
        return context.get_dummy_value()

    return types.void(w, scale, zp, eights, xa, ring, tabs, ct, out, t, rb, gsize, pf, first, nstrips), codegen


@njit(inline="always")
def _aligned(n, dtype):  # pragma: no cover - compiled
    raw = np.empty(n + 64, dtype)
    off = (-raw.ctypes.data % 64) // raw.itemsize
    return raw[off:off + n]


@_cached
@njit(cache=True, nogil=True)
def _tiles(w, xa, scale, zp, gsize, pf, out, t0, t1):  # pragma: no cover - compiled
    # the tiles' scratch on 64-byte lines: a tile row across two lines loads both (a 16-row call took 1.3x as long)
    ring = _aligned(2 * 4 * 16 * 32 + 32 * 32, np.int16)
    tabs = ring[2 * 4 * 16 * 32:].reshape((32, 32))
    ring = ring[:2 * 4 * 16 * 32].reshape((2, 4, 16, 32))
    ct = _aligned(64 * 16, np.float32).reshape((64, 16))
    nrb = xa.shape[0]
    for t in range(t0, t1):
        rb = 0
        while rb + 1 < nrb:  # two row blocks a pass: half the conversions, four products per two A tiles
            _tile_pass(w, scale, zp, _EIGHTS, xa, ring, tabs, ct, out, t, rb, gsize, pf, 0, 2)
            _tile_pass(w, scale, zp, _EIGHTS, xa, ring, tabs, ct, out, t, rb, gsize, pf, 2, 2)
            rb += 2
        if rb < nrb:
            _tile_pass(w, scale, zp, _EIGHTS, xa, ring, tabs, ct, out, t, rb, gsize, pf, 0, 4)


#: steps of 32 inputs a panel holds (:func:`_tiles_grouped`): 16 KB of A tiles for two strips, beside the C tiles
#: of a group of row blocks (16 KB) in a 48 KB L1. 4096 x 4096, 128 rows, AMX Xeon: 4, 8 and 16 steps within 5%
#: of each other (32: 1.65 against 1.56-1.62 ms)
PANEL_STEPS = 8
#: row blocks of 16 a group of :func:`_tiles_grouped` at most: its B tiles (1 MB of ``x`` at K = 4096) stay in L2
#: while every tile of the thread passes over them. Without groups 1024 rows of 4096 x 4096 took 25-26 ms, the
#: rows' 8 MB streamed from memory once per strip pair (groups of 8 or 16 blocks: 15.0-15.2; dense 16.2)
GROUP_BLOCKS = 8


@intrinsic
def _panel_convert(typingctx, w, scale, zp, eights, panel, tabs, t, k0, nsteps, gsize, pf, first):
    """Steps ``k0 .. k0 + nsteps - 1`` of strips ``first`` and ``first + 1`` (a literal: 0 or 2) of tile ``t`` as
    A tiles into ``panel`` (int16 ``[steps, 2, 16, 32]``), each group's tables made where a step starts one
    (the steps of a strip pair come in order, so the tables of ``tabs`` hold the current group's)."""
    if not isinstance(first, types.IntegerLiteral):
        return None
    strips = [first.literal_value, first.literal_value + 1]

    def codegen(context, builder, sig, args):
        wa, sa, za, ea, pa, ta = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(6))
        tt, k0v, nv, gs, pfw = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (6, 7, 8, 9, 10))
        i64 = functools.partial(ir.Constant, I64)
        _, ko, _ = cgutils.unpack_tuple(builder, wa.shape, 3)
        _, ng, _ = cgutils.unpack_tuple(builder, sa.shape, 3)
        zrows, _, _ = cgutils.unpack_tuple(builder, za.shape, 3)
        ops = (wa, sa, za, ea, builder.icmp_signed(">", zrows, i64(0)), ko, ng, tt)
        group_steps = builder.sdiv(gs, i64(32))
        with cgutils.for_range(builder, nv) as loop:
            ks = builder.add(k0v, loop.index)
            with builder.if_then(builder.icmp_signed("==", builder.srem(ks, group_steps), i64(0))):
                _emit_tables(builder, ops, builder.sdiv(ks, group_steps), ta.data, strips)
            # _emit_step writes strip s at 512 s elements: the pair's first strip at the step's start
            dst = builder.gep(pa.data, [builder.sub(builder.mul(loop.index, i64(1024)), i64(512 * strips[0]))])
            _emit_step(builder, ops, ks, ta.data, dst, strips, pfw)
        return context.get_dummy_value()

    return types.void(w, scale, zp, eights, panel, tabs, t, k0, nsteps, gsize, pf, first), codegen


@intrinsic
def _panel_products(typingctx, xa, panel, cacc, out, t, rb, k0, nsteps, last, first, nblocks):
    """The products of ``panel`` (``nsteps`` steps from step ``k0`` of strips ``first``, ``first + 1``) with row
    blocks ``rb .. rb + nblocks - 1`` (a literal: 1 or 2) of ``xa``: the C tiles from ``cacc`` (float32 ``[4,
    16, 16]``; zeros where ``k0 == 0``), back into it, and where ``last``, transposed into ``out``."""
    if not (isinstance(first, types.IntegerLiteral) and isinstance(nblocks, types.IntegerLiteral)):
        return None
    strips = [first.literal_value, first.literal_value + 1]
    nb = nblocks.literal_value
    bf16 = out.dtype == types.uint16

    def codegen(context, builder, sig, args):
        xa_, pa, ca, oa = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(4))
        tt, rbv, k0v, nv, lastv = (context.cast(builder, args[i], sig.args[i], types.int64) for i in range(4, 9))
        i64 = functools.partial(ir.Constant, I64)
        i8p = I8.as_pointer()
        _, steps, _, _ = cgutils.unpack_tuple(builder, xa_.shape, 4)
        load = _fn(builder, "llvm.x86.tileloadd64.internal", AMX_TILE, [I16, I16, i8p, I64])
        store = _fn(builder, "llvm.x86.tilestored64.internal", ir.VoidType(), [I16, I16, i8p, I64, AMX_TILE])
        tzero = _fn(builder, "llvm.x86.tilezero.internal", AMX_TILE, [I16, I16])
        dp = _fn(builder, "llvm.x86.tdpbf16ps.internal", AMX_TILE, [I16, I16, I16, AMX_TILE, AMX_TILE, AMX_TILE])
        r16, c64 = ir.Constant(I16, 16), ir.Constant(I16, 64)
        xp, pp, cp = (builder.bitcast(a.data, i8p) for a in (xa_, pa, ca))
        xblock = builder.mul(steps, i64(1024))  # bytes of a row block's B tiles
        tiles = [(s, r) for r in range(nb) for s in strips]
        zero, carried, head, body, done = (builder.append_basic_block(f"panel.{n}") for n in (
            "zero", "carried", "head", "body", "done"))
        builder.cbranch(builder.icmp_signed("==", k0v, i64(0)), zero, carried)
        builder.position_at_end(zero)
        zs = [builder.call(tzero, [r16, c64]) for _ in tiles]
        builder.branch(head)
        builder.position_at_end(carried)
        cs = [builder.call(load, [r16, c64, builder.gep(cp, [i64(1024 * j)]), i64(64)]) for j in range(len(tiles))]
        builder.branch(head)
        builder.position_at_end(head)
        jj = builder.phi(I64)
        jj.add_incoming(i64(0), zero)
        jj.add_incoming(i64(0), carried)
        accs = []
        for z, c in zip(zs, cs):
            accs.append(builder.phi(AMX_TILE))
            accs[-1].add_incoming(z, zero)
            accs[-1].add_incoming(c, carried)
        builder.cbranch(builder.icmp_signed("<", jj, nv), body, done)
        builder.position_at_end(body)
        kk = builder.add(k0v, jj)
        bs = [builder.call(load, [r16, c64, builder.gep(xp, [builder.add(builder.mul(builder.add(rbv, i64(r)), xblock),
                                                                          builder.mul(kk, i64(1024)))]), i64(64)])
              for r in range(nb)]
        new = [None] * len(tiles)
        for i, s in enumerate(strips):
            a = builder.call(load, [r16, c64, builder.gep(pp, [builder.add(builder.mul(jj, i64(2048)),
                                                                          i64(1024 * i))]), i64(64)])
            for r in range(nb):
                j = tiles.index((s, r))
                new[j] = builder.call(dp, [r16, c64, c64, accs[j], a, bs[r]])
        jj.add_incoming(builder.add(jj, i64(1)), body)
        for acc, v in zip(accs, new):
            acc.add_incoming(v, body)
        builder.branch(head)
        builder.position_at_end(done)
        for j, acc in enumerate(accs):
            builder.call(store, [r16, c64, builder.gep(cp, [i64(1024 * j)]), i64(64), acc])
        with builder.if_then(builder.icmp_signed("!=", lastv, i64(0))):
            _emit_blocks_out(builder, ca.data, tiles, strips, nb, rbv, tt, oa, bf16)
        return context.get_dummy_value()

    return types.void(xa, panel, cacc, out, t, rb, k0, nsteps, last, first, nblocks), codegen


@njit(inline="always")
def _strip_pair(w, xa, scale, zp, gsize, pf, out, t, g0, nrb, panel, tabs, cacc, first):  # pragma: no cover
    # (first: a literal at each call) the strip pair over all of K, a panel at a time, for the group's row blocks
    steps = xa.shape[1]
    npairs = nrb // 2
    k0 = 0
    while k0 < steps:
        n = min(PANEL_STEPS, steps - k0)
        last = 1 if k0 + n >= steps else 0
        _panel_convert(w, scale, zp, _EIGHTS, panel, tabs, t, k0, n, gsize, pf, first)
        for p in range(npairs):
            _panel_products(xa, panel, cacc[p], out, t, g0 + 2 * p, k0, n, last, first, 2)
        if nrb % 2:
            _panel_products(xa, panel, cacc[npairs], out, t, g0 + 2 * npairs, k0, n, last, first, 1)
        k0 += n


@_cached
@njit(cache=True, nogil=True)
def _tiles_grouped(w, xa, scale, zp, gsize, pf, out, t0, t1):  # pragma: no cover - compiled
    # per group of row blocks and tile, each strip pair's steps converted once, a panel at a time, and multiplied
    # by every pair of row blocks of the group, whose C tiles wait in cacc between panels (L1): _tiles converts
    # the weight again for each pair of row blocks, where the conversion, not the tile unit, bounds the call
    # (4096 x 4096, 128 rows, AMX Xeon: 2.05-2.30 -> 1.56-1.74 ms; with the conversion skipped, 1.03)
    panel = _aligned(PANEL_STEPS * 2 * 16 * 32, np.int16).reshape((PANEL_STEPS, 2, 16, 32))
    tabs = _aligned(32 * 32, np.int16).reshape((32, 32))
    cacc = _aligned((GROUP_BLOCKS // 2 + 1) * 4 * 256, np.float32).reshape((GROUP_BLOCKS // 2 + 1, 4, 16, 16))
    nrb_all = xa.shape[0]
    for g0 in range(0, nrb_all, GROUP_BLOCKS):
        nrb = min(GROUP_BLOCKS, nrb_all - g0)
        for t in range(t0, t1):
            _strip_pair(w, xa, scale, zp, gsize, pf, out, t, g0, nrb, panel, tabs, cacc, 0)
            _strip_pair(w, xa, scale, zp, gsize, pf, out, t, g0, nrb, panel, tabs, cacc, 2)


def _transposed(builder, rows: list) -> list:
    """IR: the 16 x 16 transpose of ``rows`` (16 ``<16 x T>`` vectors): element ``c`` of result ``r`` is element
    ``r`` of ``rows[c]``."""
    for h, lo, hi in _TRANSPOSE:
        new = list(rows)
        for i in range(16):
            if i & h == 0:
                new[i] = builder.shuffle_vector(rows[i], rows[i + h], ir.Constant(vec(I32, 16), lo))
                new[i + h] = builder.shuffle_vector(rows[i], rows[i + h], ir.Constant(vec(I32, 16), hi))
        rows = new
    return rows


@intrinsic
def _pack_block(typingctx, x32, xb32, zeros, rb):
    """Block ``rb`` of the rows of ``x32`` (uint32 ``[M, K/2]``: pairs of bfloat16) as the B tiles ``xb32``
    (uint32 ``[K/32, 16, 16]``): row ``p`` of step ``ks`` holds each row's pair ``PAIRS[p]`` of the step, a row
    past ``M`` zeros (read from ``zeros``, 16 words). Per step: the 16 rows' words, permuted, transposed."""
    def codegen(context, builder, sig, args):
        xa_, ba, za = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(3))
        rbv = context.cast(builder, args[3], sig.args[3], types.int64)
        c64 = functools.partial(ir.Constant, I64)
        vi = vec(I32, 16)
        m_all, k2 = cgutils.unpack_tuple(builder, xa_.shape, 2)
        steps = builder.sdiv(k2, c64(16))
        perm = ir.Constant(vi, [int(p) for p in PAIRS])
        srcs = []
        for m in range(16):  # each row's start, or the zeros (stride 0) past M
            r = builder.add(builder.mul(rbv, c64(16)), c64(m))
            real = builder.icmp_signed("<", r, m_all)
            srcs.append((builder.select(real, builder.gep(xa_.data, [builder.mul(r, k2)]), za.data),
                         builder.select(real, c64(16), c64(0))))
        with cgutils.for_range(builder, steps) as loop:
            ks = loop.index
            rows = []
            for ptr, stride in srcs:
                v = builder.load(builder.bitcast(builder.gep(ptr, [builder.mul(ks, stride)]), vi.as_pointer()),
                                 align=4)
                rows.append(builder.shuffle_vector(v, ir.Constant(vi, ir.Undefined), perm))
            dst = builder.gep(ba.data, [builder.mul(ks, c64(256))])
            for p, row in enumerate(_transposed(builder, rows)):
                builder.store(row, builder.bitcast(builder.gep(dst, [c64(16 * p)]), vi.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(x32, xb32, zeros, rb), codegen


_ZEROS = np.zeros(16, np.uint32)


@njit(inline="always")
def _pack_rows(x32, xa32, rb0, rb1):  # pragma: no cover - compiled
    for rb in range(rb0, rb1):
        _pack_block(x32, xa32[rb], _ZEROS, rb)


OPERANDS = _omp.Operands("vnni_lut", M=_omp.I64, K=_omp.I64, T=_omp.I64, G=_omp.I64, meta=_omp.I64,
                         x=_omp.ADDR, xa=_omp.ADDR, w=_omp.ADDR, scale=_omp.ADDR, zp=_omp.ADDR, out=_omp.ADDR,
                         pf=_omp.I64)
_read = OPERANDS.read
_META = OPERANDS.slot("meta")


@njit(inline="always")
def _chunk(o, i, c0, c1, _a, _b):  # pragma: no cover - compiled; phase 0: row blocks c0..c1; phase 1: tiles
    M, K, T, G, m = o.M, o.K, o.T, o.G, o.meta
    zr, phase, bf16 = m & 1, (m >> 1) & 1, (m >> 2) & 1
    nrb = (M + 15) // 16
    if phase == 0:
        _pack_rows(carray(o.x, (M, K // 2), np.uint32), carray(o.xa, (nrb, K // 32, 16, 16), np.uint32), c0, c1)
        return 0
    w, xa = carray(o.w, (T, K // 8, NT), np.uint32), carray(o.xa, (nrb, K // 32, 16, 32), np.uint16)
    scale, zp = carray(o.scale, (T, G, NT), np.float32), carray(o.zp, (T, G, NT) if zr else (0, 0, 0), np.uint8)
    if nrb <= 2:  # one pass over the strips a pair of row blocks: each converts the weight once anyway
        if bf16:
            _tiles(w, xa, scale, zp, K // G, o.pf, carray(o.out, (M, T * NT), np.uint16), c0, c1)
        else:
            _tiles(w, xa, scale, zp, K // G, o.pf, carray(o.out, (M, T * NT), np.float32), c0, c1)
    elif bf16:
        _tiles_grouped(w, xa, scale, zp, K // G, o.pf, carray(o.out, (M, T * NT), np.uint16), c0, c1)
    else:
        _tiles_grouped(w, xa, scale, zp, K // G, o.pf, carray(o.out, (M, T * NT), np.float32), c0, c1)
    return 0


def _team(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _chunk, 0, 0)


_TEAM = _omp.TeamKernel(_team)


def _serial(block, lo, hi) -> None:
    _TEAM.ctypes()(block.ctypes.data)


def run(x: np.ndarray, w: np.ndarray, scale: np.ndarray, zp: np.ndarray, gsize: int, out: np.ndarray,
        prefetch: int = 0) -> np.ndarray:
    """``out = x @ W.T`` (``[M, N]``: float32, or uint16 for the bits of the sums rounded to bfloat16) for ``x``
    the bfloat16 bits ``[M, K]`` (uint16, C-contiguous) and
    the layout's arrays (as :func:`qtorch.vnni.gemv_vnni` takes them, ``zp`` ``[0, 0, 0]`` for symmetric codes;
    not checked here), on torch's thread team: the rows as B tiles first (row blocks in parallel), then the tiles
    of 64 channels, a few per chunk.

    The A tiles hold ``bfloat16((code - z) * scale)``, the weight ``F.linear`` multiplies once it is dequantized
    in bfloat16, and the C tiles carry all of K (float32 sums). ``prefetch``: bytes ahead in a tile's words that
    each step asks for (the one-row kernel's measured distance, :func:`qtorch.prefetch.vnni_distance`, reads the
    same stream); 0: none."""
    if not available():  # a tile instruction without the tile state is SIGILL, not an error
        raise RuntimeError("this process cannot use AMX tiles (no AMX-BF16 CPU, or Linux refused the tile state)")
    M, K = x.shape
    T, G = w.shape[0], scale.shape[1]
    if (x.dtype != np.uint16 or w.shape[1] * 8 != K or not eligible(K, K // G if G else 0) or K % G
            or out.shape != (M, T * NT) or out.dtype not in (np.float32, np.uint16)
            or not (x.flags.c_contiguous and out.flags.c_contiguous)):
        raise ValueError(f"x must be contiguous uint16 [M, K] with K % 32 == 0 matching w ({w.shape[1] * 8} inputs) "
                         f"in groups of a multiple of 32, out contiguous float32 or uint16 [{M}, {T * NT}]; got x "
                         f"{x.dtype} {list(x.shape)}, {G} groups, out {out.dtype} {list(out.shape)}")
    if M == 0 or T == 0:
        return out
    nrb = -(-M // 16)
    nchunks = min(T, 2 * _omp.team_size())
    xa = vnni_amx.scratch("b_lut", nrb * K * 16, np.uint16)
    base = (1 if zp.shape[0] else 0) | (4 if out.dtype == np.uint16 else 0)
    ops = OPERANDS.pack(M=M, K=K, T=T, G=G, meta=base, x=x, xa=xa, w=w, scale=scale, zp=zp, out=out,
                        pf=max(0, int(prefetch)) // 4)
    for phase, n, chunks in ((0, nrb, nrb), (1, T, nchunks)):
        block = _omp.new_block(chunks, n, ops)
        block[_META] = base | phase << 1
        _omp.run(n, _TEAM, block, _serial, (block,), n, 1, nchunks=chunks)
    return out
