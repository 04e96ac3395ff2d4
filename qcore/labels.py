"""Short human labels of schemes, the one place that names a granularity in tables and help texts.

>>> from qcore import PerChannel, PerGroup, QuantScheme
>>> scheme_label(QuantScheme(4, False, PerGroup(128))), scheme_label(QuantScheme(8, True, PerChannel(0)))
('int4 asym g128', 'int8 sym per-channel')
"""

from __future__ import annotations

from typing import Any

from .scheme import PerChannel, PerGroup, PerTensor

__all__ = ["granularity_label", "scheme_label", "format_bytes"]


def granularity_label(granularity: Any) -> str:
    """``'per-tensor'``, ``'per-channel'`` or ``'g<size>'`` (the granularity's own ``label``); ``str()`` of
    anything else."""
    if isinstance(granularity, (PerTensor, PerChannel, PerGroup)):
        return granularity.label
    return str(granularity)


def scheme_label(scheme: Any) -> str:
    """``'int<bits> sym|asym <granularity label>'`` of a QuantScheme; ``'-'`` for None, ``str()`` of others."""
    if scheme is None:
        return "-"
    bits = getattr(scheme, "bits", None)
    if bits is None:
        return str(scheme)
    sym = "sym" if getattr(scheme, "symmetric", False) else "asym"
    return f"int{bits} {sym} {granularity_label(getattr(scheme, 'granularity', None))}"


def format_bytes(n: float, digits: int = 2) -> str:
    """A size in binary units, as the project writes sizes everywhere.

    >>> format_bytes(3 * 2**20), format_bytes(1536, digits=1), format_bytes(100)
    ('3.00 MiB', '1.5 KiB', '100 B')
    """
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024.0
    return f"{n} B"  # pragma: no cover
