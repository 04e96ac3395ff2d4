"""The ``dequant_mm`` path shared by the layouts that hold the canonical codes (``canonical``, ``int8pack``).

:func:`qtorch.dequant_mm.dequant_linear` dequantizes blocks of output rows into the activation dtype and multiplies
each with ``F.linear`` (oneDNN/AMX in bfloat16 where the CPU has it). It is a second candidate for CPU calls of
several rows; the layer times it against the layout's own path (:mod:`qtorch.autotune`) and keeps the faster.
One row stays on the layout's path: a matrix-vector product gains nothing from a matmul-shaped kernel.

>>> import torch
>>> eligible("cpu", torch.bfloat16, 128), eligible("cpu", torch.bfloat16, 1), eligible("cuda", torch.float16, 8)
(True, False, False)
"""

from __future__ import annotations

import torch

from ..dequant_mm import WeightSpec as MMSpec
from ..dequant_mm import dequant_linear

__all__ = ["NAME", "MIN_ROWS", "eligible", "linear"]

NAME = "dequant_mm"
#: fewest rows of a call for which the path is a candidate
MIN_ROWS = 2
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def eligible(device_type: str, dtype: torch.dtype, rows: int) -> bool:
    """Whether a call of ``rows`` rows in ``dtype`` on ``device_type`` may take ``dequant_mm``."""
    return device_type == "cpu" and dtype in _DTYPES and rows >= MIN_ROWS


def mm_spec(spec) -> MMSpec:
    """The :class:`qtorch.dequant_mm.WeightSpec` of a layouts ``WeightSpec`` (same canonical tensors)."""
    return MMSpec.from_scheme(spec.scheme, spec.out_features, spec.in_features)


def linear(weight, x2: torch.Tensor) -> torch.Tensor:
    """``x2 @ W.T`` by :func:`~qtorch.dequant_mm.dequant_linear` from ``weight``'s canonical buffers."""
    b = weight.buffers
    return dequant_linear(x2, b["qweight"], b["scale"], b["zero_point"], mm_spec(weight.spec))
