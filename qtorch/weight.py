"""The quantized weight of a qtorch layer: scheme, logical shape, run-time layout and buffers, in one object.

``x ≈ (codes - zero_point) * scale``, rounded half to even by qcore. The buffers live in a dict (a layer passes its
own ``_buffers``, so that ``state_dict``, ``.to()`` and ``torch.compile`` see them as the layer's buffers):
``qweight``, ``scale`` and ``zero_point`` in the form of the current layout (:mod:`qtorch.layouts`), plus ``aux``,
derived kernel data that is never saved. Conversions to and from :class:`qcore.QuantizedArray` go straight between
the layout and the codes (one conversion each way).

>>> import numpy as np, torch, qcore
>>> qa = qcore.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 16),
...                     qcore.QuantScheme(4, False, qcore.PerGroup(8)))
>>> w = QuantizedWeight.from_quantized_array(qa)
>>> w.layout.name, tuple(w.linear(torch.ones(1, 16)).shape)
('canonical', (1, 4))
>>> bool(np.array_equal(w.to_quantized_array().codes, qa.codes))
True

Where the layout offers several paths for a call (``Layout.tuned``: on CPU, several rows: ``canonical`` and
``int8pack`` their own and ``dequant_mm``; ``blocked`` its own, ``tiles_act`` and ``tiles``), :meth:`QuantizedWeight.linear` asks :func:`qtorch.autotune.default_dispatcher`
once per (device type, dtype, row bucket), which times them on this machine (``QTORCH_PATH`` forces one,
``QTORCH_AUTOTUNE=0`` keeps the layout's own), and keeps the answer: later calls cost one dict lookup. Under
``torch.compile`` tracing nothing is measured: the kept answer, else the layout's own path.

The layout itself is chosen the same way when a weight is filled or moved (:meth:`QuantizedWeight.relayout`,
:meth:`~QuantizedWeight.load_quantized_array`, :meth:`~QuantizedWeight.set_canonical`): where several layouts can
hold it, :func:`qtorch.layouts.choose` times throwaway copies once per shape, scheme and dtype on this machine, and
the copy of the winner is the one kept.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

import qcore
from qcore import packing
from qcore.params import check_codes, check_float_grid, check_grid, check_zero_point

from . import _stack_cache, autotune, layouts, pages
from ._infer_ops import needs_grad, plain_eager
from ._torch_numpy import to_numpy
from .layouts import WeightSpec
from .layouts.canonical import CANONICAL
from .layouts.codec import pack_codes, unpack_codes

__all__ = ["QuantizedWeight", "WeightSpec"]


class QuantizedWeight:
    """``QuantizedWeight(spec, buffers=None)``: a zero weight (every code at the zero point, scale 1), canonical.

    ``buffers`` is the dict that holds ``qweight``, ``scale`` and ``zero_point`` (a layer's ``_buffers``); a new
    one when None. Build a filled one with :meth:`from_quantized_array`, or fill it with :meth:`load_quantized_array`
    / :meth:`set_canonical`.
    """

    def __init__(self, spec: WeightSpec, buffers: dict | None = None, device=None):
        if not isinstance(spec, WeightSpec):
            raise TypeError(f"spec must be a qtorch.layouts.WeightSpec, got {type(spec).__name__}")
        self.spec = spec
        self.buffers = {} if buffers is None else buffers
        self.layout = CANONICAL
        self.aux = None
        self._routes: dict = {}  # (device type, dtype, row bucket index) -> path, for tuned layouts
        self.reset(torch.get_default_device() if device is None else torch.device(device))
        _stack_cache.ensure()  # (the layer's calls at a frame-stack chunk's edge: qtorch._stack_cache)

    def __getstate__(self):
        # copies and pickles start without decoders: each one is bound to the weight (and buffers) it was made for
        state = dict(self.__dict__)
        state["_decoders"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_decoders", {})  # a module pickled whole by a version without decoders
        # a deep copy or an unpickled weight got its tensors from PyTorch's allocator: back onto 2 MiB pages
        # (no copy of what is there already, as after a shallow copy)
        self.repage()
        _stack_cache.ensure()  # (a model unpickled in a new process: torch.load of a whole module)

    def repage(self) -> None:
        """Put this weight's large CPU tensors on 2 MiB pages where they are not (:mod:`qtorch.pages`), replacing
        them in its buffers dict (the layer's own); what a layout made is there already."""
        b = self.__dict__.get("buffers")
        if isinstance(b, dict):
            b.update(zip(b, _on_pages(tuple(b.values()))))
        if isinstance(self.__dict__.get("aux"), torch.Tensor):
            self.aux = pages.on_huge_pages(self.aux)

    # ------------------------------------------------------------------ state
    def reset(self, device: torch.device) -> None:
        """The zero weight on ``device``, canonical: valid for every layout, and what ``to_empty`` gives."""
        spec = self.spec
        dt, shape = spec.qweight_spec
        if spec.code_offset:  # symmetric sub-8-bit: code 0 is stored as the offset in every field
            codes = torch.full((spec.out_features, spec.in_features), spec.code_offset, dtype=torch.int16)
            q = pack_codes(codes, spec.bits).to(device)
        else:
            q = torch.zeros(shape, dtype=dt, device=device)
        s = torch.ones(spec.pshape, dtype=torch.float32, device=device)
        zdt = torch.uint8 if spec.zero_point_kind == "int" else torch.float32
        z = None if spec.symmetric else torch.zeros(spec.pshape, dtype=zdt, device=device)
        self._hold(CANONICAL, q, s, z, None, paged=False)  # (zeros, replaced by the first load)

    def _hold(self, layout, q, s, z, aux, paged: bool = True) -> None:
        if paged:  # (no copy of what a conversion put there already)
            q, s, z, aux = _on_pages((q, s, z, aux))
        b = self.buffers
        b["qweight"], b["scale"], b["zero_point"] = q, s, z
        self.layout, self.aux = layout, aux
        self._forms = {n: None if t is None else (tuple(t.shape), t.dtype) for n, t in
                       (("qweight", q), ("scale", s), ("zero_point", z))}
        self._routes = {}
        # by dtype: the layout's decoder of one-row calls; by (device type, dtype, row bucket): its runner of
        # calls of several rows (None: it has none)
        self._decoders = {}

    @property
    def device(self) -> torch.device:
        return self.buffers["qweight"].device

    def canonical(self):
        """``(qweight, scale, zero_point)`` in the canonical (state_dict) form, whatever the layout."""
        b = self.buffers
        return self.layout.to_canonical(self.spec, b["qweight"], b["scale"], b["zero_point"])

    def codes(self):
        """``(codes [N, K], scale, zero_point)``: the stored codes unpacked (symmetric sub-8-bit ones carry the
        offset ``2^(bits-1)``), scale and zero point canonical."""
        b = self.buffers
        q, s, z = b["qweight"], b["scale"], b["zero_point"]
        if self.layout.holds == "canonical" and self.spec.bits < 8 and q.device.type == "cpu":
            # qcore's unpacking kernel: the file writer packs these codes again, once
            c = packing.unpack(to_numpy(q), self.spec.bits, self.spec.in_features)
            return torch.from_numpy(c), s, z
        return self.layout.to_codes(self.spec, q, s, z)

    def candidates(self, compute_dtype: torch.dtype, device=None) -> list:
        """Names of the layouts that can hold this weight, most preferred first: the kept (or forced) decision, else
        the static order (:func:`qtorch.layouts.candidates`; listing never measures)."""
        dev = self.device if device is None else torch.device(device)
        return [lay.name for lay in layouts.candidates(self.spec, dev, compute_dtype)]

    def relayout(self, compute_dtype: torch.dtype, *, codes=None) -> None:
        """Hold the most preferred candidate layout whose conversion succeeds (the current one if it comes first).

        Where several layouts can hold the weight, the first relayout for its shape, scheme and dtype on this machine
        times them (:func:`qtorch.layouts.choose`); later ones reuse the kept decision.
        ``codes``: the unpacked canonical codes when the caller has them (a load validated them), to save a pass."""
        self._take_preferred(compute_dtype, self.device, lambda lay: self._converted(lay, codes))

    def _converted(self, lay, codes=None):
        """This weight's state converted into ``lay`` (``(qweight, scale, zero_point, aux)``, or None when ``lay``
        cannot hold it after all); ``codes``: the unpacked canonical codes when the caller has them."""
        spec, b, cur = self.spec, self.buffers, self.layout
        q, s, z = b["qweight"], b["scale"], b["zero_point"]
        if lay is cur:
            return q, s, z, self.aux
        if lay.holds == "canonical":
            return lay.from_canonical(spec, *cur.to_canonical(spec, q, s, z))
        if codes is not None:
            return lay.from_codes(spec, codes.to(q.device), s, z)
        if cur.holds == "canonical":
            return lay.from_canonical(spec, q, s, z)
        return lay.from_codes(spec, *cur.to_codes(spec, q, s, z))

    def _take_preferred(self, compute_dtype: torch.dtype, device: torch.device, convert, *,
                        keep_current: bool = True) -> None:
        """Hold the first layout of the (measured) preference order for which ``convert(layout)`` gives a state
        (``keep_current``: the current layout stays as it is when it comes first); a conversion made for measuring
        is the one kept, never made twice."""
        made: dict = {}

        def converted(lay):
            if lay not in made:
                r = convert(lay)
                made[lay] = None if r is None else _on_pages(r)  # the pages it runs on, timed and kept
            return made[lay]

        def trial(lay):
            r = converted(lay)
            return None if r is None else _trial_runs(self.spec, lay, r, compute_dtype, device)

        # timing builds no autograd graph; what the kernels allocate goes to the weight's device, whatever the
        # caller's default device (under a meta default every trial of qtorch's kernels raised)
        with torch.no_grad(), torch.device(device):
            order = layouts.choose(self.spec, device, compute_dtype, trial)
        for lay in order:
            if keep_current and lay is self.layout:
                return
            r = converted(lay)
            if r is not None:
                self._hold(lay, *r)
                return

    def hold_layout(self, name: str, compute_dtype: torch.dtype) -> bool:
        """Hold the layout called ``name`` if it is eligible for this weight and its conversion succeeds; returns
        whether the weight holds it now (the state is unchanged otherwise)."""
        lay = layouts.get(name)
        if lay is self.layout:
            return True
        if lay not in layouts.eligible(self.spec, self.device, compute_dtype):
            return False
        r = self._converted(lay)
        if r is None:
            return False
        self._hold(lay, *r)
        return True

    def set_canonical(self, qweight, scale, zero_point, compute_dtype: torch.dtype, *, codes=None) -> None:
        """Take a canonical state (already validated), then move to the preferred layout."""
        self._hold(CANONICAL, qweight, scale, zero_point, None)
        self.relayout(compute_dtype, codes=codes)

    def to_canonical_layout(self) -> None:
        """Hold the canonical form (before a move to another kind of device)."""
        if self.layout is not CANONICAL:
            self._hold(CANONICAL, *self.canonical(), None)

    # ------------------------------------------------------------------ qcore
    @classmethod
    def from_quantized_array(cls, qa: qcore.QuantizedArray, *, device=None,
                             compute_dtype: torch.dtype = torch.float32) -> "QuantizedWeight":
        """A weight holding ``qa`` (2-D, ``[out, in]``) on ``device`` (default CPU), in the layout preferred for a
        layer computing in ``compute_dtype``."""
        if not isinstance(qa, qcore.QuantizedArray):
            raise TypeError(f"expected a qcore.QuantizedArray, got {type(qa).__name__}")
        if len(qa.shape) != 2:
            raise ValueError(f"a quantized weight is 2-D [out_features, in_features], got shape {list(qa.shape)}")
        w = cls(WeightSpec.of(qa.scheme, *qa.shape, zero_point_kind=qa.zero_point_kind), device="meta")
        w.load_quantized_array(qa, compute_dtype, device="cpu" if device is None else device)
        return w

    def load_quantized_array(self, qa: qcore.QuantizedArray, compute_dtype: torch.dtype, *, device=None) -> None:
        """Replace the values by those of ``qa`` (same scheme and shape; qcore validated them), on ``device``
        (default: this weight's), converting the codes once into the preferred layout."""
        spec = self.spec
        if (qa.scheme != spec.scheme or tuple(qa.shape) != (spec.out_features, spec.in_features)
                or qa.zero_point_kind != spec.zero_point_kind):
            raise ValueError(f"quantized array {list(qa.shape)} {qa.scheme} (zero_point_kind={qa.zero_point_kind!r}) "
                             f"does not fit this weight [{spec.out_features}, {spec.in_features}] {spec.scheme} "
                             f"(zero_point_kind={spec.zero_point_kind!r})")
        dev = self.device if device is None else torch.device(device)
        s = _tensor(qa.scale, dev)
        z = None if qa.zero_point is None else _tensor(qa.zero_point, dev)
        codes = None

        def convert(lay):
            nonlocal codes
            if lay.holds == "canonical" and spec.bits < 8:
                return lay.from_canonical(spec, _tensor(qa.packed(), dev), s, z)  # qcore's packing kernel
            if codes is None:
                c = qa.codes
                if spec.code_offset:
                    c = (c.astype(np.int16) + spec.code_offset).astype(np.uint8)
                codes = _tensor(c, dev)
            return lay.from_codes(spec, codes, s, z)

        self._take_preferred(compute_dtype, dev, convert, keep_current=False)

    def to_quantized_array(self) -> qcore.QuantizedArray:
        """The weight as a :class:`qcore.QuantizedArray` (NumPy, on CPU), converted once from the layout."""
        spec = self.spec
        b = self.buffers
        if self.layout.holds == "canonical" and spec.bits < 8:
            # packed rows already: qcore unpacks (and checks) them once and keeps the bytes for the file writer
            z = b["zero_point"]
            return qcore.QuantizedArray.from_packed(to_numpy(b["qweight"]), _array(b["scale"]),
                                                    None if z is None else _array(z), spec.scheme,
                                                    (spec.out_features, spec.in_features),
                                                    zero_point_kind=spec.zero_point_kind)
        c, s, z = self.codes()
        codes = to_numpy(c)
        if spec.code_offset:
            codes = (codes.astype(np.int16) - spec.code_offset).astype(np.int8)
        elif codes.dtype != spec.scheme.code_dtype:
            codes = codes.astype(spec.scheme.code_dtype)
        # the values were validated when they came in: the constructor checks the structure only
        return qcore.QuantizedArray(np.ascontiguousarray(codes), _array(s), None if z is None else _array(z),
                                    spec.scheme, spec.zero_point_kind)

    # ------------------------------------------------------------------ math
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(codes - zero_point) * scale`` ``[out, in]`` (float32 math, then ``dtype``), equal to qcore's."""
        b = self.buffers
        return self.layout.dequantize(self.spec, b["qweight"], b["scale"], b["zero_point"], dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., in] @ W.T (+ bias)`` -> ``[..., out]`` in ``x.dtype``, by the layout's kernel. ``bias``
        (``[out]``, in ``x.dtype`` or float32; never one to differentiate: the layer adds such a bias itself) is
        added by the kernel as it stores its sums where the layout's path can (:meth:`Layout.linear_bias`), else
        in place afterwards."""
        spec, lay = self.spec, self.layout
        flat = x.dim() == 2 and x.shape[1] == spec.in_features  # no reshape either way: two views cost ~1.5 us
        x2 = x if flat else x.reshape(-1, spec.in_features)
        rows = x2.shape[0]
        if lay.tuned and rows > 0 and spec.zero_point_kind == "int":  # dequant_mm takes integer zero points
            key = (x2.device.type, x2.dtype, autotune.bucket_index(rows))
            path = self._routes.get(key)
            if path is None:
                path = self._route(x2, key)
        else:
            path = lay.path(x2.device.type, x2.dtype, rows, spec.bits)
        compiling = torch.compiler.is_compiling()
        if compiling:
            y = lay.linear(self, x2, path)
            if bias is not None:
                y = y + bias.to(y.dtype)
        else:
            try:
                y = None if bias is None else lay.linear_bias(self, x2, path, bias)
                if y is None:
                    y = lay.linear(self, x2, path)
                    if bias is not None:  # y is the kernel's new tensor: added in place (the same sums as y + bias)
                        y.add_(bias if bias.dtype == y.dtype else bias.to(y.dtype))
            except Exception as e:
                problem = self.buffer_problem()
                if problem:
                    raise ValueError(problem) from e
                raise
        if not compiling and rows and x.is_cpu:  # (dynamo never reads the dict: no guard on it)
            if rows == 1:
                if x.dtype not in self._decoders and not needs_grad(x) and plain_eager(x):
                    self._decoders[x.dtype] = lay.decoder(self, x.dtype, path)
            elif (lay.tuned and spec.zero_point_kind == "int" and key not in self._decoders  # (key: the route's)
                  and not needs_grad(x) and plain_eager(x)):
                self._decoders[key] = lay.runner(self, x.dtype, path)
        return y if flat else y.reshape(*x.shape[:-1], spec.out_features)

    def buffer_problem(self) -> str | None:
        """Why the buffers do not hold this weight's layout form, or None: a tensor put in their place from
        outside (``torch.func.functional_call`` given ``state_dict()``, whose tensors are the canonical form)."""
        forms = getattr(self, "_forms", None) or {}
        for name, want in forms.items():
            t = self.buffers.get(name)
            got = None if t is None else (tuple(t.shape), t.dtype)
            if got != want:
                return (f"buffer {name!r} is {_form(got)}, where the layer holds it as {_form(want)} (the "
                        f"{self.layout.name} layout): tensors put in the buffers' place must have their form; "
                        f"torch.func.functional_call takes dict(module.named_buffers()), not state_dict(), whose "
                        f"tensors are the canonical form")
        return None

    def decode(self, x: torch.Tensor):
        """:meth:`linear` of a single row ``x`` (K elements, ``[K]``, ``[1, K]``...) by the layout's decoder kept
        for its dtype (after the first such call), or None: no decoder (then :meth:`linear`). The caller has
        checked ``x``: a CPU tensor of K elements, its last dimension K, no gradient to record, not traced."""
        dec = self._decoders.get(x.dtype)
        if dec is None:
            return None
        y = dec(x)
        if y is None:
            self.drop_kept()  # the buffers were replaced: linear() rebuilds, then a new decoder
        return y

    def drop_kept(self) -> None:
        """Forget every kept decoder and runner (one found the buffers replaced): the next call of each kind
        rebuilds it through :meth:`linear`."""
        self._decoders = {}

    def kept_call(self, x: torch.Tensor):
        """The decoder (``x`` of one row) or runner (2+ rows) kept for calls like ``x`` (``[..., K]`` on the CPU),
        or None: what :meth:`decode` / :meth:`run_rows` would call (a dict lookup: the layer asks before it checks
        the rest)."""
        n, k = x.numel(), self.spec.in_features
        if n == k:
            return self._decoders.get(x.dtype)
        return self._decoders.get((x.device.type, x.dtype, autotune.bucket_index(n // k))) if n else None

    def run_rows(self, x: torch.Tensor, bias: torch.Tensor | None, run=None):
        """:meth:`linear` of ``x`` (2+ rows, ``[..., K]``) plus ``bias`` by the layout's runner kept for its dtype and
        row bucket (after the first such call: :meth:`Layout.runner`), or None: no runner (then :meth:`linear`).
        The caller has checked ``x``: a CPU tensor of a compute dtype, its last dimension K, no gradient to record
        (nor for ``bias``), not traced. ``run``: the runner :meth:`kept_call` gave for ``x``, where the caller has
        it (one lookup a call less)."""
        rows = x.numel() // self.spec.in_features
        if run is None:
            run = self._decoders.get((x.device.type, x.dtype, autotune.bucket_index(rows)))
            if run is None:
                return None
        y = run(x if x.dim() == 2 else x.reshape(rows, self.spec.in_features), bias)
        if y is None:
            self.drop_kept()  # the buffers were replaced: linear() rebuilds, then a new runner
            return None
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.spec.out_features)

    def _route(self, x2: torch.Tensor, key: tuple) -> str:
        """The path for calls like ``x2`` (first call of its row bucket): the dispatcher's choice among the
        layout's paths, kept in ``_routes``; under tracing the layout's
        :meth:`~qtorch.layouts.base.Layout.traced_path`; its own path when measuring is off, traced or not."""
        spec, lay = self.spec, self.layout
        dev, dt, rows = x2.device.type, x2.dtype, x2.shape[0]
        d = autotune.default_dispatcher()
        if torch.compiler.is_compiling():  # never measure while tracing; nothing is stored either
            # measuring off: the own path, as an eager call takes it (the same kernel, the same bits)
            if d.measuring:
                return lay.traced_path(dev, dt, rows, spec.bits, spec=spec)
            return lay.path(dev, dt, rows, spec.bits)
        own = lay.path(dev, dt, rows, spec.bits)
        names = lay.paths(dev, dt, rows, spec.bits, spec=spec)
        path = own
        if len(names) > 1 and (d.measuring or d.forced in names):
            label = f"{lay.name}-{layouts.scheme_label(spec)}"
            dkey = autotune.DispatchKey.make(spec.out_features, spec.in_features, label, dt, rows)
            with torch.no_grad():  # timing builds no autograd graph; the path serves both
                path = d.choose(dkey, {n: (lambda n=n: lay.linear(self, x2, n)) for n in names})
            if path == names[0]:
                path = own  # the layout's own path under the name it has always reported
        self._routes[key] = path
        return path

    def kernel_nbytes(self) -> int:
        """Bytes of derived kernel data (``aux``) held besides the buffers."""
        t = self.aux
        return 0 if t is None else t.numel() * t.element_size()

    # ------------------------------------------------------------------ validation
    def check_state(self, tensors: dict, prefix: str = ""):
        """Problems with the canonical state ``tensors`` (``qweight``, ``scale``, ``zero_point``: the ones present,
        on a real device), as messages naming the key; and the unpacked sub-8-bit codes (new memory) when read.

        The checks are qcore's own (:func:`qcore.params.check_zero_point`, :func:`~qcore.params.check_grid`,
        :func:`~qcore.params.check_codes`), the ones its checkpoint reader and ``QuantizedArray.from_parts`` run,
        on NumPy views of the tensors (copies off the CPU)."""
        spec, scheme = self.spec, self.spec.scheme
        errors, codes = [], None
        zp = tensors.get("zero_point")
        zp_np = None if zp is None else to_numpy(zp)
        if spec.zero_point_kind == "float" and zp_np is not None and "scale" in tensors:
            try:
                check_float_grid(to_numpy(tensors["scale"]), zp_np, scheme)
            except ValueError as e:
                errors.append(f"{prefix}{e}")
            zp_np = zp = None  # checked: the integer zero point's checks below do not apply
        if zp_np is not None:
            try:
                check_zero_point(zp_np, scheme)
            except ValueError as e:
                errors.append(f"{prefix}{e}")  # "zero_point 16 at index (0, 1) is outside ...": names the key
                zp_np = None  # reported; the grid is then checked from code qmax
        if "scale" in tensors and (spec.symmetric or zp is not None):
            try:
                check_grid(to_numpy(tensors["scale"]), zp_np, scheme)
            except ValueError as e:
                errors.append(f"{prefix}scale: {e}")
        if "qweight" in tensors:
            q = tensors["qweight"]
            c = q if spec.bits == 8 else unpack_codes(q, spec.bits, spec.in_features)
            codes = None if spec.bits == 8 else c  # 8 bits: the caller's copy of qweight is the codes
            try:
                check_codes(to_numpy(c), scheme, spec.code_offset)
            except ValueError as e:
                errors.append(f"{prefix}qweight: {e}")
        return errors, codes


def _trial_runs(spec: WeightSpec, lay, state: tuple, compute_dtype: torch.dtype, device) -> dict:
    """``{rows: {path: callable}}`` over :data:`qtorch.autotune.LAYOUT_ROWS` for a throwaway weight holding
    ``state`` in ``lay``: one forward of random inputs (``compute_dtype``, a fixed seed of its own: the global
    generator is left alone) by each path the layout offers for that call. At :data:`qtorch.autotune.COLD_ROWS`
    each call takes the next of :func:`_rotation`'s copies, so that it reads its weight from memory, as a layer of
    a model does."""
    w = QuantizedWeight(spec, device="meta")  # no zero state to allocate
    w._hold(lay, *state)
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for rows in autotune.LAYOUT_ROWS:
        x = torch.randn(rows, spec.in_features, generator=gen, dtype=torch.float32, device="cpu")
        x = x.to(device=device, dtype=compute_dtype)
        names = lay.paths(torch.device(device).type, compute_dtype, rows, spec.bits, spec=spec)
        if rows in autotune.COLD_ROWS:
            copies = _rotation(w, state)
            for n in names:  # untimed: a first call builds what a layer keeps (blocked's one-row plan: +40 us)
                try:
                    for c in copies:
                        lay.linear(c, x, n)
                except Exception:  # the race's own first call of the path records what it raises
                    pass
            turn = itertools.cycle(copies).__next__  # one turn for all of the layout's paths
            runs[rows] = {n: (lambda n=n, x=x, turn=turn: lay.linear(turn(), x, n)) for n in names}
        else:
            runs[rows] = {n: (lambda n=n, x=x: lay.linear(w, x, n)) for n in names}
    return runs


def _rotation(w: "QuantizedWeight", state: tuple) -> list:
    """``w`` and throwaway copies of it (holding clones of ``state``, its layout's tensors) that together take half
    of :func:`qtorch.autotune.cold_bytes`, :data:`qtorch.autotune.ROTATION_COPIES` weights at most: called in turn
    (and alternating with another layout's), each finds its codes out of cache. A weight that size or larger
    streams itself out of the caches: no copy."""
    tensors = [t for t in _leaves(state) if isinstance(t, torch.Tensor)]
    nbytes = max(1, sum(t.numel() * t.element_size() for t in tensors))
    count = autotune.rotation_copies(nbytes)
    ws = [w]
    for _ in range(count - 1):
        c = QuantizedWeight(w.spec, device="meta")
        c._hold(w.layout, *_cloned(state))
        ws.append(c)
    return ws


def _leaves(a):
    if isinstance(a, (tuple, list)):
        for v in a:
            yield from _leaves(v)
    elif isinstance(a, dict):
        for v in a.values():
            yield from _leaves(v)
    else:
        yield a


def _on_pages(state: tuple) -> tuple:
    """A layout's state ``(qweight, scale, zero_point, aux)`` (or any tuple) with each CPU tensor in it large enough
    on 2 MiB pages (:func:`qtorch.pages.on_huge_pages`: the 8-bit one-row kernel streams those from memory 1.2x
    faster); other items as they are."""
    return tuple(pages.on_huge_pages(t) if isinstance(t, torch.Tensor) else t for t in state)


def _cloned(a):
    """``a`` with every tensor in it (in tuples, lists and dicts) cloned (onto 2 MiB pages where the original
    would be: a race times copies like the weight it holds)."""
    if isinstance(a, torch.Tensor):
        return pages.on_huge_pages(a, copy=True)
    if isinstance(a, (tuple, list)):
        return type(a)(_cloned(v) for v in a)
    if isinstance(a, dict):
        return {k: _cloned(v) for k, v in a.items()}
    return a


def _tensor(a: np.ndarray, device) -> torch.Tensor:
    """A C-contiguous copy of ``a`` on ``device``: the weight never shares memory with the caller's arrays."""
    return torch.from_numpy(np.array(a, order="C")).to(device)


def _array(t: torch.Tensor) -> np.ndarray:
    return np.array(to_numpy(t), order="C")


def _form(f) -> str:
    return "None" if f is None else f"{str(f[1]).replace('torch.', '')} {list(f[0])}"
