"""The vnni layout: 4-bit codes in 32-bit words of 8 inputs per output channel, multiplied as integers
(:mod:`qtorch.vnni`, CPUs with AVX512-VNNI).

Eligible for 4-bit weights with integer zero points (or symmetric codes), groups along K with a divisor that is a
multiple of 8 up to 128 (or per output channel), ``N % 64 == 0`` and ``K % 8 == 0``, on CPUs where
:func:`qtorch.vnni.available`. The buffers:
``qweight`` int32 ``[N/64, K/8, 64]`` (the canonical codes' words regrouped by tiles of 64 channels: the same bytes,
no padding), ``scale`` float32 ``[N/64, G, 64]`` and ``zero_point`` uint8 ``[N/64, G, 64]`` (a tile's parameters
together: its 64 channels' for each group; ``[0, 0, 0]`` for symmetric codes, which carry the offset 8). Paths:
``vnni`` (one row: integer dot products with ``x`` split into 8-bit planes, see :mod:`qtorch.vnni` for the rounding)
and ``vnni_mm`` (2+ rows: on CPUs with AMX-INT8 the same integer sums on AMX tiles, :mod:`qtorch.vnni_amx`, for
groups of a multiple of 64; else blocks of channels dequantized into ``W.T`` in the activations' dtype, bfloat16 as
F.linear's weight would be rounded, then ``torch.mm``) and, for bfloat16 rows on CPUs with AMX-BF16, ``vnni_bf16``
(:mod:`qtorch.vnni_bf16`: AMX-BF16 tiles of panels of the weight dequantized in bfloat16) and ``vnni_lut``
(:mod:`qtorch.vnni_lut`: the same products with the weight's channels as the A tiles, 32 codes looked up per
instruction a step ahead of the tile unit; groups of a multiple of 32); the layer times them against ``vnni_mm``
per row bucket. Under ``torch.compile`` and with autograd the same kernels run as the ops ``qtorch::vnni_linear`` /
``qtorch::vnni_bf16_linear`` / ``qtorch::vnni_lut_linear`` (opaque: freezing never folds a dequantized weight); a
call of the integer paths whose ``x`` holds a NaN or an infinity (which the planes cannot hold) is computed by the
portable path instead, as ``F.linear`` would (``vnni_bf16`` and ``vnni_lut`` multiply such values as they are).

>>> import torch, qcore
>>> from qtorch.layouts import WeightSpec
>>> spec = WeightSpec.of(qcore.QuantScheme(4, False, qcore.PerGroup(64)), out_features=128, in_features=256)
>>> VNNI.eligible(spec, torch.device("cpu"), torch.bfloat16) == vnni.available()
True
"""

from __future__ import annotations

import numpy as np
import torch

from .. import native_ops, prefetch, vnni, vnni_amx, vnni_bf16, vnni_lut
from .._infer_ops import define_twin, needs_grad, plain_eager
from .._kept import ByTensor
from ..sibling_calls import Part
from .base import Layout, single_row_shapes
from .blocked import _buffer, _scale_canonical, _scale_rows  # (the blocks' buffer: one per thread, shared)
from .codec import dense_linear, unpack_codes

__all__ = ["VNNI", "vnni_linear_impl"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: bytes of dequantized weight per block of a call of several rows (as ``qtorch.dequant_mm``'s blocks)
BLOCK_BYTES = 8 << 20
ONE_ROW, MANY_ROWS = "vnni", "vnni_mm"
#: bfloat16 calls of 2+ rows on AMX-BF16 tiles of the dequantized weight (:mod:`qtorch.vnni_bf16`)
BF16_ROWS = "vnni_bf16"
#: bfloat16 calls of 2+ rows on AMX-BF16 tiles of the weight's channels, each 32 codes looked up at once
#: (:mod:`qtorch.vnni_lut`)
LUT_ROWS = "vnni_lut"
#: rows of x per AMX kernel call at most: bounds the scratch a thread keeps (its rows' planes or A tiles and float32
#: sums: 24 MB at 4096 x 4096 in bfloat16), where a 16 K-row prompt in one call would have kept 384 MB
ROW_CHUNK = 1024


def _arrays(qweight, scale, zero_point):
    """The kernels' NumPy views of the layout's buffers: words as uint32, scale, zero points (``[0, 0]``: none)."""
    return qweight.numpy().view(np.uint32), scale.numpy(), zero_point.numpy()


def _group(scale: torch.Tensor, k: int) -> int:
    return k // scale.shape[1]


def _kernel_words(words: torch.Tensor) -> torch.Tensor:
    """Canonical int32 words (input ``8 o + j`` in bits ``4 j``) -> the kernels' (inputs ``8 o + b``, ``b < 4``,
    in the low nibble of byte ``b``, ``8 o + 4 + b`` in its high nibble): one mask then gives four consecutive
    inputs' bytes, which the activations' planes meet in their own order."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for j in range(8):
        out |= ((w >> (4 * j)) & 15) << (8 * j if j < 4 else 8 * (j - 4) + 4)
    return _as_int32(out)


def _canonical_words(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_kernel_words`."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for j in range(8):
        out |= ((w >> (8 * j if j < 4 else 8 * (j - 4) + 4)) & 15) << (4 * j)
    return _as_int32(out)


def _as_int32(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def _tiles(p: torch.Tensor) -> torch.Tensor:
    """``[G, N]`` parameters -> ``[N/64, G, 64]``: each tile's together."""
    g, n = p.shape
    return p.reshape(g, n // vnni.NT, vnni.NT).transpose(0, 1).contiguous()


def _rows(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_tiles`."""
    t, g, _ = p.shape
    return p.transpose(0, 1).reshape(g, t * vnni.NT).contiguous()


def _numpy_of(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's NumPy view; bfloat16 and float16 as their bits (uint16)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def dequantized_t(qweight, scale, zero_point, dtype: torch.dtype) -> torch.Tensor:
    """``W.T`` ``[K, N]`` in ``dtype`` (float32 arithmetic, one rounding), from the layout's buffers."""
    w, s, z = _arrays(qweight, scale, zero_point)
    k = qweight.shape[1] * 8
    kdt = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    out = torch.empty((k, qweight.shape[0] * vnni.NT), dtype=kdt)
    vnni.dequant_t(w, s, z if z.shape[0] else None, _group(scale, k), 0, qweight.shape[0], _numpy_of(out))
    return out if kdt == dtype else out.to(dtype)


def _many_rows(x2, qweight, scale, zero_point, out_features: int) -> torch.Tensor:
    w, s, z = _arrays(qweight, scale, zero_point)
    g = _group(scale, x2.shape[1])
    if vnni_amx.available() and vnni_amx.eligible(g):  # AMX tiles of 8-bit integers: no weight is dequantized
        x2 = x2.contiguous()
        m = x2.shape[0]
        out = torch.empty((m, out_features), dtype=x2.dtype)
        for r0 in range(0, m, ROW_CHUNK):  # the planes' scratch, kept by the thread, bounded by a chunk's rows
            r1 = min(m, r0 + ROW_CHUNK)
            if x2.dtype == torch.float32:
                sums = out[r0:r1].numpy()
            else:  # float32 sums in a scratch kept by the thread, rounded into the output
                sums = vnni_amx.scratch("sums", (r1 - r0) * out_features, np.float32).reshape(r1 - r0, out_features)
            if not vnni_amx.run(_numpy_of(x2[r0:r1]), _KINDS[x2.dtype], w, s, z, g, sums):
                return _portable(x2, qweight, scale, zero_point)
            if x2.dtype != torch.float32:
                out[r0:r1] = torch.from_numpy(sums)
        return out
    # blocks of channels dequantized into W.T (in x's dtype; float16: float32, whose matmul is fast everywhere)
    zn = z if z.shape[0] else None
    k, T = x2.shape[1], qweight.shape[0]
    cdt = torch.float32 if x2.dtype == torch.float16 else x2.dtype
    per = max(1, BLOCK_BYTES // (k * vnni.NT * cdt.itemsize))
    xc = x2.to(cdt).contiguous()
    g = _group(scale, k)
    buf = _buffer(k * vnni.NT * min(per, T), cdt)
    if per >= T:
        b = buf.view(k, T * vnni.NT)
        vnni.dequant_t(w, s, zn, g, 0, T, _numpy_of(b))
        return torch.mm(xc, b).to(x2.dtype)
    y = torch.empty((x2.shape[0], out_features), dtype=x2.dtype)
    for t0 in range(0, T, per):
        t1 = min(T, t0 + per)
        b = buf[:k * (t1 - t0) * vnni.NT].view(k, (t1 - t0) * vnni.NT)
        vnni.dequant_t(w, s, zn, g, t0, t1, _numpy_of(b))
        y[:, t0 * vnni.NT:t1 * vnni.NT] = torch.mm(xc, b)
    return y


def vnni_bf16_linear_impl(x, qweight, scale, zero_point, out_features: int) -> torch.Tensor:
    """:func:`vnni_linear_impl` with bfloat16 calls of 2+ rows on AMX-BF16 tiles of the dequantized weight
    (:mod:`qtorch.vnni_bf16`: ``bfloat16((code - z) * scale)``, float32 sums) where this process may use them and
    ``K % 32 == 0``; other calls as :func:`vnni_linear_impl`."""
    x = x.detach()
    m, k = x.shape
    if m < 2 or x.dtype != torch.bfloat16 or not (vnni_bf16.available() and vnni_bf16.eligible(k)):
        return vnni_linear_impl(x, qweight, scale, zero_point, out_features)
    w, s, z = _arrays(qweight, scale, zero_point)
    x = x.contiguous()
    out = torch.empty((m, out_features), dtype=torch.bfloat16)
    for r0 in range(0, m, ROW_CHUNK):  # the A tiles' and sums' scratch, kept by the thread, bounded by a chunk's rows
        r1 = min(m, r0 + ROW_CHUNK)
        mp = -(-(r1 - r0) // 16) * 16
        sums = vnni_amx.scratch("sums", mp * out_features, np.float32).reshape(mp, out_features)
        vnni_bf16.run(_numpy_of(x[r0:r1]), w, s, z, _group(scale, k), sums)
        out[r0:r1] = torch.from_numpy(sums[:r1 - r0])
    return out


def vnni_lut_linear_impl(x, qweight, scale, zero_point, out_features: int) -> torch.Tensor:
    """:func:`vnni_linear_impl` with bfloat16 calls of 2+ rows on AMX-BF16 tiles whose rows are the weight's
    channels (:mod:`qtorch.vnni_lut`: ``bfloat16((code - z) * scale)`` looked up per channel and group, float32
    sums) where this process may use them and the layer's steps of 32 inputs fit its groups; other calls as
    :func:`vnni_linear_impl`."""
    x = x.detach()
    m, k = x.shape
    g = _group(scale, k)
    if m < 2 or x.dtype != torch.bfloat16 or not vnni_lut.available() or not vnni_lut.eligible(k, g):
        return vnni_linear_impl(x, qweight, scale, zero_point, out_features)
    w, s, z = _arrays(qweight, scale, zero_point)
    x = x.contiguous()
    out = torch.empty((m, out_features), dtype=torch.bfloat16)
    ahead = prefetch.vnni_distance()
    for r0 in range(0, m, ROW_CHUNK):  # the B tiles' scratch, kept by the thread, bounded by a chunk's rows
        r1 = min(m, r0 + ROW_CHUNK)
        vnni_lut.run(_numpy_of(x[r0:r1]), w, s, z, g, _numpy_of(out[r0:r1]), prefetch=ahead)  # rounded to bfloat16
    return out


def _portable(x2, qweight, scale, zero_point) -> torch.Tensor:
    # float32 F.linear on the dequantized weight: every IEEE case (NaN, infinities) as F.linear has it
    return torch.mm(x2.to(torch.float32), dequantized_t(qweight, scale, zero_point, torch.float32)).to(x2.dtype)


# the one-row plans of the layers' decoders and of the op (compiled graphs and autograd get the buffers, not the
# layer), by the codes tensor they read and the activations' dtype; the plan's arrays hold the storage through
# tensors of their own, never this key. A plan built per call cost 50-60 us of a 230 us 4096 x 4096 bfloat16 call
# (its block's first run included)
_OP_PLANS = ByTensor()


def _op_plan(qweight, scale, zero_point, k: int, dtype: torch.dtype) -> "vnni.Plan":
    """The one-row :class:`qtorch.vnni.Plan` of an op's operands, kept while ``qweight`` lives and rebuilt when
    the scale or zero point tensor or an address changes."""
    addresses = (qweight.data_ptr(), scale.data_ptr(), zero_point.data_ptr())
    entries = _OP_PLANS.get(qweight)
    entry = None if entries is None else entries.get(dtype)
    if entry is None or entry[0] is not scale or entry[1] is not zero_point or entry[2] != addresses:
        kind = _KINDS[dtype]
        w, s, z = _arrays(qweight.detach(), scale, zero_point)
        ahead, touch = prefetch.vnni_reads()
        plan = vnni.Plan(w, s, z, _group(scale, k), kind, kind, prefetch=ahead, touch=touch)
        entry = (scale, zero_point, addresses, plan)
        if entries is None:
            entries = _OP_PLANS[qweight] = {}
        entries[dtype] = entry
    return entry[3]


def _one_row(x2, qweight, scale, zero_point, out_features: int) -> torch.Tensor:
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    out = torch.empty((1, out_features), dtype=x2.dtype)
    plan = _op_plan(qweight, scale, zero_point, x2.shape[1], x2.dtype)
    if not plan.registered and plan.native is not None:  # the C++ op of compiled graphs runs it from the next call
        plan.registered = native_ops.register_vnni(plan.native, x2.dtype, x2.shape[1], qweight, scale, zero_point,
                                                   out_features)
    if plan(x2.data_ptr(), out.data_ptr()):
        return out
    return _portable(x2, qweight, scale, zero_point)


def vnni_linear_impl(x, qweight, scale, zero_point, out_features: int) -> torch.Tensor:
    """``x [M, K] @ W.T`` from the layout's buffers (CPU, float32 / bfloat16 / float16): the one-row kernel for
    one row, dequantized blocks and ``torch.mm`` for more, the portable path where ``x`` is not finite."""
    x = x.detach()
    if x.shape[0] == 0:
        return x.new_empty((0, out_features))
    if x.shape[0] == 1:
        return _one_row(x, qweight, scale, zero_point, out_features)
    return _many_rows(x, qweight, scale, zero_point, out_features)


def _fake(x, qweight, scale, zero_point, out_features):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("qtorch::vnni_linear", mutates_args=())
def vnni_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                out_features: int) -> torch.Tensor:
    """:func:`vnni_linear_impl` as an op: opaque to torch.compile, with an input gradient."""
    return vnni_linear_impl(x, qweight, scale, zero_point, out_features)


vnni_linear.register_fake(_fake)


def _setup_backward(ctx, inputs, output):
    x, qweight, scale, zero_point, _ = inputs
    ctx.save_for_backward(qweight, scale, zero_point)
    ctx.x_dtype = x.dtype


def _backward(ctx, grad):
    qweight, scale, zero_point = ctx.saved_tensors
    wt = dequantized_t(qweight, scale, zero_point, torch.float32)  # [K, N]
    return torch.mm(grad.to(torch.float32), wt.t()).to(ctx.x_dtype), None, None, None, None


@torch.library.custom_op("qtorch::vnni_lut_linear", mutates_args=())
def vnni_lut_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    out_features: int) -> torch.Tensor:
    """:func:`vnni_lut_linear_impl` as an op: opaque to torch.compile, with an input gradient."""
    return vnni_lut_linear_impl(x, qweight, scale, zero_point, out_features)


@torch.library.custom_op("qtorch::vnni_bf16_linear", mutates_args=())
def vnni_bf16_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     out_features: int) -> torch.Tensor:
    """:func:`vnni_bf16_linear_impl` as an op: opaque to torch.compile, with an input gradient."""
    return vnni_bf16_linear_impl(x, qweight, scale, zero_point, out_features)


vnni_bf16_linear.register_fake(_fake)
vnni_lut_linear.register_fake(_fake)
for _op in (vnni_linear, vnni_bf16_linear, vnni_lut_linear):
    _op.register_autograd(_backward, setup_context=_setup_backward)
#: path -> (kernel, op with an input gradient, its inference twin)
_PATH_OPS = {
    path: (impl, getattr(torch.ops.qtorch, name), define_twin(name, impl, _fake))
    for path, name, impl in ((MANY_ROWS, "vnni_linear", vnni_linear_impl),
                             (BF16_ROWS, "vnni_bf16_linear", vnni_bf16_linear_impl),
                             (LUT_ROWS, "vnni_lut_linear", vnni_lut_linear_impl))
}


class Vnni(Layout):
    """4-bit codes for integer dot products (see the module docstring)."""

    name = holds = "vnni"
    tuned = True  # bfloat16 calls of 2+ rows: vnni_mm, vnni_bf16 or vnni_lut, by measurement per row bucket

    def eligible(self, spec, device, compute_dtype):
        if (device.type != "cpu" or not vnni.available() or spec.bits != 4 or spec.zero_point_kind != "int"
                or compute_dtype not in _DTYPES):
            return False
        n, k = spec.out_features, spec.in_features
        if n % vnni.NT or k % 8 or not k:
            return False
        if spec.kind == "group":
            return spec.axis == 1 and k % spec.group == 0 and vnni.block_size(spec.group) > 0
        return spec.kind == "channel" and spec.axis == 0 and spec.group < (1 << 24)

    def path(self, device_type, dtype, rows, bits):
        return ONE_ROW if rows == 1 else MANY_ROWS

    def paths(self, device_type, dtype, rows, bits, spec=None):
        """The own path; for bfloat16 calls of 2+ rows on CPUs with AMX-BF16 also ``vnni_bf16`` (where the
        layer's ``K % 32 == 0``, given its ``spec``) and ``vnni_lut`` (where its groups hold whole steps of 32
        inputs too): the layer times them per row bucket."""
        own = self.path(device_type, dtype, rows, bits)
        if (rows < 2 or dtype != torch.bfloat16 or not vnni_bf16.available()
                or spec is not None and not vnni_bf16.eligible(spec.in_features)):
            return (own,)
        if vnni_lut.available() and (spec is None or vnni_lut.eligible(spec.in_features, spec.group)):
            return (own, BF16_ROWS, LUT_ROWS)
        return (own, BF16_ROWS)

    def linear(self, weight, x2, path):
        b = weight.buffers
        qw, sc, zp = b["qweight"], b["scale"], b["zero_point"]
        n = weight.spec.out_features
        if x2.device.type != "cpu" or x2.dtype not in _DTYPES:
            return dense_linear(x2, weight.dequantize)
        grad = needs_grad(x2)
        impl, op, twin = _PATH_OPS[path if path in (BF16_ROWS, LUT_ROWS) else MANY_ROWS]
        if grad or not plain_eager(x2):
            return (op if grad else twin)(x2, qw, sc, zp, n)
        if x2.shape[0] == 1:  # decoding: the weight's one-row plan, built once
            plan = self.plan(weight, x2.dtype)
            x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
            out = torch.empty((1, n), dtype=x2.dtype)
            if plan(x2.data_ptr(), out.data_ptr()):
                return out
            return _portable(x2, qw, sc, zp)
        return impl(x2, qw, sc, zp, n)

    def decoder(self, weight, dtype, path):
        if path != ONE_ROW or dtype not in _DTYPES:
            return None
        b = weight.buffers
        qw, sc, zp = b["qweight"], b["scale"], b["zero_point"]
        plan = self.plan(weight, dtype)
        shapes, k = single_row_shapes(weight.spec.out_features), weight.spec.in_features
        addresses = (qw.data_ptr(), sc.data_ptr(), zp.data_ptr())

        def valid():
            return (b["qweight"] is qw and b["scale"] is sc and b["zero_point"] is zp
                    and (qw.data_ptr(), sc.data_ptr(), zp.data_ptr()) == addresses)

        def decode(x):
            if not valid():
                return None
            if x.stride(-1) != 1:  # (the other dimensions are of size 1)
                x = x.contiguous()
            out = torch.empty(*shapes[x.dim()], dtype=dtype, device="cpu")  # (never the default device)
            if not plan(x.data_ptr(), out.data_ptr()):
                return _portable(x.reshape(1, k), qw, sc, zp).view(*shapes[x.dim()])
            return out

        # the same plan chained with sibling layers' (qtorch.sibling_calls): one K and dtype
        decode.part = Part(("vnni", k, dtype), plan, valid, shapes, dtype)
        return decode

    def plan(self, weight, dtype: torch.dtype):
        """``weight``'s one-row :class:`qtorch.vnni.Plan` for ``dtype``: its codes tensor's, as the op keeps it
        (rebuilt when a buffer is replaced)."""
        b = weight.buffers
        return _op_plan(b["qweight"], b["scale"], b["zero_point"], weight.spec.in_features, dtype)

    def from_canonical(self, spec, qweight, scale, zero_point):
        n, k = spec.out_features, spec.in_features
        if (scale.dtype != torch.float32 or qweight.dtype != torch.uint8 or tuple(qweight.shape) != (n, k // 2)
                or zero_point is not None and zero_point.dtype != torch.uint8):
            return None
        words = _kernel_words(qweight.contiguous().view(torch.int32))  # [N, K/8]: 8 codes a word
        q = words.reshape(n // vnni.NT, vnni.NT, k // 8).transpose(1, 2).contiguous()
        s = _tiles(_scale_rows(scale, spec.kind, n, k, spec.group))
        z = (torch.zeros((0, 0, 0), dtype=torch.uint8) if zero_point is None
             else _tiles(_scale_rows(zero_point, spec.kind, n, k, spec.group)))
        return q, s, z, None

    def to_canonical(self, spec, qweight, scale, zero_point):
        n, k = spec.out_features, spec.in_features
        q = _canonical_words(qweight.transpose(1, 2).reshape(n, k // 8)).contiguous().view(torch.uint8)
        z = None if spec.symmetric else _scale_canonical(_rows(zero_point), spec.kind, n, k, spec.group)
        return q, _scale_canonical(_rows(scale), spec.kind, n, k, spec.group), z

    def to_codes(self, spec, qweight, scale, zero_point):
        q, s, z = self.to_canonical(spec, qweight, scale, zero_point)
        return unpack_codes(q, 4, spec.in_features), s, z

    def dequantize(self, spec, qweight, scale, zero_point, dtype):
        return dequantized_t(qweight, scale, zero_point, torch.float32).t().contiguous().to(dtype)


VNNI = Vnni()
