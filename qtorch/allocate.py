"""Bits under a budget: choose each Linear layer's scheme so that the model fits a mean number of bits per weight
with the least total error.

For every layer :func:`qtorch.quantize_model` would quantize, each candidate scheme is tried on the layer's weight
and scored by the error it adds: with ``calibration``, the squared error of the layer's output on a bounded sample
of the inputs it saw (``||X (W - W_q)^T||^2``); without, the squared error of the weight (``||W - W_q||^2``).
Its cost is the bytes :func:`qcore.quantize` stores for it, codes plus scales plus zero points. The choice is a
small dynamic programme over the layers (a multiple-choice knapsack): the partial plans on the Pareto front of
(bytes, error), thinned to a grid of :data:`BUCKETS` byte buckets, so that the plan always fits, is optimal up
to that grid, and a larger budget never gives a larger total error.

>>> import torch, qtorch
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
>>> with torch.no_grad(): model[2].weight[:, ::50] *= 40   # a few large weights: layer 2 is the sensitive one
>>> plan = qtorch.allocate_bits(model, bits_per_weight=6.5, exclude=())
>>> dict(plan)
{'0': 'w4a16-g64', '2': 'w8a16'}
>>> report = qtorch.quantize_model(model, plan, exclude=())   # the plan is a {layer name: scheme} mapping
>>> [layer.status for layer in report.layers]
['quantized', 'quantized']
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

import qcore
from qcore.labels import format_bytes, scheme_label
from qcore.params import params_method

from .replace import DEFAULT_EXCLUDE, _build_plan, _to_numpy_f32, _weight_2d, resolve_scheme

__all__ = ["DEFAULT_CANDIDATES", "BitPlan", "LayerChoice", "allocate_bits"]

#: the schemes tried per layer when none are given: from about 8.1 down to about 4.3 bits per weight
DEFAULT_CANDIDATES = ("w8a16", "w4a16-g32", "w4a16-g64", "w4a16-g128")
#: input rows kept per layer (spread evenly over the calibration batches) to measure its output error
DEFAULT_SAMPLE_ROWS = 512


@dataclass(frozen=True)
class LayerChoice:
    """One layer of a :class:`BitPlan`: the scheme chosen, what it costs and the error it adds; ``options``
    holds every candidate's ``(label, bytes, error)``."""

    name: str
    shape: tuple[int, int]
    label: str
    scheme: qcore.QuantScheme
    nbytes: int
    error: float
    options: tuple[tuple[str, int, float], ...] = ()

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.weights, 1)


@dataclass(frozen=True)
class BitPlan(Mapping):
    """The outcome of :func:`allocate_bits`: a mapping ``{exact layer name: scheme}`` that
    :func:`qtorch.quantize_model` takes as its scheme (values are the candidates as given, preset names or
    ``QuantScheme``), with the figures behind it. ``print(plan)`` shows a table with totals and the budget."""

    layers: tuple[LayerChoice, ...]
    bits_per_weight: float
    budget_bytes: int
    error_kind: str  # "output" (calibrated) or "weight"
    method: str = "minmax"
    _values: dict = field(default_factory=dict, repr=False, compare=False)

    def __getitem__(self, name: str):
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def weights(self) -> int:
        return sum(c.weights for c in self.layers)

    @property
    def total_bytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    @property
    def total_error(self) -> float:
        return float(sum(c.error for c in self.layers))

    @property
    def achieved_bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / max(self.weights, 1)

    def __str__(self) -> str:
        rows = [(c.name, f"{c.shape[0]}x{c.shape[1]}", c.label, f"{c.bits_per_weight:.3f}", f"{c.error:.4g}")
                for c in self.layers]
        head = ("layer", "shape", "scheme", "bits/weight", f"{self.error_kind} error")
        total = (f"total ({self.weights} weights)", "", format_bytes(self.total_bytes),
                 f"{self.achieved_bits_per_weight:.3f}", f"{self.total_error:.4g}")
        widths = [max(len(r[i]) for r in rows + [head, total]) for i in range(len(head))]
        line = lambda r: "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
        out = [line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows] + [line(total)]
        out.append(f"budget: {self.bits_per_weight:g} bits/weight = {format_bytes(self.budget_bytes)} "
                   f"({self.budget_bytes} bytes; planned {self.total_bytes}); params method {self.method!r}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return (f"BitPlan({len(self.layers)} layers, {self.achieved_bits_per_weight:.3f} of "
                f"{self.bits_per_weight:g} bits/weight, {self.error_kind} error {self.total_error:.4g})")


def _check_bits(bits_per_weight) -> float:
    if isinstance(bits_per_weight, bool) or not isinstance(bits_per_weight, numbers.Real):
        raise TypeError(f"bits_per_weight must be a number, got {type(bits_per_weight).__name__}: "
                        f"{bits_per_weight!r}")
    b = float(bits_per_weight)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"bits_per_weight must be a finite number > 0, got {bits_per_weight!r}")
    return b


def _candidates(candidates) -> list[tuple[str, Any, qcore.QuantScheme]]:
    """``[(label, value as given, scheme)]``, duplicates (same scheme) dropped."""
    if candidates is None:
        candidates = DEFAULT_CANDIDATES
    if isinstance(candidates, (str, qcore.QuantScheme)):
        candidates = [candidates]
    try:
        items = list(candidates)
    except TypeError:
        raise TypeError(f"candidates must be an iterable of preset names or qcore.QuantScheme, got "
                        f"{type(candidates).__name__}: {candidates!r}") from None
    if not items:
        raise ValueError("candidates is empty; give at least one scheme, e.g. candidates=['w4a16-g128']")
    out, seen = [], set()
    for c in items:
        scheme = resolve_scheme(c)
        if scheme not in seen:
            seen.add(scheme)
            out.append((c if isinstance(c, str) else scheme_label(scheme), c, scheme))
    return out


def _sample_inputs(model, modules: list, batches: list, rows: int) -> list:
    """A float32 ``[m, in_features]`` sample of each module's inputs: up to ``rows`` rows in all, spread evenly
    over the batches and evenly within each. Hooks are removed and the mode restored, whatever happens."""
    from .calibrate import _run

    per_batch = max(1, -(-rows // len(batches)))
    seen: list[list] = [[] for _ in modules]

    def hook(i):
        def pre(_module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"layer {modules[i][0]!r} was called without a tensor input")
            x = x.detach().reshape(-1, x.shape[-1])
            if x.shape[0] > per_batch:  # evenly spaced rows: every position of a sequence, not its first ones
                x = x[torch.linspace(0, x.shape[0] - 1, per_batch).round().long()]
            seen[i].append(x.to(device="cpu", dtype=torch.float32))
        return pre

    handles = [mod.register_forward_pre_hook(hook(i)) for i, (_, mod) in enumerate(modules)]
    training = model.training
    try:
        model.eval()  # no dropout while measuring what the layers see
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    out = []
    for (name, _), xs in zip(modules, seen):
        if not xs:
            raise ValueError(f"layer {name!r} saw no input while the calibration batches ran; allocate_bits "
                             f"cannot measure its output error (exclude it, or calibrate without it)")
        out.append(torch.cat(xs)[:rows])
    return out


#: the byte grid of the plan search: partial plans are told apart to 1/BUCKETS of the range of model sizes
BUCKETS = 1 << 14


def _choose(layers: list[list[tuple[int, float]]], budget: int) -> list[int] | None:
    """Index of the option chosen for each layer (options are ``(bytes, error)``): the least total error whose
    bytes fit ``budget``, or ``None`` when nothing fits.

    A dynamic programme over the layers. After each layer it keeps the partial plans on the Pareto front of
    (bytes, error), thinned to a grid of :data:`BUCKETS` buckets over the range of model sizes (per bucket, the
    plan with the least error and the one with the fewest bytes). Every plan keeps its exact bytes, so the choice
    always fits; the grid does not depend on the budget, so a larger budget never gives a larger error; a
    range under ``BUCKETS`` bytes is searched exactly.
    """
    lo = sum(min(b for b, _ in opts) for opts in layers)
    hi = sum(max(b for b, _ in opts) for opts in layers)
    unit = max(1.0, (hi - lo) / BUCKETS)
    nbytes, err = np.zeros(1, np.int64), np.zeros(1)
    floor = 0  # the fewest bytes of the layers so far: buckets count from there
    steps = []  # per layer: (parent plan, option) of each plan kept
    for opts in layers:
        ob = np.array([b for b, _ in opts], np.int64)
        oe = np.array([e for _, e in opts], np.float64)
        nb = (nbytes[:, None] + ob[None, :]).ravel()
        ne = (err[:, None] + oe[None, :]).ravel()
        parent = np.repeat(np.arange(nbytes.size), ob.size)
        option = np.tile(np.arange(ob.size), nbytes.size)
        floor += int(ob.min())
        key = np.floor((nb - floor) / unit).astype(np.int64)
        keep = []
        for a, b in ((ne, nb), (nb, ne)):  # per bucket: the least error, then the fewest bytes
            order = np.lexsort((option, parent, b, a, key))
            ks = key[order]
            keep.append(order[np.r_[True, ks[1:] != ks[:-1]]])
        keep = np.unique(np.concatenate(keep))
        nb, ne, parent, option = nb[keep], ne[keep], parent[keep], option[keep]
        order = np.lexsort((option, parent, ne, nb))  # Pareto front: error falls strictly as bytes grow
        best_before = np.minimum.accumulate(np.r_[np.inf, ne[order]])[:-1]
        front = order[ne[order] < best_before]
        nbytes, err = nb[front], ne[front]
        steps.append((parent[front], option[front]))
    fits = np.flatnonzero(nbytes <= budget)
    if not fits.size:
        return None
    i = int(fits[np.argmin(err[fits])])
    chosen = []
    for parent, option in reversed(steps):
        chosen.append(int(option[i]))
        i = int(parent[i])
    return chosen[::-1]


def allocate_bits(model: torch.nn.Module, bits_per_weight: float, *, calibration: Iterable | None = None,
                  candidates: Iterable | None = None, exclude=DEFAULT_EXCLUDE, include=None,
                  method: str = "minmax", sample_rows: int = DEFAULT_SAMPLE_ROWS) -> BitPlan:
    """Per layer, the candidate scheme that keeps the model within ``bits_per_weight`` on average, with the
    least total error; a :class:`BitPlan` that :func:`qtorch.quantize_model` takes as its scheme.

    bits_per_weight: the budget, ``bits_per_weight * weights / 8`` bytes over the layers planned (scales and
        zero points count: ``w4a16-g128`` costs 4.3125 bits per weight, ``w8a16`` 8 plus 32 per row).
    calibration: model inputs (tensors, tuples of positional arguments or dicts of keyword arguments); with
        them a layer's error is that of its output on up to ``sample_rows`` of the input rows it saw, else
        that of its weight.
    candidates: preset names or ``qcore.QuantScheme`` (default :data:`DEFAULT_CANDIDATES`).
    exclude, include: as for :func:`qtorch.quantize_model`; layers it could not quantize are left out.
    method: the qcore params method each candidate is measured with; pass the same to ``quantize_model``.

    The model is not modified (the calibration hooks are removed again). A budget below the cheapest plan is
    a ``ValueError`` naming the minimum.
    """
    bits = _check_bits(bits_per_weight)
    cands = _candidates(candidates)
    if not isinstance(method, str):
        raise TypeError(f"method must be the name of a qcore params method, got {type(method).__name__}")
    params_method(method)  # ValueError listing the registered names
    if isinstance(sample_rows, bool) or not isinstance(sample_rows, numbers.Integral) or sample_rows < 1:
        raise ValueError(f"sample_rows must be an int >= 1, got {sample_rows!r}")
    batches = None
    if calibration is not None:
        from .calibrate import calibration_list

        batches = calibration_list(calibration)
        if not batches:
            raise ValueError("calibration is empty: give at least one batch of model inputs, or None to "
                             "measure the weights' error")
    # the layers quantize_model would quantize, per candidate (a layer some candidate cannot serve skips it)
    jobs: dict[str, Any] = {}
    fits: dict[str, list[int]] = {}
    for ci, (_, _, scheme) in enumerate(cands):
        for job in _build_plan(model, scheme, exclude, include, "skip").jobs:
            if job.record.status == "planned":
                jobs.setdefault(job.record.name, job)
                fits.setdefault(job.record.name, []).append(ci)
    if not jobs:
        raise ValueError("the model has no Linear layer to quantize (after exclude/include); nothing to allocate")
    names = list(jobs)
    if batches is not None:
        samples = _sample_inputs(model, [(n, jobs[n].module) for n in names], batches, int(sample_rows))
    choices_in: list[tuple[str, tuple[int, int], list]] = []
    with torch.no_grad():
        for li, name in enumerate(names):
            job = jobs[name]
            w = np.ascontiguousarray(_to_numpy_f32(_weight_2d(job.module, job.record.kind)))
            options = []
            for ci in fits[name]:
                qa = qcore.quantize(w, cands[ci][2], params=method)
                diff = torch.from_numpy(qcore.dequantize(qa) - w)
                if batches is not None:
                    diff = samples[li] @ diff.t()
                options.append((int(qa.nbytes), float(diff.double().square().sum()), ci))
            choices_in.append((name, tuple(int(n) for n in w.shape), options))
    weights = sum(shape[0] * shape[1] for _, shape, _ in choices_in)
    budget = int(math.floor(bits * weights / 8))
    least = sum(min(b for b, _, _ in opts) for _, _, opts in choices_in)
    at = _choose([[(b, e) for b, e, _ in opts] for _, _, opts in choices_in], budget) if least <= budget else None
    if at is None:
        need = 8.0 * least / max(weights, 1)
        raise ValueError(f"bits_per_weight={bits_per_weight!r} is below the cheapest plan: every layer at its "
                         f"cheapest candidate needs {need:.4f} bits/weight ({least} bytes for {weights} weights); "
                         f"the minimum is bits_per_weight={math.ceil(need * 1e4) / 1e4}")
    layers, values = [], {}
    for (name, shape, opts), j in zip(choices_in, at):
        nbytes, err, ci = opts[j]
        label, value, scheme = cands[ci]
        layers.append(LayerChoice(name, shape, label, scheme, nbytes, err,
                                  tuple((cands[c][0], b, e) for b, e, c in opts)))
        values[name] = value
    return BitPlan(tuple(layers), bits, budget, "weight" if batches is None else "output", method, values)
