"""A transformers model folder as one GGUF file (llama.cpp): ``--format gguf`` of ``qcore quantize`` and
``qtorch quantize``.

GGUF is not a :class:`~qcore.formats.CheckpointFormat`: those are ways of naming quantized tensors inside
safetensors files (shards, an index, ``config.json`` beside them), where a GGUF file is a container of its own
(its header, key/value metadata with the architecture and tokenizer, its own tensor names, Q and K rows in
llama.cpp's rotary order). So it is offered beside the checkpoint formats: :func:`qcore.formats.output_format_names`
lists both, and this module holds what the two command lines share:

- which GGUF type a scheme becomes (:func:`gguf_type`): 8 bits symmetric -> Q8_0, 4 bits symmetric -> Q4_0,
  4 bits asymmetric -> Q4_1, always in GGUF's blocks of 32 values along each row, quantized as llama.cpp does
  (:func:`qcore.gguf.quantize`: its rounding and float16 block scales);
- the metadata of a Llama model folder (:func:`folder_metadata`: the hyperparameters from ``config.json``, the
  tokenizer from ``tokenizer.json``), and the GGUF name of each tensor (:func:`tensor_names`);
- :func:`quantize_folder`, the torch-free conversion, streamed tensor by tensor from the safetensors files.

>>> gguf_type(4, False)
'Q4_1'
>>> permutation(8, 2).tolist()     # the row order llama.cpp's converter gives Q and K, two heads of 4 rows
[0, 2, 1, 3, 4, 6, 5, 7]
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping, Optional, Sequence

import numpy as np

from .. import checkpoint as ck
from .. import gguf as qgguf
from ..metrics import sqnr_db
from ..quantize import dequantize

__all__ = ["NAME", "ARCHITECTURES", "LLAMA_KEYS", "SCHEMES", "gguf_type", "check_architecture", "config_metadata",
           "folder_metadata", "permutation", "heads_of", "tensor_names", "quantize_folder"]

#: the name ``--format`` takes
NAME = "gguf"
#: ``config.json`` model types written as GGUF here (llama.cpp's ``general.architecture``)
ARCHITECTURES = ("llama",)
#: GGUF keys (after ``llama.``) of the hyperparameters -> ``config.json`` keys; llama.cpp's converter writes them
#: and transformers' GGUF loader reads the same table (``GGUF_CONFIG_MAPPING["llama"]``)
LLAMA_KEYS = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
              "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
              "rope.dimension_count": "head_dim", "rope.freq_base": "rope_theta",
              "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
              "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size"}
_FLOAT_KEYS = ("rope.freq_base", "attention.layer_norm_rms_epsilon")
#: the schemes GGUF holds, as both command lines name them
SCHEMES = ("8 bits symmetric (qtorch w8a16, qcore --bits 8) as Q8_0; 4 bits symmetric (qcore --bits 4) as Q4_0; "
           "4 bits asymmetric (qtorch w4a16, qcore --bits 4 --asymmetric) as Q4_1; in blocks of 32 along each row")
_UINT32, _FLOAT32, _STRING = 4, 6, 8  # GGUF value types


def gguf_type(bits: int, symmetric: bool, group_size: Optional[int] = None) -> str:
    """The GGUF type of a scheme: ``ValueError`` naming the scheme and listing :data:`SCHEMES` when GGUF has none.
    ``group_size``: the one the user asked for, if any (GGUF's blocks are 32 values: only 32 fits)."""
    qtype = {(8, True): "Q8_0", (4, True): "Q4_0", (4, False): "Q4_1"}.get((bits, bool(symmetric)))
    if qtype is None:
        raise ValueError(f"GGUF has no type for {bits}-bit {'symmetric' if symmetric else 'asymmetric'} weights; "
                         f"it holds {SCHEMES}")
    if group_size is not None and group_size != qgguf.BLOCK:
        raise ValueError(f"GGUF blocks hold {qgguf.BLOCK} values each, so a group size of {group_size} cannot be "
                         f"written; leave the group size out (or give {qgguf.BLOCK}). GGUF holds {SCHEMES}")
    return qtype


def check_architecture(config: Mapping, where: str = "config.json") -> str:
    """The architecture of a ``config.json`` dict if it is one written here; ``ValueError`` naming it otherwise."""
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        named = ", ".join(config.get("architectures") or ()) or "none named"
        raise ValueError(f"{where}: architecture {arch!r} ({named}) cannot be written as GGUF here: GGUF output "
                         f"is for the {', '.join(ARCHITECTURES)} architecture (LlamaForCausalLM); for other models "
                         f"write the compressed-tensors format")
    rope = config.get("rope_scaling") or {}
    params = config.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type")) if rope else params.get("rope_type", "default")
    if kind not in (None, "default"):
        raise ValueError(f"{where}: rope scaling {kind!r} is not written as GGUF here (only the default rotary "
                         "embedding)")
    return arch


def config_metadata(config: Mapping) -> dict:
    """GGUF metadata (:func:`qcore.gguf.export_gguf`'s form) of a Llama ``config.json`` dict: the architecture,
    its hyperparameters (:data:`LLAMA_KEYS`) and ``general.quantization_version``. No tokenizer keys."""
    arch = check_architecture(config)
    values = dict(config)
    if values.get("rope_theta") is None:  # transformers 5 keeps it in rope_parameters
        values["rope_theta"] = (values.get("rope_parameters") or {}).get("rope_theta")
    if values.get("head_dim") is None and values.get("hidden_size") and values.get("num_attention_heads"):
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    if values.get("num_key_value_heads") is None:
        values["num_key_value_heads"] = values.get("num_attention_heads")
    meta = {"general.architecture": (arch, _STRING, None)}
    for key, attr in LLAMA_KEYS.items():
        value = values.get(attr)
        if value is None:
            continue
        meta[f"{arch}.{key}"] = (float(value), _FLOAT32, None) if key in _FLOAT_KEYS else (int(value), _UINT32, None)
    meta["general.quantization_version"] = (2, _UINT32, None)
    return meta


def read_config(folder) -> dict:
    fname = os.path.join(os.fspath(folder), "config.json")
    try:
        with open(fname, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{folder}: no config.json; GGUF needs the model's configuration (a transformers model "
                         "folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{fname}: cannot be read: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{fname}: expected a JSON object")
    return config


def folder_metadata(folder, *, pre: str = "default") -> dict:
    """GGUF metadata of the model folder ``folder``: :func:`config_metadata` of its ``config.json`` and
    :func:`qcore.gguf.tokenizer_metadata` of its ``tokenizer.json`` (what llama.cpp needs to run the file).
    ``ValueError`` naming the problem (another architecture, a tokenizer that is not byte-level BPE)."""
    where = os.path.join(os.fspath(folder), "config.json")
    config = read_config(folder)
    check_architecture(config, where)
    try:
        tok = qgguf.tokenizer_metadata(folder, pre=pre)
    except ValueError as e:
        raise ValueError(f"{e}; llama.cpp needs the tokenizer in the GGUF file") from None
    return {**config_metadata(config), **tok}


def permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives Q and K (the rotary halves interleaved): GGUF row ``i`` is HF row
    ``perm[i]``. Rows move whole, so quantizing before or after permuting gives the same blocks."""
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def heads_of(gguf_name: str, config: Mapping) -> Optional[int]:
    """The head count whose :func:`permutation` the tensor ``gguf_name`` takes (attn_q, attn_k), else None."""
    if ".attn_q." in gguf_name:
        return int(config["num_attention_heads"])
    if ".attn_k." in gguf_name:
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def tensor_names(config: Mapping, names: Sequence[str]) -> dict:
    """``{HF tensor name: GGUF name}`` by the ``gguf`` package's table of HF names (the one llama.cpp's converter
    and transformers' loader use); ``ValueError`` listing the names it has none for."""
    import gguf

    arch = check_architecture(config)
    table = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     int(config["num_hidden_layers"]))
    out, unknown = {}, []
    for name in names:
        g = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is None:
            unknown.append(name)
        else:
            out[name] = g  # the suffix (.weight, .bias) included
    if unknown:
        raise ValueError(f"tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''} have no GGUF name in a "
                         f"{arch} model")
    return out


# ------------------------------------------------------------------------------------------------------------------
# qcore quantize --format gguf: streamed from the safetensors files, without torch
# ------------------------------------------------------------------------------------------------------------------

def _float_type(info: ck.TensorInfo):
    """``(dtype written, raw GGUF type or None)`` of a tensor written unquantized: 1-D as F32 (llama.cpp's converter
    does so for norms), 2-D in its own F32 / F16 / BF16 (F64 as F32)."""
    import gguf

    if len(info.shape) == 1 or info.dtype in ("F32", "F64"):
        return np.dtype(np.float32), None
    if info.dtype == "F16":
        return np.dtype(np.float16), None
    return np.dtype(np.uint8), gguf.GGMLQuantizationType.BF16


def quantize_folder(input_path, output, *, bits: int = 8, symmetric: bool = True,
                    group_size: Optional[int] = None, include: Sequence[str] = (), exclude: Sequence[str] = (),
                    overwrite: bool = False, pre: str = "default") -> dict:
    """Quantize the Llama model folder ``input_path`` into the GGUF file ``output`` (``qcore quantize --format
    gguf``); returns the summary dict of :func:`qcore.convert.quantize_checkpoint`.

    The tensors :func:`qcore.convert.select_tensors` picks become :func:`gguf_type` blocks quantized as llama.cpp
    does (Q and K rows in its order); the others are written as floats. Everything is checked before the first
    byte is written (architecture, tokenizer, type, every quantized row a multiple of 32, a GGUF name for every
    tensor, OUTPUT); then one tensor at a time is read (positioned reads), quantized and written, and the file is
    renamed into place when complete. ``RequestError`` / ``ValueError`` name the problem; nothing is left at
    ``output``."""
    from ..convert import RequestError, _read_inputs, _read_into, select_tensors

    input_path, output = os.fspath(input_path), os.fspath(output)
    t0 = time.perf_counter()
    try:
        qtype = gguf_type(bits, symmetric, group_size)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if not os.path.isdir(input_path):
        raise RequestError(f"{input_path}: --format gguf reads a transformers model folder (config.json, tokenizer, "
                           "safetensors weights)")
    try:
        metadata = folder_metadata(input_path, pre=pre)
    except ValueError as e:
        raise RequestError(str(e)) from None
    config = read_config(input_path)
    _, headers, _ = _read_inputs(input_path)
    infos = {name: (fpath, info) for fpath, h in headers for name, info in h.tensors.items()}
    chosen = set(select_tensors({n: i for n, (_, i) in infos.items()}, include, exclude))
    problems = []
    for name in sorted(chosen):
        k = infos[name][1].shape[-1]
        if k % qgguf.BLOCK:
            problems.append(f"{name} {list(infos[name][1].shape)}: rows of {k} values are not whole GGUF blocks "
                            f"of {qgguf.BLOCK}")
    for name, (_, info) in infos.items():
        if info.dtype not in ck.FLOAT_CODES:
            problems.append(f"{name}: {info.dtype} tensors are not written to GGUF here")
    if problems:
        raise RequestError(f"GGUF {qtype} cannot be written: " + "; ".join(problems[:5])
                           + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                           + ". Leave them out with --exclude (they are then written unquantized); nothing was "
                             "written")
    try:
        names = tensor_names(config, list(infos))
    except ValueError as e:
        raise RequestError(f"{input_path}: {e}; nothing was written") from None
    out = os.path.abspath(output)
    if not out.endswith(".gguf"):
        raise RequestError(f"OUTPUT {output!r} must end in .gguf (--format gguf writes one file)")
    if os.path.isdir(out):
        raise RequestError(f"OUTPUT {output!r} is a folder; --format gguf writes one file")
    if not os.path.isdir(os.path.dirname(out)):
        raise RequestError(f"cannot write OUTPUT {output!r}: its parent folder does not exist")
    if os.path.lexists(out) and not overwrite:
        raise RequestError(f"OUTPUT {output!r} already exists; pass --overwrite to replace it")

    import gguf

    raw_q = getattr(gguf.GGMLQuantizationType, qtype)
    stats = {"sqnr": [], "quantized": 0, "copied": 0}
    plan = []
    for name, (fpath, info) in infos.items():
        gname = names[name]
        if name in chosen:
            rows, cols = info.shape
            shape, dtype, raw = (rows, cols // qgguf.BLOCK * qgguf.TYPES[qtype]), np.dtype(np.uint8), raw_q
        else:
            dtype, raw = _float_type(info)
            shape = info.shape if raw is None else tuple(info.shape[:-1]) + (info.shape[-1] * 2,)
        plan.append((gname, shape, dtype, raw, _producer(fpath, info, name, gname, name in chosen, qtype, dtype,
                                                         raw, config, stats, _read_into)))
    qgguf.write_gguf(out, metadata, plan)
    return {"input": input_path, "output": out, "kind": "gguf", "shards": len(headers),
            "scheme": f"GGUF {qtype} ({qgguf.scheme_of(qtype)})",
            "input_bytes": sum(h.file_size for _, h in headers), "output_bytes": os.path.getsize(out),
            "seconds": time.perf_counter() - t0, "quantized": stats["quantized"], "copied": stats["copied"],
            "worst_sqnr": sorted(stats["sqnr"], key=lambda t: t[0])[:5]}


def _producer(fpath, info, name, gname, quantized, qtype, dtype, raw, config, stats, read_into):
    def produce():
        x = np.empty(info.shape, info.np_dtype)
        with os.fdopen(ck._open_regular(fpath), "rb", buffering=0) as f:
            read_into(f, info.start, x, name)
        heads = heads_of(gname, config)
        if heads:
            x = x[permutation(x.shape[0], heads)]
        if not quantized:
            stats["copied"] += 1
            if raw is not None:  # BF16: its bytes as they are
                return np.ascontiguousarray(x).view(np.uint8).reshape(x.shape[:-1] + (x.shape[-1] * 2,))
            a = x.astype(dtype)
            if not np.isfinite(a).all():
                raise ValueError(f"tensor {name!r} has NaN or Inf, or values beyond float16")
            return a
        xf = x.astype(np.float32)
        del x
        qa = qgguf.quantize(xf, qtype, name=name)
        stats["quantized"] += 1
        stats["sqnr"].append((float(sqnr_db(xf, dequantize(qa))), name, tuple(info.shape)))
        return qgguf.encode(qa, qtype, name=name)
    return produce
