"""GGUF (llama.cpp) files into qtorch models and back, the quantized weights kept as they are.

:func:`from_gguf` builds the transformers model of a Llama-architecture GGUF file (its config as transformers
reads it) whose Linear layers are :class:`~qtorch.QuantLinear` holding the file's Q8_0 / Q4_0 / Q4_1 codes and
block scales exactly (:mod:`qcore.gguf` for the mapping; Q4_1 with a float zero point). Other tensors (norms, the
embedding, Linear weights of other GGUF types such as Q6_K) are dequantized into the model's float parameters, as
transformers does. :func:`to_gguf` writes such a
model back: the quantized layers' bytes are the source file's.

Both need the ``gguf`` and ``transformers`` packages (``accelerate`` as well for transformers' own GGUF loading).

    model = qtorch.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    qtorch.gguf.to_gguf(model, "out.gguf", metadata="SmolLM2-135M-Instruct.Q4_1.gguf",
                        types={"token_embd.weight": "Q8_0"})
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import numpy as np
import torch
from torch import nn

import qcore
from qcore import gguf as qgguf
from qcore.formats.gguf_model import permutation

from .linear import QuantLinear

__all__ = ["from_gguf", "gguf_config", "metadata_from_config", "metadata_from_folder", "to_gguf", "quant_linear",
           "layer_class"]

_ARCHS = ("llama",)


def quant_linear(qa: qcore.QuantizedArray, bias: Optional[torch.Tensor] = None, *,
                 dtype: torch.dtype = torch.float32, device=None) -> QuantLinear:
    """A :class:`~qtorch.QuantLinear` holding ``qa`` (``[out, in]``), an integer or a float zero point (which the
    canonical layout serves: its dequantize computes ``codes * scale + zero_point``)."""
    if not isinstance(qa, qcore.QuantizedArray):
        raise TypeError(f"expected a qcore.QuantizedArray, got {type(qa).__name__}")
    return QuantLinear.from_quantized_array(qa, bias, dtype=dtype, device=device)


def _permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives Q and K (:func:`qcore.formats.gguf_model.permutation`);
    transformers' ``reverse_permute_weights`` undoes it. Rows move whole, so codes do too."""
    return permutation(n_rows, n_head)


_LAYER_CLASSES: dict = {}


def layer_class(qtype: str) -> type:
    """A layer class for :func:`qtorch.quantize_model` that quantizes each Linear as llama.cpp does for the GGUF
    type ``qtype`` (``"Q8_0"``, ``"Q4_0"``, ``"Q4_1"``: :func:`qcore.gguf.quantize`, its rounding and float16 block
    scales), so that :func:`to_gguf` writes exactly the weights the model computes with. Its ``from_linear`` returns
    a :class:`~qtorch.QuantLinear`; a layer whose ``in_features`` is not a multiple of 32 is reported incompatible.

        qtorch.quantize_model(model, qtorch.gguf.layer_class("Q4_1"))
        qtorch.gguf.to_gguf(model, "out.gguf", "model-folder")
    """
    qgguf._check_type(qtype)
    cls = _LAYER_CLASSES.get(qtype)
    if cls is None:
        def from_linear(cls, linear: nn.Linear) -> QuantLinear:
            w = linear.weight.detach()
            qa = qgguf.quantize(w.float().cpu().numpy(), cls.qtype, name="weight")
            dtype = w.dtype if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
            bias = None if linear.bias is None else linear.bias.detach()
            return QuantLinear.from_quantized_array(qa, bias, dtype=dtype, device=w.device)

        cls = type(f"GGUF_{qtype}", (nn.Module,), {
            "__doc__": f"Builds QuantLinear layers holding GGUF {qtype} blocks (see qtorch.gguf.layer_class).",
            "__module__": __name__, "qtype": qtype, "scheme": qgguf.scheme_of(qtype),
            "from_linear": classmethod(from_linear)})
        _LAYER_CLASSES[qtype] = cls
    return cls


def _rows(qa: qcore.QuantizedArray, order: np.ndarray) -> qcore.QuantizedArray:
    return qcore.QuantizedArray(np.ascontiguousarray(qa.codes[order]), np.ascontiguousarray(qa.scale[order]),
                                None if qa.zero_point is None else np.ascontiguousarray(qa.zero_point[order]),
                                qa.scheme, qa.zero_point_kind)


def _heads(gguf_name: str, config) -> Optional[int]:
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return config.num_key_value_heads
    return None


def _name_map(model, config) -> dict:
    """``{gguf name: HF name}`` of every weight and bias of ``model`` (its Linear layers quantized or not), by
    the gguf package's table of HF module names (the one transformers' GGUF loader uses)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == config.model_type)
    table = get_tensor_name_map(arch, config.num_hidden_layers)
    names = {}
    for mod_name, module in model.named_modules():
        g = table.get_name(mod_name)
        if g is None:
            continue
        for leaf in ("weight", "bias"):
            if isinstance(module, QuantLinear) and leaf == "weight" or getattr(module, leaf, None) is not None:
                names[f"{g}.{leaf}"] = f"{mod_name}.{leaf}"
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def gguf_config(path):
    """The transformers config of the GGUF file ``path``, read as transformers' GGUF loader reads it (its table of
    GGUF keys, ``tie_word_embeddings`` when the file has no ``output.weight``), from qcore's header reader."""
    return _config(path, *qgguf.read_header(path))


def _config(path, meta, infos):
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = meta.get("general.architecture", (None,))[0]
    if arch not in _ARCHS:
        raise ValueError(f"{os.fspath(path)}: architecture {arch!r} is not supported; from_gguf reads {_ARCHS}")
    # biases are not in the metadata: the tensors say (transformers' loader reads the same for StableLM)
    cfg = {"tie_word_embeddings": "output.weight" not in infos,
           "attention_bias": any(n.endswith(".attn_q.bias") for n in infos),
           "mlp_bias": any(n.endswith(".ffn_up.bias") for n in infos)}
    for key, (value, _, _) in meta.items():
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed not in (None, -1):
            cfg[renamed] = value
    return AutoConfig.for_model(**cfg)


def metadata_from_config(config) -> dict:
    """GGUF metadata (:func:`qcore.gguf.export_gguf`'s form) of a transformers Llama ``config``: the architecture
    and its hyperparameters (:func:`qcore.formats.gguf_model.config_metadata`, the key table transformers' GGUF
    loader reads). No tokenizer: llama.cpp needs the ``tokenizer.ggml.*`` keys as well (take them from a GGUF of
    the same model, :func:`qcore.gguf.read_metadata`, or use :func:`metadata_from_folder`).
    """
    from qcore.formats.gguf_model import config_metadata

    if config.model_type not in _ARCHS:
        raise ValueError(f"metadata_from_config writes {_ARCHS} configs, got {config.model_type!r}")
    return config_metadata(config.to_dict())


def metadata_from_folder(folder, *, pre: str = "default") -> dict:
    """GGUF metadata of the Hugging Face model folder ``folder``: the hyperparameters of its ``config.json`` and
    :func:`qcore.gguf.tokenizer_metadata` of its tokenizer (``pre``: llama.cpp's pre-tokenizer name)
    (:func:`qcore.formats.gguf_model.folder_metadata`)."""
    from qcore.formats.gguf_model import folder_metadata

    return folder_metadata(folder, pre=pre)


def from_gguf(path, *, dtype: torch.dtype = torch.float32):
    """The transformers causal LM of the GGUF file ``path`` (Llama architecture), its quantized Linear weights
    held by :class:`~qtorch.QuantLinear` layers without loss, the rest dequantized to ``dtype``.

    ``ValueError`` for another architecture, a tensor that maps to no parameter, or a parameter the file lacks
    (a tied output layer excepted).
    """
    from transformers import AutoModelForCausalLM
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    path = os.fspath(path)
    meta, infos = qgguf.read_header(path)
    config = _config(path, meta, infos)
    tensors = qgguf.import_gguf(path, dequantize_other=True)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    names = _name_map(model, config)
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise ValueError(f"{path}: tensors {unknown} map to no parameter of {type(model).__name__}")
    tied = getattr(config, "tie_word_embeddings", False)
    expected = {hf for g, hf in names.items() if not (tied and g.startswith("output."))}
    filled = set()
    with torch.no_grad():
        # weights first: a quantized Linear becomes a QuantLinear, whose bias buffer the bias tensor then fills
        for gname in sorted(tensors, key=lambda g: g.endswith(".bias")):
            t, hf, heads = tensors[gname], names[gname], _heads(gname, config)
            mod_name, _, leaf = hf.rpartition(".")
            module = model.get_submodule(mod_name)
            if isinstance(t, qcore.QuantizedArray) and isinstance(module, nn.Linear) and leaf == "weight":
                if heads:
                    t = _rows(t, np.argsort(_permutation(t.shape[0], heads)))
                bias = None if module.bias is None else torch.zeros(t.shape[0])
                _set_module(model, mod_name, quant_linear(t, bias, dtype=dtype))
                filled.add(hf)
                continue
            w = qcore.dequantize(t) if isinstance(t, qcore.QuantizedArray) else np.asarray(t, np.float32)
            if heads:
                w = w[np.argsort(_permutation(w.shape[0], heads))]
            target = getattr(module, leaf)  # the module now there: a parameter, or a QuantLinear's bias buffer
            if tuple(target.shape) != w.shape:
                raise ValueError(f"{path}: tensor {gname!r} has shape {w.shape}, {hf} {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            filled.add(hf)
    missing = sorted(expected - filled)
    if missing:
        raise ValueError(f"{path}: no tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if tied:
        model.tie_weights()
    from .replace import _mark_config

    _mark_config(model)  # transformers' save_pretrained of it must not look dense
    return model.eval()


def to_gguf(model, path, metadata, *, types: Optional[Mapping[str, str]] = None) -> None:
    """Write ``model`` (a transformers Llama causal LM, its Linear layers :class:`~qtorch.QuantLinear` or float) to
    the GGUF file ``path``: quantized layers as their GGUF type (Q8_0 / Q4_0 / Q4_1, their codes and scales as
    they are), float parameters as F32, or quantized with :func:`qcore.gguf.quantize` where ``types`` names them
    by GGUF name (e.g. ``{"token_embd.weight": "Q8_0"}``). ``metadata``: a source GGUF's path, a Hugging Face
    model folder (:func:`metadata_from_folder`), or :func:`qcore.gguf.read_metadata`'s dict (architecture,
    hyperparameters, tokenizer). A tied output layer is not
    written (llama.cpp ties it to ``token_embd``). Nothing is written when a tensor does not fit
    (:func:`qcore.gguf.export_gguf`)."""
    config = model.config
    if config.model_type not in _ARCHS:
        raise ValueError(f"to_gguf writes {_ARCHS} models, got {config.model_type!r}")
    if not isinstance(metadata, Mapping) and os.path.isdir(metadata):
        metadata = metadata_from_folder(metadata)
    types = dict(types or {})
    hf_to_gguf = {hf: g for g, hf in _name_map(model, config).items()}
    tied = getattr(config, "tie_word_embeddings", False)
    out, qtypes = {}, {}
    for mod_name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            gname = hf_to_gguf.get(f"{mod_name}.weight")
            if gname is None:
                raise ValueError(f"layer {mod_name} has no GGUF name")
            qa = module.quantized_array()
            heads = _heads(gname, config)
            if heads:
                qa = _rows(qa, _permutation(qa.shape[0], heads))
            out[gname] = qa
            if gname in types:
                qtypes[gname] = types.pop(gname)
            if module.bias is not None:
                b = module.bias.detach().float().cpu().numpy()
                out[hf_to_gguf[f"{mod_name}.bias"]] = b[_permutation(b.shape[0], heads)] if heads else b
    seen = set()
    for hf, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen and tied:
            continue  # the tied output layer: llama.cpp reads token_embd
        seen.add(id(p))
        gname = hf_to_gguf.get(hf)
        if gname is None:
            raise ValueError(f"parameter {hf} has no GGUF name")
        w = p.detach().float().cpu().numpy()
        heads = _heads(gname, config)
        if heads:
            w = w[_permutation(w.shape[0], heads)]
        qtype = types.pop(gname, None)
        out[gname] = w if qtype is None else qgguf.quantize(w, qtype, name=gname)
        if qtype is not None:
            qtypes[gname] = qtype
    if types:
        raise ValueError(f"types names tensors the model does not have: {sorted(types)}")
    qgguf.export_gguf(path, out, metadata, types=qtypes)
