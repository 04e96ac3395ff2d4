"""4-bit weights times activations split into 8-bit integer planes: the kernels of the ``vnni`` layout (CPUs with
AVX512-VNNI).

A leaf of :mod:`qtorch.layouts.vnni`. The weight is held in 32-bit words of 8 inputs each, by tiles of 64 output
channels: ``w[T, K/8, 64]`` (uint32), ``w[t, o, c]`` the codes of channel ``64 t + c`` for inputs ``8 o .. 8 o +
7``, input ``8 o + b`` (``b < 4``) in the low nibble of byte ``b`` and ``8 o + 4 + b`` in its high nibble (the
canonical words with their nibbles reordered, :func:`qtorch.layouts.vnni._kernel_words`). A 64-byte load holds 8
inputs of 16 channels, which is what ``vpdpbusd`` multiplies: four unsigned bytes by four signed bytes, summed
into the 32-bit lane of their channel. A mask gives the bytes of inputs ``8 o .. 8 o + 3``, a shift and a mask
those of ``8 o + 4 .. 8 o + 7`` (codes 0..15, no conversion), and two ``vpdpbusd`` per plane consume 128 codes: a
third of the instructions of the blocked layout's float path, whose 4-bit codes were held by their instructions,
not by memory, on an AVX-512 Xeon (2 cores: 19-21 GB/s of codes against 25-30 for 8-bit ones).

The activations become integers per block of ``B`` inputs (``B`` <= 128 divides the group size): with ``2^e`` the
first power of two above the block's largest ``|x|``, ``q = round(x * 2^(P - e))`` (``|q| <= 2^P``), split into
signed bytes ``q = 256 h + l`` (bfloat16 and float16 rows, ``P = 14``: two planes) or ``65536 h + 256 m + l``
(float32, ``P = 22``: three). Every sum of a block is then exact in 32-bit integers,
``sum q (code - z) = sum q code - z sum q``, and is scaled once, ``* 2^(e - P) * scale``, into the float32
output. The one rounding is ``x``'s: at most ``2^(e - P - 1)``, under ``2^-14`` (bfloat16, float16) or ``2^-22``
(float32) of the block's largest ``|x|``; a bfloat16 or float16 value within ``2^-6`` (``2^-3``) of its block's
largest is exact. A block whose largest ``|x|`` is below ``2^-127`` scales by a subnormal float32 (its
products lie far below float32's own resolution of the sum). Non-finite activations are not split: the caller
takes another path for that call (:func:`split`). Each thread of the team splits ``x`` for itself (about 1 ns an
input), then streams its tiles; scales and zero points are held by tile (``[T, G, 64]``), so a tile's lie
together (read ``[G, N]``, a row apart per group, they missed the cache: 7% of a 4096x4096 call from memory).

Calls of several rows: :mod:`qtorch.vnni_amx` on AMX-INT8 tiles, else blocks of channels dequantized into ``W.T``
(``[K, cols]``, float32 or bfloat16) for ``torch.mm`` (:func:`dequant_t`).

>>> import numpy as np
>>> w = np.full((1, 1, 64), 0x11111111, np.uint32)          # 64 channels, 8 inputs, every code 1
>>> scale, zero = np.ones((1, 1, 64), np.float32), np.zeros((1, 1, 64), np.uint8)
>>> out = np.empty(64, np.float32)
>>> if available():
...     out = gemv_vnni(np.arange(8, dtype=np.float32), w, scale, zero, 8, out)
... else:
...     out[:] = 28.0
>>> out[:2]
array([28., 28.], dtype=float32)
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _omp
from ._ir import F32 as _F32, I8 as _I8, I16 as _I16, I32 as _I32, I64 as _I64, host_has, prefetch_l2, to_bf16x32, vec
from ._ir import cached as _cached, touch as _touch
from .gemv import _half_bits_to_float, _narrow, _native, _sums_address  # (the one-row kernels' shared pieces)
from .planes import P as _P, block_size, split_row as _split_row  # (x as integer planes)

__all__ = ["Chain", "Plan", "available", "block_size", "dequant_t", "gemv_vnni", "split"]

#: output channels of a tile: four vectors of 16 lanes
NT = 64
#: ``vpdpbusd`` on 16 lanes (AVX512-VNNI): numba compiles for a CPU that has it
_VNNI = host_has("avx512vnni") and host_has("avx512bw")
#: bytes ahead of the octet being read that each octet prefetches into L2 where nothing is measured (the layout's
#: plans take the distance measured on the machine, :func:`qtorch.prefetch.vnni_distance`). On the AVX-512 Xeon, 2
#: threads, 32 copies of a 4096x4096 layer in rotation (a C replica): 19.2 GB/s at 1 KB, 22.9 at 2, 25.5 at 4, 25.8
#: at 8 and 16
PREFETCH = 8192
#: whether each octet reads every line of its codes a second time (4 bytes, discarded) where nothing is measured
#: (the layout's plans take what is measured on the machine, :func:`qtorch.prefetch.vnni_reads`). A line read by
#: one 64-byte load is never read again, and the L1 prefetcher, which starts on a second read of a recent line,
#: never fetches the next one. On the AVX-512 Xeon, one thread streaming 134 MB of 4-bit codes without a software
#: prefetch: 8.0-10.4 GB/s with one read a line, 10.2-11.8 with two; 4 KB prefetched ahead, bfloat16 rows alike,
#: float32 rows 11.3-12.2 against 11.9-13.1; two threads over copies of 5504x2048, 2048x5504 and 2048x2048 layers in
#: turn, both ways alternating in one process: -2% to +7%, most cells +2-6%. A second full vector load of each line
#: did as well from memory but cost more where the codes are cached
TOUCH = False


def available() -> bool:
    """Whether the ``vnni`` kernels run here: numba compiles for a CPU with AVX512-VNNI and AVX512-BW."""
    return _VNNI


# -- the activations' split (:mod:`qtorch.planes`)


@_cached
@njit(cache=True, nogil=True)
def _split_bits(x, kind, bsize, P, parts, xq, xm, xs):  # pragma: no cover - compiled
    # x: the bits of bfloat16 (kind 1) or float16 (2) values, widened to float32 here (exactly)
    K = x.shape[0]
    xf = np.empty(K, np.float32)
    if kind == 1:
        xi = xf.view(np.uint32)
        for k in range(K):
            xi[k] = np.uint32(x[k]) << np.uint32(16)  # (from 0: no wraparound test)
    else:
        for k in range(K):
            xf[k] = _half_bits_to_float(x[k])
    return _split_row(xf, bsize, P, parts, xq, xm, xs)


def split(xf: np.ndarray, bsize: int, parts: int, kind: int = 0):
    """``x`` (float32 ``[K]``, ``K % bsize == 0``; or with ``kind`` 1 / 2 the uint16 bits of bfloat16 / float16
    values) as integer planes: ``(xq, xm, xs)``, int8 ``[parts, K]``, float32 ``[K/bsize]``
    (``2^(e - P)`` per block) and int32 ``[K/bsize, 2]`` (per block ``sum q``; three planes: ``sum h`` and
    ``sum (256 m + l)``); None where ``x`` holds a NaN or an infinity.

    >>> xq, xm, xs = split(np.array([1, -2, 0, 0, 0, 0, 0, 3], np.float32), 8, 2)
    >>> (256 * xq[0].astype(int) + xq[1]).tolist(), float(xm[0]), int(xs[0, 0])
    ([4096, -8192, 0, 0, 0, 0, 0, 12288], 0.000244140625, 8192)
    """
    K = xf.shape[0]
    nb = K // bsize
    xq = np.empty((parts, K), np.int8)
    xm = np.empty(nb, np.float32)
    xs = np.empty((nb, 2), np.int32)
    ok = (_split_row(xf, bsize, _P[parts], parts, xq, xm, xs) if kind == 0
          else _split_bits(xf, kind, bsize, _P[parts], parts, xq, xm, xs))
    if not ok:
        return None
    return xq, xm, xs


# -- the one-row kernel


@intrinsic
def _group(typingctx, w, t, g, nbg, bo, xq, xm, xs, zp, scale, sums, pf, touch, parts, zmode):
    """``sums[n] += scale[t, g, c] * sum over the group's blocks b of 2^(e_b - P) * sum q (code - z)`` for the 64
    channels ``n = 64 t + c`` of tile ``t``: group ``g`` is ``nbg`` blocks of ``bo`` octets; each block's sums in 32-bit
    integers (exact), scaled once. ``parts``: 2 or 3 planes; ``zmode`` 0: the zero points ``zp[t, g, c]``, 1:
    the constant 8 (symmetric codes). ``pf`` > 0: each octet prefetches the lines ``pf`` bytes ahead; ``touch`` > 0:
    each of its lines is read once more, 4 bytes (:data:`TOUCH`)."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (parts, zmode)):
        return None
    P, zm = parts.literal_value, zmode.literal_value
    vi, vf, vb = vec(_I32, 16), vec(_F32, 16), vec(_I8, 16)

    def codegen(context, builder, sig, args):
        wa, xa, ma, sa, za, ca, oa = (context.make_array(sig.args[i])(context, builder, args[i])
                                      for i in (0, 5, 6, 7, 8, 9, 10))
        tt, gg, nbgv, bov, pfd, tch = (context.cast(builder, args[i], sig.args[i], types.int64)
                                       for i in (1, 2, 3, 4, 11, 12))
        i64 = functools.partial(ir.Constant, _I64)
        _, ko, _ = cgutils.unpack_tuple(builder, wa.shape, 3)
        _, kk = cgutils.unpack_tuple(builder, xa.shape, 2)
        _, ngroups, _ = cgutils.unpack_tuple(builder, ca.shape, 3)
        prow = builder.mul(builder.add(builder.mul(tt, ngroups), gg), i64(NT))  # the tile's scales of group g
        n0 = builder.mul(tt, i64(NT))
        zero_i, zero_f = ir.Constant(vi, [0] * 16), ir.Constant(vf, [0.0] * 16)
        accs = [[cgutils.alloca_once_value(builder, zero_i) for _ in range(4)] for _ in range(P)]
        gaccs = [cgutils.alloca_once_value(builder, zero_f) for _ in range(4)]
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi, [vi, vi, vi]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        nib = ir.Constant(vi, [0x0F0F0F0F] * 16)
        four = ir.Constant(vi, [4] * 16)
        eight = ir.Constant(vi, [8] * 16)
        do_pf = builder.icmp_signed(">", pfd, i64(0))
        do_touch = builder.icmp_signed(">", tch, i64(0))
        lanes0 = ir.Constant(vi, [0] * 16)

        def splat(v, ty):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(ty, ir.Undefined), v,
                                                                 ir.Constant(_I32, 0)),
                                          ir.Constant(ty, ir.Undefined), lanes0)

        zs = []
        for c in range(4):
            if zm == 0:
                zptr = builder.gep(za.data, [builder.add(prow, i64(16 * c))])
                zs.append(builder.zext(builder.load(builder.bitcast(zptr, vb.as_pointer()), align=1), vi))
            else:
                zs.append(ir.Constant(vi, [8] * 16))
        with cgutils.for_range(builder, nbgv) as blocks:
            b = builder.add(builder.mul(gg, nbgv), blocks.index)
            o0 = builder.mul(b, bov)
            base = builder.gep(wa.data, [builder.mul(builder.add(builder.mul(tt, ko), o0), i64(NT))])
            xrow = [builder.gep(xa.data, [builder.add(builder.mul(i64(p), kk), builder.mul(o0, i64(8)))])
                    for p in range(P)]
            for p in range(P):
                for c in range(4):
                    builder.store(zero_i, accs[p][c])
            with cgutils.for_range(builder, bov) as loop:
                i = loop.index
                row = builder.gep(base, [builder.mul(i, i64(NT))])
                with builder.if_then(do_pf, likely=True):
                    rb = builder.bitcast(row, _I8.as_pointer())
                    for line in range(4):
                        prefetch_l2(builder, builder.gep(rb, [builder.add(pfd, i64(64 * line))]))
                with builder.if_then(do_touch, likely=True):
                    for line in range(4):
                        _touch(builder, builder.gep(row, [i64(16 * line)]))
                xs_even, xs_odd = [], []
                for p in range(P):
                    at = builder.gep(xrow[p], [builder.mul(i, i64(8))])
                    pair = [builder.load(builder.bitcast(builder.gep(at, [i64(h)]), _I32.as_pointer()), align=1)
                            for h in (0, 4)]
                    xs_even.append(splat(pair[0], vi))
                    xs_odd.append(splat(pair[1], vi))
                for c in range(4):
                    v = builder.load(builder.bitcast(builder.gep(row, [i64(16 * c)]), vi.as_pointer()), align=4)
                    even = builder.and_(v, nib)  # the low nibbles: inputs 8 o .. 8 o + 3
                    odd = builder.and_(builder.lshr(v, four), nib)  # the high nibbles: 8 o + 4 .. 8 o + 7
                    for p in range(P):
                        a = builder.load(accs[p][c])
                        a = builder.call(dp, [a, even, xs_even[p]])
                        a = builder.call(dp, [a, odd, xs_odd[p]])
                        builder.store(a, accs[p][c])
            # the block's sums: exact in 32-bit integers, then scaled once
            x0 = splat(builder.load(builder.gep(sa.data, [builder.mul(b, i64(2))])), vi)
            x1 = splat(builder.load(builder.gep(sa.data, [builder.add(builder.mul(b, i64(2)), i64(1))])), vi)
            mult = splat(builder.load(builder.gep(ma.data, [b])), vf)
            for c in range(4):
                a = [builder.load(accs[p][c]) for p in range(P)]
                if P == 2:
                    s = builder.sub(builder.add(builder.shl(a[0], eight), a[1]), builder.mul(zs[c], x0))
                    f = builder.sitofp(s, vf)
                else:
                    hi = builder.sub(a[0], builder.mul(zs[c], x0))
                    lo = builder.sub(builder.add(builder.shl(a[1], eight), a[2]), builder.mul(zs[c], x1))
                    f = builder.fadd(builder.fmul(builder.sitofp(hi, vf), ir.Constant(vf, [65536.0] * 16)),
                                     builder.sitofp(lo, vf))
                builder.store(builder.fadd(builder.load(gaccs[c]), builder.fmul(f, mult)), gaccs[c])
        srow = builder.gep(ca.data, [prow])
        orow = builder.gep(oa.data, [n0])
        for c in range(4):
            sv = builder.load(builder.bitcast(builder.gep(srow, [i64(16 * c)]), vf.as_pointer()), align=4)
            op = builder.bitcast(builder.gep(orow, [i64(16 * c)]), vf.as_pointer())
            builder.store(builder.fadd(builder.load(op, align=4), builder.fmul(builder.load(gaccs[c]), sv)), op,
                          align=4)
        return context.get_dummy_value()

    sig = types.void(w, t, g, nbg, bo, xq, xm, xs, zp, scale, sums, pf, touch, parts, zmode)
    return sig, codegen


@njit(inline="always")
def _tile(w, t, xq, xm, xs, zp, scale, gsize, bsize, sums, pf, touch, parts, zmode):  # pragma: no cover - compiled
    n0 = t * NT
    for c in range(NT):
        sums[n0 + c] = 0
    for g in range(scale.shape[1]):
        _group(w, t, g, gsize // bsize, bsize // 8, xq, xm, xs, zp, scale, sums, pf, touch, parts, zmode)


@_cached
@njit(cache=True, nogil=True)
def _gemv_range(w, xq, xm, xs, zp, scale, gsize, bsize, sums, pf, touch, t0, t1):  # pragma: no cover - compiled
    sym = zp.shape[0] == 0
    for t in range(t0, t1):
        if xq.shape[0] == 2:
            if sym:
                _tile(w, t, xq, xm, xs, zp, scale, gsize, bsize, sums, pf, touch, 2, 1)
            else:
                _tile(w, t, xq, xm, xs, zp, scale, gsize, bsize, sums, pf, touch, 2, 0)
        else:
            if sym:
                _tile(w, t, xq, xm, xs, zp, scale, gsize, bsize, sums, pf, touch, 3, 1)
            else:
                _tile(w, t, xq, xm, xs, zp, scale, gsize, bsize, sums, pf, touch, 3, 0)


#: the team kernel's operands (chunks are tiles). ``meta``: the group size (bits 0-23), the block size (24-31),
#: the planes (32-35), the output's kind (36-37: 0 float32 into ``out``; 1 bfloat16, 2 float16: the sums go to
#: ``scratch``, float32 ``[N]``, and each tile rounds its own into ``out``), whether ``zp`` is read (bit 40), the
#: kind of ``x`` (41-42, as the output's) and whether each line of codes is read twice (bit 43, :data:`TOUCH`)
OPERANDS = _omp.Operands("vnni", K=_omp.I64, T=_omp.I64, meta=_omp.I64, pf=_omp.I64, x=_omp.ADDR, w=_omp.ADDR,
                         scale=_omp.ADDR, zp=_omp.ADDR, scratch=_omp.ADDR, out=_omp.ADDR)
_read = OPERANDS.read
_X, _OUT, _SCRATCH = (OPERANDS.slot(f) for f in ("x", "out", "scratch"))
_HEADER = _omp.HEADER
_K, _META = OPERANDS.slot("K"), OPERANDS.slot("meta")


def meta(gsize: int, bsize: int, parts: int, okind: int, has_zp: bool, xkind: int, touch: bool = TOUCH) -> int:
    """The ``meta`` operand of a call (see :data:`OPERANDS`)."""
    return gsize | bsize << 24 | parts << 32 | okind << 36 | int(has_zp) << 40 | xkind << 41 | int(touch) << 43


@njit(inline="always")
def _prep(o):  # pragma: no cover - compiled; per thread, once per call: x's planes, and whether x is finite
    K, m = o.K, o.meta
    bsize, parts, xkind = (m >> 24) & 0xFF, (m >> 32) & 0xF, (m >> 41) & 3
    nb = K // bsize
    xq = np.empty((parts, K), np.int8)
    xm = np.empty(nb, np.float32)
    xs = np.empty((nb, 2), np.int32)
    P = 14 if parts == 2 else 22
    if xkind == 0:
        ok = _split_row(carray(o.x, K, np.float32), bsize, P, parts, xq, xm, xs)
    else:
        ok = _split_bits(carray(o.x, K, np.uint16), xkind, bsize, P, parts, xq, xm, xs)
    return xq, xm, xs, ok


@njit(inline="always")
def _gemv_chunk(o, i, t0, t1, _a, y):  # pragma: no cover - compiled; tiles t0..t1 on a thread of torch's team
    xq, xm, xs, ok = y
    if not ok:
        return 1  # a NaN or an infinity in x: the caller takes another path
    K, T, m = o.K, o.T, o.meta
    gsize, bsize, okind = m & 0xFFFFFF, (m >> 24) & 0xFF, (m >> 36) & 3
    N = T * NT
    G = K // gsize
    zrows = G if (m >> 40) & 1 else 0
    sums = carray(o.scratch if okind else o.out, N, np.float32)
    _gemv_range(carray(o.w, (T, K // 8, NT), np.uint32), xq, xm, xs,
                carray(o.zp, (T, G, NT) if zrows else (0, 0, 0), np.uint8), carray(o.scale, (T, G, NT), np.float32),
                gsize, bsize, sums, o.pf, (m >> 43) & 1, t0, t1)
    if okind:
        _narrow(sums, carray(o.out, N, np.uint16), okind, t0 * NT, t1 * NT)
    return 0


def _team_gemv(data):  # pragma: no cover - compiled
    # a chain of blocks (:class:`Chain`): each thread runs its share of one layer's tiles, then goes on to the next
    # block's without waiting for the others; the team size of the first block is every block's
    team = _omp.chain_team(data)
    while True:
        following = _omp.enter_block(data, team)
        head = carray(data, _omp.HEADER, np.int64)
        if head[0] < head[1]:  # chunks left to claim: this thread's own planes (a block of none is the loader's probe)
            y = _prep(_read(head))
        else:
            y = (np.empty((0, 0), np.int8), np.empty(0, np.float32), np.empty((0, 2), np.int32), False)
        _omp.claim_operands(data, _read, _gemv_chunk, 0, y, True)  # a lane of tiles per thread: one stream each
        if following == 0:
            break
        data = _omp.as_ptr(following)


_TEAM_GEMV = _omp.TeamKernel(_team_gemv)


class Plan:
    """What a one-row call of one weight needs besides ``x`` and ``out``: its arrays (kept alive) and its team
    block, built once; blocks of finished calls are reused (:func:`qtorch._omp.take_block`). ``w``, ``scale``,
    ``zp`` as in :func:`gemv_vnni` (``zp`` ``[0, 0, 0]`` for symmetric codes); ``xkind`` / ``okind``: 0 float32,
    1 bfloat16, 2 float16; ``prefetch`` and ``touch``: how the kernel reads the codes (:data:`PREFETCH`,
    :data:`TOUCH`; no bit of the result depends on them)."""

    __slots__ = ("arrays", "T", "N", "template", "free", "scratch", "min_part", "native", "registered")

    def __init__(self, w, scale, zp, gsize: int, xkind: int, okind: int, prefetch: int = PREFETCH,
                 touch: bool = TOUCH):
        T, KO, _ = w.shape
        self.arrays = (w, scale, zp)
        self.T, self.N = T, T * NT
        parts = 3 if xkind == 0 else 2
        self.template = np.append(_omp.new_block(T, T, OPERANDS.pack(
            K=KO * 8, T=T, meta=meta(gsize, block_size(gsize), parts, okind, zp.shape[0] > 0, xkind, touch),
            pf=prefetch, x=0, w=w, scale=scale, zp=zp, scratch=0, out=0)), np.int64(0))  # (a native launch's link slot last)
        self.scratch = bool(okind)
        self.free = []  # (block, its address): blocks of calls that are over; a call on another thread takes its own
        self.min_part = max(1, (1 << 21) // max(1, KO * 256))  # tiles a thread of qcore's takes at least (no team)
        # the plain case as one native call (qtorch._launch)
        self.native = _native(_TEAM_GEMV, T, [(self.template, self.N if okind else 0)], (_X, _OUT, _SCRATCH))
        self.registered = False  # whether qtorch.native_ops runs self.native for an op's calls

    def __call__(self, xa: int, oa: int) -> bool:
        """``out = x @ W.T`` for ``x`` at ``xa`` and ``out`` at ``oa`` (the caller keeps both alive); False
        (``out`` unwritten) where ``x`` holds a NaN or an infinity."""
        native = self.native
        if native is not None and native.run(xa, oa, 0, 0):
            return not native.blocks[0][_HEADER]  # (refilled from the template at every launch)
        block, address = _omp.take_block(self.template, self.free)
        block[_X] = xa
        block[_OUT] = oa
        if self.scratch:
            block[_SCRATCH] = _sums_address(self.N)
        T = self.T
        _omp.run(T, _TEAM_GEMV, block, _omp.on_caller, (_TEAM_GEMV, block), T, self.min_part, T, address)
        ok = not block[_HEADER]  # every chunk's result is 1 where x is not finite (each thread splits all of x)
        _omp.give_block(self.free, block, address)
        return ok


class Chain:
    """Two or three one-row :class:`Plan` calls on one input row (plans of one ``K`` and one kind of ``x``), as one
    native start of the thread team: their blocks linked, each thread going on to the next
    layer's tiles as soon as it finds none left in this one. ``chain(xa, oas)``: ``x`` at ``xa`` and layer ``i``'s
    output at ``oas[i]``; False (nothing written that counts) where it cannot go natively (one thread, a forked
    child, another thread holding it) or ``x`` is not finite: the caller then runs each plan itself. The same bits
    as each plan's own call."""

    __slots__ = ("plans", "native")

    def __init__(self, plans):
        plans = tuple(plans)
        if not 2 <= len(plans) <= 3 or len({(int(p.template[_K]), int(p.template[_META]) >> 41) for p in plans}) != 1:
            raise ValueError("a Chain takes two or three plans of one K and one kind of x")
        self.plans = plans
        self.native = _native(_TEAM_GEMV, sum(p.T for p in plans),
                              [(p.template, p.N if p.scratch else 0) for p in plans], (_X, _OUT, _SCRATCH))
        if self.native is None:  # (no team of torch's here, or native launches off: nothing to chain)
            raise ValueError("a Chain runs as one native launch, which this process cannot make")

    def __call__(self, xa: int, oas) -> bool:
        native = self.native
        if native is None or not native.run(xa, *oas, *(0,) * (3 - len(oas))):
            return False
        return not native.blocks[0][_HEADER]  # (refilled from the template at every launch)


def _check(w, scale, zp, gsize: int) -> tuple:
    if not isinstance(w, np.ndarray) or w.dtype != np.uint32 or w.ndim != 3 or w.shape[2] != NT:
        raise TypeError(f"w must be a uint32 array [T, K/8, {NT}], got "
                        f"{getattr(w, 'dtype', type(w).__name__)} {getattr(w, 'shape', '')}")
    T, KO, _ = w.shape
    K, N = KO * 8, T * NT
    if not isinstance(scale, np.ndarray) or scale.dtype != np.float32:
        raise TypeError("scale must be a float32 array [T, G, 64]")
    if isinstance(gsize, bool) or not isinstance(gsize, int) or gsize < 8 or K % gsize or not block_size(gsize):
        raise ValueError(f"group size must be a multiple of 8 that divides K = {K}, got {gsize!r}")
    if scale.shape != (T, K // gsize, NT):
        raise ValueError(f"scale must be [{T}, {K // gsize}, {NT}], got {list(scale.shape)}")
    if zp is not None and (not isinstance(zp, np.ndarray) or zp.dtype != np.uint8 or zp.shape != scale.shape):
        raise ValueError(f"zp must be None (symmetric codes, offset 8) or a uint8 array [{T}, {K // gsize}, {NT}]")
    for name, a in (("w", w), ("scale", scale), ("zp", zp)):
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    return K, N


def gemv_vnni(x: np.ndarray, w: np.ndarray, scale: np.ndarray, zp, gsize: int, out: np.ndarray) -> np.ndarray:
    """``out[n] = sum_k x[k] * (code[n, k] - z) * scale`` for one float32 row ``x[K]`` (three planes: float32's
    rounding) and the layout's ``w`` (uint32 ``[T, K/8, 64]``), ``scale`` float32 ``[T, G, 64]`` (tile ``t``'s
    scales of group ``g`` for its 64 channels), ``zp`` uint8 ``[T, G, 64]`` or None (symmetric codes, offset 8),
    ``out`` float32 ``[N]``. Raises ``ValueError`` for a NaN or an infinity in ``x`` (the planes cannot hold it).
    """
    if not _VNNI:
        raise RuntimeError("the vnni kernels need a CPU with AVX512-VNNI and AVX512-BW (available() is False)")
    K, N = _check(w, scale, zp, gsize)
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (K,):
        raise ValueError(f"x must be a float32 array [{K}]")
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (N,):
        raise ValueError(f"out must be a float32 array [{N}]")
    zp = np.zeros((0, 0, 0), np.uint8) if zp is None else zp
    x = np.ascontiguousarray(x)
    if not Plan(w, scale, zp, gsize, 0, 0)(x.ctypes.data, out.ctypes.data):
        raise ValueError("x holds a NaN or an infinity: the integer planes cannot represent it")
    return out


# -- several rows: W.T in blocks of channels


@intrinsic
def _dq_group(typingctx, w, t, g, scale, zp, dst, col, zmode):
    """``dst[k, col + c] = (code - z) * scale[t, g, c]`` for the inputs ``k`` of group ``g`` and the 64 channels
    of tile ``t`` (float32 arithmetic; ``dst`` float32, or uint16 for bfloat16 bits rounded to nearest even as
    ``.to()`` rounds); ``zmode`` 0: the zero points ``zp[t, g, c]``, 1: the constant 8."""
    if not isinstance(zmode, types.IntegerLiteral):
        return None
    zm = zmode.literal_value
    bf = dst.dtype == types.uint16
    vi, vf, vb = vec(_I32, 16), vec(_F32, 16), vec(_I8, 16)

    def codegen(context, builder, sig, args):
        wa, ca, za, da = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 3, 4, 5))
        tt, gg, cc = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 6))
        i64 = functools.partial(ir.Constant, _I64)
        _, ko, _ = cgutils.unpack_tuple(builder, wa.shape, 3)
        _, ngroups, _ = cgutils.unpack_tuple(builder, ca.shape, 3)
        _, dcols = cgutils.unpack_tuple(builder, da.shape, 2)
        kk = builder.mul(ko, i64(8))
        og = builder.sdiv(kk, builder.mul(ngroups, i64(8)))  # octets of a group
        prow = builder.mul(builder.add(builder.mul(tt, ngroups), gg), i64(NT))
        svs, zvs = [], []
        for c in range(4):
            svs.append(builder.load(builder.bitcast(builder.gep(ca.data, [builder.add(prow, i64(16 * c))]),
                                                    vf.as_pointer()), align=4))
            if zm == 0:
                zb = builder.load(builder.bitcast(builder.gep(za.data, [builder.add(prow, i64(16 * c))]),
                                                  vb.as_pointer()), align=1)
                zvs.append(builder.uitofp(zb, vf))
            else:
                zvs.append(ir.Constant(vf, [8.0] * 16))
        o0 = builder.mul(gg, og)
        base = builder.gep(wa.data, [builder.mul(builder.add(builder.mul(tt, ko), o0), i64(NT))])
        fifteen = ir.Constant(vi, [15] * 16)
        with cgutils.for_range(builder, og) as loop:
            i = loop.index
            row = builder.gep(base, [builder.mul(i, i64(NT))])
            vs = [builder.load(builder.bitcast(builder.gep(row, [i64(16 * c)]), vi.as_pointer()), align=4)
                  for c in range(4)]
            k0 = builder.mul(builder.add(o0, i), i64(8))
            for j in range(8):
                sh = ir.Constant(vi, [8 * j if j < 4 else 8 * (j - 4) + 4] * 16)  # input 8 o + j (kernel order)
                drow = builder.add(builder.mul(builder.add(k0, i64(j)), dcols), cc)
                vals = []
                for c in range(4):
                    code = builder.uitofp(builder.and_(builder.lshr(vs[c], sh), fifteen), vf)
                    vals.append(builder.fmul(builder.fsub(code, zvs[c]), svs[c]))
                if bf:
                    for h in (0, 1):
                        bits = to_bf16x32(builder, vals[2 * h], vals[2 * h + 1], False)
                        p = builder.gep(da.data, [builder.add(drow, i64(32 * h))])
                        builder.store(bits, builder.bitcast(p, vec(_I16, 32).as_pointer()), align=2)
                else:
                    for c in range(4):
                        p = builder.gep(da.data, [builder.add(drow, i64(16 * c))])
                        builder.store(vals[c], builder.bitcast(p, vf.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(w, t, g, scale, zp, dst, col, zmode), codegen


@_cached
@njit(cache=True, nogil=True)
def _dequant_t_range(w, scale, zp, t0, t1, tb, dst):  # pragma: no cover - compiled
    # dst[k, (t - tb) * 64 + c] = (code - z) * scale for the channels of tiles t0..t1 (float32, or bfloat16 bits)
    sym = zp.shape[0] == 0
    for t in range(t0, t1):
        for g in range(scale.shape[1]):
            if sym:
                _dq_group(w, t, g, scale, zp, dst, (t - tb) * NT, 1)
            else:
                _dq_group(w, t, g, scale, zp, dst, (t - tb) * NT, 0)


DQ_OPERANDS = _omp.Operands("vnni_dq", K=_omp.I64, T=_omp.I64, gsize=_omp.I64, zp_rows=_omp.I64, tb=_omp.I64,
                            cols=_omp.I64, bf=_omp.I64, w=_omp.ADDR, scale=_omp.ADDR, zp=_omp.ADDR, dst=_omp.ADDR)
_read_dq = DQ_OPERANDS.read


@njit(inline="always")
def _dq_chunk(o, i, t0, t1, _a, _b):  # pragma: no cover - compiled
    K, T = o.K, o.T
    G = K // o.gsize
    w = carray(o.w, (T, K // 8, NT), np.uint32)
    scale = carray(o.scale, (T, G, NT), np.float32)
    zp = carray(o.zp, (T, G, NT) if o.zp_rows else (0, 0, 0), np.uint8)
    if o.bf:
        _dequant_t_range(w, scale, zp, o.tb + t0, o.tb + t1, o.tb, carray(o.dst, (K, o.cols), np.uint16))
    else:
        _dequant_t_range(w, scale, zp, o.tb + t0, o.tb + t1, o.tb, carray(o.dst, (K, o.cols), np.float32))
    return 0


def _team_dq(data):  # pragma: no cover - compiled
    _omp.claim_operands(data, _read_dq, _dq_chunk, 0, 0)


_TEAM_DQ = _omp.TeamKernel(_team_dq)


def dequant_t(w: np.ndarray, scale: np.ndarray, zp, gsize: int, t0: int, t1: int, dst: np.ndarray) -> np.ndarray:
    """``W.T`` of the channels of tiles ``t0 .. t1`` into ``dst`` (``[K, 64 (t1 - t0)]``, float32, or uint16
    holding bfloat16 bits rounded to nearest even): ``(code - z) * scale`` in float32, as qcore dequantizes, on
    torch's thread team. Operands as in :func:`gemv_vnni`."""
    K, N = _check(w, scale, zp, gsize)
    T = w.shape[0]
    if isinstance(t0, bool) or isinstance(t1, bool) or not (0 <= t0 <= t1 <= T):
        raise ValueError(f"tiles must satisfy 0 <= t0 <= t1 <= {T}, got {t0}, {t1}")
    cols = (t1 - t0) * NT
    if (not isinstance(dst, np.ndarray) or dst.dtype not in (np.float32, np.uint16) or dst.shape != (K, cols)
            or not dst.flags.c_contiguous):
        raise ValueError(f"dst must be a C-contiguous float32 or uint16 array [{K}, {cols}]")
    zp = np.zeros((0, 0, 0), np.uint8) if zp is None else zp
    n = t1 - t0
    if n == 0:
        return dst
    block = _omp.new_block(n, n, DQ_OPERANDS.pack(K=K, T=T, gsize=gsize, zp_rows=zp.shape[0], tb=t0, cols=cols,
                                                  bf=int(dst.dtype == np.uint16), w=w, scale=scale, zp=zp, dst=dst))
    _omp.run(n, _TEAM_DQ, block, _omp.on_caller, (_TEAM_DQ, block), n, 1, nchunks=n)
    return dst
