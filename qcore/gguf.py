"""GGUF (llama.cpp) tensors as qcore arrays: Q8_0, Q4_0 and Q4_1 blocks, bit for bit, and whole files.

GGUF quantizes each run of 32 values along a row (``PerGroup(32, axis=-1)``) with a float16 block scale ``d``:

====== =============================== ===================================================================
type   GGUF block (bytes)              qcore
====== =============================== ===================================================================
Q8_0   d f16, 32 x int8 q              ``QuantScheme(8, True, PerGroup(32))``: codes q, scale d
Q4_0   d f16, 16 bytes of 4-bit q      ``QuantScheme(4, False, PerGroup(32))``, integer zero point:
                                       d >= 0: codes q, zero point 8, scale d;
                                       d < 0 (and -0.0): codes 15 - q, zero point 7, scale -d
Q4_1   d f16, m f16, 16 bytes of q     ``QuantScheme(4, False, PerGroup(32))``, ``zero_point_kind="float"``:
                                       codes q, scale d, zero point m (``x = q * d + m``)
====== =============================== ===================================================================

A block scale of 0 (an all-zero block) becomes qcore's all-zero scale, float32 ``tiny``, which float16 stores as 0
again. :func:`quantize` reproduces ``gguf.quants.quantize`` (float32 block scale for the rounding, float16 for
the stored one; Q8_0 rounds half away from zero, Q4_0/Q4_1 truncate ``+ 0.5``): these are options of their own,
qcore's defaults (round half to even, float32 scales) are unchanged.

>>> import numpy as np
>>> x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
>>> qa = quantize(x, "Q4_1")
>>> qa.zero_point_kind, qa.scale.shape, encode(qa, "Q4_1").shape     # 2 rows of one 20-byte block
('float', (2, 1), (2, 20))
>>> bool((decode(encode(qa, "Q4_1"), "Q4_1", x.shape).codes == qa.codes).all())
True

Files: :func:`import_gguf` reads every tensor of a GGUF file (quantized ones as :class:`QuantizedArray`, F32 /
F16 / BF16 ones as arrays; pure NumPy), :func:`export_gguf` writes one (metadata such as the architecture and
tokenizer copied from a source GGUF or given as a dict) with the ``gguf`` package's writer (``pip install gguf``),
imported only then.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import ml_dtypes
import numpy as np

from ._kernels import F32_TINY
from .quantize import QuantizedArray, check_float_array
from .scheme import PerGroup, QuantScheme

__all__ = ["BLOCK", "TYPES", "scheme_of", "quantize", "encode", "decode", "import_gguf", "export_gguf",
           "write_gguf", "read_metadata", "read_header", "tokenizer_metadata"]

#: values per block of every GGUF quantized type qcore handles
BLOCK = 32
#: the quantized types, and their bytes per block
TYPES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
_FLOAT_TYPES = ("F32", "F16", "BF16")
_F16_MAX = float(np.finfo(np.float16).max)


def scheme_of(qtype: str) -> QuantScheme:
    """The qcore scheme of a GGUF quantized type (blocks of 32 along the last axis)."""
    _check_type(qtype)
    return QuantScheme(8, True, PerGroup(BLOCK)) if qtype == "Q8_0" else QuantScheme(4, False, PerGroup(BLOCK))


def _check_type(qtype) -> str:
    if qtype not in TYPES:
        raise ValueError(f"GGUF type {qtype!r} is not supported here; expected one of {sorted(TYPES)}")
    return qtype


def _blocks(x: np.ndarray, what: str) -> np.ndarray:
    if x.shape[-1] % BLOCK:
        raise ValueError(f"{what}: the last axis ({x.shape[-1]}) must be a multiple of the GGUF block size {BLOCK}")
    return x.reshape(-1, BLOCK)


def _roundf(n: np.ndarray) -> np.ndarray:
    """Round half away from zero, as C's roundf (llama.cpp's Q8_0), in ``n``'s dtype."""
    a = abs(n)
    floored = np.floor(a)
    return np.sign(n) * (floored + np.floor(2 * (a - floored)))


def _f16(d: np.ndarray, what: str, name: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = d.astype(np.float16)
    bad = ~np.isfinite(h)
    if bad.any():
        i = int(np.argwhere(bad.reshape(-1))[0, 0])
        raise ValueError(f"{name}: block {i} has {what} {float(d.reshape(-1)[i]):.6g}, beyond float16 (|{what}| <= "
                         f"{_F16_MAX:g}); GGUF stores it as float16")
    return h


def _scale_of(h: np.ndarray) -> np.ndarray:
    """qcore's float32 scale of float16 block scales ``|h|``: 0 becomes the all-zero scale, float32 tiny."""
    s = np.abs(h.astype(np.float32))
    return np.where(s == 0, F32_TINY, s).astype(np.float32)


def quantize(x, qtype: str, *, name: str = "x") -> QuantizedArray:
    """``x`` (float, last axis a multiple of 32) quantized exactly as ``gguf.quants.quantize(x, qtype)`` does it,
    as a :class:`QuantizedArray` (the mapping in the module docstring): ``encode(quantize(x, t), t)`` equals
    gguf's bytes. The input is rounded to float32 first, as gguf does. ``name`` names ``x`` in messages.

    >>> import numpy as np
    >>> qa = quantize(np.array([[0.5] * 31 + [-1.0]], np.float32), "Q8_0")
    >>> int(qa.codes[0, 0]), float(qa.scale[0, 0])     # 0.5 * 127 = 63.5 rounds away from zero
    (64, 0.00787353515625)
    """
    _check_type(qtype)
    x = check_float_array(x, name)
    with np.errstate(over="ignore"):
        xf = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(xf).all():
        i = tuple(int(v) for v in np.argwhere(~np.isfinite(xf))[0])
        raise ValueError(f"{name} has {x[i]} at index {i}: GGUF blocks hold finite float32 values only")
    b = _blocks(xf, name)
    scheme = scheme_of(qtype)
    pshape = scheme.params_shape(x.shape)
    # the statements below are gguf.quants' own, so that every float32 rounding happens in the same place
    if qtype == "Q8_0":
        d = abs(b).max(axis=1, keepdims=True) / 127
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, 0, 1 / d)
        codes = _roundf(b * inv).astype(np.int8)
        h = _f16(d, "scale", name)
        return QuantizedArray(codes.reshape(x.shape), _scale_of(h).reshape(pshape), None, scheme)
    if qtype == "Q4_0":
        imax = abs(b).argmax(axis=-1, keepdims=True)
        d = np.take_along_axis(b, imax, axis=-1) / -8
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, 0, 1 / d)
        q = np.trunc((b * inv) + np.float32(8.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
        h = _f16(d, "scale", name)
        return _q4_0_array(q, h, x.shape, scheme)
    mx, mn = b.max(axis=-1, keepdims=True), b.min(axis=-1, keepdims=True)
    d = (mx - mn) / 15
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    q = np.trunc((b - mn) * inv + np.float32(0.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    h, m = _f16(d, "scale", name), _f16(mn, "minimum", name)
    return QuantizedArray(q.reshape(x.shape), _scale_of(h).reshape(pshape), m.astype(np.float32).reshape(pshape),
                          scheme, "float")


def _q4_0_array(q: np.ndarray, h: np.ndarray, shape, scheme) -> QuantizedArray:
    # (q - 8) * d == (15 - q - 7) * (-d) exactly: a negative d folds into the codes and zero point 7
    neg = np.signbit(h)
    codes = np.where(neg, np.uint8(15) - q, q).astype(np.uint8)
    zp = np.where(neg, 7, 8).astype(np.uint8)
    pshape = scheme.params_shape(tuple(shape))
    return QuantizedArray(codes.reshape(shape), _scale_of(h).reshape(pshape), zp.reshape(pshape), scheme)


def _check_array(qa: QuantizedArray, qtype: str, name: str) -> None:
    if not isinstance(qa, QuantizedArray):
        raise TypeError(f"{name}: expected a qcore.QuantizedArray, got {type(qa).__name__}")
    g = qa.scheme.granularity
    want = scheme_of(qtype)
    if (qa.scheme.bits, qa.scheme.symmetric) != (want.bits, want.symmetric) or not isinstance(g, PerGroup) \
            or g.size != BLOCK or g.axis % len(qa.shape) != len(qa.shape) - 1:
        raise ValueError(f"{name}: GGUF {qtype} holds {want} (blocks of {BLOCK} along the last axis), got "
                         f"{qa.scheme}")
    if qa.shape[-1] % BLOCK:  # qcore's groups of 32 would end in a shorter one: GGUF blocks are all whole
        raise ValueError(f"{name}: GGUF {qtype} needs a last axis that is a multiple of {BLOCK}, got shape "
                         f"{list(qa.shape)} (a ragged last group is not expressible in GGUF blocks)")
    kind = "float" if qtype == "Q4_1" else "int"
    if qa.zero_point_kind != kind:
        raise ValueError(f"{name}: GGUF {qtype} needs zero_point_kind={kind!r}, got {qa.zero_point_kind!r}")


def _stored(v: np.ndarray, what: str, name: str, tiny_is_zero: bool) -> np.ndarray:
    """``v`` as float16, refusing a value that float16 does not hold exactly (the file would hold another grid)."""
    h = v.astype(np.float16)
    if tiny_is_zero:
        h = np.where(v == F32_TINY, np.float16(0), h)
    bad = h.astype(np.float32) != v
    if tiny_is_zero:
        bad &= v != F32_TINY
    if bad.any():
        i = int(np.argwhere(bad.reshape(-1))[0, 0])
        raise ValueError(f"{name}: {what} {float(v.reshape(-1)[i]):.9g} of block {i} is not a float16 value, which GGUF "
                         "stores; quantize with qcore.gguf.quantize")
    return h


def _nibbles(q: np.ndarray) -> np.ndarray:
    """GGUF's 4-bit packing: byte j of a block holds element j (low nibble) and element j + 16 (high)."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def encode(qa: QuantizedArray, qtype: str, *, name: str = "tensor") -> np.ndarray:
    """The GGUF bytes of ``qa``: uint8 ``[..., K / 32 * bytes per block]`` (the form ``gguf.quants.quantize``
    returns and ``GGUFWriter.add_tensor(..., raw_dtype=...)`` takes). ``ValueError`` (naming ``name``) when the
    array's scheme, zero points or scales are not the type's: Q4_0 needs zero point 8 (or 7, a negative block
    scale), and every scale and float zero point must be a float16 value."""
    _check_type(qtype)
    _check_array(qa, qtype, name)
    n = qa.codes.size // BLOCK
    if qtype == "Q4_0" and not np.isin(qa.zero_point, (7, 8)).all():
        zp = qa.zero_point.reshape(-1)
        i = int(np.argwhere(~np.isin(zp, (7, 8)))[0, 0])
        raise ValueError(f"{name}: Q4_0 needs zero point 8 (or 7 with the block scale negated); block {i} has "
                         f"{int(zp[i])}: use Q4_1, or quantize with qcore.gguf.quantize")
    s = _stored(qa.scale.reshape(n, 1), "scale", name, True)
    if qtype == "Q8_0":
        out = np.concatenate([s.view(np.uint8), qa.codes.reshape(n, BLOCK).view(np.uint8)], axis=1)
    elif qtype == "Q4_0":
        zp = qa.zero_point.reshape(n, 1)
        codes = qa.codes.reshape(n, BLOCK)
        neg = zp == 7
        q = np.where(neg, np.uint8(15) - codes, codes).astype(np.uint8)
        d = np.where(neg, -s, s).astype(np.float16)
        out = np.concatenate([d.view(np.uint8), _nibbles(q)], axis=1)
    else:
        m = _stored(qa.zero_point.reshape(n, 1), "zero point", name, False)
        out = np.concatenate([s.view(np.uint8), m.view(np.uint8), _nibbles(qa.codes.reshape(n, BLOCK))], axis=1)
    return out.reshape(qa.shape[:-1] + (qa.shape[-1] // BLOCK * TYPES[qtype],))


def decode(data, qtype: str, shape, *, name: str = "tensor") -> QuantizedArray:
    """The :class:`QuantizedArray` of GGUF ``qtype`` bytes ``data`` for a tensor of NumPy ``shape`` (row-major, last
    axis the one blocks run along): lossless, ``encode(decode(b, t, s), t)`` gives ``b`` back.
    ``ValueError`` naming ``name`` for a size that does not fit, a non-finite block scale, or (Q8_0) a code of
    -128 or a negative scale, which qcore's symmetric int8 grid does not hold."""
    _check_type(qtype)
    shape = tuple(int(v) for v in shape)
    if not shape or shape[-1] % BLOCK:
        raise ValueError(f"{name}: GGUF {qtype} needs a last axis that is a multiple of {BLOCK}, got shape {shape}")
    raw = np.ascontiguousarray(np.asarray(data).view(np.uint8))
    n = int(np.prod(shape)) // BLOCK
    if raw.size != n * TYPES[qtype]:
        raise ValueError(f"{name}: {raw.size} bytes of {qtype} data, but shape {shape} needs {n * TYPES[qtype]}")
    b = raw.reshape(n, TYPES[qtype])
    h = b[:, :2].copy().view(np.float16)
    if not np.isfinite(h).all():
        i = int(np.argwhere(~np.isfinite(h.reshape(-1)))[0, 0])
        raise ValueError(f"{name}: block {i} has a non-finite scale {float(h.reshape(-1)[i])}")
    scheme = scheme_of(qtype)
    pshape = scheme.params_shape(shape)
    if qtype == "Q8_0":
        codes = b[:, 2:].copy().view(np.int8)
        if (codes == -128).any() or np.signbit(h[h != 0]).any():
            raise ValueError(f"{name}: a Q8_0 block with code -128 or a negative scale is outside qcore's symmetric "
                             "int8 grid (-127..127, scale > 0)")
        return QuantizedArray(codes.reshape(shape), _scale_of(h).reshape(pshape), None, scheme)
    qs = b[:, -16:]
    q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)
    if qtype == "Q4_0":
        return _q4_0_array(q, h, shape, scheme)
    if np.signbit(h[h != 0]).any():
        raise ValueError(f"{name}: a Q4_1 block with a negative scale is outside qcore's grid (scale > 0)")
    m = b[:, 2:4].copy().view(np.float16)
    if not np.isfinite(m).all():
        raise ValueError(f"{name}: a Q4_1 block has a non-finite minimum")
    qa = QuantizedArray(q.reshape(shape), _scale_of(h).reshape(pshape), m.astype(np.float32).reshape(pshape),
                        scheme, "float")
    qa.params.check(shape)
    return qa


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("writing GGUF files needs the 'gguf' package: pip install gguf") from None
    return gguf


# GGUF's value types (the file format's numbering): scalar struct codes; 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml tensor types qcore reads: id -> name
_GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 30: "BF16"}
_ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


class _Cursor:
    """Little-endian reads from a bytes-like buffer (the file's header, memory-mapped)."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        import struct
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header (at byte {self.pos})")
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header (a string of {n} bytes at byte {self.pos})")
        v = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return v

    def _strings(self, n: int) -> list:
        import struct
        u64, buf, pos, end, out = struct.Struct("<Q").unpack_from, self.buf, self.pos, len(self.buf), []
        for _ in range(n):
            if pos + 8 > end:
                break
            k = u64(buf, pos)[0]
            pos += 8
            out.append(bytes(buf[pos:pos + k]).decode("utf-8", errors="replace"))
            pos += k
        if pos > end or len(out) < n:
            raise ValueError(f"{self.path}: truncated GGUF header (an array of {n} strings at byte {self.pos})")
        self.pos = pos
        return out

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALARS:
            v = self.take(_SCALARS[vtype])
            return float(v) if vtype in (6, 12) else v
        if vtype == _ARRAY:
            item, n = self.take("<I"), self.take("<Q")
            if item == _STRING:  # the vocabulary: 10^5 strings, read in one tight loop
                return self._strings(n)
            if item in _SCALARS and item != 7:
                dt = np.dtype(_SCALARS[item])
                a = np.frombuffer(self.buf, dt, n, self.pos)
                self.pos += n * dt.itemsize
                return a.tolist()
            return [self.value(item) for _ in range(n)]
        raise ValueError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def _read(path):
    """``(metadata, tensors, mapped file)`` of the GGUF file ``path``: metadata as :func:`read_metadata` gives it,
    tensors as ``{name: (type name or "type <id>", NumPy shape, byte offset, byte count)}``."""
    path = os.fspath(path)
    mm = np.memmap(path, np.uint8, "r")
    cur = _Cursor(memoryview(mm), path)
    if bytes(mm[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {bytes(mm[:4])!r})")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.take("<I")
        sub = None
        if vtype == _ARRAY:
            sub = cur.take("<I")
            cur.pos -= 4
        meta[key] = (cur.value(vtype), vtype, sub)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        ndim = cur.take("<I")
        dims = [cur.take("<Q") for _ in range(ndim)]
        tid, offset = cur.take("<I"), cur.take("<Q")
        infos.append((name, _GGML_TYPES.get(tid, f"type {tid}"), tuple(reversed(dims)), offset))
    align = int(meta.get("general.alignment", (32,))[0])
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, kind, shape, offset in infos:
        n = int(np.prod(shape, dtype=np.int64))
        nbytes = (n // BLOCK * TYPES[kind] if kind in TYPES else n * _ITEM_BYTES[kind] if kind in _ITEM_BYTES
                  else 0)
        if start + offset + nbytes > mm.size:
            raise ValueError(f"{path}: tensor {name!r} ends at byte {start + offset + nbytes}, beyond the file "
                             f"({mm.size} bytes)")
        tensors[name] = (kind, shape, start + offset, nbytes)
    return meta, tensors, mm


def import_gguf(path, names=None, *, dequantize_other: bool = False) -> dict:
    """Every tensor of the GGUF file ``path`` (or those in ``names``), by GGUF name: Q8_0 / Q4_0 / Q4_1 as
    :class:`QuantizedArray` (lossless, the mapping in the module docstring), F32 / F16 / BF16 as arrays of that
    dtype, in NumPy's row-major shape (GGUF lists dimensions innermost first: ``[K, N]`` is ``(N, K)`` here).
    Pure NumPy: the ``gguf`` package is not needed for these.

    Another type (K-quants, Q5_0, ...) is a ``ValueError`` naming the tensor and its type, unless
    ``dequantize_other``: then it is ``gguf.quants.dequantize``'s float32 array (the values transformers' loader
    gives; the ``gguf`` package is needed)."""
    _, infos, mm = _read(path)
    want = None if names is None else set(names)
    if want is not None and want - set(infos):
        raise ValueError(f"{path}: no tensor named {sorted(want - set(infos))}")
    out = {}
    for name, (kind, shape, start, nbytes) in infos.items():
        if want is not None and name not in want:
            continue
        raw = mm[start:start + nbytes]
        if kind in TYPES:
            out[name] = decode(raw, kind, shape, name=name)
        elif kind in _FLOAT_TYPES:
            dt = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}[kind]
            out[name] = np.array(raw).view(dt).reshape(shape)
        elif dequantize_other:
            out[name] = _dequantize_other(path, mm, name, kind, shape, start)
        else:
            raise ValueError(f"{path}: tensor {name!r} has GGUF {_type_name(kind)}; qcore reads "
                             f"{sorted(TYPES) + list(_FLOAT_TYPES)} (dequantize_other=True: others as float32)")
    return out


def _type_name(kind: str) -> str:
    """``"type 14"`` as the gguf package names it (``Q6_K``) where it is installed."""
    if not kind.startswith("type "):
        return kind
    try:
        import gguf
        return gguf.GGMLQuantizationType(int(kind[5:])).name
    except (ImportError, ValueError):
        return kind


def _dequantize_other(path, mm, name, kind, shape, start) -> np.ndarray:
    gguf = _gguf()
    try:
        qt = gguf.GGMLQuantizationType(int(kind[5:]))
    except ValueError:
        raise ValueError(f"{path}: tensor {name!r} has an unknown GGUF {kind}") from None
    block, size = gguf.GGML_QUANT_SIZES[qt]
    if not shape or shape[-1] % block:
        raise ValueError(f"{path}: tensor {name!r} ({qt.name}) has shape {shape}, rows not of whole blocks")
    row = shape[-1] // block * size
    nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * row
    if start + nbytes > mm.size:
        raise ValueError(f"{path}: tensor {name!r} ends at byte {start + nbytes}, beyond the file ({mm.size} bytes)")
    raw = np.array(mm[start:start + nbytes]).reshape(shape[:-1] + (row,))
    return np.ascontiguousarray(gguf.quants.dequantize(raw, qt), np.float32).reshape(shape)


def read_metadata(path) -> dict:
    """The key/value metadata of the GGUF file ``path``: ``{key: (value, value type, array item type or None)}``
    (GGUF's type numbers, which ``gguf.GGUFValueType`` names), the form :func:`export_gguf` takes."""
    return _read(path)[0]


def read_header(path) -> tuple:
    """``(metadata, tensors)`` of the GGUF file ``path`` in one pass over its header: :func:`read_metadata`'s dict,
    and ``{name: (GGUF type name, NumPy shape)}`` of its tensors (not read)."""
    meta, infos, _ = _read(path)
    return meta, {name: (kind, shape) for name, (kind, shape, _, _) in infos.items()}


def tokenizer_metadata(folder, *, pre: str = "default") -> dict:
    """The ``tokenizer.ggml.*`` metadata (:func:`export_gguf`'s form) of the byte-level BPE tokenizer (GPT-2
    style: Llama 3, SmolLM, Qwen) in the Hugging Face folder ``folder`` (``tokenizer.json``), as llama.cpp's
    converter writes it: every token by id, added special tokens typed CONTROL and other added tokens
    USER_DEFINED, the merges, the special token ids, the add-BOS/EOS flags and the chat template (by the
    ``gguf`` package's own ``SpecialVocab``). ``pre``: llama.cpp's pre-tokenizer name (its converter recognises it
    by a hash of sample encodings; ``"default"`` unless you know it, e.g. ``"smollm"``, ``"llama-bpe"``).
    ``ValueError`` for another tokenizer kind (SentencePiece: take the metadata from a GGUF of the model)."""
    import json

    gguf = _gguf()
    folder = os.fspath(folder)
    fname = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(fname):
        raise ValueError(f"{folder}: no tokenizer.json (a Hugging Face fast tokenizer is needed)")
    with open(fname, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{fname}: only byte-level BPE tokenizers are converted here, got model "
                         f"{model.get('type')!r} with decoder {(tok.get('decoder') or {}).get('type')!r}")
    vocab = dict(model["vocab"])
    added = {a["id"]: a for a in tok.get("added_tokens") or []}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    n = max(vocab.values()) + 1
    tokens, types = [f"[PAD{i}]" for i in range(n)], [int(gguf.TokenType.USER_DEFINED)] * n
    for text, i in vocab.items():
        tokens[i] = text
        a = added.get(i)
        types[i] = int(gguf.TokenType.NORMAL if a is None else gguf.TokenType.CONTROL if a.get("special")
                       else gguf.TokenType.USER_DEFINED)
    w = gguf.GGUFWriter(None, "none")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=n).add_to_gguf(w, quiet=True)
    meta = {k: (v.value, int(v.type), None if v.sub_type is None else int(v.sub_type))
            for k, v in w.kv_data[0].items() if k != "general.architecture"}
    boolean = int(gguf.GGUFValueType.BOOL)
    # what llama.cpp's converter adds for a byte-level BPE: the ByteLevel pre-tokenizer's prefix space, and the
    # BOS flag from the post-processor's template when tokenizer_config.json does not say
    meta.setdefault("tokenizer.ggml.add_space_prefix", (_add_prefix_space(tok.get("pre_tokenizer")), boolean, None))
    post = tok.get("post_processor") or {}
    single = [next(iter(p.values())).get("id") for p in post.get("single", []) if isinstance(p, dict)]
    bos = meta.get("tokenizer.ggml.bos_token_id", (None,))[0]
    adds_bos = post.get("type") == "TemplateProcessing" and bool(single) and single[0] != "A" and bos is not None
    meta.setdefault("tokenizer.ggml.add_bos_token", (adds_bos, boolean, None))
    return meta


def _add_prefix_space(pre) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return bool(pre.get("add_prefix_space", False))
    return any(_add_prefix_space(p) for p in pre.get("pretokenizers", []))


Tensor = Union[QuantizedArray, np.ndarray]


def export_gguf(path, tensors: Mapping[str, Tensor], metadata, *, types: Optional[Mapping[str, str]] = None) -> None:
    """Write the GGUF file ``path``: ``tensors`` by GGUF name (NumPy row-major shapes), ``metadata`` the source
    GGUF's path or :func:`read_metadata`'s dict (it must hold ``general.architecture``; for llama.cpp also the
    architecture's hyperparameters and the ``tokenizer.ggml.*`` keys), where a plain str, bool or float value (or a
    list of str) also does; an int or a list of numbers needs its GGUF type, ``(value, type, item type)``.

    A :class:`QuantizedArray` is written as ``types[name]`` (default: Q8_0 for a symmetric 8-bit array, Q4_1 for a
    float zero point, Q4_0 otherwise); arrays as F32, F16 or BF16 by their dtype (float64 as F32). Every tensor is
    encoded before anything is written, and the file appears complete or not at all (written beside ``path`` and
    renamed): a tensor GGUF cannot hold is a ``ValueError`` naming it, and ``path`` is left as it was.

    ``gguf.GGUFReader`` reads the result, and ``gguf.quants.dequantize`` of a tensor equals qcore's dequantize.
    """
    gguf = _gguf()
    metadata = read_metadata(metadata) if not isinstance(metadata, Mapping) else _typed_metadata(metadata, gguf)
    if "general.architecture" not in metadata:
        raise ValueError("metadata has no 'general.architecture' (llama.cpp needs it, and the architecture's keys)")
    types = dict(types or {})
    unknown = set(types) - set(tensors)
    if unknown:
        raise ValueError(f"types names tensors that are not given: {sorted(unknown)}")
    encoded = []
    for name, t in tensors.items():
        if isinstance(t, QuantizedArray):
            qtype = types.get(name) or ("Q8_0" if t.scheme.symmetric and t.scheme.bits == 8
                                        else "Q4_1" if t.zero_point_kind == "float" else "Q4_0")
            encoded.append((name, encode(t, _check_type(qtype), name=name), getattr(gguf.GGMLQuantizationType, qtype)))
        elif isinstance(t, np.ndarray):
            if name in types:
                raise ValueError(f"tensor {name!r} is a float array; types applies to QuantizedArrays only")
            if t.dtype == ml_dtypes.bfloat16:
                encoded.append((name, np.ascontiguousarray(t).view(np.uint16).view(np.uint8).reshape(
                    t.shape[:-1] + (t.shape[-1] * 2,)), gguf.GGMLQuantizationType.BF16))
            elif t.dtype in (np.float16, np.float32, np.float64):
                a = np.ascontiguousarray(t, np.float16 if t.dtype == np.float16 else np.float32)
                if not np.isfinite(a).all():
                    raise ValueError(f"tensor {name!r} has NaN or Inf, or values beyond its GGUF float type")
                encoded.append((name, a, None))
            else:
                raise TypeError(f"tensor {name!r}: a float array or QuantizedArray, got dtype {t.dtype}")
        else:
            raise TypeError(f"tensor {name!r}: expected a QuantizedArray or numpy array, got {type(t).__name__}")
    write_gguf(path, metadata, [(name, data.shape, data.dtype, raw, lambda data=data: data)
                                for name, data, raw in encoded])


def _typed_metadata(metadata: Mapping, gguf) -> dict:
    """:func:`read_metadata`'s form of ``metadata``: ``(value, type, item type)`` entries as they are; a plain str,
    bool or float (or a list of str) gets its GGUF type (STRING, BOOL, FLOAT32; an ARRAY of STRING). A plain int is
    refused: GGUF has eight integer types and llama.cpp reads each key as one of them (``llama.block_count`` as
    UINT32), so the caller names it.

    >>> _typed_metadata({"general.architecture": "llama", "general.name": ("x", 8, None)}, _gguf())
    {'general.architecture': ('llama', 8, None), 'general.name': ('x', 8, None)}
    """
    T = gguf.GGUFValueType
    out = {}
    for key, entry in metadata.items():
        typed = isinstance(entry, tuple) and len(entry) == 3 and isinstance(entry[1], int)
        if typed and not isinstance(entry[1], bool):  # (value, type, item type); a tuple of str is a value
            out[key] = entry
        elif isinstance(entry, bool):
            out[key] = (entry, int(T.BOOL), None)
        elif isinstance(entry, str):
            out[key] = (entry, int(T.STRING), None)
        elif isinstance(entry, float):
            out[key] = (entry, int(T.FLOAT32), None)
        elif isinstance(entry, (list, tuple)) and entry and all(isinstance(v, str) for v in entry):
            out[key] = (list(entry), int(T.ARRAY), int(T.STRING))
        else:
            import reprlib

            what = "an int" if isinstance(entry, int) else f"a {type(entry).__name__}"
            shown = reprlib.repr(entry)
            form = (f"({shown}, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)" if isinstance(entry, (list, tuple))
                    else f"({shown}, gguf.GGUFValueType.UINT32, None)")
            raise ValueError(f"metadata[{key!r}] is {what} ({shown}); give (value, type, item type) as read_metadata "
                             f"returns, e.g. {form}: llama.cpp reads each key as one GGUF type")
    return out


def write_gguf(path, metadata: Mapping, tensors) -> None:
    """Write the GGUF file ``path`` one tensor at a time: ``tensors`` is a list of ``(name, shape, dtype, raw type,
    produce)``: the shape and dtype of the data (NumPy's row-major shape; for a quantized or BF16 type the uint8
    bytes of :func:`encode` and ``raw type`` a ``gguf.GGMLQuantizationType``; None for F32/F16 arrays), and
    ``produce()``, which returns the data when its turn comes, so that one tensor at a time is in memory.
    ``metadata`` is :func:`read_metadata`'s form, with ``general.architecture``.

    The file is written beside ``path`` under a temporary name, fsynced and renamed when complete: an error
    (a ``produce`` that raises, data of another size) or an interrupt leaves ``path`` as it was, and what a run
    killed mid-write left is removed by the next write of ``path``."""
    gguf = _gguf()
    if "general.architecture" not in metadata:
        raise ValueError("metadata has no 'general.architecture' (llama.cpp needs it, and the architecture's keys)")
    from .checkpoint import _staged_name, recover_output

    path = os.path.abspath(os.fspath(path))
    recover_output(path)  # what runs killed while writing this file left beside it (a live run's is left alone)
    # the checkpoint writer's staged name (owner pid and start time): a run killed mid-write leaves a file the next
    # write of ``path`` (or ``qcore.checkpoint.recover_output``) removes
    tmp = _staged_name(path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to an ordinary file
    os.close(fd)
    w = None
    try:
        w = gguf.GGUFWriter(tmp, metadata["general.architecture"][0])
        for key, (value, vtype, sub) in metadata.items():
            if key in ("general.architecture", "general.alignment"):
                continue  # the writer adds the first, and aligns its tensors to its own default
            w.add_key_value(key, value, gguf.GGUFValueType(vtype),
                            sub_type=None if sub is None else gguf.GGUFValueType(sub))
        for name, shape, dtype, raw, _ in tensors:
            shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
            w.add_tensor_info(name, shape, dtype, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, shape, dtype, _, produce in tensors:
            data = np.ascontiguousarray(produce())
            if data.dtype != np.dtype(dtype) or data.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: produced {data.dtype} {list(data.shape)}, announced "
                                 f"{np.dtype(dtype)} {list(shape)}")
            w.write_tensor_data(data)
        w.flush()
        for f in w.fout or ():
            os.fsync(f.fileno())
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if w is not None:
            w.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
