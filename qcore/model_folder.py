"""Model folders around a quantized checkpoint: their small side files and the ``quantization_config`` marker.

A quantized model folder (``qcore quantize`` of a folder, ``qtorch quantize -o``) holds the checkpoint, the
source folder's config, tokenizer and sentence-transformers files, and in ``config.json`` a marker::

    "quantization_config": {"quantizer": "qcore", "qcore_version": "0.1.0",
                            "checkpoint_format": "qcore", "checkpoint_format_version": 1,
                            "schemes": [{"version": 1, "bits": 4, ...}],
                            "loader": "qtorch.from_pretrained", "note": "..."}

That marker belongs to the ``"qcore"`` format. A ``"compressed-tensors"`` folder gets that format's own
``quantization_config`` instead (``quant_method: "compressed-tensors"``, written by
:meth:`qcore.formats.CheckpointFormat.folder_config`), which transformers and vLLM load.

The qcore marker has no ``quant_method`` on purpose. transformers has no loader for this format; it skips a
``quantization_config`` whose ``quant_method`` it does not know (a warning, then a model with random weights),
but refuses one without a ``quant_method`` with a ``ValueError``. So ``AutoModel.from_pretrained(folder)`` fails
loudly instead of returning a wrong model.

>>> m = quantization_marker("qcore", "0.1.0", [{"bits": 8}])
>>> sorted(m) == sorted(check_marker(m, "config.json", reader="qtorch"))
True
>>> "quant_method" in m
False
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Sequence

from . import checkpoint as ck

__all__ = ["CONFIG_NAME", "MARKER_KEY", "PRODUCERS", "LOADER", "quantization_marker", "check_marker",
           "read_config", "check_config", "mark_config", "copy_side_files", "placement_problem"]

CONFIG_NAME = "config.json"
MARKER_KEY = "quantization_config"
#: The tools that write the marker; a folder of either loads with :data:`LOADER`.
PRODUCERS = ("qcore", "qtorch")
LOADER = "qtorch.from_pretrained"
NOTE = ("Load with qtorch.from_pretrained(folder). There is no quant_method on purpose: transformers has no loader "
        "for this format yet, and it refuses a quantization_config without quant_method, where it would skip an "
        "unknown one and return a model with random weights.")
#: Suffixes of the small files copied beside the new checkpoint (configs, tokenizers, chat templates, notes).
COPY_SUFFIXES = (".json", ".txt", ".model", ".md", ".jinja")


def quantization_marker(producer: str, version: str, schemes: Sequence[dict], format: str = "qcore") -> dict:
    """The ``quantization_config`` that ``producer`` (``"qcore"`` or ``"qtorch"``, at ``version``) writes for a
    checkpoint of ``format`` holding tensors quantized with ``schemes`` (``QuantScheme.to_dict()`` s)."""
    from .formats import get_format

    if producer not in PRODUCERS:
        raise ValueError(f"producer must be one of {PRODUCERS}, got {producer!r}")
    fmt = get_format(format)
    return {"quantizer": producer, f"{producer}_version": str(version), "checkpoint_format": fmt.name,
            "checkpoint_format_version": fmt.version, "schemes": list(schemes), "loader": LOADER, "note": NOTE}


def check_marker(marker, where: str, reader: str = "qcore") -> dict:
    """``marker`` if it is one of :func:`quantization_marker` that this library reads; a ``ValueError`` naming
    ``where`` otherwise (another tool's marker, an unknown format or a newer version of it)."""
    from .formats import format_names, get_format

    if not isinstance(marker, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(marker).__name__}")
    if marker.get("quantizer") not in PRODUCERS:
        other = marker.get("quant_method", marker.get("quantizer"))
        raise ValueError(f"{where} is {other!r}, not qtorch's or qcore's; load this folder with the loader of that "
                         f"tool (for transformers' own methods: AutoModel.from_pretrained)")
    name = marker.get("checkpoint_format", "qcore")
    if name not in format_names():
        raise ValueError(f"{where}: checkpoint_format {name!r:.40} is not one this {reader} reads "
                         f"({', '.join(format_names())}); upgrade {reader}")
    version, readable = marker.get("checkpoint_format_version"), get_format(name).version
    if isinstance(version, bool) or version != readable:
        raise ValueError(f"{where}: checkpoint_format_version {version!r} is not one this {reader} reads "
                         f"({readable}); upgrade {reader}")
    return marker


def read_config(folder) -> dict:
    """The JSON object of ``folder/config.json``; ``ValueError`` naming the file when missing or not an object."""
    folder = os.fspath(folder)
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: not a transformers model folder (no {CONFIG_NAME})")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _copied_config(folder: str) -> Optional[str]:
    """``folder/config.json`` when :func:`copy_side_files` copies it (a regular file, not a link), else None."""
    path = os.path.join(folder, CONFIG_NAME)
    return path if os.path.isfile(path) and not os.path.islink(path) else None


def check_config(folder) -> None:
    """Refuse, before any work, a model folder whose ``config.json`` could not carry the marker."""
    if _copied_config(os.fspath(folder)) is not None:
        try:
            read_config(folder)
        except ValueError as e:
            raise ValueError(f"{e}; the quantized folder's {CONFIG_NAME} must carry a {MARKER_KEY}, so that "
                             "transformers does not load it with random weights") from None


def mark_config(folder, marker: dict, dtype: Optional[str] = None) -> None:
    """Put ``marker`` (and the dense ``dtype`` the model is built in, when given) into ``folder/config.json``,
    if the folder has one. The file is rewritten with sorted keys."""
    folder = os.fspath(folder)
    if _copied_config(folder) is None:
        return
    config = read_config(folder)
    write_config(folder, config, marker, dtype)


def write_config(folder, config: dict, marker: dict, dtype: Optional[str] = None) -> None:
    """Write ``config`` with ``marker`` (and ``dtype``) as ``folder/config.json``."""
    config = dict(config)
    config[MARKER_KEY] = marker
    if dtype is not None:  # the source's may differ (a model loaded with dtype=...); the loader builds this one
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
    with open(os.path.join(os.fspath(folder), CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def placement_problem(src, out, src_name: str = "INPUT", out_name: str = "OUTPUT") -> Optional[str]:
    """Why the output folder ``out`` may not be written for the model folder ``src``, or None: the same folder
    (links resolved), a folder that contains ``src`` (replacing it would delete the source), or one inside ``src``
    (a later run on ``src`` would copy this output's files as its own side files).

    >>> placement_problem("m", "m/q", "MODEL", "OUT")
    "OUT 'm/q' is inside MODEL 'm'; write it outside the model folder"
    >>> placement_problem("m", "q") is None
    True
    >>> placement_problem("/x/m", "/")
    "OUTPUT '/' contains INPUT; write to a new folder"
    """
    real_out, real_src = os.path.realpath(os.fspath(out)), os.path.realpath(os.fspath(src))
    if real_out == real_src:
        return f"{out_name} {os.fspath(out)!r} is the same as {src_name}; write to a new folder"
    common = os.path.commonpath([real_out, real_src])  # (not startswith: "/" + os.sep is "//")
    if common == real_out:
        return f"{out_name} {os.fspath(out)!r} contains {src_name}; write to a new folder"
    if common == real_src:
        return (f"{out_name} {os.fspath(out)!r} is inside {src_name} {os.fspath(src)!r}; write it outside the model "
                f"folder")
    return None


def copy_side_files(src_root: str, dst_root: str, out: str) -> None:
    """Copy the small text files of a model folder (config, tokenizer, sentence-transformers module folders
    such as ``1_Pooling/``) beside the new shards. Links, hidden entries, OUTPUT itself, tensors and pickles
    are skipped."""
    skip = {os.path.realpath(out), os.path.realpath(dst_root)}
    for dirpath, dirnames, filenames in os.walk(src_root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not os.path.islink(os.path.join(dirpath, d))
                             and os.path.realpath(os.path.join(dirpath, d)) not in skip)
        rel = os.path.relpath(dirpath, src_root)
        for fname in sorted(filenames):
            src = os.path.join(dirpath, fname)
            if (fname.startswith(".") or not fname.endswith(COPY_SUFFIXES) or os.path.islink(src)
                    or (rel == "." and fname == ck.INDEX_NAME)):
                continue
            dst_dir = os.path.normpath(os.path.join(dst_root, rel))
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copyfile(src, os.path.join(dst_dir, fname))
