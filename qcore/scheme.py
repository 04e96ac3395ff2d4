"""Quantization schemes: bit width, mode and granularity, validated when built.

A scheme is a frozen, hashable value. An inconsistent combination (bits=1 symmetric, a group size of 0, ...)
raises ``ValueError`` at construction, so every scheme that exists can be applied.

>>> s = QuantScheme(bits=4, symmetric=False, granularity=PerGroup(128))
>>> (s.qmin, s.qmax)
(0, 15)
>>> QuantScheme.from_dict(s.to_dict()) == s
True
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = ["PerTensor", "PerChannel", "PerGroup", "Granularity", "QuantScheme", "SCHEME_FORMAT_VERSION"]

#: Version of the dict/JSON form written by :meth:`QuantScheme.to_dict` (checkpoints store it).
SCHEME_FORMAT_VERSION = 1


def _check_int(name: str, value: Any) -> int:
    # bool is an int subclass; True as a bit width or axis is always a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


@dataclass(frozen=True)
class PerTensor:
    """One scale (and zero point) for the whole array."""

    #: the short name tables use (qcore.labels); :meth:`describe` is the full one messages use
    label = "per-tensor"

    def describe(self) -> str:
        return "per-tensor"

    def to_dict(self) -> dict:
        return {"type": "per_tensor"}


@dataclass(frozen=True)
class PerChannel:
    """One scale per index of ``axis`` (for a Linear weight ``[out, in]``, ``axis=0`` is per output channel)."""

    axis: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", _check_int("PerChannel axis", self.axis))

    label = "per-channel"

    def describe(self) -> str:
        return f"per-channel(axis={self.axis})"

    def to_dict(self) -> dict:
        return {"type": "per_channel", "axis": self.axis}


@dataclass(frozen=True)
class PerGroup:
    """One scale per run of ``size`` consecutive elements along ``axis``, inside each row; when ``size`` does not
    divide the axis, the last run of each row is shorter (``ceil(n / size)`` groups)."""

    size: int
    axis: int = -1

    def __post_init__(self) -> None:
        size = _check_int("PerGroup size", self.size)
        if size < 1:
            raise ValueError(f"PerGroup size must be >= 1, got {size}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "axis", _check_int("PerGroup axis", self.axis))

    @property
    def label(self) -> str:
        return f"g{self.size}"

    def describe(self) -> str:
        return f"per-group({self.size}, axis={self.axis})"

    def to_dict(self) -> dict:
        return {"type": "per_group", "size": self.size, "axis": self.axis}


Granularity = Union[PerTensor, PerChannel, PerGroup]
_GRANULARITIES = (PerTensor, PerChannel, PerGroup)


def _granularity_from_dict(d: Any) -> Granularity:
    if not isinstance(d, dict):
        raise ValueError(f"granularity must be a dict, got {d!r}")
    kind = d.get("type")
    args = {k: v for k, v in d.items() if k != "type"}
    table = {"per_tensor": (PerTensor, set()), "per_channel": (PerChannel, {"axis"}),
             "per_group": (PerGroup, {"size", "axis"})}
    if kind not in table:
        raise ValueError(f"unknown granularity type {kind!r}; expected one of {sorted(table)}")
    cls, allowed = table[kind]
    extra = set(args) - allowed
    if extra:
        raise ValueError(f"unexpected keys {sorted(extra)} for granularity {kind!r}")
    return cls(**args)


def _normalize_axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what} axis {axis} is out of range for an array of rank {ndim} "
                         f"(allowed {-ndim}..{ndim - 1})")
    return axis % ndim


@dataclass(frozen=True)
class QuantScheme:
    """How to quantize: ``bits`` in 1..8, ``symmetric`` or asymmetric, and a granularity.

    Symmetric codes are signed in ``[-(2^(b-1)-1), 2^(b-1)-1]`` with zero point 0; asymmetric codes are
    unsigned in ``[0, 2^b-1]`` with an integer zero point. Rounding is round-half-to-even.

    >>> QuantScheme(bits=8).qmin, QuantScheme(bits=8).qmax
    (-127, 127)
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = field(default_factory=lambda: PerChannel(axis=0))

    def __post_init__(self) -> None:
        bits = _check_int("bits", self.bits)
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")
        if bits == 1 and self.symmetric:
            raise ValueError("bits=1 symmetric has only the code 0; use symmetric=False for 1-bit quantization")
        if not isinstance(self.granularity, _GRANULARITIES):
            raise TypeError(f"unknown granularity {self.granularity!r}; expected PerTensor(), "
                            f"PerChannel(axis) or PerGroup(size, axis)")
        object.__setattr__(self, "bits", bits)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def code_dtype(self):
        import numpy as np
        return np.dtype(np.int8) if self.symmetric else np.dtype(np.uint8)

    def params_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``scale``/``zero_point`` for an input of ``shape`` (validates the shape first). A group size
        that does not divide the axis gives ``ceil(n / size)`` groups, the last one shorter (as compressed-tensors
        stores them).

        >>> QuantScheme(4, False, PerGroup(2)).params_shape((3, 8))
        (3, 4)
        >>> QuantScheme(4, False, PerGroup(128)).params_shape((3, 576))  # 4 groups of 128, then one of 64
        (3, 5)
        """
        self.validate_shape(shape)
        g = self.granularity
        if isinstance(g, PerTensor):
            return ()
        if isinstance(g, PerChannel):
            return (shape[_normalize_axis(g.axis, len(shape), "PerChannel")],)
        axis = _normalize_axis(g.axis, len(shape), "PerGroup")
        return tuple(-(-n // g.size) if i == axis else n for i, n in enumerate(shape))

    def validate_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` if this scheme cannot be applied to an array of ``shape``."""
        ndim = len(shape)
        if ndim == 0:
            raise ValueError("cannot quantize a 0-d array; reshape it to (1,) first")
        g = self.granularity
        if isinstance(g, PerChannel):
            _normalize_axis(g.axis, ndim, "PerChannel")
        elif isinstance(g, PerGroup):
            _normalize_axis(g.axis, ndim, "PerGroup")

    def to_dict(self) -> dict:
        """JSON-safe form, with a format version (see :meth:`from_dict`)."""
        return {"version": SCHEME_FORMAT_VERSION, "bits": self.bits, "symmetric": self.symmetric,
                "granularity": self.granularity.to_dict()}

    @classmethod
    def from_dict(cls, d: Any) -> "QuantScheme":
        if not isinstance(d, dict):
            raise ValueError(f"scheme must be a dict, got {type(d).__name__}")
        version = d.get("version", SCHEME_FORMAT_VERSION)
        if version != SCHEME_FORMAT_VERSION:
            raise ValueError(f"unsupported scheme format version {version!r}; this qcore reads version "
                             f"{SCHEME_FORMAT_VERSION}")
        extra = set(d) - {"version", "bits", "symmetric", "granularity"}
        if extra:
            raise ValueError(f"unexpected scheme keys {sorted(extra)}")
        missing = {"bits", "symmetric", "granularity"} - set(d)
        if missing:
            raise ValueError(f"scheme is missing keys {sorted(missing)}")
        try:
            return cls(bits=d["bits"], symmetric=d["symmetric"], granularity=_granularity_from_dict(d["granularity"]))
        except TypeError as e:  # a JSON file with "bits": "8" is a bad file, not a programming error
            raise ValueError(f"invalid scheme {d!r}: {e}") from None

    def __str__(self) -> str:
        return f"{'sym' if self.symmetric else 'asym'} int{self.bits} {self.granularity.describe()}"
