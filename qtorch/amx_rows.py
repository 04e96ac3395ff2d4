"""bfloat16 calls of several rows on 8-bit codes held row by row, ``[N, K]`` (the ``int8pack`` layout's codes, the
canonical form), on AMX tiles. A leaf.

PyTorch's ``_weight_int8pack_mm`` takes 1.8-3.5x dense's time at 16-128 rows on an AMX CPU, and dequantizing the
weight for oneDNN (``dequant_mm``) writes and reads it whole again. Here nothing is written but the output: the
product is computed transposed, ``C^T[n, m] = sum_k W[n, k] x[m, k]``, so that the codes' own rows are the A tiles'
rows: each block of 16 channels is converted into a panel of 16 x K (each code times its channel's scale,
rounded to bfloat16: the weight ``F.linear`` multiplies once the dequantized weight is held in bfloat16; it stays in
L1/L2), and multiplied by ``x`` laid out once per call as VNNI B tiles (``B[p][2j + t] = x[m_j][2p + t]``): two
blocks of channels by two blocks of 16 rows of ``x`` a pass (four blocks of channels where ``x`` is one block of
rows), so that each tile loaded serves about one product (``tdpbf16ps``, float32 sums in the C tiles over all of
K, stored straight into the transposed output). The bias is added to the float32 sums, which are rounded once to bfloat16.
The threads of PyTorch's OpenMP team claim blocks of channels (:mod:`qtorch._omp`).

Eligible (:func:`eligible`) for 8-bit codes with one scale per output channel, ``K % 32 == 0``, where the process
may use AMX-BF16 (:func:`qtorch.amx.available`).

>>> import torch
>>> q = torch.ones(16, 32, dtype=torch.int8)
>>> x = torch.ones(2, 32, dtype=torch.bfloat16)
>>> y = linear(x, q, torch.full((16,), 0.5)) if available() else torch.full((2, 16), 16.0)
>>> y[:, :2].tolist()
[[16.0, 16.0], [16.0, 16.0]]
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _omp, amx
from ._ir import AMX_TILE, I8, I16, I64
from ._ir import cached as _cached
from .amx import _amx_fn
from .dequant_rows import _codes8

__all__ = ["available", "eligible", "linear", "run"]

def available() -> bool:
    """Whether this process may run the kernel: AMX-BF16 tiles granted, and AVX512-BF16 for the conversion."""
    return amx.available() and amx._CVT


def eligible(in_features: int) -> bool:
    """Whether a layer of ``in_features`` inputs has whole steps of 32 (says nothing about the CPU)."""
    return in_features > 0 and in_features % 32 == 0


@intrinsic
def _products(typingctx, a, b, c, zero, q, nn, nmb):
    """``C_ij = A_i x B_j`` for ``i < nn``, ``j < nmb`` (literals, ``nn * nmb <= 4``, ``nmb <= 2``) over all of K, each
    step's B tiles loaded once and each A tile once: A tiles of block ``i`` of the panel ``a`` (uint16, 16 nn rows of K
    bfloat16 bits) at element ``16 K i + 32 s`` for step ``s``, rows ``2 K`` bytes apart; B tiles of block ``mb0 + j``
    at element ``(mb0 + j) 16 K + 512 s`` of ``b`` (64-byte rows); C tile ``(i, j)`` stored at
    ``c[coff + 16 i ldc / 4 + 16 j]`` (float32, rows ``ldc`` bytes apart). ``q``: ``(K, mb0, coff, ldc)``; ``zero``:
    16 zero float32 (the C tiles start from a load of row stride 0). With 8 tile registers, ``nn + nmb`` loads a
    step serve ``nn * nmb`` products: 4 for 4 at 2 x 2, 5 for 4 at 4 x 1."""
    if not (isinstance(nn, types.IntegerLiteral) and isinstance(nmb, types.IntegerLiteral)):
        return None
    ni, nj = nn.literal_value, nmb.literal_value
    if not (1 <= nj <= 2 and 1 <= ni and ni * nj <= 4 and isinstance(q, types.UniTuple) and q.count == 4
            and q.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        aa, ba, ca, za = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(4))
        K, mb0, coff, ldc = cgutils.unpack_tuple(builder, args[4], 4)
        i8p = I8.as_pointer()
        load = _amx_fn(builder, "llvm.x86.tileloadd64.internal", AMX_TILE, [I16, I16, i8p, I64])
        store = _amx_fn(builder, "llvm.x86.tilestored64.internal", ir.VoidType(), [I16, I16, i8p, I64, AMX_TILE])
        dp = _amx_fn(builder, "llvm.x86.tdpbf16ps.internal", AMX_TILE, [I16, I16, I16, AMX_TILE, AMX_TILE, AMX_TILE])
        rows, cols = ir.Constant(I16, 16), ir.Constant(I16, 64)

        def c64(v):
            return ir.Constant(I64, v)

        zptr = builder.bitcast(za.data, i8p)
        keys = [(i, j) for i in range(ni) for j in range(nj)]
        init = {key: builder.call(load, [rows, cols, zptr, c64(0)]) for key in keys}
        astride = builder.mul(K, c64(2))
        ablock = builder.mul(K, c64(16))  # elements between two A blocks (and two B blocks)
        bbase = builder.mul(mb0, ablock)
        steps = builder.sdiv(K, c64(32))
        entry = builder.block
        head = builder.append_basic_block("tiles.head")
        body = builder.append_basic_block("tiles.body")
        done = builder.append_basic_block("tiles.done")
        builder.branch(head)
        builder.position_at_end(head)
        s = builder.phi(I64)
        s.add_incoming(c64(0), entry)
        accs = {}
        for key, v in init.items():
            p = builder.phi(AMX_TILE)
            p.add_incoming(v, entry)
            accs[key] = p
        builder.cbranch(builder.icmp_signed("<", s, steps), body, done)
        builder.position_at_end(body)
        bt = []
        for j in range(nj):
            off = builder.add(builder.add(bbase, builder.mul(c64(j), ablock)), builder.mul(s, c64(512)))
            bt.append(builder.call(load, [rows, cols, builder.bitcast(builder.gep(ba.data, [off]), i8p), c64(64)]))
        new = {}
        for i in range(ni):
            off = builder.add(builder.mul(c64(i), ablock), builder.mul(s, c64(32)))
            at = builder.call(load, [rows, cols, builder.bitcast(builder.gep(aa.data, [off]), i8p), astride])
            for j in range(nj):
                new[(i, j)] = builder.call(dp, [rows, cols, cols, accs[(i, j)], at, bt[j]])
        nxt = builder.add(s, c64(1))
        latch = builder.block
        builder.branch(head)
        s.add_incoming(nxt, latch)
        for key in keys:
            accs[key].add_incoming(new[key], latch)
        builder.position_at_end(done)
        crow = builder.sdiv(builder.mul(ldc, c64(16)), c64(4))  # elements between two C blocks of channels
        for (i, j), v in accs.items():
            off = builder.add(builder.add(coff, builder.mul(c64(i), crow)), c64(16 * j))
            builder.call(store, [rows, cols, builder.bitcast(builder.gep(ca.data, [off]), i8p), ldc, v])
        return context.get_dummy_value()

    return types.void(a, b, c, zero, q, nn, nmb), codegen


@njit(inline="always")
def _pass(panel, xb, out, zero, K, mb0, coff, ldc, nn, nmb):  # pragma: no cover - compiled; literal dispatch
    q = (K, mb0, coff, ldc)
    if nmb == 2:
        if nn == 2:
            _products(panel, xb, out, zero, q, 2, 2)
        else:
            _products(panel, xb, out, zero, q, 1, 2)
    elif nn == 4:
        _products(panel, xb, out, zero, q, 4, 1)
    elif nn == 3:
        _products(panel, xb, out, zero, q, 3, 1)
    elif nn == 2:
        _products(panel, xb, out, zero, q, 2, 1)
    else:
        _products(panel, xb, out, zero, q, 1, 1)


@_cached
@njit(cache=True, nogil=True)
def _blocks(codes, scale, xb, M, out, a, e):  # pragma: no cover - compiled
    # channel blocks a .. e: out[n, m] (float32, [Np, Mp]) = sum_k bfloat16(code[n, k] scale[n]) x[m, k]; blocks of
    # channels go by fours where x is one block of rows (one B tile a step serves four A tiles), else by twos, each
    # pass over two blocks of rows (2 x 2 products for 4 tile loads)
    N, K = codes.shape
    Mb = (M + 15) // 16
    Mp = 16 * Mb
    group = 4 if Mb == 1 else 2
    panel = np.zeros(16 * group * K, np.uint16)
    zero = np.zeros(16, np.float32)
    xf = xb.reshape(-1)
    of = out.reshape(-1)
    nb = a
    while nb < e:
        nn = min(group, e - nb)
        n0 = 16 * nb
        nr = min(16 * nn, N - n0)
        for i in range(nr):  # the weight F.linear multiplies: each code times its scale, rounded to bfloat16
            _codes8(panel[i * K:(i + 1) * K], codes[n0 + i], K, scale[n0 + i], np.float32(0.0))
        if nr < 16 * nn:
            panel[nr * K:16 * nn * K] = 0
        for mb0 in range(0, Mb, 2):
            _pass(panel, xf, of, zero, K, mb0, n0 * Mp + 16 * mb0, 4 * Mp, nn, min(2, Mb - mb0))
        nb += nn


# the team kernel's argument block (int64): chunk counter, chunks, shapes, addresses
(_B_NEXT, _B_CHUNKS, _B_N, _B_K, _B_M, _B_NB, _B_Q, _B_S, _B_X, _B_OUT, _B_LEN) = range(11)


def _team_blocks(data):  # pragma: no cover - compiled; runs on every thread of torch's OpenMP team
    b = carray(data, _B_LEN, np.int64)
    N, K, M, nblocks, nchunks = b[_B_N], b[_B_K], b[_B_M], b[_B_NB], b[_B_CHUNKS]
    codes = carray(_omp.as_ptr(b[_B_Q]), (N, K), np.int8)
    scale = carray(_omp.as_ptr(b[_B_S]), N, np.float32)
    xb = carray(_omp.as_ptr(b[_B_X]), ((M + 15) // 16, 16 * K), np.uint16)
    out = carray(_omp.as_ptr(b[_B_OUT]), (16 * nblocks, (M + 15) // 16 * 16), np.float32)
    while True:
        i = _omp.claim(b)
        if i >= nchunks:
            return
        _blocks(codes, scale, xb, M, out, nblocks * i // nchunks, nblocks * (i + 1) // nchunks)


_TEAM_KERNEL = _omp.TeamKernel(_team_blocks)


@_cached
@njit(cache=True, nogil=True)
def _tiles_of(x32, M, xb32):  # pragma: no cover - compiled
    # x32: [M, K / 2] uint32 (pairs of bfloat16 inputs); xb32: [Mb, 16 K / 2]: block mb's pair p, row j at 16 p + j
    Mb, W = xb32.shape
    P = W // 16
    for mb in range(Mb):
        dst = xb32[mb]
        for j in range(16):
            m = 16 * mb + j
            if m < M:
                src = x32[m]
                for p in range(P):
                    dst[16 * p + j] = src[p]
            else:
                for p in range(P):
                    dst[16 * p + j] = 0


def vnni_rows(x: torch.Tensor) -> np.ndarray:
    """``x`` (``[M, K]`` bfloat16, C-contiguous) as B tiles: ``[ceil(M / 16), 16 K]`` bfloat16 bits (uint16), block
    ``mb``'s pair ``p`` of inputs at row ``p``, ``B[p][2 j + t] = x[16 mb + j][2 p + t]`` (rows past M zero)."""
    M, K = x.shape
    xb = np.empty(((M + 15) // 16, 16 * K), np.uint16)
    _tiles_of(x.view(torch.int16).numpy().view(np.uint32), M, xb.view(np.uint32))
    return xb


def run(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias32: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear` on operands a layer has checked: ``x`` C-contiguous bfloat16 ``[M, K]`` (``K % 32 == 0``),
    ``codes`` C-contiguous int8 ``[N, K]``, ``scale`` contiguous float32 of ``N`` values, ``bias32`` contiguous
    float32 ``[N]`` or None. Raises ``RuntimeError`` where :func:`available` is False (a tile instruction in a
    process that was not granted the tile state kills it)."""
    if not available():
        raise RuntimeError("the AMX rows kernel needs AMX-BF16 tiles and AVX512-BF16 (qtorch.amx_rows.available())")
    M, K = x.shape
    N = codes.shape[0]
    scale = scale.reshape(N)
    if M == 0 or N == 0:
        return torch.zeros((M, N), dtype=torch.bfloat16) if bias32 is None else bias32.expand(M, N).to(torch.bfloat16)
    nblocks = (N + 15) // 16
    Mp = (M + 15) // 16 * 16
    out = torch.empty((16 * nblocks, Mp), dtype=torch.float32)  # C^T, whole tiles: the C tiles are stored in it
    xb = vnni_rows(x)
    nchunks = max(1, min(nblocks, 4 * _omp.team_size()))
    block = np.array((0, nchunks, N, K, M, nblocks, codes.data_ptr(), scale.data_ptr(), xb.ctypes.data,
                      out.data_ptr()), np.int64)
    _omp.run(nchunks, _TEAM_KERNEL, block, _blocks, (codes.numpy(), scale.numpy(), xb, M, out.numpy()), nblocks, 1)
    y = out[:N, :M].t()
    if bias32 is not None:
        y = y + bias32  # in float32, before the one rounding, as F.linear adds it
    return y.to(torch.bfloat16, memory_format=torch.contiguous_format)


def linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (codes * scale[:, None]).T + bias`` for ``x [M, K]`` bfloat16, ``codes [N, K]`` int8, ``scale [N]``
    float32 (and ``bias [N]``), on CPU, in bfloat16 (float32 sums, one rounding). Checks every operand (a
    ``TypeError`` / ``ValueError`` names it); raises ``RuntimeError`` where :func:`available` is False."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.dim() != 2 or x.device.type != "cpu":
        raise TypeError(f"x must be a 2-d bfloat16 CPU tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    M, K = x.shape
    if not eligible(K):
        raise ValueError(f"in_features must be a positive multiple of 32, got {K}")
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8 or codes.dim() != 2 or codes.shape[1] != K:
        raise ValueError(f"codes must be int8 [N, {K}], got {getattr(codes, 'dtype', None)} "
                         f"{list(getattr(codes, 'shape', []))}")
    N = codes.shape[0]
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() != N:
        raise ValueError(f"scale must be float32 with {N} values (one per output channel)")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.numel() != N):
        raise ValueError(f"bias must have {N} values")
    bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous().reshape(N)
    return run(x.contiguous(), codes.contiguous(), scale.contiguous().reshape(N), bias32)
