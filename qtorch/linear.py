"""Quantized drop-in replacements for ``nn.Linear``: integer weights, float activations.

The quantization math is qcore's (``qcore.quantize``); this module holds the result and runs the forward.
``y = x @ ((codes - zero_point) * scale).T + bias``, computed from the codes without ever keeping a
full-precision copy of the weight.

>>> import torch, qtorch
>>> lin = torch.nn.Linear(256, 64)
>>> q = qtorch.W4A16Linear.from_linear(lin)          # 4-bit asymmetric, groups of 128 along in_features
>>> x = torch.randn(3, 256)
>>> bool(torch.allclose(q(x), torch.nn.functional.linear(x, q.dequantized_weight(), q.bias), atol=1e-5))
True

State (``state_dict``), the canonical device-independent form, the same as qcore checkpoints (docs/checkpoint-format.md):

============  ===========================================================================================
key           content
============  ===========================================================================================
``qweight``   8 bits: the codes ``[out, in]`` themselves, int8 (-127..127) when symmetric, uint8 when
              asymmetric. 1..7 bits: uint8 ``[out, ceil(in*bits/8)]``, codes packed along ``in``, LSB first,
              signed codes stored with the offset ``2^(bits-1)`` (``QuantizedArray.packed()``).
``scale``     float32 in qcore's shape: ``()`` per tensor, ``(out,)`` per channel, ``(out, in/g)`` per group
``zero_point`` uint8, same shape as ``scale``; asymmetric schemes only
``bias``      the bias in the module's compute dtype, if the layer has one
============  ===========================================================================================

At run time the codes may be held in a kernel layout instead (:mod:`qtorch.layouts`; the layer's
:class:`~qtorch.weight.QuantizedWeight` is ``layer.quantized_weight``); ``state_dict``
converts back, ``load_state_dict`` validates every key (shape, dtype, value range) before changing anything, and
loads a layer's state all or nothing: a missing or unexpected key of the layer (``bias`` included) leaves it as it
was, with ``strict=False`` too (the keys are reported in the result). Loaded tensors are stored C-contiguous, whatever
their strides, and every scale must make every code dequantize to a finite float32.

The meta device works as for ``nn.Linear``: ``with torch.device("meta"):`` builds layers with no memory,
``load_state_dict(state, assign=True)`` then takes the state's tensors and device, ``to_empty(device=...)`` gives
a zero weight ready for ``load_state_dict``, and ``.to()`` out of meta raises (there is nothing to copy).
"""

from __future__ import annotations

import copy
import numbers
import warnings

import numpy as np
import torch
import torch.autograd.forward_ad as _FWAD
from torch import nn

import qcore
from qcore import PerChannel, PerGroup, QuantScheme

from . import sibling_calls
from ._infer_ops import DISPATCH_DEPTH, IS_TRACING, TRANSFORMS, WRAPPED
from ._torch_numpy import to_numpy
from .weight import QuantizedWeight, WeightSpec

__all__ = ["QuantLinear", "W8A16Linear", "W4A16Linear", "W8A16LinearLayer", "QWQALinearLayer", "QuantizedLinear",
           "COMPUTE_DTYPES"]

#: activation / compute dtypes the layers accept
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# bound once: read on every call of every layer
_ANY_AUTOCAST, _GRAD_ON = torch._C._is_any_autocast_enabled, torch.is_grad_enabled

W8_SCHEME = QuantScheme(bits=8, symmetric=True, granularity=PerChannel(axis=0))


def _check_features(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_bias(bias) -> bool:
    if bias is None or isinstance(bias, (bool, np.bool_)):
        return bool(bias)
    if isinstance(bias, torch.dtype):  # W8A16LinearLayer(in, out, torch.bfloat16): the dtype in the bias slot
        raise TypeError(f"bias must be True, False or None, got the dtype {bias}; pass it as dtype={bias}")
    hint = (" (a tensor: build the layer with bias=True, then layer.bias.copy_(values), or use from_linear)"
            if isinstance(bias, torch.Tensor) else "")
    raise TypeError(f"bias must be True, False or None (no bias), got {type(bias).__name__}{hint}")


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"dtype must be one of torch.float32, torch.float16, torch.bfloat16, got {dtype}")
    return dtype


def _canonical_copy(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A C-contiguous copy of ``t`` on ``device``: the layout the layer builds itself. PyTorch's kernels need it
    (``_weight_int8pack_mm`` refuses other strides) and the dense path sums in another order on other strides."""
    # clone(memory_format=...), not .to(memory_format=...): the latter keeps the strides when nothing else changes
    return t.detach().to(device=device, dtype=dtype).clone(memory_format=torch.contiguous_format)


def _canonical_view(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` itself where it is already C-contiguous on ``device`` in ``dtype`` (``assign=True``), else a copy."""
    return t.detach().to(device=device, dtype=dtype).contiguous()


def _autocast_input(x):
    """``x`` in the autocast dtype of its device where autocast is on there (``torch.autocast("cpu",
    dtype=torch.bfloat16)``), as ``nn.Linear`` computes under it: the layer then runs and returns that dtype."""
    # float64 is not cast, as autocast leaves it (the layer then refuses it by name)
    if isinstance(x, torch.Tensor) and x.dtype in COMPUTE_DTYPES and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        if dt in COMPUTE_DTYPES and x.dtype != dt:
            return x.to(dt)
    return x


def _func_derivative() -> bool:
    """Whether a ``torch.func`` derivative (``jvp``, ``grad``, ``vjp``, ``jacrev``...) is running, alone or under
    ``vmap`` (``vmap`` alone is not one)."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return any(i.key() != torch._C._functorch.TransformType.Vmap for i in stack)


def _differentiated(x: torch.Tensor) -> bool:
    """Whether ``x`` is a dual tensor of forward-mode AD (``torch.autograd.forward_ad``) or comes through a
    ``torch.func`` derivative (``jvp``, ``grad``, ``vjp``, ``jacrev``...), alone or under ``vmap``."""
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return _func_derivative()
    return _FWAD._current_level >= 0 and _FWAD.unpack_dual(x).tangent is not None


def _scale_needs_grad(buffers: dict) -> bool:
    """Whether autograd must record a gradient for the layer's scale or zero point (one requires it, grad mode on)."""
    s, z = buffers["scale"], buffers["zero_point"]
    return torch.is_grad_enabled() and (s.requires_grad or (z is not None and z.requires_grad))


def _scale_differentiated(buffers: dict) -> bool:
    """Whether a gradient with respect to the layer's scale or zero point is asked for: one requires grad (grad
    mode on), or is a tensor of a ``torch.func`` derivative (``grad``, ``jacrev``, ``jvp``...; ``vmap`` alone keeps
    the ops), as ``functional_call`` under one puts it there."""
    if _scale_needs_grad(buffers):
        return True
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and wrapped(t) for t in (buffers["scale"], buffers["zero_point"])) and _func_derivative()


class QuantLinear(nn.Module):
    """Linear layer with weights quantized by any qcore scheme (1..8 bits, any granularity).

    ``QuantLinear(in_features, out_features, bias=True, *, scheme, dtype=torch.float32, device=None)``.
    ``dtype`` is the compute dtype (activations, bias, output); ``.to(dtype)`` changes it, never the codes.
    Fill it with :meth:`quantize` or build it with :meth:`from_linear`. Until then the weight is zero.
    The weight is a :class:`~qtorch.weight.QuantizedWeight` (``quantized_weight``) that works on this module's
    buffers; the module builds, validates and quantizes, and its forward is ``weight.linear(x) + bias``.

    >>> import torch, qcore, qtorch
    >>> s = qcore.QuantScheme(bits=2, symmetric=False, granularity=qcore.PerGroup(32))
    >>> q = qtorch.QuantLinear(64, 16, scheme=s).quantize(torch.randn(16, 64))
    >>> tuple(q.state_dict()["qweight"].shape)                  # 64 codes of 2 bits -> 16 bytes per row
    (16, 16)
    """

    #: this layer's place in a group of sibling layers that one launch runs (:mod:`qtorch.sibling_calls`), or None;
    #: and the runs in a row in which it read its one-row input alone (watched for siblings up to ``LONELY``)
    _sibling = None
    _lonely = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scheme: QuantScheme,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        bias = _check_bias(bias)
        if not isinstance(scheme, QuantScheme):
            raise TypeError(f"scheme must be a qcore.QuantScheme, got {type(scheme).__name__}")
        try:
            scheme.validate_shape((self.out_features, self.in_features))
        except ValueError as e:
            raise ValueError(f"scheme {scheme} cannot quantize a weight of shape [out_features={out_features}, "
                             f"in_features={in_features}]: {e}") from None
        self.scheme = scheme
        self.compute_dtype = _check_dtype(dtype)
        # like nn.Linear: no device means the default one, so `with torch.device("meta"):` builds on meta
        device = torch.device(device) if device is not None else torch.get_default_device()
        for name in ("qweight", "scale", "zero_point"):
            self.register_buffer(name, None)
        # the weight fills this module's buffers (qweight, scale, zero_point) with a zero weight, canonical: every
        # path serves it; quantize() / load_state_dict() pick the layout
        self._w = QuantizedWeight(WeightSpec.of(scheme, self.out_features, self.in_features), self._buffers, device)
        self.register_buffer("bias", torch.zeros(self.out_features, dtype=dtype, device=device) if bias else None)

    # ------------------------------------------------------------------ canonical form
    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The layer's :class:`~qtorch.weight.QuantizedWeight` (it works on this module's buffers)."""
        return self._w

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (activations, bias, output)."""
        return self.compute_dtype

    @property
    def weight_layout(self) -> str:
        """The form the codes are held in: ``canonical``, ``blocked`` or ``int4pack`` (:mod:`qtorch.layouts`)."""
        return self._w.layout.holds

    def layout_candidates(self) -> list:
        """Names of the layouts that can hold this layer's weight on its device, most preferred first; the layer
        holds the first whose conversion succeeds (``quantized_weight.layout.name``)."""
        return self._w.candidates(self.compute_dtype)

    def _canonical(self):
        """(qweight, scale, zero_point) in the canonical form, whatever the run-time layout."""
        return self._w.canonical()

    # ------------------------------------------------------------------ quantization
    def quantize(self, weight) -> "QuantLinear":
        """Quantize ``weight`` (``[out_features, in_features]``, torch or NumPy, any float dtype) with qcore.

        Returns ``self``. The float weight is not kept.
        """
        if isinstance(weight, torch.Tensor):
            if not weight.is_floating_point():
                raise TypeError(f"weight must be a floating tensor, got dtype {weight.dtype}")
            if weight.device.type == "meta":
                raise ValueError(f"weight {list(weight.shape)} is on the meta device: it has no values to quantize. "
                                 "Load the float weights first, or build the layer on meta and fill it with "
                                 "load_state_dict(quantized_state, assign=True)")
            shape = tuple(weight.shape)
        else:
            weight = np.asarray(weight)
            if weight.dtype.kind != "f" and weight.dtype.name != "bfloat16":
                raise TypeError(f"weight must be a floating array, got dtype {weight.dtype}")
            shape = weight.shape
        want = (self.out_features, self.in_features)
        if shape != want:
            raise ValueError(f"weight has shape {list(shape)}, expected [out_features, in_features] = {list(want)}")
        w = to_numpy(weight) if isinstance(weight, torch.Tensor) else weight
        self._w.load_quantized_array(qcore.quantize(w, self.scheme), self.compute_dtype)
        return self

    def quantized_array(self) -> qcore.QuantizedArray:
        """The weight as a qcore :class:`~qcore.QuantizedArray` (NumPy, on CPU)."""
        return self._w.to_quantized_array()

    @classmethod
    def _resolve_scheme(cls, scheme):
        return QuantScheme() if scheme is None else scheme

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme | None = None) -> "QuantLinear":
        """A quantized copy of ``linear`` (same device; compute dtype = its weight dtype, float32 if unsupported).

        ``scheme`` defaults to the class's scheme (8-bit symmetric per channel for :class:`QuantLinear`).
        """
        if not isinstance(linear, nn.Linear) and not (hasattr(linear, "weight") and hasattr(linear, "in_features")):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        scheme = cls._resolve_scheme(scheme)
        w = linear.weight
        dtype = w.dtype if w.dtype in COMPUTE_DTYPES else torch.float32
        m = cls.__new__(cls)
        QuantLinear.__init__(m, linear.in_features, linear.out_features, linear.bias is not None, scheme=scheme,
                             dtype=dtype, device=w.device)
        m.quantize(w.detach())
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().to(dtype))
        return m

    @classmethod
    def from_quantized_array(cls, qa: qcore.QuantizedArray, bias=None, *, dtype: torch.dtype = torch.float32,
                             device=None) -> "QuantLinear":
        """A layer holding ``qa`` (``[out_features, in_features]``, validated by qcore), its codes converted once
        into the layout this layer runs; ``bias`` a tensor of ``out_features`` values or None.

        >>> import numpy as np, qcore, torch
        >>> qa = qcore.quantize(np.ones((16, 32), np.float32), qcore.QuantScheme(4, False, qcore.PerGroup(32)))
        >>> QuantLinear.from_quantized_array(qa)(torch.ones(1, 32))[0, :2]
        tensor([32., 32.])
        """
        if not isinstance(qa, qcore.QuantizedArray):
            raise TypeError(f"expected a qcore.QuantizedArray, got {type(qa).__name__}")
        if len(qa.shape) != 2:
            raise ValueError(f"a Linear weight is 2-D [out_features, in_features], got shape {list(qa.shape)}")
        n, k = qa.shape
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)):
            got = list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a tensor of shape [{n}] (out_features), got {got}")
        device = torch.device(device) if device is not None else torch.get_default_device()
        with torch.device("meta"):  # no zero weight to allocate: the array's values replace it
            m = cls.__new__(cls)
            QuantLinear.__init__(m, k, n, bias is not None, scheme=qa.scheme, dtype=dtype)
            if qa.zero_point_kind != "int":  # a float zero point (x = q * scale + zero_point): its own weight spec
                m._w = QuantizedWeight(WeightSpec.of(qa.scheme, n, k, zero_point_kind=qa.zero_point_kind),
                                       m._buffers, "meta")
        m._w.load_quantized_array(qa, m.compute_dtype, device=device)
        if bias is not None:
            m._buffers["bias"] = _canonical_copy(bias, device, m.compute_dtype)
        return m

    def kernel_nbytes(self) -> int:
        """Bytes of derived kernel data held besides the buffers: the bf16 scales of the bfloat16
        ``_weight_int8pack_mm`` (2 per output channel) and ``_weight_int4pack_mm_for_cpu`` (4 per group) paths,
        else 0. ``memory_footprint`` counts buffers only; add this for the exact resident size."""
        return self._w.kernel_nbytes()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(codes - zero_point) * scale`` as ``[out_features, in_features]`` (float32 math, then ``dtype``).

        ``dtype`` defaults to the compute dtype. Equal to ``qcore.dequantize`` of the same codes.
        """
        return self._w.dequantize(self.compute_dtype if dtype is None else dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if compiling or _ANY_AUTOCAST():  # (traced: Dynamo sees the autocast state itself)
            x = _autocast_input(x)
        # decoding (one row, on the CPU, no gradient, plain eager): the weight's decoder, the least Python per call
        # (a small model's step makes hundreds of these calls, each a few us of kernel); several rows: its runner
        # where the layout has one for the path of their row bucket (MiniLM's 104 x 384 calls: 66 us of Python
        # through linear() on a 32 x 64 layer, against 26 us for all of dense F.linear). The checks are those of
        # plain_eager, inline, and the kept call is looked up once: inside a model each call of Python here runs on
        # caches the kernels just streamed through (SmolLM2 w4a16-g64 decoding, lockstep: 24.18 -> 23.63 ms a step)
        if not compiling and isinstance(x, torch.Tensor) and x.is_cpu and x.dim() and x.size(-1) == self.in_features:
            run = self._w.kept_call(x)  # (None for a dtype no call has kept one for: the cheap test first)
            if (run is not None
                    and not (_GRAD_ON() and (x.requires_grad or _scale_needs_grad(self._buffers)))
                    and not (IS_TRACING() or DISPATCH_DEPTH() or WRAPPED(x) or TRANSFORMS() is not None)
                    and (_FWAD._current_level < 0 or _FWAD.unpack_dual(x).tangent is None)):
                bias = self._buffers["bias"]
                if x.numel() == self.in_features:
                    sib = self._sibling
                    y = None if sib is None else sib.group.call(sib.index, x)  # a group's launch ran it
                    if y is None:
                        y = run(x)
                        if sib is None and y is not None and sibling_calls.ENABLED:
                            lonely = self._lonely
                            if lonely < sibling_calls.LONELY:  # (a layer that may group, and not seen alone)
                                part = getattr(run, "part", None)
                                if part is not None:
                                    sibling_calls.observe(self, x, part)
                            else:  # watched again after REWATCH calls: its neighbours' layouts may have changed
                                # (into __dict__: nn.Module.__setattr__ cost 3.5 us of a small layer's 20-us call)
                                self.__dict__["_lonely"] = lonely + 1 if lonely < sibling_calls.REWATCH else 0
                    if y is not None:
                        if bias is not None:
                            y.add_(bias if bias.dtype == y.dtype else bias.to(y.dtype))
                        return y
                    self._w.drop_kept()  # the buffers were replaced: linear() rebuilds, then a new decoder
                elif not (bias is not None and _GRAD_ON() and bias.requires_grad):
                    y = self._w.run_rows(x, bias, run)
                    if y is not None:
                        return y
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"input dtype must be float32, float16 or bfloat16, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            got = "a 0-d tensor" if x.dim() == 0 else f"{x.shape[-1]} (input shape {list(x.shape)})"
            raise ValueError(f"input's last dimension must be in_features={self.in_features}, got {got}")
        if not compiling and _scale_differentiated(self._buffers):
            # a gradient with respect to the scale or zero point (one requiring grad, or torch.func's, swapped in by
            # functional_call): F.linear of the weight dequantized from them, which autograd and the transforms
            # differentiate (the kernels' ops carry no such gradient: torch.func's came back as zeros, and a scale
            # requiring grad failed in the kernel's NumPy view)
            bias = self._buffers["bias"]
            return nn.functional.linear(x, self.dequantized_weight(x.dtype),
                                        None if bias is None else bias.to(x.dtype))
        if not compiling and (_FWAD._current_level >= 0 or torch._C._functorch.is_functorch_wrapped_tensor(x)) \
                and _differentiated(x):
            # forward-mode AD and torch.func's derivatives (jvp, grad, jacrev...): F.linear of the dequantized
            # weight, which all of them differentiate. The kernels carry no tangent (a dual input's came back as
            # zeros) and the blocked layout's autograd.Function has no functorch rule; vmap alone keeps the ops
            bias = self._buffers["bias"]
            with torch._C._DisableFuncTorch():  # the weight is a constant of the transform: built outside it
                w = self.dequantized_weight(x.dtype)
            return nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
        bias = self._buffers["bias"]  # not self.bias: nn.Module.__getattr__ costs ~1.5 us per buffer
        if bias is not None and not compiling and not (torch.is_grad_enabled() and (x.requires_grad
                                                                                    or bias.requires_grad)):
            # nothing to differentiate: the weight adds it, where its kernel can as it stores its sums (one pass
            # over the output less: 104 x 1536 float32 sums on the AMX Xeon, 40 us a call)
            return self._w.linear(x, bias)
        y = self._w.linear(x)
        if bias is not None:
            if bias.dtype != y.dtype:  # .to() of the same dtype still costs ~1 us
                bias = bias.to(y.dtype)
            # y is the kernel's new tensor (Layout.linear): added in place, no second output to allocate and
            # write (the same sums as y + bias); autograd's graph keeps the out-of-place add
            y = y + bias if y.requires_grad else y.add_(bias)
        return y

    def _replicate_for_data_parallel(self):
        # nn.DataParallel's replica (torch.nn.parallel.replicate) shares this module's __dict__, then gets a
        # _buffers dict of its own and the buffers' copies on its device assigned into it: its weight must read
        # that dict, not this module's (every replica computed with device 0's tensors)
        replica = super()._replicate_for_data_parallel()
        w = copy.copy(self._w)  # no decoders (__getstate__): each is bound to the buffers it was made for
        w.buffers = replica._buffers
        w._routes = dict(self._w._routes)
        replica._w = w
        return replica

    # ------------------------------------------------------------------ device / dtype moves
    def _apply(self, fn, recurse=True):
        # Codes, scales and zero points move with the device only; only the bias (and the compute dtype)
        # follows a dtype change, so .to(torch.bfloat16) / .half() never round the scales.
        probe = fn(torch.zeros((), dtype=self.compute_dtype, device=self._w.device))
        if probe.is_floating_point() and probe.dtype != self.compute_dtype:
            _check_dtype(probe.dtype)
        new_device = probe.device
        old_device = self._w.device
        if old_device.type == "meta" and new_device.type != "meta":
            # only to_empty() gets here (.to() cannot copy out of meta: the probe above raised, as nn.Linear does).
            # There is nothing to move: the layer starts over from its zero weight, whose codes and scales are valid
            # for every path, and load_state_dict fills it.
            self._w.reset(new_device)
            if self._buffers["bias"] is not None:
                self._buffers["bias"] = torch.zeros(self.out_features, dtype=probe.dtype if probe.is_floating_point()
                                                    else self.compute_dtype, device=new_device)
        else:
            if new_device.type != old_device.type:
                self._w.to_canonical_layout()
            shared = new_device.type == "cpu" and probe.is_shared()  # share_memory(): every buffer, as it says
            for name, buf in list(self._buffers.items()):
                if buf is None:
                    continue
                if name == "bias":
                    self._buffers[name] = fn(buf)
                else:
                    self._buffers[name] = buf.share_memory_() if shared else buf.to(new_device)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        self._w.relayout(self.compute_dtype)
        return self

    # ------------------------------------------------------------------ state dict
    def _expected_state(self):
        spec = self._w.spec
        dt, shape = spec.qweight_spec
        exp = {"qweight": (dt, shape), "scale": (torch.float32, spec.pshape)}
        if not self.scheme.symmetric:  # integer zero points are uint8 codes; float ones (GGUF's Q4_1) float32
            exp["zero_point"] = (torch.uint8 if spec.zero_point_kind == "int" else torch.float32, spec.pshape)
        if self.bias is not None:
            exp["bias"] = (None, (self.out_features,))
        return exp

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        q, s, z = self._w.canonical()
        items = {"qweight": q, "scale": s, "zero_point": z, "bias": self.bias}
        for name, t in items.items():
            if t is not None:
                destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        exp = self._expected_state()
        got, errors = {}, []
        for name, (dt, shape) in exp.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            t = state_dict[key]
            if not isinstance(t, torch.Tensor):
                errors.append(f"{key}: expected a tensor, got {type(t).__name__}")
                continue
            want_dt = dt if dt is not None else "a floating dtype"
            ok_dt = t.dtype == dt if dt is not None else t.is_floating_point()
            if not ok_dt or tuple(t.shape) != tuple(shape):
                errors.append(f"{key}: expected {want_dt} of shape {list(shape)}, got {t.dtype} of shape "
                              f"{list(t.shape)} (scheme {self.scheme}, in_features={self.in_features}, "
                              f"out_features={self.out_features})")
                continue
            got[name] = t
        # assign=True (the way to fill a model built on meta): the layer takes the state's tensors and their device,
        # as nn.Linear does; otherwise it copies them onto its own device (a layer on meta stays there)
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        dev = got["qweight"].device if assign and "qweight" in got else self._w.device
        if dev.type != "meta":
            for name, t in got.items():
                if t.device.type == "meta":
                    errors.append(f"{prefix}{name}: is on the meta device, it has no data to load into this layer on "
                                  f"{dev} (assign=True takes meta tensors, and the layer moves to meta)")
        # the values that can be checked, by the weight's one validation
        real = {name: t for name, t in got.items() if t.device.type != "meta" and name != "bias"}
        value_errors, codes = self._w.check_state(real, prefix)
        errors.extend(value_errors)
        own_unexpected = []
        for key in state_dict:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                if "." not in rest and rest not in exp:
                    own_unexpected.append(key)
        unexpected_keys.extend(own_unexpected)
        error_msgs.extend(errors)
        # All or nothing: PyTorch passes strict=True here whatever the caller asked and raises only after every
        # module has loaded, so a layer cannot know whether a missing or unexpected key will fail the load; it
        # loads only a state that is exactly its own, so that a failed load changes nothing.
        if errors or own_unexpected or any(prefix + n not in state_dict for n in exp):
            return
        if dev.type == "meta" and not assign:
            for name in got:  # nn.Linear's warning: loading real tensors into meta ones copies nothing
                if got[name].device.type != "meta":
                    warnings.warn(f"for {prefix}{name}: copying from a non-meta parameter in the checkpoint to a meta "
                                  "parameter in the current model, which is a no-op. (Did you mean to pass "
                                  "`assign=True` to assign items in the state dictionary to their corresponding key "
                                  "in the module instead of copying them in place?)", UserWarning, stacklevel=2)
        take = _canonical_view if assign else _canonical_copy
        z = take(got["zero_point"], dev) if "zero_point" in got else None
        self._w.set_canonical(take(got["qweight"], dev), take(got["scale"], dev), z, self.compute_dtype,
                              codes=codes if dev.type != "meta" else None)
        if "bias" in got:
            self._buffers["bias"] = take(got["bias"], dev, self.compute_dtype)

    # ------------------------------------------------------------------ repr
    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, dtype={self.compute_dtype}, layout={self.weight_layout}")


class W8A16Linear(QuantLinear):
    """8-bit symmetric per-output-channel weights (int8 codes -127..127), float activations."""

    _scheme = W8_SCHEME

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias, scheme=self._scheme, dtype=dtype, device=device)

    @classmethod
    def _resolve_scheme(cls, scheme):
        if scheme is not None and scheme != cls._scheme:
            raise ValueError(f"{cls.__name__} uses scheme {cls._scheme}, got {scheme}; use QuantLinear.from_linear "
                             f"for other schemes")
        return cls._scheme


class W4A16Linear(QuantLinear):
    """4-bit asymmetric weights with one scale and zero point per group of ``group_size`` (default 128) inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias,
                         scheme=QuantScheme(bits=4, symmetric=False, granularity=PerGroup(group_size)),
                         dtype=dtype, device=device)

    @classmethod
    def _resolve_scheme(cls, scheme):
        if scheme is None:
            return QuantScheme(bits=4, symmetric=False, granularity=PerGroup(128))
        if scheme.bits != 4 or scheme.symmetric or not isinstance(scheme.granularity, PerGroup):
            raise ValueError(f"W4A16Linear needs a 4-bit asymmetric per-group scheme, got {scheme}")
        return scheme


class W8A16LinearLayer(W8A16Linear):
    """Prior-art name and constructor: ``W8A16LinearLayer(in_features, out_features, bias=True, dtype=torch.float32)``.

    ``bias`` is True, False or None (no bias), ``dtype`` the compute dtype; both may be given by keyword, in any
    order (``W8A16LinearLayer(128, 64, dtype=torch.bfloat16, bias=None)``). A tensor or a dtype given as ``bias``
    is a ``TypeError``. ``.quantize(weights)`` then call it; ``int8_weights`` and ``scales`` are the prior-art
    attribute names.

    >>> import torch
    >>> layer = W8A16LinearLayer(in_features=4, out_features=8, bias=True)
    >>> layer.quantize(torch.randn(8, 4)).int8_weights.dtype, layer(torch.randn(2, 4)).shape
    (torch.int8, torch.Size([2, 8]))
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, bias, dtype=dtype)

    @property
    def int8_weights(self) -> torch.Tensor:
        return self._canonical()[0]

    @property
    def scales(self) -> torch.Tensor:
        return self._canonical()[1]


class QWQALinearLayer(W8A16LinearLayer):
    """Prior-art name (modular-quantization) of :class:`W8A16LinearLayer`: int8 weights, float activations."""


class QuantizedLinear(QuantLinear):
    """Prior-art name: ``QuantizedLinear.from_linear(linear)`` (8-bit symmetric per channel unless ``scheme``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scheme: QuantScheme | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias, scheme=QuantScheme() if scheme is None else scheme,
                         dtype=dtype, device=device)

    def quantize_weights(self, weight) -> "QuantizedLinear":
        """Prior-art alias of :meth:`quantize`."""
        return self.quantize(weight)
