"""One native call per one-row launch: a decoding layer's team start without the Python in between. A leaf.

A one-row call of a ``blocked`` layer (:class:`qtorch.gemv.Launcher`, and :class:`qtorch.gemv.Chain` for sibling
layers) refills its team block from a template, writes the row's and the output's addresses into it, starts
torch's OpenMP team on it (``GOMP_parallel``) and reads back whether a thread starved. In Python that is a dozen
calls and attribute lookups around the one that does the work, and a decoding step makes one such launch per
layer, each on caches the previous layer's weights just streamed through. :class:`Native` does it all in one
``cfunc`` called through ctypes (which releases the GIL, as the team call did): the template copied, the slots
written, the team started through ``GOMP_parallel``'s address, the starved count returned. Measured on the 2-core
Zen 3, 100 launches of one-row bfloat16 8-bit layers in a loop (medians, interleaved): 576x576 18.1 -> 15.4 us a
launch, 1536x1536 123.0 -> 113.9; inside SmolLM2's decoding, where each launch meets cold caches, 4-9% of a step
(``benchmarks/bench_launch.py``).

It serves only the plain case: torch's team available, two or more threads and work units, no thread cap in
force (:mod:`qcore._team`'s cap after a starved call: that bookkeeping stays in Python), not in a forked child,
and no other thread inside the same launch (each :class:`Native` holds one block, taken by an atomic flag). Any
other call returns ``-1`` or is not made, and the caller takes the Python path, which handles them all; the
numbers are the same either way (the same kernel on the same block layout). :meth:`Native.run` makes the call
where it may and then does what :func:`qcore._team.run` does after its team call.

>>> import numpy as np
>>> from qtorch import gemv
>>> wb, scale = np.ones((2, 128, 64), np.int8), np.full((1, 128), 0.5, np.float32)
>>> zp, x, out = np.zeros((0, 0), np.uint8), np.ones(128, np.float32), np.zeros(128, np.float32)
>>> p = gemv.Plan(wb, scale, zp, 128, 8, wb.ctypes.data, scale.ctypes.data, zp.ctypes.data)
>>> la = gemv.Launcher(p, 0, 0, False)
>>> native = Native(p.kernel(), [(la.template, 0)], (gemv._X, gemv._OUT, gemv._SCRATCH))
>>> native.available() in (True, False)
True
>>> if native.available(): native(x.ctypes.data, out.ctypes.data, 0, 0, 2) >= 0
... else: True
True
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from llvmlite import ir
from numba import carray, types
from numba.extending import intrinsic
from qcore import _team

__all__ = ["FIRST_BLOCK", "MAX_LAYERS", "Native", "start"]

#: the most layers one native launch chains (sibling layers come in twos and threes)
MAX_LAYERS = 3
_I32, _I64, _I8P = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()

# the state a Native call reads (int64): a busy flag, the addresses of GOMP_parallel and of the team kernel, the
# layer count, the first block's threads and starved slots, the scratch address; then per layer _PER entries
_BUSY, _GOMP, _KERNEL, _LAYERS, _THREADS, _STARVED, _SCRATCH_BASE, _HEAD = range(8)
# per layer: its block, its template, their length, the x / out / scratch slots (-1: none), its scratch offset
_BLOCK, _TEMPLATE, _LEN, _XS, _OUTS, _SCRS, _SCR_OFF, _PER = range(8)
#: the state's slot of the first layer's block address (what a native caller reads the trailer through)
FIRST_BLOCK = _HEAD + _BLOCK


@intrinsic
def _at(typingctx, address):
    """The int64 pointer at ``address``."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], _I64.as_pointer())
    return types.CPointer(types.int64)(types.int64), codegen


@intrinsic
def _take(typingctx, ptr):
    """0 -> 1 at ``ptr`` atomically; True where this call made it (the launch is this thread's until _give)."""
    def codegen(context, builder, sig, args):
        r = builder.cmpxchg(args[0], ir.Constant(_I64, 0), ir.Constant(_I64, 1), "acq_rel", "monotonic")
        return builder.extract_value(r, 1)
    return types.boolean(types.CPointer(types.int64)), codegen


@intrinsic
def _give(typingctx, ptr):
    """0 at ``ptr``, a release store (what the launch wrote is visible to the next thread that takes it)."""
    def codegen(context, builder, sig, args):
        builder.store_atomic(ir.Constant(_I64, 0), args[0], "release", 8)
        return context.get_dummy_value()
    return types.none(types.CPointer(types.int64)), codegen


@intrinsic
def _gomp_parallel(typingctx, fn, kernel, data, nthreads):
    """``GOMP_parallel(kernel, data, nthreads, 0)`` through its address ``fn``: the team runs ``kernel(data)`` and
    the call returns when every thread is done."""
    def codegen(context, builder, sig, args):
        f = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), [_I8P, _I8P, _I32, _I32]).as_pointer())
        builder.call(f, [builder.inttoptr(args[1], _I8P), builder.inttoptr(args[2], _I8P),
                         builder.trunc(args[3], _I32), ir.Constant(_I32, 0)])
        return context.get_dummy_value()
    return types.none(types.int64, types.int64, types.int64, types.int64), codegen


def _launch(state_address, xa, o0, o1, o2, nthreads):  # pragma: no cover - compiled
    """Refill every layer's block from its template, write ``x`` (``xa``), layer ``i``'s output (``o<i>``) and the
    scratch, link the blocks, start the team on the first; the first block's starved count, or -1 where another
    thread holds this launch."""
    s = carray(_at(state_address), _HEAD)
    if not _take(_at(state_address)):
        return -1
    layers = s[_LAYERS]
    per = carray(_at(state_address + 8 * _HEAD), layers * _PER)
    for i in range(layers):
        e = i * _PER
        n = per[e + _LEN]
        b = carray(_at(per[e + _BLOCK]), n)
        t = carray(_at(per[e + _TEMPLATE]), n)
        for k in range(n):
            b[k] = t[k]
        b[per[e + _XS]] = xa
        b[per[e + _OUTS]] = o0 if i == 0 else o1 if i == 1 else o2
        if per[e + _SCRS] >= 0:
            b[per[e + _SCRS]] = s[_SCRATCH_BASE] + per[e + _SCR_OFF]
        b[n - 1] = per[e + _PER + _BLOCK] if i + 1 < layers else 0  # the chain's link: the next block, or none
    first = carray(_at(per[_BLOCK]), per[_LEN])
    first[s[_THREADS]] = nthreads
    _gomp_parallel(s[_GOMP], s[_KERNEL], per[_BLOCK], nthreads)
    starved = first[s[_STARVED]]
    _give(_at(state_address))
    return starved


_FN = []  # the compiled launch, as a ctypes function (made at the first Native)


def _function():
    if not _FN:
        from qcore._jitcache import keyed_cfunc

        from ._ir import cached

        i64 = types.int64
        compiled = keyed_cfunc(_launch, i64(i64, i64, i64, i64, i64, i64), cached.key, nogil=True)
        proto = ctypes.CFUNCTYPE(*[ctypes.c_int64] * 7)
        _FN.append((compiled, proto(compiled.address)))
    return _FN[0][1]


def _function_address() -> int:
    """The compiled launch's address (what :mod:`qtorch.native_ops` calls)."""
    _function()
    return _FN[0][0].address


def _gomp_address() -> int:
    fn = _team.gomp_parallel()
    return 0 if fn is None else ctypes.cast(fn, ctypes.c_void_p).value or 0


class Native:
    """The launch of one team kernel over the blocks of one or more layers, as one native call.

    ``kernel_address``: the team kernel (a ``TeamKernel``'s address); ``layers``: per layer ``(template, scratch)``:
    its block template (int64, laid out as :class:`qtorch.gemv.Plan`'s block: the operands, the chunks, the trailer,
    then the link slot) and the float32 sums it needs (its ``N`` where its output is not float32, else 0);
    ``slots``: where in a block the row's, the output's and the sums' addresses go.
    ``native(xa, o0, o1, o2, nthreads)``: see :func:`_launch` (at most :data:`MAX_LAYERS` layers; ``o1``, ``o2``
    unread where there are fewer); the caller keeps ``x`` and the outputs alive during the call."""

    __slots__ = ("state", "address", "templates", "blocks", "scratch", "nchunks", "fn", "__weakref__")

    def __init__(self, kernel_address: int, layers, slots: tuple):
        layers = list(layers)
        if not 1 <= len(layers) <= MAX_LAYERS:
            raise ValueError(f"a native launch takes 1 to {MAX_LAYERS} layers, got {len(layers)}")
        self.templates = [t for t, _ in layers]  # read by address at every launch: kept alive here
        self.blocks = [np.array(t, dtype=np.int64, copy=True) for t, _ in layers]
        sums = [int(n) for _, n in layers]
        self.scratch = np.empty(max(1, sum(sums)), np.float32) if any(sums) else None
        self.nchunks = int(self.blocks[0][1])
        self.state = np.zeros(_HEAD + _PER * len(layers), np.int64)
        s = self.state
        s[_GOMP], s[_KERNEL], s[_LAYERS] = _gomp_address(), kernel_address, len(layers)
        s[_THREADS] = _team.HEADER + self.nchunks + _team.THREADS
        s[_STARVED] = _team.HEADER + self.nchunks + _team.STARVED
        s[_SCRATCH_BASE] = 0 if self.scratch is None else self.scratch.ctypes.data
        off = 0
        for i, ((template, _), block, n) in enumerate(zip(layers, self.blocks, sums)):
            e = _HEAD + i * _PER
            s[e + _BLOCK], s[e + _TEMPLATE], s[e + _LEN] = block.ctypes.data, template.ctypes.data, block.size
            s[e + _XS], s[e + _OUTS] = slots[0], slots[1]
            s[e + _SCRS], s[e + _SCR_OFF] = (slots[2], off) if n else (-1, 0)
            off += 4 * n
        self.address = s.ctypes.data
        self.fn = _function() if s[_GOMP] else None

    def available(self) -> bool:
        """Whether this process has a team to start (``GOMP_parallel`` found)."""
        return self.fn is not None

    def __call__(self, xa: int, o0: int, o1: int, o2: int, nthreads: int) -> int:
        return self.fn(self.address, xa, o0, o1, o2, nthreads)

    def run(self, xa: int, o0: int, o1: int, o2: int) -> bool:
        """The launch on torch's threads as one native call, with :func:`qcore._team.run`'s bookkeeping after it;
        False (nothing ran) where it must go the Python way: :func:`start` says no, one thread, or another thread
        holds this launch."""
        begin = start()
        n = torch.get_num_threads()
        if begin is None or n < 2:
            return False
        starved = self.fn(self.address, xa, o0, o1, o2, n)
        if starved < 0:
            return False
        end = _team._now()
        _team._LAST_END, _team._LAST_SIZE = end, n
        if end - begin >= _team.LATE_S:  # (no cap was in force, or the launch would not have been native)
            waited = self.nchunks >= 4 * n and _team._waited(self.trailer())
            _team._note_starved(n, int(starved), end - begin, waited)
        return True

    def trailer(self) -> np.ndarray:
        """The first block's trailer as the last call left it."""
        return self.blocks[0][_team.HEADER + self.nchunks:]


def start() -> float | None:
    """The clock (``qcore._team``'s) where a launch may go natively now, else None: in a forked child, or while a
    thread cap is in force or being lifted (then :func:`qcore._team.run`'s bookkeeping sizes the team)."""
    if _team.NATIVE[_team.NATIVE_NOTE]:  # a native op's launch was late: learn from it first
        _team.settle_native()
    if _team._IN_FORKED_CHILD or _team._CAP is not None or _team._LEVEL:
        return None
    return _team._now()
