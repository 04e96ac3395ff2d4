"""Error metrics between an array and its quantized approximation, computed in float64.

>>> import numpy as np
>>> x = np.array([1.0, -2.0, 3.0]); x_hat = np.array([1.0, -2.0, 2.5])
>>> float(mse(x, x_hat)), float(max_abs_error(x, x_hat))
(0.08333333333333333, 0.5)
>>> round(float(sqnr_db(x, x_hat)), 2)
17.48
"""

from __future__ import annotations

import numpy as np

__all__ = ["mse", "max_abs_error", "mean_abs_error", "relative_error_pct", "sqnr_db", "quantization_error"]


def _pair(x, x_hat) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x)
    b = np.asarray(x_hat)
    for name, arr in (("x", a), ("x_hat", b)):
        if arr.dtype.kind not in "fiu" and str(arr.dtype) != "bfloat16":
            raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"x has shape {a.shape} but x_hat has shape {b.shape}; they must match")
    return a.astype(np.float64), b.astype(np.float64)


def mse(x, x_hat) -> float:
    """Mean squared error; 0.0 for empty arrays."""
    a, b = _pair(x, x_hat)
    return float(np.mean((a - b) ** 2)) if a.size else 0.0


def max_abs_error(x, x_hat) -> float:
    """Largest ``|x - x_hat|``; 0.0 for empty arrays."""
    a, b = _pair(x, x_hat)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def mean_abs_error(x, x_hat) -> float:
    """Mean ``|x - x_hat|``; 0.0 for empty arrays."""
    a, b = _pair(x, x_hat)
    return float(np.mean(np.abs(a - b))) if a.size else 0.0


def relative_error_pct(x, x_hat) -> float:
    """``100 * ||x - x_hat|| / ||x||`` (Frobenius norms); 0.0 if both are zero, inf if only ``x`` is."""
    a, b = _pair(x, x_hat)
    num, den = np.linalg.norm((a - b).ravel()), np.linalg.norm(a.ravel())
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(100.0 * num / den)


def sqnr_db(x, x_hat) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB; inf when exact."""
    a, b = _pair(x, x_hat)
    noise = float(np.sum((a - b) ** 2))
    signal = float(np.sum(a ** 2))
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def quantization_error(x, x_hat) -> dict:
    """All error figures at once: ``max_abs_error``, ``mean_abs_error``, ``relative_error_pct``, ``snr_db``
    (the keys users of earlier libraries know), plus ``mse``."""
    return {
        "max_abs_error": max_abs_error(x, x_hat),
        "mean_abs_error": mean_abs_error(x, x_hat),
        "relative_error_pct": relative_error_pct(x, x_hat),
        "snr_db": sqnr_db(x, x_hat),
        "mse": mse(x, x_hat),
    }
