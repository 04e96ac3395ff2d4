"""The function names users of earlier quantization projects know, on NumPy arrays.

>>> import numpy as np
>>> codes, scale = quantize_symmetric(np.array([0.5, -1.0], np.float32))
>>> codes.tolist(), round(float(scale), 6)
([64, -127], 0.007874)
"""

from __future__ import annotations

import numpy as np

from .metrics import quantization_error
from .quantize import check_float_array, dequantize, quantize
from .scheme import PerChannel, PerTensor, QuantScheme

__all__ = ["quantize_symmetric", "quantize_weight_per_channel", "linear_quantize", "channel_linear_quantize",
           "calculate_quantization_error"]


def quantize_symmetric(x):
    """Per-tensor symmetric int8: ``(codes int8 in -127..127, scale float32 scalar)``."""
    qa = quantize(check_float_array(x), QuantScheme(8, True, PerTensor()))
    return qa.codes, qa.scale


def quantize_weight_per_channel(w):
    """Per-output-channel (axis 0) symmetric int8: ``(codes, scales of shape (w.shape[0],))``."""
    qa = quantize(check_float_array(w, "w"), QuantScheme(8, True, PerChannel(0)))
    return qa.codes, qa.scale


def _asymmetric(x, granularity, dtype):
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.int8), np.dtype(np.uint8)):
        raise TypeError(f"dtype must be np.int8 or np.uint8, got {dt}")
    x = check_float_array(x)
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
    """Per-tensor asymmetric 8-bit: ``(scale, zero_point, codes)``; ``dequantize(codes, scale, zero_point)``
    inverts it. ``dtype=np.int8`` gives codes in -128..127, ``np.uint8`` in 0..255."""
    return _asymmetric(x, PerTensor(), dtype)


def channel_linear_quantize(x, dim=0, dtype=np.int8):
    """Like :func:`linear_quantize` with one scale and zero point per index of ``dim``, shaped to broadcast
    against ``x`` (``(n, 1)`` for ``dim=0`` of a 2-D array, ``(1, n)`` for ``dim=1``)."""
    return _asymmetric(x, PerChannel(dim), dtype)


def calculate_quantization_error(x, codes, scale, zero_point=None) -> dict:
    """Error figures of ``dequantize(codes, scale[, zero_point])`` against ``x`` (see
    :func:`qcore.metrics.quantization_error`)."""
    return quantization_error(x, dequantize(codes, scale, zero_point))
