"""What a quantizer promises, and the small interface the checks drive it through.

A quantizer is a pair of callables: ``quantize(x, scheme) -> Quantized`` and ``dequantize(q) -> array``. The checks
only look at :class:`Quantized`'s affine reading ``x ≈ (codes - zero) * scale`` (scale and zero broadcastable to the
codes' shape), so a library with float zero points (HQQ) or signed scales (GGUF Q4_0) fits as well as qcore.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

# name -> what it means; the order is the order of the conformance table
PROMISES = {
    "error_bound": "|x - dequantize(quantize(x))| <= scale/2 (+ float32 rounding); one step for an asymmetric group "
                   "wider than float32 max",
    "requantize": "re-quantizing the dequantized values with the same scale and zero gives the same codes",
    "exact_zero": "0.0 in the input dequantizes to exactly 0.0",
    "zero_group": "an all-zero group gets a finite scale and dequantizes to exact zeros",
    "codes_in_range": "every code lies in [qmin, qmax]",
    "finite_output": "finite input gives finite scales and finite dequantized values",
    "views": "a non-contiguous view quantizes exactly like its contiguous copy",
    "rejects_nonfinite": "NaN or Inf input is a ValueError, nothing returned",
    "deterministic": "the same input gives the same codes and parameters, bit for bit",
    "packing": "unpack(pack(codes)) == codes for every width and length",
    "bit_order": "pack writes the LSB-first bit stream of docs/packing.md",
}


class PromiseBroken(AssertionError):
    """A check found an input on which the quantizer does not keep a promise."""


@dataclass(frozen=True)
class Promises:
    """Which promises a quantizer makes: a library is only checked for what it promises.

    >>> Promises.all().without("rejects_nonfinite").made("rejects_nonfinite")
    False
    """

    error_bound: bool = True
    requantize: bool = True
    exact_zero: bool = True
    zero_group: bool = True
    codes_in_range: bool = True
    finite_output: bool = True
    views: bool = True
    rejects_nonfinite: bool = True
    deterministic: bool = True
    packing: bool = False
    bit_order: bool = False

    @classmethod
    def all(cls) -> "Promises":
        return cls(**{name: True for name in PROMISES})

    def without(self, *names: str) -> "Promises":
        unknown = [n for n in names if n not in PROMISES]
        if unknown:
            raise ValueError(f"unknown promise(s) {unknown}; known: {list(PROMISES)}")
        return dataclasses.replace(self, **{n: False for n in names})

    def made(self, name: str) -> bool:
        if name not in PROMISES:
            raise ValueError(f"unknown promise {name!r}; known: {list(PROMISES)}")
        return bool(getattr(self, name))


@dataclass(frozen=True)
class Quantized:
    """One quantizer's output in the affine reading ``x ≈ (codes - zero) * scale``.

    ``scale`` and ``zero`` broadcast to ``codes.shape`` (use :func:`qcore.testing.strategies.expand` for per-group
    parameters); ``zero`` may be a float; ``native`` is whatever the quantizer's own dequantize needs.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: Any
    qmin: int
    qmax: int
    native: Any = None


@dataclass(frozen=True)
class Quantizer:
    """A quantize/dequantize pair, what it promises and the inputs it takes.

    ``schemes(rank)`` returns a Hypothesis strategy of the :class:`qcore.QuantScheme` values it supports for arrays
    of that rank (the checks draw
    arrays that fit the drawn scheme); ``dtypes`` the input dtypes; ``magnitudes`` the group magnitudes it is
    meant for (default: subnormals to the float32 maximum); ``min_side`` and ``ranks``
    (min, max) the array shapes. ``requantize(y, q) -> codes`` re-quantizes with
    the parameters of ``q``; by default ``clip(rint(y / scale + zero), qmin, qmax)``.
    """

    name: str
    quantize: Callable[[np.ndarray, Any], Quantized]
    dequantize: Callable[[Quantized], np.ndarray]
    promises: Promises = Promises()
    schemes: Any = None
    dtypes: tuple = ()
    requantize: Optional[Callable[[np.ndarray, Quantized], np.ndarray]] = None
    max_side: int = 9
    magnitudes: tuple = ()
    min_side: int = 0
    ranks: tuple = (1, 3)
