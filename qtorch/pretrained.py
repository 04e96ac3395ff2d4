"""Quantized transformers model folders: written by ``qtorch quantize -o OUT``, loaded by :func:`from_pretrained`.

A folder holds ``model.safetensors`` (the qcore checkpoint format, see :mod:`qtorch.serialization`), the source
model's config, tokenizer and sentence-transformers files, and in ``config.json`` a ``quantization_config`` that
marks the folder as quantized (defined once, torch-free, in :mod:`qcore.model_folder`; ``qcore quantize`` of a
model folder writes the same marker with ``"quantizer": "qcore"``)::

    "quantization_config": {
        "quantizer": "qtorch", "qtorch_version": "0.1.0",
        "checkpoint_format": "qcore", "checkpoint_format_version": 1,
        "schemes": [{"version": 1, "bits": 4, "symmetric": false,
                     "granularity": {"type": "per_group", "size": 128, "axis": -1}}],
        "loader": "qtorch.from_pretrained", "note": "..."}

``save_folder(..., format="compressed-tensors")`` (``qtorch quantize --format compressed-tensors``) writes
compressed-tensors' ``pack-quantized`` format instead (:mod:`qcore.formats.compressed_tensors`), with that format's
``quantization_config``: transformers (with the compressed-tensors package) and vLLM load it, and so does
:func:`from_pretrained`, as it loads such folders written by the compressed-tensors package itself.

The qtorch marker has no ``quant_method`` on purpose: transformers refuses a ``quantization_config`` without one with a
``ValueError``, where it would skip an unknown one and return a model with random weights. So
``AutoModel.from_pretrained(folder)`` and ``SentenceTransformer(folder)`` fail loudly instead of returning a wrong
model. Load it with::

    import qtorch
    model = qtorch.from_pretrained("minilm-w4")   # BertModel with QuantLinear layers, in eval mode
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from qcore import checkpoint as ck
from qcore import model_folder
from qcore.formats.compressed_tensors import is_ct_config
from qcore.model_folder import CONFIG_NAME, LOADER, MARKER_KEY, NOTE  # noqa: F401  (the names callers know)

__all__ = ["from_pretrained", "quantization_config", "read_marker", "save_folder", "model_class_for",
           "torch_dtype_of"]

QUANTIZER = "qtorch"
#: Versions of the qcore checkpoint format this module reads.
READABLE_FORMAT_VERSIONS = (ck.FORMAT_VERSION,)


def torch_dtype_of(config) -> torch.dtype:
    """The floating dtype a transformers config declares (``dtype``), float32 otherwise."""
    dt = getattr(config, "dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if dt in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` marker for ``model`` (a model holding :class:`~qtorch.QuantLinear` layers)."""
    from . import __version__
    from .linear import QuantLinear

    schemes = []
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.scheme.to_dict() not in schemes:
            schemes.append(m.scheme.to_dict())
    if not schemes:
        raise ValueError(f"{type(model).__name__} has no quantized layer (QuantLinear); quantize it first")
    return model_folder.quantization_marker(QUANTIZER, __version__, schemes)


def _folder_config(model: nn.Module, format: str) -> dict:
    """The ``quantization_config`` of ``format`` for ``model``; a ``ValueError`` naming each layer the format
    cannot store, or a dense layer it could not name."""
    from qcore.formats import get_format

    from .linear import QuantLinear
    from .replace import _linear_kind

    fmt = get_format(format)
    if fmt.name == "qcore":
        return quantization_config(model)
    quantized, dense, problems = {}, [], []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            shape = (m.out_features, m.in_features)
            problem = fmt.check(f"{name}.weight", shape, m.scheme)
            if problem:
                problems.append(f"{name} {list(shape)}: {problem}")
            quantized[f"{name}.weight"] = m.scheme
        elif _linear_kind(m) is not None:
            if _linear_kind(m) != "Linear":
                problems.append(f"{name}: a {type(m).__name__} layer; the {fmt.name} loaders quantize nn.Linear only")
            dense.append(f"{name}.weight")
    if not quantized:
        raise ValueError(f"{type(model).__name__} has no quantized layer (QuantLinear); quantize it first")
    if problems:
        raise ValueError(f"format {fmt.name} cannot store: " + "; ".join(problems[:5])
                         + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "") + "; nothing was written")
    from . import __version__

    return fmt.folder_config(QUANTIZER, __version__, quantized, dense)


def _tie_flags(model: nn.Module, config: dict) -> dict:
    """``config`` (the source folder's config.json) saying "not tied" where the model's own config does and the
    source's does not (:func:`qtorch.untie` gave ``lm_head`` a weight of its own): transformers' loader tied the head
    of a folder that still said "tied" to the embeddings, and failed on the quantized head (``AttributeError: Linear
    has no attribute weight``, compressed-tensors format). Nothing else is rewritten: a config class may read the
    flag its own way (T5's turns a false one into other settings and keeps it true)."""
    from .replace import _tie_configs

    config = dict(config)
    for cfg, key in _tie_configs(model):
        if cfg.tie_word_embeddings is not False:
            continue
        if key is None:
            if config.get("tie_word_embeddings") is not False:
                config["tie_word_embeddings"] = False
        elif isinstance(config.get(key), dict) and config[key].get("tie_word_embeddings") is not False:
            config[key] = dict(config[key], tie_word_embeddings=False)
    return config


def _read_config(folder: str) -> dict:
    return model_folder.read_config(folder)


def read_marker(folder) -> dict | None:
    """The ``quantization_config`` of ``folder/config.json`` written by qtorch or qcore; None when it has none.

    A ``quantization_config`` of another tool, or of a newer checkpoint format, is a ``ValueError``.
    """
    folder = os.fspath(folder)
    marker = _read_config(folder).get(MARKER_KEY)
    if marker is None:
        return None
    return model_folder.check_marker(marker, f"{os.path.join(folder, CONFIG_NAME)}: {MARKER_KEY}", reader="qtorch")


def model_class_for(config):
    """The transformers class named by ``config.architectures`` (``LlamaForCausalLM``, ``BertModel``...), as
    ``AutoModel*.from_pretrained`` would pick it; ``AutoModel`` when the config names none that fits."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(name), None)
        if (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
                and isinstance(config, cls.config_class)):
            return cls
    return transformers.AutoModel


def _checkpoint_kind(folder: str) -> str:
    """``"qcore"`` where a checkpoint file of ``folder`` holds qcore's metadata of quantized tensors; ``"bare"``
    where it holds a quantized layer's tensors without it (``*.qweight``: a ``state_dict`` written as it is, by
    transformers' ``save_pretrained``); else ``"dense"``."""
    _, files, _ = ck.checkpoint_files(folder)
    headers = [ck.read_header(f) for f in files]
    if any(ck.quantized_metadata(h) for h in headers):
        return "qcore"
    if bare_state_dict({name for h in headers for name in h.tensors}):
        return "bare"
    return "dense"


def bare_state_dict(names) -> bool:
    """Whether tensor ``names`` hold a :class:`~qtorch.QuantLinear`'s ``state_dict`` entries (``X.qweight`` beside
    ``X.scale``; GPTQ / AWQ files name theirs ``qweight``, ``qzeros``, ``scales``)."""
    names = set(names)
    return any(n.endswith(".qweight") and n[:-len("qweight")] + "scale" in names for n in names)


def bare_state_dict_error(folder: str) -> ValueError:
    return ValueError(f"{folder} holds a quantized model's tensors without their schemes (a state_dict saved as it "
                      f"is, e.g. by transformers' save_pretrained): neither qtorch nor transformers can rebuild its "
                      f"layers from it. Save a quantized model with qtorch.save_folder(model, SOURCE or None, OUT) "
                      f"or `qtorch quantize MODEL -o OUT`")


def from_pretrained(folder, *, model_class=None, device=None, dtype=None) -> nn.Module:
    """Load a quantized model folder (``qtorch quantize -o``, ``qcore quantize`` of a model folder, or a
    compressed-tensors ``pack-quantized`` folder, ours or another tool's) into the transformers model its config
    names, with :class:`~qtorch.QuantLinear` layers built straight from the codes (never dequantized).

    The model is built inside :func:`qtorch.empty_weights` (no dense weight is allocated or initialised), then
    filled by :func:`qtorch.load_quantized`, which checks the whole checkpoint before touching the model. Its
    outputs equal those of the quantized model that was saved. Returned in eval mode.

    model_class: a transformers class to build instead of the one ``config.architectures`` names (an
        ``AutoModel*`` class or a concrete one, e.g. ``transformers.AutoModel`` for the bare encoder).
    device: where the tensors go (default CPU).
    dtype: the model's floating dtype (``torch.float32``, ``torch.float16`` or ``torch.bfloat16``; default: the one
        its config names), as ``model.to(dtype)`` gives it: the quantized layers compute in it, their scales stay
        float32.

    Raises ``ValueError`` for a folder that is not quantized (load it with transformers), a marker of another
    tool or a newer format, and any mismatch between the checkpoint and the model.
    """
    from .serialization import load_quantized

    folder = os.fspath(folder)
    from .linear import COMPUTE_DTYPES

    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder (from_pretrained loads a quantized model folder)")
    if is_ct_config(_read_config(folder)):
        model = _from_ct_folder(folder, model_class, device, dtype)
        return model if dtype is None else model.to(dtype)
    marker = read_marker(folder)
    kind = _checkpoint_kind(folder)
    if kind == "bare":
        raise bare_state_dict_error(folder)
    if marker is None and kind == "dense":
        raise ValueError(f"{folder} is not quantized (no qtorch quantization_config in {CONFIG_NAME} and no "
                         f"quantized tensor in its checkpoint); load it with transformers' from_pretrained, or "
                         f"quantize it first (qtorch quantize {folder} -o OUT)")
    # built in ``dtype`` from the start: the quantized layers then take their layout once, for the dtype they will
    # compute in (built in the config's and moved after, every weight was laid out twice)
    model = _empty_model(folder, model_class, dtype=dtype)
    load_quantized(model, folder, device=device, dtype=dtype)
    return (model if dtype is None else model.to(dtype)).eval()


def _empty_model(folder: str, model_class=None, *, foreign_config: bool = False, dtype=None) -> nn.Module:
    """The transformers model of ``folder/config.json``, built inside :func:`qtorch.empty_weights` in ``dtype``
    (default: the config's)."""
    import transformers

    from .serialization import empty_weights

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if foreign_config and hasattr(config, "quantization_config"):
        # compressed-tensors' config describes its own modules; this model holds QuantLinear layers instead
        del config.quantization_config
    cls = model_class if model_class is not None else model_class_for(config)
    dtype = torch_dtype_of(config) if dtype is None else dtype
    with empty_weights():
        if hasattr(cls, "from_config"):  # AutoModel* classes
            return cls.from_config(config, dtype=dtype)
        return cls._from_config(config, dtype=dtype)


def _from_ct_folder(folder: str, model_class, device, dtype=None) -> nn.Module:
    """A compressed-tensors ``pack-quantized`` folder, written by us or by the compressed-tensors package: each
    packed weight becomes a :class:`~qtorch.QuantLinear` with the same codes, scales and zero points."""
    from qcore.formats.compressed_tensors import load_folder

    from .serialization import _fill

    from .replace import _mark_config

    loaded = load_folder(folder)  # checks config.json and every tensor before the model is built
    model = _empty_model(folder, model_class, foreign_config=True, dtype=dtype)
    _fill(model, folder, loaded, device=device, dtype=dtype)
    _mark_config(model)  # its own format's config went; transformers' save_pretrained must not look dense
    return model.eval()


def _dense_dtype(model: nn.Module) -> str | None:
    """The dtype name of the model's first floating parameter (transformers' ``model.dtype``)."""
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return str(p.dtype).removeprefix("torch.")
    return None


def _own_config(model: nn.Module) -> dict:
    """The config of a transformers ``model`` as ``save_pretrained`` writes it (every field), for a folder with no
    source folder (a model built from a config or a GGUF file)."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        raise TypeError(f"source is None, so the config must come from the model, and {type(model).__name__} has "
                        f"no transformers config: pass the model folder it was loaded from")
    own = config.to_dict()
    own.pop("_name_or_path", None)  # where it was loaded from, as transformers' save_pretrained leaves it out
    return own


def _with_architecture(model: nn.Module, config: dict) -> dict:
    """``config`` naming the class of ``model`` in ``architectures``, as transformers' ``save_pretrained`` does,
    where ``model`` is a transformers model: :func:`from_pretrained` builds that class (a model loaded from a GGUF
    file has no ``architectures``, and the bare encoder was built for it, which then matched none of the keys)."""
    cls = type(model)
    if cls.__module__.startswith("transformers.") and hasattr(model, "config"):
        config = dict(config, architectures=[cls.__name__])
    return config


def save_folder(model: nn.Module, source, out: str, *, overwrite: bool = False, format: str = "qcore") -> None:
    """Write the quantized ``model`` as a model folder ``out``: ``model.safetensors``, the small files of the
    ``source`` model folder (config, tokenizer, sentence-transformers modules such as ``1_Pooling/``), and in
    ``config.json`` the model's class and dtype (which :func:`from_pretrained` builds) and the ``format``'s
    ``quantization_config``: qtorch's marker for ``"qcore"``; for ``"compressed-tensors"`` that format's own,
    which transformers' ``from_pretrained`` (with the compressed-tensors package), vLLM and
    :func:`from_pretrained` load::

        qtorch.pretrained.save_folder(model, "minilm", "minilm-ct", format="compressed-tensors")
        transformers.AutoModel.from_pretrained("minilm-ct")

    ``source=None``: the config is the model's own (``model.config``) and nothing else is copied (a model built
    from a config or loaded from a GGUF file; save its tokenizer beside it with ``tokenizer.save_pretrained``).
    The folder is built under a temporary name beside ``out`` and renamed when complete; an existing ``out`` is
    replaced only then (and only with ``overwrite``), so a failed save leaves ``out`` as it was.
    """
    import qtorch

    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a model folder (str or os.PathLike) or None, got {type(source).__name__}")
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise TypeError(f"out must be a folder path (a non-empty str or os.PathLike), got {out!r}")
    if source is not None:  # never replace (or delete) the source folder, nor nest the output in it
        problem = model_folder.placement_problem(source, out, "source", "out")
        if problem:
            raise ValueError(problem)
    out = os.path.abspath(out)
    ck.recover_output(out)  # an OUTPUT put back here is an existing one: the check below must see it
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    marker = _folder_config(model, format)  # an unknown format or a layer it cannot store: before any writing
    base = _own_config(model) if source is None else _read_config(source)
    config = _with_architecture(model, _tie_flags(model, base))
    tmpdir = ck.staging_folder(out)
    try:
        qtorch.save_quantized(model, os.path.join(tmpdir, ck.SINGLE_NAME), format=format)
        if source is not None:
            model_folder.copy_side_files(source, tmpdir, out)
        model_folder.write_config(tmpdir, config, marker, _dense_dtype(model))
        ck.commit_folder(tmpdir, out)
        tmpdir = None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
