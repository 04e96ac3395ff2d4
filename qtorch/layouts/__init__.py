"""Run-time weight layouts: one module per layout, a registry, and the policy that picks one for a weight.

A layer's quantized weight (:class:`qtorch.weight.QuantizedWeight`) is held in exactly one layout at a time;
``state_dict`` and saving convert back to the canonical form. Registered layouts, in registration order:

============  ==========================================================================================
layout        eligible (all CPU-only but ``canonical``)
============  ==========================================================================================
``blocked``   8 or 4 bits; per tensor, per output channel or groups along K; N % 16 == 0 (qtorch's kernels)
``int4pack``  bfloat16 layer, 4 bits, groups of 32/64/128/256 along K, N % 16 == 0 (PyTorch's kernel)
``int8pack``  bfloat16 layer, 8-bit symmetric per output channel, K % 16 == 0 (PyTorch's kernel)
``vnni``      4 bits, integer zero points, groups of a multiple of 8 up to 128 along K; N % 64 == 0 (AVX512-VNNI)
``vnni8``     8-bit symmetric per output channel or per tensor; N % 64 == 0, K % 64 == 0 (AMX-INT8)
``canonical`` everything, every device (dequantize + ``F.linear``)
============  ==========================================================================================

:func:`candidates` lists the eligible layouts of a weight (:func:`eligible`) in the order of preference; the layer
takes the first whose conversion succeeds. The order is decided on the user's machine (:func:`choose`): where two
or more layouts besides ``canonical`` can hold a CPU weight, a throwaway copy of the weight is converted into each
and timed on random inputs of the layer's dtype at one row (decoding), 16 rows and 128 rows (a prompt), each layout
at its fastest path (``Layout.paths``); the layout with the least time for a request (a 512-token prompt in 128-row
calls, one 16-row call and 128 one-row decoding steps, :data:`qtorch.autotune.REQUEST_CALLS`) comes first, and
within 10% of it the one never far behind the fastest at any of the three (:meth:`qtorch.autotune.Dispatcher.choose_layout`). The decision is kept per (shape, scheme, compute
dtype, threads) in the dispatcher's cache, for the process and on disk, so a model's layers of one shape measure
once per machine. ``QTORCH_LAYOUT=<name>`` forces a layout wherever it is eligible (an unknown name is an error).

Unmeasured (``QTORCH_AUTOTUNE=0``, under ``torch.compile`` tracing, off CPU) the static order of
:func:`default_policy` holds: registration order, PyTorch's kernels first where ``TORCH_PACK_KERNELS`` is on (every
CPU but AVX2 ones, from the measurements below). ``QTORCH_TORCH_PACK=1`` / ``0`` (deprecated) puts PyTorch's
kernels first / last without measuring.

>>> import torch, qcore
>>> from qtorch.layouts import WeightSpec, candidates
>>> spec = WeightSpec.of(qcore.QuantScheme(8, True, qcore.PerChannel(0)), out_features=30, in_features=64)
>>> [l.name for l in candidates(spec, torch.device("cpu"), torch.float32)]   # N = 30: no blocked tile
['canonical']

Within a layout, CPU calls of several rows have several paths: ``canonical`` and ``int8pack`` (both hold the
canonical codes) also offer ``dequant_mm`` (:mod:`~qtorch.layouts.dequant_path`), ``blocked`` offers ``tiles_act``
and ``tiles`` beside its own; the weight times them per row bucket and keeps the fastest (:mod:`qtorch.weight`,
:mod:`qtorch.autotune`).

Adding a layout: a module with a :class:`~qtorch.layouts.base.Layout` subclass (eligibility, conversion from and
to canonical codes, ``path`` and ``linear``; ``tuned`` and ``paths`` where it has more than one path) and one
:func:`register` call below.

Measurements behind it: development CPU (AMD EPYC, 2 cores, AVX2 without AVX-512/AMX, torch 2.13), K = N = 4096,
best-of-N ms (the 2 cores were shared with other jobs all session: single runs varied up to 5x):

====================================  =========  =========  ==========
kernel                                 rows = 1   rows = 16  rows = 128
====================================  =========  =========  ==========
dense F.linear float32                  2.9-3.4   12-60       46-170
dense F.linear bfloat16                 1.7-2.2   25-40       196-400
dense F.linear float16                  1.5       20          165
_weight_int8pack_mm bfloat16            0.99      8.4-10.6    73-130
_weight_int8pack_mm float32 / float16   22 / 8.6  262 / 214   1800 / 2200   (scalar fallback on AVX2)
_weight_int4pack_mm_for_cpu bfloat16    1.2       6-10.7      50-123
_weight_int4pack_mm_for_cpu f32 / f16   36 / 17   490 / 295   2100 / 3900   (scalar fallback on AVX2)
dequantize whole + F.linear (float32)   28-52     90-140      66-95
first numba kernel int8, float32 x      0.74-1.5  7.4-8       56-180
first numba kernel int4, float32 x      1.7-2.3   9-11        45-126
gemv (one row) int8 / int4, bf16 x      0.69-0.78 / 0.66-0.75 (right after a dense bf16 layer)
gemm int8 / int4, float32 x                       4.2 / 4.7   29 / 42
====================================  =========  =========  ==========

Crossovers recorded from these runs:

* One row: ``gemv`` beats both PyTorch kernels in bfloat16 right after a dense layer (same runs: int8 0.69 vs
  1.13 ms for ``_weight_int8pack_mm``; int4 0.75 vs 1.36 ms for ``_weight_int4pack_mm_for_cpu``). The first numba
  kernel lost to them (1.81 / 1.70 ms): its accumulators lived in memory, and its ``parallel=True`` pool (numba's
  libgomp, not torch's) waited for cores held by torch's spinning OpenMP workers. ``gemv`` runs on torch's team.
* 16 and 128 rows, bfloat16, blocked layout vs PyTorch's kernels (same runs): 8 bits 6.0 vs 6.6 ms and 48.6 vs
  58.2 ms; 4 bits 6.0 vs 8.2 ms and 42.4 vs 51.9 ms. So on AVX2 bfloat16 layers take the blocked layout at every
  row count (the static order there). PyTorch's float32/float16 versions of both kernels are scalar loops on
  AVX2 (8-20x slower than dense): never dispatched.
* Tiles of 128 columns vs 64 (same run): 9.5 vs 11.5 ms at 16 rows and 56 vs 65 ms at 128 rows for 8 bits; at one
  row equal once ``gemv`` reads whole 128-byte rows (0.705 vs 0.706 ms; two strided half-row passes took 0.86).
* ``gemm`` vs the first numba kernel (same runs, float32): 1.4-2.5x faster at every shape and row count measured
  (384x384 to 4096x4096, 2 to 128 rows), e.g. 4096x4096 at 128 rows 29 vs 59 ms (int8), 42 vs 58 ms (int4).
* ``gemm`` vs dequantized tiles + ``torch.mm`` (float32, same runs): ``gemm`` ahead up to 256 rows at 8 bits
  (4096x4096: 64 vs 84 ms at 256 rows; level at 512) and mostly at 4 bits (384x384: 0.71 vs 0.77 ms at 256 rows,
  4096x4096: 74 vs 62 ms); tiles ahead from 512 rows: the bound stays 256 rows.
* float32 matmul of dequantized weights beats bf16/fp16 dense matmul at >= 16 rows (no bf16/fp16 FMA on AVX2):
  the tiles and portable paths compute in float32 for every input dtype on CPU.
* dense float32 ``F.linear`` at 2..16 rows is irregular here (12-60 ms at 16 rows): MKL picks a GEMM path that
  is slower per row than its GEMV at 1 row.
"""

from __future__ import annotations

import os

import torch

from .. import autotune
from .base import Layout, WeightSpec
from .blocked import BLOCKED
from .canonical import CANONICAL
from .int4pack import INT4PACK
from .int8pack import INT8PACK
from .vnni import VNNI
from .vnni8 import VNNI8

__all__ = ["Layout", "WeightSpec", "register", "registered", "get", "eligible", "default_policy", "scheme_label",
           "choose", "candidates", "TORCH_PACK_KERNELS"]

# The unmeasured order only (the layout is measured where measuring is on): PyTorch's int8pack / int4pack kernels
# first, or the blocked layout's? On AVX2 the blocked ones won at every row count (development CPU, bench_linear.py,
# same runs: rows=1 0.69 vs 1.13 ms at 8 bits and 0.75 vs 1.36 ms at 4 bits; rows=128 48.6 vs 58.2 ms and 42.4 vs
# 51.9 ms).
TORCH_PACK_KERNELS = {"1": True, "0": False}.get(os.environ.get("QTORCH_TORCH_PACK", ""),
                                                 torch.backends.cpu.get_cpu_capability() != "AVX2")

_REGISTRY: dict = {}


def register(layout: Layout) -> Layout:
    """Add ``layout`` (a :class:`Layout` instance with a new ``name``); returns it. ``canonical`` stays last."""
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a qtorch.layouts.Layout instance, got {type(layout).__name__}")
    if not layout.name or layout.name in _REGISTRY:
        raise ValueError(f"layout name {layout.name!r} is empty or already registered ({sorted(_REGISTRY)})")
    _REGISTRY[layout.name] = layout
    return layout


def registered() -> tuple:
    """Every registered layout, in registration order."""
    return tuple(_REGISTRY.values())


def get(name: str) -> Layout:
    """The registered layout called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; registered: {sorted(_REGISTRY)}") from None


def eligible(spec: WeightSpec, device, compute_dtype: torch.dtype) -> list:
    """The layouts that can hold ``spec`` on ``device`` for a layer computing in ``compute_dtype``, in registration
    order, ``canonical`` (eligible everywhere) last."""
    device = torch.device(device)
    found = [lay for lay in _REGISTRY.values() if lay is not CANONICAL and lay.eligible(spec, device, compute_dtype)]
    return found + [CANONICAL]


def default_policy(found: list) -> list:
    """The static (unmeasured) order: registration order, PyTorch's own kernels first where ``TORCH_PACK_KERNELS``
    is on; ``canonical`` stays last."""
    if TORCH_PACK_KERNELS:
        return sorted(found, key=lambda lay: not lay.torch_kernels)  # stable: registration order within each kind
    return list(found)


def scheme_label(spec: WeightSpec) -> str:
    """The scheme part of a layout decision's key.

    >>> import qcore
    >>> scheme_label(WeightSpec.of(qcore.QuantScheme(4, False, qcore.PerGroup(128)), 4096, 4096))
    'w4a-group1-g128'
    """
    return f"w{spec.bits}{'s' if spec.symmetric else 'a'}-{spec.kind}{spec.axis}-g{spec.group}"


def _first(order: list, name: str) -> list:
    return sorted(order, key=lambda lay: lay.name != name)  # stable: the rest keep their order


def choose(spec: WeightSpec, device, compute_dtype: torch.dtype, trial=None) -> list:
    """The eligible layouts of ``spec``, most preferred first (``canonical`` is always among them, last unless
    forced), as decided on this machine.

    ``trial(layout)`` converts a throwaway copy of the weight into ``layout`` and returns ``{rows: {path:
    callable}}`` for :meth:`qtorch.autotune.Dispatcher.choose_layout`, or None when it cannot (its calls at
    :data:`~qtorch.autotune.COLD_ROWS` must read a weight out of cache by themselves, as the layer's trials do by
    rotating over copies: nothing is evicted for them); without it, nothing
    is measured: a kept decision, else the static order (for listing). In order of precedence: ``QTORCH_LAYOUT``
    where that layout is eligible; the deprecated ``QTORCH_TORCH_PACK``; the measured choice when two or more
    layouts besides ``canonical`` are eligible on CPU and measuring is on; the static order (:func:`default_policy`).
    """
    device = torch.device(device)
    order = default_policy(eligible(spec, device, compute_dtype))
    d = autotune.default_dispatcher()
    if d.forced_layout is not None:
        if d.forced_layout not in _REGISTRY:
            raise ValueError(f"QTORCH_LAYOUT={d.forced_layout!r} is not a registered layout; registered: "
                             f"{sorted(_REGISTRY)}")
        if any(lay.name == d.forced_layout for lay in order):
            return _first(order, d.forced_layout)
    if d.torch_pack is not None:
        return sorted(order, key=lambda lay: (lay is CANONICAL, lay.torch_kernels != d.torch_pack))
    timed = [lay for lay in order if lay is not CANONICAL]
    if len(timed) < 2 or device.type != "cpu":
        return order
    key = autotune.LayoutKey.make(spec.out_features, spec.in_features, scheme_label(spec), compute_dtype)
    if trial is None:
        name = d.cached(key) if d.measuring else None
    else:
        # (the trials' one-row calls rotate over copies of the weight: no eviction)
        name = d.choose_layout(key, {lay.name: (lambda lay=lay: trial(lay)) for lay in timed}, evict_rows=())
    return order if name is None else _first(order, name)


def candidates(spec: WeightSpec, device, compute_dtype: torch.dtype) -> list:
    """:func:`choose` without measuring: the eligible layouts, the kept (or forced) decision first, else in the
    static order. ``canonical`` is always among them."""
    return choose(spec, device, compute_dtype)


register(BLOCKED)
register(INT4PACK)
register(INT8PACK)
register(VNNI)
register(VNNI8)
register(CANONICAL)
