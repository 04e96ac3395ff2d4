"""quantize / dequantize / fake_quantize on NumPy arrays, and the :class:`QuantizedArray` container.

>>> import numpy as np
>>> from qcore import QuantScheme, PerTensor, quantize, dequantize
>>> qa = quantize(np.array([-1.0, 0.0, 0.5, 1.0], np.float32), QuantScheme(8, True, PerTensor()))
>>> qa.codes.tolist(), float(qa.scale)
([-127, 0, 64, 127], 0.007874015718698502)
>>> dequantize(qa, dtype=np.float64).round(3).tolist()
[-1.0, 0.0, 0.504, 1.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np

from . import _kernels
from ._parallel import f64_bits, run_chunks, team_chunks
from .params import (ZERO_POINT_KINDS, QParams, check_codes, check_grid, check_zero_point, params_method, params_methods,
                     register_params_method)
from .scheme import PerChannel, PerGroup, QuantScheme, _normalize_axis

__all__ = ["QuantizedArray", "QParams", "check_grid", "compute_qparams", "quantize", "dequantize", "fake_quantize",
           "check_float_array", "minmax_params"]

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16))
_MIN_PART = 1 << 16  # elements per thread's share, at least: below that a thread hand-off costs more


def _min_rows(length: int) -> int:
    return -(-_MIN_PART // max(length, 1))


def check_float_array(x, name: str = "x") -> np.ndarray:
    """Return ``x`` as an ndarray after checking it is a floating array of rank >= 1 (no copy).

    Raises ``TypeError`` for integer, bool, complex or object input and ``ValueError`` for 0-d input.
    """
    if isinstance(x, np.generic):  # a NumPy scalar is a 0-d array: let the rank check name it
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}; use np.asarray(...) first")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, float32, float64 or bfloat16, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name} is 0-d; quantization needs rank >= 1 (use x.reshape(1))")
    return x


def _compute_view(x: np.ndarray) -> np.ndarray:
    # float16/bfloat16 widen to float32 exactly; float32/float64 are used as they are, unless misaligned (a view
    # at an odd byte offset of a buffer): the kernels load whole floats, so those get an aligned copy.
    if x.dtype in (np.float32, np.float64):
        return x if x.flags.aligned else x.copy()
    return x.astype(np.float32)


def _contiguous(a) -> np.ndarray:
    # np.ascontiguousarray turns 0-d arrays (per-tensor parameters) into shape (1,); this keeps the shape
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


def _bits_view(a: np.ndarray) -> np.ndarray:
    # float32 data goes to the kernels also as its int32 bit pattern (their fast min/max path)
    return a.view(np.int32) if a.dtype == np.float32 else np.empty(a.shape[:-1] + (0,), np.int32)


_F32_MAX = float(np.finfo(np.float32).max)


def _raise_nonfinite(x: np.ndarray, name: str) -> None:
    """Raise the ValueError for the first value the kernels flagged (slow path: only runs on bad input)."""
    # compared in float32 (float64 input as it is): in float16 the float32 bound itself rounds to inf, and
    # ``inf <= inf`` would let the infinity through
    xv = x if x.dtype == np.float64 else x.astype(np.float32)
    with np.errstate(invalid="ignore"):
        bad = np.argwhere(~(np.abs(xv) <= _F32_MAX))  # NaN compares False, so it is caught too
    idx = tuple(int(i) for i in bad[0])
    if np.isfinite(xv[idx]):
        raise ValueError(f"{name} contains {x[idx]} at index {idx}, beyond the float32 range (|x| <= "
                         f"{_F32_MAX:.4g}) that float32 scales can represent")
    raise ValueError(f"{name} contains {x[idx]} at index {idx}; NaN and Inf cannot be quantized")


@dataclass(frozen=True, eq=False)
class QuantizedArray:
    """Integer codes with their scale and zero point: ``x ≈ (codes - zero_point) * scale``.

    ``codes`` has the shape of the original array (int8 for symmetric schemes, uint8 for asymmetric);
    ``scale`` is float32 of shape ``scheme.params_shape(shape)``: ``()`` per tensor, ``(shape[axis],)`` per
    channel, the shape with ``axis`` divided by the group size per group (rounded up: a group size that does not
    divide the axis leaves a shorter last group). ``zero_point`` is uint8 of the same
    shape, or ``None`` for symmetric schemes. Codes were rounded half to even.

    ``zero_point_kind="float"`` (asymmetric only; see :data:`qcore.params.ZERO_POINT_KINDS`): ``zero_point`` is a
    float32 offset and ``x ≈ codes * scale + zero_point`` (GGUF's Q4_1 ``q * d + m``).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: Optional[np.ndarray]
    scheme: QuantScheme
    zero_point_kind: str = "int"

    def __post_init__(self) -> None:
        # Structure only (cheap): the kernels index scale/zero_point by the codes' shape, so a mismatch here
        # would read out of bounds. from_parts() also checks the values.
        scheme = self.scheme
        if not isinstance(scheme, QuantScheme):
            raise TypeError(f"scheme must be a QuantScheme, got {type(scheme).__name__}")
        for name in ("codes", "scale"):
            if not isinstance(getattr(self, name), np.ndarray):
                raise TypeError(f"{name} must be a numpy.ndarray, got {type(getattr(self, name)).__name__}")
        if self.codes.dtype != scheme.code_dtype:
            raise TypeError(f"codes must be {scheme.code_dtype} for scheme {scheme}, got {self.codes.dtype}")
        pshape = scheme.params_shape(self.codes.shape)  # also rejects 0-d codes and shapes the scheme cannot take
        if self.scale.dtype != np.float32 or self.scale.shape != pshape:
            raise ValueError(f"scale must be float32 of shape {pshape}, got {self.scale.dtype} {self.scale.shape}")
        if self.zero_point_kind not in ZERO_POINT_KINDS:
            raise ValueError(f"zero_point_kind {self.zero_point_kind!r} is not supported; expected one of "
                             f"{ZERO_POINT_KINDS}")
        zdt = np.uint8 if self.zero_point_kind == "int" else np.float32
        if scheme.symmetric:
            if self.zero_point is not None:
                raise ValueError("a symmetric scheme has no zero_point (pass None)")
            if self.zero_point_kind != "int":
                raise ValueError(f"zero_point_kind {self.zero_point_kind!r} needs an asymmetric scheme, got {scheme}")
        elif (not isinstance(self.zero_point, np.ndarray) or self.zero_point.dtype != zdt
              or self.zero_point.shape != pshape):
            got = (f"{self.zero_point.dtype} {self.zero_point.shape}" if isinstance(self.zero_point, np.ndarray)
                   else type(self.zero_point).__name__)
            raise ValueError(f"zero_point must be {np.dtype(zdt).name} of shape {pshape}, got {got}")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def params(self) -> QParams:
        """Scale and zero point as a :class:`~qcore.params.QParams` (sharing the arrays): the grid to quantize
        other data on, ``quantize(y, params=qa.params)``."""
        return QParams(self.scale, self.zero_point, self.scheme, self.zero_point_kind)

    @property
    def nbytes(self) -> int:
        """Bytes when stored packed: codes at ``bits`` per element (per row), plus scale and zero point."""
        from .packing import packed_shape

        n = int(np.prod(packed_shape(self.shape, self.scheme.bits), dtype=np.int64))
        return n + self.scale.nbytes + (0 if self.zero_point is None else self.zero_point.nbytes)

    def packed(self) -> np.ndarray:
        """Codes packed along the last axis (docs/packing.md); signed codes get the ``2^(b-1)`` offset.

        >>> import numpy as np; from qcore import QuantScheme, PerTensor, quantize
        >>> quantize(np.array([-1.0, 1.0], np.float32), QuantScheme(4, True, PerTensor())).packed()
        array([241], dtype=uint8)
        """
        from .packing import pack

        kept = self.__dict__.get("_packed")
        if kept is not None:  # the bytes from_packed was given: the same layout, no second pass
            return kept.copy()
        codes = self.codes
        if self.scheme.symmetric:
            codes = (codes.astype(np.int16) + (1 << (self.scheme.bits - 1))).astype(np.uint8)
        return pack(codes, self.scheme.bits)

    @classmethod
    def from_packed(cls, packed, scale, zero_point, scheme: QuantScheme, shape, *,
                    zero_point_kind: str = "int") -> "QuantizedArray":
        """Rebuild from :meth:`packed` bytes; validates parameters and code range.

        The array keeps a copy of ``packed`` (when its padding bits are zero, as :meth:`packed` writes them), so
        that :meth:`packed` (a checkpoint writer) returns those bytes instead of packing the codes again."""
        from .packing import unpack

        if not isinstance(scheme, QuantScheme):
            raise TypeError(f"scheme must be a QuantScheme, got {type(scheme).__name__}")
        shape = tuple(int(n) for n in shape)
        if len(shape) == 0:
            raise ValueError("shape must have rank >= 1")
        packed = np.asarray(packed)
        if packed.shape[:-1] != shape[:-1]:
            raise ValueError(f"packed leading shape {packed.shape[:-1]} does not match shape {shape}")
        codes = unpack(packed, scheme.bits, shape[-1])
        if scheme.symmetric:
            codes = (codes.astype(np.int16) - (1 << (scheme.bits - 1))).astype(np.int8)
        qa = cls.from_parts(codes, scale, zero_point, scheme, zero_point_kind=zero_point_kind)
        used = (shape[-1] * scheme.bits) % 8  # bits of a row's last byte that hold codes
        if scheme.bits < 8 and packed.dtype == np.uint8 and not (used and packed.size
                                                                  and (packed[..., -1] >> used).any()):
            object.__setattr__(qa, "_packed", np.array(packed, order="C"))
        return qa

    @classmethod
    def from_parts(cls, codes, scale, zero_point, scheme: QuantScheme, *,
                   zero_point_kind: str = "int") -> "QuantizedArray":
        """Build from arrays after checking dtypes, shapes, the code range, and that scales are finite and > 0."""
        # _contiguous, not np.ascontiguousarray: the latter turns 0-d codes into shape (1,), which the
        # constructor would then accept instead of refusing
        qa = cls(_contiguous(codes), _contiguous(scale),
                 None if zero_point is None else _contiguous(zero_point), scheme, zero_point_kind)
        qa.params.check(qa.shape)  # zero points in range, and check_grid
        check_codes(qa.codes, scheme)
        return qa

    def __repr__(self) -> str:
        kind = "" if self.zero_point_kind == "int" else f", zero_point_kind={self.zero_point_kind!r}"
        return f"QuantizedArray(shape={self.shape}, scheme={self.scheme}, scale.shape={self.scale.shape}{kind})"


def _layout(shape: tuple[int, ...], scheme: QuantScheme):
    """How a granularity maps onto 2-D rows: (axis moved to the row/column, group size, groups per row)."""
    g = scheme.granularity
    if isinstance(g, PerChannel):
        return "channel", _normalize_axis(g.axis, len(shape), "PerChannel")
    if isinstance(g, PerGroup):
        return "group", _normalize_axis(g.axis, len(shape), "PerGroup")
    return "tensor", None


def _check_scheme(scheme) -> QuantScheme:
    if not isinstance(scheme, QuantScheme):
        raise TypeError(f"scheme must be a qcore.QuantScheme, got {type(scheme).__name__}")
    return scheme


class _Rows:
    """``xc`` as C-contiguous 2-D rows in which every group is a run of ``g`` elements (per channel: the whole
    row), and the way back to the caller's shapes for codes and parameters."""

    __slots__ = ("kind", "axis", "x", "g", "ngroups", "moved_shape")

    def __init__(self, xc: np.ndarray, kind: str, axis: int, scheme: QuantScheme):
        self.kind, self.axis = kind, axis
        if kind == "channel":
            moved = np.moveaxis(xc, axis, 0)
            # explicit column count: reshape(-1) cannot infer it when the array is empty. (math.prod, not
            # np.prod: a few microseconds less per call, which a small layer notices)
            self.x = np.ascontiguousarray(moved).reshape(xc.shape[axis], math.prod(moved.shape[1:]))
            self.g, self.ngroups = self.x.shape[1], 1
        else:
            moved = np.moveaxis(xc, axis, -1)
            self.x = np.ascontiguousarray(moved).reshape(math.prod(moved.shape[:-1]), xc.shape[axis])
            self.g = scheme.granularity.size
            self.ngroups = -(-self.x.shape[1] // self.g)  # a ragged last group counts as one
        self.moved_shape = moved.shape

    def codes_back(self, codes2d: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(codes2d.reshape(self.moved_shape),
                                                0 if self.kind == "channel" else -1, self.axis))

    def params_back(self, p2d: np.ndarray, pshape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "channel":
            return p2d.reshape(pshape)
        return np.ascontiguousarray(np.moveaxis(p2d.reshape(self.moved_shape[:-1] + (self.ngroups,)), -1, self.axis))

    def params_rows(self, p: np.ndarray) -> np.ndarray:
        """Parameters of the caller's shape as (rows, groups), C-contiguous and aligned for the kernels."""
        if self.kind == "channel":
            p2d = np.ascontiguousarray(p).reshape(-1, 1)
        else:
            p2d = np.ascontiguousarray(np.moveaxis(p, self.axis, -1)).reshape(self.x.shape[0], self.ngroups)
        return p2d if p2d.flags.aligned else p2d.copy()  # a view at an odd offset of a buffer


def _flat_minmax(x: np.ndarray, flat: np.ndarray, xbits: np.ndarray) -> tuple[float, float]:
    """(min, max) of the contiguous 1-D ``flat`` (``x`` viewed flat); ``ValueError`` naming the first NaN, Inf or
    out-of-range value of ``x``."""
    nchunks = team_chunks(flat.size, _MIN_PART)
    parts = np.zeros((nchunks, 3))  # min, max, non-finite of each chunk: the kernel writes row i of chunk i
    run_chunks(_kernels.TEAM["minmax_range", flat.dtype.name],
               (flat.size, flat.ctypes.data, xbits.ctypes.data, xbits.size, parts.ctypes.data),
               flat.size, _MIN_PART, keep=(flat, xbits, parts), nchunks=nchunks)
    if parts[:, 2].any():
        _raise_nonfinite(x, "x")
    return parts[:, 0].min(), parts[:, 1].max()


def _quantize_flat(flat: np.ndarray, s, z, scheme: QuantScheme) -> np.ndarray:
    codes = np.empty(flat.shape, scheme.code_dtype)
    run_chunks(_kernels.TEAM["quantize_flat", flat.dtype.name, codes.dtype.name],
               (flat.size, flat.ctypes.data, f64_bits(np.float32(s)), f64_bits(z), scheme.qmin, scheme.qmax,
                codes.ctypes.data), flat.size, _MIN_PART, keep=(flat, codes))
    return codes


def quantize(x, scheme: Optional[QuantScheme] = None, params=None) -> QuantizedArray:
    """Quantize a float array (any rank >= 1, any strides) to a :class:`QuantizedArray`.

    ``scheme`` defaults to ``QuantScheme()`` (or ``params.scheme``). ``params`` says where scale and zero point
    come from: ``None`` or ``"minmax"``, each group's min/max (symmetric: absmax), computed in the same pass as
    the codes; the name of another registered params method (:func:`qcore.params.params_methods`); or a
    :class:`~qcore.params.QParams` (from :func:`compute_qparams`, or built by hand), checked against ``x`` and
    ``scheme`` first. Codes are ``clip(rint(x / scale) + zero_point, qmin, qmax)``, rounded half to even.

    NaN or Inf is a ``ValueError`` naming the first bad index. Empty groups and all-zero groups get
    ``scale = float32 tiny`` and codes equal to the zero point; an empty array gives empty codes and parameters
    of ``scheme.params_shape(x.shape)``.

    >>> import numpy as np; from qcore import QuantScheme, PerGroup
    >>> qa = quantize(np.arange(8, dtype=np.float32).reshape(2, 4), QuantScheme(4, False, PerGroup(2)))
    >>> qa.scale.shape, qa.zero_point.tolist()
    ((2, 2), [[0, 0], [0, 0]])
    """
    if isinstance(params, QParams):
        if scheme is not None and _check_scheme(scheme) != params.scheme:
            raise ValueError(f"params are for scheme {params.scheme}, not {scheme}")
        return _quantize_given(check_float_array(x), params)
    scheme = QuantScheme() if scheme is None else _check_scheme(scheme)
    if params is not None and not isinstance(params, str):
        raise TypeError(f"params must be a qcore.QParams, a params method name {params_methods()} or None, "
                        f"got {type(params).__name__}")
    x = check_float_array(x)
    if params is not None and params != "minmax":
        return _quantize_given(x, compute_qparams(x, scheme, method=params))
    pshape = scheme.params_shape(x.shape)
    kind, axis = _layout(x.shape, scheme)
    xc = _compute_view(x)

    if kind == "tensor":
        flat = np.ascontiguousarray(xc).reshape(-1)
        mn, mx = _flat_minmax(x, flat, _bits_view(flat))
        s, z = _kernels.params_from_minmax(mn, mx, scheme.qmax, scheme.symmetric)
        codes = _quantize_flat(flat, s, z, scheme)
        zp = None if scheme.symmetric else np.array(z, np.uint8)
        return QuantizedArray(codes.reshape(x.shape), np.array(s, np.float32), zp, scheme)

    rows = _Rows(xc, kind, axis, scheme)
    (nrows, length), ngroups = rows.x.shape, rows.ngroups
    codes2d = np.empty((nrows, length), scheme.code_dtype)
    # Groups with no elements keep these values: the all-zero convention.
    scale2d = np.full((nrows, ngroups), _kernels.F32_TINY, np.float32)
    zp2d = np.zeros((nrows, ngroups), np.uint8)
    if nrows and length:
        rows2d = rows.x
        xbits = _bits_view(rows2d)
        bad = run_chunks(_kernels.TEAM["quantize_rows", rows2d.dtype.name, codes2d.dtype.name],
                         (nrows, length, rows2d.ctypes.data, xbits.ctypes.data, xbits.shape[1], rows.g, scheme.qmin,
                          scheme.qmax, int(scheme.symmetric), codes2d.ctypes.data, scale2d.ctypes.data,
                          zp2d.ctypes.data, ngroups),
                         nrows, _min_rows(length), keep=(rows2d, xbits, codes2d, scale2d, zp2d))
        if bad.any():
            _raise_nonfinite(x, "x")
    return QuantizedArray(rows.codes_back(codes2d), rows.params_back(scale2d, pshape),
                          None if scheme.symmetric else rows.params_back(zp2d, pshape), scheme)


def _quantize_given(x: np.ndarray, params: QParams) -> QuantizedArray:
    """Codes of the checked float array ``x`` with ``params`` (checked here against ``x``'s shape)."""
    scheme = params.scheme
    params.check(x.shape)
    if params.zero_point_kind == "float":
        return _quantize_float_zp(x, params)
    kind, axis = _layout(x.shape, scheme)
    xc = _compute_view(x)
    # the result owns its parameters: a later change to the caller's arrays must not alter it
    scale = _contiguous(params.scale).copy()
    zp = None if params.zero_point is None else _contiguous(params.zero_point).copy()

    if kind == "tensor":
        flat = np.ascontiguousarray(xc).reshape(-1)
        _flat_minmax(x, flat, _bits_view(flat))  # the input check; the range itself is not needed
        codes = _quantize_flat(flat, scale, 0 if zp is None else int(zp), scheme)
        return QuantizedArray(codes.reshape(x.shape), scale, zp, scheme)

    rows = _Rows(xc, kind, axis, scheme)
    nrows, length = rows.x.shape
    codes2d = np.empty((nrows, length), scheme.code_dtype)
    if nrows and length:
        rows2d = rows.x
        xbits = _bits_view(rows2d)
        scale2d = rows.params_rows(scale)
        zp2d = np.zeros((nrows, 0), np.uint8) if zp is None else rows.params_rows(zp)
        bad = run_chunks(_kernels.TEAM["quantize_rows_given", rows2d.dtype.name, codes2d.dtype.name],
                         (nrows, length, rows2d.ctypes.data, xbits.ctypes.data, xbits.shape[1], rows.g, scheme.qmin,
                          scheme.qmax, codes2d.ctypes.data, scale2d.ctypes.data, zp2d.ctypes.data, zp2d.shape[1]),
                         nrows, _min_rows(length), keep=(rows2d, xbits, codes2d, scale2d, zp2d))
        if bad.any():
            _raise_nonfinite(x, "x")
    return QuantizedArray(rows.codes_back(codes2d), scale, zp, scheme)


def expand_params(p: np.ndarray, shape: tuple, scheme: QuantScheme) -> np.ndarray:
    """``p`` (scale or zero point of ``scheme`` for an array of ``shape``) broadcastable against that array: one
    value per element along a group's axis, a channel's value along its axis.

    >>> import numpy as np; from qcore import QuantScheme, PerGroup
    >>> expand_params(np.array([[1, 2]]), (1, 4), QuantScheme(4, False, PerGroup(2))).tolist()
    [[1, 1, 2, 2]]
    """
    kind, axis = _layout(tuple(shape), scheme)
    if kind == "tensor":
        return p
    if kind == "channel":
        return p.reshape(tuple(shape[i] if i == axis else 1 for i in range(len(shape))))
    # a ragged last group repeats past the axis' end: cut it back to the axis length
    return np.take(np.repeat(p, scheme.granularity.size, axis=axis), np.arange(shape[axis]), axis=axis)


def _quantize_float_zp(x: np.ndarray, params: QParams) -> QuantizedArray:
    """``clip(rint((x - zero_point) / scale), 0, qmax)`` of the checked ``x``: the float zero point's rounding
    (half to even, as every qcore code), in float32 (float64 input: in float64)."""
    scheme = params.scheme
    xc = _compute_view(x)
    if xc.size:
        flat = np.ascontiguousarray(xc).reshape(-1)
        _flat_minmax(x, flat, _bits_view(flat))  # the input check: NaN, Inf, beyond float32
    scale, zp = _contiguous(params.scale).copy(), _contiguous(params.zero_point).copy()
    s, z = expand_params(scale, x.shape, scheme), expand_params(zp, x.shape, scheme)
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.rint((xc - z.astype(xc.dtype)) / s.astype(xc.dtype))
    codes = np.clip(q, 0, scheme.qmax).astype(np.uint8)
    return QuantizedArray(codes, scale, zp, scheme, "float")


def compute_qparams(x, scheme: QuantScheme = QuantScheme(), method: str = "minmax") -> QParams:
    """The :class:`~qcore.params.QParams` that the registered params method ``method`` picks for ``x``; for
    ``"minmax"``, those :func:`quantize` uses. It unpacks as ``scale, zero_point`` (None when symmetric).

    >>> import numpy as np; from qcore import QuantScheme, PerTensor
    >>> s, z = compute_qparams(np.array([-1.0, 3.0], np.float32), QuantScheme(8, False, PerTensor()))
    >>> float(s), int(z)
    (0.01568627543747425, 64)
    """
    scheme = _check_scheme(scheme)
    fn = params_method(method)
    x = check_float_array(x)
    scheme.validate_shape(x.shape)
    xc = _compute_view(x)
    if method != "minmax":  # minmax's kernels check the input as they read it
        flat = np.ascontiguousarray(xc).reshape(-1)
        _flat_minmax(x, flat, _bits_view(flat))
    p = fn(xc, scheme)
    if not isinstance(p, QParams):
        raise TypeError(f"params method {method!r} returned {type(p).__name__}, not a qcore.QParams")
    if p.scheme != scheme:
        raise ValueError(f"params method {method!r} returned params for scheme {p.scheme}, not {scheme}")
    p.check(x.shape)
    return p


@register_params_method("minmax")
def minmax_params(x: np.ndarray, scheme: QuantScheme) -> QParams:
    """Each group's range widened to include 0 (symmetric: its absmax) spread over the code range, with an
    integer zero point that makes 0.0 exact; the parameters of the fused min/max + rounding pass."""
    pshape = scheme.params_shape(x.shape)
    kind, axis = _layout(x.shape, scheme)
    xc = _compute_view(x)
    if kind == "tensor":
        flat = np.ascontiguousarray(xc).reshape(-1)
        mn, mx = _flat_minmax(x, flat, _bits_view(flat))
        s, z = _kernels.params_from_minmax(mn, mx, scheme.qmax, scheme.symmetric)
        return QParams(np.array(s, np.float32), None if scheme.symmetric else np.array(z, np.uint8), scheme)
    rows = _Rows(xc, kind, axis, scheme)
    (nrows, length), ngroups = rows.x.shape, rows.ngroups
    scale2d = np.full((nrows, ngroups), _kernels.F32_TINY, np.float32)
    zp2d = np.zeros((nrows, ngroups), np.uint8)
    if nrows and length:
        rows2d = rows.x
        xbits = _bits_view(rows2d)
        bad = run_chunks(_kernels.TEAM["minmax_params_rows", rows2d.dtype.name],
                         (nrows, length, rows2d.ctypes.data, xbits.ctypes.data, xbits.shape[1], rows.g, scheme.qmax,
                          int(scheme.symmetric), scale2d.ctypes.data, zp2d.ctypes.data),
                         nrows, _min_rows(length), keep=(rows2d, xbits, scale2d, zp2d))
        if bad.any():
            _raise_nonfinite(x, "x")
    return QParams(rows.params_back(scale2d, pshape),
                   None if scheme.symmetric else rows.params_back(zp2d, pshape), scheme)


def dequantize(qa, *args, dtype=np.float32, out=None) -> np.ndarray:
    """Float array ``(codes - zero_point) * scale`` (a float zero point: ``codes * scale + zero_point``), computed
    in float32, returned as ``dtype``.

    Accepts a :class:`QuantizedArray`, or prior-art style ``dequantize(codes, scale[, zero_point])`` with a
    scalar scale, or a per-channel scale broadcast along axis 0 (``scale.shape == (codes.shape[0],)``), or any
    scale that NumPy broadcasts against ``codes``. ``out``: a C-contiguous float32 array of the codes' shape to
    write into (a fresh 64 MB result costs more in page faults than the arithmetic does).

    >>> import numpy as np
    >>> dequantize(np.array([-127, 64], np.int8), np.float32(0.5)).tolist()
    [-63.5, 32.0]
    """
    if not isinstance(qa, QuantizedArray):
        if out is not None:
            raise TypeError("out= is supported with a QuantizedArray only")
        return _dequantize_loose(qa, *args, dtype=dtype)
    if args:
        raise TypeError("dequantize(QuantizedArray) takes no positional parameters besides the array")
    out_dtype = np.dtype(dtype)
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, float32, float64 or bfloat16, got {out_dtype}")
    codes, scheme = qa.codes, qa.scheme
    if out is not None:
        if out_dtype != np.float32:
            raise TypeError(f"out= gives float32 results; dtype must be float32, got {out_dtype}")
        if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != codes.shape
                or not out.flags.c_contiguous or not out.flags.writeable or not out.flags.aligned):
            got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
            if isinstance(out, np.ndarray):
                got += "".join(f", {why}" for bad, why in ((not out.flags.c_contiguous, "not C-contiguous"),
                                                          (not out.flags.writeable, "read-only"),
                                                          (not out.flags.aligned, "at a misaligned address")) if bad)
            raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {codes.shape} (aligned), "
                             f"got {got}")
    if codes.size == 0:
        return np.zeros(codes.shape, out_dtype) if out is None else out
    if qa.zero_point_kind == "float":
        # codes * scale + zero_point: two float32 roundings, the order GGUF's Q4_1 dequantizes in
        w = (codes.astype(np.float32) * expand_params(qa.scale, codes.shape, scheme)
             + expand_params(qa.zero_point, codes.shape, scheme))
        if out is not None:
            np.copyto(out, w)
            return out
        return _as_dtype(w, out_dtype, lambda: expand_params(qa.scale, codes.shape, scheme))
    kind, axis = _layout(codes.shape, scheme)
    if kind == "tensor":
        flat = np.empty(codes.size, np.float32) if out is None else out.reshape(-1)
        z = 0 if qa.zero_point is None else int(qa.zero_point)
        cflat = np.ascontiguousarray(codes).reshape(-1)
        run_chunks(_kernels.TEAM["dequantize_flat", cflat.dtype.name],
                   (cflat.size, cflat.ctypes.data, f64_bits(qa.scale), f64_bits(z), flat.ctypes.data),
                   codes.size, _MIN_PART, keep=(cflat, flat))
        result = flat.reshape(codes.shape)
    else:
        if kind == "channel":
            moved = np.moveaxis(codes, axis, 0)
            c2d = np.ascontiguousarray(moved).reshape(codes.shape[axis], int(np.prod(moved.shape[1:])))
            s2d = qa.scale.reshape(-1, 1)
            z2d = None if qa.zero_point is None else qa.zero_point.reshape(-1, 1)
            g = c2d.shape[1]
            in_place = axis == 0  # the kernel's row layout is the array's own
        else:
            moved = np.moveaxis(codes, axis, -1)
            c2d = np.ascontiguousarray(moved).reshape(-1, codes.shape[axis])
            s2d = np.ascontiguousarray(np.moveaxis(qa.scale, axis, -1)).reshape(c2d.shape[0], -1)
            z2d = (None if qa.zero_point is None
                   else np.ascontiguousarray(np.moveaxis(qa.zero_point, axis, -1)).reshape(c2d.shape[0], -1))
            g = scheme.granularity.size
            in_place = axis == codes.ndim - 1
        out2d = out.reshape(c2d.shape) if out is not None and in_place else np.empty(c2d.shape, np.float32)
        zarg = np.zeros((c2d.shape[0], 0), np.uint8) if z2d is None else np.ascontiguousarray(z2d)
        s2d = np.ascontiguousarray(s2d)
        s2d = s2d if s2d.flags.aligned else s2d.copy()  # a scale viewed at an odd offset of a buffer
        run_chunks(_kernels.TEAM["dequantize_rows", c2d.dtype.name],
                   (c2d.shape[0], c2d.shape[1], c2d.ctypes.data, g, s2d.ctypes.data, zarg.ctypes.data, zarg.shape[1],
                    out2d.ctypes.data), c2d.shape[0], _min_rows(c2d.shape[1]), keep=(c2d, s2d, zarg, out2d))
        result = np.moveaxis(out2d.reshape(moved.shape), 0 if kind == "channel" else -1, axis)
        if out is not None:
            if not in_place:
                np.copyto(out, result)
            return out
        result = np.ascontiguousarray(result)
    if out is not None:
        return out
    return _as_dtype(result, out_dtype, lambda: expand_params(qa.scale, codes.shape, scheme))


def _as_dtype(w: np.ndarray, dtype: np.dtype, step=None) -> np.ndarray:
    """The float32 values ``w`` (a new array, changed in place) as ``dtype``. In a 16-bit dtype a value past its
    largest finite one by at most its step (``step()``: the scales, broadcast against ``w``) saturates to it: an
    asymmetric grid's end lies up to half a step past its data (the zero point is an integer), and float16 data
    near 65504 gave ``inf`` where the finite end is nearer the data. One further out overflows to inf, as a cast
    does (data that never fitted the dtype).

    >>> _as_dtype(np.array([70000.0, 1e6, -1.0], np.float32), np.dtype(np.float16), lambda: 8000.0).tolist()
    [65504.0, inf, -1.0]
    """
    if dtype == np.float32:
        return w
    if dtype.itemsize == 2:
        top = float(ml_dtypes.finfo(dtype).max)
        mag = np.abs(w)
        over = mag > top
        if over.any():
            with np.errstate(over="ignore"):  # top + step may pass float32's own range: then every value is near
                near = over & (mag <= top + np.asarray(step(), np.float32))
            w[near] = np.copysign(top, w[near])
    with np.errstate(over="ignore"):
        return w.astype(dtype)


def _dequantize_loose(codes, scale=None, zero_point=None, *, dtype=np.float32) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu":
        raise TypeError(f"codes must be an integer array, got dtype {codes.dtype}")
    if scale is None:
        raise TypeError("dequantize(codes, scale[, zero_point]) needs a scale")
    out_dtype = np.dtype(dtype)
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, float32, float64 or bfloat16, got {out_dtype}")
    scale = np.asarray(scale, np.float32)
    ok = np.isfinite(scale) & (scale >= 0)  # 0: a row of zeros (a dead channel)
    if not ok.all():
        bad = scale[~ok].reshape(-1)[0]
        raise ValueError(f"scale must be finite and >= 0 everywhere, got {bad} (a scale is a step of the grid)")
    if scale.ndim == 1 and codes.ndim > 1 and scale.shape[0] == codes.shape[0]:
        # one scale per output channel (axis 0), the prior-art convention, square weights included; a scale
        # for the last axis must be shaped to broadcast, e.g. (1, n)
        scale = scale.reshape((-1,) + (1,) * (codes.ndim - 1))
    c = codes.astype(np.float32)
    if zero_point is not None:
        zp = np.asarray(zero_point, np.float32)
        lo, hi = np.iinfo(codes.dtype).min, np.iinfo(codes.dtype).max
        ok = np.isfinite(zp) & (zp >= lo) & (zp <= hi)
        if not ok.all():
            bad = zp[~ok].reshape(-1)[0]
            raise ValueError(f"zero_point must lie in the range of the {codes.dtype} codes [{lo}, {hi}], got {bad}")
        if zp.ndim == 1 and codes.ndim > 1 and zp.shape[0] == codes.shape[0]:
            zp = zp.reshape((-1,) + (1,) * (codes.ndim - 1))
        c = c - zp
    try:
        out = c * scale
    except ValueError:
        raise ValueError(f"scale of shape {scale.shape} does not broadcast against codes of shape "
                         f"{codes.shape}") from None
    return _as_dtype(out, out_dtype, lambda: np.broadcast_to(scale, out.shape))


def fake_quantize(x, scheme: Optional[QuantScheme] = None, params=None) -> np.ndarray:
    """``dequantize(quantize(x, scheme, params))`` in ``x``'s dtype: the values a quantized model actually sees.
    Finite ``x`` gives finite values: in float16 and bfloat16 a grid point past the dtype's range saturates to its
    largest finite value.

    >>> from qcore import PerTensor
    >>> fake_quantize(np.array([50000, -50000, 1, 0], np.float16), QuantScheme(2, False, PerTensor())).tolist()
    [65504.0, -33312.0, 0.0, 0.0]
    """
    x = check_float_array(x)
    return dequantize(quantize(x, scheme, params), dtype=x.dtype)
