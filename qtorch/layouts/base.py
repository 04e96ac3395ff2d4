"""What every run-time weight layout provides, and the description of the weight it is asked about.

A layout is a singleton (one instance per module of :mod:`qtorch.layouts`), so that a layer's choice survives
``copy.deepcopy`` and pickling as the same object (it is stored by name).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcore import PerChannel, PerTensor, QuantScheme

from .codec import dequantize_codes, pack_codes, unpack_codes


@dataclass(frozen=True)
class WeightSpec:
    """The fixed description of a quantized ``[out_features, in_features]`` weight: what the layouts decide on.

    ``kind`` is ``tensor``, ``channel`` or ``group``; ``axis`` the granularity axis normalised to 0/1; ``group`` the
    group size along that axis (``in_features`` per tensor or per output channel).

    >>> import qcore
    >>> s = WeightSpec.of(qcore.QuantScheme(4, False, qcore.PerGroup(32)), 16, 64)
    >>> s.kind, s.axis, s.group, s.pshape
    ('group', 1, 32, (16, 2))
    """

    scheme: QuantScheme
    out_features: int
    in_features: int
    bits: int
    symmetric: bool
    kind: str
    axis: int
    group: int
    pshape: tuple
    #: ``"int"`` (uint8, ``(q - zero_point) * scale``) or ``"float"`` (float32, ``q * scale + zero_point``: GGUF's
    #: Q4_1); only the canonical layout holds a float zero point
    zero_point_kind: str = "int"

    @classmethod
    def of(cls, scheme: QuantScheme, out_features: int, in_features: int, *,
           zero_point_kind: str = "int") -> "WeightSpec":
        if zero_point_kind not in ("int", "float") or (zero_point_kind == "float" and scheme.symmetric):
            raise ValueError(f"zero_point_kind must be 'int', or 'float' with an asymmetric scheme; got "
                             f"{zero_point_kind!r} with {scheme}")
        n, k = out_features, in_features
        g = scheme.granularity
        if isinstance(g, PerTensor):
            kind, axis, group = "tensor", 0, k
        elif isinstance(g, PerChannel):
            kind, axis, group = "channel", g.axis % 2, (k if g.axis % 2 == 0 else n)
        else:
            kind, axis, group = "group", g.axis % 2, g.size
        return cls(scheme, n, k, scheme.bits, scheme.symmetric, kind, axis, group,
                   tuple(scheme.params_shape((n, k))), zero_point_kind)

    @property
    def qweight_spec(self):
        """(dtype, shape) of the canonical ``qweight``: the codes at 8 bits, rows packed along ``in`` below."""
        if self.bits == 8:
            return (torch.int8 if self.symmetric else torch.uint8), (self.out_features, self.in_features)
        return torch.uint8, (self.out_features, (self.in_features * self.bits + 7) // 8)

    @property
    def code_offset(self) -> int:
        """What a stored code adds to the signed code: ``2^(bits-1)`` for symmetric sub-8-bit schemes, else 0."""
        return (1 << (self.bits - 1)) if self.symmetric and self.bits < 8 else 0


def single_row_shapes(n: int) -> dict:
    """Output shapes of single-row calls by the input's dimensions, as plain tuples (a decoder passes them as
    ``*shape``: ``view`` and ``empty`` parse a ``torch.Size`` argument 1-2 us slower).

    >>> single_row_shapes(8)[3], single_row_shapes(2)[12][-2:]
    ((1, 1, 8), (1, 2))
    """
    return _Shapes(n)


def op_decoder(weight, mm, args: tuple, align: int = 0):
    """A :meth:`Layout.decoder` that calls PyTorch's kernel ``mm(x2, qweight, *args)`` on a ``[1, K]`` view of
    ``x`` while ``weight`` holds the ``qweight`` and ``aux`` it was made with (else None). ``align``: the bytes
    ``x``'s data must start on (a copy where it does not)."""
    b = weight.buffers
    qw, aux, k = b["qweight"], weight.aux, weight.spec.in_features
    shapes = single_row_shapes(weight.spec.out_features)

    def decode(x):
        if b["qweight"] is not qw or weight.aux is not aux:
            return None
        d = x.dim()
        x2 = x if d == 2 else x.view(1, k)  # (the other dimensions are of size 1)
        if x2.stride(1) != 1 or (align and x2.data_ptr() % align):
            x2 = x2.clone(memory_format=torch.contiguous_format)
        y = mm(x2, qw, *args)
        return y if d == 2 else y.view(*shapes[d])

    return decode


class _Shapes(dict):
    def __init__(self, n: int):
        super().__init__((d, (1,) * (d - 1) + (n,)) for d in range(1, 5))
        self.n = n

    def __missing__(self, d):
        shape = self[d] = (1,) * (d - 1) + (self.n,)
        return shape


class Layout:
    """One run-time form of a quantized weight: when it applies, how it converts, how it runs.

    Subclasses set ``name`` (the registry key), ``holds`` (the storage form a layer reports as its
    ``weight_layout``) and ``torch_kernels`` (True when the forward is one of PyTorch's own kernels: the unmeasured
    order ranks those first where ``layouts.TORCH_PACK_KERNELS`` is on; with measuring on, the layouts are timed), and implement :meth:`eligible`,
    :meth:`from_codes` or :meth:`from_canonical`, :meth:`to_codes` (unless it holds the canonical form),
    :meth:`path` and :meth:`linear`; a layout with several paths for a call sets ``tuned`` and lists them in
    :meth:`paths`.

    Forms exchanged: *canonical* ``(qweight, scale, zero_point)`` is the state_dict form (docs/packing.md);
    *codes* ``(codes [N, K], scale, zero_point)`` is the same with the stored codes unpacked (the canonical
    ``qweight`` itself at 8 bits; symmetric sub-8-bit codes carry the offset ``2^(bits-1)``). A conversion returns
    ``(qweight, scale, zero_point, aux)`` (``aux``: derived kernel data that is not a buffer, or None), or None when
    it cannot serve this weight after all (the next candidate is taken).
    """

    name = ""
    holds = ""
    torch_kernels = False
    #: True when :meth:`paths` may offer more than one path: the layer then picks by measurement (qtorch.autotune)
    tuned = False

    # -- eligibility and dispatch
    def eligible(self, spec: WeightSpec, device: torch.device, compute_dtype: torch.dtype) -> bool:
        raise NotImplementedError

    def path(self, device_type: str, dtype: torch.dtype, rows: int, bits: int) -> str:
        """The name of the kernel a call of ``rows`` rows takes (constant under ``torch.compile``)."""
        raise NotImplementedError

    def paths(self, device_type: str, dtype: torch.dtype, rows: int, bits: int, spec=None) -> tuple:
        """Every path that can serve such a call, the layout's own first (the one :meth:`path` names); a layer
        with ``tuned`` layouts times them and keeps the fastest per row bucket. ``spec`` (the layer's
        ``WeightSpec``, where the caller has it) lets a layout leave out the paths whose kernel does not serve
        the shape."""
        return (self.path(device_type, dtype, rows, bits),)

    def traced_path(self, device_type: str, dtype: torch.dtype, rows: int, bits: int, spec=None) -> str:
        """The path a call takes under ``torch.compile`` tracing when the layer kept none for its row bucket
        (nothing is measured while tracing): :meth:`path`, unless the layout knows a better guess."""
        return self.path(device_type, dtype, rows, bits)

    def linear(self, weight, x2: torch.Tensor, path: str) -> torch.Tensor:
        """``x2 [M, K] @ W.T`` for the ``QuantizedWeight`` ``weight`` held in this layout, by the kernel ``path``
        (what :meth:`path` returned for this call): a new tensor, never ``x2`` nor memory the layout keeps (the
        layer adds its bias to it in place)."""
        raise NotImplementedError

    def linear_bias(self, weight, x2: torch.Tensor, path: str, bias: torch.Tensor):
        """:meth:`linear` plus ``bias`` (``[N]``, no gradient to record) where the kernel of ``path`` adds it to its
        float32 sums as it stores them, for this call (eager, no gradient): one pass less over the output, and
        the bias added before the rounding into a 16-bit dtype, as F.linear adds it. None where it does not (the
        caller then adds the bias to :meth:`linear`'s result)."""
        return None

    def runner(self, weight, dtype: torch.dtype, path: str):
        """A callable ``f(x2, bias)`` for eager CPU calls of 2+ rows of ``dtype`` by ``path`` (``x2 [M, K]``; no
        gradient; ``bias`` ``[N]`` or None, as in :meth:`linear_bias`), or None where the layout has none: what
        :meth:`linear_bias` computes, with the weight's operands read once. ``f`` returns None when the weight's
        buffers were replaced since it was made (the caller then takes :meth:`linear`, and asks again)."""
        return None

    def decoder(self, weight, dtype: torch.dtype, path: str):
        """A callable ``f(x)`` for eager single-row CPU calls of ``dtype`` by ``path`` (decoding: ``x`` of K
        elements, ``[K]``, ``[1, K]``, ``[1, 1, K]``...; no gradient), or None where the layout has none: the
        layer's Python per call cut to the kernel's own. ``f`` returns ``[..., N]`` as :meth:`linear` on the
        2-d view would (the same kernel, the same bits), or None when the weight's buffers were replaced since
        it was made (the caller then takes :meth:`linear`, and asks again)."""
        return None

    # -- conversions (each layout overrides at least one of from_codes / from_canonical)
    def from_codes(self, spec: WeightSpec, codes, scale, zero_point):
        return self.from_canonical(spec, pack_codes(codes, spec.bits) if spec.bits < 8 else codes, scale,
                                   zero_point)

    def from_canonical(self, spec: WeightSpec, qweight, scale, zero_point):
        codes = qweight if spec.bits == 8 else unpack_codes(qweight, spec.bits, spec.in_features)
        return self.from_codes(spec, codes, scale, zero_point)

    def to_codes(self, spec: WeightSpec, qweight, scale, zero_point):
        """``(codes, scale, zero_point)`` of the canonical form from this layout's buffers."""
        raise NotImplementedError

    def to_canonical(self, spec: WeightSpec, qweight, scale, zero_point):
        codes, s, z = self.to_codes(spec, qweight, scale, zero_point)
        return (codes if spec.bits == 8 else pack_codes(codes, spec.bits)), s, z

    def dequantize(self, spec: WeightSpec, qweight, scale, zero_point, dtype: torch.dtype) -> torch.Tensor:
        """``(codes - zero_point) * scale`` ``[N, K]`` in float32, returned in ``dtype`` (qcore's arithmetic)."""
        codes, s, z = self.to_codes(spec, qweight, scale, zero_point)
        return dequantize_codes(codes, s, z, spec, dtype)

    # -- identity: one instance per layout, copied and pickled by name
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        from . import get
        return get, (self.name,)

    def __repr__(self) -> str:
        return f"<layout {self.name}>"
