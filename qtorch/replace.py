"""Quantize whole models: swap Linear layers for quantized ones, with exclusions, a dry-run plan and a report.

    >>> import torch, qtorch
    >>> model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(64, 64) for _ in range(11)]),
    ...                              "lm_head": torch.nn.Linear(64, 100)})
    >>> report = qtorch.quantize_model(model, "w8a16", exclude=["lm_head", "layers.1"])  # not layers.10
    >>> [r.name for r in report.skipped], len(report.quantized)
    (['layers.1', 'lm_head'], 10)

``print(report)`` is a per-layer table: scheme, bytes before/after, SQNR, max abs error.

Patterns (``exclude``, ``include`` and the keys of a scheme mapping) are one of

- an exact dotted module name, ``"encoder.layer.1"``;
- an ``fnmatch`` glob (any of ``* ? [``), ``"*.mlp.*"`` (case-sensitive; ``*`` also crosses dots);
- ``"re:<regex>"``, matched with ``re.fullmatch``;
- a callable ``(name, module) -> bool``.

String patterns match *whole* dotted names, so ``"layers.1"`` never matches ``"layers.10"``, and a name also covers
everything below it: ``"layers.1"`` matches ``"layers.1.mlp.fc1"`` (a pattern is tried against the layer's name
and against each of its dotted ancestors).

Layers handled: ``nn.Linear`` (exact type, or subclasses that keep ``nn.Linear.forward``) and transformers'
GPT-2 style ``Conv1D`` (weight stored ``[in, out]``; quantized as the equivalent Linear).

Safety: every check runs before the first layer is touched (shape vs scheme, dtype, NaN/Inf, weights tied to
another tensor, hooks that would be lost, parents that read ``.weight`` directly, and a trial build of the
quantized layer for each distinct configuration); incompatible layers are listed together in one ValueError, or
kept dense and reported with ``on_incompatible="skip"``. Replacement then goes layer by layer, dropping each dense
weight as soon as its replacement is in place, so the extra memory at any moment is a few copies of one layer.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from tqdm import tqdm
from torch import nn

import qcore
from qcore import PerGroup, QuantScheme
from qcore.patterns import NamePattern

from .linear import COMPUTE_DTYPES, W8_SCHEME, QuantLinear
from .memory import _storage_key_and_nbytes, memory_footprint, module_nbytes, release_free_memory
from .report import LayerReport, QuantizationReport, scheme_label
from .tune import settle_layouts

__all__ = [
    "PRESETS", "IncompatibleLayersError", "resolve_scheme", "parse_preset", "grouped_presets", "with_group_size",
    "plan", "quantize_model", "untie",
    "replace_linear_with_target_and_quantize", "replace_linear_layers_with_w8a16", "Quantizer",
]

DEFAULT_EXCLUDE = ("lm_head",)
ON_INCOMPATIBLE = ("error", "skip")


def _w8a16() -> QuantScheme:
    return W8_SCHEME


def _w4a16() -> QuantScheme:
    return QuantScheme(bits=4, symmetric=False, granularity=PerGroup(128))


#: Preset names, the one list (the ``qtorch`` command takes its choices from here). A preset in groups also
#: takes ``"<name>-g<N>"`` (or ``_g<N>``) for groups of N: ``"w4a16-g64"``.
PRESETS: dict[str, Callable[[], QuantScheme]] = {"w8a16": _w8a16, "w4a16": _w4a16}
_GROUP_SUFFIX = re.compile(r"^(?P<base>.+?)[-_]g(?P<size>\d+)$")


def grouped_presets() -> list[str]:
    """The presets in groups, which take a ``-g<N>`` suffix: ``['w4a16']``."""
    return [n for n in sorted(PRESETS) if isinstance(PRESETS[n]().granularity, PerGroup)]


def with_group_size(scheme: QuantScheme, size: int) -> QuantScheme:
    """``scheme`` with one scale (and zero point) per ``size`` consecutive inputs of each row."""
    return QuantScheme(bits=scheme.bits, symmetric=scheme.symmetric, granularity=PerGroup(size))


def parse_preset(name: str) -> tuple[str, int | None] | None:
    """``(preset, group size the name sets or None)``: ``("w4a16", 64)`` for ``"W4A16-g64"``; ``None`` for a
    name that is no preset."""
    key = name.strip().lower()
    if key in PRESETS:
        return key, None
    m = _GROUP_SUFFIX.match(key)
    if m and m["base"] in grouped_presets():
        return m["base"], int(m["size"])
    return None


def resolve_scheme(scheme: str | QuantScheme) -> QuantScheme:
    """A preset name (``"w8a16"``: int8 symmetric per output channel; ``"w4a16"``: int4 asymmetric, groups of
    128 along ``in_features``; ``"w4a16-g32"``: groups of 32) or a QuantScheme -> QuantScheme."""
    if isinstance(scheme, QuantScheme):
        return scheme
    if isinstance(scheme, str):
        parsed = parse_preset(scheme)
        if parsed is not None:
            base, size = parsed
            return PRESETS[base]() if size is None else with_group_size(PRESETS[base](), size)
        grouped = "".join(f"or '{n}-g<group size>' (e.g. '{n}-g64'), " for n in grouped_presets())
        raise ValueError(f"unknown scheme preset {scheme!r}; allowed: {sorted(PRESETS)} {grouped}or a "
                         "qcore.QuantScheme")
    raise TypeError(f"expected a preset name or a qcore.QuantScheme, got {type(scheme).__name__}: {scheme!r}")


# ---------------------------------------------------------------------------------------------------------------
# patterns
# ---------------------------------------------------------------------------------------------------------------

class Pattern:
    """One module-name pattern: a qcore :class:`~qcore.patterns.NamePattern` (exact dotted name, glob,
    ``re:<regex>``) or a callable ``(name, module) -> bool``. ``label`` names it in reports."""

    __slots__ = ("spec", "label", "_name")

    def __init__(self, spec: str | Callable[[str, nn.Module], bool], what: str = "pattern"):
        self.spec = spec
        if callable(spec) and not isinstance(spec, str):
            self._name = None
            self.label = getattr(spec, "__name__", None) or repr(spec)
            return
        if not isinstance(spec, str):
            raise TypeError(f"{what} must be a module name, glob, 're:<regex>' or a callable (name, module) -> "
                            f"bool; got {type(spec).__name__}: {spec!r}")
        self._name = NamePattern(spec, what)
        self.label = spec

    @property
    def kind(self) -> str:
        return "callable" if self._name is None else self._name.kind

    def matches(self, name: str, module: nn.Module | None = None) -> bool:
        if self._name is None:
            return bool(self.spec(name, module))
        return self._name.matches(name)

    def __repr__(self) -> str:
        return f"Pattern({self.label!r})"


def _patterns(spec, what: str) -> list[Pattern]:
    if spec is None:
        return []
    if isinstance(spec, (str, Pattern)) or callable(spec):
        spec = [spec]  # a bare "lm_head" is one pattern, not the characters l, m, _, ...
    try:
        items = list(spec)
    except TypeError:
        raise TypeError(f"{what} must be a pattern or an iterable of patterns, got {type(spec).__name__}: "
                        f"{spec!r}") from None
    return [p if isinstance(p, Pattern) else Pattern(p, what) for p in items]


def _first_match(patterns: Iterable[Pattern], names: list[str], module: nn.Module) -> Pattern | None:
    for p in patterns:
        if any(p.matches(n, module) for n in names):
            return p
    return None


# ---------------------------------------------------------------------------------------------------------------
# targets: what a layer becomes
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Target:
    """A scheme (built with ``QuantLinear.from_linear``) or a layer class (prior-art style)."""

    scheme: QuantScheme | None
    cls: type | None = None

    @property
    def label(self) -> str:
        return self.cls.__name__ if self.cls is not None else scheme_label(self.scheme)

    def build(self, linear: nn.Linear) -> nn.Module:
        if self.cls is None:
            from .linear import QuantLinear

            return QuantLinear.from_linear(linear, self.scheme)
        if callable(getattr(self.cls, "from_linear", None)):
            return self.cls.from_linear(linear)
        # Prior-art protocol: cls(in_features, out_features, bias, dtype) then .quantize(weight).
        new = self.cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        new.quantize(linear.weight.detach())
        if linear.bias is not None:
            new.bias = linear.bias
        return new.to(linear.weight.device)


def _class_scheme(cls: type) -> QuantScheme | None:
    """The scheme a layer class applies when given none (qtorch classes answer ``_resolve_scheme(None)``)."""
    resolve = getattr(cls, "_resolve_scheme", None)
    if callable(resolve):
        try:
            s = resolve(None)
        except Exception:  # noqa: BLE001 - a class that insists on a scheme: ask the attributes below
            s = None
        if isinstance(s, QuantScheme):
            return s
    for attr in ("scheme", "_scheme"):
        s = getattr(cls, attr, None)
        if isinstance(s, QuantScheme):
            return s
    # The prior-art W8A16LinearLayer protocol is int8 symmetric per output channel (scale = absmax / 127).
    return _w8a16() if "w8a16" in cls.__name__.lower() else None


def _target_from(value: Any, what: str) -> _Target | None:
    if value is None:
        return None
    if isinstance(value, type):
        if not issubclass(value, nn.Module):
            raise TypeError(f"{what}: a target class must be an nn.Module subclass, got {value.__name__}")
        return _Target(scheme=_class_scheme(value), cls=value)
    return _Target(scheme=resolve_scheme(value))


def _scheme_spec(scheme) -> tuple[_Target | None, list[tuple[Pattern, _Target | None]] | None]:
    """-> (single target, None) or (None, [(pattern, target or None), ...]) for a mapping."""
    if isinstance(scheme, Mapping):
        if not scheme:
            raise ValueError("the scheme mapping is empty; give at least one pattern -> scheme entry")
        rules = []
        for pat, value in scheme.items():
            rules.append((Pattern(pat, "scheme mapping key"), _target_from(value, f"scheme for {pat!r}")))
        return None, rules
    if scheme is None:  # None keeps a layer dense inside a mapping; as the whole scheme it would quantize nothing
        raise TypeError("scheme must be a preset name (\"w8a16\", \"w4a16\"...), a qcore.QuantScheme, a layer class "
                        "or a {pattern: scheme} mapping, got None")
    return _target_from(scheme, "scheme"), None


# ---------------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------------

class IncompatibleLayersError(ValueError):
    """Raised before anything is modified; ``.layers`` lists the incompatible records, ``.report`` the full plan."""

    def __init__(self, message: str, layers: list[LayerReport], report: QuantizationReport):
        super().__init__(message)
        self.layers = layers
        self.report = report


def _linear_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "Linear"
    cls = type(module)
    if (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2):
        return "Conv1D"
    return None


@dataclass
class _Job:
    record: LayerReport
    module: nn.Module | None
    parents: list[tuple[nn.Module, str]]
    target: _Target | None = None


@dataclass
class _Plan:
    jobs: list[_Job]
    unused: list[str]
    explicit_unused: list[str]
    model_bytes: int = 0


def _weight_2d(module: nn.Module, kind: str) -> torch.Tensor:
    """The weight as [out_features, in_features] (a transposed view for Conv1D)."""
    return module.weight.t() if kind == "Conv1D" else module.weight


def _dense_nbytes(module: nn.Module) -> int:
    n = module.weight.nelement() * module.weight.element_size()
    if getattr(module, "bias", None) is not None:
        n += module.bias.nelement() * module.bias.element_size()
    return int(n)


def _as_linear(module: nn.Module, kind: str) -> nn.Linear:
    """``module`` itself for nn.Linear; for Conv1D an equivalent nn.Linear (a transposed copy of the weight)."""
    if kind == "Linear":
        return module
    w = module.weight.detach().t().contiguous()
    lin = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if module.bias is not None:
        lin.bias = module.bias
    return lin


def _storage_key(t: torch.Tensor):
    return _storage_key_and_nbytes(t)[0]


def untie(model: nn.Module, *names: str) -> list[str]:
    """Give each named Linear layer of ``model`` a weight of its own where it shares one (tied weights), so that
    :func:`quantize_model` can quantize it; return the names it untied. The other owners (an embedding table)
    keep the dense tensor, so a quantized untied ``lm_head`` costs its codes on top of the tied model's memory and
    reads only those codes per step. A transformers config's ``tie_word_embeddings`` is set to False when the
    untied layer is the model's output embedding, so that saving and loading keep the two apart.

    >>> import torch, qtorch
    >>> m = torch.nn.ModuleDict({"embed": torch.nn.Embedding(100, 64), "lm_head": torch.nn.Linear(64, 100)})
    >>> m.lm_head.weight = m.embed.weight                                  # tied, as many language models do
    >>> qtorch.untie(m, "lm_head"), m.lm_head.weight is m.embed.weight
    (['lm_head'], False)
    >>> _ = qtorch.quantize_model(m, {"lm_head": "w8a16"}, exclude=())     # now allowed
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        # there the flag does more than tie lm_head: T5 scales its output by it (and forces it on), BART ties the
        # encoder's and decoder's embeddings by it
        raise ValueError(f"untie: {type(model).__name__} is an encoder-decoder model, whose tie_word_embeddings "
                         f"does more than tie lm_head; keep its head dense (exclude it)")
    mods = dict(model.named_modules())
    owners = _tensor_owners(model)
    layers = []
    for name in names:
        mod = mods.get(name)
        if mod is None:
            raise ValueError(f"untie: {type(model).__name__} has no module {name!r}")
        if _linear_kind(mod) is None or not isinstance(getattr(mod, "weight", None), nn.Parameter):
            raise TypeError(f"untie: {name!r} is a {type(mod).__name__}, not a Linear layer with a weight parameter")
        layers.append((name, mod))
    done = []
    for name, mod in layers:
        w = mod.weight
        own = {f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is mod}
        if not any(o not in own for o in owners.get(_storage_key(w), ())):  # nothing else shares it
            continue
        with torch.no_grad():
            mod.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        done.append(name)
        out = getattr(model, "get_output_embeddings", None)
        if callable(out) and out() is mod:
            for cfg, _ in _tie_configs(model):
                cfg.tie_word_embeddings = False
        # transformers' table of the ties it makes (tie_weights(), init_weights()): read at init, so edited here
        for sub_name, sub in model.named_modules():
            table = getattr(sub, "all_tied_weights_keys", None)
            prefix = f"{sub_name}." if sub_name else ""
            if isinstance(table, dict) and name.startswith(prefix):
                table.pop(f"{name[len(prefix):]}.weight", None)
    return done


@functools.lru_cache(maxsize=None)
def _weight_readers(cls: type) -> frozenset:
    """Names of the children whose ``.weight`` the ``forward`` of module class ``cls`` reads itself
    (``self.<name>.weight``: transformers' T5 feed-forward reads ``self.wo.weight.dtype``); empty where its source
    cannot be read."""
    forward = getattr(cls, "forward", None)
    if forward is None or forward is nn.Module.forward:
        return frozenset()
    try:
        src = inspect.getsource(forward)
    except (OSError, TypeError):
        return frozenset()
    return frozenset(re.findall(r"self\.(\w+)\.weight\b", src))


def _tensor_owners(model: nn.Module) -> dict:
    """Every name under which a tensor's memory is reachable in ``model``, by storage (tied weights share one)."""
    owners: dict = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for n, t in tensors:
        if t is not None:
            owners.setdefault(_storage_key(t), []).append(n)
    return owners


def _tie_configs(model: nn.Module) -> list:
    """``(config, key)`` for each transformers config of ``model`` that says whether the output embedding is tied:
    the model's (key None), and its text config (key ``"text_config"``) where it is another object (composite
    models such as Blip-2 keep the flag there)."""
    cfg = getattr(model, "config", None)
    found = [(cfg, None)] if cfg is not None and getattr(cfg, "tie_word_embeddings", None) is not None else []
    text = getattr(cfg, "get_text_config", None)
    try:
        t = text() if callable(text) else None
    except Exception:  # e.g. MusicGen: several text configs, none the one
        t = None
    if t is not None and t is not cfg and getattr(t, "tie_word_embeddings", None) is not None:
        found.append((t, "text_config"))
    return found


def _incompatibility(module: nn.Module, kind: str, names: list[str], parents, target: _Target,
                     owners: dict) -> str | None:
    """Why ``module`` cannot be replaced by ``target`` (None when it can). Cheap checks first."""
    w = module.weight
    if isinstance(w, nn.parameter.UninitializedParameter):
        return "lazy layer whose weight is not initialised yet; run one forward pass first"
    out_f, in_f = _weight_2d(module, kind).shape
    if w.device.type == "meta":
        return "weight is on the meta device (not materialised); load the weights first"
    if not w.dtype.is_floating_point:
        return f"weight dtype {w.dtype} is not a floating-point type"
    if w.dtype not in COMPUTE_DTYPES and (target.cls is None or issubclass(target.cls, QuantLinear)):
        return (f"weight dtype {w.dtype}: quantized layers compute in float32, float16 or bfloat16 (the model's "
                f"activations would not fit); convert the model first, e.g. model.float()")
    if kind == "Linear" and type(module).forward is not nn.Linear.forward:
        return (f"{type(module).__name__} subclasses nn.Linear but overrides forward(); replacing it would change "
                f"what it computes")
    if "forward" in vars(module):
        return "forward() is patched on this instance (e.g. an accelerate hook); replacing it would drop the patch"
    hooks = (len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)
             + len(getattr(module, "_backward_pre_hooks", {})))
    if hooks:
        return f"{hooks} hook(s) are registered on this module and would be lost by replacing it"
    if hasattr(module, "parametrizations"):
        return "weight is parametrized (torch.nn.utils.parametrize); remove the parametrization first"
    for parent, cname in parents:
        if isinstance(parent, nn.MultiheadAttention):
            return "its parent nn.MultiheadAttention reads out_proj.weight directly instead of calling the layer"
        if cname in _weight_readers(type(parent)):
            return (f"its parent {type(parent).__name__}'s forward reads self.{cname}.weight (a quantized layer "
                    f"has codes, not a weight tensor); keep it dense")
    own = {f"{n}.weight" for n in names} | {f"{n}.bias" for n in names}
    for t in (w, getattr(module, "bias", None)):
        if t is None:
            continue
        others = sorted(o for o in owners.get(_storage_key(t), ()) if o not in own)
        if others:
            return (f"weight shares memory with {others[0]!r} (tied weights); quantizing it would keep the dense "
                    f"copy alive and untie them. Exclude it, or untie it first (qtorch.untie(model, "
                    f"{names[0]!r}): the dense copy then stays for the other owner, the quantized one is read here)")
    if target.scheme is not None:
        try:
            target.scheme.validate_shape((int(out_f), int(in_f)))
        except ValueError as e:  # a group size that does not divide in_features is served (a shorter last group)
            return f"shape {int(out_f)}x{int(in_f)} does not fit {scheme_label(target.scheme)}: {e}"
    # A finite sum proves every element finite (NaN/Inf propagate) without a full-size temporary; only a
    # non-finite sum (NaN/Inf, or an overflow of huge values) pays for the elementwise check.
    if not bool(torch.isfinite(w.sum())):
        finite = torch.isfinite(w)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite)[0].tolist()
            if kind == "Conv1D":
                bad = bad[::-1]
            return f"weight contains NaN or Inf (first at index {tuple(bad)} of the [out, in] weight)"
    return None


def _smoke_test(module: nn.Module, kind: str, target: _Target, cache: dict) -> str | None:
    """Build ``target`` on a few rows of this layer: catches a layer class that cannot handle this dtype /
    in_features / device before any layer of the model is replaced. One try per distinct (target, in_features,
    dtype, device, bias) configuration."""
    w2 = _weight_2d(module, kind)
    bias = getattr(module, "bias", None)
    key = (target, int(w2.shape[1]), w2.dtype, str(w2.device), bias is not None)
    if key in cache:
        return cache[key]
    rows = min(int(w2.shape[0]), 16)
    try:
        with torch.no_grad():
            lin = nn.Linear(int(w2.shape[1]), rows, bias=bias is not None, device="meta", dtype=w2.dtype)
            lin.weight = nn.Parameter(w2[:rows].detach().clone(), requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias[:rows].detach().clone(), requires_grad=False)
            target.build(lin)
        reason = None
    except Exception as e:  # noqa: BLE001 - any failure of the target class makes the layer incompatible
        reason = f"{target.label} cannot be built for this layer: {type(e).__name__}: {e}"
    cache[key] = reason
    return reason


def _unwrap(model):
    """The model inside a torch.compile / qtorch.compile wrapper, so that names read as the user wrote them
    ("lm_head", not "_orig_mod.lm_head"). The wrapper recompiles on its next call."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def _build_plan(model: nn.Module, scheme, exclude, include, on_incompatible: str) -> _Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    if _linear_kind(model) is not None:
        raise TypeError(f"model is itself a {type(model).__name__}; quantize_model replaces the layers inside a "
                        f"model in place. For one layer use qtorch.QuantLinear.from_linear(layer, scheme)")
    if on_incompatible not in ON_INCOMPATIBLE:
        raise ValueError(f"on_incompatible must be one of {ON_INCOMPATIBLE}, got {on_incompatible!r}")
    single, rules = _scheme_spec(scheme)
    excl = _patterns(exclude, "exclude pattern")
    incl = _patterns(include, "include pattern") if include is not None else None
    # The default exclusion (however spelled) is no typo when a model has no lm_head: only other patterns warn.
    is_default = exclude == "lm_head" or (isinstance(exclude, (tuple, list)) and tuple(exclude) == DEFAULT_EXCLUDE)
    explicit = [] if is_default else excl
    explicit = explicit + (incl or []) + [p for p, _ in (rules or [])]

    # Every registration of every module (a module shared under two names is replaced under both), its parents,
    # and every name under which a tensor's memory is reachable (to detect tied weights).
    names: dict[int, list[str]] = {}
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    modules: dict[int, nn.Module] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if name == "" or _linear_kind(mod) is None:
            continue
        names.setdefault(id(mod), []).append(name)
        modules[id(mod)] = mod
    wanted = {n for ns in names.values() for n in ns}
    for pname, pmod in model.named_modules(remove_duplicate=False):
        for cname, child in pmod._modules.items():  # named_children() would hide a second registration
            full = f"{pname}.{cname}" if pname else cname
            if full in wanted:
                parents.setdefault(id(child), []).append((pmod, cname))
    owners = _tensor_owners(model)

    used: set[int] = set()
    jobs: list[_Job] = []
    smoke_cache: dict = {}
    for mid, mod in modules.items():
        kind = _linear_kind(mod)
        mnames = names[mid]
        lazy = isinstance(mod.weight, nn.parameter.UninitializedParameter)
        shape = (0, 0) if lazy else tuple(int(n) for n in _weight_2d(mod, kind).shape)
        rec = LayerReport(name=mnames[0], kind=kind, shape=shape, dtype=str(mod.weight.dtype).replace("torch.", ""),
                          status="planned", bytes_before=0 if lazy else _dense_nbytes(mod),
                          aliases=tuple(mnames[1:]))
        rec.bytes_after = rec.bytes_before
        job = _Job(record=rec, module=mod, parents=parents.get(mid, []))
        jobs.append(job)
        hit = _first_match(excl, mnames, mod)
        if hit is not None:
            used.add(id(hit))
            rec.status, rec.pattern, rec.reason = "excluded", hit.label, f"excluded by pattern {hit.label!r}"
            continue
        if incl is not None:
            hit = _first_match(incl, mnames, mod)
            if hit is None:
                rec.status, rec.reason = "not_included", "matched no include pattern"
                continue
            used.add(id(hit))
        if rules is None:
            target = single
        else:
            target = None
            for pat, tgt in rules:
                if any(pat.matches(n, mod) for n in mnames):
                    used.add(id(pat))
                    rec.pattern, target = pat.label, tgt
                    break
            if target is None:
                rec.status = "no_scheme"
                rec.reason = (f"scheme mapping sends {rec.pattern!r} to None (kept dense)" if rec.pattern
                              else "no pattern of the scheme mapping matched")
                continue
        job.target = target
        rec.scheme, rec.target = target.scheme, (target.cls or QuantLinear).__name__
        reason = _incompatibility(mod, kind, mnames, job.parents, target, owners)
        if reason is None:
            reason = _smoke_test(mod, kind, target, smoke_cache)
        if reason is not None:
            rec.status, rec.reason = "incompatible", reason

    # The default exclusion is not the user's pattern: a model without lm_head is no news (report or warning).
    explicit_unused = [p.label for p in explicit if id(p) not in used and p.kind != "callable"]
    unused = explicit_unused
    plan_ = _Plan(jobs=jobs, unused=unused, explicit_unused=explicit_unused, model_bytes=memory_footprint(model))

    bad = [j.record for j in jobs if j.record.status == "incompatible"]
    if bad and on_incompatible == "error":
        lines = [f"  - {r.name} ({r.kind} {r.shape[0]}x{r.shape[1]}, {r.dtype}): {r.reason}" for r in bad]
        msg = (f"{len(bad)} Linear layer(s) cannot be quantized as asked; nothing was changed:\n" + "\n".join(lines)
               + "\nExclude them (exclude=[...]), give them another scheme (a pattern -> scheme mapping), "
               "or pass on_incompatible='skip' to keep them dense (the report lists them).")
        raise IncompatibleLayersError(msg, bad, _report_from(plan_, applied=False, seconds=0.0))
    return plan_




def _report_from(p: _Plan, *, applied: bool, seconds: float, model_bytes_after: int | None = None):
    layers = [j.record for j in p.jobs]
    if model_bytes_after is None:
        model_bytes_after = p.model_bytes - sum(r.bytes_before - r.bytes_after for r in layers)
    return QuantizationReport(layers=layers, applied=applied, model_bytes_before=p.model_bytes,
                              model_bytes_after=int(model_bytes_after), unused_patterns=p.unused, seconds=seconds)


def _warn_nothing_left(model: nn.Module, p: _Plan) -> None:
    """A model whose Linear layers were all quantized before (a second ``quantize_model``) has none left: say so,
    where the report alone reads like a model without Linear layers."""
    if any(job.record.status == "planned" for job in p.jobs):
        return
    done = sum(isinstance(m, QuantLinear) for m in _unwrap(model).modules())
    if done:
        dense = f" and its {len(p.jobs)} nn.Linear layer(s) are kept dense (excluded or not matched)" if p.jobs else ""
        warnings.warn(f"nothing to quantize: the model's {done} QuantLinear layer(s) are quantized already and stay "
                      f"as they are{dense} (to change a scheme, quantize the original model)", UserWarning,
                      stacklevel=3)


def _warn_unused(p: _Plan) -> None:
    if p.explicit_unused:
        warnings.warn(f"pattern(s) {p.explicit_unused} matched no Linear layer of the model; check the names "
                      f"(see [name for name, _ in model.named_modules()])", UserWarning, stacklevel=3)


def _to_numpy_f32(t: torch.Tensor) -> np.ndarray:
    """float32 NumPy view (a copy only when the dtype or device differs)."""
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t.cpu().numpy()




def _weight_error(w: np.ndarray, w_hat: np.ndarray) -> tuple[float, float]:
    """(SQNR dB, max abs error) of ``w_hat`` against ``w`` (qcore.metrics works in small float64 chunks)."""
    err = qcore.metrics.quantization_error(w, w_hat)
    return err["snr_db"], err["max_abs_error"]


def _plan_layer(job: _Job) -> None:
    """Fill the predicted bytes and the weight error of one layer from qcore, without touching the model."""
    rec, mod, target = job.record, job.module, job.target
    bias = getattr(mod, "bias", None)
    bias_bytes = 0 if bias is None else bias.nelement() * bias.element_size()
    if target.scheme is None:  # an unknown layer class: build it to know its size
        with torch.no_grad():
            new = target.build(_as_linear(mod, rec.kind))
            rec.bytes_after = module_nbytes(new)
            deq = getattr(new, "dequantized_weight", None)
            if callable(deq):
                rec.sqnr_db, rec.max_abs_error = _weight_error(_to_numpy_f32(_weight_2d(mod, rec.kind)),
                                                               _to_numpy_f32(deq()))
        return
    w = _to_numpy_f32(_weight_2d(mod, rec.kind))
    qa = qcore.quantize(w, target.scheme)
    rec.bytes_after = int(qa.nbytes) + int(bias_bytes)
    rec.sqnr_db, rec.max_abs_error = _weight_error(w, qcore.dequantize(qa))


# ---------------------------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------------------------

def plan(model: nn.Module, scheme: Any = "w8a16", *, exclude=DEFAULT_EXCLUDE, include=None,
         on_incompatible: str = "error") -> QuantizationReport:
    """Dry run of :func:`quantize_model` with the same arguments: the same report, the model untouched.

    Bytes after and the weight error come from ``qcore.quantize`` on the NumPy weight. Raises the same
    :class:`IncompatibleLayersError` as ``quantize_model`` would (its ``.report`` holds the full plan).
    """
    t0 = time.perf_counter()
    p = _build_plan(model, scheme, exclude, include, on_incompatible)
    _warn_unused(p)
    _warn_nothing_left(model, p)
    with torch.no_grad():
        for job in p.jobs:
            if job.record.status == "planned":
                _plan_layer(job)
    return _report_from(p, applied=False, seconds=time.perf_counter() - t0)


def quantize_model(model: nn.Module, scheme: Any = "w8a16", *, exclude=DEFAULT_EXCLUDE, include=None,
                   on_incompatible: str = "error", progress: bool = False, method: str = "minmax",
                   calibration=None, method_options: dict | None = None) -> QuantizationReport:
    """Replace the Linear layers of ``model`` in place by quantized ones; return a :class:`QuantizationReport`.

    scheme: ``"w8a16"`` (int8 symmetric per channel), ``"w4a16"`` (int4 asymmetric, groups of 128),
        ``"w4a16-g64"``..., a ``qcore.QuantScheme``, a layer class (``W8A16Linear``, the prior-art
        ``W8A16LinearLayer``...), or a mapping ``{pattern: scheme or None}`` where the first matching pattern
        wins (None keeps the layer dense; a layer no pattern matches stays dense and is reported).
    exclude: patterns of layers to keep dense (default ``("lm_head",)``); exclusion wins over everything.
    include: if given, only layers matching one of these patterns are considered.
    on_incompatible: ``"error"`` raises one ValueError listing every incompatible layer before anything is
        modified; ``"skip"`` keeps them dense and the report says why.

    Example::

        report = quantize_model(model, {"*.mlp.*": "w4a16", "*": "w8a16"}, exclude=["lm_head", "re:.*\\.0\\..*"])
        print(report)

    All checks run before the first replacement; then layers are replaced one at a time and each dense weight is
    released as soon as its quantized layer is in place (peak extra memory: a few copies of one layer).
    ``progress=True`` shows a tqdm progress bar (on stderr) while layers are replaced.
    method: how each weight's parameters are chosen: ``"minmax"`` (default), another qcore params method
        (``"mse"``: per group, the clipping with the least squared error), or ``"gptq"`` (error-compensating
        rounding from ``calibration``: a list of model inputs, each a tensor, a tuple of positional arguments or
        a dict of keyword arguments; see :mod:`qtorch.calibrate`).
    method_options: keyword options of the method: for ``"gptq"`` ``damp``, ``act_order``, ``params`` (the params
        method of each group's grid), ``weighted``, ``refit``, ``awq``, ``sequential`` and ``block_size``
        (defaults in ``qtorch.calibrate.GPTQ_DEFAULTS``), e.g. ``method_options={"params": "hqq"}``.
    """
    from .calibrate import check_method, gptq_layers

    t0 = time.perf_counter()
    p = _build_plan(model, scheme, exclude, include, on_incompatible)
    _warn_unused(p)
    _warn_nothing_left(model, p)
    done = 0
    todo = [job for job in p.jobs if job.record.status == "planned"]
    batches, options = check_method(method, calibration, todo, method_options)
    try:
        with torch.no_grad(), tqdm(total=len(todo), desc="quantizing", unit="layer", disable=not progress) as bar:
            pairs = (gptq_layers(model, todo, batches, **options) if method == "gptq"
                     else ((job, None) for job in todo))
            for job, qa in pairs:
                bar.set_postfix_str(job.record.name[-40:], refresh=False)
                _apply_layer(job, qa, method)
                done += 1
                bar.update()
    except BaseException as e:  # MemoryError, KeyboardInterrupt...: say how far it got
        if hasattr(e, "add_note"):
            e.add_note(f"qtorch.quantize_model stopped after replacing {done} layer(s); each layer is either fully "
                       f"replaced or untouched, never half-done")
        raise
    finally:
        for job in p.jobs:
            job.module = None
            job.parents = []
    if done:
        release_free_memory()
        _mark_config(_unwrap(model))
        settle_layouts(_unwrap(model))  # one kernel family where the shapes' own timings say it costs little
    return _report_from(p, applied=True, seconds=time.perf_counter() - t0,
                        model_bytes_after=memory_footprint(_unwrap(model)))


def _mark_config(model: nn.Module) -> None:
    """Put qtorch's ``quantization_config`` marker in the config of a transformers ``model`` that holds quantized
    layers (where it has no other tool's): a folder that transformers' own ``save_pretrained`` writes from it then
    says so, and transformers refuses to load it (``ValueError``, no ``quant_method``) where it would otherwise
    give every quantized layer random weights; :func:`qtorch.from_pretrained` names the remedy
    (:func:`qtorch.save_folder`)."""
    from .pretrained import QUANTIZER, quantization_config

    config = getattr(model, "config", None)
    if (config is None or not type(config).__module__.startswith("transformers.")
            or getattr(model, "hf_quantizer", None)):
        return
    current = getattr(config, "quantization_config", None)
    if current is not None and not (isinstance(current, dict) and current.get("quantizer") == QUANTIZER):
        return
    # the model's own copy: transformers keeps the config it was given, which other models (dense ones) and a
    # later from_pretrained(config=...) may share; every submodule holding that object gets the copy
    own = copy.deepcopy(config)
    own.quantization_config = quantization_config(model)
    for m in model.modules():
        if getattr(m, "config", None) is config:
            m.config = own


def _apply_layer(job: _Job, qa: qcore.QuantizedArray | None = None, method: str = "minmax") -> None:
    rec = job.record
    mod = job.module
    lin = _as_linear(mod, rec.kind)
    if qa is None and method != "minmax":
        qa = qcore.quantize(_to_numpy_f32(lin.weight), job.target.scheme, params=method)
    if qa is None:
        new = job.target.build(lin)
    else:  # parameters chosen elsewhere (a params method, GPTQ): the layer from_linear would build, with these
        dtype = lin.weight.dtype if lin.weight.dtype in COMPUTE_DTYPES else torch.float32
        bias = None if lin.bias is None else lin.bias.detach()
        new = QuantLinear.from_quantized_array(qa, bias, dtype=dtype, device=lin.weight.device)
    new.train(mod.training)
    w = _to_numpy_f32(lin.weight)
    deq = getattr(new, "dequantized_weight", None)
    if callable(deq):
        try:  # float32, as the CPU kernels compute: a bf16 rounding here would be the report's, not the layer's
            w_hat = _to_numpy_f32(deq(torch.float32))
        except TypeError:
            w_hat = _to_numpy_f32(deq())
    elif job.target.scheme is not None:
        w_hat = qcore.dequantize(qcore.quantize(w, job.target.scheme))
    else:
        w_hat = None
    if w_hat is not None:
        rec.sqnr_db, rec.max_abs_error = _weight_error(w, w_hat)
    del w, w_hat, deq, lin
    rec.bytes_after = module_nbytes(new)
    # The swap is the only mutation, and it comes last: a failure above leaves this layer untouched.
    for parent, attr in job.parents:
        setattr(parent, attr, new)
    rec.status = "quantized"
    job.module = None  # drop our reference: the dense weight is freed here unless someone else holds it
    del mod, new


# ---------------------------------------------------------------------------------------------------------------
# prior-art entry points
# ---------------------------------------------------------------------------------------------------------------

def _prior_art_exclude(names_to_exclude) -> list[Pattern]:
    """Prior-art exclusion: an entry equal to a child's own name excludes it at any depth (as the original
    ``for name, child in module.named_children(): if name not in exclude`` recursion does); full dotted names and
    our patterns work too."""
    if names_to_exclude is None:
        return []
    if isinstance(names_to_exclude, str):
        names_to_exclude = [names_to_exclude]
    out = []
    for entry in names_to_exclude:
        if isinstance(entry, str) and not entry.startswith("re:") and not any(c in entry for c in ".*?["):
            out.append(Pattern(_LocalName(entry), "exclude pattern"))
        else:
            out.append(Pattern(entry, "exclude pattern"))
    return out


class _LocalName:
    def __init__(self, local: str):
        self.local = local
        self.__name__ = local

    def __call__(self, name: str, module) -> bool:
        return self.local in name.split(".")


def _prior_art_call(model, target, exclude) -> QuantizationReport:
    report = quantize_model(model, target, exclude=_prior_art_exclude(exclude), on_incompatible="skip")
    if report.incompatible:
        warnings.warn("kept dense (incompatible): " + "; ".join(f"{r.name}: {r.reason}" for r in report.incompatible),
                      UserWarning, stacklevel=3)
    return report


def replace_linear_with_target_and_quantize(module: nn.Module, target_class, module_name_to_exclude=()):
    """Prior-art entry point (SmolQuant / DeepLearning.AI course): replace every Linear of ``module`` by
    ``target_class`` (a class such as ``W8A16LinearLayer``, or a scheme / preset name) and quantize it, except
    children whose own name is in ``module_name_to_exclude``. Incompatible layers stay dense with a warning.
    Returns the :class:`QuantizationReport` (the original returned None)."""
    return _prior_art_call(module, target_class, module_name_to_exclude)


def replace_linear_layers_with_w8a16(model: nn.Module, target=None, exclude_list=()):
    """Prior-art entry point (modular-quantization): like :func:`replace_linear_with_target_and_quantize`;
    ``target`` is a layer class, a scheme or a preset name (default ``"w8a16"``), or an object with a ``cls`` /
    ``target_class`` / ``layer_class`` attribute holding the class (the original ``Target.Linear(cls)``)."""
    if target is None:
        target = "w8a16"
    elif not isinstance(target, (type, str, QuantScheme, Mapping)):
        for attr in ("cls", "target_class", "layer_class", "layer", "value"):
            inner = getattr(target, attr, None)
            if isinstance(inner, type):
                target = inner
                break
        else:
            raise TypeError(f"target must be a layer class, a scheme or a preset name, got {target!r}")
    return _prior_art_call(model, target, exclude_list)


class Quantizer:
    """Prior-art entry point: ``Quantizer(model, W8A16LinearLayer, ["lm_head"])`` quantizes ``model`` in place
    right away (as the original function did). The instance keeps ``.model`` and ``.report``."""

    def __init__(self, model: nn.Module, target_class=None, exclude=("lm_head",)):
        self.model = model
        self.report = _prior_art_call(model, "w8a16" if target_class is None else target_class, exclude)

    def __repr__(self) -> str:
        return f"Quantizer({type(self.model).__name__}, {self.report!r})"
