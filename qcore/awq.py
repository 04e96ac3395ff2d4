"""Activation-aware per-input-channel scales (AWQ, Lin et al., 2023), chosen from a layer's input Hessian.

Layers that read the same input ``x [.., K]`` (q, k and v; gate and up) can be given one scale ``s [K] > 0``:
``x @ W.T == (x / s) @ (W * s).T``, and ``1 / s`` folds into whatever produced ``x`` (a norm's weight). Columns
of ``W`` that meet large inputs are scaled up before rounding, so their relative rounding error shrinks where it
costs the most. ``s = rms(x) ** alpha`` (``rms(x)_k = sqrt(H_kk / 2)`` for ``H = 2 X^T X / n``), and ``alpha`` is
the one of ``0, 1/grid, ..., 1`` with the least output error ``sum_W tr((W - W_q) H (W - W_q)^T)``, ``W_q`` the
rounding of ``W * s`` divided by ``s`` again. ``alpha = 0`` (``s = 1``, plain rounding) is a candidate, so the
choice never has a larger error of that measure than rounding without scales.

>>> import numpy as np; from qcore import QuantScheme, PerGroup
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((512, 64)) * np.where(np.arange(64) < 4, 20.0, 1.0)   # four large input channels
>>> w = rng.standard_normal((32, 64)).astype(np.float32)
>>> s, alpha = awq_scales([w], 2 * x.T @ x / len(x), QuantScheme(4, False, PerGroup(32, axis=1)))
>>> s.shape, s.dtype, bool(alpha > 0), bool(s[:4].min() > s[4:].max())
((64,), dtype('float32'), True, True)
"""

from __future__ import annotations

import numbers

import numpy as np

from ._parallel import blas_threads
from .quantize import check_float_array, dequantize, quantize
from .scheme import QuantScheme

__all__ = ["awq_scales", "output_error"]


def output_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """``tr((w - wq) h (w - wq)^T)``: the summed squared output error over inputs whose ``2 X^T X / n`` is ``h``
    (twice the mean per input row)."""
    e = np.asarray(w, np.float64) - np.asarray(wq, np.float64)
    return float(np.einsum("nk,nk->", e @ h, e))


def awq_scales(weights, h, scheme: QuantScheme, *, grid: int = 10, params: str = "minmax", rows: int = 128
               ) -> tuple[np.ndarray, float]:
    """``(s [K] float32, alpha)`` for the weights ``[N_i, K]`` that share inputs with Hessian ``h [K, K]``,
    each rounded with ``scheme`` and ``params`` (see the module's docstring). ``s`` is all ones when
    ``alpha == 0`` wins. Scales are normalised to a geometric mean of 1 between their extremes, and inputs that
    are (almost) always zero get the smallest scale rather than 0. The error is scored (in float32) on ``rows``
    evenly spaced rows of each weight: rows round independently, and ``alpha`` is one number for all of them."""
    h = np.asarray(h)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.dtype.kind != "f" or not np.all(np.isfinite(h)):
        raise ValueError(f"h must be a finite float [K, K] matrix, got {h.dtype} {h.shape}")
    k = h.shape[0]
    ws = [check_float_array(w, "weights[i]") for w in weights]
    if not ws:
        raise ValueError("weights is empty: give the layers that share the inputs")
    for i, w in enumerate(ws):
        if w.ndim != 2 or w.shape[1] != k:
            raise ValueError(f"weights[{i}] must be [N, {k}] (K of h), got {w.shape}")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"weights[{i}] contains NaN or Inf")
    if not isinstance(scheme, QuantScheme):
        raise TypeError(f"scheme must be a qcore.QuantScheme, got {type(scheme).__name__}")
    for name, v in (("grid", grid), ("rows", rows)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    ws = [w[np.unique(np.linspace(0, len(w) - 1, min(len(w), rows)).round().astype(np.int64))] if len(w) else w
          for w in ws]
    h = h.astype(np.float64)
    rms = np.sqrt(np.maximum(np.diag(h), 0.0) / 2)
    if k == 0 or not rms.max() > 0:
        return np.ones(k, np.float32), 0.0
    rms = np.maximum(rms, rms.max() * 1e-4)  # never a zero scale: 1/s folds into the producer of x
    h32 = h.astype(np.float32)

    def error(s):
        total = 0.0
        for w in ws:
            e = w - dequantize(quantize((w * s).astype(np.float32), scheme, params=params)).astype(np.float32) / s
            total += float(np.einsum("nk,nk->", e @ h32, e, dtype=np.float64))
        return total

    best_alpha, best_s = 0.0, np.ones(k, np.float32)
    with blas_threads():
        best = error(best_s)
        for step in range(1, grid + 1):
            alpha = step / grid
            s = rms ** alpha
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
            e = error(s)
            if e < best:
                best, best_alpha, best_s = e, alpha, s
    return best_s, best_alpha
