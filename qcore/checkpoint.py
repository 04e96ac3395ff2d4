"""Quantized checkpoints: safetensors files of :class:`~qcore.QuantizedArray` s and plain arrays (DESIGN section 4).

>>> import numpy as np, qcore, tempfile, os
>>> w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
>>> qa = qcore.quantize(w, qcore.QuantScheme(bits=4, symmetric=False, granularity=qcore.PerGroup(32)))
>>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
>>> save(path, {"layer.weight": qa, "layer.bias": np.zeros(8, np.float32)})
>>> out = load(path)
>>> np.array_equal(out["layer.weight"].codes, qa.codes), out["layer.bias"].dtype
(True, dtype('float32'))

File layout. A quantized tensor ``W`` of original shape ``shape`` and scheme ``s`` is stored as

==================  =====  =======================================================================
tensor              dtype  shape and content
==================  =====  =======================================================================
``W.qweight``       U8     ``packed_shape(shape, s.bits)``: codes packed along the last axis (DESIGN
                           section 3), signed codes offset by ``2^(b-1)``.
                           **8 bits:** the codes themselves, shape ``shape``: I8 (-127..127) when
                           symmetric, U8 (0..255) when asymmetric, the layout int8 matmul kernels take.
``W.scale``         F32    ``s.params_shape(shape)``; finite and > 0
``W.zero_point``    U8     same shape as the scale, in ``0..2^b-1``; asymmetric schemes only
==================  =====  =======================================================================

and the file's ``__metadata__`` (string values only, as safetensors requires) holds
``"qcore.format_version": "1"`` and ``"qcore.quantized"``: a JSON object
``{"W": {"scheme": s.to_dict(), "shape": [...], "dtype": "bfloat16"}}`` (``dtype``, the original floating
dtype, is optional). Every other tensor is a plain array stored as it is (F16/BF16/F32/F64 and integer
dtypes; bfloat16 through ``ml_dtypes``). A folder checkpoint is shards plus ``model.safetensors.index.json``.

Loading checks the whole file before returning anything: the safetensors header (sizes, offsets, dtypes from
:data:`DTYPES`), the metadata (format version, schemes, shapes), the tensor set (no missing or unexpected
keys), dtypes and shapes against the packing formula, and the values (scale finite and > 0, zero point and
codes in range). A bad file raises ``ValueError`` naming the file, the tensor and the field. Files are written
to a temporary name in the destination folder, fsynced and renamed: a crash never leaves a partial file under
the final name and never damages an existing one. Pickle files (``.bin``, ``.pt``) are refused, unread.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Union

import ml_dtypes  # registers "bfloat16" with NumPy: safetensors' NumPy loader cannot read BF16 without it
import numpy as np

from .quantize import QuantizedArray
from .scheme import QuantScheme

__all__ = ["save", "load", "read_header", "checkpoint_files", "check_not_pickle", "SafetensorsWriter",
           "staging_folder", "commit_folder",
           "TensorInfo", "Header", "DTYPES", "FORMAT_VERSION", "INDEX_NAME", "quantized_entries",
           "encode_qweight", "quantized_metadata"]

#: Version of the qcore layer of the file format (``__metadata__["qcore.format_version"]``).
FORMAT_VERSION = 1
META_VERSION = "qcore.format_version"
META_QUANTIZED = "qcore.quantized"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: safetensors dtype codes this module reads and writes, and the NumPy dtype of each (the explicit table).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
_CODE_OF = {dt: code for code, dt in DTYPES.items()}
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
_FLOAT_NAMES = {"float16", "bfloat16", "float32", "float64"}

MAX_HEADER_BYTES = 100_000_000  # the limit of the reference safetensors implementation
_MAX_DIM = 1 << 48  # no real tensor dimension comes near; bounds the arithmetic on hostile shapes
_QUANT_SUFFIXES = ("qweight", "scale", "zero_point")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _bad(path, msg: str) -> ValueError:
    return ValueError(f"{os.fspath(path)}: {msg}")


def dtype_code(dtype) -> str:
    """The safetensors code (``"BF16"``, ``"U8"``, ...) of a NumPy dtype; ``TypeError`` if not in :data:`DTYPES`."""
    dt = np.dtype(dtype)
    code = _CODE_OF.get(dt.newbyteorder("=") if dt.byteorder == ">" else dt)
    if code is None:
        raise TypeError(f"dtype {dt} cannot be stored; allowed: {', '.join(str(d) for d in DTYPES.values())}")
    return code


# ---------------------------------------------------------------------------------------------------------
# Reading and checking a safetensors header
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``start``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple
    start: int
    end: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: tensors in file order, string metadata, and where the data starts."""

    path: str
    tensors: dict
    metadata: dict
    data_start: int
    file_size: int


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _check_shape(shape, where: str, path) -> tuple:
    if not isinstance(shape, list):
        raise _bad(path, f"{where}: shape must be a list of ints, got {shape!r:.80}")
    for n in shape:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n > _MAX_DIM:
            raise _bad(path, f"{where}: shape {shape!r:.80} has dimension {n!r:.40}; dimensions must be ints "
                             f"in 0..{_MAX_DIM}")
    return tuple(shape)


def _pickle_reason() -> str:
    return ("is a Python pickle (PyTorch .bin/.pt format); loading a pickle can run arbitrary code, so qcore "
            "never reads one. Convert it to .safetensors with a tool you trust (e.g. transformers' "
            "save_pretrained(safe_serialization=True)) and pass that instead")


def _looks_like_pickle(head: bytes) -> bool:
    # a zip archive (torch.save since 1.6) or a raw pickle stream (protocol 2+ starts with 0x80 <proto>)
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def check_not_pickle(path) -> None:
    """Refuse a pickle checkpoint by its suffix (``.bin``, ``.pt``, ...), with the reason, without opening it.

    A pickle under another name is refused by :func:`read_header` when its header does not parse.
    """
    p = os.fspath(path)
    if p.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{p}: refusing to read: this {_pickle_reason()}")


def read_header(path) -> Header:
    """Read and check the header of a safetensors file (reads only the header; ``ValueError`` if bad).

    Checks: the 8-byte length against the file size and :data:`MAX_HEADER_BYTES`, UTF-8 JSON object without
    duplicate keys, string-only ``__metadata__``, dtypes from :data:`DTYPES`, shapes of non-negative ints,
    each byte range equal to ``prod(shape) * itemsize``, ranges contiguous from 0 and ending at the end of file.
    """
    check_not_pickle(path)
    p = os.fspath(path)
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        first = f.read(8)
        if len(first) < 8:
            raise _bad(p, f"truncated: the file has {size} bytes, a safetensors file starts with an 8-byte header "
                          "length")
        (n,) = struct.unpack("<Q", first)
        raw = f.read(n) if 8 + n <= min(size, 8 + MAX_HEADER_BYTES) else b""
    if not raw.startswith(b"{") and _looks_like_pickle(first):
        raise _bad(p, f"refusing to read: the file {_pickle_reason()}")
    if n > MAX_HEADER_BYTES:
        raise _bad(p, f"bad header: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (not a "
                      "safetensors file?)")
    if 8 + n > size:
        raise _bad(p, f"truncated: header length {n} runs past the end of the {size}-byte file")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(p, f"bad header: not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(p, f"bad header: expected a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _bad(p, "bad header: __metadata__ must map strings to strings")
    data_start = 8 + n
    infos = []
    for name, entry in header.items():
        if not name:
            raise _bad(p, "bad header: empty tensor name")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _bad(p, f"tensor {name!r}: header entry must have exactly dtype, shape, data_offsets; got "
                          f"{entry!r:.120}")
        code = entry["dtype"]
        if code not in DTYPES:
            raise _bad(p, f"tensor {name!r}: dtype {code!r:.40} is not supported; allowed: {', '.join(DTYPES)}")
        shape = _check_shape(entry["shape"], f"tensor {name!r}", p)
        offs = entry["data_offsets"]
        if (not isinstance(offs, list) or len(offs) != 2
                or any(isinstance(o, bool) or not isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise _bad(p, f"tensor {name!r}: data_offsets must be [start, end] with 0 <= start <= end, got "
                          f"{offs!r:.80}")
        expected = math.prod(shape) * DTYPES[code].itemsize
        if offs[1] - offs[0] != expected:
            raise _bad(p, f"tensor {name!r}: data_offsets {offs} span {offs[1] - offs[0]} bytes but shape "
                          f"{list(shape)} of {code} needs {expected}")
        infos.append(TensorInfo(name, code, shape, data_start + offs[0], data_start + offs[1]))
    infos.sort(key=lambda t: (t.start, t.end))
    pos = data_start
    for t in infos:
        if t.start != pos:
            what = "overlaps the previous tensor" if t.start < pos else f"leaves a gap of {t.start - pos} bytes"
            raise _bad(p, f"tensor {t.name!r}: data_offsets {what}")
        pos = t.end
    if pos > size:
        raise _bad(p, f"truncated: the header describes {pos - data_start} data bytes but the file holds "
                      f"{size - data_start}")
    if pos < size:
        raise _bad(p, f"bad file: {size - pos} bytes after the last tensor (the header describes "
                      f"{pos - data_start} data bytes)")
    return Header(p, {t.name: t for t in infos}, dict(metadata), data_start, size)


# ---------------------------------------------------------------------------------------------------------
# The qcore layer: quantized entries and their metadata
# ---------------------------------------------------------------------------------------------------------

def _packed_shape(shape: tuple, bits: int) -> tuple:
    from .packing import packed_shape

    return tuple(int(n) for n in packed_shape(tuple(shape), bits))


def quantized_entries(name: str, shape: tuple, scheme: QuantScheme) -> list:
    """``[(tensor name, dtype code, shape), ...]`` that store a quantized ``name`` (see the module docstring)."""
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


def encode_qweight(qa: QuantizedArray) -> np.ndarray:
    """The ``.qweight`` array of ``qa``: packed uint8 codes, or the int8/uint8 codes themselves at 8 bits."""
    return np.ascontiguousarray(qa.codes) if qa.scheme.bits == 8 else qa.packed()


def _qmeta_entry(qa: QuantizedArray, dtype=None) -> dict:
    d = {"scheme": qa.scheme.to_dict(), "shape": [int(n) for n in qa.shape]}
    if dtype is not None:
        d["dtype"] = np.dtype(dtype).name
    return d


def _parse_qmeta(header: Header) -> dict:
    """``{name: (scheme, shape, dtype name or None)}`` from the qcore metadata of a checked header."""
    p, md = header.path, header.metadata
    qkeys = [k for k in md if k.startswith("qcore.")]
    if not qkeys:
        return {}
    if META_VERSION not in md:
        raise _bad(p, f"metadata has {qkeys[0]!r} but no {META_VERSION!r}")
    if md[META_VERSION] != str(FORMAT_VERSION):
        raise _bad(p, f"metadata {META_VERSION}: unknown qcore format version {md[META_VERSION]!r:.40}; this "
                      f"qcore reads version {FORMAT_VERSION} (upgrade qcore to read newer files)")
    unknown = sorted(set(qkeys) - {META_VERSION, META_QUANTIZED})
    if unknown:
        raise _bad(p, f"metadata: unexpected qcore keys {unknown}")
    try:
        table = json.loads(md.get(META_QUANTIZED, "{}"), object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise _bad(p, f"metadata {META_QUANTIZED}: not valid JSON ({e})") from None
    if not isinstance(table, dict):
        raise _bad(p, f"metadata {META_QUANTIZED}: expected a JSON object")
    out = {}
    for name, entry in table.items():
        where = f"quantized tensor {name!r}"
        if not isinstance(entry, dict) or not {"scheme", "shape"} <= set(entry) <= {"scheme", "shape", "dtype"}:
            raise _bad(p, f"{where}: metadata entry must have scheme, shape and optionally dtype; got "
                          f"{entry!r:.120}")
        try:
            scheme = QuantScheme.from_dict(entry["scheme"])
        except (ValueError, TypeError) as e:
            raise _bad(p, f"{where}: field scheme: {e}") from None
        shape = _check_shape(entry["shape"], f"{where}: field shape", p)
        if math.prod(shape) > 1 << 62:
            raise _bad(p, f"{where}: field shape {list(shape)} is too large")
        try:
            scheme.validate_shape(shape)
        except ValueError as e:
            raise _bad(p, f"{where}: field shape {list(shape)} does not fit the scheme: {e}") from None
        dtype = entry.get("dtype")
        if dtype is not None and dtype not in _FLOAT_NAMES:
            raise _bad(p, f"{where}: field dtype {dtype!r:.40} must be one of {sorted(_FLOAT_NAMES)}")
        out[name] = (scheme, shape, dtype)
    return out


def quantized_metadata(header: Header) -> dict:
    """``{name: (scheme, shape, dtype name or None)}`` for the quantized tensors of a file, from its header only.

    ``header`` comes from :func:`read_header`. The qcore metadata (format version, schemes, shapes, dtypes) and
    the tensors that store each quantized tensor (names, dtypes, shapes against the packing formula) are
    checked as :func:`load` checks them; a bad file is a ``ValueError`` naming the file, tensor and field. The
    tensor data is not read: use :func:`load` to check the values too. A file without qcore metadata gives ``{}``.
    """
    if not isinstance(header, Header):
        raise TypeError(f"header must be a qcore.checkpoint.Header (from read_header), got {type(header).__name__}")
    qmeta = _parse_qmeta(header)
    _check_layout(header, qmeta)
    return qmeta


def _check_layout(header: Header, qmeta: dict) -> None:
    """Every quantized tensor has exactly its entries, with the dtypes and shapes the packing formula gives."""
    p, tensors = header.path, header.tensors
    claimed = set()
    for name, (scheme, shape, _) in qmeta.items():
        if name in tensors:
            raise _bad(p, f"quantized tensor {name!r}: a plain tensor has the same name")
        for tname, code, tshape in quantized_entries(name, shape, scheme):
            field = tname[len(name) + 1:]
            t = tensors.get(tname)
            if t is None:
                raise _bad(p, f"quantized tensor {name!r}: field {field}: missing tensor {tname!r}")
            if t.dtype != code:
                raise _bad(p, f"quantized tensor {name!r}: field {field}: dtype {t.dtype}, expected {code} for "
                              f"{scheme}")
            if t.shape != tshape:
                raise _bad(p, f"quantized tensor {name!r}: field {field}: shape {list(t.shape)} ({t.nbytes} "
                              f"bytes), expected {list(tshape)} for shape {list(shape)} at {scheme}")
            claimed.add(tname)
        for suffix in _QUANT_SUFFIXES:
            tname = f"{name}.{suffix}"
            if tname in tensors and tname not in claimed:
                raise _bad(p, f"quantized tensor {name!r}: unexpected tensor {tname!r} for {scheme}")


# ---------------------------------------------------------------------------------------------------------
# Writing: a streaming safetensors writer with an atomic commit
# ---------------------------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on a directory
        pass
    finally:
        os.close(fd)


_HAS_COPY_FILE_RANGE = hasattr(os, "copy_file_range")


def staging_folder(out: str) -> str:
    """A new empty folder beside ``out`` (same file system, so :func:`commit_folder` is a rename), with the
    permissions a plain ``mkdir`` would give. The caller removes it if it does not commit it."""
    tmpdir = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)), prefix=f".{os.path.basename(out)}.",
                              suffix=".tmp")
    os.chmod(tmpdir, 0o777 & ~_umask())  # mkdtemp makes 0700
    return tmpdir


def commit_folder(tmpdir: str, out: str) -> None:
    """Move the finished folder into place; an existing OUTPUT is only removed once the new one is there."""
    old = None
    if os.path.lexists(out):
        old = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.old.")
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(tmpdir, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    _fsync_dir(os.path.dirname(out))
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.unlink(old)


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, holding at most one piece of one tensor in memory.

    The header is computed from ``entries`` (name, dtype, shape) up front, so each tensor's place in the file
    is known and pieces can be written in any order with :meth:`write` (a whole tensor or, repeatedly, the next
    rows of it). Tensors are laid out by decreasing item size, so every tensor is aligned to its item size.
    Bytes go to a temporary file beside ``path``; :meth:`close` checks that every byte was written, fsyncs
    and renames it to ``path`` (atomically; without ``overwrite`` an existing ``path`` is never replaced).
    On error, or :meth:`abort`, the temporary file is removed. Use it as a context manager:

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> with SafetensorsWriter(p, [("a", "F32", (2, 3))]) as w:
    ...     w.write("a", np.zeros((1, 3), np.float32)); w.write("a", np.ones((1, 3), np.float32))
    >>> load(p)["a"].tolist()
    [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """

    def __init__(self, path, entries: Iterable, metadata: Optional[Mapping[str, str]] = None, *,
                 overwrite: bool = True):
        self.path = os.path.abspath(os.fspath(path))
        self.overwrite = overwrite
        metadata = dict(metadata or {})
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str (safetensors stores text only), got {k!r}: "
                                f"{type(v).__name__}")
        items = []
        seen = set()
        for name, dtype, shape in entries:
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise ValueError(f"invalid tensor name {name!r}")
            if name in seen:
                raise ValueError(f"duplicate tensor name {name!r}")
            seen.add(name)
            code = dtype if isinstance(dtype, str) and dtype in DTYPES else dtype_code(dtype)
            shape = tuple(int(n) for n in shape)
            if any(n < 0 for n in shape):
                raise ValueError(f"tensor {name!r}: negative dimension in shape {shape}")
            items.append((name, code, shape))
        # Decreasing item size keeps every offset a multiple of its tensor's item size (as safetensors does).
        items.sort(key=lambda it: -DTYPES[it[1]].itemsize)
        hdr: dict = {}
        if metadata:
            hdr["__metadata__"] = metadata
        self._slots: dict = {}
        off = 0
        for name, code, shape in items:
            n = math.prod(shape) * DTYPES[code].itemsize
            hdr[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
            self._slots[name] = [code, shape, off, n, 0]  # code, shape, offset, size, bytes written so far
            off += n
        raw = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self.size = self._data_start + off
        if not overwrite and os.path.lexists(self.path):
            raise FileExistsError(f"{self.path} already exists (pass overwrite=True / --overwrite to replace it)")
        parent = os.path.dirname(self.path)
        fd, self._tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets the usual permissions
            self._f = os.fdopen(fd, "wb")
            self._f.write(struct.pack("<Q", len(raw)))
            self._f.write(raw)
            self._f.truncate(self.size)  # reserve the full length; pieces fill it in place
        except BaseException:
            self.abort()
            raise
        self._done = False

    def write(self, name: str, array) -> None:
        """Append ``array`` (the whole tensor, or its next rows) to tensor ``name``; dtype must match exactly."""
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"tensor {name!r} was not declared to this writer")
        code, shape, off, n, done = slot
        a = np.asarray(array)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("="))
        if a.dtype != DTYPES[code]:
            raise TypeError(f"tensor {name!r}: got dtype {a.dtype}, declared {DTYPES[code]}")
        a = np.ascontiguousarray(a)
        nb = a.nbytes
        if done + nb > n:
            raise ValueError(f"tensor {name!r}: {done + nb} bytes written, but shape {list(shape)} of {code} "
                             f"holds {n}")
        if nb:
            self._f.seek(self._data_start + off + done)
            self._f.write(a.reshape(-1).view(np.uint8).data)
        slot[4] = done + nb

    def copy_from(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Append ``nbytes`` raw bytes read from file descriptor ``src_fd`` at ``src_offset`` to tensor ``name``
        (the caller vouches that they are that tensor's dtype). Uses ``os.copy_file_range`` where the system has
        it, so the bytes go file to file inside the kernel without passing through this process's memory."""
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"tensor {name!r} was not declared to this writer")
        code, shape, off, n, done = slot
        if done + nbytes > n:
            raise ValueError(f"tensor {name!r}: {done + nbytes} bytes written, but shape {list(shape)} of {code} "
                             f"holds {n}")
        self._f.flush()
        dst_fd, pos, end = self._f.fileno(), 0, nbytes
        while pos < end:
            k = 0
            if _HAS_COPY_FILE_RANGE:
                try:
                    k = os.copy_file_range(src_fd, dst_fd, end - pos, src_offset + pos,
                                           self._data_start + off + done + pos)
                except OSError:  # e.g. EXDEV on old kernels, or a file system without support
                    k = 0
            if not k:
                chunk = os.pread(src_fd, min(end - pos, 1 << 24), src_offset + pos)
                if not chunk:
                    raise ValueError(f"tensor {name!r}: the source ended early (was it changed while reading?)")
                k = os.pwrite(dst_fd, chunk, self._data_start + off + done + pos)
            pos += k
        slot[4] = done + nbytes

    def close(self) -> None:
        """Check completeness, fsync, and rename the temporary file to ``path``."""
        if self._done:
            return
        try:
            short = [f"{k} ({s[4]} of {s[3]} bytes)" for k, s in self._slots.items() if s[4] != s[3]]
            if short:
                raise ValueError(f"{self.path}: incomplete tensors: {', '.join(short[:5])}")
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            if self.overwrite:
                os.replace(self._tmp, self.path)
            else:
                os.link(self._tmp, self.path)  # fails if path appeared meanwhile: never clobber
                os.unlink(self._tmp)
            self._done = True
            _fsync_dir(os.path.dirname(self.path))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is left as it was."""
        self._done = True
        f = getattr(self, "_f", None)
        if f is not None and not f.closed:
            f.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def _quantized_meta_json(table: dict) -> str:
    return json.dumps(table, separators=(",", ":"), sort_keys=True)


def qcore_metadata(quantized: Mapping[str, dict], extra: Optional[Mapping[str, str]] = None) -> dict:
    """The ``__metadata__`` of a qcore file: user strings plus the versioned table of quantized tensors."""
    md = dict(extra or {})
    bad = [k for k in md if not isinstance(k, str) or k.startswith("qcore.")]
    if bad:
        raise ValueError(f"metadata keys starting with 'qcore.' are reserved, got {bad[0]!r}")
    md[META_VERSION] = str(FORMAT_VERSION)
    md[META_QUANTIZED] = _quantized_meta_json(dict(quantized))
    return md


def save(path, tensors: Mapping[str, Union[QuantizedArray, np.ndarray]], metadata: Optional[Mapping[str, str]] = None,
         *, overwrite: bool = True) -> None:
    """Write ``tensors`` to the safetensors file ``path``: :class:`QuantizedArray` values packed (see the module
    docstring), arrays as they are. ``metadata`` (str to str) goes into ``__metadata__`` beside the qcore keys.

    The file is written under a temporary name and renamed when complete. ``overwrite=False`` refuses an
    existing ``path`` (``FileExistsError``).
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> QuantizedArray or numpy array, got "
                        f"{type(tensors).__name__}")
    entries, arrays, qtable = [], {}, {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if isinstance(value, QuantizedArray):
            qtable[name] = _qmeta_entry(value)
            parts = [encode_qweight(value), value.scale, value.zero_point]
            for (tname, code, shape), arr in zip(quantized_entries(name, value.shape, value.scheme), parts):
                arr = np.asarray(arr)
                if dtype_code(arr.dtype) != code or arr.shape != shape:
                    raise ValueError(f"tensor {name!r}: {tname} is {arr.dtype} {arr.shape}, expected {code} {shape}")
                entries.append((tname, code, shape))
                arrays[tname] = arr
        elif isinstance(value, np.ndarray):
            entries.append((name, dtype_code(value.dtype), value.shape))
            arrays[name] = value
        else:
            raise TypeError(f"tensor {name!r}: expected a QuantizedArray or numpy.ndarray, got "
                            f"{type(value).__name__}")
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tensor names collide with the entries of a quantized tensor: {dup}")
    md = qcore_metadata({k: qtable[k] for k in sorted(qtable)}, metadata)
    with SafetensorsWriter(path, entries, md, overwrite=overwrite) as w:
        for name, arr in arrays.items():
            w.write(name, arr)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------

_SHARD_NAME = re.compile(r"^[^/\\\x00]+\.safetensors$")


def _read_index(folder: str) -> dict:
    """``{shard file name: set of tensor names}`` from a checked ``model.safetensors.index.json``."""
    ipath = os.path.join(folder, INDEX_NAME)
    if os.path.getsize(ipath) > MAX_HEADER_BYTES:
        raise _bad(ipath, f"bad index: larger than {MAX_HEADER_BYTES} bytes")
    try:
        with open(ipath, "rb") as f:
            index = json.loads(f.read().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(ipath, f"bad index: not valid UTF-8 JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise _bad(ipath, "bad index: expected a JSON object with a 'weight_map' object")
    shards: dict = {}
    for tname, fname in index["weight_map"].items():
        if not isinstance(fname, str) or not _SHARD_NAME.match(fname) or fname in (".", ".."):
            raise _bad(ipath, f"tensor {tname!r}: shard {fname!r:.80} must be a plain file name ending in "
                              ".safetensors in the same folder")
        shards.setdefault(fname, set()).add(tname)
    if not shards:
        raise _bad(ipath, "bad index: empty weight_map")
    return shards


def checkpoint_files(path) -> tuple:
    """``(kind, files, index)`` for a checkpoint path: ``("file", [path], None)``, ``("folder", [single
    model.safetensors], None)`` or ``("sharded", [shard paths in index order], {shard name: tensor names})``."""
    p = os.fspath(path)
    check_not_pickle(p)
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, INDEX_NAME)):
            shards = _read_index(p)
            files = [os.path.join(p, name) for name in shards]
            for fpath in files:
                if not os.path.isfile(fpath):
                    raise _bad(os.path.join(p, INDEX_NAME), f"shard {os.path.basename(fpath)!r} listed in the "
                                                             "index does not exist")
            return "sharded", files, shards
        single = os.path.join(p, SINGLE_NAME)
        if os.path.isfile(single):
            return "folder", [single], None
        pickles = sorted(f for f in os.listdir(p) if f.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            check_not_pickle(os.path.join(p, pickles[0]))
        raise _bad(p, f"no {INDEX_NAME} or {SINGLE_NAME} in this folder")
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no such file or folder")
    return "file", [p], None


def _check_shard_index(header: Header, expected: set, index_path: str) -> None:
    names = set(header.tensors)
    # the index names the stored tensors; quantized tensors appear there by their .qweight/.scale entries
    missing, extra = sorted(expected - names), sorted(names - expected)
    if missing:
        raise _bad(index_path, f"tensor {missing[0]!r} is listed for {os.path.basename(header.path)} but is not "
                               "in that file")
    if extra:
        raise _bad(index_path, f"tensor {extra[0]!r} in {os.path.basename(header.path)} is not listed in the index")


def _load_file(path: str, header: Header, qmeta: dict) -> dict:
    from safetensors import safe_open

    p = header.path
    raw = {}
    with safe_open(p, framework="numpy") as f:
        for name in header.tensors:
            arr = f.get_tensor(name)
            if arr.dtype != DTYPES[header.tensors[name].dtype] or arr.shape != header.tensors[name].shape:
                raise _bad(p, f"tensor {name!r}: safetensors returned {arr.dtype} {arr.shape}, header says "
                              f"{header.tensors[name].dtype} {list(header.tensors[name].shape)}")
            raw[name] = arr
    out = {}
    for name, (scheme, shape, _dtype) in qmeta.items():
        q, scale = raw.pop(f"{name}.qweight"), raw.pop(f"{name}.scale")
        zp = None if scheme.symmetric else raw.pop(f"{name}.zero_point")
        where = f"quantized tensor {name!r}"
        bad = ~np.isfinite(scale) | ~(scale > 0)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise _bad(p, f"{where}: field scale: {scale[idx]!r} at index {idx}; scales must be finite and > 0")
        if zp is not None and zp.size and int(zp.max()) > scheme.qmax:
            raise _bad(p, f"{where}: field zero_point: {int(zp.max())} is outside 0..{scheme.qmax} for {scheme}")
        try:
            if scheme.bits == 8:
                qa = QuantizedArray.from_parts(q, scale, zp, scheme)
            else:
                qa = QuantizedArray.from_packed(q, scale, zp, scheme, shape)
        except (ValueError, TypeError) as e:
            raise _bad(p, f"{where}: field qweight: {e}") from None
        if qa.shape != shape:
            raise _bad(p, f"{where}: field qweight: decodes to shape {qa.shape}, metadata says {list(shape)}")
        out[name] = qa
    out.update(raw)
    return out


def load(path) -> dict:
    """Load a qcore checkpoint (a ``.safetensors`` file, or a folder with ``model.safetensors.index.json`` or
    ``model.safetensors``) as ``{name: QuantizedArray or numpy array}``.

    Everything is checked first (see the module docstring); a bad file raises ``ValueError`` naming the file,
    tensor and field, and nothing is returned. Pickle files are refused unread.
    """
    kind, files, shards = checkpoint_files(path)
    checked = []
    owner: dict = {}
    for fpath in files:
        header = read_header(fpath)
        if shards is not None:
            _check_shard_index(header, shards[os.path.basename(fpath)], os.path.join(os.fspath(path), INDEX_NAME))
        qmeta = _parse_qmeta(header)
        _check_layout(header, qmeta)
        stored = set(header.tensors) - {f"{n}.{s}" for n in qmeta for s in _QUANT_SUFFIXES}
        for name in list(stored) + list(qmeta):
            if name in owner:
                raise _bad(fpath, f"tensor {name!r} is also in {owner[name]}")
            owner[name] = fpath
        checked.append((fpath, header, qmeta))
    out = {}
    for fpath, header, qmeta in checked:
        out.update(_load_file(fpath, header, qmeta))
    return out
