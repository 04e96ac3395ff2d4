"""The ``"qcore"`` checkpoint format: ``W.qweight``, ``W.scale``, ``W.zero_point`` and a versioned JSON table.

==================  =====  =======================================================================
tensor              dtype  shape and content
==================  =====  =======================================================================
``W.qweight``       U8     ``packed_shape(shape, s.bits)``: codes packed along the last axis,
                           signed codes offset by ``2^(b-1)``. **8 bits:** the codes themselves,
                           I8 (-127..127) when symmetric, U8 (0..255) when asymmetric.
``W.scale``         F32    ``s.params_shape(shape)``; finite and > 0
``W.zero_point``    U8     same shape as the scale, in ``0..2^b-1``; asymmetric schemes only
==================  =====  =======================================================================

``__metadata__``: ``"qcore.format_version": "1"`` and ``"qcore.quantized"``, a JSON object
``{"W": {"scheme": s.to_dict(), "shape": [...], "dtype": "bfloat16"}}`` (``dtype`` optional).

>>> import qcore
>>> QCORE.entries("w", (2, 10), qcore.QuantScheme(3, True, qcore.PerChannel(0)))
[('w.qweight', 'U8', (2, 4)), ('w.scale', 'F32', (2,))]
"""

from __future__ import annotations

import json
from typing import Mapping, Optional

import numpy as np

from .. import checkpoint as ck
from ..params import check_zero_point
from ..quantize import QuantizedArray, check_grid
from ..scheme import QuantScheme
from . import CheckpointFormat, register_format

__all__ = ["QcoreFormat", "QCORE", "FORMAT_VERSION", "META_VERSION", "META_QUANTIZED", "FIELDS"]

#: Version of the qcore layer of the file format (``__metadata__["qcore.format_version"]``).
FORMAT_VERSION = 1
META_VERSION = "qcore.format_version"
META_QUANTIZED = "qcore.quantized"
#: The entries of one quantized tensor ``W``: ``W.qweight``, ``W.scale`` and (asymmetric) ``W.zero_point``.
FIELDS = ("qweight", "scale", "zero_point")
_FLOAT_NAMES = {"float16", "bfloat16", "float32", "float64"}


def _packed_shape(shape: tuple, bits: int) -> tuple:
    from ..packing import packed_shape

    return tuple(int(n) for n in packed_shape(tuple(shape), bits))


def encode_qweight(qa: QuantizedArray) -> np.ndarray:
    """The ``.qweight`` array of ``qa``: packed uint8 codes, or the int8/uint8 codes themselves at 8 bits."""
    return np.ascontiguousarray(qa.codes) if qa.scheme.bits == 8 else qa.packed()


class QcoreFormat(CheckpointFormat):
    name = "qcore"
    version = FORMAT_VERSION
    metadata_prefix = "qcore."

    def entries(self, name, shape, scheme):
        shape = tuple(int(n) for n in shape)
        if scheme.bits == 8:
            q = (f"{name}.qweight", "I8" if scheme.symmetric else "U8", shape)
        else:
            q = (f"{name}.qweight", "U8", _packed_shape(shape, scheme.bits))
        pshape = tuple(scheme.params_shape(shape))
        out = [q, (f"{name}.scale", "F32", pshape)]
        if not scheme.symmetric:
            out.append((f"{name}.zero_point", "U8", pshape))
        return out

    def candidates(self, name):
        return tuple(f"{name}.{field}" for field in FIELDS)

    def encode(self, name, qa):
        out = {f"{name}.qweight": encode_qweight(qa), f"{name}.scale": qa.scale}
        if not qa.scheme.symmetric:
            out[f"{name}.zero_point"] = qa.zero_point
        return out

    def decode(self, path, name, scheme, shape, arrays):
        q, scale = arrays[f"{name}.qweight"], arrays[f"{name}.scale"]
        zp = None if scheme.symmetric else arrays[f"{name}.zero_point"]
        where = f"quantized tensor {name!r}"
        try:
            check_zero_point(zp, scheme)
        except ValueError as e:
            raise ck._bad(path, f"{where}: field zero_point: {e}") from None
        try:
            check_grid(scale, zp, scheme)  # finite, > 0, and no code of the scheme dequantizes to inf
        except ValueError as e:
            raise ck._bad(path, f"{where}: field scale: {e}") from None
        used = (shape[-1] * scheme.bits) % 8  # bits of a row's last byte that hold codes; the rest is padding
        pad = np.uint8((0xFF << used) & 0xFF)
        if scheme.bits < 8 and used and q.size and (q[..., -1] & pad).any():
            idx = tuple(int(i) for i in np.argwhere(q[..., -1] & pad)[0])
            raise ck._bad(path, f"{where}: field qweight: padding bits of the last byte of row {idx} are not zero "
                                f"(0x{int(q[idx + (-1,)]):02x}; {shape[-1]} codes of {scheme.bits} bits use the "
                                f"low {used} bits of it): not the packing layout qcore writes")
        try:
            if scheme.bits == 8:
                qa = QuantizedArray.from_parts(q, scale, zp, scheme)
            else:
                qa = QuantizedArray.from_packed(q, scale, zp, scheme, shape)
        except (ValueError, TypeError) as e:
            raise ck._bad(path, f"{where}: field qweight: {e}") from None
        if qa.shape != shape:
            raise ck._bad(path, f"{where}: field qweight: decodes to shape {qa.shape}, metadata says {list(shape)}")
        return qa

    def describe(self, scheme, shape, dtype=None):
        d = {"scheme": scheme.to_dict(), "shape": [int(n) for n in shape]}
        if dtype is not None:
            d["dtype"] = np.dtype(dtype).name
        return d

    def file_metadata(self, described: Mapping[str, dict], extra: Optional[Mapping[str, str]] = None) -> dict:
        md = dict(extra or {})
        bad = [k for k in md if not isinstance(k, str) or self.owns_key(k)]
        if bad:
            raise ValueError(f"metadata keys starting with {self.metadata_prefix!r} are reserved, got {bad[0]!r}")
        md[META_VERSION] = str(FORMAT_VERSION)
        md[META_QUANTIZED] = json.dumps(dict(described), separators=(",", ":"), sort_keys=True)
        return md

    def index_metadata(self):
        return {META_VERSION: str(FORMAT_VERSION)}

    def read_table(self, header):
        p, md = header.path, header.metadata
        qkeys = [k for k in md if self.owns_key(k)]
        if not qkeys:
            return {}
        if META_VERSION not in md:
            raise ck._bad(p, f"metadata has {qkeys[0]!r} but no {META_VERSION!r}")
        if md[META_VERSION] != str(FORMAT_VERSION):
            raise ck._bad(p, f"metadata {META_VERSION}: unknown qcore format version {md[META_VERSION]!r:.40}; this "
                             f"qcore reads version {FORMAT_VERSION} (upgrade qcore to read newer files)")
        unknown = sorted(set(qkeys) - {META_VERSION, META_QUANTIZED})
        if unknown:
            raise ck._bad(p, f"metadata: unexpected qcore keys {unknown}")
        table = ck._load_json(md.get(META_QUANTIZED, "{}").encode("utf-8"), p, f"metadata {META_QUANTIZED}")
        if not isinstance(table, dict):
            raise ck._bad(p, f"metadata {META_QUANTIZED}: expected a JSON object")
        out = {}
        for name, entry in table.items():
            problem = ck._name_problem(name)
            if problem:
                raise ck._bad(p, f"metadata {META_QUANTIZED}: quantized tensor {ck._brief(name)}: {problem}")
            where = f"quantized tensor {name!r}"
            if not isinstance(entry, dict) or not {"scheme", "shape"} <= set(entry) <= {"scheme", "shape", "dtype"}:
                raise ck._bad(p, f"{where}: metadata entry must have scheme, shape and optionally dtype; got "
                                 f"{ck._brief(entry)}")
            try:
                scheme = QuantScheme.from_dict(entry["scheme"])
            except (ValueError, TypeError) as e:
                raise ck._bad(p, f"{where}: field scheme: {e}") from None
            shape = ck._check_shape(entry["shape"], f"{where}: field shape", p)
            try:
                scheme.validate_shape(shape)
            except ValueError as e:
                raise ck._bad(p, f"{where}: field shape {list(shape)} does not fit the scheme: {e}") from None
            dtype = entry.get("dtype")
            if dtype is not None and (not isinstance(dtype, str) or dtype not in _FLOAT_NAMES):
                raise ck._bad(p, f"{where}: field dtype {ck._brief(dtype)} must be one of {sorted(_FLOAT_NAMES)}")
            out[name] = (scheme, shape, dtype)
        return out


QCORE = register_format(QcoreFormat())
