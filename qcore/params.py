"""Quantization parameters as a value of their own, and the registry of methods that compute them.

Quantizing is two steps: a *params method* picks ``scale`` and ``zero_point`` for each group of a scheme,
then :func:`qcore.quantize` rounds with them (``codes = clip(rint(x / scale) + zero_point)``). Keeping the two
apart lets a scale search (MSE-optimal clipping, HQQ) slot in as one function plus one registration, without
touching the kernels or their callers.

>>> import numpy as np; from qcore import QuantScheme, PerTensor, compute_qparams, quantize
>>> x = np.array([-1.0, 0.5, 3.0], np.float32)
>>> p = compute_qparams(x, QuantScheme(8, False, PerTensor()))   # method "minmax"
>>> p
QParams(scheme=asym int8 per-tensor, scale.shape=(), zero_point_kind='int')
>>> quantize(x, params=p).codes.tolist() == quantize(x, p.scheme).codes.tolist()
True

A method is a function ``(x, scheme) -> QParams``: ``x`` is float32 or float64, finite, of a shape the scheme
takes. Registered under a name, it is reachable as ``compute_qparams(x, scheme, method=name)`` and
``quantize(x, scheme, params=name)``::

    @register_params_method("halfrange")
    def halfrange(x, scheme):
        p = compute_qparams(x, scheme)             # start from min-max
        return QParams(p.scale / 2, p.zero_point, scheme)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .scheme import QuantScheme

__all__ = ["QParams", "ZERO_POINT_KINDS", "check_codes", "check_float_grid", "check_grid", "check_zero_point",
           "params_method", "params_methods", "register_params_method"]

#: How a zero point enters the grid. ``"int"``: ``x ≈ (q - zero_point) * scale`` with an integer zero point in
#: the code range (uint8), so that 0.0 is exact. ``"float"``: ``x ≈ q * scale + zero_point`` with a float32
#: offset (llama.cpp's Q4_1 ``q * d + m``, HQQ), asymmetric schemes only; 0.0 need not be on the grid.
ZERO_POINT_KINDS = ("int", "float")


def check_grid(scale: np.ndarray, zero_point: Optional[np.ndarray], scheme: QuantScheme) -> None:
    """``ValueError`` unless every scale is finite and > 0 and every code of the scheme's range dequantizes to a
    finite float32 (the guarantee :func:`qcore.quantize` gives, checked again on parameters from elsewhere).

    >>> import numpy as np; from qcore import QuantScheme
    >>> check_grid(np.array([3e38], np.float32), None, QuantScheme(8))
    Traceback (most recent call last):
    ...
    ValueError: scale 3e+38 at index (0,) makes code 127 dequantize to inf (float32 overflow)
    """
    scale = np.asarray(scale)
    if scale.size == 0:
        return
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(scale) & (scale > 0))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0]) if scale.ndim else ()
        raise ValueError(f"scale must be finite and > 0 everywhere, got {float(scale[idx]):.6g} at index {idx}")
    # the farthest code from the zero point: qmax - zp or zp - qmin (symmetric: zp = 0, qmin = -qmax)
    if zero_point is None:
        reach = np.full(scale.shape, scheme.qmax, np.float32)
    else:
        zp = np.asarray(zero_point).astype(np.int32)
        reach = np.maximum(scheme.qmax - zp, zp - scheme.qmin).astype(np.float32)
    with np.errstate(over="ignore"):
        far = reach * scale.astype(np.float32)  # the multiplication dequantize performs, in float32
    over = ~np.isfinite(far)
    if over.any():
        idx = tuple(int(i) for i in np.argwhere(over)[0]) if scale.ndim else ()
        if zero_point is None:
            what = f"code {scheme.qmax}"
        else:
            z = int(np.asarray(zero_point)[idx])
            what = f"code {scheme.qmax if scheme.qmax - z >= z - scheme.qmin else scheme.qmin} (zero point {z})"
        raise ValueError(f"scale {float(scale[idx]):.6g} at index {idx} makes {what} dequantize to inf "
                         "(float32 overflow)")


def check_float_grid(scale: np.ndarray, zero_point: np.ndarray, scheme: QuantScheme) -> None:
    """The float zero point's :func:`check_grid`: ``ValueError`` unless every scale is finite and > 0, every zero
    point (offset) is finite, and both ends of the grid, ``zero_point`` and ``qmax * scale + zero_point``, are
    finite in float32 (between them every code dequantizes to a finite float32).

    >>> import numpy as np; from qcore import QuantScheme
    >>> check_float_grid(np.array([1.0], np.float32), np.array([np.nan], np.float32), QuantScheme(4, False))
    Traceback (most recent call last):
    ...
    ValueError: zero_point nan at index (0,) is not finite (float zero point)
    """
    scale, zp = np.asarray(scale), np.asarray(zero_point)
    if scale.size == 0:
        return
    check_grid(scale, None, scheme)  # scales finite and > 0
    bad = ~np.isfinite(zp)
    if bad.any():
        idx = _first(bad)
        raise ValueError(f"zero_point {float(zp[idx]):.6g} at index {idx} is not finite (float zero point)")
    with np.errstate(over="ignore"):
        far = np.float32(scheme.qmax) * scale.astype(np.float32) + zp.astype(np.float32)
    over = ~np.isfinite(far)
    if over.any():
        idx = _first(over)
        raise ValueError(f"scale {float(scale[idx]):.6g} with zero_point {float(zp[idx]):.6g} at index {idx} makes "
                         f"code {scheme.qmax} dequantize to inf (float32 overflow)")


def _first(mask: np.ndarray) -> tuple:
    """Index of the first True of ``mask`` (a tuple; ``()`` for a 0-d mask)."""
    return tuple(int(i) for i in np.argwhere(mask)[0]) if mask.ndim else ()


def check_zero_point(zero_point: Optional[np.ndarray], scheme: QuantScheme) -> None:
    """``ValueError`` unless every zero point lies in ``0..qmax`` of ``scheme`` (uint8 storage holds up to 255).

    The one check of stored zero points: :meth:`QParams.check`, checkpoint readers and qtorch's
    ``load_state_dict`` all call it.

    >>> import numpy as np; from qcore import QuantScheme
    >>> check_zero_point(np.array([3, 16], np.uint8), QuantScheme(4, False))
    Traceback (most recent call last):
    ...
    ValueError: zero_point 16 at index (1,) is outside 0..15 for scheme asym int4 per-channel(axis=0)
    """
    if zero_point is None:
        return
    zp = np.asarray(zero_point)
    if zp.size and int(zp.max()) > scheme.qmax:
        idx = _first(zp > scheme.qmax)
        raise ValueError(f"zero_point {int(zp[idx])} at index {idx} is outside 0..{scheme.qmax} for scheme {scheme}")


def check_codes(codes: np.ndarray, scheme: QuantScheme, offset: int = 0) -> None:
    """``ValueError`` unless every ``code - offset`` lies in ``qmin..qmax`` of ``scheme``.

    ``offset``: what a stored code adds to the code (``2^(bits-1)`` for symmetric codes stored unsigned, as packed
    rows hold them). The one check of stored codes: :meth:`QuantizedArray.from_parts`, checkpoint readers and
    qtorch's ``load_state_dict`` all call it.

    >>> import numpy as np; from qcore import QuantScheme
    >>> check_codes(np.array([[0, -128]], np.int8), QuantScheme(8))
    Traceback (most recent call last):
    ...
    ValueError: code -128 is outside -127..127 for scheme sym int8 per-channel(axis=0) (first at index (0, 1))
    """
    c = np.asarray(codes)
    if not c.size:
        return
    lo, hi = int(c.min()) - offset, int(c.max()) - offset
    if lo >= scheme.qmin and hi <= scheme.qmax:
        return
    bad = lo if lo < scheme.qmin else hi
    idx = _first(c == bad + offset)
    raise ValueError(f"code {bad} is outside {scheme.qmin}..{scheme.qmax} for scheme {scheme} (first at index {idx})")


@dataclass(frozen=True, eq=False)
class QParams:
    """Scale and zero point of every group of ``scheme``: ``x ≈ (q - zero_point) * scale``.

    ``scale``: float32 of shape ``scheme.params_shape(x.shape)``; ``zero_point``: uint8 of the same shape, or
    ``None`` for a symmetric scheme; ``zero_point_kind``: one of :data:`ZERO_POINT_KINDS`. With
    ``zero_point_kind="float"`` (asymmetric schemes only) ``zero_point`` is float32 and the grid is
    ``x ≈ q * scale + zero_point``. The constructor checks
    structure only (NumPy scalars become 0-d arrays); :meth:`check` (run by :func:`qcore.quantize`) checks the
    values against an input shape.
    Unpacks as ``scale, zero_point``, the pair ``compute_qparams`` returned before this class existed.

    >>> import numpy as np; from qcore import QuantScheme, PerTensor
    >>> scale, zp = QParams(np.array(0.5, np.float32), None, QuantScheme(8, True, PerTensor()))
    >>> float(scale), zp
    (0.5, None)
    """

    scale: np.ndarray
    zero_point: Optional[np.ndarray]
    scheme: QuantScheme
    zero_point_kind: str = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, QuantScheme):
            raise TypeError(f"scheme must be a qcore.QuantScheme, got {type(self.scheme).__name__}")
        if self.zero_point_kind not in ZERO_POINT_KINDS:
            raise ValueError(f"zero_point_kind {self.zero_point_kind!r} is not supported; expected one of "
                             f"{ZERO_POINT_KINDS}")
        for name in ("scale", "zero_point"):  # a NumPy scalar (per-tensor parameters) is a 0-d array
            if isinstance(getattr(self, name), np.generic):
                object.__setattr__(self, name, np.asarray(getattr(self, name)))
        if not isinstance(self.scale, np.ndarray) or self.scale.dtype != np.float32:
            got = self.scale.dtype if isinstance(self.scale, np.ndarray) else type(self.scale).__name__
            raise TypeError(f"scale must be a float32 numpy.ndarray, got {got} (use .astype(np.float32))")
        if self.scheme.symmetric:
            if self.zero_point_kind != "int":
                raise ValueError(f"zero_point_kind {self.zero_point_kind!r} needs an asymmetric scheme, got "
                                 f"{self.scheme}")
            if self.zero_point is not None:
                raise ValueError(f"a symmetric scheme ({self.scheme}) has no zero_point (pass None)")
            return
        want = np.uint8 if self.zero_point_kind == "int" else np.float32
        if not isinstance(self.zero_point, np.ndarray) or self.zero_point.dtype != want:
            got = self.zero_point.dtype if isinstance(self.zero_point, np.ndarray) else type(self.zero_point).__name__
            kind = "" if self.zero_point_kind == "int" else " (zero_point_kind='float')"
            raise TypeError(f"zero_point of asymmetric scheme {self.scheme} must be a {np.dtype(want).name} "
                            f"numpy.ndarray{kind}, got {got}")
        if self.zero_point.shape != self.scale.shape:
            raise ValueError(f"zero_point shape {self.zero_point.shape} differs from scale shape {self.scale.shape}")

    def __iter__(self):
        return iter((self.scale, self.zero_point))

    def check(self, shape) -> None:
        """``ValueError`` unless these parameters fit an input of ``shape``: ``scale`` (and ``zero_point``) of
        ``scheme.params_shape(shape)``, zero points in ``0..qmax``, and :func:`check_grid` (a float zero point:
        :func:`check_float_grid`).

        >>> import numpy as np; from qcore import QuantScheme
        >>> QParams(np.ones(3, np.float32), None, QuantScheme(8)).check((4, 16))
        Traceback (most recent call last):
        ...
        ValueError: scale has shape (3,), but sym int8 per-channel(axis=0) needs (4,) for an input of shape (4, 16)
        """
        pshape = self.scheme.params_shape(tuple(shape))
        if self.scale.shape != pshape:
            raise ValueError(f"scale has shape {self.scale.shape}, but {self.scheme} needs {pshape} for an input "
                             f"of shape {tuple(shape)}")
        if self.zero_point_kind == "float":
            check_float_grid(self.scale, self.zero_point, self.scheme)
            return
        check_zero_point(self.zero_point, self.scheme)
        check_grid(self.scale, self.zero_point, self.scheme)

    def __repr__(self) -> str:
        return (f"QParams(scheme={self.scheme}, scale.shape={self.scale.shape}, "
                f"zero_point_kind={self.zero_point_kind!r})")


ParamsMethod = Callable[[np.ndarray, QuantScheme], QParams]
_METHODS: dict[str, ParamsMethod] = {}


def register_params_method(name: str, fn: Optional[ParamsMethod] = None):
    """Register ``fn(x, scheme) -> QParams`` under ``name`` (usable as a decorator); names are unique.

    ``x`` arrives checked: float32 or float64, finite, of a shape the scheme takes. The result is checked too
    (:meth:`QParams.check`), so a method cannot hand the kernels a shape or a grid they would misuse.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a params method name must be a non-empty str, got {name!r}")
    if fn is None:
        return lambda f: register_params_method(name, f)
    if not callable(fn):
        raise TypeError(f"params method {name!r} must be callable, got {type(fn).__name__}")
    if name in _METHODS:
        raise ValueError(f"params method {name!r} is already registered")
    _METHODS[name] = fn
    return fn


def params_method(name: str) -> ParamsMethod:
    """The function registered under ``name``; ``ValueError`` listing the registered names otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown params method {name!r}; registered: {params_methods()}") from None


def params_methods() -> tuple[str, ...]:
    """Names of the registered params methods, sorted.

    >>> params_methods()
    ('hqq', 'minmax', 'mse')
    """
    return tuple(sorted(_METHODS))
