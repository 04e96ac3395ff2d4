"""``qtorch.compile``: torch.compile set up for quantized inference, in one call.

>>> import torch, qtorch
>>> m = torch.nn.Sequential(qtorch.W8A16Linear(64, 32), torch.nn.ReLU())
>>> cm = qtorch.compile(m)                    # nothing global is changed; compiles on the first call
>>> cm(torch.randn(2, 64)).shape
torch.Size([2, 32])

What it sets, for this compilation only (``torch.compile(options=...)`` patches inductor's config while it
compiles this model; the few settings the trace itself must see are set around each call and restored on
return, see :func:`_tracing_setup`):

* ``freezing=True``: parameters and buffers become graph constants, so inductor pre-packs dense weights (oneDNN)
  and can use its weight-only GEMM templates. It applies only without autograd, so the returned module runs its
  forward under ``torch.no_grad()``. Like any frozen graph it holds the weights of the first call: change a
  weight in place and compile again. Codes stay codes: nothing that reads a quantized weight's int8/uint8 codes
  is constant-folded, so no full-precision copy of a quantized weight is ever made.
* ``max_autotune=True`` (``mode="max-autotune"`` without CUDA graphs on CPU): inductor benchmarks its C++ GEMM
  templates against the ATen kernels at each shape and keeps the faster one.

With max-autotune on CPU, ``qtorch.compile`` first moves every quantized weight that ``int8pack`` or ``int4pack``
can hold into that layout (:func:`_hold_template_layouts`: the eager layout choice times qtorch's own kernels, which
inductor cannot see into), so that inductor measures its template against the ATen kernel for that layer. The
state_dict and the outputs (within the dtype's tolerance) are the same in every layout.

Which op each quantized layout puts in the graph (CPU, bfloat16):

==============  ===============================================================================================
layout          traced op
==============  ===============================================================================================
``int8pack``    ``torch._weight_int8pack_mm`` with max-autotune (even where the eager dispatcher chose
                ``dequant_mm``): inductor's AMX / AVX-512 template, or the ATen kernel, whichever it measures faster
``int4pack``    ``torch._weight_int4pack_mm_for_cpu``: the same, with inductor's int4 template
``blocked``     qtorch's custom ops (``qtorch::gemm_blocked``, ``qtorch::tiles_blocked``): no template reads this
                layout
``canonical``   dequantize + ``F.linear``, or the ``qtorch::dequant_mm`` custom op; the codes stay int8/uint8
==============  ===============================================================================================

Measured with K = N = 4096, bfloat16, one thread, dense and quantized calls alternating, medians (Intel Xeon
with AMX, torch 2.13, a 2-core machine shared with other jobs): at 128 rows the template ran the int8 layer at
1.02-1.45x and the int4 layer at 0.99-1.38x of the frozen dense layer across four runs, where the ATen kernels
took about 7x longer than the template and ``dequant_mm`` ran at 0.61x of dense (0.40x at 16 rows). Folding is
kept off every 1-byte integer constant of the model, not only codes (a uint8 mask is then converted per call).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch._inductor.config as inductor_config
from torch import nn

__all__ = ["compile", "CompiledModule", "compile_options"]


def compile_options(device_type: str = "cpu", *, autotune: bool = True) -> dict:
    """The inductor options ``qtorch.compile`` passes for ``device_type``."""
    opts = {"freezing": True}
    if autotune:
        opts["max_autotune"] = True
        opts["coordinate_descent_tuning"] = True
        if device_type == "cuda":
            opts["triton.cudagraphs"] = True
    return opts


class CompiledModule(nn.Module):
    """A compiled model that runs without autograd (needed by freezing). ``_orig_mod`` is the model, as with
    ``torch.compile``; attribute access falls through to it."""

    def __init__(self, model: nn.Module, compiled, options: dict | None = None):
        super().__init__()
        self._orig_mod = model
        self.training = model.training
        object.__setattr__(self, "_compiled", compiled)
        opts = options or {}
        object.__setattr__(self, "_freezing", bool(opts.get("freezing")))
        object.__setattr__(self, "_woq", bool(opts.get("max_autotune")) and _device_type(model) == "cpu")

    def forward(self, *args, **kwargs):
        with torch.no_grad(), _tracing_setup(self._freezing, self._woq):
            return self._compiled(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_orig_mod"], name)


#: True while qtorch.compile traces for inductor with max-autotune on CPU: the layouts then emit PyTorch's
#: weight-only ops, for which inductor has GEMM templates (see :func:`woq_templates`).
_WOQ_TEMPLATES = False
# 1-byte integer tensors in a graph are quantization codes: never unpacked or dequantized at compile time
_CODE_DTYPES = (torch.int8, torch.uint8)


def woq_templates() -> bool:
    """Whether the current trace is ``qtorch.compile``'s with inductor's max-autotune on CPU, where inductor
    has weight-only GEMM templates for ``torch._weight_int8pack_mm`` and ``torch._weight_int4pack_mm_for_cpu``
    (AMX/AVX-512 C++ micro-kernels that read the int8 / int4 weight as a frozen constant and convert it tile by
    tile). Inductor benchmarks them against the ATen kernel at each shape and keeps the faster. The layouts
    read this to put that op in the graph instead of their own custom op."""
    return _WOQ_TEMPLATES


def _reads_codes(folder, node) -> bool:
    """Whether the fx ``node`` reads a 1-byte integer tensor (a weight's codes)."""
    for a in node.all_input_nodes:
        t = getattr(folder.module, a.target, None) if a.op == "get_attr" else None
        if t is None:
            t = a.meta.get("val")
        if isinstance(t, torch.Tensor) and t.dtype in _CODE_DTYPES:
            return True
    return False


@contextlib.contextmanager
def _tracing_setup(freezing: bool, woq: bool):
    """What the trace and the compilation inside this call must see; everything is restored on return.

    * ``torch._inductor.config.freezing``: Dynamo turns the module's parameters and buffers into graph
      constants only when it is on *while it traces* (``options=`` reaches inductor later, as the graph
      compiles). Without it the weights stay graph inputs: nothing is frozen, and inductor neither pre-packs
      dense weights nor offers its weight-only GEMM templates (they need the weight as a constant).
    * Freezing constant-folds whatever depends on constants only: a layer that dequantizes its codes in the
      graph (the portable path) would get a full-precision copy of its weight as a constant. Nodes that read
      1-byte integer tensors are kept out of folding, so codes stay codes.
    * :func:`woq_templates` answers True while tracing.
    """
    global _WOQ_TEMPLATES
    if not freezing:
        yield
        return
    from torch._inductor.constant_folding import ConstantFolder

    orig = ConstantFolder.__dict__["is_impure"]
    prev, prev_freezing = _WOQ_TEMPLATES, inductor_config.freezing
    ConstantFolder.is_impure = _keeping_codes(orig)
    _WOQ_TEMPLATES = woq
    inductor_config.freezing = True  # plain assignment: config.patch costs ~20 us per call
    try:
        yield
    finally:
        inductor_config.freezing = prev_freezing
        _WOQ_TEMPLATES = prev
        ConstantFolder.is_impure = orig


@functools.lru_cache(maxsize=None)
def _keeping_codes(is_impure):
    """``is_impure`` of inductor's constant folder, also true for a node that reads a weight's codes."""
    def keeping_codes(folder, node):
        return is_impure(folder, node) or (node.op == "call_function" and _reads_codes(folder, node))
    return keeping_codes


def _device_type(model) -> str:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device.type
    return "cpu"


#: layouts whose op inductor has weight-only GEMM templates for on CPU (AMX / AVX-512), most preferred first
TEMPLATE_LAYOUTS = ("int8pack", "int4pack")


def _hold_template_layouts(model: nn.Module) -> list:
    """Move every quantized weight that a template layout can hold into it; returns the layers moved.

    Under max-autotune inductor times its weight-only templates against the ATen kernel at each shape (a
    measurement on this machine), which it can do only for ops it knows; qtorch's own kernels are opaque custom ops
    to it (0.13-0.15x of compiled dense at 128 rows, bf16, for a blocked 4-bit layer; 0.99-1.38x in the int4pack
    layout). The run-time layout is an internal form: outputs stay within the dtype's tolerance of
    ``F.linear(x, dequantized_weight())`` and the state_dict is canonical either way."""
    moved = []
    for m in model.modules():
        w = getattr(m, "quantized_weight", None)
        dtype = getattr(m, "compute_dtype", None)
        if w is None or dtype is None or w.layout.name in TEMPLATE_LAYOUTS:
            continue
        for name in TEMPLATE_LAYOUTS:
            if w.hold_layout(name, dtype):
                moved.append(m)
                break
    return moved


def compile(model, *, fullgraph: bool = False, dynamic: bool | None = False, autotune: bool = True,
            backend: str = "inductor") -> CompiledModule:
    """Compile ``model`` (any ``nn.Module``, quantized layers included) for inference.

    Puts ``model`` in eval mode, and returns a :class:`CompiledModule` whose forward runs under ``no_grad``
    through ``torch.compile(model, backend="inductor", options=compile_options(...))``. Global torch and
    inductor settings are not modified. ``dynamic=False`` (the default) compiles once per input shape, so each
    number of rows gets its own kernel choice; pass ``dynamic=None`` to let torch decide. ``autotune=False``
    skips max-autotune (much faster compilation, e.g. for tests).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"qtorch.compile needs an nn.Module, got {type(model).__name__}")
    model.eval()
    device_type = _device_type(model)
    opts = compile_options(device_type, autotune=autotune) if backend == "inductor" else None
    if opts and opts.get("max_autotune") and device_type == "cpu":
        _hold_template_layouts(model)
    compiled = torch.compile(model, fullgraph=fullgraph, dynamic=dynamic, backend=backend, options=opts)
    return CompiledModule(model, compiled, opts)
