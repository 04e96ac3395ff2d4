"""The ``"compressed-tensors"`` checkpoint format: ``pack-quantized``, as the compressed-tensors package writes it.

transformers (through its compressed-tensors integration) and vLLM load such a folder. A quantized weight
``M.weight`` of shape ``[rows, cols]`` (a Linear layer ``M``, ``[out, in]``) is stored as:

=========================  =====  ====================================================================
tensor                     dtype  shape and content
=========================  =====  ====================================================================
``M.weight_packed``        I32    ``[rows, ceil(cols*b/32)]``: each row's codes, offset to unsigned,
                                  packed LSB first and viewed as little-endian int32 (``pack_to_int32``)
``M.weight_scale``         F32    ``[rows, cols/g]`` per group, ``[rows, 1]`` per channel, ``[1]`` per tensor
``M.weight_zero_point``    I32    asymmetric only: ``[ceil(rows*b/32), groups]``, the unsigned zero points
                                  packed along the rows (``pack_to_int32(..., packed_dim=0)``)
``M.weight_shape``         I64    ``[2]``: ``[rows, cols]``
=========================  =====  ====================================================================

The scheme lives in ``config.json`` (:meth:`CompressedTensorsFormat.folder_config`); the file also carries
qcore's own table (``__metadata__["qcore-ct.quantized"]``), so that :func:`qcore.checkpoint.load` reads a file
of ours without its folder. A folder written by others is read by :func:`load_folder` from ``config.json``.

Conventions, ours -> theirs (each is exact, so export and import lose nothing):

* codes: compressed-tensors' ``int`` type is signed, ``-2^(b-1)..2^(b-1)-1``, stored with the offset
  ``2^(b-1)``; ``x = (q - zp) * scale``. qcore's asymmetric codes ``u`` (``0..2^b-1``) and zero points ``z`` are
  theirs plus the offset: ``q = u - 2^(b-1)``, ``zp = z - 2^(b-1)``, the same bytes once offset. qcore's
  symmetric codes (``-(2^(b-1)-1)..2^(b-1)-1``) are a subset of theirs, stored with the same offset.
* import: a symmetric tensor that uses the code ``-2^(b-1)`` (their full range; qcore's symmetric range lacks
  it) is read as an asymmetric qcore tensor with codes ``q + 2^(b-1)`` and zero point ``2^(b-1)``: the same
  values, exactly.
* scales: float32 here; theirs may be float16/bfloat16 (the model's dtype), widened exactly to float32 on import.
  A loader that builds the model in bfloat16 rounds our float32 scales to bfloat16 as it loads them.
* packing: qcore's packed rows zero-padded to a multiple of 4 bytes are ``pack_to_int32`` bit for bit.

>>> import qcore
>>> [e[:2] for e in CT.entries("fc.weight", (16, 64), qcore.QuantScheme(4, False, qcore.PerGroup(32)))]
[('fc.weight_packed', 'I32'), ('fc.weight_scale', 'F32'), ('fc.weight_zero_point', 'I32'), ('fc.weight_shape', 'I64')]
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping, Optional, Sequence

import numpy as np

from .. import checkpoint as ck
from ..quantize import QuantizedArray
from ..scheme import PerChannel, PerGroup, PerTensor, QuantScheme
from . import CheckpointFormat, register_format

__all__ = ["CompressedTensorsFormat", "CT", "QUANT_METHOD", "PACK_FORMAT", "load_folder", "is_ct_config",
           "schemes_from_config"]

QUANT_METHOD = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
META_VERSION = "qcore-ct.version"
META_QUANTIZED = "qcore-ct.quantized"
FIELDS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
_SCALE_CODES = ("F32", "F16", "BF16")


def _module(name: str) -> str:
    return name[: -len(".weight")]


def _words(nbits: int) -> int:
    return -(-nbits // 32)


def _to_words(packed: np.ndarray) -> np.ndarray:
    """uint8 rows -> little-endian int32 rows, each zero-padded to a multiple of 4 bytes."""
    rows, nb = packed.shape
    out = np.zeros((rows, 4 * _words(8 * nb)), np.uint8)
    out[:, :nb] = packed
    return out.view("<i4").astype(np.int32, copy=False)


def _from_words(words: np.ndarray, length: int, bits: int, what: str) -> np.ndarray:
    """int32 rows -> the uint8 bytes qcore packs for ``length`` codes of ``bits``; padding must be zero."""
    raw = np.ascontiguousarray(words.astype("<i4", copy=False)).view(np.uint8).reshape(words.shape[0], -1)
    nb = -(-length * bits // 8)
    bad = raw[:, nb:].any(axis=1)
    used = (length * bits) % 8  # bits of a row's last byte that hold codes
    if used and nb:
        bad |= (raw[:, nb - 1] >> used) != 0
    if bad.any():
        raise ValueError(f"{what}: padding bits after the {length} codes of row {int(np.argmax(bad))} are not "
                         f"zero (not the layout pack_to_int32 writes)")
    return np.ascontiguousarray(raw[:, :nb])


def _strategy(scheme: QuantScheme) -> tuple:
    g = scheme.granularity
    if isinstance(g, PerGroup):
        return "group", g.size
    if isinstance(g, PerChannel):
        return "channel", None
    return "tensor", None


def _scale_shape(shape: tuple, scheme: QuantScheme) -> tuple:
    kind, size = _strategy(scheme)
    if kind == "group":
        return (shape[0], -(-shape[1] // size))  # ceil: a ragged last group has its own scale, as in their files
    return (shape[0], 1) if kind == "channel" else (1,)


def weights_args(scheme: QuantScheme) -> dict:
    """compressed-tensors' ``QuantizationArgs`` of the weights for ``scheme`` (as JSON)."""
    kind, size = _strategy(scheme)
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric, "strategy": kind,
            "group_size": size, "dynamic": False, "actorder": None, "observer": "minmax"}


class CompressedTensorsFormat(CheckpointFormat):
    name = QUANT_METHOD
    version = 1
    metadata_prefix = "qcore-ct."

    def check(self, name, shape, scheme):
        if not name.endswith(".weight") or name == ".weight":
            return "compressed-tensors stores the weight of a module M as M.weight_packed: the name must end in .weight"
        if len(shape) != 2 or 0 in shape:
            return f"compressed-tensors stores 2-D weights with elements, got shape {list(shape)}"
        g = scheme.granularity
        if isinstance(g, PerChannel) and g.axis % 2 != 0:
            return "compressed-tensors has one scale per output channel (axis 0), not per column"
        if isinstance(g, PerGroup) and g.axis % 2 != 1:
            return "compressed-tensors groups run along the input axis (-1), not along axis 0"
        if isinstance(g, PerTensor) and not scheme.symmetric:
            return "asymmetric per-tensor weights are not written in compressed-tensors (use per channel or group)"
        return None

    def _checked(self, name, shape, scheme):
        problem = self.check(name, tuple(shape), scheme)
        if problem:
            raise ValueError(f"tensor {name!r} {list(shape)}, {scheme}: {problem}")

    def entries(self, name, shape, scheme):
        shape = tuple(int(n) for n in shape)
        self._checked(name, shape, scheme)
        m, b = _module(name), scheme.bits
        pshape = _scale_shape(shape, scheme)
        out = [(f"{m}.weight_packed", "I32", (shape[0], _words(shape[1] * b))),
               (f"{m}.weight_scale", "F32", pshape)]
        if not scheme.symmetric:
            out.append((f"{m}.weight_zero_point", "I32", (_words(shape[0] * b), pshape[1])))
        out.append((f"{m}.weight_shape", "I64", (2,)))
        return out

    def candidates(self, name):
        m = _module(name) if name.endswith(".weight") else name
        return tuple(f"{m}.{f}" for f in FIELDS)

    def row_multiple(self, scheme):
        # zero points are packed along the rows: a piece of 32 rows fills whole int32 words
        return 1 if scheme.symmetric else 32

    def encode(self, name, qa):
        return self.encode_rows(name, qa, qa.shape, 0)

    def encode_rows(self, name, qa, shape, row0):
        shape = tuple(int(n) for n in shape)
        self._checked(name, shape, qa.scheme)
        m, s = _module(name), qa.scheme
        rows = qa.shape[0]
        if row0 % self.row_multiple(s) or (row0 + rows < shape[0] and rows % self.row_multiple(s)):
            raise ValueError(f"tensor {name!r}: rows {row0}:{row0 + rows} do not fill whole zero-point words")
        sshape = _scale_shape(shape, s)
        out = {f"{m}.weight_packed": _to_words(qa.packed()),
               f"{m}.weight_scale": qa.scale.reshape((rows, sshape[1]) if len(sshape) == 2 else (1,))}
        if not s.symmetric:
            from ..packing import pack

            zp = qa.zero_point.reshape(rows, -1)
            out[f"{m}.weight_zero_point"] = np.ascontiguousarray(_to_words(pack(zp.T, s.bits)).T)
        if row0 == 0:
            out[f"{m}.weight_shape"] = np.array(shape, np.int64)
        return out

    def decode(self, path, name, scheme, shape, arrays):
        m = _module(name)
        try:
            return decode_parts(arrays, m, scheme, "symmetric" if scheme.symmetric else "asymmetric", shape)
        except (ValueError, TypeError) as e:
            raise ck._bad(path, f"quantized tensor {name!r}: {e}") from None

    def describe(self, scheme, shape, dtype=None):
        d = {"scheme": scheme.to_dict(), "shape": [int(n) for n in shape]}
        if dtype is not None:
            d["dtype"] = np.dtype(dtype).name
        return d

    def file_metadata(self, described, extra=None):
        md = dict(extra or {})
        bad = [k for k in md if not isinstance(k, str) or self.owns_key(k)]
        if bad:
            raise ValueError(f"metadata keys starting with {self.metadata_prefix!r} are reserved, got {bad[0]!r}")
        md.setdefault("format", "pt")  # what transformers' safetensors loading expects
        md[META_VERSION] = str(self.version)
        md[META_QUANTIZED] = json.dumps(dict(described), separators=(",", ":"), sort_keys=True)
        return md

    def read_table(self, header):
        p, md = header.path, header.metadata
        keys = [k for k in md if self.owns_key(k)]
        if not keys:
            return {}
        if md.get(META_VERSION) != str(self.version):
            raise ck._bad(p, f"metadata {META_VERSION}: {md.get(META_VERSION)!r:.40} is not a version this qcore "
                             f"reads ({self.version})")
        table = ck._load_json(md.get(META_QUANTIZED, "{}").encode("utf-8"), p, f"metadata {META_QUANTIZED}")
        if not isinstance(table, dict):
            raise ck._bad(p, f"metadata {META_QUANTIZED}: expected a JSON object")
        out = {}
        for name, entry in table.items():
            where = f"quantized tensor {ck._brief(name)}"
            if ck._name_problem(name) or not isinstance(entry, dict) or not {"scheme", "shape"} <= set(entry):
                raise ck._bad(p, f"{where}: metadata entry must have scheme and shape")
            try:
                scheme = QuantScheme.from_dict(entry["scheme"])
            except (ValueError, TypeError) as e:
                raise ck._bad(p, f"{where}: field scheme: {e}") from None
            shape = ck._check_shape(entry["shape"], f"{where}: field shape", p)
            problem = self.check(name, shape, scheme)
            if problem:
                raise ck._bad(p, f"{where}: {problem}")
            out[name] = (scheme, shape, entry.get("dtype"))
        return out

    def folder_config(self, producer, version, quantized, dense=()):
        """compressed-tensors' ``quantization_config``: one config group per scheme (targets ``Linear`` when all
        quantized layers share one scheme, else their module names), and every dense 2-D weight's module in
        ``ignore``. No qcore marker: transformers loads the folder through its own integration."""
        by_scheme: dict = {}
        for name, s in quantized.items():
            by_scheme.setdefault(s, []).append(_module(name))
        groups = {}
        for i, (s, modules) in enumerate(by_scheme.items()):
            groups[f"group_{i}"] = {"targets": ["Linear"] if len(by_scheme) == 1 else sorted(modules),
                                    "weights": weights_args(s), "input_activations": None,
                                    "output_activations": None, "format": PACK_FORMAT}
        ignore = sorted({n[: -len(".weight")] if n.endswith(".weight") else n for n in dense})
        return {"quant_method": QUANT_METHOD, "format": PACK_FORMAT, "quantization_status": "compressed",
                "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
                "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


CT = register_format(CompressedTensorsFormat())


# ---------------------------------------------------------------------------------------------------------
# Decoding, shared by our files (scheme from the file's table) and others' (scheme from config.json)
# ---------------------------------------------------------------------------------------------------------

def _field(arrays: Mapping, m: str, field: str, dtypes: tuple, ndim: int) -> np.ndarray:
    a = arrays.get(f"{m}.{field}")
    if a is None:
        raise ValueError(f"field {field}: missing tensor {m}.{field}")
    a = np.asarray(a)
    if ck.dtype_code(a.dtype) not in dtypes or a.ndim != ndim:
        raise ValueError(f"field {field}: {ck.dtype_code(a.dtype)} {list(a.shape)}, expected {'/'.join(dtypes)} "
                         f"with {ndim} dimension(s)")
    return a


def decode_parts(arrays: Mapping, m: str, scheme: QuantScheme, kind: str, shape=None) -> QuantizedArray:
    """The :class:`QuantizedArray` of module ``m``'s weight from its entries ``{tensor name: array}``.

    ``scheme`` gives bits and granularity; ``kind`` is ``"asymmetric"``, ``"symmetric"`` (qcore's range: a code
    ``-2^(b-1)`` is an error) or ``"full"`` (compressed-tensors' symmetric range: a tensor that uses
    ``-2^(b-1)`` becomes asymmetric with zero point ``2^(b-1)``). ``ValueError`` naming the field otherwise."""
    b = scheme.bits
    ws = _field(arrays, m, "weight_shape", ("I64", "I32"), 1)
    if ws.shape != (2,) or (ws < 0).any():
        raise ValueError(f"field weight_shape: {ws.tolist()}, expected [rows, cols]")
    wshape = tuple(int(n) for n in ws)
    if shape is not None and wshape != tuple(shape):
        raise ValueError(f"field weight_shape: {list(wshape)}, the metadata says {list(shape)}")
    problem = CT.check(f"{m}.weight", wshape, scheme)
    if problem:
        raise ValueError(f"shape {list(wshape)}, {scheme}: {problem}")
    rows, cols = wshape
    packed = _field(arrays, m, "weight_packed", ("I32",), 2)
    if packed.shape != (rows, _words(cols * b)):
        raise ValueError(f"field weight_packed: shape {list(packed.shape)}, expected {[rows, _words(cols * b)]} for "
                         f"{list(wshape)} at {b} bits")
    scale = _field(arrays, m, "weight_scale", _SCALE_CODES, len(_scale_shape(wshape, scheme)))
    if scale.shape != _scale_shape(wshape, scheme):
        raise ValueError(f"field weight_scale: shape {list(scale.shape)}, expected {list(_scale_shape(wshape, scheme))}")
    scale = scale.astype(np.float32).reshape(scheme.params_shape(wshape))  # float16/bfloat16 widen exactly
    u8 = _from_words(packed, cols, b, "field weight_packed")
    zp = None
    if kind == "asymmetric":
        zpw = _field(arrays, m, "weight_zero_point", ("I32",), 2)
        n_par = scale.reshape(rows, -1).shape[1]
        if zpw.shape != (_words(rows * b), n_par):
            raise ValueError(f"field weight_zero_point: shape {list(zpw.shape)}, expected "
                             f"{[_words(rows * b), n_par]}")
        from ..packing import unpack

        zp = unpack(_from_words(np.ascontiguousarray(zpw.T), rows, b, "field weight_zero_point"), b, rows).T
        zp = np.ascontiguousarray(zp).reshape(scheme.params_shape(wshape))
    elif f"{m}.weight_zero_point" in arrays:
        raise ValueError("field weight_zero_point: present, but the scheme is symmetric")
    if kind == "full":
        from ..packing import unpack

        codes_u = unpack(u8, b, cols)
        if b == 1 or (codes_u.size and not codes_u.all()):  # uses their extra code -2^(b-1): exact as asymmetric
            scheme = QuantScheme(b, False, scheme.granularity)
            zp = np.full(scheme.params_shape(wshape), 1 << (b - 1), np.uint8)
        else:
            scheme = QuantScheme(b, True, scheme.granularity)
    elif kind == "symmetric":
        scheme = QuantScheme(b, True, scheme.granularity)
    if b == 8:
        codes = u8 if not scheme.symmetric else (u8.astype(np.int16) - 128).astype(np.int8)
        return QuantizedArray.from_parts(codes, scale, zp, scheme)
    return QuantizedArray.from_packed(u8, scale, zp, scheme, wshape)


# ---------------------------------------------------------------------------------------------------------
# Folders written by compressed-tensors (or by us): the scheme comes from config.json
# ---------------------------------------------------------------------------------------------------------

def is_ct_config(config: Mapping) -> bool:
    """Whether a ``config.json`` object declares a compressed-tensors checkpoint."""
    qc = config.get("quantization_config") if isinstance(config, Mapping) else None
    return isinstance(qc, Mapping) and qc.get("quant_method") == QUANT_METHOD


def _granularity(args: Mapping, where: str):
    strategy, size = args.get("strategy"), args.get("group_size")
    if strategy == "group" or (strategy is None and isinstance(size, int) and size > 0):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{where}: strategy group needs a positive group_size, got {size!r}")
        return PerGroup(size)
    if strategy == "channel":
        return PerChannel(0)
    if strategy in ("tensor", None):
        return PerTensor()
    raise ValueError(f"{where}: strategy {strategy!r} is not one qtorch imports (channel, group, tensor)")


def schemes_from_config(qc: Mapping, where: str = "quantization_config") -> list:
    """``[(targets, QuantScheme, kind)]`` of a compressed-tensors ``quantization_config`` (``kind``: see
    :func:`decode_parts`); a ``ValueError`` naming what qtorch cannot import (activation quantization, act-order,
    float types, other formats)."""
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(f"{where}: no config_groups")
    out = []
    for gname, g in groups.items():
        w = f"{where}: config_groups.{gname}"
        if not isinstance(g, Mapping):
            raise ValueError(f"{w}: expected an object")
        gfmt = g.get("format") or fmt
        if gfmt != PACK_FORMAT:
            raise ValueError(f"{w}: format {gfmt!r}; qtorch imports {PACK_FORMAT!r} only")
        if g.get("input_activations") or g.get("output_activations"):
            raise ValueError(f"{w}: activation quantization is not imported (qtorch runs weight-only schemes)")
        args = g.get("weights")
        if not isinstance(args, Mapping):
            raise ValueError(f"{w}: no weights arguments")
        if args.get("type", "int") != "int":
            raise ValueError(f"{w}: weights type {args.get('type')!r}; qtorch imports int only")
        if args.get("actorder") or args.get("dynamic") or args.get("block_structure"):
            raise ValueError(f"{w}: act-order, dynamic and block weights are not imported")
        bits = args.get("num_bits")
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise ValueError(f"{w}: num_bits {bits!r} is not in 1..8")
        targets = g.get("targets") or []
        if isinstance(targets, str):
            targets = [targets]
        sym = bool(args.get("symmetric", True))
        scheme = QuantScheme(bits, False if bits == 1 else sym, _granularity(args, w))
        out.append((list(targets), scheme, "full" if sym else "asymmetric"))
    return out


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return module == target or module.endswith("." + target) or ("." not in target and target[:1].isupper())


def load_folder(folder) -> dict:
    """``{name: QuantizedArray or numpy array}`` of a ``pack-quantized`` model folder (``config.json`` with a
    compressed-tensors ``quantization_config``): each ``M.weight_packed`` group becomes the quantized
    ``M.weight``, codes kept. Everything is checked first; a ``ValueError`` names the file, tensor and field."""
    from ..model_folder import read_config

    folder = os.fspath(folder)
    config = read_config(folder)
    cfg_path = os.path.join(folder, "config.json")
    if not is_ct_config(config):
        raise ValueError(f"{cfg_path}: no compressed-tensors quantization_config")
    groups = schemes_from_config(config["quantization_config"], f"{cfg_path}: quantization_config")
    kind, files, shards = ck.checkpoint_files(folder)
    out: dict = {}
    for fpath in files:
        header = ck.read_header(fpath)
        if shards is not None:
            ck._check_shard_index(header, shards[os.path.basename(fpath)], os.path.join(folder, ck.INDEX_NAME))
        raw = ck._read_tensors(header)
        modules = [n[: -len(".weight_packed")] for n in raw if n.endswith(".weight_packed")]
        for m in modules:
            if f"{m}.weight" in raw:
                raise ck._bad(fpath, f"module {m!r}: both weight and weight_packed")
            if f"{m}.weight_g_idx" in raw:
                raise ck._bad(fpath, f"module {m!r}: weight_g_idx (act-order) is not imported")
            chosen = next(((s, k) for targets, s, k in groups if any(_matches(t, m) for t in targets)), None)
            if chosen is None:
                chosen = groups[0][1:] if len(groups) == 1 else None
            if chosen is None:
                raise ck._bad(fpath, f"module {m!r}: no config group of {cfg_path} targets it")
            parts = {f"{m}.{f}": raw.pop(f"{m}.{f}") for f in FIELDS if f"{m}.{f}" in raw}
            try:
                qa = decode_parts(parts, m, chosen[0], chosen[1])
            except (ValueError, TypeError) as e:
                raise ck._bad(fpath, f"quantized tensor {m + '.weight'!r}: {e}") from None
            out[f"{m}.weight"] = qa
        for name, arr in raw.items():
            if name in out:
                raise ck._bad(fpath, f"tensor {name!r} is also in another file")
            out[name] = arr
    return out
