"""Keep CPython's frame-stack chunks instead of unmapping and mapping one per call at a chunk's edge. A leaf.

CPython 3.11 and 3.12 hold a thread's Python frames in a chain of 16 KiB chunks. A call whose frame does not fit
in the current chunk gets a new one from the arena allocator (``mmap``), and the chunk is freed (``munmap``) as
soon as that frame returns. A loop that calls at exactly that depth pays both system calls, a page fault and, with
other threads in the process (torch's OpenMP team), a TLB shootdown on every call: about 7 us where the call itself
costs 0.1 (CPython gh-142183, fixed by caching one chunk per thread in 3.13 and 3.14 patch releases). Where the
edge falls depends on how deep the caller stands, so a model may run at full speed from one script and 2x slower
from another: a compiled 100-layer model of one-row quantized layers, measured on a 2-core Zen 3, took 3.5 ms a call
from most stack depths and 6.8-9.0 ms from the shallowest eight (the dense model 0.9 against up to 1.7 ms).

:func:`install` puts a small cache in front of the interpreter's arena allocator (``PyObject_SetArenaAllocator``,
CPython's documented hook): up to :data:`SLOTS` freed chunks of :data:`CHUNK` bytes are kept and handed back at the
next request of that size; every other request (obmalloc's arenas, a big frame's larger chunk) goes to the
allocator that was there before, as does a chunk freed while the cache is full. The allocator runs as native code
(numba ``cfunc``); its slots are taken and filled with atomic exchanges, so that it stays correct where two
threads call it at once. The first quantized weight a process makes or unpickles installs it (:func:`ensure`) on
CPython 3.11 and 3.12, the versions without the fix, unless ``QTORCH_STACK_CACHE=0``; it holds at most
``SLOTS * CHUNK`` bytes (64 KiB).

>>> from qtorch import _stack_cache
>>> _stack_cache.install() == _stack_cache.applicable()   # installed where the interpreter has the cost
True
>>> 0 <= _stack_cache.cached_chunks() <= _stack_cache.SLOTS
True
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import sysconfig

import numpy as np
from llvmlite import ir
from numba import carray, types
from numba.extending import intrinsic

__all__ = ["CHUNK", "SLOTS", "ENV", "applicable", "ensure", "install", "uninstall", "installed", "cached_chunks"]

#: the chunk size kept: CPython's data stack chunk (``_PY_DATA_STACK_CHUNK_SIZE``), what any frame under ~8 KiB gets
CHUNK = 16 * 1024
#: how many freed chunks are kept (a thread at a chunk's edge needs one; a few threads, a few)
SLOTS = 4
#: ``QTORCH_STACK_CACHE=0`` keeps the interpreter's allocator as it is
ENV = "QTORCH_STACK_CACHE"

# the state the native allocator reads: the previous allocator (context, alloc, free), then the slots (0 = empty)
_OLD_CTX, _OLD_ALLOC, _OLD_FREE, _FIRST_SLOT = 0, 1, 2, 3
_N = _FIRST_SLOT + SLOTS
_I64, _I8P = ir.IntType(64), ir.IntType(8).as_pointer()
_STATE = np.zeros(_N, np.int64)  # never freed: the allocator may be called until the process ends


class _ArenaAllocator(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("alloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]


_native = None  # (alloc cfunc, free cfunc), compiled at the first install
_previous = None  # the allocator install() replaced, while installed
_ensured = False


def applicable() -> bool:
    """Whether this interpreter has the chunk-edge cost (CPython 3.11 or 3.12 with the GIL) and the variable does not
    turn the cache off."""
    return (sys.implementation.name == "cpython" and (3, 11) <= sys.version_info[:2] <= (3, 12)
            and not sysconfig.get_config_var("Py_GIL_DISABLED") and os.environ.get(ENV, "1") != "0"
            and hasattr(ctypes.pythonapi, "PyObject_SetArenaAllocator"))


@intrinsic
def _swap(typingctx, base, index, value):
    """Atomically ``base[index] = value``; the old value."""
    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("xchg", builder.gep(args[0], [args[1]]), args[2], "seq_cst")
    return types.int64(base, types.intp, types.int64), codegen


@intrinsic
def _fill(typingctx, base, index, value):
    """Atomically ``base[index] = value`` where it is 0; whether it was."""
    def codegen(context, builder, sig, args):
        pair = builder.cmpxchg(builder.gep(args[0], [args[1]]), ir.Constant(_I64, 0), args[2], "seq_cst",
                               "seq_cst")
        return builder.extract_value(pair, 1)
    return types.boolean(base, types.intp, types.int64), codegen


@intrinsic
def _call_alloc(typingctx, fn, ctx, size):
    """``(*fn)(ctx, size)``, the function and its context given as integers."""
    def codegen(context, builder, sig, args):
        f = builder.inttoptr(args[0], ir.FunctionType(_I8P, [_I8P, _I64]).as_pointer())
        return builder.ptrtoint(builder.call(f, [builder.inttoptr(args[1], _I8P), args[2]]), _I64)
    return types.int64(types.int64, types.int64, types.int64), codegen


@intrinsic
def _call_free(typingctx, fn, ctx, ptr, size):
    """``(*fn)(ctx, ptr, size)``."""
    def codegen(context, builder, sig, args):
        f = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), [_I8P, _I8P, _I64]).as_pointer())
        builder.call(f, [builder.inttoptr(args[1], _I8P), builder.inttoptr(args[2], _I8P), args[3]])
        return context.get_dummy_value()
    return types.none(types.int64, types.int64, types.int64, types.int64), codegen


# (the previous allocator's addresses are read from the state at each call, never compiled in: one cache entry
# serves every process, whatever addresses its interpreter has)
def _alloc(state, size):
    if size == CHUNK:
        for i in range(_FIRST_SLOT, _N):
            p = _swap(state, i, 0)
            if p != 0:
                return p
    s = carray(state, _N)
    return _call_alloc(s[_OLD_ALLOC], s[_OLD_CTX], size)


def _free(state, ptr, size):
    if size == CHUNK and ptr != 0:
        for i in range(_FIRST_SLOT, _N):
            if _fill(state, i, ptr):
                return
    s = carray(state, _N)
    _call_free(s[_OLD_FREE], s[_OLD_CTX], ptr, size)


def _compile():
    """The allocator's two native functions (compiled at the first install, or loaded from numba's cache, keyed on
    qtorch's kernel sources as its other kernels are)."""
    from qcore._jitcache import keyed_cfunc

    from ._ir import cached

    return (keyed_cfunc(_alloc, types.int64(types.CPointer(types.int64), types.int64), cached.key, nogil=True),
            keyed_cfunc(_free, types.void(types.CPointer(types.int64), types.int64, types.int64), cached.key,
                        nogil=True))


def _api():
    api = ctypes.pythonapi
    for name in ("PyObject_GetArenaAllocator", "PyObject_SetArenaAllocator"):
        getattr(api, name).argtypes = [ctypes.POINTER(_ArenaAllocator)]
        getattr(api, name).restype = None
    return api


def _current() -> _ArenaAllocator:
    a = _ArenaAllocator()
    _api().PyObject_GetArenaAllocator(ctypes.byref(a))
    return a


def installed() -> bool:
    """Whether the interpreter's arena allocator is this module's cache."""
    return _native is not None and _current().alloc == _native[0].address


def ensure() -> None:
    """:func:`install`, the first time only (each quantized weight calls it as it is made; a later
    :func:`uninstall` stands)."""
    global _ensured
    if not _ensured:
        _ensured = True
        install()


def install() -> bool:
    """Put the chunk cache in front of the interpreter's arena allocator (see the module's notes); whether it is
    there now. Does nothing where :func:`applicable` is False, or where it is installed already."""
    global _native, _previous
    if installed():
        return True
    if not applicable():
        return False
    if _native is None:
        _native = _compile()
        # never freed, whatever clears this module's globals at exit: an allocator installed over this one later
        # calls it until the process ends (uninstall() then leaves it in place)
        for obj in (_native, _STATE):
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
        # the previous allocator back before the interpreter finalizes (atexit runs first; handlers run last in,
        # first out: before numba's own, which were registered as it was imported)
        atexit.register(uninstall)
    old = _current()
    _STATE[_OLD_CTX], _STATE[_OLD_ALLOC], _STATE[_OLD_FREE] = old.ctx or 0, old.alloc or 0, old.free or 0
    _previous = old
    _api().PyObject_SetArenaAllocator(ctypes.byref(_ArenaAllocator(_STATE.ctypes.data, _native[0].address,
                                                                   _native[1].address)))
    return True


def uninstall() -> bool:
    """Give the interpreter its previous arena allocator back and return the kept chunks to it; whether it did
    (False where the cache is not the allocator now: not installed, or something installed over it)."""
    global _previous
    if not installed():
        return False
    previous, _previous = _previous, None
    _api().PyObject_SetArenaAllocator(ctypes.byref(previous))
    free = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(previous.free)
    for i in range(_FIRST_SLOT, _FIRST_SLOT + SLOTS):
        ptr, _STATE[i] = int(_STATE[i]), 0  # (under the GIL, with nothing left to call the cache)
        if ptr:
            free(previous.ctx, ptr, CHUNK)
    return True


def cached_chunks() -> int:
    """How many freed chunks the cache holds now (0 to :data:`SLOTS`)."""
    return int(np.count_nonzero(_STATE[_FIRST_SLOT:]))
