"""The int4pack layout: PyTorch's ``torch._weight_int4pack_mm_for_cpu`` (CPU, bfloat16, 4 bits in groups).

Eligible for 4-bit weights in groups of 32/64/128/256 along K of a bfloat16 layer on CPU with N % 16 == 0
(a ragged last group is completed in its tiles as in the blocked layout: codes equal to the group's zero point,
x padded with zeros per call, so the padded columns add exactly 0).
``qweight`` is the output of ``torch._convert_weight_to_int4pack_for_cpu`` (a CPU-capability-specific blocked
layout); scale and zero point stay canonical, and the kernel's ``scales_and_zeros [K/g, N, 2]`` (bf16,
``zero = (8 - zp) * scale``, or ``8 * scale + m`` for a float zero point m) are derived data (``aux``). Its packed
layout depends on the CPU capability (blocks of 32 rows on AVX2, 64 on AVX-512, pairs otherwise), so the way back
to canonical codes is measured, not assumed: tiny probes give each row's byte base, per-k stride and nibble, and
every conversion is verified against the codes it packed. A mismatch marks the output width unusable: such
weights take the next candidate layout.

Calls of 2+ rows may also run qtorch's tile kernels (the ``blocked`` layout's ``bf16dot`` / ``amx`` /
``tiles_act`` paths) on the same bytes: where the measured map shows that this CPU's int4pack layout *is* the
blocked layout's 4-bit tiles (blocks of NT output channels, K rows of NT / 2 bytes, channel ``j`` in the low nibble
of byte ``j`` and channel ``j + NT / 2`` in its high nibble: on AVX-512 CPUs NT = 64, on AVX2 32), the packed codes
are passed to those kernels as a view, and so are the scale and zero point: the layout holds them in ``[G, N]``
memory order (canonical ``[N, G]`` tensors with strides ``(1, N)``), as the kernels read them (transposed copies
per call took 30 us of a 1536 x 576 layer's 330 us call at 41 rows). No second copy of the codes is kept; the layer
measures the paths per row bucket, as for the blocked layout. PyTorch's kernel is the fastest one-row path for
small layers in a model, and slow for prompts: on a 2-core Zen 4, bfloat16, groups of 64, 41 rows, 576 x 576
176 us (dense 102, ``bf16dot`` on the same bytes 130), 1536 x 576 455 us (dense 220, ``bf16dot`` 265).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from . import blocked
from .base import Layout, op_decoder
from .codec import affine, complete_groups, dense_linear, pad_columns, padded_k
from .._infer_ops import constant_result, needs_grad, plain_eager
from .._ir import cached as _cached

__all__ = ["INT4PACK", "INT4PACK_GROUPS", "int4pack_map", "int4pack_unpack", "int4pack_dequant", "to_int4pack",
           "Int4PackMM"]

INT4PACK_GROUPS = (32, 64, 128, 256)
# n -> the measured layout map of [n, k] weights (int4pack_map)
_INT4_MAPS: dict = {}
# output widths whose conversion did not reproduce the codes: never used again in this process
_UNUSABLE: set = set()
# n -> the blocked tile width NT that int4pack's layout of [n, k] weights equals on this CPU, or 0 (tile_width)
_TILE_WIDTHS: dict = {}


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


@_cached
@njit(cache=True, nogil=True)
def _unpack_by_map(flat, base, stride, offset, hi, out):  # pragma: no cover - compiled
    n, k = out.shape
    for r in range(n):
        b0, s = base[r] * k + offset[r], stride[r]
        if hi[r]:
            for c in range(k):
                out[r, c] = flat[b0 + c * s] >> 4
        else:
            for c in range(k):
                out[r, c] = flat[b0 + c * s] & 15


def _unpack_traced(packed, n, k, base, stride, offset, hi):
    cols = torch.arange(k, dtype=torch.int64)
    idx = base[:, None] * k + cols[None, :] * stride[:, None] + offset[:, None]
    b = packed.reshape(-1)[idx.reshape(-1)].reshape(n, k)
    return torch.where(hi[:, None], b >> 4, b & 15)


@constant_result
def tile_width(n: int) -> int:
    """The tile width NT where the int4pack layout of ``[n, k]`` weights on this CPU is exactly the blocked
    layout's 4-bit tiles ``[n / NT, k, NT / 2]`` (code ``(r, c)`` in byte ``(r // NT) (NT / 2) k + c (NT / 2) +
    r % (NT / 2)``, high nibble where ``r % NT >= NT / 2``), else 0. Read off the measured map, so a PyTorch or CPU
    whose layout differs never reaches a tile kernel (AVX-512: 64, AVX2: 32). A constant to Dynamo, which runs it
    while it traces (the first call probes PyTorch's packing: data-dependent ops a graph cannot hold).

    >>> tile_width(128) in (0, 64, 32, 16, 128)
    True
    """
    if n not in _TILE_WIDTHS:
        base, stride, offset, hi = int4pack_map(n, 2)
        r = torch.arange(n)
        found = 0
        for nt in blocked.TILE_WIDTHS:
            w = nt // 2
            if (n % nt == 0 and torch.equal(base, r // nt * w) and bool(torch.all(stride == w))
                    and torch.equal(offset, r % w) and torch.equal(hi, r % nt >= w)):
                found = nt
                break
        _TILE_WIDTHS[n] = found
    return _TILE_WIDTHS[n]


def int4pack_unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Unsigned 4-bit codes ``[n, k]`` (uint8) from ``torch._convert_weight_to_int4pack_for_cpu`` output.

    A numba loop over the measured map (a torch gather of int64 indices took ~1 s for 4096 x 4096, and ran twice
    per conversion: to verify the packing and to read it back); every index is checked to lie inside ``packed``
    before the loop runs."""
    base, stride, offset, hi = int4pack_map(n, k)
    if torch.compiler.is_compiling():  # traced: torch ops (inductor compiles the gather)
        return _unpack_traced(packed, n, k, base, stride, offset, hi)
    flat = packed.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
    out = np.empty((n, k), dtype=np.uint8)
    if n and k:
        first = base * k + offset
        last = first + (k - 1) * stride
        if int(torch.minimum(first, last).min()) < 0 or int(torch.maximum(first, last).max()) >= flat.size:
            raise RuntimeError(f"int4pack layout map of [{n}, {k}] reaches outside the {flat.size} packed bytes")
        _unpack_by_map(flat, base.numpy(), stride.numpy(), offset.numpy(), hi.numpy(), out)
    return torch.from_numpy(out)


def int4pack_dequant(packed: torch.Tensor, scale: torch.Tensor, zero_point, *, n: int, k: int,
                     group: int) -> torch.Tensor:
    """``(codes - zero_point) * scale`` ``[n, k]`` in float32 from the int4pack layout (canonical scale ``[n, k/g]``,
    zero point ``[n, k/g]`` uint8, or ``None`` for symmetric codes, which carry the offset 8; a float32 zero point
    is an offset: ``codes * scale + zero_point``)."""
    c = int4pack_unpack(packed, n, k).to(torch.float32)
    if zero_point is None:
        c = c - 8.0
    return affine(c, scale, zero_point, "group", 1, n, k, group, torch.float32,
                  zero_point is not None and zero_point.is_floating_point())



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
    # the kernel computes (u - 8) * scale + zero, so an integer zero point zp maps to zero = (8 - zp) * scale, and
    # a float one m (u * scale + m: GGUF's Q4_1) to zero = 8 * scale + m
    s = scale.reshape(n, k // group).to(torch.float32)
    if symmetric:
        z = torch.zeros_like(s)
    elif zero_point.is_floating_point():
        z = 8.0 * s + zero_point.reshape(n, k // group).to(torch.float32)
    else:
        z = (8.0 - zero_point.reshape(n, k // group).to(torch.float32)) * s
    sz = torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, sz



def _own_path(device_type, dtype) -> str:
    # one rule for path() and paths(): asking for the candidates is not a call taking a path
    return "int4pack" if device_type == "cpu" and dtype == torch.bfloat16 else "dense"


#: the blocked layout's paths a call of 2+ rows may take on int4pack's own bytes (where :func:`tile_width` allows)
TILE_PATHS = (blocked.BF16DOT, blocked.AMX, blocked.TILES_ACT)


class Int4Pack(Layout):
    name, holds, torch_kernels, tuned = "int4pack", "int4pack", True, True

    def eligible(self, spec, device, compute_dtype):
        return (device.type == "cpu" and compute_dtype == torch.bfloat16 and spec.bits == 4 and spec.kind == "group"
                and spec.axis == 1 and spec.group in INT4PACK_GROUPS
                and spec.out_features % 16 == 0
                and spec.out_features not in _UNUSABLE)

    def path(self, device_type, dtype, rows, bits):
        return _own_path(device_type, dtype)

    def paths(self, device_type, dtype, rows, bits, spec=None):
        """PyTorch's kernel, then for CPU calls of 2+ rows the blocked layout's tile kernels offered for the shape
        (``bf16dot`` or ``amx``, and ``tiles_act``) where the packed bytes are its tiles (:func:`tile_width`)."""
        own = _own_path(device_type, dtype)
        if own != "int4pack" or rows < 2:
            return (own,)
        # given the layer's spec, only where its bytes are tiles; without, every path the CPU has (as blocked)
        if spec is not None and (spec.zero_point_kind != "int" or not tile_width(spec.out_features)):
            return (own,)
        tiles = blocked._tile_kernels_offered(device_type, dtype, rows, bits, spec)
        return (own,) + tuple(p for p in TILE_PATHS if p in tiles or p == blocked.TILES_ACT)

    def linear(self, weight, x2, path):
        if path == "dense":
            return dense_linear(x2, weight.dequantize)
        spec, b = weight.spec, weight.buffers
        kp = padded_k(spec.in_features, spec.kind, spec.group)
        x2 = pad_columns(x2, kp)  # a ragged last group, completed in the layout
        nt = tile_width(spec.out_features) if path in TILE_PATHS else 0  # 0: a route kept where bytes are not tiles
        if nt and not (torch.compiler.is_compiling() and _woq_templates()):
            return _tile_linear(weight, x2, path, kp, nt)
        # It has no derivative: an input that needs a gradient goes through a wrapper that supplies one.
        if needs_grad(x2):
            return Int4PackMM.apply(x2.contiguous(), b["qweight"], spec.group, weight.aux, b["scale"],
                                    b["zero_point"], spec.out_features, kp)
        return torch._weight_int4pack_mm_for_cpu(x2.contiguous(), b["qweight"], spec.group, weight.aux)

    def decoder(self, weight, dtype, path):
        # PyTorch's kernel with every operand but x fixed (no ragged last group to pad)
        spec = weight.spec
        ragged = padded_k(spec.in_features, spec.kind, spec.group) != spec.in_features
        if path == "dense" or dtype != torch.bfloat16 or ragged:
            return None
        return op_decoder(weight, torch._weight_int4pack_mm_for_cpu, (spec.group, weight.aux))

    def from_codes(self, spec, codes, scale, zero_point):
        codes = complete_groups(codes, zero_point, padded_k(spec.in_features, spec.kind, spec.group), 8)
        r = to_int4pack(codes, scale, zero_point, symmetric=spec.symmetric, group=spec.group)
        if r is None:  # the measured layout map did not reproduce the codes: never use the kernel for this width
            _UNUSABLE.add(spec.out_features)
            return None
        return r[0], _group_major(scale), _group_major(zero_point), r[1]

    def to_codes(self, spec, qweight, scale, zero_point):
        kp = padded_k(spec.in_features, spec.kind, spec.group)
        codes = int4pack_unpack(qweight, spec.out_features, kp)
        codes = codes if kp == spec.in_features else codes[:, :spec.in_features].contiguous()
        # canonical tensors are contiguous: the layout's own are held group-major (_group_major)
        return codes, scale.contiguous(), (zero_point if zero_point is None else zero_point.contiguous())


def _group_major(t):
    """The canonical ``[N, G]`` scale or zero point (or None) held in ``[G, N]`` memory order (strides ``(1, N)``): its
    transpose is then the contiguous ``[G, N]`` the tile kernels read, with no copy per call.

    >>> s = _group_major(torch.arange(6.0).reshape(3, 2))
    >>> s.shape, s.stride(), s.t().is_contiguous(), s.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    (torch.Size([3, 2]), (1, 3), True, True)
    """
    return t.t().contiguous().t() if t is not None and t.dim() == 2 and t.numel() else t


def _woq_templates() -> bool:
    # qtorch.compile's trace with inductor's weight-only templates: PyTorch's op goes into the graph (template)
    from ..compile import woq_templates

    return woq_templates()


def _tile_linear(weight, x2: torch.Tensor, path: str, kp: int, nt: int) -> torch.Tensor:
    """``x2 @ W.T`` by the blocked layout's ``path`` on the packed bytes viewed as its tiles of ``nt`` channels: the
    same op (an input gradient where one is needed, its twin under tracing, the kernel itself eagerly)."""
    spec, b = weight.spec, weight.buffers
    n = spec.out_features
    tiles = b["qweight"].view(torch.uint8).reshape(n // nt, kp, nt // 2)
    zp = b["zero_point"]
    scale = b["scale"].t().contiguous()  # [G, N], as the kernels read them: held so (no copy, see _group_major)
    # symmetric: none (the codes carry the offset 8, as the blocked layout's do)
    zp = zp.t().contiguous() if zp is not None and zp.numel() else torch.empty((0, 0), dtype=torch.uint8)
    impl, op, twin = blocked._PATH_OPS[path]
    grad = needs_grad(x2)
    fn = impl if not grad and plain_eager(x2) else op if grad else twin
    return fn(x2, tiles, scale, zp, spec.group, 4, n)


INT4PACK = Int4Pack()
