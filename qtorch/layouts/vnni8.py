"""The vnni8 layout: symmetric 8-bit codes in the order of AMX's B tiles, multiplied as integers (:mod:`qtorch.vnni8`,
CPUs with AMX-INT8).

Eligible for 8-bit symmetric weights per output channel or per tensor with ``N % 64 == 0`` and ``K % 64 == 0``
(up to :data:`qtorch.vnni8.MAX_K`), float32 / bfloat16 / float16 activations, where :func:`qtorch.vnni8.available`
(AMX tiles granted to the process). Buffers: ``qweight`` int8 ``[N/64, 2, K/64, 2, 16, 64]`` (the canonical codes
reordered, :func:`qtorch.vnni8.pack`: the same bytes), ``scale`` float32 ``[N]`` (a per-tensor scale repeated);
``state_dict`` and files keep the canonical form. The path ``vnni8`` for every row count: ``x`` split into 2 to 4
integer planes per row, every tile loaded from the weight as it is stored (no code is converted per call), exact
32-bit sums, scaled once per row and channel (see :class:`qtorch.vnni8.Plan` for the planes and ``x``'s one
rounding); one eager row also ``vnni8_dot`` (the same planes by ``vpdpbusd``, no tile, where
:func:`qtorch.vnni8.dot_eligible`), the layer timing both on this machine and keeping the faster. Under
``torch.compile`` and with autograd the op ``qtorch::vnni8_linear`` and its inference twin (opaque: freezing never
folds a dequantized weight; one row on the tiles); a call whose ``x`` holds a NaN or an infinity, which the planes
cannot hold, is computed by the portable path instead, as ``F.linear`` would.

>>> import torch, qcore
>>> from qtorch.layouts import WeightSpec
>>> spec = WeightSpec.of(qcore.QuantScheme(8, True, qcore.PerChannel(0)), out_features=128, in_features=256)
>>> VNNI8.eligible(spec, torch.device("cpu"), torch.bfloat16) == vnni8.available()
True
"""

from __future__ import annotations

import torch

from .. import native_ops, prefetch, vnni8
from .._infer_ops import define_twin, needs_grad, plain_eager
from .._kept import ByTensor
from ..sibling_calls import Part
from .base import Layout, single_row_shapes
from .codec import dense_linear

__all__ = ["VNNI8", "vnni8_linear_impl"]

_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
PATH = "vnni8"
#: one row by ``vpdpbusd`` on the same bytes (eager calls; compiled graphs and autograd run the op's tiles)
DOT_PATH = "vnni8_dot"
#: rows of x per kernel call at most: bounds the scratch a thread keeps (its rows' planes and each row's multiplier)
ROW_CHUNK = 1024


def dequantized(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W`` ``[N, K]`` in float32 (``code * scale``, as qcore dequantizes) from the layout's buffers."""
    return vnni8.unpack(qweight).to(torch.float32) * scale[:, None]


def _portable(x2, qweight, scale) -> torch.Tensor:
    # float32 F.linear on the dequantized weight: every IEEE case (NaN, infinities) as F.linear has it
    return torch.mm(x2.to(torch.float32), dequantized(qweight, scale).t()).to(x2.dtype)


# the plans of the layers and of the op (compiled graphs and autograd get the buffers, not the layer), by the codes
# tensor they read; a plan's arrays hold the storage through views of their own, never this key
_PLANS = ByTensor()


def _plan(qweight: torch.Tensor, scale: torch.Tensor) -> "vnni8.Plan":
    """The :class:`qtorch.vnni8.Plan` of an op's operands, kept while ``qweight`` lives and rebuilt when the scale
    tensor or an address changes."""
    addresses = (qweight.data_ptr(), scale.data_ptr())
    entry = _PLANS.get(qweight)
    if entry is None or entry[0] is not scale or entry[1] != addresses:
        plan = vnni8.Plan(qweight.detach().numpy(), scale.detach().numpy(), touch=prefetch.vnni8_touch())
        entry = _PLANS[qweight] = (scale, addresses, plan)
    return entry[2]


def vnni8_linear_impl(x, qweight, scale, out_features: int, dot: bool = False) -> torch.Tensor:
    """``x [M, K] @ W.T`` from the layout's buffers (CPU, float32 / bfloat16 / float16 ``x``, the output in its
    dtype): the AMX-INT8 kernel, ``ROW_CHUNK`` rows a call (``dot``: one row by ``vpdpbusd``); the portable path
    where ``x`` is not finite."""
    x = x.detach()
    m = x.shape[0]
    out = torch.empty((m, out_features), dtype=x.dtype)
    if m == 0:
        return out
    x = x.contiguous()
    plan, kind = _plan(qweight, scale), _KINDS[x.dtype]
    if m == 1 and kind not in plan.registered:  # the C++ op of compiled graphs runs the launch from the next call
        native = plan.one_row_native(kind, kind)
        if native is not None and native_ops.register_vnni8(native, x.dtype, x.shape[1], qweight, scale,
                                                            out_features):
            plan.registered.add(kind)
    for r0 in range(0, m, ROW_CHUNK):
        r1 = min(m, r0 + ROW_CHUNK)
        if not plan(x[r0:r1].data_ptr(), kind, r1 - r0, out[r0:r1].data_ptr(), kind, dot=dot):
            return _portable(x, qweight, scale)
    return out


def _fake(x, qweight, scale, out_features):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("qtorch::vnni8_linear", mutates_args=())
def vnni8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """:func:`vnni8_linear_impl` as an op: opaque to torch.compile, with an input gradient."""
    return vnni8_linear_impl(x, qweight, scale, out_features)


vnni8_linear.register_fake(_fake)


def _setup_backward(ctx, inputs, output):
    x, qweight, scale, _ = inputs
    ctx.save_for_backward(qweight, scale)
    ctx.x_dtype = x.dtype


def _backward(ctx, grad):
    qweight, scale = ctx.saved_tensors
    return torch.mm(grad.to(torch.float32), dequantized(qweight, scale)).to(ctx.x_dtype), None, None, None


vnni8_linear.register_autograd(_backward, setup_context=_setup_backward)
_TWIN = define_twin("vnni8_linear", vnni8_linear_impl, _fake)


class Vnni8(Layout):
    """Symmetric 8-bit codes for AMX-INT8 tiles (see the module docstring)."""

    name = holds = "vnni8"
    tuned = True  # one row: the tiles or vpdpbusd, by measurement

    def eligible(self, spec, device, compute_dtype):
        if (device.type != "cpu" or not vnni8.available() or spec.bits != 8 or not spec.symmetric
                or spec.zero_point_kind != "int" or compute_dtype not in _KINDS):
            return False
        if not (spec.kind == "tensor" or spec.kind == "channel" and spec.axis == 0):
            return False
        return vnni8.eligible(spec.out_features, spec.in_features)

    def path(self, device_type, dtype, rows, bits):
        return PATH

    def paths(self, device_type, dtype, rows, bits, spec=None):
        """The own path; for one CPU row also ``vnni8_dot`` (where :func:`qtorch.vnni8.dot_eligible` for the
        layer's ``in_features``, given its ``spec``)."""
        if (device_type != "cpu" or rows != 1 or not vnni8.dot_eligible(spec.in_features if spec else 1)
                or dtype not in _KINDS):
            return (PATH,)
        return (PATH, DOT_PATH)

    def linear(self, weight, x2, path):
        b = weight.buffers
        qw, sc = b["qweight"], b["scale"]
        n = weight.spec.out_features
        if x2.device.type != "cpu" or x2.dtype not in _KINDS:
            return dense_linear(x2, weight.dequantize)
        grad = needs_grad(x2)
        if grad or not plain_eager(x2):
            return (torch.ops.qtorch.vnni8_linear if grad else _TWIN)(x2, qw, sc, n)
        return vnni8_linear_impl(x2, qw, sc, n, path == DOT_PATH)

    def decoder(self, weight, dtype, path):
        if dtype not in _KINDS:
            return None
        b = weight.buffers
        qw, sc = b["qweight"], b["scale"]
        plan = _plan(qw, sc)
        n, k, kind, dot = weight.spec.out_features, weight.spec.in_features, _KINDS[dtype], path == DOT_PATH
        shapes = single_row_shapes(n)
        addresses = (qw.data_ptr(), sc.data_ptr())

        def valid():
            return b["qweight"] is qw and b["scale"] is sc and (qw.data_ptr(), sc.data_ptr()) == addresses

        def decode(x):
            if not valid():
                return None
            if x.stride(-1) != 1:  # (the other dimensions are of size 1)
                x = x.contiguous()
            out = torch.empty(*shapes[x.dim()], dtype=dtype, device="cpu")  # (never the default device)
            if not plan(x.data_ptr(), kind, 1, out.data_ptr(), kind, dot=dot):
                return _portable(x.reshape(1, k), qw, sc).view(*shapes[x.dim()])
            return out

        if plan.row or not dot:  # chained with sibling layers' (qtorch.sibling_calls): one K, dtype and path
            decode.part = Part(("vnni8", k, dtype, dot), (plan, kind, kind, dot), valid, shapes, dtype)
        return decode

    def from_canonical(self, spec, qweight, scale, zero_point):
        n, k = spec.out_features, spec.in_features
        if (qweight.dtype != torch.int8 or tuple(qweight.shape) != (n, k) or scale.dtype != torch.float32
                or zero_point is not None):
            return None
        s = scale.reshape(()).expand(n) if spec.kind == "tensor" else scale.reshape(n)
        return vnni8.pack(qweight.contiguous()), s.contiguous().clone(), None, None

    def to_canonical(self, spec, qweight, scale, zero_point):
        s = scale[0].clone() if spec.kind == "tensor" else scale.clone()  # (per tensor: 0-d)
        return vnni8.unpack(qweight), s, None

    def to_codes(self, spec, qweight, scale, zero_point):
        return self.to_canonical(spec, qweight, scale, zero_point)

    def dequantize(self, spec, qweight, scale, zero_point, dtype):
        return dequantized(qweight, scale).to(dtype)


VNNI8 = Vnni8()
