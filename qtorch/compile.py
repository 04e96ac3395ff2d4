"""``qtorch.compile``: torch.compile set up for quantized inference, in one call.

>>> import torch, qtorch
>>> m = torch.nn.Sequential(qtorch.W8A16Linear(64, 32), torch.nn.ReLU())
>>> cm = qtorch.compile(m)                    # nothing global is changed; compiles on the first call
>>> cm(torch.randn(2, 64)).shape
torch.Size([2, 32])

What it sets, for this compilation only (``torch.compile(options=...)`` patches inductor's config while it
compiles this model and leaves the process-wide settings untouched):

* ``freezing=True``: parameters and buffers become constants, so inductor can pre-pack dense weights (oneDNN)
  and fold constant work. It applies only without autograd, so the returned module runs its forward under
  ``torch.no_grad()``.
* ``max_autotune=True`` (``mode="max-autotune"`` without CUDA graphs on CPU): inductor benchmarks its C++ GEMM
  templates against the ATen kernels and keeps the faster one.

The quantized layers keep their weights quantized under compilation: their CPU kernels are registered custom
ops (``qtorch::gemm_blocked``, ``qtorch::tiles_blocked``) that freezing cannot constant-fold into a
full-precision copy, and the forward has no data-dependent Python branch (``fullgraph=True`` works).
"""

from __future__ import annotations

import torch
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

    def __init__(self, model: nn.Module, compiled):
        super().__init__()
        self._orig_mod = model
        self.training = model.training
        object.__setattr__(self, "_compiled", compiled)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self._compiled(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_orig_mod"], name)


def _device_type(model) -> str:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device.type
    return "cpu"


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
    opts = compile_options(_device_type(model), autotune=autotune) if backend == "inductor" else None
    compiled = torch.compile(model, fullgraph=fullgraph, dynamic=dynamic, backend=backend, options=opts)
    return CompiledModule(model, compiled)
