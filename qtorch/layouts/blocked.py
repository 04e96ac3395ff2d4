"""The blocked layout (CPU, 1 to 8 bits, held in nibbles or bytes): qtorch's own kernels, tile by tile.

The codes of ``NT`` consecutive output channels are stored K-major, one contiguous block per tile:
``[N/NT, K, NT]`` for 8 bits and ``[N/NT, K, NT/2]`` for 4 bits (byte ``j`` of a row holds column ``j`` in its low
nibble and column ``j + NT/2`` in its high nibble); scale and zero point ``[G, N]`` with G the number of groups
along K (0-d per tensor; zero point ``[0, 0]`` when symmetric: never more bytes than the canonical state).

Eligible on CPU for 1 to 8 bits (codes of 1-3 bits held as nibbles and 5-7 bits as bytes, :func:`container_bits`:
the same kernels, at the memory of 4 or 8 bits per code), per tensor, per output channel or in groups along K (a
ragged last group is completed with codes equal to its zero point, which dequantize to exactly 0, and x with
zeros: :func:`padded_k`), where a tile width (128, 64, 32 or 16, the largest dividing N) exists. One row
(decoding) takes :mod:`qtorch.gemv` (LLVM vector IR, accumulators
in registers, on PyTorch's own OpenMP team) where a tile row holds a multiple of 64 codes (N % 64 == 0), through a
per-layer plan built once; up to ``CPU_MAX_ROWS_NUMBA`` rows take :mod:`qtorch.gemm` (a register-blocked
micro-kernel over 6 rows x 16 columns; float32 accumulation); more rows take chunks of tiles dequantized to float32
by :mod:`qtorch.dequant` and multiplied by ``torch.mm`` (``tiles``). The kernels are torch custom ops (opaque to
``torch.compile``, with an input gradient); eager calls without autograd call their bodies directly.

The layout is ``tuned``: CPU calls of several rows also offer ``tiles_act`` (chunks of tiles dequantized in the
activation dtype, bfloat16 or float16, and multiplied by ``torch.mm`` in that dtype: oneDNN's AMX / AVX-512 kernels
where the CPU has them) and, where it is not the own path, ``tiles``; on CPUs with AMX-BF16 calls of any row
count also offer ``amx`` (:mod:`qtorch.amx`: the codes converted to bfloat16 tiles in L1, never a dequantized
weight; float32 accuracy for float32 inputs; K and group sizes multiples of 32); on CPUs with AVX512-BF16 and no AMX,
bfloat16/float16 calls of 2+ rows also offer ``bf16dot`` (:mod:`qtorch.bf16dot`: the same panels by ``vdpbf16ps``),
and one bfloat16 row of 4-bit codes gemv's dot-product variant under that name.
The layer times them on this machine (:mod:`qtorch.autotune`) and keeps the fastest per row bucket.

>>> import torch
>>> BLOCKED.paths("cpu", torch.bfloat16, 128, 8)[:3], BLOCKED.paths("cpu", torch.float32, 1000, 4)[:1]
(('numba', 'tiles_act', 'tiles'), ('tiles',))
"""

from __future__ import annotations

import threading
import weakref

import torch

from .. import amx, autotune, bf16dot, dequant, gemm, gemv, native_ops, planes, prefetch
from .._infer_ops import constant_result, define_twin, needs_grad, plain_eager
from .._kept import ByTensor
from ..sibling_calls import Part
from .base import Layout, single_row_shapes
from .codec import complete_groups, pack_codes, pad_columns, padded_k, unpack_codes

__all__ = ["BLOCKED", "CPU_MAX_ROWS_NUMBA", "blocked_tile", "padded_k", "container_bits", "blocked_params",
           "to_blocked", "from_blocked",
           "dequant_blocked", "gemm_blocked", "gemm_blocked_impl", "tiles_blocked", "tiles_blocked_impl",
           "tiles_act_blocked", "tiles_act_blocked_impl", "amx_blocked", "amx_blocked_impl", "bf16dot_blocked",
           "bf16dot_blocked_impl", "gemv_plan", "gemv_planned", "TILES_ACT", "AMX", "BF16DOT", "INT8DOT"]

# Rows (= x.numel() // in_features) up to this bound take the gemm kernel on CPU; more rows take float32 matmul
# of dequantized tiles. Crossovers measured with benchmarks/bench_linear.py at K = N = 4096 (see
# qtorch.layouts); keyed by (activation dtype, bits).
CPU_MAX_ROWS_NUMBA = {
    (torch.float32, 8): 256, (torch.bfloat16, 8): 256, (torch.float16, 8): 256,
    (torch.float32, 4): 256, (torch.bfloat16, 4): 256, (torch.float16, 4): 256,
}
# Columns per tile, largest first: the largest dividing N is used.
_TILES = TILE_WIDTHS = (128, 64, 32, 16)
# Dequantized bytes per chunk of the tiles paths (bounds their temporary memory, held per thread). 8 MB won on the
# AMX Xeon (one thread, K = N = 4096, 128 rows, bfloat16, two alternating runs of 15: dense/tiles_act 0.73 / 0.79 /
# 0.62 / 0.73 and 0.66 / 0.71 / 0.68 / 0.66 for 4 / 8 / 16 / 32 MB; float32 also best at 8 MB), as for dequant_mm
_CHUNK_BYTES = 8 << 20
#: the path that dequantizes in the activation dtype (bfloat16, float16) and multiplies in it
TILES_ACT = "tiles_act"
_ACT_DTYPES = (torch.bfloat16, torch.float16)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the rows the AMX kernel takes
#: the path on AMX tiles (:mod:`qtorch.amx`), offered on CPUs this process may use them on
AMX = "amx"
#: the path on AVX512-BF16 dot products (:mod:`qtorch.bf16dot`), offered on CPUs that have them but no AMX
BF16DOT = "bf16dot"
#: bfloat16 / float16 rows of 4-bit codes by integer dot products (:func:`qtorch.gemv.planes_available`: CPUs with
#: AVX2 and without AVX-512): the one-row kernel's integer variant, offered up to :data:`INT8DOT_OFFERED` rows
INT8DOT = "int8dot"
#: rows that ``int8dot`` runs one at a time by the one-row kernel's integer variant (batched decoding of two
#: sequences); more rows take the few-rows kernel, as ``numba`` does. On the 2-core Zen 3, 4096x4096 g128 bfloat16,
#: the few-rows kernel against row by row: 2 rows 1.20 against 0.91 ms, 3 rows 1.41 / 1.34, 4 rows 1.50 / 1.79
INT8DOT_ROWS = 2
#: the rows ``int8dot`` is offered for: the row buckets of 1 and 2-4 rows (:data:`qtorch.autotune.ROW_BUCKETS`)
INT8DOT_OFFERED = autotune.ROW_BUCKETS[1]
# QuantizedWeight -> (qweight, scale, zero_point, its one-row plan or None): weak keys, so the plan goes with the
# weight, and copying or pickling a layer never copies it.
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def blocked_tile(out_features: int) -> int:
    """Tile width for the blocked layout, or 0 when ``out_features`` has no supported tile (use canonical)."""
    for nt in _TILES:
        if out_features % nt == 0:
            return nt
    return 0


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
                      group_size: int, bits: int, out_features: int, dot: bool = False,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[M, K] @ dequant(qweight).T`` from the blocked layout, computed in float32, returned in ``x.dtype``.

    The body of the ``qtorch::gemm_blocked`` op; eager callers without autograd may call it directly (the
    op's dispatch costs ~0.1 ms, 10% of a 4096x4096 single-row call). ``dot``: one row of 4-bit codes by the
    one-row kernel's dot-product variant where the CPU and layer allow it (the ``bf16dot`` path's one bfloat16 row
    on CPUs with AVX512-BF16, the ``int8dot`` path's one bfloat16 / float16 row on CPUs with AVX2 and without
    AVX-512: :func:`qtorch.gemv.run_plan`). ``bias`` (``[N]``, no gradient):
    added to the float32 sums as the kernel stores them where ``x`` is float32 and has several rows (the same sums
    as adding it after), else afterwards in place."""
    if x.shape[0] == 1 and bias is None:  # decoding: the launch kept for these operands, if any
        y = _op_decode(x, qweight, scale, zero_point, group_size, bits, out_features, dot)
        if y is not None:
            return y
    qweight = qweight.contiguous()  # the kernels address arrays by shape: no copy for the layout's own buffer
    scale, zero_point = blocked_params(scale, zero_point, out_features)
    one_row = (x.shape[0] == 1 and gemv.eligible(bits, qweight.shape[2])  # decoding: the one-row kernel
               and x.dtype in gemv.TORCH_KINDS)
    if one_row:
        plan = _op_plan(qweight, scale, zero_point, group_size, bits)
        if plan is not None:
            y = gemv_planned(x, plan, out_features, dot=dot)
        else:
            x = _row(x)
            out = torch.empty((1, out_features), dtype=x.dtype, device="cpu")
            y = gemv._gemv_tensors(x, qweight, scale, zero_point, group_size, bits, out, _folds(x.dtype, bits),
                                   dot=dot)
        return y if bias is None else y.add_(bias.to(y.dtype))
    xf = _float32(x)
    out = torch.empty((xf.shape[0], out_features), dtype=torch.float32, device="cpu")
    fused = bias is not None and x.dtype == torch.float32
    gemm._gemm_tensors(xf, qweight, scale, zero_point, group_size, bits, out,
                       bias=bias.detach().to(torch.float32).contiguous() if fused else None)
    y = _as(out, x.dtype)
    return y if bias is None or fused else y.add_(bias.to(y.dtype))


def _float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached, float32 and C-contiguous, itself where it already is (a no-op ``.to()`` still costs ~1 us,
    and these run once per layer call)."""
    if x.requires_grad:
        x = x.detach()
    return (x if x.dtype == torch.float32 else x.to(torch.float32)).contiguous()


def _as(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out if out.dtype == dtype else out.to(dtype)


def gemv_plan(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int, bits: int):
    """A :class:`qtorch.gemv.Plan` of a blocked layout's own buffers for one-row calls (:func:`gemv_planned`), or
    None where the plain path serves: a layout the one-row kernel does not read, an empty layer, or a per-tensor
    scale (expanded per call, so that an in-place update of the 0-d buffer is always seen). Its prefetch distance
    is this machine's (:func:`qtorch.prefetch.distance`, measured at the first plan of a bit width)."""
    if (qweight.device.type != "cpu" or qweight.dim() != 3 or 0 in qweight.shape or scale.dim() != 2
            or zero_point.dim() != 2 or not gemv.eligible(bits, qweight.shape[2])
            or not (qweight.is_contiguous() and scale.is_contiguous() and zero_point.is_contiguous())):
        return None
    return gemv.Plan(qweight.numpy(), scale.numpy(), zero_point.numpy(), group_size, bits, qweight.data_ptr(),
                     scale.data_ptr(), zero_point.data_ptr(), prefetch=prefetch.distance(bits))


# the ops' one-row plans, by the qweight tensor they read (a compiled graph passes the same frozen constant at every
# call; the plan's arrays hold the storage through tensors of their own, never this key): ~15 us a call saved
_OP_PLANS = ByTensor()


def _kept_op_plan(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int, bits: int):
    """The ``_OP_PLANS`` entry of ``qweight`` (scale, zero point, (group size, width), plan, launches) where it was
    kept for these very operands at these addresses, else None."""
    entry = _OP_PLANS.get(qweight)
    if (entry is None or entry[0] is not scale or entry[1] is not zero_point or entry[2] != (group_size, bits)
            or entry[3].addresses != (qweight.data_ptr(), scale.data_ptr(), zero_point.data_ptr())):
        return None
    return entry


def _op_plan(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int, bits: int):
    """:func:`gemv_plan` of an op's operands, kept while ``qweight`` lives and rebuilt when the scale or zero point
    tensor, an address, the group size or the width changes; None where :func:`gemv_plan` is None (a per-tensor
    scale's temporary expansion is never kept)."""
    entry = _kept_op_plan(qweight, scale, zero_point, group_size, bits)
    if entry is not None:
        return entry[3]
    plan = gemv_plan(qweight, scale, zero_point, group_size, bits)
    if plan is not None:
        _OP_PLANS[qweight] = (scale, zero_point, (group_size, bits), plan, {})
    return plan


def _op_decode(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               group_size: int, bits: int, out_features: int, dot: bool):
    """One row ``x[1, K]`` by the :class:`qtorch.gemv.Launcher` kept with the op plan of these operands (the
    layer's decoder for an op: a compiled graph calls its op with the same frozen tensors at every step), or None
    where none is kept yet for them and ``x``'s dtype (then :func:`gemm_blocked_impl`'s checks, which keep one).
    Saves the op's per-call checks, plan lookup and block copy: a compiled model makes one such call per layer and
    decoding step."""
    launch = kept_launch(x, qweight, scale, zero_point, group_size, bits, dot)
    if launch is None:
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((1, out_features), dtype=x.dtype, device="cpu")
    launch(x.data_ptr(), out.data_ptr())
    return out


def kept_launch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                group_size: int, bits: int, dot: bool):
    """The :class:`qtorch.gemv.Launcher` kept with the op plan of these operands for one row like ``x`` (``[1, K]``
    on the CPU, of ``x``'s dtype) and the dot flag (made at its first such call), or None where no plan is kept
    for them yet or ``x`` does not fit it."""
    entry = _kept_op_plan(qweight, scale, zero_point, group_size, bits)
    if entry is None or x.shape[1] != entry[3].K:
        return None
    dt = x.dtype
    launch = entry[4].get((dt, dot))
    if launch is None:
        kind = gemv.TORCH_KINDS.get(dt)
        if kind is None or x.device.type != "cpu":
            return None
        launch = entry[4][(dt, dot)] = gemv.Launcher(entry[3], kind, kind, _folds(dt, bits), dot)
        plan = entry[3]
        native_ops.register(launch.native, dot, group_size, bits, dt, plan.K, [(qweight, scale, zero_point, plan.N)])
    return launch


def gemv_planned(x: torch.Tensor, plan, out_features: int, dot: bool = False) -> torch.Tensor:
    """:func:`gemm_blocked_impl` for one row ``x[1, K]`` with a layer's :func:`gemv_plan`: same kernel, same
    result, less Python per call (eager, no autograd). The kernel reads ``x`` and writes the output in ``x``'s
    dtype itself (no conversion before or after). ``dot``: 4-bit codes by the dot-product variant (the
    ``bf16dot`` / ``int8dot`` paths' one row, as in :func:`gemm_blocked_impl`)."""
    x = _row(x)
    dt = x.dtype
    out = torch.empty((1, out_features), dtype=dt, device="cpu")
    kind = gemv.TORCH_KINDS[dt]
    gemv.run_plan(plan, x.data_ptr(), kind, out.data_ptr(), kind, _folds(dt, plan.bits), dot)
    return out


def _row(x: torch.Tensor) -> torch.Tensor:
    """``x[1, K]`` as the one-row kernel reads it: its elements adjacent (any other stride of a single row is
    moot); held by the caller while the kernel runs."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _folds(dtype: torch.dtype, bits: int) -> bool:
    """Whether the one-row kernel folds the zero point in per group (:func:`qtorch.gemv.gemv_blocked`'s ``fold``):
    4-bit codes always (centred: within the exact subtraction's bound, and 15% faster in float32; on CPUs without
    AVX-512 masked in place, uncentred: :data:`qtorch.gemv.MASKED`), 8-bit ones for bfloat16/float16 rows (the
    rounding of ``z * sum(x)`` stays below theirs)."""
    return bits == 4 or dtype != torch.float32


def _fake(x, qweight, scale, zero_point, group_size, bits, out_features):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("qtorch::gemm_blocked", mutates_args=())
def gemm_blocked(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """:func:`gemm_blocked_impl` as an op: opaque to torch.compile (fullgraph works), with an input gradient."""
    return gemm_blocked_impl(x, qweight, scale, zero_point, group_size, bits, out_features)


gemm_blocked.register_fake(_fake)


_BUFFERS = threading.local()


def _buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread chunk buffer, reused across calls: a fresh multi-MB tensor per chunk costs page faults (the
    same reason as ``qtorch.dequant_mm``'s block buffer)."""
    cache = getattr(_BUFFERS, "cache", None)
    if cache is None:
        cache = _BUFFERS.cache = {}
    t = cache.get(dtype)
    if t is None or t.numel() < numel:
        t = cache[dtype] = torch.empty(numel, dtype=dtype, device="cpu")
    return t[:numel]


def _kernel_view(w: torch.Tensor):
    """``w`` as the NumPy array :func:`qtorch.dequant.dequant_tiles` writes (bfloat16: its bits as uint16)."""
    if w.dtype == torch.bfloat16:
        return w.view(torch.int16).numpy().view("uint16")
    return w.numpy()


def _tiles_mm(x, qweight, scale, zero_point, bits: int, out_features: int, cdt: torch.dtype) -> torch.Tensor:
    """``x @ W.T`` computed in ``cdt``: chunks of tiles dequantized in ``cdt``, one ``torch.mm`` each, written into
    column slices of one output; returned in ``x.dtype``."""
    T, K = qweight.shape[0], qweight.shape[1]
    NT = qweight.shape[2] * (2 if bits == 4 else 1)
    per_chunk = max(1, _CHUNK_BYTES // (K * NT * cdt.itemsize))
    xc = x.detach().to(cdt).contiguous()
    scale, zero_point = blocked_params(scale, zero_point, out_features)
    wq, sq, zq = qweight.contiguous().numpy(), scale.numpy(), zero_point.numpy()
    buf = _buffer(K * min(per_chunk, T) * NT, cdt)
    if per_chunk >= T:  # one chunk: its product is the output
        w = buf.view(K, T * NT)
        dequant.dequant_tiles(wq, bits, sq, zq, 0, T, _kernel_view(w))
        return torch.mm(xc, w)[:, :out_features].to(x.dtype)
    y = torch.empty((xc.shape[0], T * NT), dtype=cdt, device="cpu")
    for t0 in range(0, T, per_chunk):
        t1 = min(T, t0 + per_chunk)
        w = buf[:K * (t1 - t0) * NT].view(K, (t1 - t0) * NT)
        dequant.dequant_tiles(wq, bits, sq, zq, t0, t1, _kernel_view(w))
        # straight into the output's columns (unit stride, rows of N): a product then copied took one more parallel
        # region per chunk, 2x the time on the busy 2-core Xeon (4 chunks of 128 x 4096 x 1024: 62 vs 31 ms)
        torch.mm(xc, w, out=y[:, t0 * NT:t1 * NT])
    return y[:, :out_features].to(x.dtype)


def tiles_blocked_impl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                       group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """``x[M, K] @ dequant(qweight).T`` for many rows (CPU): chunks of tiles dequantized to float32
    (:mod:`qtorch.dequant`), each multiplied by one float32 matmul. The body of the ``qtorch::tiles_blocked`` op;
    eager callers without autograd call it directly (the op's dispatch costs ~0.05 ms)."""
    return _tiles_mm(x, qweight, scale, zero_point, bits, out_features, torch.float32)


def tiles_act_blocked_impl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                           group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """:func:`tiles_blocked_impl` in the activation dtype: chunks of tiles dequantized to bfloat16 / float16 (the
    float32 value rounded once, as ``dequantize(...).to(x.dtype)``) and multiplied by ``torch.mm`` in that dtype
    (AMX on CPUs that have it). float32 inputs compute as :func:`tiles_blocked_impl`. The body of the
    ``qtorch::tiles_act_blocked`` op."""
    cdt = x.dtype if x.dtype in _ACT_DTYPES else torch.float32
    return _tiles_mm(x, qweight, scale, zero_point, bits, out_features, cdt)


@torch.library.custom_op("qtorch::tiles_blocked", mutates_args=())
def tiles_blocked(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """:func:`tiles_blocked_impl` as an op: opaque to torch.compile, so that freezing cannot constant-fold the
    dequantized weight into a full-precision copy; with an input gradient."""
    return tiles_blocked_impl(x, qweight, scale, zero_point, group_size, bits, out_features)


tiles_blocked.register_fake(_fake)


@torch.library.custom_op("qtorch::tiles_act_blocked", mutates_args=())
def tiles_act_blocked(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """:func:`tiles_act_blocked_impl` as an op: opaque to torch.compile (freezing cannot fold the dequantized
    weight into a full-precision copy), with an input gradient."""
    return tiles_act_blocked_impl(x, qweight, scale, zero_point, group_size, bits, out_features)


tiles_act_blocked.register_fake(_fake)


def amx_blocked_impl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     group_size: int, bits: int, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[M, K] @ dequant(qweight).T`` on AMX tiles (:mod:`qtorch.amx`): the codes converted to bfloat16 panels in
    L1, ``x`` split exactly into bfloat16 parts, float32 accumulation; returned in ``x.dtype``, written so by the
    kernel (no conversion after it), ``bias`` (``[N]``, no gradient) added to the float32 sums as it stores them. A
    layer the kernel does not serve (K or the group size not a multiple of 32: :func:`qtorch.amx.eligible`) takes
    :func:`gemm_blocked_impl`. The body of the ``qtorch::amx_blocked`` op (which passes no bias)."""
    if not amx.eligible(qweight.shape[1], group_size) or x.dtype not in _KERNEL_DTYPES:
        y = gemm_blocked_impl(x, qweight, scale, zero_point, group_size, bits, out_features)
        return y if bias is None else y.add_(bias.to(y.dtype))
    scale, zero_point = blocked_params(scale, zero_point, out_features)
    return amx.amx_linear(x.detach() if x.requires_grad else x, qweight.contiguous(), scale, zero_point, group_size,
                          bits, out_features, bias=bias, out_dtype=x.dtype)


@torch.library.custom_op("qtorch::amx_blocked", mutates_args=())
def amx_blocked(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """:func:`amx_blocked_impl` as an op: opaque to torch.compile (fullgraph works), with an input gradient."""
    return amx_blocked_impl(x, qweight, scale, zero_point, group_size, bits, out_features)


amx_blocked.register_fake(_fake)


def bf16dot_blocked_impl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                         group_size: int, bits: int, out_features: int,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[M, K] @ dequant(qweight).T`` by AVX512-BF16 dot products (:mod:`qtorch.bf16dot`) for bfloat16 and
    float16 rows, float32 sums plus ``bias`` (``[N]``, no gradient) as the kernel stores them; returned in
    ``x.dtype``. Shapes the kernel does not serve (K or the group size not a multiple of 32) and other dtypes take
    :func:`gemm_blocked_impl`. The body of the ``qtorch::bf16dot_blocked`` op (which passes no bias)."""
    if x.shape[0] == 1 or not amx.eligible(qweight.shape[1], group_size) or x.dtype not in _ACT_DTYPES:
        # one row: the one-row kernel's dot-product variant (where the layer allows it, else its float path)
        y = gemm_blocked_impl(x, qweight, scale, zero_point, group_size, bits, out_features, dot=True)
        return y if bias is None else y.add_(bias.to(y.dtype))
    scale, zero_point = blocked_params(scale, zero_point, out_features)
    return bf16dot.bf16dot_linear(x.detach() if x.requires_grad else x, qweight.contiguous(), scale, zero_point,
                                  group_size, bits, out_features, bias=bias)


@torch.library.custom_op("qtorch::bf16dot_blocked", mutates_args=())
def bf16dot_blocked(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """:func:`bf16dot_blocked_impl` as an op: opaque to torch.compile, with an input gradient."""
    return bf16dot_blocked_impl(x, qweight, scale, zero_point, group_size, bits, out_features)


bf16dot_blocked.register_fake(_fake)


def int8dot_blocked_impl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                         group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """:func:`gemm_blocked_impl` with bfloat16 / float16 rows of 4-bit codes by the one-row kernel's integer variant
    (where the layer allows it: :func:`qtorch.gemv.planes_available`, else its float path), one row at a time up to
    :data:`INT8DOT_ROWS` rows; more rows as :func:`gemm_blocked_impl`. The body of the ``qtorch::int8dot_blocked``
    op."""
    m = x.shape[0]
    if 2 <= m <= INT8DOT_ROWS and x.dtype in _ACT_DTYPES and x.device.type == "cpu":
        sc, zp = blocked_params(scale, zero_point, out_features)
        plan = _op_plan(qweight.contiguous(), sc, zp, group_size, bits)
        if plan is not None:
            x = (x.detach() if x.requires_grad else x).contiguous()
            out = torch.empty((m, out_features), dtype=x.dtype, device="cpu")
            kind, step, ostep = gemv.TORCH_KINDS[x.dtype], x.stride(0) * 2, out_features * 2
            xa, oa = x.data_ptr(), out.data_ptr()
            for i in range(m):  # (x and out held here until every row is done)
                gemv.run_plan(plan, xa + i * step, kind, oa + i * ostep, kind, True, True)
            return out
    return gemm_blocked_impl(x, qweight, scale, zero_point, group_size, bits, out_features, dot=True)


@torch.library.custom_op("qtorch::int8dot_blocked", mutates_args=())
def int8dot_blocked(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    group_size: int, bits: int, out_features: int) -> torch.Tensor:
    """:func:`int8dot_blocked_impl` as an op: opaque to torch.compile, with an input gradient."""
    return int8dot_blocked_impl(x, qweight, scale, zero_point, group_size, bits, out_features)


int8dot_blocked.register_fake(_fake)


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
tiles_act_blocked.register_autograd(_backward, setup_context=_setup_backward)
amx_blocked.register_autograd(_backward, setup_context=_setup_backward)
bf16dot_blocked.register_autograd(_backward, setup_context=_setup_backward)
int8dot_blocked.register_autograd(_backward, setup_context=_setup_backward)

#: the paths whose kernels add the bias as they store their sums (:meth:`Blocked.linear_bias`; ``numba``: float32
#: rows)
_FUSED_BIAS = {AMX: amx_blocked_impl, BF16DOT: bf16dot_blocked_impl, "numba": gemm_blocked_impl}
#: path -> (kernel, op with an input gradient, its inference twin: :mod:`qtorch._infer_ops`)
_PATH_OPS = {
    path: (impl, getattr(torch.ops.qtorch, name), define_twin(name, impl, _fake))
    for path, name, impl in (("numba", "gemm_blocked", gemm_blocked_impl),
                             ("tiles", "tiles_blocked", tiles_blocked_impl),
                             (TILES_ACT, "tiles_act_blocked", tiles_act_blocked_impl),
                             (AMX, "amx_blocked", amx_blocked_impl),
                             (BF16DOT, "bf16dot_blocked", bf16dot_blocked_impl),
                             (INT8DOT, "int8dot_blocked", int8dot_blocked_impl))
}



def _gemm_runner(weight, dtype: torch.dtype):
    """The ``numba`` path's call for several rows of ``dtype`` with the layer's operands fixed (a
    :class:`qtorch.gemm.Runner`): ``call(x2, bias)``, the same numbers as :func:`gemm_blocked_impl` with the bias
    (stored with float32 sums, added after them for 16-bit rows), or None once the buffers were replaced."""
    spec, b = weight.spec, weight.buffers
    qw, sc, zp = b["qweight"], b["scale"], b["zero_point"]
    if (dtype not in gemv.TORCH_KINDS or qw.device.type != "cpu" or qw.dim() != 3 or 0 in qw.shape
            or qw.shape[1] != spec.in_features or sc.dim() != 2 or zp.dim() != 2
            or not (qw.is_contiguous() and sc.is_contiguous() and zp.is_contiguous())):
        return None
    bits, n = container_bits(spec.bits), spec.out_features
    run = gemm.Runner(qw.numpy(), sc.numpy(), zp.numpy(), spec.group, bits, qw.data_ptr(), sc.data_ptr(),
                      zp.data_ptr())
    addresses = (qw.data_ptr(), sc.data_ptr(), zp.data_ptr())
    f32 = torch.float32

    def call(x2, bias):
        if (b["qweight"] is not qw or b["scale"] is not sc or b["zero_point"] is not zp
                or (qw.data_ptr(), sc.data_ptr(), zp.data_ptr()) != addresses):
            return None
        xf = x2 if x2.dtype == f32 and x2.is_contiguous() else x2.to(f32).contiguous()
        out = torch.empty((xf.shape[0], n), dtype=f32)
        fused = bias is not None and x2.dtype == f32
        if fused and (bias.dtype != f32 or not bias.is_contiguous()):
            bias = bias.to(f32).contiguous()
        run(xf.data_ptr(), xf.shape[0], out.data_ptr(), bias.data_ptr() if fused else 0)
        if x2.dtype == f32:
            return out
        y = out.to(x2.dtype)
        return y if bias is None else y.add_(bias.to(y.dtype))

    return call


def _scale_rows(p: torch.Tensor, kind: str, n: int, k: int, g: int) -> torch.Tensor:
    """Canonical scale/zero point -> ``[G, N]`` rows of the blocked layout (G groups along K, a ragged last one
    included); per tensor: 0-d."""
    if kind == "tensor":
        return p.reshape(()).clone()
    if kind == "channel":
        return p.reshape(1, n).contiguous()
    return p.reshape(n, -(-k // g)).t().contiguous()


def _scale_canonical(p: torch.Tensor, kind: str, n: int, k: int, g: int) -> torch.Tensor:
    if kind == "tensor":
        return p.reshape(()).clone()
    if kind == "channel":
        return p.reshape(n).clone()
    return p.t().contiguous()


def container_bits(bits: int) -> int:
    """Bits per code the blocked layout stores and its kernels read: 4 (nibbles) for 1- to 4-bit codes, 8 (bytes)
    for 5- to 8-bit ones. A 3-bit layer then runs the 4-bit kernels at 4 bits per code in memory, instead of
    unpacking its codes with tensor ops at every call (30-100x slower than the dense layer at one row).

    >>> [container_bits(b) for b in (1, 2, 3, 4, 5, 8)]
    [4, 4, 4, 4, 8, 8]
    """
    return 4 if bits <= 4 else 8


def _to_container(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Stored codes of ``bits`` -> the container's: asymmetric codes keep their values (and their zero points);
    symmetric ones move from the offset ``2^(bits-1)`` to the container's (8 in a nibble; none in a signed byte)."""
    cb = container_bits(bits)
    if bits == cb:
        return codes
    if not symmetric:
        return codes if cb == 4 else codes.to(torch.uint8)
    q = codes.to(torch.int16) - (1 << (bits - 1))
    return q + 8 if cb == 4 else q.to(torch.int8)


def _from_container(c: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Inverse of :func:`_to_container` (int16 codes below 8 bits, as the canonical codec unpacks them)."""
    cb = container_bits(bits)
    if bits == cb:
        return c
    c = c.to(torch.int16)
    if not symmetric:
        return c
    return (c - 8 if cb == 4 else c) + (1 << (bits - 1))


def codes_to_blocked(codes, scale, zero_point, *, bits: int, kind: str, group: int, out_features: int,
                     in_features: int, tile: int, symmetric: bool | None = None):
    """Stored codes ``[N, K]`` (the canonical ``qweight`` at 8 bits; unsigned codes below 8 bits, symmetric ones
    with the offset ``2^(bits-1)``) -> blocked (qweight, scale [G,N], zero_point [G,N] or [0,0]); codes of 1 to 7
    bits are held in :func:`container_bits` (``symmetric`` defaults to: no zero point)."""
    symmetric = zero_point is None if symmetric is None else symmetric
    codes = _to_container(codes, bits, symmetric)
    bits = container_bits(bits)
    n, k = out_features, padded_k(in_features, kind, group)
    codes = complete_groups(codes, zero_point, k, 8 if bits == 4 else 0)  # a ragged last group: codes worth 0
    T = n // tile
    if bits == 8:
        wb = codes.reshape(T, tile, k).transpose(1, 2).contiguous()
    else:
        c = codes.reshape(T, tile, k)
        h = tile // 2
        wb = (c[:, :h] | (c[:, h:] << 4)).to(torch.uint8).transpose(1, 2).contiguous()
    zp = (torch.zeros((0, 0), dtype=torch.uint8, device=codes.device) if zero_point is None
          else _scale_rows(zero_point, kind, n, k, group))
    return wb, _scale_rows(scale, kind, n, k, group), zp


def blocked_to_codes(wb, scale, zero_point, *, bits: int, symmetric: bool, kind: str, group: int,
                     out_features: int, in_features: int):
    """Inverse of :func:`codes_to_blocked`: (stored codes [N, K], canonical scale, canonical zero point)."""
    n, k, kp = out_features, in_features, wb.shape[1]  # kp: whole groups (padded_k)
    bits, stored_bits = container_bits(bits), bits
    if bits == 8:
        c = wb.transpose(1, 2).reshape(n, kp)[:, :k].contiguous()
    else:
        b = wb.transpose(1, 2).to(torch.int16)  # [T, H, K]
        c = torch.cat([b & 15, b >> 4], dim=1).reshape(n, kp)[:, :k].contiguous()
    c = _from_container(c, stored_bits, symmetric)
    zp = None if symmetric else _scale_canonical(zero_point, kind, n, k, group)
    return c, _scale_canonical(scale, kind, n, k, group), zp


def to_blocked(qweight, scale, zero_point, *, bits: int, symmetric: bool, kind: str, group: int,
               out_features: int, in_features: int, tile: int):
    """Canonical (qweight, scale, zero_point) -> blocked (qweight, scale [G,N], zero_point [G,N] or [0,0]).

    Per tensor, scale and zero point stay 0-d; symmetric codes have no zero point ([0, 0]; 4-bit ones are stored
    with the offset 8, which the kernels subtract): the layout holds no more bytes than the canonical state."""
    codes = qweight if bits == 8 else unpack_codes(qweight, bits, in_features)
    return codes_to_blocked(codes, scale, zero_point, bits=bits, kind=kind, group=group, out_features=out_features,
                            in_features=in_features, tile=tile, symmetric=symmetric)


def from_blocked(wb, scale, zero_point, *, bits: int, symmetric: bool, kind: str, group: int,
                 out_features: int, in_features: int):
    """Inverse of :func:`to_blocked`: the canonical (qweight, scale, zero_point)."""
    c, s, z = blocked_to_codes(wb, scale, zero_point, bits=bits, symmetric=symmetric, kind=kind, group=group,
                               out_features=out_features, in_features=in_features)
    return (c if bits == 8 else pack_codes(c, bits)), s, z


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


def _tile_kernels_offered(device_type, dtype, rows: int, bits: int, spec) -> tuple:
    if device_type != "cpu" or rows < 1 or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return ()
    if rows <= INT8DOT_OFFERED and dtype in _ACT_DTYPES and container_bits(bits) == 4 and gemv.planes_available():
        # 16-bit rows of 4-bit codes on a CPU with AVX2 and without AVX-512: the one-row kernel's integer variant
        # (x in two 8-bit planes), where the layer's tiles and groups allow it; offered for the row buckets of 1
        # and 2-4 rows, of which it takes 2 row by row and 3-4 by the few-rows kernel
        if spec is not None and (not planes.block_size(spec.group)
                                 or not gemv.eligible(4, blocked_tile(spec.out_features) // 2)):
            return ()
        return (INT8DOT,)
    if rows == 1 and dtype == torch.bfloat16 and container_bits(bits) == 4 and not amx.available():
        # one bfloat16 row of 4-bit codes: gemv's dot-product variant (two rows of K per vdpbf16ps), where the
        # layer's tiles and groups allow it
        if not gemv.dot_available() or spec is not None and (
                spec.group % 2 or not gemv.eligible(4, blocked_tile(spec.out_features) // 2)):
            return ()
        return (BF16DOT,)
    if spec is not None and not amx.eligible(padded_k(spec.in_features, spec.kind, spec.group), spec.group):
        return ()
    if amx.available():
        return (AMX,)
    # float32 rows would need three bfloat16 parts: slower than the float32 kernels on the CPUs that have these
    # dot products but no AMX
    return (BF16DOT,) if rows >= 2 and dtype in _ACT_DTYPES and bf16dot.available() else ()


@constant_result
def _traced_tiles(device_type, dtype, rows: int, bits: int, spec) -> str:
    """The first tile kernel offered for such a call, or ``""``: a constant to Dynamo, which runs this while it
    traces instead of tracing it (the availability checks take a lock, and the first one asks Linux for the AMX
    tile state)."""
    tiles = _tile_kernels_offered(device_type, dtype, rows, bits, spec)
    return tiles[0] if tiles else ""


def _own_path(device_type, dtype, rows: int, bits: int) -> str:
    # one rule for path() and paths(): asking for the candidates is not a call taking a path
    if device_type == "cpu" and 0 < rows <= CPU_MAX_ROWS_NUMBA.get((dtype, bits), 0):
        return "numba"
    return "tiles"


class Blocked(Layout):
    """qtorch's tile kernels (see the module docstring)."""

    name = holds = "blocked"
    tuned = True

    def eligible(self, spec, device, compute_dtype):
        if device.type != "cpu" or not 1 <= spec.bits <= 8 or spec.zero_point_kind != "int":
            return False
        if spec.kind == "group" and spec.axis != 1 or spec.kind == "channel" and spec.axis != 0:
            return False
        return blocked_tile(spec.out_features) > 0

    def path(self, device_type, dtype, rows, bits):
        """``numba`` (gemv / gemm) up to ``CPU_MAX_ROWS_NUMBA`` rows on CPU, else ``tiles``."""
        return _own_path(device_type, dtype, rows, container_bits(bits))

    def paths(self, device_type, dtype, rows, bits, spec=None):
        """The own path, then for CPU calls of 2+ rows ``tiles_act`` (bfloat16 / float16 activations) and
        ``tiles`` (float32 tiles) where it is not the own path already, and on CPUs with AMX (any row count)
        ``amx``, on CPUs with AVX512-BF16 and no AMX ``bf16dot`` (bfloat16/float16, 2+ rows; one bfloat16 row of
        4-bit codes), on CPUs with AVX2 and without AVX-512 ``int8dot`` (1-4 bfloat16 / float16 rows of 4-bit
        codes). Given the layer's ``spec``, ``amx`` is offered only where its kernel serves the shape
        (:func:`qtorch.amx.eligible`); without it, a layer the kernel does not serve runs ``numba`` under that
        name."""
        own = _own_path(device_type, dtype, rows, container_bits(bits))
        tiles = _tile_kernels_offered(device_type, dtype, rows, bits, spec)
        if device_type != "cpu" or rows < 2:
            return (own,) + tiles
        more = (TILES_ACT,) if dtype in _ACT_DTYPES else ()
        return (own,) + more + (("tiles",) if own != "tiles" else ()) + tiles

    def traced_path(self, device_type, dtype, rows, bits, spec=None):
        """Under tracing, with no kept path: for 2+ rows the tile kernel offered for the shape (``amx``, else
        ``bf16dot``), else the own path. Measured at 4096x4096, 16 and 128 rows, those ran 2-4x faster than the own
        path on both CPU kinds that have them (bf16 W8, eager: ``bf16dot`` 1.08-1.22x / 0.90-0.92x of dense against
        0.69-0.76x / 0.34-0.45x on the Zen 4; ``amx`` 1.22x / 1.23x against 0.51x / 0.28x on the AMX Xeon), so a
        model given straight to ``torch.compile`` no longer traces the slowest one. One row keeps ``gemv``."""
        own = _own_path(device_type, dtype, rows, container_bits(bits))
        if rows < 2:
            return own
        # 2, not rows: the kernels offered are the same for any count from 2 up, and under dynamic shapes rows is
        # symbolic, which a constant-result function cannot take (fullgraph failed at the second row count)
        tile = _traced_tiles(device_type, dtype, 2, bits, spec)
        return tile if tile and tile != INT8DOT else own  # (int8dot: row by row, for a few rows only)

    def linear(self, weight, x2, path):
        spec, b = weight.spec, weight.buffers
        n = spec.out_features
        x2 = pad_columns(x2, b["qweight"].shape[1])  # a ragged last group, completed in the layout
        # an op under torch.compile (opaque: freezing never folds a dequantized weight) and for autograd (the one
        # with an input gradient), its kernel directly otherwise (an op's dispatch costs 20+ us a call)
        grad = needs_grad(x2)
        direct = not grad and plain_eager(x2)
        if path == "numba" or path in (BF16DOT, INT8DOT) and x2.shape[0] == 1:
            if direct and x2.shape[0] == 1:  # decoding: the weight's one-row plan, built once
                plan = self.plan(weight)
                if plan is not None:
                    return gemv_planned(x2, plan, n, dot=path != "numba")
        impl, op, twin = _PATH_OPS.get(path, _PATH_OPS["tiles"])
        fn = impl if direct else op if grad else twin
        return fn(x2, b["qweight"], b["scale"], b["zero_point"], spec.group, container_bits(spec.bits), n)

    def linear_bias(self, weight, x2, path, bias):
        # the AMX and AVX512-BF16 kernels and the few-rows one (float32 rows) store their sums plus the bias (the
        # other paths' kernels: the layer adds it after them)
        if path not in _FUSED_BIAS or x2.shape[0] < 2 or needs_grad(x2) or not plain_eager(x2):
            return None
        spec, b = weight.spec, weight.buffers
        x2 = pad_columns(x2, b["qweight"].shape[1])
        return _FUSED_BIAS[path](x2, b["qweight"], b["scale"], b["zero_point"], spec.group,
                                 container_bits(spec.bits), spec.out_features, bias=bias)

    def runner(self, weight, dtype, path):
        # the AMX, AVX512-BF16 or few-rows call with everything but x and the bias fixed: what linear_bias() runs
        # for such a call
        spec, b = weight.spec, weight.buffers
        qw, sc, zp = b["qweight"], b["scale"], b["zero_point"]
        if path == "numba":
            return _gemm_runner(weight, dtype)
        if (path not in (AMX, BF16DOT) or dtype not in (_KERNEL_DTYPES if path == AMX else _ACT_DTYPES)
                or qw.device.type != "cpu" or qw.dim() != 3
                or qw.shape[1] != spec.in_features or not amx.eligible(qw.shape[1], spec.group)
                or sc.dim() != 2 or zp.dim() != 2  # (a per-tensor scale is expanded per call: updates are seen)
                or not (qw.is_contiguous() and sc.is_contiguous() and zp.is_contiguous())):
            return None
        kernel = amx if path == AMX else bf16dot
        run = kernel.runner(qw, sc, zp, spec.group, container_bits(spec.bits), spec.out_features, dtype)
        addresses = (qw.data_ptr(), sc.data_ptr(), zp.data_ptr())

        def call(x2, bias):
            if (b["qweight"] is not qw or b["scale"] is not sc or b["zero_point"] is not zp
                    or (qw.data_ptr(), sc.data_ptr(), zp.data_ptr()) != addresses):
                return None
            return run(x2 if x2.is_contiguous() else x2.contiguous(), bias)

        return call

    def decoder(self, weight, dtype, path):
        # the one-row plan's call with everything but x fixed: what linear() runs for such a call
        if path not in ("numba", BF16DOT, INT8DOT) or dtype not in gemv.TORCH_KINDS:
            return None
        spec, b = weight.spec, weight.buffers
        qw, sc, zp = b["qweight"], b["scale"], b["zero_point"]
        plan = self.plan(weight)
        if plan is None or qw.shape[1] != spec.in_features:  # no plan, or a ragged last group (x padded)
            return None
        kind, shapes, addresses = gemv.TORCH_KINDS[dtype], single_row_shapes(spec.out_features), plan.addresses
        launch = gemv.Launcher(plan, kind, kind, _folds(dtype, plan.bits), path != "numba")

        def valid():
            return (b["qweight"] is qw and b["scale"] is sc and b["zero_point"] is zp
                    and (qw.data_ptr(), sc.data_ptr(), zp.data_ptr()) == addresses)

        def decode(x):
            if not valid():
                return None
            if x.stride(-1) != 1:  # (the other dimensions are of size 1)
                x = x.contiguous()
            out = torch.empty(*shapes[x.dim()], dtype=dtype, device="cpu")  # (never the default device)
            launch(x.data_ptr(), out.data_ptr())
            return out

        # the same launch chained with sibling layers' (qtorch.sibling_calls): one team kernel, K and dtype
        decode.part = Part(("gemv", plan.kernel, spec.in_features, dtype), launch, valid, shapes, dtype)
        return decode

    def plan(self, weight):
        """``weight``'s :func:`gemv_plan`, rebuilt when a buffer is replaced or moved."""
        b = weight.buffers
        qw, sc, zp = b["qweight"], b["scale"], b["zero_point"]
        entry = _PLANS.get(weight)
        if (entry is None or entry[0] is not qw or entry[1] is not sc or entry[2] is not zp
                or (entry[3] is not None and entry[3].addresses != (qw.data_ptr(), sc.data_ptr(), zp.data_ptr()))):
            entry = (qw, sc, zp, gemv_plan(qw, sc, zp, weight.spec.group, container_bits(weight.spec.bits)))
            _PLANS[weight] = entry
        return entry[3]

    def from_codes(self, spec, codes, scale, zero_point):
        q, s, z = codes_to_blocked(codes, scale, zero_point, bits=spec.bits, symmetric=spec.symmetric,
                                   kind=spec.kind, group=spec.group,
                                   out_features=spec.out_features, in_features=spec.in_features,
                                   tile=blocked_tile(spec.out_features))
        return q, s, z, None

    def to_codes(self, spec, qweight, scale, zero_point):
        return blocked_to_codes(qweight, scale, zero_point, bits=spec.bits, symmetric=spec.symmetric,
                                kind=spec.kind, group=spec.group, out_features=spec.out_features,
                                in_features=spec.in_features)

    def dequantize(self, spec, qweight, scale, zero_point, dtype):
        w = dequant_blocked(qweight, scale, zero_point, bits=container_bits(spec.bits), group=spec.group)
        w = w.permute(0, 2, 1).reshape(spec.out_features, qweight.shape[1])
        return w[:, :spec.in_features].to(dtype)


BLOCKED = Blocked()
