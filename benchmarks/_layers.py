"""What the benchmarks report about quantized layers: the forward path a call took, and the bytes a decode step reads.

A path is ``layout/kernel``: the run-time layout the layer holds (``blocked``, ``int4pack``, ``int8pack``,
``canonical``) and, for a call of ``rows`` rows, the kernel it runs:

* ``numba``: qtorch's own kernels on the blocked layout (``qtorch.gemv`` at one row, the numba gemm up to 256 rows);
  ``tiles``: dequantized tiles + matmul beyond that;
* ``int8pack`` / ``int4pack``: ``torch._weight_int8pack_mm`` / ``torch._weight_int4pack_mm_for_cpu``;
* ``dequant_mm``: blocks of rows dequantized into the activation dtype, then a oneDNN matmul;
* ``dense``: the whole weight dequantized, then one ``F.linear``.

Layouts with a choice (``canonical``, ``int8pack``) time their paths on the first call of each row bucket and keep
the faster; until such a call the path reads ``layout/?``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

import qtorch
from qtorch import autotune


def layer_path(layer, dtype: torch.dtype, rows: int, device_type: str = "cpu") -> str:
    """``layout/kernel`` that a CPU call of ``rows`` rows in ``dtype`` takes (or took) in ``layer``
    (a ``qtorch.QuantLinear`` or its ``QuantizedWeight``)."""
    w = getattr(layer, "quantized_weight", layer)
    lay, bits = w.layout, w.spec.bits
    own = lay.path(device_type, dtype, rows, bits)
    if lay.tuned:
        kept = w._routes.get((device_type, dtype, autotune.bucket_index(rows)))
        if kept is None:
            return f"{lay.name}/?"
        # a layer keeps its own path under the name `path()` gives (int8pack says "dense"); name what runs
        return f"{lay.name}/{lay.paths(device_type, dtype, rows, bits)[0] if kept == own else kept}"
    return f"{lay.name}/{own}"


def paths_by_shape(model: nn.Module, dtype: torch.dtype, rows: int) -> dict:
    """``{(out_features, in_features): {path: number of layers}}`` over the quantized layers of ``model``."""
    out: dict = defaultdict(lambda: defaultdict(int))
    for m in model.modules():
        if isinstance(m, qtorch.QuantLinear):
            out[(m.out_features, m.in_features)][layer_path(m, dtype, rows)] += 1
    return {k: dict(v) for k, v in out.items()}


def format_paths(model: nn.Module, dtype: torch.dtype, rows: int) -> str:
    """``576x576 int8pack/int8pack x60, 1536x576 ...``: the path per layer shape (out x in) at ``rows`` rows."""
    parts = []
    for (n, k), paths in sorted(paths_by_shape(model, dtype, rows).items()):
        parts.append(f"{n}x{k} " + " + ".join(f"{p} x{c}" for p, c in sorted(paths.items())))
    return ", ".join(parts) or "(no quantized layer)"


def sibling_groups(model: nn.Module) -> str:
    """``8 groups of 20 layers``: the groups of sibling layers that one launch runs in eager decoding
    (:mod:`qtorch.sibling_calls`), as the model's calls so far formed them."""
    groups, layers = set(), 0
    for m in model.modules():
        member = getattr(m, "_sibling", None)
        if member is not None:
            groups.add(id(member.group))
            layers += 1
    return f"{len(groups)} groups of {layers} layers" if groups else "none"


def prefetch_line() -> str:
    """How the one-row kernels read their codes on this machine, as measured here: how far ahead ``blocked/numba``
    prefetches per code width (:func:`qtorch.prefetch.distance`), and ``vnni``'s and ``vnni8``'s reads
    (:func:`qtorch.prefetch.vnni_reads`, :func:`qtorch.prefetch.vnni8_touch`); empty where none was measured."""
    from qtorch import prefetch

    known = prefetch.measured()
    if not known:
        return ""
    widths = {k: d for k, d in known.items() if isinstance(k, int)}
    parts = [f"{bits}-bit {d} B" for bits, d in sorted(widths.items())]
    if "vnni" in known:
        parts.append(f"vnni kernel {known['vnni']} B" + (", each line read twice" if known["vnni touch"] else ""))
    if "vnni8 touch" in known:
        parts.append("vnni8 one-row kernel: each line read " + ("twice" if known["vnni8 touch"] else "once"))
    return "one-row kernels' reads (measured on this machine): prefetch distance " + ", ".join(parts)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decoding step reads: every Linear's weight and bias (a quantized layer's codes plus the
    scale / zero tensors its kernel reads: the layout's derived ``aux`` where it has one, else ``scale`` and
    ``zero_point``), each storage once. Embedding rows, norms and the KV cache are left out (a few rows each)."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, qtorch.QuantLinear):
            w = m.quantized_weight
            b = w.buffers
            ts = [b["qweight"], m.bias] + ([w.aux] if w.aux is not None else [b["scale"], b.get("zero_point")])
        elif isinstance(m, nn.Linear):
            ts = [m.weight, m.bias]
        else:
            continue
        for t in ts:
            if t is not None and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += _nbytes(t)
    return total
