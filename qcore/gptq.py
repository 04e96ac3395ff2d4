"""GPTQ: quantize a linear layer's weight column by column, compensating each column's rounding error with the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

``W`` is ``[N, K]`` (``y = x @ W.T``), ``H = 2 X^T X`` is ``[K, K]`` over the calibration inputs ``X [n, K]``
(:class:`Hessian` accumulates it in batches). The result is an ordinary :class:`qcore.QuantizedArray` of any
scheme whose parameters run along ``K``: per tensor, per output channel (``PerChannel(0)``) or per group along
``K`` (``PerGroup(size, axis=1)``, the last group shorter where ``size`` does not divide ``K``); a group's scale and
zero point are computed, by any registered params method with an integer zero point, from the group's columns as
they stand when its first column is reached (after the compensation from the columns before it), as the
reference implementation does.

>>> import numpy as np; from qcore import QuantScheme, PerGroup, quantize, dequantize
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64))    # correlated inputs
>>> w = rng.standard_normal((32, 64)).astype(np.float32)
>>> s = QuantScheme(4, False, PerGroup(32, axis=1))
>>> out_err = lambda qa: float(np.linalg.norm(x @ (w - dequantize(qa)).T))
>>> bool(out_err(gptq(w, Hessian.of(x), s)) < out_err(quantize(w, s)))
True
"""

from __future__ import annotations

import numbers

import numpy as np
from numba import njit

from ._parallel import blas_threads, run_split
from .params import params_method
from .quantize import (QuantizedArray, _raise_nonfinite, check_float_array, compute_qparams, dequantize,  # noqa: F401
                       quantize)
from .scheme import PerChannel, PerGroup, PerTensor, QuantScheme, _normalize_axis
from ._jitcache import cached as _cached

__all__ = ["Hessian", "gptq", "refit_scales"]


class Hessian:
    """``H = 2 X^T X / n`` of a layer's inputs, accumulated batch by batch in float64 (the mean over samples,
    as the reference keeps it, so that dampening is relative and the count of batches does not matter).

    >>> h = Hessian(2); h.add(np.array([[1.0, 0.0]])); h.add(np.array([[0.0, 1.0]])); h.h.tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """

    def __init__(self, columns: int):
        if not isinstance(columns, numbers.Integral) or columns < 1:
            raise ValueError(f"columns must be a positive int, got {columns!r}")
        self.h = np.zeros((int(columns), int(columns)), np.float64)
        self.count = 0

    def add(self, x) -> None:
        """Add the rows of ``x`` (``[..., K]``, any float dtype; leading axes are samples)."""
        x = np.asarray(x)
        if x.dtype.kind != "f" or x.ndim < 1 or x.shape[-1] != self.h.shape[0]:
            raise ValueError(f"inputs must be a float array of shape [..., {self.h.shape[0]}], got "
                             f"{x.dtype} {x.shape}")
        x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
        if not np.all(np.isfinite(x2)):
            raise ValueError("inputs contain NaN or Inf; a Hessian of them is meaningless")
        self.add_gram(x2.T @ x2, x2.shape[0])

    def add_gram(self, xtx, n: int) -> None:
        """Add ``xtx = X^T X`` of ``n`` rows computed elsewhere (``[K, K]``), e.g. once for several layers that
        see the same inputs, or by another framework's matmul. ``add(x)`` equals ``add_gram(x.T @ x, len(x))``.

        >>> a, b = Hessian(2), Hessian(2); x = np.array([[1.0, 2.0], [3.0, 4.0]])
        >>> a.add(x); b.add_gram(x.T @ x, 2); bool(np.array_equal(a.h, b.h))
        True
        """
        k = self.h.shape[0]
        xtx = np.asarray(xtx)
        if xtx.dtype.kind != "f" or xtx.shape != (k, k):
            raise ValueError(f"xtx must be a float [{k}, {k}] matrix, got {xtx.dtype} {xtx.shape}")
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be an int >= 0 (the rows behind xtx), got {n!r}")
        if not np.all(np.isfinite(xtx)):
            raise ValueError("inputs contain NaN or Inf; a Hessian of them is meaningless")
        if n == 0:
            return
        total = self.count + int(n)
        self.h *= self.count / total
        self.h += (2.0 / total) * xtx.astype(np.float64, copy=False)
        self.count = total

    @classmethod
    def of(cls, x) -> np.ndarray:
        """``2 X^T X / n`` of the rows of ``x`` in one call."""
        x = np.asarray(x)
        acc = cls(x.shape[-1] if x.ndim else 0)
        acc.add(x)
        return acc.h


def _check_scheme(scheme, n: int, k: int):
    """(kind, group size) for a scheme GPTQ can serve on a weight ``[n, k]``; ValueError otherwise."""
    if not isinstance(scheme, QuantScheme):
        raise TypeError(f"scheme must be a qcore.QuantScheme, got {type(scheme).__name__}")
    scheme.validate_shape((n, k))
    g = scheme.granularity
    if isinstance(g, PerTensor):
        return "tensor", k
    if isinstance(g, PerChannel) and _normalize_axis(g.axis, 2, "PerChannel") == 0:
        return "channel", k
    if isinstance(g, PerGroup) and _normalize_axis(g.axis, 2, "PerGroup") == 1:
        return "group", g.size  # a group size that does not divide K leaves a shorter last group
    raise ValueError(f"GPTQ quantizes along the input axis K of a weight [N, K]: the scheme needs PerTensor(), "
                     f"PerChannel(0) or PerGroup(size, axis=1), got {scheme}")


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1 = U^T U``, in float64."""
    h = h.copy()
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    try:
        linv = np.linalg.inv(np.linalg.cholesky(h))  # H^-1 = L^-T L^-1
        return np.linalg.cholesky(linv.T @ linv).T
    except np.linalg.LinAlgError:
        raise ValueError(f"the Hessian is not positive definite after dampening {damp:g} x mean(diag); raise damp "
                         "or use more calibration inputs") from None


@_cached
@njit(cache=True, nogil=True)
def _segment(w1, err1, u1, a, b, gidx, scale, zp, qmin, qmax, q1, r0, r1):
    """Columns ``a..b`` of a block, rows ``r0..r1``: round each column on its group's grid (qcore.quantize's
    arithmetic), and spread its error over the block's later columns. Rows are independent here."""
    m = w1.shape[1]
    for r in range(r0, r1):
        wr = w1[r]
        for i in range(a, b):
            j = gidx[i]
            s = scale[r, j]
            z = np.float32(zp[r, j])
            v = wr[i]
            q = min(max(np.rint(v / s) + z, qmin), qmax)
            q1[r, i] = q
            e = (v - (q - z) * s) / u1[i, i]
            err1[r, i] = e
            for t in range(i + 1, m):
                wr[t] -= e * u1[i, t]
    return 0


def _run_segment(w1, err1, u1, a, b, gidx, scale, zp, qmin, qmax, q1) -> None:
    if b > a:
        run_split(_segment, (w1, err1, u1, a, b, gidx, scale, zp, qmin, qmax, q1), w1.shape[0],
                  max(1, (1 << 15) // max(1, (b - a) * w1.shape[1])))


def gptq(w, h, scheme: QuantScheme, *, damp: float = 0.01, act_order: bool = False, block_size: int = 128,
         params: str = "minmax", weighted: bool = False, refit: bool = False) -> QuantizedArray:
    """Quantize ``w [N, K]`` with GPTQ given ``h = 2 X^T X`` (``[K, K]``, e.g. :attr:`Hessian.h`).

    ``damp``: added to the diagonal as a fraction of its mean (> 0 keeps the inverse stable); ``act_order``:
    quantize the columns in order of decreasing ``diag(H)`` (the stored groups stay contiguous along ``K``);
    ``block_size``: columns per lazy batch update (speed only); ``params``: the params method of each group
    (``"minmax"``, ``"mse"``, ...); ``weighted`` (with ``params="mse"``): score each group's candidate clippings
    by ``sum_k H_kk (w_k - q_k)^2`` instead of the plain squared error; ``refit``: once every code is chosen,
    refit each row's group scales by least squares on the output error (see :func:`refit_scales`). Columns
    whose inputs are always zero (``H[i, i] == 0``) are quantized as 0. Deterministic: the same inputs give the
    same bytes.
    """
    w = check_float_array(w, "w")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {w.shape}")
    n, k = w.shape
    kind, gsize = _check_scheme(scheme, n, k)
    h = np.asarray(h)
    if h.shape != (k, k) or h.dtype.kind != "f":
        raise ValueError(f"h must be a float [K, K] = [{k}, {k}] matrix for w of shape {w.shape}, got "
                         f"{h.dtype} {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("h contains NaN or Inf")
    if not isinstance(damp, numbers.Real) or not np.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    for name, flag in (("act_order", act_order), ("weighted", weighted), ("refit", refit)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    params_method(params)  # ValueError naming the registered methods
    if weighted and params != "mse":
        raise ValueError(f"weighted=True weighs the clippings of params='mse', not of params={params!r}")
    diag = np.diagonal(h)
    if np.any(diag < 0):
        i = int(np.argmax(diag < 0))
        raise ValueError(f"h[{i}, {i}] = {diag[i]} < 0: not X^T X of any inputs")
    if n and k and not np.any(diag > 0):
        raise ValueError("h is all zero on its diagonal: the layer's recorded inputs are all zero, or none were "
                         "recorded (Hessian.add), and GPTQ would quantize every column as 0")
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes inf: named below
        wf = w.astype(np.float32)  # a copy: the caller's array is never touched
    if not np.all(np.isfinite(wf)):
        _raise_nonfinite(w, "w")

    if n == 0 or k == 0:
        return quantize(wf, scheme)  # nothing to compensate: the empty array's conventional parameters
    with blas_threads():
        qa = _columns(wf.copy() if refit else wf, h, scheme, kind, gsize, float(damp), act_order, int(block_size),
                      params, weighted)
        if refit and kind != "tensor":  # one scale shared by all rows: nothing to fit row by row
            qa = refit_scales(wf, h, qa, damp=float(damp))
        return qa


def refit_scales(w, h, qa: QuantizedArray, *, damp: float = 0.01) -> QuantizedArray:
    """``qa`` (a quantization of ``w [N, K]``, per output channel or per group along ``K``) with each row's scales
    refitted, codes and zero points kept: per row, the scales ``s`` that minimise the output error
    ``(w - dq)^T H' (w - dq)``, ``dq_k = s_g(k) (q_k - z_g(k))``, a least-squares problem with one unknown per
    group (``H' = H + damp * mean(diag H) * I``, as :func:`gptq` dampens it). A row keeps its old scales unless the
    new ones are positive, finite and lower its error, so the error of a row never rises. Useful after
    :func:`gptq`, whose scales were chosen before the compensation moved the weights.

    >>> rng = np.random.default_rng(0); x = rng.standard_normal((256, 32)); w = rng.standard_normal((4, 32))
    >>> h = Hessian.of(x); qa = quantize(w, QuantScheme(4, False, PerGroup(16, axis=1)))
    >>> err = lambda q: float(np.sum(((w - dequantize(q)) @ h) * (w - dequantize(q))))
    >>> bool(err(refit_scales(w, h, qa, damp=0.0)) < err(qa))
    True
    """
    w = check_float_array(w, "w")
    if not isinstance(qa, QuantizedArray):
        raise TypeError(f"qa must be a qcore.QuantizedArray, got {type(qa).__name__}")
    if w.ndim != 2 or qa.shape != w.shape:
        raise ValueError(f"w must be 2-D [N, K] with qa's shape {qa.shape}, got {w.shape}")
    n, k = w.shape
    kind, gsize = _check_scheme(qa.scheme, n, k)
    if kind == "tensor":
        raise ValueError("refit_scales fits each row's scales; a PerTensor() scheme shares one scale by all rows")
    h = np.asarray(h)
    if h.shape != (k, k) or h.dtype.kind != "f" or not np.all(np.isfinite(h)):
        raise ValueError(f"h must be a finite float [K, K] = [{k}, {k}] matrix, got {h.dtype} {h.shape}")
    if not isinstance(damp, numbers.Real) or not np.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if n == 0 or k == 0:
        return qa
    h = h.astype(np.float64)
    dead = np.diag(h) == 0  # as gptq: an input that is always zero makes its weight 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    wd = w.astype(np.float64)
    wd[:, dead] = 0.0
    old = np.ascontiguousarray(qa.scale, np.float32).reshape(n, -1)
    ng = old.shape[1]
    gidx = np.arange(k) // gsize if kind == "group" else np.zeros(k, np.int64)
    starts = np.arange(0, k, gsize) if kind == "group" else np.array([0])
    c = qa.codes.astype(np.float64)
    if qa.zero_point is not None:
        c -= np.asarray(qa.zero_point, np.float64).reshape(n, -1)[:, gidx]
    with blas_threads():
        m = np.empty((n, ng, ng))
        for g in range(ng):
            cols = slice(starts[g], starts[g] + gsize)
            m[:, :, g] = np.add.reduceat(c * (c[:, cols] @ h[cols]), starts, axis=1)
        wh = wd @ h
    rhs = np.add.reduceat(c * wh, starts, axis=1)
    base = np.einsum("rk,rk->r", wh, wd)

    def error(s):  # (w - c s)^T H (w - c s) per row, from the normal equations' terms
        s = s.astype(np.float64)
        return np.einsum("rg,rgh,rh->r", s, m, s) - 2 * np.einsum("rg,rg->r", s, rhs) + base

    idle = np.einsum("rgg->rg", m) <= 0  # a group whose codes all sit on the zero point: its scale is moot
    fixed_m, fixed_rhs = m.copy(), rhs.copy()
    fixed_m[idle[:, :, None] & idle[:, None, :]] = 0.0
    rows, groups = np.nonzero(idle)
    fixed_m[rows, groups, groups] = 1.0
    fixed_rhs[idle] = old[idle]
    try:
        new = np.linalg.solve(fixed_m, fixed_rhs[:, :, None])[:, :, 0].astype(np.float32)
    except np.linalg.LinAlgError:  # a singular row: solve row by row, and such a row keeps its scales
        new = np.array(old)
        for r in range(n):
            try:
                new[r] = np.linalg.solve(fixed_m[r], fixed_rhs[r])
            except np.linalg.LinAlgError:
                pass
    ok = np.all(np.isfinite(new) & (new >= np.finfo(np.float32).tiny), axis=1)
    new[~ok] = old[~ok]
    better = ok & (error(new) < error(old))
    scale = np.where(better[:, None], new, old).astype(np.float32).reshape(np.shape(qa.scale))
    return QuantizedArray.from_parts(qa.codes, scale, qa.zero_point, qa.scheme)


def _params(x, scheme, method, weights=None):
    if weights is not None:
        from .search import weighted_mse_params

        return weighted_mse_params(x, weights, scheme)
    p = compute_qparams(x, scheme, method=method)
    if p.zero_point_kind != "int":  # the rounding kernel computes (q - zp) * scale with an integer zp
        raise ValueError(f"params method {method!r} gives a {p.zero_point_kind} zero point; gptq needs an integer "
                         "zero point (or a symmetric scheme)")
    return p


def _columns(wf, h, scheme, kind, gsize, damp, act_order, block_size, params, weighted=False) -> QuantizedArray:
    """The GPTQ loop on the checked float32 copy ``wf [N, K]`` (modified in place)."""
    n, k = wf.shape
    h = h.astype(np.float64)  # a copy
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wf[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    wf = np.ascontiguousarray(wf[:, perm])
    u = _inverse_cholesky(h[np.ix_(perm, perm)], damp).astype(np.float32)

    col_scheme = QuantScheme(scheme.bits, scheme.symmetric, PerChannel(0))
    ngroups = -(-k // gsize) if kind == "group" else 1
    scale = np.zeros((n, ngroups), np.float32)
    zp = np.zeros((n, ngroups), np.uint8)
    done = np.zeros(ngroups, bool)
    if kind != "group":  # one set of parameters for all of K, from the weight as it is
        p = _params(wf, scheme if kind == "tensor" else col_scheme, params,
                    np.diag(h)[perm] if weighted and kind == "channel" else None)
        scale[:] = p.scale.reshape(-1, 1)
        zp[:] = 0 if p.zero_point is None else p.zero_point.reshape(-1, 1)
        done[:] = True
    where = np.empty(k, np.int64)  # permuted position of each original column
    where[perm] = np.arange(k)
    codes = np.empty((n, k), np.float32)
    qmin, qmax = np.float32(scheme.qmin), np.float32(scheme.qmax)

    gidx = (perm // gsize if kind == "group" else np.zeros(k, np.int64)).astype(np.int64)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = np.ascontiguousarray(wf[:, i1:i2])
        err1 = np.zeros((n, i2 - i1), np.float32)
        q1 = np.empty((n, i2 - i1), np.float32)
        u1 = np.ascontiguousarray(u[i1:i2, i1:i2])
        g1 = gidx[i1:i2]
        start = 0  # columns start..i of this block have their parameters: one kernel call for them
        for i in range(i2 - i1):
            j = int(g1[i])
            if done[j]:
                continue
            _run_segment(w1, err1, u1, start, i, g1, scale, zp, qmin, qmax, q1)
            start = i
            pos = where[j * gsize:(j + 1) * gsize]  # the group's columns, all still unquantized
            current = np.empty((n, pos.size), np.float32)
            inside = pos < i2
            current[:, inside] = w1[:, pos[inside] - i1]
            out = pos[~inside]
            if out.size:  # compensation from this block's columns is still pending there: apply it
                current[:, ~inside] = wf[:, out] - err1[:, :i] @ u[i1:i1 + i, out]
            p = _params(current, col_scheme, params, np.diag(h)[j * gsize:(j + 1) * gsize] if weighted else None)
            scale[:, j] = p.scale
            zp[:, j] = 0 if p.zero_point is None else p.zero_point
            done[j] = True
        _run_segment(w1, err1, u1, start, i2 - i1, g1, scale, zp, qmin, qmax, q1)
        codes[:, perm[i1:i2]] = q1
        wf[:, i2:] -= err1 @ u[i1:i2, i2:]

    if kind == "tensor":
        out_scale, out_zp = np.array(scale[0, 0]), np.array(zp[0, 0])
    elif kind == "channel":
        out_scale, out_zp = scale[:, 0].copy(), zp[:, 0].copy()
    else:
        out_scale, out_zp = scale, zp
    return QuantizedArray.from_parts(codes.astype(scheme.code_dtype), out_scale,
                                     None if scheme.symmetric else out_zp, scheme)
