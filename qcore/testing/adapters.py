"""Adapters: qcore and its peers as :class:`Quantizer` values, each declaring what it promises.

Every adapter is a function returning a :class:`Quantizer` (or a list), importing its library only when called;
:func:`available` lists the ones whose library is installed. qcore and gguf are here; the torch-based peers
(torchao, optimum-quanto, HQQ) are in :mod:`qtorch.conformance`, since qcore never imports torch. The peers' adapters drive the libraries' own public
quantize/dequantize functions with their documented defaults, and cast nothing the library would not.
"""

from __future__ import annotations

import importlib.util

import numpy as np
from hypothesis import strategies as st

from qcore.scheme import PerGroup, QuantScheme

from .checks import Packer
from .promises import Promises, Quantized, Quantizer
from .strategies import expand, schemes

# magnitudes a format with float16 scales can hold: HARD_MAGNITUDES would only report the float16 range
ORDINARY_MAGNITUDES = (1e-3, 1.0, 1e4)


# --- qcore ------------------------------------------------------------------------------------------------------

def qcore_quantizer() -> Quantizer:
    """qcore.quantize / qcore.dequantize: every promise of docs/numerics.md, on every scheme and dtype."""
    import qcore

    def quantize(x, scheme):
        qa = qcore.quantize(x, scheme)
        zero = 0 if qa.zero_point is None else expand(qa.zero_point, x.shape, scheme)
        return Quantized(qa.codes, expand(qa.scale, x.shape, scheme), zero, scheme.qmin, scheme.qmax, qa)

    return Quantizer("qcore", quantize, lambda q: qcore.dequantize(q.native), Promises.all(),
                     schemes=lambda rank: schemes(rank=rank))


def qcore_packer() -> Packer:
    import qcore

    return Packer(qcore.pack, qcore.unpack)


# --- gguf-py ----------------------------------------------------------------------------------------------------

def _gguf(kind: str) -> Quantizer:
    """gguf-py's ``quants.quantize`` / ``dequantize`` for Q8_0 (int8 codes, ``x = q * d``) or Q4_0 (codes 0..15,
    ``x = (q - 8) * d`` with a signed ``d``): blocks of 32 along the last axis, float16 block scales, float32 in."""
    import gguf
    from gguf import quants

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    scheme = QuantScheme(8, True, PerGroup(32)) if kind == "Q8_0" else QuantScheme(4, False, PerGroup(32))

    def quantize(x, _scheme):
        raw = quants.quantize(x, qtype)
        blocks = raw.reshape(-1, 34 if kind == "Q8_0" else 18)
        d = np.ascontiguousarray(blocks[:, :2]).view(np.float16).astype(np.float32)
        qs = np.ascontiguousarray(blocks[:, 2:])
        if kind == "Q8_0":
            codes, zero, lo, hi = qs.view(np.int8), 0, -128, 127
        else:  # byte j holds code j (low nibble) and code j + 16 (high nibble) of its block
            codes, zero, lo, hi = np.concatenate([qs & 0x0F, qs >> 4], axis=1), 8, 0, 15
        step = np.repeat(d, 32, axis=1)
        return Quantized(codes.reshape(x.shape), step.reshape(x.shape), zero, lo, hi, raw)

    def dequantize(q):
        return quants.dequantize(q.native, qtype).reshape(q.codes.shape)

    # the format's own claims: round to nearest within the block, deterministic, exact zeros; no NaN/Inf check
    promises = Promises(rejects_nonfinite=False)
    return Quantizer(f"gguf-{kind.lower()}", quantize, dequantize, promises, schemes=lambda rank: st.just(scheme),
                     dtypes=(np.float32,), magnitudes=ORDINARY_MAGNITUDES, min_side=1)


def gguf_quantizers() -> list:
    return [_gguf("Q8_0"), _gguf("Q4_0")]


LIBRARIES = {
    "qcore": ("qcore", lambda: [qcore_quantizer()]),
    "gguf": ("gguf", gguf_quantizers),
}
#: peers built on torch: their adapters live in qtorch (qcore never imports torch); ``python -m qtorch.conformance``
TORCH_PEERS = ("torchao", "quanto", "hqq")


def installed(library: str, libraries=None) -> bool:
    module = (LIBRARIES if libraries is None else libraries)[library][0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def available(names=None) -> list:
    """The library names of ``names`` (default: all known) whose package is installed."""
    names = list(LIBRARIES) if names is None else names
    unknown = [n for n in names if n not in LIBRARIES]
    if unknown:
        raise ValueError(f"unknown library {unknown}; known: {list(LIBRARIES)}")
    return [n for n in names if installed(n)]
