"""The function names users of earlier quantization projects know, on NumPy arrays.

For torch tensors and torch dtypes use the functions of the same names in :mod:`qtorch` (``from qtorch import
linear_quantize``); qcore never imports torch.

>>> import numpy as np
>>> codes, scale = quantize_symmetric(np.array([0.5, -1.0], np.float32))
>>> codes.tolist(), round(float(scale), 6)
([64, -127], 0.007874)
>>> s, z, q = linear_quantize(np.array([-1.0, 0.0, 2.0], np.float32))
>>> linear_dequantize(s, z, q).tolist()
[-1.0, 0.0, 2.0]
"""

from __future__ import annotations

import numpy as np

from .metrics import quantization_error
from .quantize import check_float_array, dequantize, quantize
from .scheme import PerChannel, PerTensor, QuantScheme

__all__ = ["quantize_symmetric", "quantize_weight_per_channel", "linear_quantize", "channel_linear_quantize",
           "linear_dequantize", "calculate_quantization_error"]


def _from_torch(obj) -> bool:
    return type(obj).__module__.partition(".")[0] == "torch"


def _float_array(x, name: str, fn: str) -> np.ndarray:
    if _from_torch(x):  # a pointer to the right function beats "use np.asarray" (which fails for bfloat16)
        raise TypeError(f"{name} is a torch {type(x).__name__}; qcore works on NumPy arrays. For torch tensors "
                        f"use `from qtorch import {fn}` (same name and arguments, torch results)")
    return check_float_array(x, name)


def quantize_symmetric(x):
    """Per-tensor symmetric int8: ``(codes int8 in -127..127, scale float32 scalar)``."""
    qa = quantize(_float_array(x, "x", "quantize_symmetric"), QuantScheme(8, True, PerTensor()))
    return qa.codes, qa.scale


def quantize_weight_per_channel(w):
    """Per-output-channel (axis 0) symmetric int8: ``(codes, scales of shape (w.shape[0],))``."""
    qa = quantize(_float_array(w, "w", "quantize_weight_per_channel"), QuantScheme(8, True, PerChannel(0)))
    return qa.codes, qa.scale


def _asymmetric(x, granularity, dtype, fn):
    try:
        dt = None if _from_torch(dtype) else np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (np.dtype(np.int8), np.dtype(np.uint8)):
        hint = f" (for torch dtypes use `from qtorch import {fn}`)" if _from_torch(dtype) else ""
        raise TypeError(f"dtype must be np.int8 or np.uint8, got {dtype!r}{hint}")
    x = _float_array(x, "x", fn)
    qa = quantize(x, QuantScheme(8, False, granularity))
    scale, zp, codes = qa.scale, qa.zero_point, qa.codes
    if isinstance(granularity, PerChannel):  # shaped to broadcast along ``dim``, as the prior art returns them
        shape = [1] * x.ndim
        shape[granularity.axis % x.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    if dt == np.uint8:
        return scale, zp, codes
    # int8: the same grid shifted by -128, so (codes - zero_point) * scale is unchanged.
    return scale, (zp.astype(np.int16) - 128).astype(np.int8), (codes.astype(np.int16) - 128).astype(np.int8)


def linear_quantize(x, dtype=np.int8):
    """Per-tensor asymmetric 8-bit: ``(scale, zero_point, codes)``; :func:`linear_dequantize` inverts it.
    ``dtype=np.int8`` gives codes in -128..127, ``np.uint8`` in 0..255."""
    return _asymmetric(x, PerTensor(), dtype, "linear_quantize")


def channel_linear_quantize(x, dim=0, dtype=np.int8):
    """Like :func:`linear_quantize` with one scale and zero point per index of ``dim``, shaped to broadcast
    against ``x`` (``(n, 1)`` for ``dim=0`` of a 2-D array, ``(1, n)`` for ``dim=1``)."""
    return _asymmetric(x, PerChannel(dim), dtype, "channel_linear_quantize")


def linear_dequantize(scale, zero_point, quantized):
    """``(quantized - zero_point) * scale`` in float32, the arguments in the order :func:`linear_quantize` and
    :func:`channel_linear_quantize` return them: ``linear_dequantize(*linear_quantize(x)) ≈ x``. Equal to
    ``qcore.dequantize`` of the same codes; a 1-D ``scale`` of one value per row broadcasts along axis 0."""
    for name, v in (("scale", scale), ("zero_point", zero_point), ("quantized", quantized)):
        if _from_torch(v):
            raise TypeError(f"{name} is a torch {type(v).__name__}; for torch tensors use "
                            "`from qtorch import linear_dequantize`")
    return dequantize(quantized, scale, zero_point)


def calculate_quantization_error(x, codes, scale, zero_point=None) -> dict:
    """Error figures of ``dequantize(codes, scale[, zero_point])`` against ``x`` (see
    :func:`qcore.metrics.quantization_error`)."""
    return quantization_error(x, dequantize(codes, scale, zero_point))
