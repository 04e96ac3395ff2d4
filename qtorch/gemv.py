"""One-row forward (``rows == 1``: decoding) of the 8- and 4-bit blocked layouts, at memory speed on the CPU.

A leaf of :mod:`qtorch.layouts.blocked`, which calls it for single-row inputs. The layout is the one
``layouts.blocked`` builds: tiles of ``NT`` output channels stored K-major, ``wb[T, K, NT]`` (8 bits: int8
symmetric, uint8 with zero points) or ``wb[T, K, NT/2]`` (4 bits: byte ``j`` holds column ``j`` in its low nibble
and column ``j + NT/2`` in its high one); scale and zero point ``[G, N]``.

The inner loop is written as LLVM vector IR (``_dot_rows``): per row of a tile it loads 128 or 64 codes (8 bits)
or 32 bytes (4 bits: 64 codes), widens them to ``<8 x i32>``, converts and multiply-adds them (FMA) into up to
sixteen ``<8 x float>`` accumulators that stay in registers for a whole group. numba's own loop over the same
arrays keeps the accumulators in memory and re-checks aliasing on every row: 2-3x more instructions per code.
Accumulation is float32. The zero point is subtracted from the codes in integers (exact, as in every other path),
or, for bfloat16/float16 inputs (``fold``), once per group as ``z * sum(x)``: 20-30% faster, with float32 rounding
that scales with the codes yet stays below those dtypes' own.

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

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _omp
from ._ir import I32 as _I32, I64 as _I64, V8B as _V8B, V8F as _V8F, V8I as _V8I

__all__ = ["eligible", "gemv_blocked"]



def eligible(bits: int, tile_bytes: int) -> bool:
    """True when :func:`gemv_blocked` serves a blocked layout of ``bits`` with ``tile_bytes`` bytes per row of a
    tile (the chunk the inner loop reads: 64 bytes at 8 bits, 32 at 4 bits)."""
    return (bits == 8 and tile_bytes % 64 == 0) or (bits == 4 and tile_bytes % 32 == 0)


@intrinsic
def _dot_rows(typingctx, wb, t, k0, col0, nk, x, acc, alo, ahi, zp, g, n0, bits, chunk, zmode):
    """acc += sum over rows k0..k0+nk of x[k] * (code - zero point) of wb[t, k, col0:col0+chunk] (float32), in
    registers.

    8 bits: ``chunk`` (64 or 128) codes per row into ``acc[alo:alo+chunk]``. 4 bits: ``chunk`` = 32 bytes per
    row; the low nibbles into ``acc[alo:alo+32]``, the high ones into ``acc[ahi:ahi+32]``. int8 codes are
    sign-extended. ``zmode`` 0: no zero point; 1: ``zp[g, n0 + c]`` for the column ``c`` an accumulator holds;
    2: the constant 8 (symmetric 4-bit codes). The zero point is subtracted in integers, exactly, as everywhere
    else. A whole row per call where it fits the 16 vector registers: reading half rows of a 128-byte row in two
    passes cost 20% more time at 1 row (the strided passes stream worse from memory).
    """
    if not (isinstance(bits, types.IntegerLiteral) and isinstance(chunk, types.IntegerLiteral)
            and isinstance(zmode, types.IntegerLiteral)):
        return None
    nbits, nbytes, zm = bits.literal_value, chunk.literal_value, zmode.literal_value
    signed = wb.dtype == types.int8
    nload = nbytes // 8  # 8-byte loads per row
    nacc = nload if nbits == 8 else 2 * nload  # <8 x float> accumulators

    def codegen(context, builder, sig, args):
        w = context.make_array(sig.args[0])(context, builder, args[0])
        xa = context.make_array(sig.args[5])(context, builder, args[5])
        aa = context.make_array(sig.args[6])(context, builder, args[6])
        za = context.make_array(sig.args[9])(context, builder, args[9])
        tt, kk0, c0, n, lo, hi, g, n0 = (context.cast(builder, args[i], sig.args[i], types.int64)
                                         for i in (1, 2, 3, 4, 7, 8, 10, 11))
        _, zcols = cgutils.unpack_tuple(builder, za.shape, 2)
        zrow = builder.gep(za.data, [builder.add(builder.mul(g, zcols), n0)])
        _, k_all, width = cgutils.unpack_tuple(builder, w.shape, 3)
        wp = builder.gep(w.data, [builder.add(builder.mul(builder.add(builder.mul(tt, k_all), kk0), width), c0)])
        xp = builder.gep(xa.data, [kk0])
        accp, zvec = [], []
        for i in range(nacc):  # accumulator i: 8 columns, from column off of the tile on
            base, j = (lo, i) if nbits == 8 or i < nload else (hi, i - nload)
            off = builder.add(base, ir.Constant(_I64, 8 * j))
            accp.append(builder.bitcast(builder.gep(aa.data, [off]), _V8F.as_pointer()))
            if zm == 1:
                zb = builder.load(builder.bitcast(builder.gep(zrow, [off]), _V8B.as_pointer()), align=1)
                zvec.append(builder.zext(zb, _V8I))
            else:
                zvec.append(ir.Constant(_V8I, [8] * 8) if zm == 2 else None)
        accs = [cgutils.alloca_once_value(builder, builder.load(p, align=4)) for p in accp]  # -> registers
        lanes0 = ir.Constant(_V8I, [0] * 8)
        with cgutils.for_range(builder, n) as loop:
            i = loop.index
            row = builder.gep(wp, [builder.mul(i, width)])
            xv = builder.load(builder.gep(xp, [i]))
            xb = builder.shuffle_vector(builder.insert_element(ir.Constant(_V8F, ir.Undefined), xv, ir.Constant(_I32, 0)),
                                        ir.Constant(_V8F, ir.Undefined), lanes0)
            for v in range(nload):
                b = builder.load(builder.bitcast(builder.gep(row, [ir.Constant(_I64, 8 * v)]), _V8B.as_pointer()),
                                 align=1)
                if nbits == 8:
                    parts = [(builder.sext(b, _V8I) if signed else builder.zext(b, _V8I), v)]
                else:
                    z = builder.zext(b, _V8I)
                    parts = [(builder.and_(z, ir.Constant(_V8I, [15] * 8)), v),
                             (builder.lshr(z, ir.Constant(_V8I, [4] * 8)), v + nload)]
                for iv, a in parts:
                    if zvec[a] is not None:
                        iv = builder.sub(iv, zvec[a])
                    f = builder.sitofp(iv, _V8F)
                    # 'contract': one FMA where the CPU has it, a multiply and an add where it has not
                    prod = builder.fmul(xb, f, flags=("contract",))
                    builder.store(builder.fadd(builder.load(accs[a]), prod, flags=("contract",)), accs[a])
        for p, a in zip(accp, accs):
            builder.store(builder.load(a), p, align=4)
        return context.get_dummy_value()

    return types.void(wb, t, k0, col0, nk, x, acc, alo, ahi, zp, g, n0, bits, chunk, zmode), codegen


@njit(inline="always")
def _dot_group(wb, t, k0, gsize, x, acc, zp, g, n0, bits, W, zmode):  # pragma: no cover - compiled
    # one group of rows of tile t into acc (zmode arrives as a literal from the call sites)
    if bits == 4:
        for c in range(0, W, 32):
            _dot_rows(wb, t, k0, c, gsize, x, acc, c, W + c, zp, g, n0, 4, 32, zmode)
    elif W % 128 == 0:
        for c in range(0, W, 128):
            _dot_rows(wb, t, k0, c, gsize, x, acc, c, c, zp, g, n0, 8, 128, zmode)
    else:
        for c in range(0, W, 64):
            _dot_rows(wb, t, k0, c, gsize, x, acc, c, c, zp, g, n0, 8, 64, zmode)


@njit(cache=True, nogil=True)
def _gemv_range(x, xs, wb, scale, zp, gsize, bits, out, t0, t1):  # pragma: no cover - compiled
    # out[n] = sum_k x[k] (code[n, k] - zp) * scale for the output channels of tiles t0..t1. With group sums of x
    # (xs, one per group; empty otherwise) the zero point is folded in afterwards: sum x c - z sum x.
    T, K, W = wb.shape
    NT = W * 2 if bits == 4 else W
    G = scale.shape[0]
    has_zp = zp.shape[0] > 0
    fold = xs.shape[0] > 0
    acc = np.empty(NT, np.float32)
    tot = np.empty(NT, np.float32)
    for t in range(t0, t1):
        n0 = t * NT
        tot[:] = 0
        for g in range(G):
            acc[:] = 0
            if fold or not (has_zp or bits == 4):
                _dot_group(wb, t, g * gsize, gsize, x, acc, zp, g, n0, bits, W, 0)
            elif has_zp:
                _dot_group(wb, t, g * gsize, gsize, x, acc, zp, g, n0, bits, W, 1)
            else:  # symmetric 4-bit codes carry the offset 8
                _dot_group(wb, t, g * gsize, gsize, x, acc, zp, g, n0, bits, W, 2)
            sc = scale[g, n0:n0 + NT]
            if fold and has_zp:
                z = zp[g, n0:n0 + NT]
                for j in range(NT):
                    tot[j] += (acc[j] - np.float32(z[j]) * xs[g]) * sc[j]
            elif fold and bits == 4:
                z8 = np.float32(8) * xs[g]
                for j in range(NT):
                    tot[j] += (acc[j] - z8) * sc[j]
            else:
                for j in range(NT):
                    tot[j] += acc[j] * sc[j]
        o = out[n0:n0 + NT]
        for j in range(NT):
            o[j] = tot[j]


#: the team kernel's operands (its chunks are tiles: the block's total is T); wb's dtype is the kernel's own
OPERANDS = _omp.Operands("gemv", K=_omp.I64, W=_omp.I64, gsize=_omp.I64, bits=_omp.I64, zp_rows=_omp.I64,
                         fold=_omp.I64, tiles=_omp.I64, x=_omp.ADDR, xs=_omp.ADDR, wb=_omp.ADDR, scale=_omp.ADDR,
                         zp=_omp.ADDR, out=_omp.ADDR)
_read = OPERANDS.read


@njit(inline="always")
def _gemv_chunk(o, i, t0, t1, wdt, _y):  # pragma: no cover - compiled; tiles t0..t1 on a thread of torch's team
    T, K, W, G = o.tiles, o.K, o.W, o.K // o.gsize
    NT = W * 2 if o.bits == 4 else W
    zrows = o.zp_rows
    _gemv_range(carray(o.x, K, np.float32), carray(o.xs, G if o.fold else 0, np.float32),
                carray(o.wb, (T, K, W), wdt), carray(o.scale, (G, T * NT), np.float32),
                carray(o.zp, (zrows, T * NT if zrows else 0), np.uint8), o.gsize, o.bits,
                carray(o.out, T * NT, np.float32), t0, t1)
    return 0


def _team_gemv_i8(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _gemv_chunk, np.int8, 0)


def _team_gemv_u8(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read, _gemv_chunk, np.uint8, 0)


_TEAM_KERNELS = {True: _omp.TeamKernel(_team_gemv_i8), False: _omp.TeamKernel(_team_gemv_u8)}  # by signedness


def gemv_blocked(x: np.ndarray, wb: np.ndarray, scale: np.ndarray, zp: np.ndarray, gsize: int, bits: int,
                 out: np.ndarray, fold: bool = False) -> np.ndarray:
    """``out[n] = sum_k x[k] * (code[n, k] - zp) * scale`` for one float32 row ``x[K]`` (see the module docstring).

    ``wb`` int8/uint8 ``[T, K, W]`` with ``eligible(bits, W)``, ``scale`` float32 ``[G, T*NT]``, ``zp`` uint8
    ``[G, T*NT]`` or ``[0, 0]``, ``gsize * G == K``, ``out`` float32 ``[T*NT]``, all C-contiguous (checked: a
    ``TypeError`` / ``ValueError`` names the operand). Returns ``out``.

    ``fold=True`` subtracts the zero point (or the offset 8 of symmetric 4-bit codes) once per group, as
    ``z * sum(x)``, instead of from every code: 20-30% faster, but the float32 rounding then scales with the
    codes (up to 255) instead of with ``code - zp``. The forward folds only for bfloat16/float16 inputs, whose
    own rounding is coarser than that; float32 stays exact.
    """
    T, K, W = wb.shape if getattr(wb, "ndim", 0) == 3 else (0, 0, 0)
    _omp.check_operands(wb, scale, zp, gsize, bits, out, (T * (W * 2 if bits == 4 else W),), x=x, x_shape=(K,))
    if not eligible(bits, W):
        raise ValueError(f"the one-row kernel reads {64 if bits == 8 else 32}-byte chunks of a tile row; "
                         f"{W} bytes per row is not a multiple")
    _run(x, wb, scale, zp, gsize, bits, out, fold, x.ctypes.data, wb.ctypes.data, scale.ctypes.data,
         zp.ctypes.data, out.ctypes.data)
    return out


def _gemv_tensors(x, wb, scale, zp, gsize: int, bits: int, out, fold: bool):
    """:func:`gemv_blocked` on CPU torch tensors that ``layouts.blocked`` built (contiguous, of the layout's
    dtypes and shapes; ``x`` / ``out`` ``[1, K]`` / ``[1, N]``): the forward's entry, where a tensor's address costs
    less to get than an array's."""
    _run(x.numpy().reshape(-1), wb.numpy(), scale.numpy(), zp.numpy(), gsize, bits, out.numpy().reshape(-1), fold,
         x.data_ptr(), wb.data_ptr(), scale.data_ptr(), zp.data_ptr(), out.data_ptr())
    return out


def _run(x, wb, scale, zp, gsize, bits, out, fold, xa, wa, sa, za, oa) -> None:
    # the arrays (for qcore's threads) and their addresses (for the team kernel's block) of the same operands
    T, K, W = wb.shape
    if T == 0 or K == 0:
        out[:] = 0
        return
    run_plan(Plan(wb, scale, zp, gsize, bits, wa, sa, za), x, xa, out, oa, fold)


class Plan:
    """The part of a one-row call that depends on the layer only: its arrays (kept alive), their addresses in
    the team block, and the block's other fixed fields. The blocked layout builds it once (``layouts.blocked``'s ``plan``),
    which saves about 15 us of a call's Python (a 768x768 layer's kernel takes about 18 us)."""

    __slots__ = ("wb", "scale", "zp", "gsize", "bits", "T", "K", "G", "fold_ok", "min_part", "block", "addresses",
                 "kernel")

    def __init__(self, wb, scale, zp, gsize: int, bits: int, wa: int, sa: int, za: int):
        T, K, W = wb.shape
        self.wb, self.scale, self.zp, self.gsize, self.bits = wb, scale, zp, gsize, bits
        self.T, self.K, self.G = T, K, scale.shape[0]
        self.fold_ok = bool(zp.shape[0] or bits == 4)
        self.min_part = max(1, (1 << 21) // max(1, K * W))
        self.block = _omp.new_block(T, T, OPERANDS.pack(K=K, W=W, gsize=gsize, bits=bits, zp_rows=zp.shape[0], fold=0,
                                                        tiles=T, x=0, xs=0, wb=wa, scale=sa, zp=za, out=0))
        self.addresses = (wa, sa, za)
        self.kernel = _TEAM_KERNELS[wb.dtype == np.int8]


_NO_SUMS = np.zeros(0, np.float32)
_FOLD, _X, _XS, _OUT = (OPERANDS.slot(f) for f in ("fold", "x", "xs", "out"))


def run_plan(p: Plan, x, xa: int, out, oa: int, fold: bool) -> None:
    """``out = x @ W.T`` for the layer of ``p``: ``x`` float32 ``[K]`` at address ``xa``, ``out`` float32 ``[N]``
    at ``oa`` (``fold`` as in :func:`gemv_blocked`). The caller keeps ``x`` and ``out`` alive and of those shapes."""
    fold = bool(fold) and p.fold_ok
    # group sums of x, once per call (a sequential sum per tile cost 6% of a 4-bit row)
    xs = x.reshape(p.G, p.gsize).sum(1, dtype=np.float32) if fold else _NO_SUMS
    block = p.block.copy()  # per call: a module may run on several threads at once
    block[_FOLD], block[_X], block[_XS], block[_OUT] = fold, xa, xs.ctypes.data, oa
    _omp.run(p.T, p.kernel, block, _gemv_range, (x, xs, p.wb, p.scale, p.zp, p.gsize, p.bits, out), p.T,
             p.min_part, nchunks=p.T)
