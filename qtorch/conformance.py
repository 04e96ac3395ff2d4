"""The conformance suite (:mod:`qcore.testing`) against the torch-based peers: torchao, optimum-quanto and HQQ.

Their adapters live here because qcore never imports torch. ``python -m qtorch.conformance --against
qcore,gguf,torchao,quanto,hqq`` is ``python -m qcore.testing`` with these libraries added (each only where installed).

>>> sorted(LIBRARIES)
['gguf', 'hqq', 'qcore', 'quanto', 'torchao']
"""

from __future__ import annotations

import sys

import numpy as np
from hypothesis import strategies as st

from qcore.scheme import PerChannel, PerGroup, PerTensor, QuantScheme
from qcore.testing import adapters
from qcore.testing import __main__ as _cli
from qcore.testing.promises import Promises, Quantized, Quantizer
from qcore.testing.strategies import schemes

__all__ = ["LIBRARIES", "torchao_quantizer", "quanto_quantizers", "hqq_quantizer", "main"]


def _torch(x: np.ndarray):
    """A torch view of ``x`` keeping its strides where torch can (it has no negative strides)."""
    import ml_dtypes
    import torch

    if any(s < 0 for s in x.strides):
        x = x.copy()
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def _numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def _block_expand(params: np.ndarray, shape, block) -> np.ndarray:
    """Parameters of a blocked quantization (one per ``block``-sized tile) broadcast to ``shape``."""
    p = np.asarray(params).reshape([n // b for n, b in zip(shape, block)])
    for axis, b in enumerate(block):
        p = np.repeat(p, b, axis=axis)
    return p


def torchao_quantizer() -> Quantizer:
    """torchao's ``choose_qparams_affine`` / ``quantize_affine`` / ``dequantize_affine`` with their defaults:
    symmetric uses the full signed range ``[-2^(b-1), 2^(b-1)-1]``, asymmetric ``[0, 2^b-1]`` with an integer
    zero point (zero preserved); dequantized to float32."""
    import torch
    from torchao.quantization import quant_primitives as qp

    def block_of(shape, g):
        if isinstance(g, PerTensor):
            return tuple(shape)
        axis = g.axis % len(shape)
        if isinstance(g, PerChannel):
            return tuple(1 if i == axis else n for i, n in enumerate(shape))
        return tuple(g.size if i == axis else 1 for i in range(len(shape)))

    def quantize(x, scheme):
        t = _torch(x)
        block = block_of(x.shape, scheme.granularity)
        if scheme.symmetric:
            half = 1 << (scheme.bits - 1)
            lo, hi, mapping, dtype = -half, half - 1, qp.MappingType.SYMMETRIC, torch.int8
        else:
            lo, hi, mapping, dtype = 0, (1 << scheme.bits) - 1, qp.MappingType.ASYMMETRIC, torch.uint8
        scale, zp = qp.choose_qparams_affine(t, mapping, block, dtype, lo, hi)
        codes = qp.quantize_affine(t, block, scale, zp, dtype, lo, hi)
        native = (codes, block, scale, zp, dtype, lo, hi)
        return Quantized(_numpy(codes), _block_expand(_numpy(scale), x.shape, block),
                         _block_expand(_numpy(zp), x.shape, block), lo, hi, native)

    def dequantize(q):
        codes, block, scale, zp, dtype, lo, hi = q.native
        return _numpy(qp.dequantize_affine(codes, block, scale, zp, dtype, lo, hi, output_dtype=torch.float32))

    # no NaN/Inf check is documented; the rest is what an affine round-to-nearest quantizer claims
    # blocks of one element (group size 1, per channel with one column) make quantize_affine raise a RuntimeError
    # in torchao 0.18: left out, so that the table shows the rest
    return Quantizer("torchao", quantize, dequantize, Promises(rejects_nonfinite=False),
                     schemes=lambda rank: schemes(rank=rank, sizes=(2, 3, 4, 8)),
                     dtypes=(np.float16, np.float32, _bf16()), min_side=2, ranks=(2, 3))


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def quanto_quantizers() -> list:
    """optimum-quanto's weight quantizers as ``quantize_weight`` builds them: qint8 per output channel with
    ``AbsmaxOptimizer`` (``scale = absmax / 127``, codes in the qtype's ``[-128, 127]``, ``x = q * s``), and qint4
    per group along the rows with ``MaxOptimizer`` (codes ``[0, 15]``, float shift: ``x = q * s - shift``)."""
    import torch
    from optimum.quanto import qint4, qint8
    from optimum.quanto.tensor.grouped import ungroup
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    def q8(x, scheme):
        t = _torch(x)
        scale = AbsmaxOptimizer()(t, qint8, axis=0)
        w = quantize_weight(t, qint8, axis=0, scale=scale, optimized=False)
        s = np.broadcast_to(_numpy(w._scale), x.shape)
        return Quantized(_numpy(w._data), s, 0, qint8.qmin, qint8.qmax, w)  # the qtype's range: [-128, 127]

    def q4(x, scheme):
        t = _torch(x)
        g = scheme.granularity.size
        scale, shift = MaxOptimizer()(t, qint4, axis=0, group_size=g)
        w = quantize_weight(t, qint4, axis=0, scale=scale, shift=shift, group_size=g, optimized=False)
        data = w._data.unpack() if hasattr(w._data, "unpack") else w._data
        codes = _numpy(ungroup(data, 0, t.shape))
        s = _numpy(ungroup(w._scale.expand(data.shape), 0, t.shape))
        # an all-zero group has scale 0 and shift 0: its codes are 0, read as zero point 0
        z = _numpy(ungroup(torch.where(w._scale == 0, 0, w._shift / w._scale).expand(data.shape), 0, t.shape))
        return Quantized(codes, s, z, 0, 15, w)

    deq = lambda q: _numpy(q.native.dequantize())  # noqa: E731
    rank2 = lambda rank: st.just(QuantScheme(8, True, PerChannel(0)))  # noqa: E731
    groups = lambda rank: st.sampled_from([QuantScheme(4, False, PerGroup(g)) for g in (8, 16, 32)])  # noqa: E731
    dtypes = (np.float16, np.float32, _bf16())
    # a float shift does not promise an exact zero; no NaN/Inf check is documented
    return [Quantizer("quanto-qint8", q8, deq, Promises(rejects_nonfinite=False), schemes=rank2, dtypes=dtypes,
                      min_side=2, ranks=(2, 2)),
            Quantizer("quanto-qint4", q4, deq, Promises(exact_zero=False, rejects_nonfinite=False), schemes=groups,
                      dtypes=dtypes, min_side=1, ranks=(2, 2))]


def hqq_quantizer() -> Quantizer:
    """HQQ's ``Quantizer.quantize`` (defaults: ``optimize=True``, bit packing) and ``Quantizer.dequantize``,
    on the CPU, dequantized in float32: codes ``[0, 2^b-1]``, float zero, ``x = (q - zero) * scale``."""
    import torch
    from hqq.core.quantize import Quantizer as HQQ

    def quantize(x, scheme):
        t = _torch(x)
        g = scheme.granularity.size
        w_q, meta = HQQ.quantize(t, nbits=scheme.bits, group_size=g, axis=1, device="cpu",
                                 compute_dtype=torch.float32)
        meta["compute_dtype"] = torch.float32
        codes = HQQ.unpack[meta["packing"]](w_q, dtype=torch.float32)[: t.numel() // g].reshape(x.shape)
        s = _numpy(meta["scale"].expand(t.numel() // g, g)).reshape(x.shape)
        z = _numpy(meta["zero"].expand(t.numel() // g, g)).reshape(x.shape)
        return Quantized(_numpy(codes), s, z, 0, (1 << scheme.bits) - 1, (w_q, meta))

    def dequantize(q):
        return _numpy(HQQ.dequantize(*q.native))

    groups = lambda rank: st.builds(lambda b, g: QuantScheme(b, False, PerGroup(g)),  # noqa: E731
                                    st.sampled_from([1, 2, 3, 4, 8]), st.sampled_from([8, 16, 32, 64]))
    # the optimizer minimises an lp-norm of the error, not each element's: no half-step bound, no exact zero
    promises = Promises(error_bound=False, exact_zero=False, rejects_nonfinite=False)
    # 8 rows: HQQ's bit packing stacks 8 / bits groups per byte and fails (or drops rows) when the number of groups
    # is not a multiple of that; a weight matrix always has enough
    return Quantizer("hqq", quantize, dequantize, promises, schemes=groups,
                     dtypes=(np.float16, np.float32, _bf16()), min_side=8, max_side=8, ranks=(2, 2))


# --- registry ---------------------------------------------------------------------------------------------------


LIBRARIES = {
    **adapters.LIBRARIES,
    "torchao": ("torchao", lambda: [torchao_quantizer()]),
    "quanto": ("optimum.quanto", quanto_quantizers),
    "hqq": ("hqq", lambda: [hqq_quantizer()]),
}


def main(argv=None) -> int:
    """``python -m qcore.testing`` with the torch-based peers among the libraries."""
    return _cli.main(argv, libraries=LIBRARIES, prog="python -m qtorch.conformance")


if __name__ == "__main__":
    sys.exit(main())
