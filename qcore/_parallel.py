"""Split one kernel call over threads. Imports only the ``_team`` leaf of the package.

qcore's kernels are team kernels (a ``cfunc`` reading its operands from an int64 block): :func:`run_chunks`
runs one on an OpenMP team where the process has one (its workers spin between calls, so a short call does not
wait for threads to wake), else on Python threads. :func:`run_split` runs a GIL-free numba kernel that takes a
range ``[lo, hi)`` as its last two arguments on Python threads (qtorch's kernels where torch has no team).
(Not numba's ``parallel=True``: the kernels compile several times faster, and its runtime would be a second
OpenMP team beside torch's.)

>>> run_split(lambda scale, lo, hi: (hi - lo) * scale, (2,), 10, 100)   # too little work: one call
[20]
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _team

__all__ = ["f64_bits", "run_chunks", "run_split", "team_chunks", "threads"]

try:
    CPUS = len(os.sched_getaffinity(0))  # the cores this process may run on (containers, taskset)
except (AttributeError, OSError):  # pragma: no cover - not on every platform
    CPUS = os.cpu_count() or 1
#: most threads one call uses (``QCORE_NUM_THREADS`` or ``NUMBA_NUM_THREADS`` cap it)
NUM_THREADS = max(1, min(CPUS, int(os.environ.get("QCORE_NUM_THREADS") or os.environ.get("NUMBA_NUM_THREADS")
                                   or CPUS)))
#: like OMP_DYNAMIC: use no more threads than there are idle cores right now. On a busy machine an extra
#: thread mostly waits for a core (and the call for it); on an idle one it doubles the memory bandwidth.
DYNAMIC = True
CHUNKS_PER_THREAD = 2  # claimable chunks per thread: balance vs hand-off costs (8 cost 2-3% of a 1.6 ms pack)
TEAM_CHUNKS_PER_THREAD = 8  # on a team a claim is one atomic add: more chunks balance a late or stolen core

_POOL = None
_POOL_LOCK = threading.Lock()
_ACTIVE_WORKERS = 0  # pool threads inside a call right now (they are runnable, but ours)
_ACTIVE_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _POOL, _ACTIVE_WORKERS, _POOL_LOCK, _ACTIVE_LOCK
    # the parent's pool threads do not exist here: a task submitted to its executor would never run
    _POOL, _ACTIVE_WORKERS = None, 0
    _POOL_LOCK, _ACTIVE_LOCK = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(4, CPUS), thread_name_prefix="qcore")
        return _POOL


def _counted(fn) -> None:
    global _ACTIVE_WORKERS
    with _ACTIVE_LOCK:
        _ACTIVE_WORKERS += 1
    try:
        fn()
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE_WORKERS -= 1


def busy_cores() -> float:
    """Cores kept busy by other work, not counting the calling thread or our own pool threads.

    Linux: the runnable tasks in /proc/loadavg at the call (the 1-minute load average lags by a minute and
    misses idle moments); elsewhere the load average.
    """
    running = _team.running_tasks()  # this thread among them
    if running is not None:
        return max(0, running - 1 - _ACTIVE_WORKERS - _team.own_spinners())
    try:
        return os.getloadavg()[0] - 0.5  # this thread is in it too
    except (AttributeError, OSError):  # pragma: no cover - not on every platform
        return 0.0


def threads(team: bool = False) -> int:
    """Threads for the next call: ``NUM_THREADS``, or fewer when other work keeps cores busy (``DYNAMIC``).

    ``team``: for a call on an OpenMP team, which also caps the count at the runtime's own thread count
    (``torch.set_num_threads(1)`` in a DataLoader worker, ``OMP_NUM_THREADS``). On torch's team the load is not
    read: after every torch op its workers spin, runnable, for milliseconds, so they would read as busy cores
    (measured: every qcore call of a ``quantize_model`` ran on one thread), yet they are the very workers the
    call runs on. There qcore does as torch's own ops do: the whole team, unless a recent team call found a
    thread starved by another process (``_team.thread_cap``)."""
    n = NUM_THREADS
    if team:
        n = min(n, _team.team_threads())
        if DYNAMIC:
            n = _team.thread_cap(n)  # fewer while a recent call starved threads (a busy core, the load unseen)
        if _team.on_torch_team():
            return n
    if DYNAMIC and n > 1:
        n = max(1, min(n, int(CPUS - busy_cores())))
    return n


def team_chunks(total: int, min_part: int) -> int:
    """How many chunks :func:`run_chunks` cuts ``[0, total)`` into (for kernels that write per-chunk output)."""
    return max(1, min(total // max(min_part, 1), TEAM_CHUNKS_PER_THREAD * NUM_THREADS))


def f64_bits(value) -> int:
    """A float as the int64 bit pattern of its float64 value: how a team block carries a float operand."""
    return int(np.float64(value).view(np.int64))


def run_chunks(team_kernel, operands: tuple, total: int, min_part: int, keep: tuple = (),
               nchunks: int | None = None) -> np.ndarray:
    """Run a team kernel over chunks covering ``[0, total)``; returns each chunk's result (uint64), in order.

    ``team_kernel`` (a ``_team.TeamKernel``) gets an int64 block ``[0, chunks, total, *operands,
    results...]``: ``operands`` are at most ``_team.HEADER - 3`` ints, array addresses among them; every thread
    that calls it claims chunks from the counter at ``block[0]`` until none is left and writes chunk i's result
    at ``_team.HEADER + i``. ``keep``: the arrays behind those addresses, held until every thread is done (even
    when the caller is interrupted). Chunks hold at least ``min_part`` items; ``nchunks`` (from
    :func:`team_chunks`) fixes their number for a kernel that writes per-chunk output. It runs on an OpenMP team
    where the process has one (``qcore._team``), else on this thread plus pool threads, else (one chunk, or one
    idle core) on this thread alone.
    """
    nchunks = team_chunks(total, min_part) if nchunks is None else max(1, nchunks)
    block = _team.new_block(nchunks, total, operands)  # the trailer's first entry counts the chunks done
    nthreads = min(threads(team=_team.gomp_parallel() is not None), nchunks) if nchunks >= 2 else 1
    if nthreads == 1 or not _team.run(team_kernel, block, nthreads, nchunks):
        call = team_kernel.ctypes()  # ctypes releases the GIL for the call
        if nthreads == 1:
            call(block.ctypes.data)
        else:
            returned = threading.Semaphore(0)

            def work(block=block, keep=keep):  # holds the block and the arrays until it returns
                try:
                    call(block.ctypes.data)
                finally:
                    returned.release()

            for _ in range(nthreads - 1):
                _pool().submit(_counted, work)
            call(block.ctypes.data)
            # every chunk is claimed now: wait only while a pool thread still runs one (a thread that starts late,
            # on a busy machine, finds none left and is not waited for)
            waited = 0
            while not _team.all_done(block):
                if waited == nthreads - 1:  # every thread returned, yet chunks are not counted done
                    raise RuntimeError(f"team kernel {team_kernel.pyfunc.__qualname__} did not count all its chunks: "
                                       "it failed (see the error numba printed above), or it is not built on "
                                       "qcore._team.claim_loop and numba's cache holds it compiled against another "
                                       "block layout (delete qcore/__pycache__/*.nb[ic])")
                returned.acquire()
                waited += 1
    return block[_team.HEADER:_team.HEADER + nchunks].view(np.uint64)


def run_split(kernel, args, total: int, min_part: int) -> list:
    """Results of ``kernel(*args, lo, hi)`` over chunks covering ``[0, total)``, in chunk order.

    Chunks hold at least ``min_part`` items. Threads claim chunks from a shared counter and the calling thread
    works too, waiting only for chunks another thread has actually claimed: on a busy machine, where a pool
    thread may not get a core for milliseconds, the caller just does more of the work itself.
    """
    nchunks = min(total // max(min_part, 1), CHUNKS_PER_THREAD * NUM_THREADS)
    nthreads = threads() if nchunks >= 2 else 1
    if nthreads == 1:
        return [kernel(*args, 0, total)]
    bounds = [total * i // nchunks for i in range(nchunks + 1)]
    results = [None] * nchunks
    claim = itertools.count()  # next() on a count is atomic under the GIL
    state = {"left": nchunks, "error": None}
    lock = threading.Lock()
    done = threading.Event()

    def work():
        while True:
            i = next(claim)
            if i >= nchunks:
                return
            try:
                results[i] = kernel(*args, bounds[i], bounds[i + 1])
            except BaseException as e:
                state["error"] = e
                done.set()
                return
            with lock:
                state["left"] -= 1
                if state["left"] == 0:
                    done.set()

    pool = _pool()
    for _ in range(nthreads - 1):
        pool.submit(_counted, work)
    work()
    done.wait()
    if state["error"] is not None:
        raise state["error"]
    return results


def blas_threads():
    """A context in which BLAS uses only the cores idle right now (:func:`threads`), where threadpoolctl is
    installed: BLAS threads that wait for a core busy with other work spin, and a Cholesky of 1536 columns measured
    15x slower on two threads of a loaded 2-core machine than on one."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an optional speed-up only
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads(), user_api="blas")
