"""Sibling layers in eager decoding: the quantized layers that read one row in turn (attention's query, key and
value; an MLP's gate and up), run as one start of the thread team.

Eager model code calls each projection by itself, so nothing joins them ahead of time. Instead each one-row call
of a quantized layer on its kept decoder notes its input; layers seen reading the very same tensor (the same
object, unchanged since: its version counter) one right after the other, the same run of them twice, become a
*group*: from then on the first one's call launches the whole group at once (:class:`qtorch.gemv.Chain` for the
blocked layout, :class:`qtorch.vnni.Chain` for vnni, :class:`qtorch.vnni8.Chain` for vnni8's one-row
``vpdpbusd`` path or its tiles; up to three layers of one kernel, one ``K`` and dtype), and the
others' calls return their output where they get that same tensor, unchanged, in the same order (tensors made under
``torch.inference_mode`` keep no version counter, so their calls never group). Anything else (an
input changed in place or another one, a member called out of turn or not at all, a weight replaced, a launch that
cannot go natively) makes those calls compute on their own, and a group that misses twice in a row is dissolved
for good; one whose weights were replaced or moved to another layout is dissolved, and forms again as before. Every output has the bits of the layer's own call. ``QTORCH_SIBLINGS=0`` turns the grouping off.

Why: a decoding step calls each layer's kernel for a few hundred microseconds, and each call's launch, its Python
on caches the weights just streamed through and the wait for its slowest thread cost tens of microseconds more
(see docs/performance.md).

>>> import torch, qtorch
>>> q = qtorch.W8A16Linear.from_linear(torch.nn.Linear(256, 128))
>>> k = qtorch.W8A16Linear.from_linear(torch.nn.Linear(256, 128))
>>> with torch.no_grad():
...     for _ in range(3):  # decoding steps: both layers read each step's x
...         x = torch.randn(1, 256)
...         y = (q(x), k(x))
>>> torch.equal(y[1], k(x))  # k's output as its own call gives it, grouped or not
True
"""

from __future__ import annotations

import os
import weakref

import torch

__all__ = ["ENABLED", "MOST", "Group", "Part", "observe"]

#: whether one-row calls are grouped (``QTORCH_SIBLINGS=0``: never)
ENABLED = os.environ.get("QTORCH_SIBLINGS", "1").strip() != "0"
#: layers one group launches at most (one native launch takes three: attention's query, key and value)
MOST = 3
#: rounds in a row that a group may miss before it is dissolved
MISSES = 2
#: runs in a row in which a layer read its input alone, after which it is no longer watched (its calls skip
#: :func:`observe`: attention's output and the MLP's down projection never have siblings)
LONELY = 8
#: ... until it has made this many calls more (a neighbour moved to a layout that chains may be its sibling now)
REWATCH = 256
#: ``Group.turn`` in a round whose launch did not run (no native launch now: the team capped on a busy machine, a
#: forked child; ``x`` not finite; another dtype): every member computes its own, and none of it is a miss
_SKIP = -1


class Part:
    """What one layer's decoder launches, for a group: ``kind`` (layers chain only with layers of the same kind:
    kernel, ``K``, dtype), ``unit`` (the launcher or plan its chain takes), ``valid()`` (whether the layer's
    buffers are still those the unit reads) and ``shapes`` (the output's shape by the input's dimensions)."""

    __slots__ = ("kind", "unit", "valid", "shapes", "dtype")

    def __init__(self, kind: tuple, unit, valid, shapes, dtype: torch.dtype):
        self.kind, self.unit, self.valid, self.shapes, self.dtype = kind, unit, valid, shapes, dtype


class _Member:
    """A layer's place in its group (``layer._sibling``). Copies and pickles of the layer get none: the group's
    launch reads this layer's buffers by address."""

    __slots__ = ("group", "index")

    def __init__(self, group: "Group", index: int):
        self.group, self.index = group, index

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return type(None), ()


def _launcher(parts: list):
    """``run(xa, oas) -> bool`` over the parts' units as one launch, or None where their kind has no chain."""
    family = parts[0].kind[0]
    units = [p.unit for p in parts]
    if family == "gemv":
        from .gemv import Chain

        chain = Chain(units)

        def run(xa, oas):
            chain(xa, oas)
            return True

        return run
    if family == "vnni":
        from .vnni import Chain

        return Chain(units)
    if family == "vnni8":
        from .vnni8 import Chain

        return Chain(units)
    return None


class Group:
    """Layers that read one row in turn, launched together by the first one's call (see the module docstring)."""

    __slots__ = ("members", "parts", "run", "dtype", "pending", "turn", "misses", "dissolved", "__weakref__")

    def __init__(self, members: list, parts: list, run):
        # the members weakly: they hold the group, and a model deleted is freed at once, with no cycle to collect
        self.members = [weakref.ref(m) for m in members]
        self.parts, self.run = parts, run
        self.dissolved = False
        self.dtype = parts[0].dtype
        self.pending = None  # (x, its version, the outputs) of the round under way
        self.turn = _SKIP  # the member whose call is due (formed mid-round: that round's calls go on apart)
        self.misses = 0
        for i, m in enumerate(members):
            m._sibling = _Member(self, i)

    def call(self, index: int, x: torch.Tensor):
        """Member ``index``'s output for the one row ``x``, or None: the member then computes it itself."""
        if index == 0:
            return self._lead(x)
        p = self.pending
        if p is None and self.turn == _SKIP:
            return None
        if p is None or p[0] is not x or p[1] != x._version or self.turn != index:
            self._miss()
            return None
        self.turn = index + 1
        if self.turn == len(self.members):
            self.pending = None
            self.misses = 0
        return p[2][index]

    def _lead(self, x: torch.Tensor):
        if self.pending is not None:  # the last round's outputs not all taken: a member was skipped
            self._miss()
            if self.dissolved:
                return None
        if x.dtype is not self.dtype or x.is_inference():  # (an inference tensor keeps no version: no round)
            self.turn = _SKIP
            return None
        parts = self.parts
        for p in parts:
            if not p.valid():  # a weight replaced or held in another layout: its unit reads the old buffers
                self.dissolve(refuse=False)  # (the calls' pattern still holds: they may group again)
                return None
        xc = x if x.stride(-1) == 1 else x.contiguous()
        d = x.dim()
        outs = [torch.empty(*p.shapes[d], dtype=self.dtype, device="cpu") for p in parts]
        if not self.run(xc.data_ptr(), [o.data_ptr() for o in outs]):
            self.turn = _SKIP  # (x not finite, or no native launch now: each computes its own)
            return None
        self.pending, self.turn = (x, x._version, outs), 1
        return outs[0]

    def _miss(self) -> None:
        self.pending, self.turn = None, _SKIP  # (the rest of the round goes apart: one miss a round)
        self.misses += 1
        if self.misses >= MISSES:
            self.dissolve()

    def dissolve(self, refuse: bool = True) -> None:
        """The members compute on their own from now on, and (``refuse``) never group again."""
        self.pending = None
        self.dissolved = True
        for ref in self.members:
            m = ref()
            if m is None:
                continue
            if getattr(m, "_sibling", None) is not None and m._sibling.group is self:
                m._sibling = None
            if refuse:
                _REFUSED[m] = True


# the run of one-row calls under way: the input (weakly), its version, and per call the layer (weakly) and its part
_RUN: list = [None, -1, []]
# per lead layer: the run of members last seen after it and how often in a row
_SEEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# layers whose group was dissolved: they stay apart
_REFUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def observe(layer, x: torch.Tensor, part: Part) -> None:
    """Note a one-row call of ``layer`` (not in a group) on ``x`` by its kept decoder, whose ``part`` this is: a run
    of layers on the
    same unchanged ``x`` seen twice in a row becomes a group."""
    if x.is_inference():  # no version counter: a change in place between two calls could not be seen
        return
    run = _RUN
    ref = run[0]
    if ref is not None and ref() is x and run[1] == x._version:
        if all(w() is not layer for w, _ in run[2]):
            run[2].append((weakref.ref(layer), part))
            return
    if len(run[2]) > 1:
        _close(run[2])
    elif run[2]:
        alone = run[2][0][0]()
        if alone is not None:
            alone._lonely = getattr(alone, "_lonely", 0) + 1
    run[0], run[1], run[2] = weakref.ref(x), x._version, [(weakref.ref(layer), part)]


def _close(calls: list) -> None:
    layers = [w() for w, _ in calls]
    parts = [p for _, p in calls]
    if any(m is None for m in layers) or parts[0] is None:
        return
    for m in layers:
        m._lonely = 0

    def joins(m, p):  # (a layer refused or in a group of its own ends the run that can group)
        return (p is not None and p.kind == parts[0].kind and m not in _REFUSED
                and getattr(m, "_sibling", None) is None)

    lead = layers[0]
    if not joins(lead, parts[0]):
        return
    n = 1
    while n < min(len(parts), MOST) and joins(layers[n], parts[n]):
        n += 1
    if n < 2:
        return
    key = tuple(id(m) for m in layers[:n])
    seen = _SEEN.get(lead)
    if seen is None or seen[0] != key:
        _SEEN[lead] = (key, 1)
        return
    del _SEEN[lead]
    try:
        run = _launcher(parts[:n])
    except ValueError:  # units the chain refuses: they stay apart
        run = None
    if run is None:
        for m in layers[:n]:
            _REFUSED[m] = True
        return
    Group(layers[:n], parts[:n], run)
