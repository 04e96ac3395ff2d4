"""Run a numba kernel on PyTorch's own OpenMP thread team, through qcore's runtime (:mod:`qcore._team`: one
``GOMP_parallel`` lookup, one fork rule, one switch, ``QCORE_OMP_TEAM``). A leaf: imports torch, numba and qcore's
runtime.

Why: after every parallel op, PyTorch's OpenMP workers spin for milliseconds waiting for the next one. A second
thread pool started in that window (numba's ``parallel=True`` runtime, or Python threads) finds the cores taken by
the spinning workers. Measured on the 2-core development CPU, a 2-thread 4096x4096 int8 GEMV took 1.74 ms right
after a dense bf16 layer against 0.65 ms on idle cores. Handing the same work to torch's team instead
(``GOMP_parallel`` as torch binds it) reuses the spinning workers: 0.95 ms in the same alternation, and nothing
oversubscribes the cores.

A kernel is a ``qcore._team.TeamKernel`` built on ``claim_operands``: its operands are an ``Operands`` spec, and
the team's threads claim its chunks from the block's counter, so a thread that starts late simply takes fewer.
:func:`run` picks the place: torch's team (fewer threads for a while after a call that starved one: another
process held its core); the calling thread when torch runs one thread or in a forked child; qcore's threads
where torch has no OpenMP team (macOS, Windows, another backend).

>>> available() in (True, False)
True
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from numba import carray, njit
from qcore import _parallel, _team
# the kernel modules take these from here
from qcore._team import (ADDR, F64, HEADER, I64, THREADS, TRAILER, Operands, as_ptr, claim,  # noqa: F401
                         claim_operands)

from ._ir import cached as _cached

__all__ = ["ADDR", "F64", "I64", "Operands", "TeamKernel", "as_ptr", "available", "chain_team", "check_operands",
           "claim", "claim_operands", "enter_block", "give_block", "new_block", "on_caller", "run", "take_block",
           "team_call", "team_size"]


@njit(inline="always")
def chain_team(data):  # pragma: no cover - compiled
    """The team size of a chain of linked blocks (one layer each, :class:`qtorch.gemv.Chain` and the like): its
    first block's, where the launch wrote it."""
    head = carray(data, HEADER, np.int64)
    return carray(data, HEADER + head[1] + TRAILER, np.int64)[HEADER + head[1] + THREADS]


@njit(inline="always")
def enter_block(data, team):  # pragma: no cover - compiled
    """Give the block at ``data``, one of a chain, the chain's ``team`` size (every thread writes the same value)
    and return the next block's address: the slot after its trailer, 0 for the last. A team kernel over a chain
    runs each thread's share of one block's chunks, then goes on to the next block's without waiting for the
    others."""
    head = carray(data, HEADER, np.int64)
    nchunks = head[1]
    block = carray(data, HEADER + nchunks + TRAILER + 1, np.int64)
    block[HEADER + nchunks + THREADS] = team
    return block[HEADER + nchunks + TRAILER]


def TeamKernel(pyfunc) -> _team.TeamKernel:
    """A ``qcore._team.TeamKernel`` of a qtorch kernel: cached against qtorch's kernel sources too."""
    return _team.TeamKernel(pyfunc, sources=_cached.key)


_LOCK = threading.Lock()
_GOMP_PARALLEL = None  # torch's GOMP_parallel (qcore._team's), or False once the lookup found none
new_block = _team.new_block


def __getattr__(name):
    if name == "_IN_FORKED_CHILD":  # one fork rule: qcore._team's
        return _team._IN_FORKED_CHILD
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _torch_gomp_parallel():
    """``GOMP_parallel`` as torch itself binds it, or None (torch's ATen backend is not OpenMP, no such symbol, or
    ``QCORE_OMP_TEAM=0``)."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    return _team.torch_team()


def _lookup():
    global _GOMP_PARALLEL
    with _LOCK:
        if _GOMP_PARALLEL is None:
            fn = _torch_gomp_parallel()
            _GOMP_PARALLEL = fn if fn is not None else False
    return _GOMP_PARALLEL


def available() -> bool:
    """True when kernels can run on torch's OpenMP team in this process."""
    return bool(_GOMP_PARALLEL if _GOMP_PARALLEL is not None else _lookup())


def team_size() -> int:
    """Threads of torch's intra-op team (``torch.get_num_threads()``)."""
    return max(1, torch.get_num_threads())


def check_operands(wb, scale, zp, gsize: int, bits: int, out, out_shape: tuple, x=None, x_shape: tuple = ()) -> None:
    """Validate the NumPy operands of a blocked-layout kernel before their addresses reach it: the kernels address
    arrays by shape alone, so a wrong dtype, shape or stride would read or write the wrong memory. Raises a
    ``TypeError`` (dtype) or ``ValueError`` (shape, strides) that names the operand."""
    named = {"x": x, "wb": wb, "scale": scale, "zp": zp, "out": out}
    want = {"x": ("float32",), "wb": ("int8", "uint8"), "scale": ("float32",), "zp": ("uint8",), "out": ("float32",)}
    for name, a in named.items():
        if a is None:
            continue
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
        if a.dtype.name not in want[name]:
            raise TypeError(f"{name} must be {' or '.join(want[name])}, got {a.dtype}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (the kernel addresses it by its shape)")
    if wb.ndim != 3 or bits not in (4, 8):
        raise ValueError(f"wb must be [T, K, W] tiles of 4- or 8-bit codes, got shape {wb.shape} and bits={bits}")
    T, K, W = wb.shape
    n = T * (W * 2 if bits == 4 else W)
    G = scale.shape[0] if scale.ndim == 2 else 0
    if scale.shape != (G, n) or G < 1 or gsize * G != K:
        raise ValueError(f"scale must be [G, {n}] with G * group size = K = {K}, got {scale.shape} and group size "
                         f"{gsize}")
    if zp.shape not in ((0, 0), (G, n)):
        raise ValueError(f"zp must be [{G}, {n}] or [0, 0], got {zp.shape}")
    if x is not None and x.shape != x_shape:
        raise ValueError(f"x must be {list(x_shape)}, got {list(x.shape)}")
    if out.shape != out_shape:
        raise ValueError(f"out must be {list(out_shape)}, got {list(out.shape)}")


#: finished blocks a caller keeps for its next calls (:func:`give_block`)
KEPT_BLOCKS = 4


def take_block(template: np.ndarray, free: list) -> tuple:
    """``(block, its address)`` for one call of a kernel whose blocks all start as ``template``: one a finished
    call gave back to ``free`` (refilled from the template), else a new copy. Each call has its own block, so a
    module may run on several threads at once; reusing them saves a copy and an address lookup a call, which a
    decoding step pays once per layer on caches the previous layer's weights just streamed through."""
    try:
        block, address = free.pop()  # (atomic: two threads never take the same block)
        np.copyto(block, template)
    except IndexError:
        block = template.copy()
        address = block.ctypes.data
    return block, address


def give_block(free: list, block: np.ndarray, address: int) -> None:
    """Return a finished call's block to ``free`` (at most :data:`KEPT_BLOCKS` are kept)."""
    if len(free) < KEPT_BLOCKS:
        free.append((block, address))


def team_call(kernel_address: int, block_address: int, nthreads: int | None = None) -> bool:
    """Run the cfunc at ``kernel_address`` on torch's team with ``block_address`` as its argument; wait for all.

    Returns False (and runs nothing) when there is no such team. ``nthreads`` defaults to torch's thread count,
    which makes libgomp reuse the team torch's own ops use. ctypes releases the GIL for the call.
    """
    fn = _GOMP_PARALLEL if _GOMP_PARALLEL is not None else _lookup()
    if not fn or _team._IN_FORKED_CHILD:
        return False
    fn(kernel_address, block_address, team_size() if nthreads is None else nthreads, 0)
    return True


def on_caller(team, block: np.ndarray, lo: int, hi: int) -> None:
    """The ranged ``kernel`` for :func:`run` of a claiming team kernel off a team (one thread, a forked child, no
    OpenMP; or each of qcore's threads): ``team`` (a :class:`TeamKernel`) on the calling thread claims chunks of
    ``block`` until none is left, whatever ``lo, hi``; pass ``args=(team, block)``."""
    team.ctypes()(block.ctypes.data)


def run(units: int, team_kernel, block: np.ndarray, kernel, args: tuple, total: int, min_part: int,
        nchunks: int | None = None, address: int | None = None) -> None:
    """Run a ranged kernel over ``[0, total)`` where it belongs.

    On torch's team when there is one with 2+ threads and 2+ work units (``team_kernel``: a :class:`TeamKernel`;
    ``block`` is its argument block, a ``new_block`` of ``nchunks`` chunks for a ``claim_operands`` kernel). On the
    calling thread when torch's team has one thread (``torch.set_num_threads(1)``: DataLoader workers, one process
    per core), when a recent call starved a team thread (another process holds its core), and in a forked child.
    On qcore's threads only where torch has no GNU OpenMP team. ``address``: the block's data address, where the
    caller knows it.
    """
    if _team._IN_FORKED_CHILD:
        kernel(*args, 0, total)
        return
    # available(), team_size() and thread_cap()'s quick answer inline: a decoding step makes one such call per layer
    if _GOMP_PARALLEL if _GOMP_PARALLEL is not None else _lookup():
        n = max(1, torch.get_num_threads())
        if nchunks is not None and _parallel.DYNAMIC and _team._CAP is not None:
            n = _team.thread_cap(n)
        if units < 2 or n < 2:
            kernel(*args, 0, total)
        elif nchunks is None:
            team_call(team_kernel(), block.ctypes.data)  # the caller holds every array in the block until here
        elif not _team.run(team_kernel, block, n, nchunks, address):
            kernel(*args, 0, total)
        return
    _parallel.run_split(kernel, args, total, min_part)
