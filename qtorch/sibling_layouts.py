"""Layers that read the same input, and what holding them all in ``blocked`` is worth to a compiled model.

A transformer block feeds one tensor to several projections (attention's query, key and value; an MLP's gate and
up). Compiled, the ``blocked`` ones that read one row run as one call (:mod:`qtorch.siblings`), which costs less
than their calls apart. A choice of layouts shape by shape cannot see that: it held SmolLM2's 192x576 key and value
layers in ``int8pack`` (each faster alone), which left the query layer's call to itself. :func:`find_siblings`
finds the sets in one eager call of the model; :func:`settle` times each kind of set compiled, its layers as one
call and apart, and picks the layouts of the model's shape groups together: the per-shape races' request costs,
less what each set whose layers all hold ``blocked`` saves.

>>> import torch, qtorch
>>> class Block(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.q, self.k, self.o = (qtorch.W8A16Linear(64, 64) for _ in range(3))
...     def forward(self, x):
...         return self.o(self.q(x) * self.k(x))
>>> m = Block()
>>> [[name for name, layer in m.named_children() if layer in s] for s in find_siblings(m, torch.randn(1, 64))]
[['q', 'k']]
"""

from __future__ import annotations

import collections
import copy
import itertools
import types
import warnings
import weakref

import torch
from torch import nn

from .tune import layer_groups

__all__ = ["find_siblings"]

#: the most assignments of layouts to shape groups :func:`settle` weighs (2 ** the groups that may move to
#: ``blocked``; SmolLM2 has 4 shapes); past it each shape keeps its own race's layout
MOST_ASSIGNMENTS = 4096


def record(model: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """``(model(*args, **kwargs), sets)``: one eager call without autograd, and the sets of two or more quantized
    layers (:func:`qtorch.tune.layer_groups`' layers, of one scheme and compute dtype) whose input was the same
    tensor in it, in the order they ran."""
    group_of = {id(m): key for key, members in layer_groups(model).items() for m in members}
    found: list = []  # the sets, in the order their first layer ran
    current: dict = {}  # input key -> (a weak reference to the input, its set)

    def hook(module, inputs):
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor):
            return
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, group_of[id(module)][2:])
        ref, members = current.get(key, (None, None))
        if ref is None or ref() is None:  # a new input (an address is reused only once its tensor is gone)
            members = []
            current[key] = (weakref.ref(x), members)
            found.append(members)
        if all(m is not module for m in members):
            members.append(module)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if id(m) in group_of]
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, [members for members in found if len(members) >= 2]


def find_siblings(model: nn.Module, *args, **kwargs) -> list:
    """The sets of quantized layers of ``model`` (two or more, of one scheme and compute dtype) that read the same
    input tensor in ``model(*args, **kwargs)``, run once eagerly without autograd."""
    return record(model, args, kwargs)[1]


def _set_forward(self, *xs):
    return tuple(layer(x) for layers, x in zip(self.sets, xs) for layer in layers)


def _set_probe(members: list, copies: int, together: bool, options: dict):
    """``copies`` copies of the layers ``members`` (all in ``blocked``, each copy's layers reading an input of
    their own), compiled as the model is, the layers of a copy as one call (``together``) or apart."""
    from .compile import _PROBE_IDS, _compile_probe, _keep_paths

    code = _set_forward.__code__.replace(co_name=f"_set_forward_{next(_PROBE_IDS)}")  # (see compile._probe)
    cls = type("SiblingsProbe", (nn.Module,), {"forward": types.FunctionType(code, _set_forward.__globals__)})
    probe = cls()
    probe.sets = nn.ModuleList(nn.ModuleList(copy.deepcopy(m) for m in members) for _ in range(copies))
    for layers in probe.sets:
        for m in layers:
            if not m.quantized_weight.hold_layout("blocked", m.compute_dtype):
                raise ValueError("blocked cannot hold this weight")
            _keep_paths(m, (1,))
    return _compile_probe(probe.eval(), options, group=together)


def _set_runs(members: list, copies: int, together: bool, options: dict):
    """``{1: {"compiled": callable}}`` for :meth:`qtorch.autotune.Dispatcher.choose_layout`: a :func:`_set_probe`
    on random rows of the layers' dtype, one per copy; None when the probe cannot be built."""
    try:
        run = _set_probe(members, copies, together, options)
    except Exception:
        return None
    gen = torch.Generator().manual_seed(0)
    k, dtype = members[0].in_features, members[0].compute_dtype
    xs = [torch.randn(1, k, generator=gen).to(dtype) for _ in range(copies)]
    return {1: {"compiled": lambda: run(*xs)}}


def saving_ms(members: list, options: dict) -> float | None:
    """What one call of the set ``members`` saves, in ms, with its layers as one compiled call rather than apart
    (both ``blocked``, timed by the compiled probes' race at one row, over copies read from memory); None where it
    was not measured. Kept like the layout decisions (key ``layout|<sum of out>x<in>|compiled-siblings-...``)."""
    from . import autotune
    from .compile import PROBE_COPIES, probe_dispatcher
    from .layouts import scheme_label

    s = members[0].quantized_weight.spec
    outs = [m.quantized_weight.spec.out_features for m in members]
    label = f"compiled-siblings-{'+'.join(map(str, outs))}-{scheme_label(s)}"
    key = autotune.LayoutKey.make(sum(outs), s.in_features, label, members[0].compute_dtype)
    nbytes = sum(n * s.in_features * s.bits // 8 for n in outs)
    copies = min(PROBE_COPIES, autotune.rotation_copies(nbytes))
    d = probe_dispatcher()
    runs = {name: (lambda together=together: _set_runs(members, copies, together, options))
            for name, together in (("together", True), ("apart", False))}
    try:
        d.choose_layout(key, runs, rows=(1,), calls={1: copies})
    except Exception as e:  # neither probe ran: no saving is known
        warnings.warn(f"qtorch.compile: no probe of {key} ran ({type(e).__name__}: {e}); its layers are weighed "
                      f"one by one", RuntimeWarning, stacklevel=4)
        return None
    ms = (d.decisions().get(str(key)) or {}).get("ms") or {}
    if not all(isinstance(ms.get(f"{n}@1"), (int, float)) for n in runs):
        return None
    return ms["apart@1"] - ms["together@1"]


def settle(groups: dict, costs: dict, picks: dict, sets: list, options: dict, rows: tuple) -> dict:
    """:func:`qtorch.compile.choose_layouts`'s last step: the layouts of the shape groups (``groups``: key ->
    layers; ``picks``: key -> the per-shape choice; ``costs``: key -> {layout: request cost of one layer, ms}, for
    the groups the races timed), the groups of ``sets`` moved to ``blocked`` where that costs the model less: each
    set whose groups all hold ``blocked`` saves its :func:`saving_ms` per one-row call of a request (measured only
    for the kinds of set that a group not on ``blocked`` yet belongs to). Returns the new ``{key: layout}``
    (``picks`` where nothing is cheaper)."""
    from . import autotune

    if 1 not in rows or not sets:
        return picks
    group_of = {id(m): key for key, members in groups.items() for m in members}
    sets = [s for s in sets if all(id(m) in group_of for m in s)]
    kinds = collections.Counter(tuple(group_of[id(m)] for m in s) for s in sets)
    rep = {}
    for s in sets:
        rep.setdefault(tuple(group_of[id(m)] for m in s), s)
    saves = []
    for kind, count in kinds.items():
        if all(picks.get(g) == "blocked" for g in kind):  # nothing to decide
            continue
        if all("blocked" in costs.get(g, {}) or picks.get(g) == "blocked" for g in kind):
            ms = saving_ms(rep[kind], options)
            if ms:
                saves.append((set(kind), count * autotune.REQUEST_CALLS.get(1, 1) * ms))
    if not saves:
        return picks
    # a saving argues only for blocked: each group in a saving set may move there from its own choice, and no other
    # move is weighed (the races' tie rules stand, where a strict minimum would follow their timings' noise)
    free = sorted({g for kind, _ in saves for g in kind
                   if picks.get(g) != "blocked" and picks.get(g) in costs.get(g, {}) and "blocked" in costs[g]},
                  key=str)
    options_per = [(picks[g], "blocked") for g in free]
    if 2 ** len(free) > MOST_ASSIGNMENTS:
        warnings.warn(f"qtorch.compile: {len(free)} layer shapes in sets of layers that read one input, too many to "
                      f"weigh together; each keeps its own race's layout", RuntimeWarning, stacklevel=4)
        return picks

    def total(assign: dict) -> float:
        t = sum(len(groups[g]) * costs[g][assign[g]] for g in free)
        return t - sum(v for kind, v in saves if all(assign[g] == "blocked" for g in kind))

    best, best_t = picks, total(picks)
    for combo in itertools.product(*options_per):
        assign = {**picks, **dict(zip(free, combo))}
        t = total(assign)
        if t < best_t:
            best, best_t = assign, t
    return best
