"""What ``quantize_model`` / ``plan`` did (or would do) to each Linear layer of a model.

Every Linear-like layer of the model (``nn.Linear`` and transformers' GPT-2 style ``Conv1D``) gets exactly one
``LayerReport`` with a ``status``:

- ``"quantized"``  replaced by a quantized layer (``quantize_model``),
- ``"planned"``    would be replaced (``plan``, nothing changed),
- ``"excluded"``   matched an ``exclude`` pattern (``pattern`` says which),
- ``"not_included"`` matched no ``include`` pattern,
- ``"no_scheme"``  a scheme mapping gave it no scheme (no pattern matched, or the matching pattern maps to None),
- ``"incompatible"`` cannot be quantized with its scheme; ``reason`` says why (only with ``on_incompatible="skip"``:
  otherwise ``quantize_model`` raises before changing anything).

Nothing is skipped silently: every layer that stays dense carries a ``reason``.

    >>> import json, torch, qtorch
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Linear(64, 10))
    >>> _ = model[1].register_forward_hook(lambda m, i, o: None)      # a hooked layer is not replaced
    >>> report = qtorch.plan(model, "w4a16", on_incompatible="skip")
    >>> [(r.name, r.status) for r in report]
    [('0', 'planned'), ('1', 'incompatible')]
    >>> s = json.dumps(report.to_dict(), allow_nan=False)              # JSON-safe; print(report) is a table
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

from qcore.labels import scheme_label

from .memory import compression_ratio, dense_weight_nbytes, format_bytes, quantized_weight_nbytes

__all__ = ["LayerReport", "QuantizationReport", "scheme_label"]

QUANTIZED_STATUSES = ("quantized", "planned")
DENSE_STATUSES = ("excluded", "not_included", "no_scheme", "incompatible")


def _json_float(x: float | None):
    """JSON has no inf/nan: finite floats stay floats, the rest become the strings 'inf', '-inf', 'nan'."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _scheme_dict(scheme: Any):
    if scheme is None:
        return None
    to_dict = getattr(scheme, "to_dict", None)
    return to_dict() if callable(to_dict) else str(scheme)


@dataclass
class LayerReport:
    """One Linear-like layer: what happened to it, what it cost and what it saved.

    ``shape`` is ``(out_features, in_features)`` (GPT-2 ``Conv1D`` weights are reported transposed to that
    convention). ``bytes_before`` / ``bytes_after`` are the bytes of the layer's weight and bias; after quantizing
    they are measured on the new module, in a plan they are computed from ``qcore`` (packed codes + scales + zero
    points, bias unchanged). ``sqnr_db`` / ``max_abs_error`` compare the quantized weight to the dense one
    (``None`` for layers left dense).
    """

    name: str
    kind: str
    shape: tuple[int, int]
    dtype: str
    status: str
    scheme: Any = None
    target: str | None = None
    reason: str | None = None
    pattern: str | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    sqnr_db: float | None = None
    max_abs_error: float | None = None
    aliases: tuple[str, ...] = ()

    @property
    def is_quantized(self) -> bool:
        return self.status in QUANTIZED_STATUSES

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "status": self.status,
            "scheme": _scheme_dict(self.scheme),
            "scheme_label": scheme_label(self.scheme) if self.scheme is not None else None,
            "target": self.target,
            "reason": self.reason,
            "pattern": self.pattern,
            "bytes_before": int(self.bytes_before),
            "bytes_after": int(self.bytes_after),
            "sqnr_db": _json_float(self.sqnr_db),
            "max_abs_error": _json_float(self.max_abs_error),
            "aliases": list(self.aliases),
        }


@dataclass
class QuantizationReport:
    """Per-layer records plus totals; ``applied`` is False for a dry run (``qtorch.plan``).

    ``model_bytes_before`` / ``model_bytes_after`` are ``qtorch.memory_footprint`` of the whole model (all
    parameters and buffers, not only the Linear layers); in a plan the "after" figure is the prediction
    ``before - (sum of per-layer savings)``.
    """

    layers: list[LayerReport]
    applied: bool
    model_bytes_before: int
    model_bytes_after: int
    unused_patterns: list[str] = field(default_factory=list)
    seconds: float = 0.0

    # -- access -----------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        """The record of the layer called ``name`` (its main name or one of its aliases)."""
        for rec in self.layers:
            if rec.name == name or name in rec.aliases:
                return rec
        raise KeyError(f"no Linear layer named {name!r} in this report")

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.is_quantized]

    @property
    def skipped(self) -> list[LayerReport]:
        """Layers left dense, each with its reason."""
        return [r for r in self.layers if not r.is_quantized]

    @property
    def incompatible(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "incompatible"]

    # -- totals over the Linear layers ---------------------------------------------------------------------------
    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    @property
    def compression_ratio(self) -> float:
        """Dense bytes of the quantized weights / their quantized bytes (codes + scales + zero points), as
        :func:`qtorch.memory.compression_ratio` defines it for ``qtorch info`` too; biases and dense layers are
        not part of it. 1.0 when nothing is quantized."""
        dense = quantized = 0
        for r in self.quantized:
            if r.scheme is None:  # a layer class without a scheme: only its measured bytes are known
                dense, quantized = dense + r.bytes_before, quantized + r.bytes_after
            else:
                dense += dense_weight_nbytes(r.shape, r.dtype)
                quantized += quantized_weight_nbytes(r.shape, r.scheme)
        return compression_ratio(dense, quantized)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.layers:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def to_dict(self) -> dict:
        """JSON-safe (``json.dumps(report.to_dict(), allow_nan=False)`` works)."""
        return {
            "applied": self.applied,
            "layers": [r.to_dict() for r in self.layers],
            "counts": self.counts(),
            "totals": {
                "bytes_before": int(self.bytes_before),
                "bytes_after": int(self.bytes_after),
                "bytes_saved": int(self.bytes_saved),
                "compression_ratio": _json_float(self.compression_ratio),
                "model_bytes_before": int(self.model_bytes_before),
                "model_bytes_after": int(self.model_bytes_after),
            },
            "unused_patterns": list(self.unused_patterns),
            "seconds": _json_float(round(self.seconds, 4)),
        }

    # -- text ---------------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        head = ["layer", "out x in", "scheme", "before", "after", "SQNR dB", "max|err|", "note"]
        rows = []
        for r in self.layers:
            if r.is_quantized:
                note = r.target or ""
                if r.pattern:
                    note = f"{note} (scheme from {r.pattern!r})".strip()
            else:
                note = r.reason or ""
            rows.append([
                r.name,
                f"{r.shape[0]}x{r.shape[1]}",
                scheme_label(r.scheme) if r.is_quantized else f"dense: {r.status}",
                format_bytes(r.bytes_before),
                format_bytes(r.bytes_after),
                "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f}",
                "-" if r.max_abs_error is None else f"{r.max_abs_error:.3g}",
                note,
            ])
        rows.append([
            "total", "", "", format_bytes(self.bytes_before), format_bytes(self.bytes_after), "", "",
            f"quantized weights {self.compression_ratio:.2f}x smaller" if self.quantized else "nothing quantized",
        ])
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head[:-1])]

        def fmt(row):
            cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2])]
            cells += [row[i].rjust(widths[i]) for i in range(3, 7)]
            return "  ".join(cells + [row[7]]).rstrip()

        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items()) or "no Linear layers"
        title = "Quantization report" if self.applied else "Quantization plan (dry run, model unchanged)"
        lines = [f"{title}: {len(self.layers)} Linear layers ({counts})", fmt(head),
                 "  ".join("-" * w for w in widths) + "  ----"]
        lines += [fmt(row) for row in rows[:-1]]
        lines.append("  ".join("-" * w for w in widths) + "  ----")
        lines.append(fmt(rows[-1]))
        verb = "" if self.applied else " (predicted)"
        before, after = self.model_bytes_before, self.model_bytes_after
        pct = 100.0 * (before - after) / before if before else 0.0
        lines.append(f"model memory{verb}: {format_bytes(before)} -> {format_bytes(after)} (-{pct:.1f}%)")
        if self.unused_patterns:
            lines.append("patterns that matched no layer: " + ", ".join(repr(p) for p in self.unused_patterns))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"QuantizationReport(applied={self.applied}, layers={len(self.layers)}, counts={self.counts()}, "
                f"bytes {self.bytes_before} -> {self.bytes_after})")
