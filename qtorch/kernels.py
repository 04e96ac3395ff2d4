"""Forward kernels of the quantized Linear layers and the table that picks one.

Run-time weight layouts (``qtorch.linear`` holds exactly one per module, converts back for ``state_dict``):

* ``canonical`` -- the state_dict form (docs/packing.md): codes ``[N, ceil(K*bits/8)]`` packed along K
  (int8 for 8-bit symmetric, uint8 otherwise), scale/zero_point in qcore's shapes. Served by
  ``torch._weight_int8pack_mm`` (CPU, bfloat16, guarded) and otherwise by the portable path (dequantize in
  float32, one ``F.linear``; in the input dtype on CUDA) on every device.
* ``int4pack`` (CPU, bfloat16 compute, 4 bits in groups of 32/64/128/256 along K, N % 16 == 0) -- the output of
  ``torch._convert_weight_to_int4pack_for_cpu`` (a CPU-capability-specific blocked layout) with
  ``scales_and_zeros [K/g, N, 2]`` (bf16, ``zero = (8 - zp) * scale``), served by
  ``torch._weight_int4pack_mm_for_cpu``. The way back to the canonical codes is measured by probes and
  verified on every conversion (:func:`int4pack_map`); a mismatch means the layout is never used.
* ``blocked`` (CPU) -- the codes of ``NT`` consecutive output channels stored K-major, one contiguous block
  per tile: ``[N/NT, K, NT]`` for 8 bits and ``[N/NT, K, NT/2]`` for 4 bits (byte ``j`` of a row holds column
  ``j`` in its low nibble and column ``j + NT/2`` in its high nibble); scale and zero point ``[G, N]`` with G the
  number of groups along K (0-d per tensor; zero point ``[0, 0]`` when symmetric: never more bytes than the
  canonical state). One row (decoding) takes :mod:`qtorch.gemv` (LLVM vector IR, accumulators in registers, on
  PyTorch's own OpenMP team) where a tile row holds a multiple of 64 codes (N % 64 == 0); up to
  ``CPU_MAX_ROWS_NUMBA`` rows take :mod:`qtorch.gemm` (a register-blocked micro-kernel over 6 rows x 16
  columns, also vector IR on torch's team; float32 accumulation); for more rows, chunks of tiles are dequantized
  to float32 by :mod:`qtorch.dequant` and multiplied by ``torch.mm``.

Dispatch table (CPU; every other device uses the canonical portable path). "torch pack" is
``TORCH_PACK_KERNELS``: off on AVX2, where the blocked kernels measured faster at every row count; on elsewhere:

==========================================================  ===========================  =====================
module                                                      rows <= CPU_MAX_ROWS_NUMBA   more rows
==========================================================  ===========================  =====================
torch pack, bf16, 8-bit symmetric per channel, K % 16 == 0  ``_weight_int8pack_mm``      ``_weight_int8pack_mm``
torch pack, bf16, 4-bit groups of 32..256 along K, N % 16   ``_weight_int4pack_mm...``   same
8 or 4 bits; per tensor, per channel(0) or groups along K;  rows = 1, N % 64 == 0:       ``tiles_blocked``
N % 16 == 0                                                 ``gemv``; else ``gemm``
anything else (other widths, granularities, N % 16 != 0)    dequantize + ``F.linear``    same
==========================================================  ===========================  =====================

Measurements behind it: development CPU (AMD EPYC, 2 cores, AVX2 without AVX-512/AMX, torch 2.13), K = N = 4096,
best-of-N ms (the 2 cores were shared with other jobs all session: single runs varied up to 5x):

====================================  =========  =========  ==========
kernel                                 rows = 1   rows = 16  rows = 128
====================================  =========  =========  ==========
dense F.linear float32                  2.9-3.4   12-60       46-170
dense F.linear bfloat16                 1.7-2.2   25-40       196-400
dense F.linear float16                  1.5       20          165
_weight_int8pack_mm bfloat16            0.99      8.4-10.6    73-130
_weight_int8pack_mm float32 / float16   22 / 8.6  262 / 214   1800 / 2200   (scalar fallback on AVX2)
_weight_int4pack_mm_for_cpu bfloat16    1.2       6-10.7      50-123
_weight_int4pack_mm_for_cpu f32 / f16   36 / 17   490 / 295   2100 / 3900   (scalar fallback on AVX2)
dequantize whole + F.linear (float32)   28-52     90-140      66-95
first numba kernel int8, float32 x      0.74-1.5  7.4-8       56-180
first numba kernel int4, float32 x      1.7-2.3   9-11        45-126
gemv (one row) int8 / int4, bf16 x      0.69-0.78 / 0.66-0.75 (right after a dense bf16 layer)
gemm int8 / int4, float32 x                       4.2 / 4.7   29 / 42
====================================  =========  =========  ==========

Crossovers recorded from these runs:

* One row: ``gemv`` beats both PyTorch kernels in bfloat16 right after a dense layer (same runs: int8 0.69 vs
  1.13 ms for ``_weight_int8pack_mm``; int4 0.75 vs 1.36 ms for ``_weight_int4pack_mm_for_cpu``). The first numba
  kernel lost to them (1.81 / 1.70 ms): its accumulators lived in memory, and its ``parallel=True`` pool (numba's
  libgomp, not torch's) waited for cores held by torch's spinning OpenMP workers. ``gemv`` runs on torch's team.
* 16 and 128 rows, bfloat16, blocked layout vs PyTorch's kernels (same runs): 8 bits 6.0 vs 6.6 ms and 48.6 vs
  58.2 ms; 4 bits 6.0 vs 8.2 ms and 42.4 vs 51.9 ms. So on AVX2 bfloat16 layers take the blocked layout at every
  row count (``TORCH_PACK_KERNELS`` off). PyTorch's float32/float16 versions of both kernels are scalar loops on
  AVX2 (8-20x slower than dense): never dispatched.
* Tiles of 128 columns vs 64 (same run): 9.5 vs 11.5 ms at 16 rows and 56 vs 65 ms at 128 rows for 8 bits; at one
  row equal once ``gemv`` reads whole 128-byte rows (0.705 vs 0.706 ms; two strided half-row passes took 0.86).
* ``gemm`` vs the first numba kernel (same runs, float32): 1.4-2.5x faster at every shape and row count measured
  (384x384 to 4096x4096, 2 to 128 rows), e.g. 4096x4096 at 128 rows 29 vs 59 ms (int8), 42 vs 58 ms (int4).
* ``gemm`` vs dequantized tiles + ``torch.mm`` (float32, same runs): ``gemm`` ahead up to 256 rows at 8 bits
  (4096x4096: 64 vs 84 ms at 256 rows; level at 512) and mostly at 4 bits (384x384: 0.71 vs 0.77 ms at 256 rows,
  4096x4096: 74 vs 62 ms); tiles ahead from 512 rows: the bound stays 256 rows.
* float32 matmul of dequantized weights beats bf16/fp16 dense matmul at >= 16 rows (no bf16/fp16 FMA on AVX2):
  the tiles and portable paths compute in float32 for every input dtype on CPU.
* dense float32 ``F.linear`` at 2..16 rows is irregular here (12-60 ms at 16 rows): MKL picks a GEMM path that
  is slower per row than its GEMV at 1 row.
"""

from __future__ import annotations

import os

import torch

from . import dequant, gemm, gemv

__all__ = ["CPU_MAX_ROWS_NUMBA", "choose_path", "gemm_blocked", "dequant_blocked", "unpack_codes",
           "dequantize_canonical", "blocked_tile", "to_blocked", "from_blocked", "int8pack_ok", "tiles_blocked",
           "tiles_blocked_impl"]

# ---------------------------------------------------------------------------------------------------------------
# The dispatch table. Rows (= x.numel() // in_features) up to this bound take the numba kernel on CPU; more rows
# take float32 matmul of dequantized tiles. Crossovers measured with benchmarks/bench_linear.py at K = N = 4096
# (see the module docstring); keyed by (activation dtype, bits of the blocked layout).
CPU_MAX_ROWS_NUMBA = {
    (torch.float32, 8): 256, (torch.bfloat16, 8): 256, (torch.float16, 8): 256,
    (torch.float32, 4): 256, (torch.bfloat16, 4): 256, (torch.float16, 4): 256,
}
# bfloat16 modules: PyTorch's int8pack / int4pack kernels, or the blocked layout's kernels? On AVX2 the blocked ones
# win at every row count (development CPU, bench_linear.py, same runs: rows=1 0.69 vs 1.13 ms at 8 bits and 0.75 vs
# 1.36 ms at 4 bits; rows=128 48.6 vs 58.2 ms and 42.4 vs 51.9 ms). Where PyTorch has AVX-512 / AMX kernels and
# inductor templates for them (docs/kernels.md), its kernels stay. QTORCH_TORCH_PACK=1 / 0 forces either.
TORCH_PACK_KERNELS = {"1": True, "0": False}.get(os.environ.get("QTORCH_TORCH_PACK", ""),
                                                 torch.backends.cpu.get_cpu_capability() != "AVX2")
# Columns per tile of the blocked layout, largest first: the largest dividing N is used.
_TILES = (128, 64, 32, 16)
# Dequantized float32 bytes per chunk of the many-rows path (bounds its temporary memory).
_CHUNK_BYTES = 16 << 20


def blocked_tile(out_features: int) -> int:
    """Tile width for the blocked layout, or 0 when ``out_features`` has no supported tile (use canonical)."""
    for nt in _TILES:
        if out_features % nt == 0:
            return nt
    return 0


def int8pack_ok(dtype: torch.dtype, in_features: int) -> bool:
    """Preconditions of ``torch._weight_int8pack_mm`` that keep it from crashing (docs/kernels.md).

    bfloat16 with ``K % 16 != 0`` (at >= 4 rows) or ``K % 8 != 0`` kills the process; float16/float32 are safe at
    any K but are scalar (slow) on AVX2. Checked once per (dtype, K), never per call.
    """
    if dtype == torch.bfloat16:
        return in_features % 16 == 0
    return dtype in (torch.float16, torch.float32)


def choose_path(device_type: str, dtype: torch.dtype, rows: int, layout: str, bits: int) -> str:
    """Name of the forward path for a call: ``numba``, ``tiles`` (dequantized tiles + f32 matmul) or ``dense``.

    The blocked layout exists on CPU only; ``dense`` is the canonical layout (int8pack or dequantize + matmul).

    Depends only on shapes, dtypes and module configuration, so it is constant under ``torch.compile``.
    """
    if layout == "int4pack":
        return "int4pack" if device_type == "cpu" and dtype == torch.bfloat16 else "dense"
    if layout == "blocked":
        if device_type == "cpu" and 0 < rows <= CPU_MAX_ROWS_NUMBA.get((dtype, bits), 0):
            return "numba"
        return "tiles"
    return "dense"


# ---------------------------------------------------------------------------------------------------------------
# The kernels (qtorch.gemv / gemm / dequant, leaves) as torch custom ops: opaque to torch.compile (fullgraph
# works), CPU only.

def blocked_params(scale: torch.Tensor, zero_point: torch.Tensor, n: int):
    """Scale and zero point of the blocked layout as the kernels read them, ``[G, N]``: the layout keeps a
    per-tensor scale / zero point 0-d (as in the canonical state), expanded here to a temporary ``[1, N]``."""
    if scale.dim() == 0:
        scale = scale.reshape(1, 1).expand(1, n).contiguous()
    if zero_point.dim() == 0:
        zero_point = zero_point.reshape(1, 1).expand(1, n).contiguous()
    return scale.contiguous(), zero_point.contiguous()  # no copies for the layout's own buffers


def gemm_blocked_impl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """``x[M, K] @ dequant(qweight).T`` from the blocked layout, computed in float32, returned in ``x.dtype``.

    The body of the ``qtorch::gemm_blocked`` op; eager callers without autograd may call it directly (the
    op's dispatch costs ~0.1 ms, 10% of a 4096x4096 single-row call)."""
    xf = x.detach().to(torch.float32).contiguous()
    qweight = qweight.contiguous()  # the kernels address arrays by shape: no copy for the layout's own buffer
    scale, zero_point = blocked_params(scale, zero_point, out_features)
    out = torch.empty((xf.shape[0], out_features), dtype=torch.float32)
    if xf.shape[0] == 1 and gemv.eligible(bits, qweight.shape[2]):  # decoding: the one-row kernel
        # bf16/f16 inputs: the zero point folded per group (its float32 rounding stays below theirs)
        gemv._gemv_tensors(xf, qweight, scale, zero_point, group_size, bits, out, x.dtype != torch.float32)
    else:
        gemm._gemm_tensors(xf, qweight, scale, zero_point, group_size, bits, out)
    return out.to(x.dtype)


def gemv_plan(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int, bits: int):
    """A :class:`qtorch.gemv.Plan` of a blocked layout's own buffers for one-row calls (:func:`gemv_planned`), or
    None where the plain path serves: a layout the one-row kernel does not read, an empty layer, or a per-tensor
    scale (expanded per call, so that an in-place update of the 0-d buffer is always seen)."""
    if (qweight.device.type != "cpu" or qweight.dim() != 3 or 0 in qweight.shape or scale.dim() != 2
            or zero_point.dim() != 2 or not gemv.eligible(bits, qweight.shape[2])
            or not (qweight.is_contiguous() and scale.is_contiguous() and zero_point.is_contiguous())):
        return None
    return gemv.Plan(qweight.numpy(), scale.numpy(), zero_point.numpy(), group_size, bits, qweight.data_ptr(),
                     scale.data_ptr(), zero_point.data_ptr())


def gemv_planned(x: torch.Tensor, plan, out_features: int) -> torch.Tensor:
    """:func:`gemm_blocked_impl` for one row ``x[1, K]`` with a layer's :func:`gemv_plan`: same kernel, same
    result, less Python per call (eager, no autograd)."""
    xf = x.detach().to(torch.float32).contiguous()
    out = torch.empty((1, out_features), dtype=torch.float32)
    gemv.run_plan(plan, xf.numpy().reshape(-1), xf.data_ptr(), out.numpy().reshape(-1), out.data_ptr(),
                  x.dtype != torch.float32)
    return out.to(x.dtype)


@torch.library.custom_op("qtorch::gemm_blocked", mutates_args=())
def gemm_blocked(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """:func:`gemm_blocked_impl` as an op: opaque to torch.compile (fullgraph works), with an input gradient."""
    return gemm_blocked_impl(x, qweight, scale, zero_point, group_size, bits, out_features)


@gemm_blocked.register_fake
def _(x, qweight, scale, zero_point, group_size, bits, out_features):
    return x.new_empty((x.shape[0], out_features))


def tiles_blocked_impl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                       group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """``x[M, K] @ dequant(qweight).T`` for many rows (CPU): chunks of tiles dequantized to float32
    (:mod:`qtorch.dequant`), each multiplied by one float32 matmul. The body of the ``qtorch::tiles_blocked`` op;
    eager callers without autograd call it directly (the op's dispatch costs ~0.05 ms)."""
    T, K = qweight.shape[0], qweight.shape[1]
    NT = qweight.shape[2] * (2 if bits == 4 else 1)
    per_chunk = max(1, _CHUNK_BYTES // (K * NT * 4))
    xf = x.detach().to(torch.float32).contiguous()
    scale, zero_point = blocked_params(scale, zero_point, out_features)
    wq, sq, zq = qweight.contiguous().numpy(), scale.numpy(), zero_point.numpy()
    outs = []
    for t0 in range(0, T, per_chunk):
        t1 = min(T, t0 + per_chunk)
        w = torch.empty((K, (t1 - t0) * NT), dtype=torch.float32)  # C-contiguous: one numba signature
        dequant.dequant_tiles(wq, bits, sq, zq, t0, t1, w.numpy())
        outs.append(torch.mm(xf, w))
    y = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    return y[:, :out_features].to(x.dtype)


@torch.library.custom_op("qtorch::tiles_blocked", mutates_args=())
def tiles_blocked(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """:func:`tiles_blocked_impl` as an op: opaque to torch.compile, so that freezing cannot constant-fold the
    dequantized weight into a full-precision copy; with an input gradient."""
    return tiles_blocked_impl(x, qweight, scale, zero_point, group_size, bits, out_features)


@tiles_blocked.register_fake
def _(x, qweight, scale, zero_point, group_size, bits, out_features):
    return x.new_empty((x.shape[0], out_features))


def _setup_backward(ctx, inputs, output):
    x, qweight, scale, zero_point, group_size, bits, out_features = inputs
    ctx.save_for_backward(qweight, scale, zero_point)
    ctx.bits, ctx.group, ctx.n, ctx.x_dtype = bits, group_size, out_features, x.dtype


def _backward(ctx, grad):
    # d(x @ W.T)/dx = grad @ W: the codes stay frozen (no gradient), the input gets one (adapters, probes).
    qweight, scale, zero_point = ctx.saved_tensors
    wt = dequant_blocked(qweight, scale, zero_point, bits=ctx.bits, group=ctx.group)  # [T, K, NT] = W.T tiles
    T, K, NT = wt.shape
    wt = wt.permute(1, 0, 2).reshape(K, T * NT)[:, :ctx.n]
    gx = torch.mm(grad.to(torch.float32), wt.t()).to(ctx.x_dtype)
    return gx, None, None, None, None, None, None


gemm_blocked.register_autograd(_backward, setup_context=_setup_backward)
tiles_blocked.register_autograd(_backward, setup_context=_setup_backward)


# ---------------------------------------------------------------------------------------------------------------
# torch._weight_int4pack_mm_for_cpu: its packed layout depends on the CPU capability (blocks of 32 rows on AVX2,
# 64 on AVX-512, pairs otherwise), so the way back to canonical codes is measured, not assumed: tiny probes give
# each row's byte base, per-k stride and nibble, and every conversion is verified against the codes it packed.

INT4PACK_GROUPS = (32, 64, 128, 256)
_INT4_MAPS: dict = {}


def _int4pack_probe(n: int, k: int):
    """(byte [n, k] int64, high-nibble flag [n, k] bool) of code (row, col) in the int4pack layout of [n, k]."""
    digits = max(1, ((n - 1).bit_length() + 3) // 4)
    rows = torch.arange(n, dtype=torch.int32)
    byte = torch.full((n, k), -1, dtype=torch.int64)
    hi = torch.zeros((n, k), dtype=torch.bool)
    for col in range(k):
        mark = torch.zeros((n, k), dtype=torch.int32)
        mark[:, col] = 1
        pos = _nibbles(torch._convert_weight_to_int4pack_for_cpu(mark, 1)).nonzero().flatten()
        if pos.numel() != n:
            raise RuntimeError("int4pack probe: unexpected layout")
        ids = torch.zeros(n, dtype=torch.int64)
        for d in range(digits):  # rows identified by their base-16 digits, one probe per digit
            codes = torch.zeros((n, k), dtype=torch.int32)
            codes[:, col] = (rows >> (4 * d)) & 15
            nib = _nibbles(torch._convert_weight_to_int4pack_for_cpu(codes, 1))
            ids += nib[pos].to(torch.int64) << (4 * d)
        byte[ids, col] = pos // 2
        hi[ids, col] = (pos % 2).bool()
    return byte, hi


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    b = packed.reshape(-1).to(torch.int16)
    return torch.stack([b & 15, b >> 4], 1).reshape(-1)


def int4pack_map(n: int, k: int):
    """(base [n], stride [n], offset [n], hi [n]): code (row, col) of an [n, k] weight sits in byte
    ``base*k + col*stride + offset`` of the int4pack layout, high nibble where ``hi``. Measured, cached per n."""
    if n not in _INT4_MAPS:
        b2, h2 = _int4pack_probe(n, 2)
        b4, h4 = _int4pack_probe(n, 4)
        base = (b4[:, 0] - b2[:, 0]) // 2
        stride = b2[:, 1] - b2[:, 0]
        offset = b2[:, 0] - 2 * base
        hi = h4[:, 0]
        if not (torch.equal(b4, base[:, None] * 4 + torch.arange(4)[None, :] * stride[:, None] + offset[:, None])
                and bool(torch.all(h4 == hi[:, None])) and bool(torch.all(h2 == hi[:, None]))):
            raise RuntimeError("int4pack layout is not affine in k on this CPU")
        _INT4_MAPS[n] = (base, stride, offset, hi)
    return _INT4_MAPS[n]


def int4pack_unpack(packed: torch.Tensor, n: int, k: int, rows_per_chunk: int = 256) -> torch.Tensor:
    """Unsigned 4-bit codes ``[n, k]`` (uint8) from ``torch._convert_weight_to_int4pack_for_cpu`` output."""
    base, stride, offset, hi = int4pack_map(n, k)
    flat = packed.reshape(-1)
    out = torch.empty((n, k), dtype=torch.uint8)
    cols = torch.arange(k, dtype=torch.int64)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        idx = (base[r0:r1, None] * k + cols[None, :] * stride[r0:r1, None] + offset[r0:r1, None])
        b = flat[idx.reshape(-1)].reshape(r1 - r0, k)
        out[r0:r1] = torch.where(hi[r0:r1, None], b >> 4, b & 15)
    return out


def int4pack_dequant(packed: torch.Tensor, scale: torch.Tensor, zero_point, *, n: int, k: int,
                     group: int) -> torch.Tensor:
    """``(codes - zero_point) * scale`` ``[n, k]`` in float32 from the int4pack layout (canonical scale ``[n, k/g]``,
    zero point ``[n, k/g]`` uint8, or ``None`` for symmetric codes, which carry the offset 8)."""
    c = int4pack_unpack(packed, n, k).to(torch.float32).reshape(n, k // group, group)
    z = 8.0 if zero_point is None else zero_point.reshape(n, k // group, 1).to(torch.float32)
    return ((c - z) * scale.reshape(n, k // group, 1)).reshape(n, k)


class Int8PackMM(torch.autograd.Function):
    """``torch._weight_int8pack_mm`` (no derivative in PyTorch) with an input gradient ``grad @ (codes * scale)``.

    ``apply(x, qweight [N, K] int8, scale_compute [N] (x's dtype), scale [N] float32)``. Used only when the input
    needs a gradient: the no-grad forward calls the op itself, so that inductor still sees it."""

    @staticmethod
    def forward(ctx, x, qweight, scale_compute, scale):
        ctx.save_for_backward(qweight, scale)
        return torch._weight_int8pack_mm(x, qweight, scale_compute)

    @staticmethod
    def backward(ctx, grad):
        qweight, scale = ctx.saved_tensors
        gx = torch.mm(grad.to(torch.float32) * scale, qweight.to(torch.float32))
        return gx.to(grad.dtype), None, None, None


class Int4PackMM(torch.autograd.Function):
    """``torch._weight_int4pack_mm_for_cpu`` (no derivative in PyTorch) with an input gradient ``grad @ W``, W
    decoded from the int4pack layout in the backward only (see :class:`Int8PackMM`).

    ``apply(x, packed, group, scales_and_zeros, scale [N, K/g] float32, zero_point [N, K/g] or None, n, k)``."""

    @staticmethod
    def forward(ctx, x, packed, group, scales_and_zeros, scale, zero_point, n, k):
        ctx.save_for_backward(packed, scale, zero_point)
        ctx.group, ctx.n, ctx.k = group, n, k
        return torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)

    @staticmethod
    def backward(ctx, grad):
        packed, scale, zero_point = ctx.saved_tensors
        w = int4pack_dequant(packed, scale, zero_point, n=ctx.n, k=ctx.k, group=ctx.group)
        gx = torch.mm(grad.to(torch.float32), w)
        return gx.to(grad.dtype), None, None, None, None, None, None, None


def to_int4pack(codes: torch.Tensor, scale: torch.Tensor, zero_point, *, symmetric: bool, group: int):
    """Unsigned codes ``[n, k]`` (symmetric ones with the offset 8) -> (packed, scales_and_zeros [k/g, n, 2] bf16)
    or ``None`` when the round trip through the measured layout map is not exact (never use it then)."""
    n, k = codes.shape
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    try:
        if not torch.equal(int4pack_unpack(packed, n, k), codes.to(torch.uint8)):
            return None
    except RuntimeError:
        return None
    # the kernel computes (u - 8) * scale + zero, so an integer zero point zp maps to zero = (8 - zp) * scale
    s = scale.reshape(n, k // group).to(torch.float32)
    z = torch.zeros_like(s) if symmetric else (8.0 - zero_point.reshape(n, k // group).to(torch.float32)) * s
    sz = torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, sz


# ---------------------------------------------------------------------------------------------------------------
# Layout conversions and torch dequantization (device-agnostic torch ops)

def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Unsigned codes ``[..., length]`` (int16) from rows packed LSB-first along the last axis (docs/packing.md)."""
    if bits == 8:
        return packed[..., :length].to(torch.int16)
    p = packed.to(torch.int16)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.int16)
        codes = (p.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :length]
    # widths that straddle bytes: read 16 bits starting at the element's first byte
    off = torch.arange(length, device=packed.device, dtype=torch.int64) * bits
    byte, shift = off // 8, (off % 8).to(torch.int16)
    padded = torch.nn.functional.pad(p, (0, 1))
    lo = padded.index_select(-1, byte)
    hi = padded.index_select(-1, byte + 1)
    return ((lo | (hi << 8)) >> shift) & mask


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_codes` (uint8 rows of ``ceil(length*bits/8)`` bytes); codes must be < 2**bits."""
    length = codes.shape[-1]
    nbytes = (length * bits + 7) // 8
    if bits == 8:
        return codes.to(torch.uint8)
    c = codes.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        pad = nbytes * per - length
        c = torch.nn.functional.pad(c, (0, pad)).reshape(*codes.shape[:-1], nbytes, per)
        shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
        return (c << shifts).sum(-1).to(torch.uint8)
    # general widths: scatter every bit of every code into its byte
    out = torch.zeros(*codes.shape[:-1], nbytes, dtype=torch.int32, device=codes.device)
    pos = torch.arange(length, device=codes.device, dtype=torch.int64) * bits
    for b in range(bits):
        bitpos = pos + b
        val = ((c >> b) & 1) << (bitpos % 8).to(torch.int32)
        out.index_add_(-1, bitpos // 8, val)
    return out.to(torch.uint8)


def _param_view(p: torch.Tensor, kind: str, axis: int, n: int, k: int, g: int) -> torch.Tensor:
    """Broadcastable view of a scale/zero point against the codes reshaped by :func:`_codes_view`."""
    if kind == "tensor":
        return p
    if kind == "channel":
        return p.reshape(n, 1) if axis == 0 else p.reshape(1, k)
    return p.reshape(n, k // g, 1) if axis == 1 else p.reshape(n // g, 1, k)


def _codes_view(c: torch.Tensor, kind: str, axis: int, n: int, k: int, g: int) -> torch.Tensor:
    if kind != "group":
        return c
    return c.reshape(n, k // g, g) if axis == 1 else c.reshape(n // g, g, k)


def dequantize_canonical(qweight, scale, zero_point, *, bits: int, symmetric: bool, kind: str, axis: int,
                         group: int, out_features: int, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """``(codes - zero_point) * scale`` in float32 (as qcore computes it), returned ``[N, K]`` in ``dtype``."""
    n, k = out_features, in_features
    if bits == 8 and symmetric:
        c = qweight.to(torch.float32)
    else:
        c = unpack_codes(qweight, bits, k).to(torch.float32)
        if symmetric:
            c = c - float(1 << (bits - 1))
    c = _codes_view(c, kind, axis, n, k, group)
    if zero_point is not None:
        c = c - _param_view(zero_point, kind, axis, n, k, group).to(torch.float32)
    w = c * _param_view(scale, kind, axis, n, k, group)
    return w.reshape(n, k).to(dtype)


def _scale_rows(p: torch.Tensor, kind: str, n: int, k: int, g: int) -> torch.Tensor:
    """Canonical scale/zero point -> ``[G, N]`` rows of the blocked layout (G groups along K); per tensor: 0-d."""
    if kind == "tensor":
        return p.reshape(()).clone()
    if kind == "channel":
        return p.reshape(1, n).contiguous()
    return p.reshape(n, k // g).t().contiguous()


def _scale_canonical(p: torch.Tensor, kind: str, n: int, k: int, g: int) -> torch.Tensor:
    if kind == "tensor":
        return p.reshape(()).clone()
    if kind == "channel":
        return p.reshape(n).clone()
    return p.t().contiguous()


def to_blocked(qweight, scale, zero_point, *, bits: int, symmetric: bool, kind: str, group: int,
               out_features: int, in_features: int, tile: int):
    """Canonical (qweight, scale, zero_point) -> blocked (qweight, scale [G,N], zero_point [G,N] or [0,0]).

    Per tensor, scale and zero point stay 0-d; symmetric codes have no zero point ([0, 0]; 4-bit ones are stored
    with the offset 8, which the kernels subtract): the layout holds no more bytes than the canonical state."""
    n, k = out_features, in_features
    T = n // tile
    if bits == 8:
        wb = qweight.reshape(T, tile, k).transpose(1, 2).contiguous()
    else:  # 4 bits: unsigned codes (symmetric ones with the offset 8)
        c = unpack_codes(qweight, 4, k).reshape(T, tile, k)
        h = tile // 2
        wb = (c[:, :h] | (c[:, h:] << 4)).to(torch.uint8).transpose(1, 2).contiguous()
    zp = (torch.zeros((0, 0), dtype=torch.uint8, device=qweight.device) if zero_point is None
          else _scale_rows(zero_point, kind, n, k, group))
    return wb, _scale_rows(scale, kind, n, k, group), zp


def from_blocked(wb, scale, zero_point, *, bits: int, symmetric: bool, kind: str, group: int,
                 out_features: int, in_features: int):
    """Inverse of :func:`to_blocked`: the canonical (qweight, scale, zero_point)."""
    n, k = out_features, in_features
    if bits == 8:
        q = wb.transpose(1, 2).reshape(n, k).contiguous()
        zp = None if symmetric else _scale_canonical(zero_point, kind, n, k, group)
    else:
        b = wb.transpose(1, 2).to(torch.int16)  # [T, H, K]
        c = torch.cat([b & 15, b >> 4], dim=1).reshape(n, k)
        q = pack_codes(c, 4)
        zp = None if symmetric else _scale_canonical(zero_point, kind, n, k, group)
    return q, _scale_canonical(scale, kind, n, k, group), zp


def dequant_blocked(wb, scale, zero_point, *, bits: int, group: int, t0: int = 0, t1: int | None = None,
                    dtype=torch.float32) -> torch.Tensor:
    """Dequantized tiles ``[t1-t0, K, NT]`` of the blocked layout (``W.T`` tile by tile), in ``dtype``."""
    t1 = wb.shape[0] if t1 is None else t1
    w = wb[t0:t1]
    scale, zero_point = blocked_params(scale, zero_point, wb.shape[0] * wb.shape[2] * (2 if bits == 4 else 1))
    if bits == 8:
        c = w.to(dtype)
    else:
        c = torch.cat([w & 15, w >> 4], dim=2).to(dtype)
    T, K, NT = c.shape
    G = scale.shape[0]
    gs = K // G
    cols = slice(t0 * NT, t1 * NT)
    c = c.reshape(T, G, gs, NT)
    s = scale[:, cols].reshape(G, T, NT).transpose(0, 1).unsqueeze(2).to(dtype)
    if zero_point.shape[0]:
        z = zero_point[:, cols].reshape(G, T, NT).transpose(0, 1).unsqueeze(2).to(dtype)
        c = c - z
    elif bits == 4:  # symmetric 4-bit codes carry the offset 8
        c = c - 8.0
    return (c * s).reshape(T, K, NT)
