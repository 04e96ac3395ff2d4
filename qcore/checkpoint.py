"""Quantized checkpoints: safetensors files of :class:`~qcore.QuantizedArray` s and plain arrays (docs/checkpoint-format.md).

>>> import numpy as np, qcore, tempfile, os
>>> w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
>>> qa = qcore.quantize(w, qcore.QuantScheme(bits=4, symmetric=False, granularity=qcore.PerGroup(32)))
>>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
>>> save(path, {"layer.weight": qa, "layer.bias": np.zeros(8, np.float32)})
>>> out = load(path)
>>> np.array_equal(out["layer.weight"].codes, qa.codes), out["layer.bias"].dtype
(True, dtype('float32'))

File layout. How a quantized tensor is stored belongs to its format (:mod:`qcore.formats`); this module is
the container around it. The default format, ``"qcore"`` (:mod:`qcore.formats.native`), stores a quantized
``W`` as ``W.qweight`` (packed codes, docs/packing.md), ``W.scale`` and, asymmetric only, ``W.zero_point``,
described by a versioned JSON table in the file's ``__metadata__``. Every other tensor is a plain array
stored as it is (F16/BF16/F32/F64 and integer dtypes; bfloat16 through ``ml_dtypes``). A folder checkpoint
is shards plus ``model.safetensors.index.json``.

Loading checks the whole file before returning anything: the safetensors header (sizes, offsets, dtypes from
:data:`DTYPES`), the metadata (format version, schemes, shapes), the tensor set (no missing or unexpected
keys), dtypes and shapes against the packing formula, and the values (every code dequantizes to a finite
float32, zero point and codes in range, padding bits zero). A bad file raises ``ValueError`` naming the file,
the tensor and the field; every file that safetensors itself refuses is refused first, and the writer refuses
whatever the reader would (names, at most :data:`MAX_RANK` dimensions, sizes), so it never writes a file that
``load`` rejects. Only regular files are read (a FIFO or device is refused, never waited on).

Files are written to a temporary name in the destination folder, fsynced and renamed: a crash never leaves a
partial file under the final name and never damages an existing one. A folder replaces an existing one in
three renames; a process killed between them leaves entries named after it, which the next writer of the same
path (:func:`recover_output`) uses to put back the old folder or finish the new one, before removing what
dead processes left. Pickle files (``.bin``, ``.pt``) are refused, unread.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import reprlib
import shutil
import stat
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Union

import ml_dtypes  # registers "bfloat16" with NumPy: safetensors' NumPy loader cannot read BF16 without it
import numpy as np

from .quantize import QuantizedArray
from .scheme import QuantScheme

__all__ = ["save", "load", "read_header", "checkpoint_files", "check_not_pickle", "SafetensorsWriter",
           "staging_folder", "commit_folder", "recover_output",
           "TensorInfo", "Header", "DTYPES", "FORMAT_VERSION", "INDEX_NAME", "quantized_entries",
           "encode_qweight", "quantized_metadata", "stored_names"]

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

MAX_HEADER_BYTES = 100_000_000  # the limit of the reference safetensors implementation
_MAX_DIM = 1 << 48  # no real tensor dimension comes near; bounds the arithmetic on hostile shapes
#: Most dimensions a tensor may have: NumPy's limit, so that every tensor a header declares can be built.
MAX_RANK = 64
#: Most bytes the non-zero dimensions of a shape may span (times the item size). safetensors multiplies the
#: dimensions in 64 bits and NumPy refuses arrays whose non-zero dimensions overflow it, even when another
#: dimension is 0: this bound keeps every such product far from overflow on both sides.
MAX_TENSOR_BYTES = 1 << 60
#: Deepest JSON nesting read from a header, qcore metadata or an index (valid files nest 4 levels at most).
MAX_JSON_DEPTH = 64
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
    identity: tuple = ()  # (device, inode, size, mtime) when read: the data is read from the same file


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _shape_problem(shape, itemsize: int) -> Optional[str]:
    """Why a shape cannot be stored or read (``None`` if it can); the writer and the reader share this rule."""
    if not isinstance(shape, (list, tuple)):
        return "must be a list of ints"
    if len(shape) > MAX_RANK:
        return f"has {len(shape)} dimensions; at most {MAX_RANK} are supported (NumPy's limit)"
    span = itemsize
    for n in shape:
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or not 0 <= n <= _MAX_DIM:
            return f"has dimension {n!r:.40}; dimensions must be ints in 0..{_MAX_DIM}"
        span *= max(int(n), 1)
        if span > MAX_TENSOR_BYTES:
            return ("spans more than 2^60 bytes (1 EiB) in its non-zero dimensions: no real tensor is that large, "
                    "and the product overflows safetensors' and NumPy's size arithmetic")
    return None


def _check_shape(shape, where: str, path, itemsize: int = 1) -> tuple:
    problem = _shape_problem(shape, itemsize)
    if problem is not None or not isinstance(shape, list):
        raise _bad(path, f"{where}: shape {_brief(shape)} {problem or 'must be a list of ints'}")
    return tuple(shape)


def _name_problem(name) -> Optional[str]:
    """Why a tensor name cannot be stored (``None`` if it can); the writer and the reader share this rule."""
    if not isinstance(name, str) or not name:
        return "tensor names must be non-empty strings"
    if name == "__metadata__":
        return "'__metadata__' is reserved by safetensors"
    if not _utf8_ok(name):
        return "tensor names must be valid Unicode (no lone surrogates), as UTF-8 JSON requires"
    return None


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 3, 60, 60, 8, 6


def _brief(value) -> str:
    """A short repr for messages; bounded in length and depth, whatever a hostile file holds."""
    return _SHORT.repr(value)


def _load_json(raw: bytes, path, what: str):
    """Parse UTF-8 JSON from a file: duplicate keys, nesting deeper than :data:`MAX_JSON_DEPTH` and lone
    surrogates (which safetensors' own parser refuses) are ``ValueError`` s naming ``path`` and ``what``."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise _bad(path, f"{what}: not valid UTF-8 ({e})") from None
    except ValueError as e:
        raise _bad(path, f"{what}: not valid JSON ({e})") from None
    except RecursionError:
        raise _bad(path, f"{what}: JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    check_strings = b"\\u" in raw
    stack = [(value, 1)]
    while stack:  # iterative: later code (messages, scheme parsing) may recurse on what is kept
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise _bad(path, f"{what}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if check_strings and isinstance(k, str) and not _utf8_ok(k):
                    raise _bad(path, f"{what}: a key holds a lone surrogate escape ({_brief(k)}), not valid Unicode")
                stack.append((x, depth + 1))
        elif check_strings and isinstance(v, str) and not _utf8_ok(v):
            raise _bad(path, f"{what}: a string holds a lone surrogate escape ({_brief(v)}), not valid Unicode")
    return value


def _open_regular(path) -> int:
    """A read-only descriptor of ``path``, refused unless it is a regular file: a FIFO or a device would block
    a reader forever (or never end). ``O_NONBLOCK`` makes even the open of a FIFO return at once."""
    p = os.fspath(path)
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket"
                    if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise _bad(p, f"is {kind}; checkpoints are read from regular files only")
        if hasattr(os, "O_NONBLOCK"):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _identity(st) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


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

    Checks: a regular file (never a FIFO or device), the 8-byte length against the file size and
    :data:`MAX_HEADER_BYTES`, UTF-8 JSON object without duplicate keys, lone surrogates or nesting deeper than
    :data:`MAX_JSON_DEPTH`, string-only ``__metadata__``, dtypes from :data:`DTYPES`, names, shapes of at most
    :data:`MAX_RANK` non-negative ints spanning at most :data:`MAX_TENSOR_BYTES`, each byte range equal to
    ``prod(shape) * itemsize``, ranges contiguous from 0 and ending at the end of file. Every file that
    safetensors itself refuses is refused here first.
    """
    check_not_pickle(path)
    p = os.fspath(path)
    fd = _open_regular(p)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        first = f.read(8)
        if len(first) < 8:
            raise _bad(p, f"truncated: the file has {size} bytes, a safetensors file starts with an 8-byte header "
                          "length")
        (n,) = struct.unpack("<Q", first)
        raw = f.read(n) if 8 + n <= min(size, 8 + MAX_HEADER_BYTES) else b""
    if not raw.startswith(b"{") and _looks_like_pickle(first):
        raise _bad(p, f"refusing to read: the file {_pickle_reason()}")
    if first[:4] == b"GGUF":  # llama.cpp's format: its magic reads as a header length of terabytes
        raise _bad(p, "a GGUF file (llama.cpp's format), not safetensors: read it with qcore.gguf.import_gguf, "
                      "or load the model with qtorch.from_gguf")
    if n > MAX_HEADER_BYTES:
        raise _bad(p, f"bad header: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (not a "
                      "safetensors file?)")
    if 8 + n > size:
        raise _bad(p, f"truncated: header length {n} runs past the end of the {size}-byte file")
    if len(raw) != n:
        raise _bad(p, "truncated: the file shrank while its header was read")
    header = _load_json(raw, p, "bad header")
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
        problem = _name_problem(name)
        if problem:
            raise _bad(p, f"bad header: tensor {_brief(name)}: {problem}")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _bad(p, f"tensor {name!r}: header entry must have exactly dtype, shape, data_offsets; got "
                          f"{_brief(entry)}")
        code = entry["dtype"]
        if not isinstance(code, str) or code not in DTYPES:
            raise _bad(p, f"tensor {name!r}: dtype {_brief(code)} is not supported; allowed: {', '.join(DTYPES)}")
        shape = _check_shape(entry["shape"], f"tensor {name!r}", p, DTYPES[code].itemsize)
        offs = entry["data_offsets"]
        if (not isinstance(offs, list) or len(offs) != 2
                or any(isinstance(o, bool) or not isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise _bad(p, f"tensor {name!r}: data_offsets must be [start, end] with 0 <= start <= end, got "
                          f"{_brief(offs)}")
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
    return Header(p, {t.name: t for t in infos}, dict(metadata), data_start, size, _identity(st))


# ---------------------------------------------------------------------------------------------------------
# The format layer: quantized entries and their metadata, asked of the file's format (qcore.formats)
# ---------------------------------------------------------------------------------------------------------

def _format(name: Optional[str] = None):
    return _get_format() if name is None else _get_format(name)


def _format_of(header: Header):
    return _format_of_metadata(header.metadata, header.path)


def quantized_entries(name: str, shape: tuple, scheme: QuantScheme, format: Optional[str] = None) -> list:
    """``[(tensor name, dtype code, shape), ...]`` that store a quantized ``name`` in ``format`` (default: qcore;
    see :mod:`qcore.formats`)."""
    return _format(format).entries(name, shape, scheme)


def _parse_qmeta(header: Header) -> dict:
    """``{name: (scheme, shape, dtype name or None)}`` from the format metadata of a checked header."""
    return _format_of(header).read_table(header)


def quantized_metadata(header: Header) -> dict:
    """``{name: (scheme, shape, dtype name or None)}`` for the quantized tensors of a file, from its header only.

    ``header`` comes from :func:`read_header`. The format metadata (format version, schemes, shapes, dtypes) and
    the tensors that store each quantized tensor (names, dtypes, shapes against the packing formula) are
    checked as :func:`load` checks them; a bad file is a ``ValueError`` naming the file, tensor and field. The
    tensor data is not read: use :func:`load` to check the values too. A file without such metadata gives ``{}``.
    """
    if not isinstance(header, Header):
        raise TypeError(f"header must be a qcore.checkpoint.Header (from read_header), got {type(header).__name__}")
    fmt = _format_of(header)
    qmeta = fmt.read_table(header)
    _check_layout(header, qmeta, fmt)
    return qmeta


def stored_names(header: Header, qmeta: dict) -> dict:
    """``{quantized tensor name: [names of the tensors that store it]}`` for a checked file's ``qmeta``."""
    fmt = _format_of(header)
    return {name: [e[0] for e in fmt.entries(name, shape, scheme)] for name, (scheme, shape, _) in qmeta.items()}


def _check_layout(header: Header, qmeta: dict, fmt) -> None:
    """Every quantized tensor has exactly its entries, with the dtypes and shapes the format gives."""
    p, tensors = header.path, header.tensors
    claimed = set()
    for name, (scheme, shape, _) in qmeta.items():
        if name in tensors:
            raise _bad(p, f"quantized tensor {name!r}: a plain tensor has the same name")
        for tname, code, tshape in fmt.entries(name, shape, scheme):
            field = tname[len(name) + 1:] if tname.startswith(name + ".") else tname
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
        for tname in fmt.candidates(name):
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
    """Make the renames in folder ``path`` durable; an I/O error is raised, never reported as success."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # file systems that cannot sync a folder say so with EINVAL/ENOTSUP; anything else (EIO) is a failure
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise OSError(e.errno, f"{e.strerror} (syncing the folder {path} after a rename; the result may "
                                   "not survive a crash)", path) from None
    finally:
        os.close(fd)


_HAS_COPY_FILE_RANGE = hasattr(os, "copy_file_range")

# ---------------------------------------------------------------------------------------------------------
# Staging beside OUTPUT, the commit, and recovery from a run that was killed
#
# Every temporary entry is named ".{OUTPUT name}.qcore-{pid}-{start}-{random}.{state}": the owner's pid and
# start time (so a reused pid is not mistaken for the owner) tell a later run whether the owner is gone.
# States: "tmp" (being written), "ready" (complete, about to replace OUTPUT), "old" (the previous OUTPUT,
# moved aside during the commit). A folder commit is: tmp -> ready; OUTPUT -> old; ready -> OUTPUT; remove
# old. A run killed anywhere in it leaves entries from which the next run knows what to do (recover_output).
# ---------------------------------------------------------------------------------------------------------

_STAGED = re.compile(r"^\.(?P<base>.+)\.qcore-(?P<pid>\d+)-(?P<start>\d+)-(?P<rand>[A-Za-z0-9_]+)\.(?P<state>tmp|ready|old)$")


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _owner_alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _start_time(pid)
    return not (start and now and now != start)  # the same pid, started later: another process


def _staged_name(out: str, state: str, rand: Optional[str] = None) -> str:
    rand = rand or os.urandom(6).hex()
    pid = os.getpid()
    return os.path.join(os.path.dirname(out),
                        f".{os.path.basename(out)}.qcore-{pid}-{_start_time(pid)}-{rand}.{state}")


def _with_state(path: str, state: str) -> str:
    return path.rsplit(".", 1)[0] + "." + state


class _FolderLock:
    """An exclusive ``flock`` on a folder (no lock file to leave behind): recoveries and commits of outputs in
    one folder never interleave."""

    def __init__(self, folder: str):
        self.folder = folder

    def __enter__(self):
        self.fd = os.open(self.folder, os.O_RDONLY)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock here: the pid check alone keeps live runs apart
            pass
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock
        return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _recover(out: str) -> list:
    """Finish or undo what dead runs left beside ``out`` (the caller holds the folder lock)."""
    parent, base = os.path.dirname(out), os.path.basename(out)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    left = {"tmp": [], "ready": [], "old": []}
    for name in names:
        m = _STAGED.match(name)
        if m and m["base"] == base and not _owner_alive(int(m["pid"]), int(m["start"])):
            left[m["state"]].append(os.path.join(parent, name))
    done = []
    for path in sorted(left["ready"], key=lambda q: os.stat(q).st_mtime_ns, reverse=True):
        if not os.path.lexists(out):  # killed between moving OUTPUT aside and moving the new one in
            os.rename(path, out)
            done.append(f"finished the replacement of {out} that an interrupted run had begun")
        else:
            _remove(path)
    for path in left["old"]:
        if not os.path.lexists(out):  # killed before the new one was ready: put the previous OUTPUT back
            os.rename(path, out)
            done.append(f"restored the previous {out} that an interrupted run had moved aside")
        else:
            _remove(path)
    for path in left["tmp"]:
        _remove(path)
    if left["tmp"] and not done:
        done.append(f"removed {len(left['tmp'])} unfinished temporary output(s) of interrupted runs beside {out}")
    if any(left.values()):
        _fsync_dir(parent)
    return done


def recover_output(out) -> list:
    """Clean up after runs that were killed while writing ``out``: finish or undo an interrupted folder commit
    (so ``out`` is never left missing) and remove their temporary files and folders. Entries of live
    processes are left alone. Returns one sentence per thing done (empty if there was nothing to do).

    >>> import tempfile, os
    >>> recover_output(os.path.join(tempfile.mkdtemp(), "out"))
    []
    """
    out = os.path.abspath(os.fspath(out))
    with _FolderLock(os.path.dirname(out)):
        return _recover(out)


def staging_folder(out: str) -> str:
    """A new empty folder beside ``out`` (same file system, so :func:`commit_folder` is a rename), with the
    permissions a plain ``mkdir`` would give, named after this process so that a later run can tell when it
    was left by a killed one. Leftovers of dead runs for ``out`` are recovered first (:func:`recover_output`).
    The caller removes the folder if it does not commit it."""
    out = os.path.abspath(os.fspath(out))
    with _FolderLock(os.path.dirname(out)):
        _recover(out)
        tmpdir = _staged_name(out, "tmp")
        os.mkdir(tmpdir, 0o777 & ~_umask())
    return tmpdir


def _fsync_tree(folder: str) -> None:
    """fsync every file and folder under ``folder`` (files the writer already synced cost nothing more)."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def commit_folder(tmpdir: str, out: str) -> None:
    """Move the finished folder ``tmpdir`` into place at ``out``; an existing ``out`` is only removed once the
    new one is there. A crash at any point leaves either the old or the new complete folder at ``out``, or
    entries from which the next :func:`staging_folder` / :func:`recover_output` restores one of them. On an
    error ``out`` is left as it was and ``tmpdir`` is removed."""
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    _fsync_tree(tmpdir)  # the contents are on disk before anything points at them
    with _FolderLock(parent):
        ready = _with_state(tmpdir, "ready") if _STAGED.match(os.path.basename(tmpdir)) else _staged_name(out, "ready")
        os.rename(tmpdir, ready)
        old = None
        try:
            _fsync_dir(parent)  # "ready" is on disk before OUTPUT is moved aside
            if os.path.lexists(out):
                old = _with_state(ready, "old")
                os.rename(out, old)
            os.rename(ready, out)
        except BaseException as e:
            if old is not None and not os.path.lexists(out):
                os.rename(old, out)
            _remove(ready)
            if isinstance(e, OSError):
                raise OSError(e.errno, f"cannot move the new output into place: {e.strerror}", out) from None
            raise
        _fsync_dir(parent)
        if old is not None:
            _remove(old)


def _named(e: BaseException, path: str) -> BaseException:
    """An ``OSError`` without a file name (``EFBIG`` from a write, ``ENOSPC``...) gets ``path``; others as they are."""
    if isinstance(e, OSError) and not e.filename:
        return OSError(e.errno, e.strerror or str(e), path)
    return e


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
            if not _utf8_ok(k) or not _utf8_ok(v):
                raise ValueError(f"metadata {_brief(k)}: keys and values must be valid Unicode (no lone "
                                 "surrogates), as UTF-8 JSON requires")
        items = []
        seen = set()
        # The reader's rules (read_header): a file this writer completes is a file load() accepts.
        for name, dtype, shape in entries:
            problem = _name_problem(name)
            if problem:
                raise ValueError(f"invalid tensor name {_brief(name)}: {problem}")
            if name in seen:
                raise ValueError(f"duplicate tensor name {name!r}")
            seen.add(name)
            try:
                code = dtype if isinstance(dtype, str) and dtype in DTYPES else dtype_code(dtype)
            except TypeError as e:
                raise TypeError(f"tensor {name!r}: {e}") from None
            try:
                shape = tuple(shape)
            except TypeError:
                raise TypeError(f"tensor {name!r}: shape must be a sequence of ints, got {_brief(shape)}") from None
            problem = _shape_problem(shape, DTYPES[code].itemsize)
            if problem:
                raise ValueError(f"tensor {name!r}: shape {_brief(shape)} {problem}")
            items.append((name, code, tuple(int(n) for n in shape)))
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
        if len(raw) > MAX_HEADER_BYTES:
            raise ValueError(f"{self.path}: the header would take {len(raw)} bytes, over the {MAX_HEADER_BYTES}-byte "
                             "limit of safetensors readers (too many tensors or too much metadata)")
        self._data_start = 8 + len(raw)
        self.size = self._data_start + off
        if os.path.isdir(self.path):  # else found only at the final rename, named by the temporary file
            raise IsADirectoryError(f"{self.path} is a folder; a checkpoint is written to a file path "
                                    f"(e.g. {os.path.join(self.path, SINGLE_NAME)})")
        if not overwrite and os.path.lexists(self.path):
            raise FileExistsError(f"{self.path} already exists (pass overwrite=True / --overwrite to replace it)")
        recover_output(self.path)  # temporary files of killed writers of this path
        self._tmp = _staged_name(self.path, "tmp")
        # O_EXCL: a name of this process's own; the mode goes through the umask like any new file's
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from None
        try:
            self._f = os.fdopen(fd, "wb")
            self._f.write(struct.pack("<Q", len(raw)))
            self._f.write(raw)
            self._f.truncate(self.size)  # reserve the full length; pieces fill it in place
        except OSError as e:
            self.abort()
            raise _named(e, self.path) from None
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
            try:
                self._f.seek(self._data_start + off + done)
                self._f.write(a.reshape(-1).view(np.uint8).data)
            except OSError as e:
                raise _named(e, self.path) from None
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
                try:
                    k = os.pwrite(dst_fd, chunk, self._data_start + off + done + pos)
                except OSError as e:
                    raise _named(e, self.path) from None
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
                try:
                    os.link(self._tmp, self.path)  # fails if path appeared meanwhile: never clobber
                except FileExistsError:
                    raise FileExistsError(errno.EEXIST, "already exists (it appeared while this file was written)",
                                          self.path) from None
                os.unlink(self._tmp)
            self._done = True
            _fsync_dir(os.path.dirname(self.path))
        except OSError as e:
            self.abort()
            raise _named(e, self.path) from None
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


def qcore_metadata(quantized: Mapping[str, dict], extra: Optional[Mapping[str, str]] = None) -> dict:
    """The ``__metadata__`` of a qcore file: user strings plus the versioned table of quantized tensors."""
    return _format("qcore").file_metadata(quantized, extra)


def save(path, tensors: Mapping[str, Union[QuantizedArray, np.ndarray]], metadata: Optional[Mapping[str, str]] = None,
         *, overwrite: bool = True, format: Optional[str] = None) -> None:
    """Write ``tensors`` to the safetensors file ``path``: :class:`QuantizedArray` values encoded by ``format``
    (default ``"qcore"``, see :mod:`qcore.formats`), arrays as they are. ``metadata`` (str to str) goes into
    ``__metadata__`` beside the format's keys.

    The file is written under a temporary name and renamed when complete. ``overwrite=False`` refuses an
    existing ``path`` (``FileExistsError``).
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> QuantizedArray or numpy array, got "
                        f"{type(tensors).__name__}")
    fmt = _format(format)
    entries, arrays, qtable = [], {}, {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if isinstance(value, QuantizedArray):
            qtable[name] = fmt.describe(value.scheme, value.shape)
            parts = fmt.encode(name, value)
            for tname, code, shape in fmt.entries(name, value.shape, value.scheme):
                arr = np.asarray(parts[tname])
                if dtype_code(arr.dtype) != code or arr.shape != shape:
                    raise ValueError(f"tensor {name!r}: {tname} is {arr.dtype} {arr.shape}, expected {code} {shape}")
                entries.append((tname, code, shape))
                arrays[tname] = arr
        elif isinstance(value, np.ndarray):
            try:
                entries.append((name, dtype_code(value.dtype), value.shape))
            except TypeError as e:
                raise TypeError(f"tensor {name!r}: {e}") from None
            arrays[name] = value
        else:
            raise TypeError(f"tensor {name!r}: expected a QuantizedArray or numpy.ndarray, got "
                            f"{type(value).__name__}")
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tensor names collide with the entries of a quantized tensor: {dup}")
    md = fmt.file_metadata({k: qtable[k] for k in sorted(qtable)}, metadata)
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
    with os.fdopen(_open_regular(ipath), "rb") as f:
        raw = f.read(MAX_HEADER_BYTES + 1)
    if len(raw) > MAX_HEADER_BYTES:
        raise _bad(ipath, f"bad index: larger than {MAX_HEADER_BYTES} bytes")
    index = _load_json(raw, ipath, "bad index")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise _bad(ipath, "bad index: expected a JSON object with a 'weight_map' object")
    shards: dict = {}
    for tname, fname in index["weight_map"].items():
        if not isinstance(fname, str) or not _SHARD_NAME.match(fname) or fname in (".", ".."):
            raise _bad(ipath, f"tensor {_brief(tname)}: shard {_brief(fname)} must be a plain file name ending in "
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
        # exists(), not isfile(): a FIFO or device under these names is refused by name when opened
        if os.path.exists(os.path.join(p, INDEX_NAME)):
            shards = _read_index(p)
            files = [os.path.join(p, name) for name in shards]
            for fpath in files:
                if not os.path.exists(fpath):
                    raise _bad(os.path.join(p, INDEX_NAME), f"shard {os.path.basename(fpath)!r} listed in the "
                                                             "index does not exist")
            return "sharded", files, shards
        single = os.path.join(p, SINGLE_NAME)
        if os.path.exists(single):
            return "folder", [single], None
        pickles = sorted(f for f in os.listdir(p) if f.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            check_not_pickle(os.path.join(p, pickles[0]))
        for name in (INDEX_NAME, SINGLE_NAME):
            if os.path.islink(os.path.join(p, name)):  # exists() follows the link: it points nowhere
                raise _bad(os.path.join(p, name), f"a link to {os.readlink(os.path.join(p, name))!r}, which does "
                                                  f"not exist")
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


def _read_tensors(header: Header) -> dict:
    """``{name: array}`` of every tensor of a checked header, read from the same file the header came from."""
    p = header.path
    raw = {}
    with os.fdopen(_open_regular(p), "rb", buffering=0) as f:
        if header.identity and _identity(os.fstat(f.fileno())) != header.identity:
            raise _bad(p, "the file changed after its header was read; load it again")
        for name, t in header.tensors.items():
            buf = np.empty(t.nbytes, np.uint8)
            view, pos = memoryview(buf), 0
            while pos < t.nbytes:
                k = os.preadv(f.fileno(), [view[pos:]], t.start + pos)
                if not k:
                    raise _bad(p, f"tensor {name!r}: the file ended early (was it changed while reading?)")
                pos += k
            raw[name] = buf.view(t.np_dtype).reshape(t.shape)
    return raw


def _load_file(path: str, header: Header, qmeta: dict, fmt) -> dict:
    raw = _read_tensors(header)
    out = {}
    for name, (scheme, shape, _dtype) in qmeta.items():
        parts = {tname: raw.pop(tname) for tname, _, _ in fmt.entries(name, shape, scheme)}
        out[name] = fmt.decode(header.path, name, scheme, shape, parts)
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
        fmt = _format_of(header)
        qmeta = fmt.read_table(header)
        _check_layout(header, qmeta, fmt)
        stored = set(header.tensors) - {t for n in qmeta for t in fmt.candidates(n)}
        for name in list(stored) + list(qmeta):
            if name in owner:
                raise _bad(fpath, f"tensor {name!r} is also in {owner[name]}")
            owner[name] = fpath
        checked.append((fpath, header, qmeta, fmt))
    out = {}
    for fpath, header, qmeta, fmt in checked:
        out.update(_load_file(fpath, header, qmeta, fmt))
    return out


# The format layer is imported last: its modules build on the container above. The qcore format's facts live
# in its module; these names stay here for the code that knows them from here.
from .formats import format_of as _format_of_metadata, get_format as _get_format  # noqa: E402
from .formats.native import FORMAT_VERSION, META_QUANTIZED, META_VERSION, encode_qweight  # noqa: E402
