"""The int8pack layout: PyTorch's ``torch._weight_int8pack_mm`` on the canonical codes (CPU, bfloat16).

Eligible for 8-bit symmetric per-output-channel weights of a bfloat16 layer on CPU where the kernel cannot crash
(:func:`int8pack_ok`). The buffers are the canonical state itself; the kernel's bfloat16 scales ``[N]`` are
derived data (``aux``, never saved). Inputs of another dtype take the portable path. CPU calls of several rows
may take ``dequant_mm`` instead (:mod:`qtorch.layouts.dequant_path`), or on AMX CPUs ``amx_rows`` (the codes as
they are held, multiplied on AMX tiles: :mod:`qtorch.amx_rows`), where the layer measured it faster: the measured
choice calls the kernel's path ``int8pack`` (:meth:`path` keeps naming it ``dense``, as before).
"""

from __future__ import annotations

import torch

from .. import amx_rows
from .._infer_ops import needs_grad, plain_eager
from ..compile import woq_templates
from . import dequant_path
from .base import Layout, op_decoder
from .codec import dense_linear, dequantize_canonical

__all__ = ["AMX_ROWS", "INT8PACK", "int8pack_ok", "Int8PackMM"]

#: the path of bfloat16 calls of several rows on AMX tiles, the codes' rows as A tiles (:mod:`qtorch.amx_rows`)
AMX_ROWS = "amx_rows"


def int8pack_ok(dtype: torch.dtype, in_features: int) -> bool:
    """Preconditions of ``torch._weight_int8pack_mm`` that keep it from crashing (docs/kernels.md).

    bfloat16 with ``K % 16 != 0`` (at >= 4 rows) or ``K % 8 != 0`` kills the process; float16/float32 are safe at
    any K but are scalar (slow) on AVX2. Checked once per (dtype, K), never per call.
    """
    if dtype == torch.bfloat16:
        return in_features % 16 == 0
    return dtype in (torch.float16, torch.float32)



def aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` (contiguous) where its data starts on a 32-byte boundary, else a copy that does: PyTorch's CPU kernel
    reads the rows with aligned vector loads, and a row sliced from inside a wider tensor (a data pointer 16 bytes
    past a boundary) killed the process (torch 2.13, AVX-512). Under ``torch.compile`` a traced input has no
    address yet: the graph copies ``x``, which serves backends that run the graph's ops (``eager``,
    ``aot_eager``); inductor drops such a copy and aligns its graph's inputs to 16 bytes only, so a row misaligned
    by 16 bytes still reaches the kernel there (docs/kernels.md; ``qtorch.compile``'s template took one fine).
    Under other tracing and ``torch.func`` transforms (no address to read, :func:`plain_eager`): ``x`` itself."""
    if torch.compiler.is_compiling():
        return x.clone()
    if not plain_eager(x) or x.data_ptr() % 32 == 0:
        return x
    return x.clone()


class Int8PackMM(torch.autograd.Function):
    """``torch._weight_int8pack_mm`` (no derivative in PyTorch) with an input gradient ``grad @ (codes * scale)``.

    ``apply(x, qweight [N, K] int8, scale_compute [N] (x's dtype), scale [N] float32)``. Used only when the input
    needs a gradient: the no-grad forward calls the op itself, so that inductor still sees it."""

    @staticmethod
    def forward(ctx, x, qweight, scale_compute, scale):
        ctx.save_for_backward(qweight, scale)
        return torch._weight_int8pack_mm(aligned(x), qweight, scale_compute)

    @staticmethod
    def backward(ctx, grad):
        qweight, scale = ctx.saved_tensors
        gx = torch.mm(grad.to(torch.float32) * scale, qweight.to(torch.float32))
        return gx.to(grad.dtype), None, None, None



def _woq_template(x2: torch.Tensor) -> bool:
    """Whether this call is traced by ``qtorch.compile`` with inductor's templates for ``_weight_int8pack_mm``
    (:func:`qtorch.compile.woq_templates`): the op then goes into the graph instead of the ``dequant_mm`` custom
    op, and inductor measures its AMX template against the ATen kernel. 4096 x 4096, bf16, one thread, same runs:
    the chosen kernel beat ``dequant_mm`` at 16 and 128 rows (qtorch/compile.py)."""
    return (x2.device.type == "cpu" and x2.dtype == torch.bfloat16 and torch.compiler.is_compiling()
            and woq_templates())


class Int8Pack(Layout):
    name, holds, torch_kernels, tuned = "int8pack", "canonical", True, True

    def eligible(self, spec, device, compute_dtype):
        return (device.type == "cpu" and compute_dtype == torch.bfloat16 and spec.bits == 8 and spec.symmetric
                and spec.kind == "channel" and spec.axis == 0 and int8pack_ok(torch.bfloat16, spec.in_features))

    def path(self, device_type, dtype, rows, bits):
        return "dense"  # the canonical codes: the name the portable path reports too

    def paths(self, device_type, dtype, rows, bits, spec=None):
        own = "int8pack" if device_type == "cpu" and dtype == torch.bfloat16 else "dense"
        extra = ()
        if dequant_path.eligible(device_type, dtype, rows):
            extra = (dequant_path.NAME,)
            if (own == "int8pack" and amx_rows.available()
                    and (spec is None or amx_rows.eligible(spec.in_features))):
                extra += (AMX_ROWS,)
        return (own,) + extra

    def linear(self, weight, x2, path):
        if path == AMX_ROWS and not (torch.compiler.is_compiling() or needs_grad(x2) or not plain_eager(x2)):
            b = weight.buffers
            return amx_rows.run(x2.contiguous(), b["qweight"], b["scale"])
        if path in (dequant_path.NAME, AMX_ROWS) and not _woq_template(x2):
            return dequant_path.linear(weight, x2)
        if x2.device.type == "cpu" and x2.dtype == torch.bfloat16:
            b = weight.buffers
            if needs_grad(x2):  # no derivative in PyTorch: the wrapper has one
                return Int8PackMM.apply(x2.contiguous(), b["qweight"], weight.aux, b["scale"])
            return torch._weight_int8pack_mm(aligned(x2.contiguous()), b["qweight"], weight.aux)
        return dense_linear(x2, weight.dequantize)

    def decoder(self, weight, dtype, path):
        # PyTorch's kernel with every operand but x fixed
        if path == dequant_path.NAME or dtype != torch.bfloat16:
            return None
        return op_decoder(weight, torch._weight_int8pack_mm, (weight.aux,), align=32)  # (see aligned())

    def from_canonical(self, spec, qweight, scale, zero_point):
        return qweight, scale, zero_point, scale.to(torch.bfloat16)  # the kernel wants the activations' dtype

    def to_codes(self, spec, qweight, scale, zero_point):
        return qweight, scale, zero_point

    def to_canonical(self, spec, qweight, scale, zero_point):
        return qweight, scale, zero_point

    def dequantize(self, spec, qweight, scale, zero_point, dtype):
        return dequantize_canonical(qweight, scale, zero_point, bits=8, symmetric=True, kind=spec.kind,
                                    axis=spec.axis, group=spec.group, out_features=spec.out_features,
                                    in_features=spec.in_features, dtype=dtype)


INT8PACK = Int8Pack()
