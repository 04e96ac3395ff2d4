"""Run a numba kernel on PyTorch's own OpenMP thread team. A leaf: imports torch, ctypes and numba only.

Why: after every parallel op, PyTorch's OpenMP workers spin for milliseconds waiting for the next one. A second
thread pool started in that window (numba's ``parallel=True`` runtime, or Python threads) finds the cores taken by
the spinning workers. Measured on the 2-core development CPU, a 2-thread 4096x4096 int8 GEMV took 1.74 ms right
after a dense bf16 layer against 0.65 ms on idle cores. Handing the same work to torch's team instead
(``GOMP_parallel`` of the libgomp that torch loaded) reuses the spinning workers: 0.95 ms in the same alternation,
and nothing oversubscribes the cores.

A kernel is a numba ``cfunc(void(voidptr))``; every team thread calls it with the same pointer: an int64 block whose
first entry is a chunk counter, then shapes and array addresses (``as_ptr`` turns one back into a pointer for
``numba.carray``). The threads split the work by claiming chunks from the counter (``claim``), so a thread that
starts late simply takes fewer. Where torch does
not run on GNU OpenMP (macOS, Windows, a torch built with another backend), :func:`team_call` returns False and
the caller runs its kernel some other way.

>>> available() in (True, False)
True
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["as_ptr", "available", "check_contiguous", "claim", "team_call", "team_size"]

_LOCK = threading.Lock()
_GOMP_PARALLEL = None  # ctypes function, or False once the lookup failed
_DISABLED = os.environ.get("QTORCH_OMP_TEAM", "1") == "0"  # opt-out, and a way to test the fallback


def _torch_libgomp():
    """Path of the libgomp that torch itself loaded, or None (another OpenMP runtime, or not Linux)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    found = None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "libgomp" in os.path.basename(path) and path.startswith("/"):
                    if os.path.realpath(path).startswith(torch_dir):
                        return path  # the copy bundled with torch
                    found = found or path  # a system libgomp that torch linked against
    except OSError:
        return None
    return found


def _lookup():
    global _GOMP_PARALLEL
    with _LOCK:
        if _GOMP_PARALLEL is None:
            fn = False
            path = None if _DISABLED else _torch_libgomp()
            if path is not None:
                try:
                    fn = ctypes.CDLL(path).GOMP_parallel  # already loaded: dlopen returns torch's handle
                    fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
                    fn.restype = None
                except (OSError, AttributeError):
                    fn = False
            _GOMP_PARALLEL = fn
    return _GOMP_PARALLEL


def available() -> bool:
    """True when kernels can run on torch's OpenMP team in this process."""
    return bool(_GOMP_PARALLEL if _GOMP_PARALLEL is not None else _lookup())


def team_size() -> int:
    """Threads of torch's intra-op team (``torch.get_num_threads()``)."""
    return max(1, torch.get_num_threads())


def check_contiguous(**arrays) -> None:
    """The team kernels address arrays by shape alone: every one must be C-contiguous (a ValueError names it)."""
    for name, a in arrays.items():
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (the kernel addresses it by its shape)")


def team_call(kernel_address: int, block_address: int, nthreads: int | None = None) -> bool:
    """Run the cfunc at ``kernel_address`` on torch's team with ``block_address`` as its argument; wait for all.

    Returns False (and runs nothing) when there is no such team. ``nthreads`` defaults to torch's thread count,
    which makes libgomp reuse the team torch's own ops use. ctypes releases the GIL for the call.
    """
    fn = _GOMP_PARALLEL if _GOMP_PARALLEL is not None else _lookup()
    if not fn:
        return False
    fn(kernel_address, block_address, team_size() if nthreads is None else nthreads, 0)
    return True


@intrinsic
def as_ptr(typingctx, addr):
    """An int64 address as a ``voidptr`` (for ``numba.carray`` in a team kernel)."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return types.voidptr(addr), codegen


@intrinsic
def claim(typingctx, block):
    """Atomically ``block[0] += 1``; returns the value before: the chunk the calling thread takes."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", a.data, ir.Constant(ir.IntType(64), 1), "monotonic")
    return types.int64(block), codegen
