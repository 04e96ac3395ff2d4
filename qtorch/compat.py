"""The prior art's function names on torch tensors: qcore's :mod:`qcore.compat` with torch in and torch out.

Torch tensors (bfloat16 included) and torch dtypes (``dtype=torch.int8``) are accepted wherever the prior art took
them; the results are torch tensors on the input's device. NumPy input gives what :mod:`qcore.compat` gives. The
numbers are qcore's: round half to even, symmetric codes in -127..127, asymmetric grids that hold 0.0 exactly.

>>> import torch
>>> from qtorch import linear_quantize, linear_dequantize
>>> x = torch.tensor([[-1.0, 0.0, 2.0]])
>>> scale, zero_point, q = linear_quantize(x, dtype=torch.int8)
>>> q.dtype, linear_dequantize(scale, zero_point, q).tolist()
(torch.int8, [[-1.0, 0.0, 2.0]])
"""

from __future__ import annotations

import numpy as np
import torch

from qcore import compat as _np_compat
from qcore import dequantize as _np_dequantize

from ._torch_numpy import from_numpy, numpy_dtype, to_numpy

__all__ = ["quantize_symmetric", "quantize_weight_per_channel", "linear_quantize", "channel_linear_quantize",
           "linear_dequantize", "dequantize", "calculate_quantization_error"]


def _np(v):
    return to_numpy(v) if isinstance(v, torch.Tensor) else v


def _np_dtype(dtype):
    if not isinstance(dtype, torch.dtype):
        return dtype  # NumPy dtypes: qcore checks them
    if dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"dtype must be torch.int8 or torch.uint8 (or np.int8 / np.uint8), got {dtype}")
    return numpy_dtype(dtype)


def _back(results, like):
    """NumPy results as tensors on ``like``'s device when ``like`` is a tensor, else as they are."""
    if not isinstance(like, torch.Tensor):
        return results
    return tuple(from_numpy(np.asarray(r), device=like.device) for r in results)


def quantize_symmetric(x):
    """Per-tensor symmetric int8: ``(codes int8 in -127..127, scale float32 0-d)``; ``codes * scale ≈ x``."""
    return _back(_np_compat.quantize_symmetric(_np(x)), x)


def quantize_weight_per_channel(w):
    """Per-output-channel (dim 0) symmetric int8: ``(codes, scales of shape (w.shape[0],))``."""
    return _back(_np_compat.quantize_weight_per_channel(_np(w)), w)


def linear_quantize(x, dtype=torch.int8):
    """Per-tensor asymmetric 8-bit: ``(scale, zero_point, codes)``; ``dtype`` torch.int8 (codes -128..127) or
    torch.uint8 (0..255), NumPy dtypes too. :func:`linear_dequantize` inverts it."""
    return _back(_np_compat.linear_quantize(_np(x), _np_dtype(dtype)), x)


def channel_linear_quantize(x, dim=0, dtype=torch.int8):
    """Like :func:`linear_quantize` with one scale and zero point per index of ``dim``, shaped to broadcast
    against ``x`` (``(n, 1)`` for ``dim=0`` of a 2-D tensor)."""
    return _back(_np_compat.channel_linear_quantize(_np(x), dim, _np_dtype(dtype)), x)


def _first_tensor(*values):
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def linear_dequantize(scale, zero_point, quantized):
    """``(quantized - zero_point) * scale`` as float32, arguments in the order :func:`linear_quantize` returns."""
    out = _np_compat.linear_dequantize(_np(scale), _np(zero_point), _np(quantized))
    return _back((out,), _first_tensor(quantized, scale, zero_point))[0]


def dequantize(codes, scale, zero_point=None):
    """``(codes - zero_point) * scale`` as float32 (a 1-D per-channel ``scale`` broadcasts along dim 0)."""
    out = _np_dequantize(_np(codes), _np(scale), _np(zero_point))
    return _back((out,), _first_tensor(codes, scale, zero_point))[0]


def calculate_quantization_error(x, codes, scale, zero_point=None) -> dict:
    """``max_abs_error``, ``mean_abs_error``, ``relative_error_pct``, ``snr_db`` (and ``mse``) of
    ``dequantize(codes, scale[, zero_point])`` against ``x``, as Python floats."""
    return _np_compat.calculate_quantization_error(_np(x), _np(codes), _np(scale), _np(zero_point))
