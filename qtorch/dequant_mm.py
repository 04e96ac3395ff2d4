"""The many-rows forward for CPUs with a fast dense matmul (AMX, AVX-512 BF16): dequantize blocks of output rows
into the activation dtype, multiply each with oneDNN/MKL, write into slices of one output.

``y = x @ W.T`` where ``W = (codes - zero_point) * scale`` is never held whole: blocks of ``block_rows`` output
channels (8 MB by default, in a buffer kept per thread) are dequantized by
:mod:`qtorch.dequant_rows` straight into bfloat16 or float32 (float16: float32, then cast) and multiplied by
``F.linear``. In bfloat16 that matmul runs on AMX where the CPU has it; PyTorch's weight-only kernels
(``_weight_int8pack_mm``) do not, and were 8x slower than dense at 128 rows on such a CPU.

Input: the canonical state of a layer (docs/packing.md), as in its ``state_dict``. The weight equals
``dequantize(...)`` of qcore rounded to ``x.dtype``, so ``y`` matches ``F.linear(x, dequantized_weight)`` up to
the matmul's own summation order.

>>> import torch, qcore
>>> from qtorch.dequant_mm import WeightSpec, dequant_linear
>>> spec = WeightSpec.from_scheme(qcore.QuantScheme(bits=8), out_features=3, in_features=4)
>>> q = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0], [-1, -1, -1, -1]], dtype=torch.int8)
>>> dequant_linear(torch.ones(1, 4), q, torch.tensor([0.5, 1.0, 2.0]), None, spec)
tensor([[ 5.,  0., -8.]])
"""

from __future__ import annotations

import dataclasses
import threading

import torch
import torch.nn.functional as F

from qcore import PerChannel, PerGroup, PerTensor, QuantScheme

from . import dequant_rows as _dq
from ._infer_ops import define_twin, needs_grad

__all__ = ["WeightSpec", "dequant_linear", "dequantize", "block_rows_for"]

#: bytes of dequantized weight per block. Fewer, larger matmuls won on the AMX Xeon (2 cores, K = N = 4096, 128
#: rows, best of 15, one thread: bfloat16 W8 19.8 / 14.8 / 12.8 / 11.9 ms for blocks of 128 / 256 / 512 / 1024
#: rows; float32 best at 512 rows): oneDNN repacks each block's weight per call, and the call overhead is per block
BLOCK_BYTES = 8 << 20
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """How a canonical weight is stored: ``bits``, ``symmetric``, granularity ``kind`` (``tensor``, ``channel``,
    ``group``), its ``axis`` (0: output channels, 1: inputs) and ``group`` size, and the weight's shape."""

    bits: int
    symmetric: bool
    kind: str
    axis: int
    group: int
    out_features: int
    in_features: int

    @classmethod
    def from_scheme(cls, scheme: QuantScheme, out_features: int, in_features: int) -> "WeightSpec":
        if not isinstance(scheme, QuantScheme):
            raise TypeError(f"scheme must be a qcore.QuantScheme, got {type(scheme).__name__}")
        scheme.validate_shape((out_features, in_features))
        g = scheme.granularity
        if isinstance(g, PerTensor):
            kind, axis, size = "tensor", 0, in_features
        elif isinstance(g, PerChannel):
            kind, axis, size = "channel", g.axis % 2, 1
        elif isinstance(g, PerGroup):
            kind, axis, size = "group", g.axis % 2, g.size
        else:  # pragma: no cover - qcore has no other granularity
            raise TypeError(f"unsupported granularity {g!r}")
        return cls(scheme.bits, scheme.symmetric, kind, axis, size, out_features, in_features)

    @property
    def params_shape(self) -> tuple:
        n, k, g = self.out_features, self.in_features, self.group
        if self.kind == "tensor":
            return ()
        if self.kind == "channel":
            return (n,) if self.axis == 0 else (k,)
        # a group size that does not divide its axis leaves a shorter last group: ceil(n / g) groups
        return (n, -(-k // g)) if self.axis == 1 else (-(-n // g), k)

    @property
    def qweight_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 and self.symmetric else torch.uint8

    @property
    def qweight_shape(self) -> tuple:
        return (self.out_features, (self.in_features * self.bits + 7) // 8)

    def rows_form(self) -> tuple:
        """(rows of S, groups of S, row_div): the ``S[R, G]`` form of :mod:`qtorch.dequant_rows`."""
        n, k, g = self.out_features, self.in_features, self.group
        if self.kind == "tensor":
            return 1, 1, n
        if self.kind == "channel":
            return (n, 1, 1) if self.axis == 0 else (1, k, n)
        return (n, -(-k // g), 1) if self.axis == 1 else (-(-n // g), k, g)


def _check(x, qweight, scale, zero_point, spec: WeightSpec) -> None:
    """The public boundary: every tensor's type, dtype, shape and device against ``spec`` (messages name it)."""
    if not isinstance(spec, WeightSpec):
        raise TypeError(f"spec must be a WeightSpec, got {type(spec).__name__}")
    for name, t in (("x", x), ("qweight", qweight), ("scale", scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != spec.in_features:
        raise ValueError(f"x must be [rows, in_features={spec.in_features}], got {list(x.shape)}")
    if qweight.dtype != spec.qweight_dtype or tuple(qweight.shape) != spec.qweight_shape:
        raise ValueError(f"qweight must be {spec.qweight_dtype} of shape {list(spec.qweight_shape)}, got "
                         f"{qweight.dtype} of shape {list(qweight.shape)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != spec.params_shape:
        raise ValueError(f"scale must be float32 of shape {list(spec.params_shape)}, got {scale.dtype} of shape "
                         f"{list(scale.shape)}")
    if spec.symmetric:
        if zero_point is not None:
            raise ValueError("zero_point must be None for a symmetric scheme")
    elif (not isinstance(zero_point, torch.Tensor) or zero_point.dtype != torch.uint8
          or tuple(zero_point.shape) != spec.params_shape):
        got = (f"{zero_point.dtype} of shape {list(zero_point.shape)}" if isinstance(zero_point, torch.Tensor)
               else type(zero_point).__name__)
        raise ValueError(f"zero_point must be uint8 of shape {list(spec.params_shape)}, got {got}")
    for name, t in (("x", x), ("qweight", qweight), ("scale", scale), ("zero_point", zero_point)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}: dequant_linear runs on CPU")


def block_rows_for(in_features: int, dtype: torch.dtype, block_bytes: int = BLOCK_BYTES) -> int:
    """Output rows per block: ``block_bytes`` of dequantized weight, a multiple of 16, at least 16.

    >>> block_rows_for(4096, torch.bfloat16)
    1024
    """
    per_row = in_features * (2 if dtype == torch.bfloat16 else 4)
    return max(16, block_bytes // max(1, per_row) // 16 * 16)


def _operands(qweight, scale, zero_point, spec: WeightSpec):
    """NumPy views for the kernel: codes as uint8 [N, KB], S / Z in the rows form."""
    R, G, row_div = spec.rows_form()
    q = qweight.contiguous().view(torch.uint8).numpy()
    S = scale.contiguous().reshape(R, G).numpy()
    Z = (torch.zeros((0, 0), dtype=torch.uint8) if zero_point is None
         else zero_point.contiguous().reshape(R, G)).numpy()
    zero = 0 if spec.bits == 8 or not spec.symmetric else 1 << (spec.bits - 1)
    return q, S, Z, zero, row_div


def _dequant_block(ops, spec: WeightSpec, r0: int, r1: int, dtype: torch.dtype, out=None) -> torch.Tensor:
    """Rows ``r0..r1`` of the weight in ``dtype`` (bfloat16 or float32 written by the kernel; float16 cast from
    float32), into ``out`` when given (a C-contiguous ``[r1 - r0, K]`` tensor of ``dtype``)."""
    q, S, Z, zero, row_div = ops
    signed8 = spec.bits == 8 and spec.symmetric
    k = spec.in_features
    kdt = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    w = out if out is not None and dtype == kdt else torch.empty((r1 - r0, k), dtype=kdt, device="cpu")
    dst = w.view(torch.int16).numpy().view("uint16") if kdt == torch.bfloat16 else w.numpy()
    group = spec.group if spec.kind == "group" and spec.axis == 1 else 0  # along K: the ragged last group's size
    _dq.dequant_rows(q, spec.bits, signed8, k, S, Z, zero, row_div, r0, r1, dst, group)
    return w if dtype == kdt else w.to(dtype)


_BUFFERS = threading.local()


def _buffer(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread block buffer, reused across calls: a fresh multi-MB tensor per call costs page faults (on a
    VM, 3x the dequantization itself was measured for a whole 4096 x 4096 weight)."""
    cache = getattr(_BUFFERS, "cache", None)
    if cache is None:
        cache = _BUFFERS.cache = {}
    t = cache.get(dtype)
    if t is None or t.numel() < rows * k:
        t = cache[dtype] = torch.empty(rows * k, dtype=dtype, device="cpu")
    return t[:rows * k].view(rows, k)


def _block_rows(spec: WeightSpec, dtype: torch.dtype, block_rows: int) -> int:
    # any cut works, groups of output channels included: the kernel reads scales by absolute row
    return block_rows if block_rows > 0 else block_rows_for(spec.in_features, dtype)


def dequantize(qweight, scale, zero_point, spec: WeightSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole weight ``[N, K]`` in ``dtype`` (float32 math, one rounding to ``dtype``), on CPU."""
    _check(torch.empty((0, spec.in_features), dtype=dtype), qweight, scale, zero_point, spec)
    return _dequant_block(_operands(qweight, scale, zero_point, spec), spec, 0, spec.out_features, dtype)


def _impl(x, qweight, scale, zero_point, spec: WeightSpec, block_rows: int) -> torch.Tensor:
    x = x.detach().contiguous()
    n = spec.out_features
    y = torch.empty((x.shape[0], n), dtype=x.dtype, device="cpu")
    if x.shape[0] == 0:
        return y
    ops = _operands(qweight, scale, zero_point, spec)
    step = _block_rows(spec, x.dtype, block_rows)
    # float16 matmuls are slow on CPUs without AVX512-FP16; float32 weights are exact for its values
    cdt = torch.float32 if x.dtype == torch.float16 else x.dtype
    xc = x.to(cdt)
    buf = _buffer(min(step, n), spec.in_features, cdt)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        w = _dequant_block(ops, spec, r0, r1, cdt, buf[:r1 - r0])
        if step >= n:
            return F.linear(xc, w).to(x.dtype)
        y[:, r0:r1] = F.linear(xc, w)
    return y


def _kernel(x, qweight, scale, zero_point, bits, symmetric, kind, axis, group, out_features, block_rows):
    spec = WeightSpec(bits, symmetric, kind, axis, group, out_features, x.shape[1])
    return _impl(x, qweight, scale, zero_point, spec, block_rows)


def _fake(x, qweight, scale, zero_point, bits, symmetric, kind, axis, group, out_features, block_rows):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("qtorch::dequant_mm", mutates_args=())
def _op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
        symmetric: bool, kind: str, axis: int, group: int, out_features: int, block_rows: int) -> torch.Tensor:
    """:func:`dequant_linear` as an op: opaque to torch.compile (freezing cannot fold the dequantized weight into
    a full-precision constant), with an input gradient."""
    return _kernel(x, qweight, scale, zero_point, bits, symmetric, kind, axis, group, out_features, block_rows)


_op.register_fake(_fake)


def _setup_backward(ctx, inputs, output):
    x, qweight, scale, zero_point, bits, symmetric, kind, axis, group, out_features, _ = inputs
    ctx.save_for_backward(qweight, scale, zero_point)
    ctx.spec = WeightSpec(bits, symmetric, kind, axis, group, out_features, x.shape[1])
    ctx.x_dtype = x.dtype


def _backward(ctx, grad):
    # d(x @ W.T)/dx = grad @ W; the codes are frozen (no gradient). W by torch ops, not the kernel: torch.compile
    # traces a backward with fake tensors, which have no NumPy view. Imported here: the layouts import this module.
    from .layouts.codec import dequantize_canonical

    qweight, scale, zero_point = ctx.saved_tensors
    sp = ctx.spec
    w = dequantize_canonical(qweight, scale, zero_point, bits=sp.bits, symmetric=sp.symmetric, kind=sp.kind,
                             axis=sp.axis, group=sp.group, out_features=sp.out_features, in_features=sp.in_features)
    return (torch.mm(grad.to(torch.float32), w).to(ctx.x_dtype),) + (None,) * 10


_op.register_autograd(_backward, setup_context=_setup_backward)
_TWIN = define_twin("dequant_mm", _kernel, _fake)  # the op without its autograd layer (qtorch._infer_ops)


def dequant_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   spec: WeightSpec, *, block_rows: int = 0) -> torch.Tensor:
    """``F.linear(x, W)`` for ``x [M, K]`` (float32, bfloat16 or float16, CPU) and the canonical weight ``W``
    (``qweight``, ``scale``, ``zero_point``: the layer's ``state_dict`` form, checked against ``spec``), computed
    block by block (``block_rows`` output channels at a time, 0: :func:`block_rows_for`). Returns ``[M, N]`` in
    ``x.dtype``; no bias. Runs as the ``qtorch::dequant_mm`` op under ``torch.compile`` or with autograd.
    """
    _check(x, qweight, scale, zero_point, spec)
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 0:
        raise ValueError(f"block_rows must be an int >= 0, got {block_rows!r}")
    grad = needs_grad(x)
    if grad or torch.compiler.is_compiling():
        op = torch.ops.qtorch.dequant_mm if grad else _TWIN
        return op(x, qweight, scale, zero_point, spec.bits, spec.symmetric, spec.kind, spec.axis, spec.group,
                  spec.out_features, block_rows)
    return _impl(x, qweight, scale, zero_point, spec, block_rows)
