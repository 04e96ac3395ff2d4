"""Quantized checkpoints in and out of a live ``nn.Module``: the qcore file format (docs/checkpoint-format.md).

>>> import torch, tempfile, os, qtorch
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
>>> report = qtorch.quantize_model(model, "w8a16", exclude=())
>>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
>>> qtorch.save_quantized(model, path)
>>> with qtorch.empty_weights():                      # parameters on the meta device: no memory
...     fresh = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
>>> fresh = qtorch.load_quantized(fresh, path)
>>> x = torch.randn(2, 64)
>>> bool(torch.equal(fresh(x), model(x)))
True

A quantized ``Linear`` named ``M`` is stored as the qcore tensor ``M.weight`` (``M.weight.qweight``,
``M.weight.scale``, ``M.weight.zero_point``); every other entry of the state dict is stored as it is. So a
checkpoint written by ``qcore quantize`` from a model's ``model.safetensors`` loads into that model class, and
a checkpoint written here loads with ``qcore.checkpoint.load`` without torch.

Orientation. A :class:`~qtorch.QuantLinear` holds its weight as ``[out_features, in_features]``, and so does
the file written here, also for layers that were GPT-2 style ``Conv1D`` (whose own weight is ``[in, out]``).
The ``__metadata__`` entry ``"qtorch.layout"`` (JSON ``{layer name: "out_in" | "in_out"}``) records it, because
a square ``Conv1D`` cannot be told apart by shape. A quantized tensor that the entry does not name is in its
module's own orientation: ``[out, in]`` for ``nn.Linear``, ``[in, out]`` for ``Conv1D`` (what ``qcore quantize``
writes from a GPT-2 ``model.safetensors``); :func:`load_quantized` transposes it exactly
(:func:`transpose_quantized`).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat

import numpy as np
import torch
from torch import nn

import qcore
from qcore import checkpoint as ckpt_io

from ._torch_numpy import from_numpy, to_numpy
from .linear import COMPUTE_DTYPES, QuantLinear
from .replace import _linear_kind
from .tune import settle_layouts

__all__ = ["save_quantized", "load_quantized", "empty_weights", "transpose_quantized"]

_QUANT_LEAVES = ("qweight", "scale", "zero_point")
META_LAYOUT = "qtorch.layout"
META_DTYPES = "qtorch.compute_dtypes"
OUT_IN, IN_OUT = "out_in", "in_out"


@contextlib.contextmanager
def empty_weights():
    """Build models inside this block with their parameters on the ``meta`` device (no memory, no init cost
    beyond one parameter at a time); buffers stay real. Fill them with :func:`load_quantized`."""
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def save_quantized(model: nn.Module, path, *, overwrite: bool = True, format: str = "qcore") -> None:
    """Write ``model`` (with :class:`~qtorch.QuantLinear` layers) to the safetensors file ``path``, its quantized
    weights in the checkpoint ``format`` (``"qcore"``, or ``"compressed-tensors"``: see :mod:`qcore.formats`).

    The file is written under a temporary name and renamed when complete (never over a FIFO or a device: a
    ``ValueError``). The compute dtype of each quantized layer is recorded, so :func:`load_quantized` restores it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if "" in quantized:
        raise ValueError("the model itself is a QuantLinear; wrap it in a module (e.g. nn.Sequential) to save it")
    tensors, dtypes = {}, {}
    for name, m in quantized.items():
        # straight from the run-time layout to qcore's codes; the writer packs them once
        tensors[f"{name}.weight"] = m.quantized_array()
        dtypes[name] = str(m.compute_dtype).removeprefix("torch.")
    layout = {name: OUT_IN for name in sorted(quantized)}  # every QuantLinear, Conv1D-born ones included
    for key, value in _plain_state(model, quantized).items():
        if value.device.type == "meta":
            raise ValueError(f"{key} is on the meta device (never loaded); there is nothing to save")
        tensors[key] = to_numpy(value)
    metadata = {META_DTYPES: json.dumps(dtypes), META_LAYOUT: json.dumps(layout)}
    path = os.fspath(path)
    _refuse_special_file(path, "write over")
    ckpt_io.save(path, tensors, metadata=metadata, overwrite=overwrite, format=format)


def _plain_state(model: nn.Module, quantized: dict) -> dict:
    """``model.state_dict()`` without the quantized leaves of the layers in ``quantized``, which it never converts
    back to the canonical form (the caller has their quantized arrays)."""
    saved = {}
    for m in quantized.values():
        saved[m] = m.__dict__.get("_save_to_state_dict")
        m._save_to_state_dict = _bias_only.__get__(m)
    try:
        return model.state_dict()
    finally:
        for m, own in saved.items():
            if own is None:
                del m._save_to_state_dict
            else:
                m._save_to_state_dict = own


def _bias_only(self, destination, prefix, keep_vars):
    if self.bias is not None:
        destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISSOCK, "a socket"))


def _refuse_special_file(path: str, action: str) -> None:
    """``ValueError`` naming ``path`` when it exists and is neither a regular file nor a folder: opening a FIFO
    to read blocks until a writer comes (forever, in a script), and saving renames a file over it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # absent or unreachable: the reader or writer names the problem
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "a special file")
    raise ValueError(f"{path}: is {kind}, not a regular file or a folder; refusing to {action} it")


def _tensor_owners(model: nn.Module):
    """name -> (module, attribute, kind) for every parameter and buffer, non-persistent buffers included."""
    out = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for pname, p in m._parameters.items():
            if p is not None:
                out.setdefault(prefix + pname, (m, pname, "param"))
        for bname, b in m._buffers.items():
            if b is not None:
                out.setdefault(prefix + bname, (m, bname, "buffer"))
    return out


def _current(owner) -> torch.Tensor:
    m, attr, kind = owner
    return m._parameters[attr] if kind == "param" else m._buffers[attr]


def load_quantized(model: nn.Module, path, *, device=None, strict: bool = True, dtype=None) -> nn.Module:
    """Fill ``model`` from a qcore checkpoint, in place, and return it.

    ``model`` may be built the usual way or inside :func:`empty_weights` (or entirely on the ``meta`` device
    when the checkpoint covers every buffer too). Each ``Linear`` whose weight the checkpoint holds quantized is
    replaced by a :class:`~qtorch.QuantLinear` built straight from the codes: its full-precision weight is
    never materialised. Everything is checked before the model is touched: a module that is not a Linear, a
    shape that differs, keys the model does not have or (with ``strict``) tensors the checkpoint lacks are
    listed together in one ``ValueError``, and the model is left as it was.

    GPT-2 style ``Conv1D`` modules (weight ``[in, out]``) are replaced like Linear layers; the orientation of the
    stored tensor comes from the file (see the module docstring). With ``strict=False`` a quantized layer whose
    bias the file lacks keeps its own bias (a problem if that bias is on ``meta``).

    ``device`` places tensors that were on ``meta`` (default CPU); others keep the device they are on.
    ``dtype`` (``torch.float32``, ``float16`` or ``bfloat16``): the compute dtype of every quantized layer, each
    laid out for it once (default: the one it was saved with, else its module's dtype).
    A path that is neither a regular file nor a folder (a FIFO, a device) is a ``ValueError`` before it is opened.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    path = os.fspath(path)
    _refuse_special_file(path, "read")  # before anything opens it (the files of a folder must be regular ones)
    loaded = ckpt_io.load(path)  # validates the whole file first
    return _fill(model, path, loaded, device=device, strict=strict, dtype=dtype)


def _fill(model: nn.Module, path: str, loaded: dict, *, device=None, strict: bool = True,
          dtype=None) -> nn.Module:
    """:func:`load_quantized` of ``loaded`` (``{name: QuantizedArray or array}``, checked), read from ``path``."""
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    meta_dtypes, layouts = _qtorch_metadata(path)
    modules = dict(model.named_modules())
    owners = _tensor_owners(model)
    persistent = set(model.state_dict().keys())
    problems, replacements, plain = [], {}, {}

    for key, value in loaded.items():
        if not isinstance(value, qcore.QuantizedArray):
            plain[key] = value
            continue
        mname, _, leaf = key.rpartition(".")
        m = modules.get(mname)
        kind = None if m is None else _module_kind(m)
        if leaf != "weight" or kind is None:
            what = "no such module" if m is None else f"{type(m).__name__} is not a Linear"
            problems.append(f"{key}: quantized tensor for {mname or '<root>'} ({what})")
            continue
        n_in, n_out = _features(m, kind)
        stored = layouts.get(mname, IN_OUT if kind == "Conv1D" else OUT_IN)
        want = [n_out, n_in] if stored == OUT_IN else [n_in, n_out]
        if list(value.shape) != want:
            problems.append(f"{key}: checkpoint shape {list(value.shape)}, model expects {want} "
                            f"({'[out, in]' if stored == OUT_IN else '[in, out]'} for {type(m).__name__})")
            continue
        if stored == IN_OUT:
            try:
                value = transpose_quantized(value)
            except ValueError as e:
                problems.append(f"{key}: cannot transpose to [out, in]: {e}")
                continue
        replacements[mname] = (m, value)

    for key, value in plain.items():
        mname, _, leaf = key.rpartition(".")
        if mname in replacements and leaf == "bias":
            m = replacements[mname][0]
            if m.bias is None or tuple(m.bias.shape) != value.shape:
                problems.append(f"{key}: checkpoint bias {list(value.shape)} does not fit "
                                f"{'a layer without bias' if m.bias is None else list(m.bias.shape)}")
            continue
        owner = owners.get(key)
        if owner is None:
            problems.append(f"{key}: unexpected key (the model has no such parameter or buffer)")
        elif tuple(_current(owner).shape) != value.shape:
            problems.append(f"{key}: checkpoint shape {list(value.shape)}, model has "
                            f"{list(_current(owner).shape)}")

    # What the checkpoint leaves unfilled: missing persistent state (strict), and meta tensors in any case.
    covered = set(plain)
    covered_tensors = {id(_current(owners[k])) for k in plain if k in owners}
    for key, owner in owners.items():
        mname, _, leaf = key.rpartition(".")
        if mname in replacements and (leaf in ("weight", "bias") or leaf in _QUANT_LEAVES):
            if leaf == "bias" and key not in plain:
                if strict:
                    problems.append(f"{key}: missing from the checkpoint")
                elif _current(owner).device.type == "meta":
                    problems.append(f"{key}: on the meta device and not in the checkpoint")
            continue
        if key in covered or id(_current(owner)) in covered_tensors:  # tied to a tensor that is loaded
            continue
        if _current(owner).device.type == "meta":
            problems.append(f"{key}: on the meta device and not in the checkpoint")
        elif strict and key in persistent:
            problems.append(f"{key}: missing from the checkpoint")
    if problems:
        raise ValueError(f"cannot load {path} into {type(model).__name__} ({len(problems)} problem(s); the model "
                         f"was not changed):\n  " + "\n  ".join(problems))

    # Build every new layer before touching the model: a failure here still leaves it as it was.
    new_layers = {}
    for mname, (m, qa) in replacements.items():
        compute = _layer_dtype(m, meta_dtypes.get(mname)) if dtype is None else dtype
        dev = _place(m.qweight if isinstance(m, QuantLinear) else m.weight, target_device)
        bias = None
        if m.bias is not None:
            b = plain.get(f"{mname}.bias")
            # strict=False and not in the file: the layer keeps its own bias (checked above: not on meta)
            bias = from_numpy(b) if b is not None else m.bias.detach()
        # qcore validated the array when it read the file: its codes go into the layer's layout in one conversion
        new_layers[mname] = QuantLinear.from_quantized_array(qa, bias, dtype=compute, device=dev)
    staged, seen = {}, set()
    for key, value in plain.items():
        if key.rpartition(".")[0] in replacements:
            continue
        cur = _current(owners[key])
        if id(cur) in seen:  # a second name of a tied tensor: the first one loads it
            continue
        seen.add(id(cur))
        staged[key] = from_numpy(value).to(dtype=cur.dtype, device=_place(cur, target_device))

    with torch.no_grad():
        for mname, q in new_layers.items():
            parent_name, _, child = mname.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, q)
        replaced = {}  # id of an old meta tensor -> its new tensor, so tied tensors stay tied
        for key, t in staged.items():
            m, attr, kind = owners[key]
            cur = _current(owners[key])
            if cur.device.type == "meta":
                new = nn.Parameter(t, requires_grad=cur.requires_grad) if kind == "param" else t
                replaced[id(cur)] = new
                (m._parameters if kind == "param" else m._buffers)[attr] = new
            else:
                cur.copy_(t)
        for key, owner in owners.items():  # other names of a replaced meta tensor (tied weights)
            m, attr, kind = owner
            cur = _current(owner)
            if cur.device.type == "meta" and id(cur) in replaced:
                (m._parameters if kind == "param" else m._buffers)[attr] = replaced[id(cur)]
    settle_layouts(model)  # one kernel family where the shapes' own timings say it costs little
    return model


def _json_object(f: str, meta: dict, key: str) -> dict:
    raw = meta.get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise ValueError(f"{f}: __metadata__[{key!r}] is not valid JSON") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{f}: __metadata__[{key!r}] must be a JSON object of strings, got {raw!r:.80}")
    return value


def _qtorch_metadata(path: str):
    """``({layer: compute dtype name}, {layer: "out_in" | "in_out"})`` from the files' ``__metadata__``."""
    _, files, _ = ckpt_io.checkpoint_files(path)
    dtypes, layouts = {}, {}
    for f in files:
        meta = ckpt_io.read_header(f).metadata or {}
        d = _json_object(f, meta, META_DTYPES)
        dtypes.update(d)
        if META_LAYOUT in meta:
            lay = _json_object(f, meta, META_LAYOUT)
            bad = {k: v for k, v in lay.items() if v not in (OUT_IN, IN_OUT)}
            if bad:
                k = next(iter(bad))
                raise ValueError(f"{f}: __metadata__[{META_LAYOUT!r}]: layer {k!r} has layout {bad[k]!r:.40}; "
                                 f"expected {OUT_IN!r} or {IN_OUT!r}")
            layouts.update(lay)
        else:  # written by save_quantized before the layout was recorded: every QuantLinear was [out, in]
            layouts.update({name: OUT_IN for name in d})
    return dtypes, layouts


def _module_kind(m: nn.Module):
    """``"QuantLinear"``, ``"Linear"``, ``"Conv1D"`` (transformers, weight ``[in, out]``) or None."""
    return "QuantLinear" if isinstance(m, QuantLinear) else _linear_kind(m)


def _features(m: nn.Module, kind: str) -> tuple:
    """``(in_features, out_features)`` of a layer (for Conv1D from its weight's shape, meta included)."""
    if kind == "Conv1D":
        return int(m.weight.shape[0]), int(m.weight.shape[1])
    return m.in_features, m.out_features


def transpose_quantized(qa: qcore.QuantizedArray) -> qcore.QuantizedArray:
    """The 2-D quantized array ``qa`` transposed, exactly: ``dequantize(result) == dequantize(qa).T``.

    Codes, scale and zero point are transposed and the granularity axis follows: ``PerChannel(0)`` <->
    ``PerChannel(1)``, ``PerGroup(g, -1 or 1)`` -> ``PerGroup(g, 0)``, ``PerGroup(g, 0)`` -> ``PerGroup(g, -1)``,
    ``PerTensor`` unchanged. This turns a GPT-2 ``Conv1D`` weight quantized as stored (``[in, out]``) into the
    ``[out, in]`` a :class:`~qtorch.QuantLinear` holds.

    >>> import numpy as np, qcore
    >>> w = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    >>> qa = qcore.quantize(w, qcore.QuantScheme(4, False, qcore.PerGroup(2)))
    >>> t = transpose_quantized(qa)
    >>> t.scheme.granularity, bool(np.array_equal(qcore.dequantize(t), qcore.dequantize(qa).T))
    (PerGroup(size=2, axis=0), True)
    """
    if not isinstance(qa, qcore.QuantizedArray):
        raise TypeError(f"expected a qcore.QuantizedArray, got {type(qa).__name__}")
    if len(qa.shape) != 2:
        raise ValueError(f"only 2-D arrays can be transposed, got shape {list(qa.shape)}")
    s = qa.scheme
    g = s.granularity
    scale, zp = qa.scale, qa.zero_point
    if isinstance(g, qcore.PerChannel):
        new_g = qcore.PerChannel(1 - g.axis % 2)  # one scale per index of the same dimension, now the other axis
    elif isinstance(g, qcore.PerGroup):
        new_g = qcore.PerGroup(g.size, 0 if g.axis % 2 == 1 else -1)
        scale = scale.T
        zp = None if zp is None else zp.T
    else:
        new_g = g
    new = qcore.QuantScheme(bits=s.bits, symmetric=s.symmetric, granularity=new_g)
    # np.array(order="C") rather than np.ascontiguousarray, which turns a 0-d (per-tensor) scale into shape (1,)
    return qcore.QuantizedArray.from_parts(np.array(qa.codes.T, order="C"), np.array(scale, order="C"),
                                           None if zp is None else np.array(zp, order="C"), new)


def _layer_dtype(m: nn.Module, recorded) -> torch.dtype:
    if recorded is not None:
        dt = getattr(torch, str(recorded), None)
        if dt in COMPUTE_DTYPES:
            return dt
    dt = m.compute_dtype if isinstance(m, QuantLinear) else m.weight.dtype
    return dt if dt in COMPUTE_DTYPES else torch.float32


def _place(t: torch.Tensor, target: torch.device) -> torch.device:
    return target if t.device.type == "meta" else t.device
