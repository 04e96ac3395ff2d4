"""Real memory held by a model's tensors.

``memory_footprint(model)`` counts every parameter and buffer once per underlying storage, so tied weights
(``lm_head.weight is wte.weight``), a module registered under two names, and views into one buffer are counted
once, and the int8 / packed uint8 buffers of quantized layers count at their real size. On transformers models it
agrees with ``PreTrainedModel.get_memory_footprint()`` (which counts parameters and buffers, de-duplicated by
identity).

    >>> import torch
    >>> lin = torch.nn.Linear(4, 8)                  # 8*4 + 8 float32
    >>> memory_footprint(lin)
    160
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
from torch import nn

from qcore.labels import format_bytes as _format_bytes

__all__ = ["memory_footprint", "module_nbytes", "format_bytes", "release_free_memory", "dense_weight_nbytes",
           "quantized_weight_nbytes", "compression_ratio"]


def _tensors(module: nn.Module):
    # remove_duplicate=False: walk every registration; de-duplication happens on storages below.
    for _, p in module.named_parameters(remove_duplicate=False):
        yield p
    for _, b in module.named_buffers(remove_duplicate=False):
        if b is not None:
            yield b


def _storage_key_and_nbytes(t: torch.Tensor):
    """(key identifying the memory, bytes of that memory) for one tensor."""
    if nn.parameter.is_lazy(t):  # LazyLinear before its first forward: no memory yet
        return ("id", id(t)), 0
    if t.device.type == "meta":
        # Meta tensors own no memory, but count what they will need once materialised (like transformers does),
        # de-duplicated by identity since they have no data pointer.
        return ("meta", id(t)), t.nelement() * t.element_size()
    try:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        nbytes = st.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without a plain storage
        return ("id", id(t)), t.nelement() * t.element_size()
    if ptr == 0:  # empty storage
        return ("id", id(t)), 0
    return (t.device.type, t.device.index, ptr), nbytes


def module_nbytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind ``module``'s parameters and buffers (see the module docstring)."""
    seen: dict = {}
    for t in _tensors(module):
        key, nbytes = _storage_key_and_nbytes(t)
        if key not in seen:
            seen[key] = nbytes
    return int(sum(seen.values()))


def memory_footprint(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers, each storage counted once.

    A storage is the block of memory a tensor views; two tensors that share one (tied weights, views) are counted
    once, at the storage's size. Raises TypeError for anything that is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"memory_footprint expects a torch.nn.Module, got {type(model).__name__!r}")
    return module_nbytes(model)


def format_bytes(n: int | float) -> str:
    """Human-readable bytes: 1536 -> '1.5 KiB' (qcore's formatter, one decimal)."""
    return _format_bytes(n, digits=1)


# Bytes per element of the dense dtypes a quantized weight can come from (the names qcore checkpoints record).
_DENSE_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def dense_weight_nbytes(shape, dtype) -> int:
    """Bytes of a dense weight of ``shape`` and ``dtype`` (a torch dtype or its name; None means float32)."""
    name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    if name not in _DENSE_ITEMSIZE:
        raise ValueError(f"dtype {dtype!r} is not a dense floating type ({', '.join(_DENSE_ITEMSIZE)})")
    n = 1
    for d in shape:
        n *= int(d)
    return n * _DENSE_ITEMSIZE[name]


def quantized_weight_nbytes(shape, scheme) -> int:
    """Bytes a quantized weight takes as stored: packed codes + scales + zero points (no bias)."""
    from qcore import checkpoint as ck

    total = 0
    for _, code, sub in ck.quantized_entries("w", tuple(shape), scheme):
        n = 1
        for d in sub:
            n *= int(d)
        total += n * ck.DTYPES[code].itemsize
    return total


def compression_ratio(dense_nbytes: int, quantized_nbytes: int) -> float:
    """How many times smaller the quantized weights are: dense bytes of the quantized weights / their bytes as
    stored (codes + scales + zero points). Biases and layers left dense are not part of it; 1.0 when nothing
    was quantized. ``qtorch quantize``'s report and ``qtorch info`` both print this number.

    >>> import qcore
    >>> s = qcore.QuantScheme(4, False, qcore.PerGroup(128))   # w4a16
    >>> round(compression_ratio(dense_weight_nbytes((384, 384), "float32"), quantized_weight_nbytes((384, 384), s)), 2)
    7.42
    """
    return dense_nbytes / quantized_nbytes if quantized_nbytes else 1.0


_libc = None


def release_free_memory() -> bool:
    """Hand memory that the C allocator keeps after ``free`` back to the operating system (glibc ``malloc_trim``).

    glibc serves medium blocks from its heap and keeps freed heap pages mapped, so after a model's dense weights
    are freed the process RSS may not drop although the memory is free. Returns True where it could ask (Linux
    with glibc), False elsewhere; never raises.
    """
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = getattr(_libc, "malloc_trim", None)
        if trim is None:  # musl and others
            return False
        trim(0)
        return True
    except OSError:
        return False
