"""Activation-aware scales folded into a block before GPTQ (``method_options={"awq": True}``; by default for
layers of 4 bits or fewer).

For each set of layers in a block that read the same tensor, made by a norm of that block (a module without
children whose 1-D ``weight`` has the layers' input width: Llama's ``input_layernorm`` before q, k and v, its
``post_attention_layernorm`` before gate and up), :func:`qcore.awq.awq_scales` picks ``s [K]`` from the layers'
Hessians; the layers' weights are multiplied by ``s`` along their input axis and the norm's weight (and bias)
divided by it, so the block computes the same function before rounding, and each Hessian becomes
``H / (s s^T)``. A layer whose input no norm made (Llama's ``down_proj``, reading ``act(gate) * up``) takes its
scales in the rows of a layer beside it that ran before it, where dividing that layer's outputs by a scale is
seen to divide the consumer's inputs by the same scale (``up_proj``, not ``gate_proj``). After each fold the
block is run on a calibration batch: if its output moved by more than float32 rounding (the norm's output also
feeds something else, such as a post-norm encoder's residual), that fold is undone. A set whose best ``alpha``
is 0 is left alone.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from qcore.awq import awq_scales

__all__ = ["fold_block", "undo"]

#: largest change of the block's output, relative to its largest magnitude, accepted as float32 rounding
TOLERANCE = 1e-5


def _norm_like(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(w, torch.Tensor) and w.ndim == 1 and not any(True for _ in module.children())
            and not isinstance(module, nn.Linear))


def _shared_inputs(block: nn.Module, jobs: list, run: Callable[[], torch.Tensor]):
    """(the block's output, [(norm module, [job indices])], the job indices in the order they ran) from one run
    of the block."""
    seen_in: dict[int, torch.Tensor] = {}
    outs: list[tuple[nn.Module, torch.Tensor]] = []

    def pre(i):
        def hook(_module, args):
            if args and isinstance(args[0], torch.Tensor) and i not in seen_in:
                seen_in[i] = args[0]
        return hook

    def post(module, _args, out):
        if isinstance(out, torch.Tensor):
            outs.append((module, out))

    handles = [job.module.register_forward_pre_hook(pre(i)) for i, job in enumerate(jobs)]
    handles += [m.register_forward_hook(post) for m in block.modules() if _norm_like(m)]
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in handles:
            h.remove()
    sets = []
    for norm, out in outs:
        users = [i for i, x in seen_in.items() if x is out]
        if users and all(isinstance(jobs[i].module, nn.Linear) for i in users) \
                and norm.weight.numel() == jobs[users[0]].module.in_features:
            sets.append((norm, sorted(users)))
    return result, sets, list(seen_in)


def fold_block(block: nn.Module, jobs: list, hessians: list, run: Callable[[], torch.Tensor], *,
               grid: int = 10, kept: list | None = None) -> list[tuple[str, float]]:
    """Fold activation-aware scales into ``block`` (see the module's docstring); ``hessians[i]`` (a
    :class:`qcore.gptq.Hessian` of ``jobs[i]``) is rescaled in place. ``run()`` runs the block on a calibration
    batch and returns its output. Returns ``(first layer's name, alpha)`` per folded set; ``kept``: a list that
    gets ``(parameter, its value before)`` for every parameter a kept fold changed, in order (:func:`undo`)."""
    before, sets, order = _shared_inputs(block, jobs, run)
    in_sets = {i for _, users in sets for i in users}
    # a layer whose input is another layer's output times something (Llama's down_proj reads act(gate) * up):
    # the scales fold into the rows of a layer beside it (the same parent module) that ran before it and made
    # outputs of that width, tried in turn, kept where the block is unchanged
    ran = list(order)
    for d, job in enumerate(jobs):
        if d in in_sets or d not in ran or not isinstance(job.module, nn.Linear):
            continue
        parent = job.record.name.rpartition(".")[0]
        sets.append((None, [d], [u for u in ran[:ran.index(d)] if isinstance(jobs[u].module, nn.Linear)
                                 and jobs[u].record.name.rpartition(".")[0] == parent
                                 and jobs[u].module.out_features == job.module.in_features]))
    out = []
    with torch.no_grad():
        for item in sets:
            norm, users, producers = item if len(item) == 3 else (*item, None)
            h = hessians[users[0]].h
            ws = [jobs[i].module.weight.detach().to(torch.float32).cpu().numpy() for i in users]
            s, alpha = awq_scales(ws, h, jobs[users[0]].target.scheme, grid=grid)
            if alpha == 0:
                continue
            st = torch.from_numpy(s)
            targets = [None] if producers is None else \
                [u for u in producers if _passes_through(jobs[u].module, jobs[users[0]].module, run)]
            for producer in targets:
                shrink = [norm.weight] + ([norm.bias] if isinstance(getattr(norm, "bias", None), torch.Tensor)
                                          else []) if producer is None else \
                    [jobs[producer].module.weight] + ([jobs[producer].module.bias]
                                                      if jobs[producer].module.bias is not None else [])
                grow = [jobs[i].module.weight for i in users]
                saved = [(p, p.detach().clone()) for p in shrink + grow]
                try:
                    for p in shrink:  # a norm's weight [K], or a producer's rows [K, in] and bias [K]
                        p.div_(st.to(p.device, p.dtype).reshape(-1, *([1] * (p.ndim - 1))))
                    for p in grow:
                        p.mul_(st.to(p.device, p.dtype))
                    after = run()
                except BaseException:
                    _restore(saved)
                    raise
                moved = float((after.float() - before.float()).abs().max())
                if not moved <= TOLERANCE * max(float(before.float().abs().max()), 1e-30):
                    _restore(saved)
                    continue
                if kept is not None:
                    kept.extend(saved)
                inv = 1.0 / s.astype(np.float64)
                for i in users:
                    hessians[i].h *= np.outer(inv, inv)  # the layer's inputs are x / s now
                out.append((jobs[users[0]].record.name, alpha))
                break
    return out


def _passes_through(producer: nn.Linear, consumer: nn.Linear, run: Callable[[], torch.Tensor]) -> bool:
    """Whether dividing ``producer``'s output channels by a scale divides ``consumer``'s input channels by the
    same scale (``up_proj`` for ``down_proj``, which reads ``act(gate) * up``; not ``gate_proj``), tried with
    powers of two, whose products are exact."""
    t = 2.0 ** (torch.arange(producer.out_features) % 3 - 1).to(producer.weight.dtype)  # 1/2, 1, 2, 1/2...
    seen = []

    def hook(_module, args):
        if not seen:
            seen.append(args[0].detach().clone())

    params = [producer.weight] + ([producer.bias] if producer.bias is not None else [])
    saved = [(p, p.detach().clone()) for p in params]
    handle = consumer.register_forward_pre_hook(hook)
    try:
        run()
        before = seen.pop()
        for p in params:
            p.div_(t.to(p.device).reshape(-1, *([1] * (p.ndim - 1))))
        run()
        after = seen.pop()
    finally:
        handle.remove()
        _restore(saved)
    want = before / t.to(before.device, before.dtype)
    return bool(torch.allclose(after, want, rtol=1e-5, atol=1e-6 * float(want.abs().max())))


def undo(kept: list) -> None:
    """Put back the parameters that :func:`fold_block` changed (its ``kept`` list), last change first."""
    _restore(reversed(kept))
    kept.clear()


def _restore(saved) -> None:
    with torch.no_grad():
        for p, old in saved:
            p.copy_(old)
