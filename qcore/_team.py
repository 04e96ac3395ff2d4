"""Run a numba kernel on an OpenMP thread team (GNU OpenMP's ``GOMP_parallel``). A leaf: imports numba only.

Why: a Python thread pool wakes its threads through the GIL and a futex, 60-100 us per call on the 2-core
development CPU, and a 16M-code pack takes under 1 ms. An OpenMP team's workers spin for a few ms after each
call, so back-to-back calls find them awake. Measured there, 4-bit packing of 16M codes on 2 threads took
0.34-0.53x the time of ``np.copyto`` on the team against 0.55-0.85x on Python threads, in the same runs.

Which team: the OpenMP runtime PyTorch runs on when torch is loaded (found through the handle of
``libtorch_cpu``, never by importing torch), so qcore's kernels and torch's ops share one set of workers;
otherwise a GNU OpenMP runtime already in the process, or the system's ``libgomp.so.1``.

Team kernels (qcore's and qtorch's) inline :func:`claim_loop` and the block layout from here, and numba's cache only
notices changes to a kernel's own file. So this file's :data:`FINGERPRINT` is part of every team kernel's cache
key, and a kernel built on :func:`claim_loop` answers a probe (a block of no chunks) with the fingerprint it was
compiled against: :class:`TeamKernel` compiles again a kernel cached against another layout (nothing to delete by
hand). Without a team (macOS, Windows, no libgomp), in a forked child (a GNU OpenMP team does not survive fork) or
with ``QCORE_OMP_TEAM=0`` (``QTORCH_OMP_TEAM=0``: a deprecated alias), :func:`gomp_parallel` is None and callers
use Python threads.

Fork: GNU OpenMP keeps a team's idle workers in a pool of the thread that started it. A child forked from that
thread inherits the pool but not its threads, and its next team of 2+ threads (a torch op on 2 threads) waits
for them forever. So before every ``os.fork`` (``multiprocessing``'s "fork", DataLoader workers) qcore releases
the forking thread's idle workers of every OpenMP runtime it runs on, and of torch's when torch is loaded
(:func:`release_before_fork`, OpenMP 5.0's ``omp_pause_resource_all``): the child starts without a pool, and the
parent's next team call starts new workers (once per fork).

A kernel is a numba ``cfunc(void(voidptr))`` (:class:`TeamKernel`); every team thread calls it with the same
pointer: an int64 block whose first entry is a chunk counter the threads ``claim`` chunks from, so a thread
that starts late simply takes fewer; then the kernel's operands, described by an :class:`Operands` spec (named,
typed fields: the Python side packs them, the numba side reads them as a named tuple), one result per chunk, and
a trailer (chunks done, starved threads, team size, cycle counts).

Under load: GNU OpenMP's team ends in a barrier that waits for every thread, even one that claimed nothing. When
another process holds a core, a team thread may wait a scheduler slice (milliseconds) for it, and so does the
call. :func:`claim_loop` counts the threads that got almost none of the chunks, and notes (in cycles) when the
first and the last thread ran out of chunks; after a call where a thread starved, or where threads waited for a
straggler longer than half the time they worked, :func:`run` caps the team (:func:`thread_cap`) for a while
before it tries the whole team again: 10 ms after one such call (a lone stall on a quiet machine costs little),
doubled with each one that follows while the core stays busy, up to 1.6 s (see :func:`_note_starved`). When a cap
ends while the machine's running tasks outnumber what the team's own threads could be (/proc/loadavg, read in
~2 us), the cap holds on without trying the whole team (:func:`_cores_still_taken`).

>>> gomp_parallel() is None or callable(gomp_parallel())
True
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import keyword
import math
import os
import platform
import sys
import threading
import time
import warnings

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.core.ccallback import CFunc
from numba.extending import intrinsic

from ._jitcache import SourcesCache, cached as _cached

__all__ = ["ADDR", "F64", "FINGERPRINT", "HEADER", "I64", "Operands", "TeamKernel", "all_done", "as_ptr", "claim",
           "claim_loop", "claim_operands", "gomp_parallel", "new_block", "on_torch_team", "own_spinners",
           "release_before_fork", "run", "team_threads", "thread_cap", "torch_gomp_parallel", "torch_team"]

#: a team block: [chunk counter, chunks, total, the kernel's operands (at most MAX_OPERANDS)..., one result per
#: chunk, then the trailer: chunks done (off a team), starved threads, team size, and the cycle counter when chunk 0
#: was claimed, when the first thread ran out of chunks and when the last did]. Entries 0-2 stay where they are in every
#: layout: a probe (no chunks) is answered in entry 2, whatever layout the kernel was compiled against.
HEADER = 16
MAX_OPERANDS = HEADER - 3
DONE, STARVED, THREADS, FIRST_IN, FIRST_OUT, LAST_OUT = range(6)  # trailer entries, from HEADER + chunks on
TRAILER = 6
PROBE = 2
#: a cycle counter the kernels read (the TSC); elsewhere 0, and only the threads' shares of the chunks tell a
#: thread that came late
_HAS_CLOCK = platform.machine().lower() in ("x86_64", "amd64")
_LOCK = threading.Lock()
_FN = None  # the resolved GOMP_parallel (ctypes function), False when there is none
_RESOLVED_WITH_TORCH = False  # whether torch's library was mapped when _FN was resolved
_FROM_TORCH = False  # whether _FN is torch's own (looked up through libtorch_cpu)
_LAST_RESOLVE = 0.0
_RESOLVE_INTERVAL_S = 1.0


def _switched_off() -> bool:
    """``QCORE_OMP_TEAM=0`` (an opt-out, and a way to test the thread fallback); ``QTORCH_OMP_TEAM`` is its old name."""
    old = os.environ.get("QTORCH_OMP_TEAM")
    if old is not None:
        warnings.warn("QTORCH_OMP_TEAM is deprecated: set QCORE_OMP_TEAM (one switch for qcore and qtorch)",
                      DeprecationWarning, stacklevel=2)
    return os.environ.get("QCORE_OMP_TEAM", old if old is not None else "1") == "0"


_DISABLED = _switched_off()
_IN_FORKED_CHILD = False
#: after a call, libgomp's workers spin (about 9 ms measured here) before they sleep: the cores they keep busy
#: are the team's, free for our next call, not other work's (``qcore._parallel.busy_cores`` subtracts them)
SPIN_WINDOW_S = 0.02
_now = time.monotonic  # the clock of the spin window and the under-load guard (tests set another)
_LAST_END = 0.0
_LAST_SIZE = 1

#: The team's state as native callers see it (qtorch's C++ decoding ops, which start the team without Python):
#: ``NATIVE[NATIVE_OPEN]`` is 1 while they may (no thread cap in force or being lifted, not a forked child), kept
#: so by :func:`_sync_native` wherever that changes. They write the end (``CLOCK_MONOTONIC`` ns) and size of their
#: last launch, and after a launch of ``NATIVE_LATE_NS`` or more that starved a thread or kept threads waiting
#: (:func:`_waited` of its block, whose layout the last four slots give) its note (threads, starved count, wall ns,
#: waited) and close the gate: :func:`settle_native` folds both into this module's own state. (A late launch that
#: did neither would change nothing while the gate is open; ``NATIVE_NOTE_CLEAN`` 1 notes those too: tests.)
(NATIVE_OPEN, NATIVE_LAST_END_NS, NATIVE_LAST_SIZE, NATIVE_NOTE, NATIVE_NOTE_THREADS, NATIVE_NOTE_STARVED,
 NATIVE_NOTE_WALL_NS, NATIVE_NOTE_WAITED, NATIVE_LATE_NS, NATIVE_NOTE_CLEAN, NATIVE_HEADER, NATIVE_FIRST_IN,
 NATIVE_FIRST_OUT, NATIVE_LAST_OUT) = range(14)
NATIVE = np.zeros(14, np.int64)
NATIVE[NATIVE_HEADER:] = HEADER, FIRST_IN, FIRST_OUT, LAST_OUT


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
    NATIVE[NATIVE_OPEN] = 0
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
    if _IN_FORKED_CHILD:
        return None
    if _FN is None or (not _RESOLVED_WITH_TORCH and _torch_loaded()
                       and time.monotonic() - _LAST_RESOLVE > _RESOLVE_INTERVAL_S):
        # torch loaded but libtorch_cpu not mapped yet (another thread is importing it): asked again, at most
        # every _RESOLVE_INTERVAL_S (a scan of /proc/self/maps costs ~2 ms), until it is there
        _resolve_now(lambda: _FN is None or (not _RESOLVED_WITH_TORCH and _torch_loaded()))
    return _FN or None


def _resolve_now(still_needed) -> None:
    global _FN, _RESOLVED_WITH_TORCH, _FROM_TORCH, _LAST_RESOLVE
    with _LOCK:
        if still_needed():
            fn, _RESOLVED_WITH_TORCH, _FROM_TORCH = _resolve()
            _FN = fn if fn is not None else False
            _LAST_RESOLVE = time.monotonic()


def torch_team():
    """``GOMP_parallel`` of the team torch's ops run on, for a caller that has imported torch (qtorch), or None
    (no team here, or torch's library has no GNU OpenMP entry points)."""
    if _IN_FORKED_CHILD or _DISABLED:
        return None
    if not _RESOLVED_WITH_TORCH and _torch_loaded():
        _resolve_now(lambda: not _RESOLVED_WITH_TORCH)  # torch is imported: no need to wait for the interval
    return gomp_parallel() if _FROM_TORCH else None


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
    if NATIVE[NATIVE_LAST_END_NS]:
        settle_native()
    if _now() - _LAST_END < SPIN_WINDOW_S:
        return _LAST_SIZE - 1
    return 0


def thread_cap(n: int) -> int:
    """``n``, or fewer while a recent team call waited for a thread kept off its core (another process held it); the
    whole team again once that while is over (the call that finds out whether the load is gone), unless other
    tasks plainly still hold the cores (:func:`_cores_still_taken`): then the cap holds on, twice as long. After
    the longest hold the whole team is tried whatever the count says (tasks of low priority, which yield a core at
    once, count as running too)."""
    if NATIVE[NATIVE_NOTE]:
        settle_native()
    cap = _CAP
    if cap is None or n <= cap[1]:
        return n
    now = _now()
    if now < cap[0]:
        return cap[1]
    if _LEVEL < MAX_LEVEL and _cores_still_taken(n):
        _hold_on(cap, now)
        return cap[1]
    return n


def running_tasks() -> int | None:
    """Tasks running or waiting for a core on the whole machine right now, the caller included (``running`` of
    /proc/loadavg's ``running/all``); None where that cannot be read (not Linux)."""
    global _LOADAVG_FD
    try:
        fd = _LOADAVG_FD
        if fd is None:
            fd = _LOADAVG_FD = os.open("/proc/loadavg", os.O_RDONLY)  # kept open: a pread costs ~2 us, open ~20
        # "0.59 0.96 0.99 1/80 11928"; anything else raises below
        return int(os.pread(fd, 128, 0).split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError, AttributeError):
        _LOADAVG_FD = None  # open it again next time (someone may have closed it; at worst a descriptor leaks)
        return None


_LOADAVG_FD = None
try:
    _CPUS = len(os.sched_getaffinity(0))  # the cores this process may run on (containers, taskset)
except (AttributeError, OSError):  # pragma: no cover - not on every platform
    _CPUS = os.cpu_count() or 1


def _cores_still_taken(n: int) -> bool:
    """Whether other tasks surely keep so many cores busy that a team of ``n`` would wait for one (read when a cap
    ends, instead of trying the whole team and waiting a scheduler slice to find out). Of the running tasks, at
    most the caller and the workers of the largest team that ran lately are ours (spinning workers are runnable);
    the rest are others'. False when unsure: the whole team is tried."""
    running = running_tasks()
    if running is None:
        return False
    if NATIVE[NATIVE_LAST_END_NS]:
        settle_native()
    ours = max(n, _LAST_SIZE, team_threads())
    if _torch_loaded() and not _FROM_TORCH:  # torch's own team beside ours: its workers spin too
        try:
            ours += max(0, int(sys.modules["torch"].get_num_threads()) - 1)
        except Exception:
            ours += n
    return running - ours > _CPUS - n


#: a team call this long that starved a thread waited for it (a worker woken from sleep costs ~0.1 ms at most)
LATE_S = 0.0003
NATIVE[NATIVE_LATE_NS] = int(LATE_S * 1e9)
#: how long the cap holds after a late call: CAP_FIRST_S after one, doubled with each late call that follows, up to
#: CAP_MAX_S. One stall on a quiet machine (a page fault, another process's burst) caps about ten 1 ms calls; a busy
#: core is tried again after 10, 20, 40 ... ms, then every 1.6 s
CAP_FIRST_S, CAP_MAX_S = 0.01, 1.6
MAX_LEVEL = 1 + math.ceil(math.log2(CAP_MAX_S / CAP_FIRST_S))
_CAP = None  # (until, threads, hold_s) after a late team call
_LEVEL = 0  # the evidence of load: +1 per late team call, -1 per call of the whole team that nobody waited in


def _hold_s(level: int) -> float:
    return min(CAP_MAX_S, CAP_FIRST_S * 2 ** (level - 1))


def _hold_on(cap: tuple, now: float) -> None:
    """The cap ``cap`` is over, but the load is still there: one level up, as a late call would have been."""
    global _CAP, _LEVEL
    _LEVEL = min(MAX_LEVEL, _LEVEL + 1)
    hold = _hold_s(_LEVEL)
    _CAP = (now + hold, cap[1], hold)
    _sync_native()


def _note_starved(nthreads: int, starved: int, wall_s: float, waited: bool = False) -> None:
    """Learn from a team call of ``nthreads`` that took ``wall_s``: ``starved`` threads claimed almost no chunks,
    ``waited``: the others waited long for a straggler (:func:`_waited`).

    A late call caps the team (the threads that kept up) for ``hold(level)``, each late call one level up; a clean
    call of more threads than any cap in force lifts the cap and steps one level down. So a lone stall costs one
    short cap, and a lucky call while a core stays busy (the scheduler let a late thread in at once) does not start
    the doubling again from its first step.
    """
    global _CAP, _LEVEL
    now, cap = _now(), _CAP
    active = cap is not None and now < cap[0]
    if starved or waited:
        if wall_s < LATE_S:
            return  # a short call: whoever came late cost it little, and tells little
        _LEVEL = min(MAX_LEVEL, _LEVEL + 1)
        hold = _hold_s(_LEVEL)
        keep = max(1, nthreads - max(starved, 1))
        _CAP = (now + hold, min(keep, cap[1]) if active else keep, hold)
    elif not active or nthreads > cap[1]:
        _LEVEL = max(0, _LEVEL - 1)
        _CAP = None
    _sync_native()


def _sync_native() -> None:
    """Open the native callers' gate where they may start the team now, else close it."""
    NATIVE[NATIVE_OPEN] = not (_IN_FORKED_CHILD or _DISABLED or _CAP is not None or _LEVEL)


def settle_native() -> None:
    """Fold what native launches left into this module's state: the end and size of the last one (as our last
    team call where it is the later), and the note of a late one (:func:`_note_starved`, which may cap the team);
    then the gate as that state says."""
    global _LAST_END, _LAST_SIZE
    nat = NATIVE
    end = int(nat[NATIVE_LAST_END_NS])
    if end:
        nat[NATIVE_LAST_END_NS] = 0
        at = _now() - max(0, time.monotonic_ns() - end) * 1e-9  # in _now's time (tests set another clock)
        if at > _LAST_END:
            _LAST_END, _LAST_SIZE = at, max(1, int(nat[NATIVE_LAST_SIZE]))
    if nat[NATIVE_NOTE]:
        nthreads, starved, wall, waited = (int(nat[k]) for k in (NATIVE_NOTE_THREADS, NATIVE_NOTE_STARVED,
                                                                  NATIVE_NOTE_WALL_NS, NATIVE_NOTE_WAITED))
        nat[NATIVE_NOTE] = 0
        _note_starved(nthreads, starved, wall * 1e-9, bool(waited))
    _sync_native()


def new_block(nchunks: int, total: int, operands: tuple = ()) -> np.ndarray:
    """A team block for ``nchunks`` chunks covering ``[0, total)`` with ``operands`` (ints: see
    :meth:`Operands.pack`) after the chunk header.

    >>> b = new_block(2, 10, (7,)); b[:4].tolist(), b.size == HEADER + 2 + TRAILER
    ([0, 2, 10, 7], True)
    """
    if len(operands) > MAX_OPERANDS:
        raise ValueError(f"a team block holds at most {MAX_OPERANDS} operands, got {len(operands)}")
    block = np.zeros(HEADER + nchunks + TRAILER, np.int64)
    block[1], block[2] = nchunks, total
    block[3:3 + len(operands)] = operands
    return block


def run(kernel: "TeamKernel", block, nthreads: int, nchunks: int | None = None, address: int | None = None) -> bool:
    """Run ``kernel`` on ``nthreads`` team threads with ``block`` (a NumPy int64 array the caller keeps alive)
    as its argument, and wait for all. False (nothing ran) where there is no team. ctypes releases the GIL.

    ``nchunks``: the block is a :func:`new_block` of that many chunks, for a :func:`claim_loop` kernel; the threads
    it starved then cap the next calls (:func:`thread_cap`). ``address``: the block's data address where the caller
    knows it (``block.ctypes.data`` costs about 1 us, a tenth of a small decoding call's Python)."""
    global _LAST_END, _LAST_SIZE
    fn = gomp_parallel()
    if fn is None:
        return False
    kaddr = kernel()
    if nchunks is not None:
        block[HEADER + nchunks + THREADS] = nthreads
    start = _now()
    fn(kaddr, block.ctypes.data if address is None else address, nthreads, 0)
    _LAST_END, _LAST_SIZE = _now(), nthreads
    wall = _LAST_END - start
    if nchunks is not None and nthreads > 1 and (wall >= LATE_S or _CAP is not None or _LEVEL):  # else: no news
        trailer = block[HEADER + nchunks:]
        # with fewer chunks, a quiet team's last chunk alone can keep the others waiting that long
        waited = nchunks >= 4 * nthreads and _waited(trailer)
        _note_starved(nthreads, int(trailer[STARVED]), wall, waited)
    return True


def _waited(trailer) -> bool:
    """Whether threads that ran out of chunks waited for a straggler (a late thread, or one taken off its core
    holding a chunk) longer than half the time all of them worked: the team then cost more than it gave."""
    first_in, first_out, last_out = (int(trailer[k]) for k in (FIRST_IN, FIRST_OUT, LAST_OUT))
    if not (first_in <= first_out <= last_out) or first_in == last_out:
        return False  # no clock here
    return 2 * (last_out - first_out) > first_out - first_in


def _fingerprint() -> int:
    """A hash of this file: every team kernel inlines its block layout and :func:`claim_loop`."""
    try:
        with open(__file__, "rb") as f:
            src = f.read()
    except OSError:  # pragma: no cover - no source (a frozen install): the layout's constants
        src = repr((HEADER, TRAILER, DONE, STARVED, THREADS, PROBE)).encode()
    return (int.from_bytes(hashlib.sha256(src).digest()[:8], "little") >> 2) | 1  # positive, never 0


#: what a :func:`claim_loop` kernel answers to a probe: the ``_team`` it was compiled against
FINGERPRINT = _fingerprint()


class _LayoutCache(SourcesCache):
    """numba's cache of a team kernel, keyed on its package's kernel sources (:mod:`qcore._jitcache`) and on the
    block layout too."""

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen), FINGERPRINT


def _probe(compiled) -> int:
    """Call a kernel with a block of no chunks: a :func:`claim_loop` kernel writes its FINGERPRINT, a kernel of
    another kind nothing (it must take an all-zero block as no work). The block is long enough for any header."""
    block = np.zeros(256, np.int64)
    compiled.ctypes(block.ctypes.data)
    return int(block[PROBE])


class TeamKernel:
    """A team kernel's Python function, compiled as a ``cfunc(void(voidptr))`` the first time it is needed (a
    cfunc compiles, or loads from numba's cache, when it is created: never at import, never without a team).

    numba's cache only notices edits to the kernel's own file, not to the block layout and :func:`claim_loop` it
    inlines from here: so the :data:`FINGERPRINT` of this ``_team`` is part of the kernel's cache key (a kernel
    cached against another layout is compiled anew, and cached beside it), and a :func:`claim_loop` kernel is
    probed when it is loaded (one that answers another fingerprint is compiled again). ``sources``: the
    fingerprint of the kernel sources it inlines from elsewhere (:mod:`qcore._jitcache`; default qcore's own).
    ``from_cache`` tells whether the kernel was loaded from numba's cache.

    >>> TeamKernel(lambda data: None)._cfunc is None
    True
    """

    def __init__(self, pyfunc, sources: int | None = None):
        self.pyfunc = pyfunc
        self.sources = _cached.key if sources is None else sources
        self._cfunc = None
        self._lock = threading.Lock()
        self.from_cache = False

    def _build(self):
        try:
            compiled = CFunc(self.pyfunc, ((types.voidptr,), types.void), {}, {"nogil": True})
            compiled._cache = _LayoutCache(self.pyfunc, self.sources)
        except Exception:  # pragma: no cover - another numba's internals: the probe below still guards
            return cfunc(types.void(types.voidptr), nogil=True, cache=True)(self.pyfunc)
        compiled.compile()
        return compiled

    def _compiled(self):
        if self._cfunc is None:
            with self._lock:
                if self._cfunc is None:
                    compiled = self._build()
                    if _probe(compiled) not in (0, FINGERPRINT):
                        compiled._cache.flush()  # forget the stale entry, so that the fresh one is saved in its place
                        compiled = self._build()
                        if _probe(compiled) != FINGERPRINT:  # pragma: no cover - numba did not compile anew
                            raise RuntimeError(f"team kernel {self.pyfunc.__qualname__} still answers another "
                                               f"qcore._team after recompiling it")
                    self.from_cache = getattr(compiled, "_cache_hits", 0) > 0
                    self._cfunc = compiled
        return self._cfunc

    def __call__(self) -> int:
        """The compiled kernel's address."""
        c = self._cfunc
        return (self._compiled() if c is None else c).address

    def ctypes(self):
        """The compiled kernel as a ctypes function of one pointer (a call releases the GIL)."""
        return self._compiled().ctypes


I64, F64, ADDR = "int64", "float64", "address"  # the kinds of an operand


class Operands:
    """The operands of a team kernel: named, typed fields of its block, after the chunk header.

    The Python side packs values with :meth:`pack` (an ``ADDR`` takes an array or an address; the caller keeps the
    array alive until the call returns); the kernel reads them with ``read`` (inlined into the kernel): a named
    tuple whose ``I64`` fields are int64, ``F64`` float64 and ``ADDR`` pointers for ``numba.carray``.

    >>> axpy = Operands("axpy", n=I64, a=F64, x=ADDR)
    >>> axpy.pack(n=3, a=0.5, x=4096)
    (3, 4602678819172646912, 4096)
    """

    def __init__(self, name: str, **fields):
        if len(fields) > MAX_OPERANDS:
            raise ValueError(f"a team block holds at most {MAX_OPERANDS} operands; {name} has {len(fields)}")
        for field, kind in fields.items():
            if kind not in (I64, F64, ADDR):
                raise ValueError(f"operand {name}.{field} is of kind {kind!r}; allowed: I64, F64, ADDR")
            if field.startswith("_") or keyword.iskeyword(field):
                raise ValueError(f"operand {name}.{field}: a field name must be an identifier not starting with _")
        self.name, self.fields = name, dict(fields)
        self.type = collections.namedtuple(name, list(fields))
        self.read = _reader(self)

    def slot(self, field: str) -> int:
        """Where ``field`` is in the block (to set one operand of a block built before)."""
        return 3 + list(self.fields).index(field)

    def pack(self, **values) -> tuple:
        """The fields' values as the ints of the block, in field order."""
        if values.keys() != self.fields.keys():
            missing, unknown = self.fields.keys() - values.keys(), values.keys() - self.fields.keys()
            raise TypeError(f"{self.name} operands: missing {sorted(missing)}, unknown {sorted(unknown)}")
        out = []
        for field, kind in self.fields.items():
            v = values[field]
            if kind == ADDR:
                out.append(v.ctypes.data if isinstance(v, np.ndarray) else int(v))
            elif kind == F64:
                out.append(int(np.float64(v).view(np.int64)))
            else:
                out.append(int(v))
        return tuple(out)

    def __repr__(self) -> str:
        return f"Operands({self.name!r}, {', '.join(f'{f}={k}' for f, k in self.fields.items())})"


@njit(inline="always")
def _f64_at(head, k):
    return head.view(np.float64)[k]


def _reader(spec: Operands):
    # generated like collections.namedtuple: numba needs one function whose field types are known when it compiles
    get = {I64: "head[{}]", F64: "_f64_at(head, {})", ADDR: "as_ptr(head[{}])"}
    values = ", ".join(get[kind].format(3 + k) for k, kind in enumerate(spec.fields.values()))
    src = f"def read(head):\n    return _type({values})\n"
    scope = {"_type": spec.type, "_f64_at": _f64_at, "as_ptr": as_ptr}
    exec(compile(src, f"<qcore._team.Operands {spec.name}>", "exec"), scope)
    return njit(inline="always")(scope["read"])


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
def _clock(typingctx):
    """The CPU's cycle counter (x86-64's TSC: steady, shared by the cores); 0 elsewhere."""
    def codegen(context, builder, sig, args):
        if not _HAS_CLOCK:
            return ir.Constant(ir.IntType(64), 0)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


@intrinsic
def _load_acquire(typingctx, block, index):
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.load_atomic(builder.gep(a.data, [args[1]]), "acquire", 8)
    return types.int64(block, index), codegen


@njit(inline="always")
def _raw(head):
    return head


@njit(inline="always")
def lane_chunk(i, nchunks, team):
    """The chunk that claim ``i`` of a team of ``team`` threads runs in lane order: the chunks cut into ``team``
    contiguous runs (lanes), claim ``i`` the ``i // team``-th chunk of lane ``i % team``. A bijection of
    ``[0, nchunks)`` for any team size; the identity off a team (``team`` < 2).

    While the threads claim in turn, each walks one lane front to back, a stream the prefetchers follow across chunk
    boundaries; a thread that comes late still only takes fewer chunks (the others' claims reach into its lane).

    >>> [lane_chunk(i, 9, 2) for i in range(9)]
    [0, 5, 1, 6, 2, 7, 3, 8, 4]
    """
    if team < 2:
        return i
    base, extra = nchunks // team, nchunks % team
    lane, pos = i % team, i // team
    return lane * base + min(lane, extra) + pos


@njit(inline="always")
def claim_operands(data, read, chunk, a, b, lanes=False):
    """The body of a team kernel: claim chunks of the block at ``data`` until none is left, run
    ``chunk(ops, i, lo, hi, a, b)`` on each (``ops``: ``read(header)``, an :class:`Operands` spec's ``read``;
    ``a``, ``b``: constants of the kernel, such as dtypes), store its result, as int64, at ``HEADER + i`` and count
    it done (see :func:`all_done`). ``lanes``: claims run the chunks in :func:`lane_chunk`'s order on a team (for
    kernels that stream their operands chunk after chunk). A block of no chunks is a probe: the answer is
    :data:`FINGERPRINT`."""
    head = carray(data, HEADER, np.int64)
    nchunks, total = head[1], head[2]
    block = carray(data, HEADER + nchunks + TRAILER, np.int64)
    ops = read(head)
    trailer = HEADER + nchunks
    team = block[trailer + THREADS]  # 0: not on an OpenMP team (Python threads, or the caller alone)
    mine = 0
    while True:
        i = claim(block)
        if i >= nchunks:
            break
        if i == 0:
            block[trailer + FIRST_IN] = _clock()
        j = lane_chunk(i, nchunks, team) if lanes else i
        block[HEADER + j] = np.int64(chunk(ops, j, total * j // nchunks, total * (j + 1) // nchunks, a, b))
        if team == 0:  # off a team the caller learns from this count that every chunk is done (the team: its barrier)
            _count_done(block, trailer + DONE)
        mine += 1
    if nchunks == 0:
        block[PROBE] = FINGERPRINT
        return
    # every thread ends on one claim past the chunks, in the order the threads ran out of them: no atomics needed
    if i == nchunks:
        block[trailer + FIRST_OUT] = _clock()
    elif i == nchunks + team - 1:
        block[trailer + LAST_OUT] = _clock()
    # a thread with under a quarter of its share arrived late: its core was busy, and the team's barrier waited
    if team > 1 and nchunks >= 4 * team and mine * 4 * team < nchunks:
        _count_done(block, trailer + STARVED)


@njit(inline="always")
def claim_loop(data, chunk, a, b):
    """:func:`claim_operands` for a kernel that reads its operands from the int64 header itself:
    ``chunk(head, i, lo, hi, a, b)`` with the operands at ``head[3:16]``."""
    claim_operands(data, _raw, chunk, a, b)


@_cached
@njit(cache=True, nogil=True)
def all_done(block):
    """Whether every chunk of a team block has been run; its results and outputs are then visible to the
    caller (an acquire load of the count that the threads released)."""
    nchunks = block[1]
    return _load_acquire(block, HEADER + nchunks + DONE) == nchunks


_sync_native()  # open unless switched off
