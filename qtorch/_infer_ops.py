"""Inference twins of qtorch's custom ops: the same kernel, registered without an autograd layer.

An op made by ``torch.library.custom_op`` has an input gradient, and every call of it, eager or from a compiled
graph, passes through that op's Python autograd layer and a wrapper that disables dynamo: about 20 us a call on a
2-core Zen 4 (a 1024x1024 4-bit bfloat16 one-row call, one thread: 94 against 73 us eager, 138 against 117 us
inside a compiled graph). A decoding step of a compiled model makes one such call per quantized layer. Where no
gradient can flow (grad mode off, or no input that requires one), qtorch's layers call the twin,
``qtorch::<name>_infer``: the same schema and kernel, defined with ``torch.library.Library``, with the same fake
for tracing. Opaque to ``torch.compile`` like the op itself, so freezing never folds a dequantized weight.

>>> import torch
>>> from qtorch.layouts import blocked   # defines qtorch::gemm_blocked and its twin
>>> str(torch.ops.qtorch.gemm_blocked_infer.default._schema).split("(")[0]
'qtorch::gemm_blocked_infer'
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

__all__ = ["constant_result", "define_twin", "needs_grad"]

_LIB = torch.library.Library("qtorch", "FRAGMENT")


def define_twin(name: str, kernel: Callable, fake: Callable):
    """Define ``qtorch::<name>_infer`` with the schema of the custom op ``qtorch::<name>`` (defined before), CPU
    kernel ``kernel`` and fake ``fake``; return its ``torch.ops`` packet."""
    schema = str(getattr(torch.ops.qtorch, name).default._schema)
    prefix = f"qtorch::{name}("
    if not schema.startswith(prefix):
        raise ValueError(f"unexpected schema of qtorch::{name}: {schema}")
    twin = f"{name}_infer"
    _LIB.define(twin + schema[len(prefix) - 1:])
    _LIB.impl(twin, kernel, "CPU")
    torch.library.register_fake(f"qtorch::{twin}", fake, lib=_LIB)
    return getattr(torch.ops.qtorch, twin)


# bound once: the checks below run on every decoding call of every layer (an attribute chain each otherwise)
IS_TRACING, DISPATCH_DEPTH = torch._C._is_tracing, torch._C._len_torch_dispatch_stack
WRAPPED, TRANSFORMS = torch._C._functorch.is_functorch_wrapped_tensor, torch._C._functorch.peek_interpreter_stack


def plain_eager(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` runs eagerly on a real tensor, so that a kernel may read ``x`` by its address: not
    under ``torch.compile``, ``torch.jit.trace``, a dispatch mode (``make_fx``, fake tensors) or a ``torch.func``
    transform (``vmap``, ``grad``: wrapped tensors have no storage, and a tensor made inside one may be wrapped even
    where ``x`` is not, as when only the bias is the transform's). Where it is not, the layers take their ops,
    which those all see."""
    return not (torch.compiler.is_compiling() or IS_TRACING() or DISPATCH_DEPTH() or WRAPPED(x)
                or TRANSFORMS() is not None)


def needs_grad(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` must record a gradient (then the custom op, else its twin or the kernel itself)."""
    return torch.is_grad_enabled() and x.requires_grad


def constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without importing Dynamo when it is not loaded yet: that import
    took about 1 s of ``import qtorch`` (a third of it), for a mark that only a trace reads, and a trace loads
    Dynamo first. The mark is the attribute Dynamo's own decorator sets (a test checks that it still does)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn
