"""The one-row kernel's prefetch distance, measured once on this machine (for :mod:`qtorch.gemv`'s plans).

A decoding step reads every layer's weight once, from memory, and the one-row kernel asks for each tile row's
lines ``d`` bytes ahead (into L2), because the hardware prefetchers stop at every 4 KB page. ``d`` has to cover the
memory's latency at the rate a core streams; past that, a longer distance only costs: the first ``d`` bytes of
every tile a thread claims are read unprefetched, and a small layer's tiles are short (a 2048-row 4-bit tile is
128 KB, a quarter of it unprefetched at 32 KB). Where the balance lies is the machine's. Measured on the 2-core
AVX-512/AMX Xeon, ``bench_decode``'s model (every layer ``blocked``, one lockstep run per line, speed-up over dense):

=================  =======  =======  =======
model              32 KB    8 KB     4 KB
=================  =======  =======  =======
bfloat16 w4a16     2.30x    2.35x    2.38x
bfloat16 w8a16     1.81x    1.93x    1.92x
float32 w4a16      2.85x    2.91x    2.95x
float32 w8a16      2.41x    2.45x    2.47x
=================  =======  =======  =======

So the distance is chosen by measurement (:func:`distance`), per width of the codes (4 or 8 bits), at the first
one-row plan of that width: the kernel over a rotation of copies of a small layer (1024 x 1024, half of
:func:`qtorch.autotune.cold_bytes` in all, so that every call reads its codes from memory, as in a model) at each
of :data:`DISTANCES`, alternating; the shortest distance within :data:`TIE` of the fastest pass wins. Kept like
a dispatch decision (the process and ``$QTORCH_CACHE_DIR``, key ``setting|gemv-prefetch-w<bits>|threads <n>``;
kept for the process only when another process was running). ``QTORCH_AUTOTUNE=0``, or a call while tracing:
:data:`qtorch.gemv.PREFETCH`. No bit of a result depends on the distance. Cost, once per machine and width: about
0.3 s and 128 MB of copies (:func:`qtorch.autotune.rotation_copies`), freed after.

The ``vnni`` layout's one-row kernel races the same distances, each also with a second read of every line of
codes (:func:`vnni_reads`): a line that one 64-byte load reads once never starts the L1 prefetcher, which a
second read of a recent line does (about 0.6 s once per machine). So does the ``vnni8`` layout's one-row
``vpdpbusd`` kernel, at its own fixed distance (:func:`vnni8_touch`).

>>> from qtorch import autotune, gemv
>>> off = autotune.Dispatcher(cache_path=False, env={"QTORCH_AUTOTUNE": "0"})
>>> distance(4, off) == gemv.PREFETCH       # measuring off; by default the first call measures, then it is kept
True
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch

from . import autotune, gemv, vnni, vnni8

__all__ = ["DISTANCES", "TIE", "distance", "measured", "vnni8_touch", "vnni_distance", "vnni_reads"]

#: the distances raced, in bytes (0: no prefetch; where the hardware's own prefetchers suffice)
DISTANCES = (0, 2048, 4096, 8192, 16384, 32768)
#: of the distances within this factor of the fastest pass, the shortest wins: past what covers the memory's
#: latency, a longer one only prefetches more past each tile's end and leaves more of each tile's start unprefetched,
#: which a model's layers, one after another, pay more for than the trial's copies of one layer (AMX Xeon, 8 bits:
#: 4-16 KB within 1% of each other in the trial, 32 KB 1-3% behind, but 4-6% behind in ``bench_decode``)
TIE = 1.02
#: the trial layer: K rows of N columns, groups of G, 64-byte tile rows (one line a row)
_K, _N, _G, _W = 1024, 1024, 128, 64
_LOCK = threading.Lock()


def _key(bits: int) -> autotune.SettingKey:
    return autotune.SettingKey.make(f"gemv-prefetch-w{bits}")


def _vnni_key() -> autotune.SettingKey:
    # (a new name where the key held the distance alone: kept values of the old one are not read)
    return autotune.SettingKey.make("vnni-reads")


def _vnni8_key() -> autotune.SettingKey:
    return autotune.SettingKey.make("vnni8-reads")


def distance(bits: int, dispatcher: autotune.Dispatcher | None = None) -> int:
    """Bytes ahead that the one-row kernel prefetches for codes of ``bits`` (4 or 8) on this machine: measured at
    the first call (see the module docstring), then kept; :data:`qtorch.gemv.PREFETCH` where nothing is measured."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (4, 8):
        raise ValueError(f"the one-row kernel reads 4- or 8-bit codes, got bits={bits!r}")
    return _measured_once(_key(bits), lambda: _trials(bits), gemv.PREFETCH, dispatcher)


def vnni_reads(dispatcher: autotune.Dispatcher | None = None) -> tuple[int, bool]:
    """How the ``vnni`` layout's one-row kernel (:mod:`qtorch.vnni`) reads its codes on this machine: ``(bytes
    ahead that it prefetches, whether it reads each line a second time)`` (:data:`qtorch.vnni.TOUCH`). Measured like
    :func:`distance`, each distance with and without the second reads (its own kernel over a rotation of copies of
    a 1024 x 1024 4-bit layer; of the passes within :data:`TIE` of the fastest, the shortest distance, then no
    second reads; key ``setting|vnni-reads|threads <n>``), then kept; :data:`qtorch.vnni.PREFETCH` and
    :data:`qtorch.vnni.TOUCH` where nothing is measured."""
    return _measured_once(_vnni_key(), _vnni_trials, (vnni.PREFETCH, vnni.TOUCH), dispatcher, parse=_reads_value)


def vnni_distance(dispatcher: autotune.Dispatcher | None = None) -> int:
    """Bytes ahead that the ``vnni`` layout's one-row kernel prefetches on this machine (:func:`vnni_reads`)."""
    return vnni_reads(dispatcher)[0]


def vnni8_touch(dispatcher: autotune.Dispatcher | None = None) -> bool:
    """Whether the ``vnni8`` layout's one-row ``vpdpbusd`` kernel (:mod:`qtorch.vnni8`) reads each line of codes a
    second time on this machine: its calls over a rotation of copies of a 1024 x 1024 8-bit layer, once and twice
    (``"once"`` wins a tie within :data:`TIE`; key ``setting|vnni8-reads|threads <n>``), then kept; False where
    nothing is measured or the kernel does not run here."""
    if not vnni8.dot_eligible(_K):
        return False
    return _measured_once(_vnni8_key(), _vnni8_trials, False, dispatcher, parse=_twice)


def _twice(kept) -> bool | None:
    return {"once": False, "twice": True}.get(kept) if isinstance(kept, str) else None


def _reads_name(dist: int, touch: bool) -> str:
    return f"{dist} touch" if touch else str(dist)


def _reads_value(kept) -> tuple[int, bool] | None:
    """A kept ``"<distance>"`` or ``"<distance> touch"`` as ``(distance, touch)``; None where it is neither."""
    if not isinstance(kept, str):
        return None
    dist, _, rest = kept.partition(" ")
    value = _value(dist)
    if value is None or rest not in ("", "touch"):
        return None
    return value, rest == "touch"


def _measured_once(key, trials, default, dispatcher, parse=None):
    """The kept decision of ``key`` (``parse``d: an int distance by default), measured first where there is none."""
    parse = parse or _value
    d = dispatcher or autotune.default_dispatcher()
    if not d.measuring or torch.compiler.is_compiling():
        return default
    found = parse(d.cached(key))
    if found is None:
        with _LOCK:  # one measurement at a time: two would share the cores and the memory they time
            found = parse(d.cached(key))
            if found is None:
                found = parse(d.choose(key, trials(), tie=TIE))
    return found


def _value(kept) -> int | None:
    """A kept decision as a distance, or None where there is none or it is not one of :data:`DISTANCES` (a file
    written by another build, or edited): then it is measured again."""
    try:
        value = int(kept)
    except (TypeError, ValueError):
        return None
    return value if value in DISTANCES else None


def measured(dispatcher: autotune.Dispatcher | None = None) -> dict:
    """``{bits: distance}`` for the widths whose distance this process knows (measured or read from the file), and
    ``"vnni": distance`` and ``"vnni touch": bool`` where the vnni kernel's reads are known (:func:`vnni_reads`),
    ``"vnni8 touch": bool`` where the vnni8 kernel's are (:func:`vnni8_touch`)."""
    d = dispatcher or autotune.default_dispatcher()
    out = {}
    for bits in (4, 8):
        found = _value(d.cached(_key(bits)))
        if found is not None:
            out[bits] = found
    found = _reads_value(d.cached(_vnni_key()))
    if found is not None:
        out["vnni"], out["vnni touch"] = found
    found = _twice(d.cached(_vnni8_key()))
    if found is not None:
        out["vnni8 touch"] = found
    return out


def _trials(bits: int) -> dict[str, Callable[[], None]]:
    """``{str(distance): a pass}``: each pass runs the one-row kernel once on every copy of the trial layer, in
    turn, with that distance, and returns the output (the last copy's; the copies live as long as the passes)."""
    T = _N // (2 * _W if bits == 4 else _W)
    codes = np.random.default_rng(0).integers(0, 256, size=(T, _K, _W), dtype=np.uint8)
    scale = np.full((_K // _G, _N), 0.01, np.float32)
    zp = np.full((_K // _G, _N), 8, np.uint8)
    nbytes = codes.nbytes + scale.nbytes + zp.nbytes
    count = max(2, autotune.rotation_copies(nbytes))
    copies = [codes] + [codes.copy() for _ in range(count - 1)]
    x = np.random.default_rng(1).standard_normal(_K).astype(np.float32)
    out = np.empty(_N, np.float32)
    xa, oa = x.ctypes.data, out.ctypes.data
    sa, za = scale.ctypes.data, zp.ctypes.data
    passes = {}
    for dist in DISTANCES:
        launchers = [gemv.Launcher(gemv.Plan(c, scale, zp, _G, bits, c.ctypes.data, sa, za, prefetch=dist), 0, 0,
                                   bits == 4) for c in copies]

        def run(launchers=launchers, keep=(copies, scale, zp, x)):
            for launch in launchers:
                launch(xa, oa)
            return out

        passes[str(dist)] = run
    return passes


def _vnni_trials() -> dict[str, Callable[[], None]]:
    """:func:`_trials` for the vnni kernel: 4-bit words of the trial layer's shape, a bfloat16 row; a pass for each
    distance without and with the second reads of each line (named ``"4096"``, ``"4096 touch"``)."""
    T = _N // vnni.NT
    words = np.random.default_rng(0).integers(0, 1 << 32, size=(T, _K // 8, vnni.NT), dtype=np.uint64)
    words = words.astype(np.uint32)
    scale = np.full((T, _K // _G, vnni.NT), 0.01, np.float32)
    zp = np.full((T, _K // _G, vnni.NT), 8, np.uint8)
    count = max(2, autotune.rotation_copies(words.nbytes + scale.nbytes + zp.nbytes))
    copies = [words] + [words.copy() for _ in range(count - 1)]
    x = torch.randn(_K).to(torch.bfloat16)
    out = torch.empty(_N, dtype=torch.bfloat16)
    xa, oa = x.data_ptr(), out.data_ptr()
    passes = {}
    for dist in DISTANCES:
        for touch in (False, True):
            plans = [vnni.Plan(c, scale, zp, _G, 1, 1, prefetch=dist, touch=touch) for c in copies]

            def run(plans=plans, keep=(copies, scale, zp, x)):
                for plan in plans:
                    plan(xa, oa)
                return out
            passes[_reads_name(dist, touch)] = run
    return passes


def _vnni8_trials() -> dict[str, Callable[[], None]]:
    """The vnni8 one-row kernel's passes, ``"once"`` and ``"twice"``: 8-bit codes of the trial layer's shape in
    the kernel's order, a bfloat16 row, every copy called in turn."""
    codes = np.random.default_rng(0).integers(-127, 128, size=(_N, _K), dtype=np.int8)
    w = vnni8.pack(codes)
    scale = np.full(_N, 0.01, np.float32)
    count = max(2, autotune.rotation_copies(w.nbytes))
    copies = [w] + [w.copy() for _ in range(count - 1)]
    colsum = vnni8.colsums(w)  # the same codes in every copy: summed once, not by each plan (3.5 ms apiece)
    x = torch.randn(_K).to(torch.bfloat16)
    out = torch.empty(_N, dtype=torch.bfloat16)
    xa, oa = x.data_ptr(), out.data_ptr()
    passes = {}
    for name, touch in (("once", False), ("twice", True)):
        plans = [vnni8.Plan(c, scale, touch=touch, colsum=colsum) for c in copies]

        def run(plans=plans, keep=(copies, scale, colsum, x)):
            for plan in plans:
                plan(xa, 1, 1, oa, 1, dot=True)
            return out
        passes[name] = run
    return passes
