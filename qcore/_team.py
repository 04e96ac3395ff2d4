"""Run a numba kernel on an OpenMP thread team (GNU OpenMP's ``GOMP_parallel``). A leaf: imports numba only.

Why: a Python thread pool wakes its threads through the GIL and a futex, 60-100 us per call on the 2-core
development CPU, and a 16M-code pack takes under 1 ms. An OpenMP team's workers spin for a few ms after each
call, so back-to-back calls find them awake. Measured there, 4-bit packing of 16M codes on 2 threads took
0.34-0.53x the time of ``np.copyto`` on the team against 0.55-0.85x on Python threads, in the same runs.

Which team: the OpenMP runtime PyTorch runs on when torch is loaded (found through the handle of
``libtorch_cpu``, never by importing torch), so qcore's kernels and torch's ops share one set of workers;
otherwise a GNU OpenMP runtime already in the process, or the system's ``libgomp.so.1``.

The team kernels of ``packing`` and ``_kernels`` inline :func:`claim_loop`, ``HEADER``, :func:`claim` and
:func:`as_ptr`, and numba's cache only notices changes to a kernel's own file: after editing them here, delete
``qcore/__pycache__/*.nb[ic]``. Without one (macOS, Windows, no libgomp), in a forked child (a GNU OpenMP team does not
survive fork) or with ``QCORE_OMP_TEAM=0``, :func:`gomp_parallel` is None and callers use Python threads.

Fork: GNU OpenMP keeps a team's idle workers in a pool of the thread that started it. A child forked from that
thread inherits the pool but not its threads, and its next team of 2+ threads (a torch op on 2 threads) waits
for them forever. So before every ``os.fork`` (``multiprocessing``'s "fork", DataLoader workers) qcore releases
the forking thread's idle workers of every OpenMP runtime it runs on, and of torch's when torch is loaded
(:func:`release_before_fork`, OpenMP 5.0's ``omp_pause_resource_all``): the child starts without a pool, and the
parent's next team call starts new workers (once per fork).

A kernel is a numba ``cfunc(void(voidptr))`` (:class:`TeamKernel`); every team thread calls it with the same
pointer: an int64 block whose first entry is a chunk counter the threads ``claim`` chunks from, so a thread
that starts late simply takes fewer; then shapes and array addresses (``as_ptr`` turns one back into a
pointer for ``numba.carray``).

>>> gomp_parallel() is None or callable(gomp_parallel())
True
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

__all__ = ["HEADER", "TeamKernel", "all_done", "as_ptr", "claim", "claim_loop", "gomp_parallel", "on_torch_team",
           "own_spinners", "release_before_fork", "run", "team_threads", "torch_gomp_parallel"]

#: a team block: [chunk counter, chunks, total, the kernel's own operands..., one result per chunk, chunks done]
HEADER = 16
_LOCK = threading.Lock()
_FN = None  # the resolved GOMP_parallel (ctypes function), False when there is none
_RESOLVED_WITH_TORCH = False  # whether torch's library was mapped when _FN was resolved
_FROM_TORCH = False  # whether _FN is torch's own (looked up through libtorch_cpu)
_LAST_RESOLVE = 0.0
_RESOLVE_INTERVAL_S = 1.0
_DISABLED = os.environ.get("QCORE_OMP_TEAM", "1") == "0"  # opt-out, and a way to test the thread fallback
_IN_FORKED_CHILD = False
#: after a call, libgomp's workers spin (about 9 ms measured here) before they sleep: the cores they keep busy
#: are the team's, free for our next call, not other work's (``qcore._parallel.busy_cores`` subtracts them)
SPIN_WINDOW_S = 0.02
_LAST_END = 0.0
_LAST_SIZE = 1


#: ``omp_pause_resource_all`` of every GNU OpenMP runtime :func:`_symbol` found, by address (one per runtime)
_PAUSES: dict = {}
_TORCH_RUNTIME_SEEN = False  # whether torch's runtime (if it has one) is among _PAUSES
_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t; GNU OpenMP frees the calling thread's pool for either kind


def release_before_fork() -> None:
    """Release the idle team workers that the calling thread's OpenMP runtimes keep (qcore's, and torch's when
    torch is loaded), so that a child forked now starts with no pool of missing threads. Runs before every
    ``os.fork``; the parent's next team call starts new workers. A runtime without ``omp_pause_resource_all``
    (GCC < 9) is left alone: its child can hang as before.
    """
    global _TORCH_RUNTIME_SEEN
    try:
        if not _TORCH_RUNTIME_SEEN and _torch_loaded():
            # torch's own ops leave the same pool (a torch-only parent's child hangs too); qtorch's layers run them
            lib = _loaded_library(("libtorch_cpu.",))
            if lib is not None:
                _symbol(lib)
                _TORCH_RUNTIME_SEEN = True
        for pause in list(_PAUSES.values()):
            pause(_OMP_PAUSE_SOFT)  # -1 only inside a parallel region, where Python never forks
    except Exception:  # pragma: no cover - a fork must go ahead; the child may hang as it did before
        pass


def _after_fork_in_child():
    global _IN_FORKED_CHILD, _LOCK
    # the child starts no team for qcore: where release_before_fork could not empty the pool (a runtime without
    # omp_pause_resource_all) the call would hang. torch's ops in the child do use the emptied pool.
    _IN_FORKED_CHILD = True
    _LOCK = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=release_before_fork, after_in_child=_after_fork_in_child)


def _loaded_library(prefixes) -> str | None:
    """Path of the first loaded shared library whose file name starts with one of ``prefixes``."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if path.startswith("/") and os.path.basename(path).startswith(prefixes):
                    return path
    except OSError:
        pass
    return None


def _symbol(lib: str):
    """``GOMP_parallel`` of ``lib`` (a ctypes function carrying the same runtime's ``omp_get_max_threads`` as
    ``.max_threads``), or None."""
    try:
        handle = ctypes.CDLL(lib)  # a loaded library: dlopen returns its handle
        fn, max_threads = handle.GOMP_parallel, handle.omp_get_max_threads
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
    fn.restype = None
    max_threads.argtypes, max_threads.restype = (), ctypes.c_int
    fn.max_threads = max_threads
    pause = getattr(handle, "omp_pause_resource_all", None)  # OpenMP 5.0: GCC >= 9
    if pause is not None and not _is_llvm_openmp(handle):
        pause.argtypes, pause.restype = (ctypes.c_int,), ctypes.c_int
        _PAUSES.setdefault(ctypes.cast(pause, ctypes.c_void_p).value, pause)
    return fn


def _is_llvm_openmp(handle) -> bool:
    """Whether the runtime is LLVM's or Intel's OpenMP (which also serves ``GOMP_parallel``): it resets itself in a
    forked child, and pausing it would touch every thread's team, not only the forking thread's."""
    try:
        handle["__kmpc_fork_call"]
    except AttributeError:
        return False
    return True


def torch_gomp_parallel():
    """``GOMP_parallel`` as the loaded ``libtorch_cpu`` binds it, or None (torch not loaded, or not on OpenMP).

    ``dlsym`` on libtorch_cpu's handle searches that library's own dependencies, so it finds the runtime torch
    runs on (its bundled libgomp, a system one, or Intel OpenMP's GOMP entry points), never another copy.
    """
    lib = _loaded_library(("libtorch_cpu.",))
    return None if lib is None else _symbol(lib)


def _torch_loaded() -> bool:
    # a real module: sys.modules["torch"] = None (a common way to hide torch) or a stub is not torch
    return getattr(sys.modules.get("torch"), "__file__", None) is not None


def _resolve():
    """(GOMP_parallel or None, whether libtorch_cpu was mapped, whether the function is torch's own)."""
    if _DISABLED:
        return None, False, False
    torch_lib = _torch_loaded() and _loaded_library(("libtorch_cpu.",)) is not None
    fn = torch_gomp_parallel() if torch_lib else None
    from_torch = fn is not None
    if fn is None:
        lib = _loaded_library(("libgomp.", "libgomp-"))  # someone loaded one already: share it
        fn = _symbol(lib) if lib else None
    if fn is None and sys.platform.startswith("linux"):
        # Loading libgomp.so.1 first means a torch imported later binds to it as well (same soname):
        # one runtime, one team. A torch wheel whose libgomp has a hashed name brings its own; the next
        # call notices torch and moves to torch's team.
        fn = _symbol("libgomp.so.1")
    return fn, torch_lib, from_torch


def gomp_parallel():
    """The ``GOMP_parallel`` to run team kernels with, or None where there is no usable team."""
    global _FN, _RESOLVED_WITH_TORCH, _FROM_TORCH, _LAST_RESOLVE
    if _IN_FORKED_CHILD:
        return None
    if _FN is None or (not _RESOLVED_WITH_TORCH and _torch_loaded()
                       and time.monotonic() - _LAST_RESOLVE > _RESOLVE_INTERVAL_S):
        with _LOCK:
            if _FN is None or (not _RESOLVED_WITH_TORCH and _torch_loaded()):
                # torch loaded but libtorch_cpu not mapped yet (another thread is importing it): asked again,
                # at most every _RESOLVE_INTERVAL_S (a scan of /proc/self/maps costs ~2 ms), until it is there
                fn, _RESOLVED_WITH_TORCH, _FROM_TORCH = _resolve()
                _FN = fn if fn is not None else False
                _LAST_RESOLVE = time.monotonic()
    return _FN or None


def team_threads() -> int:
    """Threads a team call may use: torch's thread count on torch's team (``torch.set_num_threads``, which
    libgomp keeps per thread: a thread where torch never ran an op would read the default), else the runtime's
    ``omp_get_max_threads`` (``OMP_NUM_THREADS`` or the cores); 1 without a team."""
    fn = gomp_parallel()
    if fn is None:
        return 1
    if _FROM_TORCH:
        try:
            return max(1, int(sys.modules["torch"].get_num_threads()))  # the loaded torch; never imported here
        except Exception:  # a torch without it: the runtime's own answer below
            pass
    return max(1, fn.max_threads())


def on_torch_team() -> bool:
    """Whether team calls go to the OpenMP runtime torch's ops run on (found through torch's own library)."""
    return gomp_parallel() is not None and _FROM_TORCH


def own_spinners() -> int:
    """Workers of our last team call that may still be spinning: runnable, yet free for our next call."""
    if time.monotonic() - _LAST_END < SPIN_WINDOW_S:
        return _LAST_SIZE - 1
    return 0


def run(kernel: "TeamKernel", block, nthreads: int) -> bool:
    """Run ``kernel`` on ``nthreads`` team threads with ``block`` (a NumPy int64 array the caller keeps alive)
    as its argument, and wait for all. False (nothing ran) where there is no team. ctypes releases the GIL."""
    global _LAST_END, _LAST_SIZE
    fn = gomp_parallel()
    if fn is None:
        return False
    fn(kernel(), block.ctypes.data, nthreads, 0)
    _LAST_END, _LAST_SIZE = time.monotonic(), nthreads
    return True


class TeamKernel:
    """A team kernel's Python function, compiled as a ``cfunc(void(voidptr))`` the first time it is needed (a
    cfunc compiles, or loads from numba's cache, when it is created: never at import, never without a team).

    >>> TeamKernel(lambda data: None)._cfunc is None
    True
    """

    def __init__(self, pyfunc):
        self.pyfunc = pyfunc
        self._cfunc = None
        self._lock = threading.Lock()

    def _compiled(self):
        if self._cfunc is None:
            with self._lock:
                if self._cfunc is None:
                    self._cfunc = cfunc(types.void(types.voidptr), nogil=True, cache=True)(self.pyfunc)
        return self._cfunc

    def __call__(self) -> int:
        """The compiled kernel's address."""
        return self._compiled().address

    def ctypes(self):
        """The compiled kernel as a ctypes function of one pointer (a call releases the GIL)."""
        return self._compiled().ctypes


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


@intrinsic
def _count_done(typingctx, block, index):
    """Atomically ``block[index] += 1``, releasing this thread's writes to whoever sees the new count."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(a.data, [args[1]])
        builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "acq_rel")
        return context.get_dummy_value()
    return types.void(block, index), codegen


@intrinsic
def _load_acquire(typingctx, block, index):
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.load_atomic(builder.gep(a.data, [args[1]]), "acquire", 8)
    return types.int64(block, index), codegen


@njit(inline="always")
def claim_loop(data, chunk, a, b):
    """The body of a team kernel: claim chunks of the block at ``data`` until none is left, run
    ``chunk(head, i, lo, hi, a, b)`` on each (``head``: the block's int64 header; ``a``, ``b``: constants of
    the kernel, such as dtypes), store its result, as int64, at ``HEADER + i`` and count it done at
    ``HEADER + chunks`` (see :func:`all_done`)."""
    head = carray(data, HEADER, np.int64)
    nchunks, total = head[1], head[2]
    block = carray(data, HEADER + nchunks + 1, np.int64)
    while True:
        i = claim(block)
        if i >= nchunks:
            return
        block[HEADER + i] = np.int64(chunk(head, i, total * i // nchunks, total * (i + 1) // nchunks, a, b))
        _count_done(block, HEADER + nchunks)


@njit(cache=True, nogil=True)
def all_done(block):
    """Whether every chunk of a team block has been run; its results and outputs are then visible to the
    caller (an acquire load of the count that the threads released)."""
    nchunks = block[1]
    return _load_acquire(block, HEADER + nchunks) == nchunks
