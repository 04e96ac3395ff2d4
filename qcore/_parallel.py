"""Split one kernel call over threads. A leaf: imports nothing of the package.

The numba kernels release the GIL (``nogil=True``) and take a range ``[lo, hi)`` as their last two
arguments, so plain Python threads run them in parallel: no OpenMP workers spinning on a shared machine,
and kernels that compile several times faster than with ``parallel=True``.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["run_split", "num_threads"]

_POOL = None
_POOL_LOCK = threading.Lock()


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - not Linux


#: upper bound on threads per call (``QCORE_NUM_THREADS`` overrides; default: the usable cores)
MAX_THREADS = max(1, int(os.environ.get("QCORE_NUM_THREADS") or _usable_cores()))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(MAX_THREADS - 1, 1), thread_name_prefix="qcore")
        return _POOL


def num_threads() -> int:
    """Threads for the next call: no more than there are idle cores by the 1-minute load average (like
    OMP_DYNAMIC). On a saturated machine a second thread mostly waits for a core, and the call waits for it."""
    n = MAX_THREADS
    if n > 1:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover - not on every platform
            return n
        n = max(1, min(n, int(MAX_THREADS - busy + 1.5)))  # the load average counts this thread too
    return n


def run_split(kernel, args, total: int, min_part: int) -> list:
    """Results of ``kernel(*args, lo, hi)`` over chunks covering ``[0, total)``, in chunk order.

    Threads claim chunks from a shared counter and the calling thread works too, waiting only for chunks
    another thread has actually claimed: when a pool thread gets no core for a while, the caller just does
    more of the work itself.
    """
    nchunks = min(total // max(min_part, 1), 8 * MAX_THREADS)
    nthreads = num_threads() if nchunks >= 2 else 1
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
            except BaseException as e:  # pragma: no cover - kernels do not raise on checked input
                state["error"] = e
                done.set()
                return
            with lock:
                state["left"] -= 1
                if state["left"] == 0:
                    done.set()

    pool = _pool()
    for _ in range(nthreads - 1):
        pool.submit(work)
    work()
    done.wait()
    if state["error"] is not None:  # pragma: no cover
        raise state["error"]
    return results
