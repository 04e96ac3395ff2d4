"""``qtorch.tune_layouts``: each quantized layer shape's layout chosen by timing the model's own work, in place.

When a layer is built, its weight's layout is decided per shape, scheme and dtype by timing a throwaway copy alone
(:func:`qtorch.layouts.choose`: 1, 16 and 128 rows, the one-row calls rotating over copies of the weight). Inside a
model the conditions differ: the other layers' weights stream through the caches between two calls of a layer, the
interpreter's own state stays warm, each layout's Python per call counts as much as its kernel, and the layers run
one after another, so that a model whose shapes were decided one by one can alternate between kernels. Measured on
SmolLM2-135M (bfloat16, decoding, 2-core Xeon with AMX, every variant in one lockstep run): 8-bit layers all
``int8pack`` 1.54x of dense, all ``blocked`` 1.55x, the isolated choice (``blocked`` for 576x1536 only, ``int8pack``
for the other shapes) 1.47x; 4-bit layers all ``int4pack`` 1.98x, all ``blocked`` 1.63x, ``blocked`` for 576x1536
only 1.75x. Each shape timed alone was close (576x1536: ``blocked`` 31-34 against 33-35 us a call, hot); in the
model the switch between kernels cost 1.5-3 ms a step.

``tune_layouts(model, run)`` settles it on the workload itself. First the whole model: every kernel family that
all its groups can hold (PyTorch's ``int8pack``/``int4pack``, qtorch's ``blocked``) is timed against the layouts as
held, each by ``run()`` (one decoding step, one batch, a prompt and its answer: whatever the model will run),
alternating over ``rounds`` rounds, and the fastest by ``min_gain`` is where the groups start: one group at a time
cannot leave a family where a mix costs more than either (SmolLM2 w8a16, below). Then each group of layers sharing a
shape, scheme and dtype that more than one layout can hold is moved into each candidate in turn and timed the same
way; the median decides, the held layout keeping its place unless another is faster by ``min_gain``. Groups go
largest first, each tuned with the decisions before it in place. The
decision is kept for the shape like the built-in one (the process, and the dispatcher's file unless ``keep=False``),
so the layers of that shape built later on this machine take it too. Codes are converted exactly: outputs are those
of the same codes in any layout, within the dtype's rounding.

Without a workload to time, :func:`settle_layouts` (run by ``quantize_model`` and ``load_quantized`` on the whole
model) keeps the model on one kernel family where the per-shape timings themselves say that costs little: each
shape's race left its timings in the dispatcher, and a family (PyTorch's ``int8pack``/``int4pack``, or qtorch's
``blocked``) that holds every shape of the model for at most :data:`FAMILY_TIE` more than the per-shape choice
(request costs summed over the model's layers) replaces a mix, unless it leaves a shape further behind the fastest
layout at some row count than the shape's own choice does (beyond the races' tie, the regret they weigh).
SmolLM2's 8-bit shapes: one family within 2% of the mix, 1.54x of dense where the mix ran 1.47x (lockstep); one
model at a time, the whole of them on ``int8pack`` decoded at 1.51x and ran the prompt at 0.65x of dense, the mix
at 1.54x and 0.93x, ``blocked`` at 1.64x and 1.03x (its sibling layers decode as one launch, which no shape's
race sees: :func:`tune_layouts` finds it).

SmolLM2 w8a16 held on ``int8pack`` by the per-shape races: tuned group by group on a 41-token prompt and 16 new tokens
it stayed there (each group alone on ``blocked`` made the work slower); with the families tried first it moved
whole to ``blocked``: the prompt 54-55 against 90-93 ms, a decoding step 22.3-23.3 against 24.5-25.5 ms.

Cost: per family and per group candidate, ``2 * rounds`` untimed and timed calls of ``run``, plus the conversions.
SmolLM2's four groups of shapes took 4-5 s on 2 cores with one decoding step as ``run`` before the families were
tried, 28 s with a 41-token prompt and 16 new tokens as ``run`` and ``rounds=3``.

>>> import torch, qtorch
>>> model = torch.nn.Sequential(qtorch.W8A16Linear(64, 64), torch.nn.ReLU()).to(torch.bfloat16)
>>> x = torch.randn(1, 64, dtype=torch.bfloat16)
>>> picks = qtorch.tune_layouts(model, lambda: model(x), rounds=2, keep=False)
>>> list(picks), picks["64x64|w8s-channel0-g64|bfloat16"] in ("blocked", "int8pack")
(['64x64|w8s-channel0-g64|bfloat16'], True)
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["FAMILY_TIE", "layer_groups", "settle_layouts", "tune_layouts"]

#: how much more request time (summed over a model's layers, from the per-shape races' timings) one kernel family
#: may cost than the per-shape mix and still replace it: alternating between families cost 5-12% of a SmolLM2
#: decoding step on the AMX Xeon (8-bit 1.47x against 1.54x of dense, 4-bit 1.75x against 1.98x), a cost the
#: isolated timings do not see
FAMILY_TIE = 0.05


def layer_groups(model: nn.Module) -> dict:
    """``{(out, in, scheme label, compute dtype): [layers]}`` over the CPU quantized layers of ``model`` that hold an
    integer zero point (a float zero point has only the canonical layout)."""
    from .layouts import scheme_label

    groups: dict = {}
    for m in model.modules():
        w = getattr(m, "quantized_weight", None)
        dtype = getattr(m, "compute_dtype", None)
        if w is None or dtype is None or w.device.type != "cpu" or w.spec.zero_point_kind != "int":
            continue
        s = w.spec
        groups.setdefault((s.out_features, s.in_features, scheme_label(s), dtype), []).append(m)
    return groups


def _label(n: int, k: int, scheme: str, dtype: torch.dtype) -> str:
    return f"{n}x{k}|{scheme}|{str(dtype).removeprefix('torch.')}"


def _hold(members: list, name: str) -> bool:
    """Move every layer of ``members`` into the layout ``name``; False (and every layer back where it was) if one of
    them cannot hold it."""
    before = [m.quantized_weight.layout.name for m in members]
    for i, m in enumerate(members):
        if not m.quantized_weight.hold_layout(name, m.compute_dtype):
            for b, prev in zip(members[:i], before):
                b.quantized_weight.hold_layout(prev, b.compute_dtype)
            return False
    return True


def tune_layouts(model: nn.Module, run: Callable[[], Any], *, rounds: int = 5, min_gain: float = 0.02,
                 keep: bool = True, timer: Callable[[], float] = time.perf_counter) -> dict:
    """Choose, per group of quantized layers sharing a shape, scheme and compute dtype, the layout under which
    ``run()`` is fastest, by timing it in place, whole kernel families first (see the module docstring); returns
    ``{"out x in|scheme|dtype": layout}`` for the groups that had a choice, every layer of a group holding its pick.

    ``run``: a callable that runs the model as it will be used (one decoding step with its cache, a batch, a prompt
    and its answer); called under ``torch.no_grad()``, ``2 * rounds`` times for the layouts as held and for each
    other family every group can hold, and ``1 + 4 * rounds`` times per candidate layout of each group.
    ``min_gain``: the fraction by which another layout (or family) must beat the held one. ``keep``: keep the
    decisions for layers of these shapes built later (the process and the dispatcher's file), as the built-in
    choice does. ``QTORCH_LAYOUT`` (forced) and ``QTORCH_AUTOTUNE=0`` (no measuring) leave every layer where it is;
    the held layouts are returned.
    ``timer``: the clock read before and after each timed call (seconds); one that advances only while the model's
    own part of ``run`` runs times that part alone (the benchmarks step other models in between).
    If ``run`` raises, the groups being timed go back to their layouts and the error propagates.
    """
    from . import autotune, layouts

    if not isinstance(model, nn.Module):
        raise TypeError(f"tune_layouts needs an nn.Module, got {type(model).__name__}")
    if not callable(run):
        raise TypeError(f"run must be a callable that runs the model, got {type(run).__name__}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < 1:
        raise ValueError(f"min_gain must be a fraction in [0, 1), got {min_gain!r}")
    d = autotune.default_dispatcher()
    groups = []
    for (n, k, scheme, dtype), members in layer_groups(model).items():
        w = members[0].quantized_weight
        names = [lay.name for lay in layouts.eligible(w.spec, w.device, dtype) if lay.name != "canonical"]
        if len(names) > 1:
            size = sum(t.numel() * t.element_size() for m in members for t in m.quantized_weight.buffers.values()
                       if isinstance(t, torch.Tensor))
            groups.append((size, (n, k, scheme, dtype), members, names))
    groups.sort(key=lambda g: -g[0])  # the largest first: it moves the step the most
    picks = {_label(*key): members[0].quantized_weight.layout.name for _, key, members, _ in groups}
    if not groups or d.forced_layout is not None or not d.measuring:
        return picks

    def timed() -> float:
        t0 = timer()
        run()
        return timer() - t0

    with torch.no_grad():
        run()  # warm-up: kernels compile, paths are measured
        _tune_families(groups, run, timed, rounds, min_gain)
        for _, key, members, names in groups:
            held = members[0].quantized_weight.layout.name
            ms = {}
            try:
                for other in (nm for nm in names if nm != held):
                    if not _hold(members, other):
                        continue
                    samples: dict = {held: [], other: []}
                    for r in range(rounds):
                        for name in ((held, other) if r % 2 else (other, held)):
                            _hold(members, name)
                            run()  # untimed: the first call after a move builds the layers' kept calls
                            samples[name].append(timed())
                    med = {nm: statistics.median(v) for nm, v in samples.items()}
                    ms.update({nm: round(v * 1e3, 4) for nm, v in med.items()})
                    if med[other] < med[held] * (1 - min_gain):
                        held = other
                    _hold(members, held)
            except BaseException:
                _hold(members, held)
                raise
            picks[_label(*key)] = held
            if keep and ms:
                n, k, scheme, dtype = key
                entry = {"path": held, "ms": ms, "source": "model"}
                d.keep(autotune.LayoutKey.make(n, k, scheme, dtype), entry)
    return picks


def _family(layout) -> str:
    return "torch" if layout.torch_kernels else layout.name


def _hold_all(groups: list, names: list) -> bool:
    """Every group of ``groups`` into its layout of ``names``; False (every group back where it was) if one cannot."""
    before = [members[0].quantized_weight.layout.name for _, _, members, _ in groups]
    for i, ((_, _, members, _), name) in enumerate(zip(groups, names)):
        if not _hold(members, name):
            for (_, _, back, _), prev in zip(groups[:i], before):
                _hold(back, prev)
            return False
    return True


def _tune_families(groups: list, run: Callable[[], Any], timed: Callable[[], float], rounds: int,
                   min_gain: float) -> None:
    """Before the groups are tuned one by one: the whole model in each kernel family that every group can hold,
    timed against its layouts as held, alternating over ``rounds``; the fastest (by ``min_gain`` over the held
    ones) is where the groups then start. One group at a time cannot find it where a mix of families costs more
    than either: SmolLM2 w8a16 on the AMX Xeon, held on ``int8pack`` by the races, kept it group by group (each
    group alone on ``blocked`` made the step slower), while the whole model on ``blocked`` decoded in 22.3-23.2
    against 24.4-25.3 ms a step and ran its 41-token prompt in 55-61 against 89-95 ms."""
    from . import layouts

    if len(groups) < 2:
        return
    per_group = []
    for _, _, _, names in groups:
        fams: dict = {}
        for name in names:
            fams.setdefault(_family(layouts.get(name)), name)
        per_group.append(fams)
    start = [members[0].quantized_weight.layout.name for _, _, members, _ in groups]
    configs = {"held": start}
    for fam in sorted(set.intersection(*(set(f) for f in per_group))):
        names = [f[fam] for f in per_group]
        if names != start:
            configs[fam] = names
    if len(configs) < 2:
        return
    samples: dict = {c: [] for c in configs}
    try:
        for r in range(rounds):
            for c in (list(configs) if r % 2 else list(reversed(configs))):
                if not _hold_all(groups, configs[c]):  # a group cannot hold it after all: not a candidate
                    del configs[c], samples[c]
                    continue
                run()  # untimed: the first call after a move builds the layers' kept calls
                samples[c].append(timed())
            if len(configs) < 2:
                break
    except BaseException:
        _hold_all(groups, start)
        raise
    med = {c: statistics.median(v) for c, v in samples.items() if v}
    best = min(med, key=med.get)
    pick = best if "held" in med and med[best] < med["held"] * (1 - min_gain) else "held"
    _hold_all(groups, configs.get(pick, start))


def _regrets(ms: dict, names: list) -> dict:
    """``{layout: regret}`` from a race's timings ``ms`` (``"<layout>@<rows>"``) for the layouts of ``names`` timed at
    every row count of :data:`qtorch.autotune.LAYOUT_ROWS`: the largest ratio, over the row counts, of its time to the
    fastest of them at that count (the regret :meth:`~qtorch.autotune.Dispatcher.choose_layout` weighs).

    >>> _regrets({"a@1": 1.0, "a@16": 2.0, "a@128": 9.0, "b@1": 2.0, "b@16": 2.0, "b@128": 3.0}, ["a", "b"])
    {'a': 3.0, 'b': 2.0}
    """
    from . import autotune

    rows = autotune.LAYOUT_ROWS
    timed = [n for n in names if all(isinstance(ms.get(f"{n}@{r}"), (int, float)) for r in rows)]
    if not timed:
        return {}
    best = {r: max(min(ms[f"{n}@{r}"] for n in timed), 1e-9) for r in rows}
    return {n: max(ms[f"{n}@{r}"] / best[r] for r in rows) for n in timed}


def _within_regret(members: list, name: str, regrets: dict) -> bool:
    """Whether holding layout ``name`` leaves the shape group of ``members`` within the races' tie of the regret of
    the layout it holds (True where either was not timed at every row count: nothing to compare)."""
    from . import autotune

    held = regrets.get(members[0].quantized_weight.layout.name)
    mine = regrets.get(name)
    return held is None or mine is None or mine <= max(held, 1.0) * autotune.LAYOUT_TIE


def settle_layouts(model: nn.Module) -> dict:
    """Move ``model``'s quantized layers onto one kernel family where the per-shape races' own timings put that
    within :data:`FAMILY_TIE` of the per-shape choice (see the module docstring); returns ``{"out x in|scheme|dtype":
    layout}`` of the groups moved (empty: nothing moved).

    Only groups whose decision was raced on this machine (timings for every candidate at every row count) take
    part; a forced layout (``QTORCH_LAYOUT``), no measuring (``QTORCH_AUTOTUNE=0``) or a decision
    :func:`tune_layouts` measured in a model leaves the model as it is. The cost of a group in a layout is its
    layers' count times the request cost the race priced (:data:`qtorch.autotune.REQUEST_CALLS`); a family whose
    layout for a group has a regret (its largest ratio to the fastest layout at a row count) above the held one's
    by more than :data:`qtorch.autotune.LAYOUT_TIE` is not taken."""
    from . import autotune, layouts

    if not isinstance(model, nn.Module):
        raise TypeError(f"settle_layouts needs an nn.Module, got {type(model).__name__}")
    d = autotune.default_dispatcher()
    if d.forced_layout is not None or not d.measuring:
        return {}
    decisions = d.decisions()
    plans = []  # (key, members, {family: (layout name, cost)})
    for (n, k, scheme, dtype), members in layer_groups(model).items():
        w = members[0].quantized_weight
        found = [lay for lay in layouts.eligible(w.spec, w.device, dtype) if lay.name != "canonical"]
        entry = decisions.get(str(autotune.LayoutKey.make(n, k, scheme, dtype)))
        if len(found) < 2 or entry is None:
            continue
        if entry.get("source") == "model":  # measured in a model by tune_layouts: that settles it
            return {}
        ms = entry.get("ms") or {}
        costs = {}
        for lay in found:
            one = autotune.request_cost(ms, lay.name, autotune.LAYOUT_ROWS)
            if one is not None:
                cost = len(members) * one
                fam = _family(lay)
                if fam not in costs or cost < costs[fam][1]:
                    costs[fam] = (lay.name, cost)
        if len(costs) > 1:
            plans.append(((n, k, scheme, dtype), members, costs, _regrets(ms, [lay.name for lay in found])))
    held = {_family(layouts.get(m[0].quantized_weight.layout.name)) for _, m, _, _ in plans}
    if len(held) < 2:  # one family already (or nothing raced)
        return {}
    families = set.intersection(*(set(c) for _, _, c, _ in plans))
    # a family that puts a shape further behind the fastest layout at some row count than the shape's own choice
    # (by more than the races' tie) is no candidate: SmolLM2's 8-bit shapes, bfloat16, AMX Xeon, one model at a
    # time, moved whole onto int8pack (PyTorch's kernel: 1.8-2.1x the fastest at 128 rows) decoded at 1.51x of
    # dense and ran the 41-token prompt at 0.65x, where the races' mix gave 1.54x and 0.93x
    families = {f for f in families if all(_within_regret(members, costs[f][0], regrets)
                                           for _, members, costs, regrets in plans)}
    mixed = sum(min(c[1] for c in costs.values()) for _, _, costs, _ in plans)
    total = {f: sum(costs[f][1] for _, _, costs, _ in plans) for f in families}
    best = min(total, key=total.get, default=None)
    if best is None or total[best] > mixed * (1 + FAMILY_TIE):
        return {}
    moved = {}
    for key, members, costs, _ in plans:
        name = costs[best][0]
        if members[0].quantized_weight.layout.name != name and _hold(members, name):
            moved[_label(*key)] = name
    return moved
