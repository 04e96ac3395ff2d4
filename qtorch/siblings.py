"""Sibling layers in compiled decoding: the blocked layers that read the same one-row input, as one op call and
one start of the thread team.

A transformer block feeds one input to several projections (attention's query, key and value; an MLP's gate and
up). Decoding one token, each is a small product whose kernel takes little more than the call around it: inside a
compiled graph each quantized layer is an op call (its dispatch and Python), then a start of the thread team and a
wait for its slowest thread. :data:`PASS`, an inductor post-grad pass, finds the one-row calls of the blocked
layout's inference ops (``qtorch::gemm_blocked_infer``, ``int8dot_blocked_infer``, ``bf16dot_blocked_infer``) that
read the same tensor with the same op, group size and width, and replaces each two or three of them by one
``qtorch::blocked_siblings2`` / ``blocked_siblings3`` call: its output holds the layers' outputs side by side, and
each layer's is a view of it. The call runs the layers' kept launches as one :class:`qtorch.gemv.Chain`. Each layer
keeps its own buffers and path; every output has the bits its own op gives. ``qtorch.compile`` passes it; for
plain ``torch.compile``, pass :func:`inductor_options`.

>>> from qtorch.siblings import PASS, inductor_options
>>> from qtorch.compile import compile_options
>>> inductor_options({"freezing": True})["post_grad_custom_post_pass"] is PASS  # torch.compile(m, options=...)
True
>>> compile_options("cpu")["post_grad_custom_post_pass"] is PASS  # what qtorch.compile passes
True
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from . import gemv, native_ops
from ._kept import ByTensor
from .layouts import blocked

__all__ = ["APART", "PASS", "SiblingsPass", "group_siblings", "inductor_options", "siblings_impl"]

#: the most layers one call takes (attention's query, key and value); a larger set takes several calls
MOST = 3


def _schema(n: int) -> str:
    weights = ", ".join(f"Tensor qweight{i}, Tensor scale{i}, Tensor zero_point{i}" for i in range(n))
    outs = ", ".join(f"int out_features{i}" for i in range(n))
    return f"blocked_siblings{n}(Tensor x, {weights}, int group_size, int bits, {outs}, bool dot) -> Tensor"


# the chain kept for the layers of each call, by its first layer's codes (one: a new set of launches replaces it)
_CHAINS = ByTensor()


def _chain(layers: list, launches: tuple, key: tuple, group_size: int, bits: int, k: int):
    kept = _CHAINS.get(layers[0][0])
    if kept is None:
        kept = _CHAINS[layers[0][0]] = {}
    chain = kept.get(key)
    if chain is None or chain.launchers != launches:
        try:
            chain = kept[key] = gemv.Chain(launches)
        except ValueError:  # codes of both signs: each layer by its own launch
            return None
        native_ops.register(chain.native, key[1], group_size, bits, key[0], k, layers)
    return chain


def siblings_impl(x: torch.Tensor, layers: list, group_size: int, bits: int, dot: bool) -> torch.Tensor:
    """``x[M, K]`` through every layer of ``layers`` (``(qweight, scale, zero_point, out_features)`` of the blocked
    layout, all of ``group_size`` and ``bits``), the outputs side by side: ``[M, sum of out_features]`` in
    ``x.dtype``, layer ``i``'s columns what ``gemm_blocked_impl(x, ..., dot=dot)`` returns for it. One row whose
    layers all have a kept launch goes by one :class:`qtorch.gemv.Chain`."""
    total = sum(n for *_, n in layers)
    if x.dim() == 2 and x.shape[0] == 1 and x.device.type == "cpu":
        launches = tuple(blocked.kept_launch(x, q, s, z, group_size, bits, dot) for q, s, z, _ in layers)
        chain = None if None in launches else _chain(layers, launches, (x.dtype, dot), group_size, bits, x.shape[1])
        if chain is not None:
            if x.stride(-1) != 1:
                x = x.contiguous()
            out = torch.empty((1, total), dtype=x.dtype, device="cpu")
            at, size, oas = out.data_ptr(), out.element_size(), []
            for *_, n in layers:
                oas.append(at)
                at += n * size
            chain(x.data_ptr(), oas)
            return out
    # (the first calls: each layer's op keeps its plan and launch)
    return torch.cat([blocked.gemm_blocked_impl(x, q, s, z, group_size, bits, n, dot=dot) for q, s, z, n in layers],
                     dim=1)


def _kernel(n: int):
    def run(x, *args):
        ops, (group_size, bits), outs, dot = args[:3 * n], args[3 * n:3 * n + 2], args[3 * n + 2:4 * n + 2], args[-1]
        layers = [(ops[3 * i], ops[3 * i + 1], ops[3 * i + 2], outs[i]) for i in range(n)]
        return siblings_impl(x, layers, group_size, bits, dot)

    def fake(x, *args):
        return x.new_empty((x.shape[0], sum(args[3 * n + 2:4 * n + 2])))

    return run, fake


_LIB = torch.library.Library("qtorch", "FRAGMENT")
for _n in range(2, MOST + 1):
    _LIB.define(_schema(_n))
    _run, _fake = _kernel(_n)
    _LIB.impl(f"blocked_siblings{_n}", _run, "CPU")
    torch.library.register_fake(f"qtorch::blocked_siblings{_n}", _fake, lib=_LIB)

#: views whose result is the same tensor whenever their arguments are the same nodes and values
_VIEWS = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def _ops() -> dict:
    q = torch.ops.qtorch  # (the ops layouts.blocked defines: {inference op: its dot flag})
    return {q.gemm_blocked_infer.default: False, q.int8dot_blocked_infer.default: True,
            q.bf16dot_blocked_infer.default: True}


def _source(node):
    """What the input ``node`` is, up to a view made alike: each layer reshapes its input itself, so siblings read
    distinct view nodes of one tensor."""
    if node.op == "call_function" and node.target in _VIEWS and not node.kwargs and len(node.args) == 2:
        shape = node.args[1]
        return (node.target, node.args[0], tuple(shape) if isinstance(shape, (list, tuple)) else shape)
    return node


def _one_row(node) -> bool:
    val = node.meta.get("val")
    return (isinstance(val, torch.Tensor) and val.dim() == 2 and isinstance(val.shape[0], int)
            and val.shape[0] == 1 and val.device.type == "cpu")


def group_siblings(graph: torch.fx.Graph) -> int:
    """Replace the one-row blocked inference op calls of ``graph`` that read the same tensor with the same op,
    group size and width, two or three at a time, by ``qtorch::blocked_siblings2`` / ``3`` calls and views of
    their outputs; return how many op calls were replaced."""
    ops = _ops()
    sets: dict = {}
    for node in graph.nodes:
        if (node.op == "call_function" and node.target in ops and len(node.args) == 7 and not node.kwargs
                and isinstance(node.args[0], torch.fx.Node) and _one_row(node.args[0])
                and all(isinstance(a, int) for a in node.args[4:7])):
            key = (_source(node.args[0]), node.target, node.args[4], node.args[5])
            sets.setdefault(key, []).append(node)
    order = {n: i for i, n in enumerate(graph.nodes)}
    replaced = 0
    for members in sets.values():
        while len(members) >= 2:
            take = members[:MOST] if len(members) != MOST + 1 else members[:2]  # (4 layers: 2 + 2)
            members = members[len(take):]
            first = take[0]
            # every operand must exist where the call goes, the first layer's place: a frozen constant read later
            # moves up (it depends on nothing); anything else leaves these layers apart
            later = [a for m in take[1:] for a in m.args[1:4] if isinstance(a, torch.fx.Node) and order[a] > order[first]]
            if any(a.op != "get_attr" for a in later):
                continue
            for a in later:
                first.prepend(a)
                order[a] = order[first] - 0.5
            replaced += _replace(graph, take, ops[first.target])
    if replaced:
        graph.lint()
    return replaced


def _replace(graph: torch.fx.Graph, take: list, dot: bool) -> int:
    first = take[0]
    x, group_size, bits = first.args[0], first.args[4], first.args[5]
    outs = [m.args[6] for m in take]
    args = (x, *[a for m in take for a in m.args[1:4]], group_size, bits, *outs, dot)
    op = getattr(torch.ops.qtorch, f"blocked_siblings{len(take)}").default
    with graph.inserting_before(first):
        call = graph.call_function(op, args)
        xval = x.meta.get("val")
        if xval is not None:
            call.meta["val"] = xval.new_empty((1, sum(outs)))
        start = 0
        for m, n in zip(take, outs):
            view = graph.call_function(torch.ops.aten.slice.Tensor, (call, 1, start, start + n))
            view.meta.update(m.meta)
            start += n
            m.replace_all_uses_with(view)
    for m in take:
        graph.erase_node(m)
    return len(take)


class SiblingsPass(CustomGraphPass):
    """:func:`group_siblings` as inductor's ``post_grad_custom_post_pass``, then the inference ops' C++ twins
    (:func:`qtorch.native_ops.swap`); ``group=False``: the twins only (keyed for inductor's caches by this file's
    contents and both)."""

    def __init__(self, group: bool = True):
        self.group = group

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.group:
            group_siblings(graph)
        if native_ops.swap(graph):  # the inference ops' C++ twins, where they could be built
            graph.lint()

    def uuid(self):
        # graphs with the C++ twins and without them are cached apart (a process without the library loaded must
        # never run a graph that calls them)
        native = ("native" if native_ops.library() is not None else "python") + ("" if self.group else "-apart")
        return get_hash_for_files((__file__, native_ops.__file__, native_ops.SOURCE)) + native.encode()


PASS = SiblingsPass()
#: the C++ twins without grouping: for compiled probes, whose copies of a layer all read one row (grouped, they
#: would time chains no model runs), and the siblings probe's layers kept apart
APART = SiblingsPass(group=False)


def inductor_options(options: dict | None = None) -> dict:
    """``options`` (for ``torch.compile(options=...)``) with :data:`PASS` as inductor's post-grad pass; a pass
    already there is kept (and this one not added)."""
    opts = dict(options or {})
    opts.setdefault("post_grad_custom_post_pass", PASS)
    return opts
