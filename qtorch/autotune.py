"""Pick a forward path by timing the eligible ones on this machine, once per layer shape, dtype and row bucket.

No table written on one CPU is right on another (an AVX2 CPU and an AMX one disagree at every row count), so the
choice is measured where the model runs. A :class:`Dispatcher` times the candidates it is given at first use
(one warm-up call each, then alternating rounds; the fastest call wins), keeps the decision for the process and in a
small JSON file shared by every process on the machine:

* file: ``$QTORCH_CACHE_DIR/dispatch-<fingerprint>.json`` (default ``~/.cache/qtorch``); the fingerprint hashes
  the CPU model and flags, the torch, qtorch and Python versions and the layouts and paths offered, so a file
  never serves another machine or another build. A corrupt or foreign file is ignored and rewritten. Writes hold a lock file, merge with what is
  on disk and replace the file atomically (temporary file + rename): concurrent processes lose no decision and
  never leave a half-written file.
* a decision measured while another process had a runnable task (``/proc/loadavg``, before or after the timing)
  is kept for this process only: a path timed beside a busy neighbour is the one that suffers least from
  waiting for a core, not the fastest, and a later process on a quieter machine measures again.
* so is a decision in which a candidate raised (it is left out, with a ``RuntimeWarning`` naming it and its
  error): a failure that a later process does not have must not keep its slower rival on disk for good.
* ``QTORCH_PATH=<name>`` forces that path wherever it is among the candidates (elsewhere the normal choice).
* ``QTORCH_AUTOTUNE=0`` turns measuring off: the first candidate (the caller's default order) is used.
* Under ``torch.compile`` tracing nothing is measured: the cached decision, else the default, is used.

The same dispatcher picks a weight's *layout* (:meth:`Dispatcher.choose_layout`, keyed by :class:`LayoutKey`:
shape, scheme, compute dtype, threads): each candidate layout is timed at the row counts of ``LAYOUT_ROWS`` (1, 16
and 128), each at its fastest path, and the layout with the least time for a request (:data:`REQUEST_CALLS`: a
512-token prompt in 128-row calls, one 16-row call and 128 one-row decoding steps) wins; within 10% of it, the one
never far behind the fastest at any row count (:data:`LAYOUT_TIE`). ``QTORCH_LAYOUT=<name>`` forces a layout where it is eligible (read here, applied by
:func:`qtorch.layouts.choose`); ``QTORCH_AUTOTUNE=0`` keeps the static order. Layout decisions live in the same
file, under keys beginning ``layout|``; so do a kernel's machine-wide settings (:class:`SettingKey`, ``setting|``:
the one-row kernel's prefetch distance, :mod:`qtorch.prefetch`).

Bounded: a decision costs one warm-up call per candidate plus rounds of timed calls until ``budget_s`` (20 ms by
default) is spent, ``max_rounds`` are done, or one candidate is clearly best (the others are dropped as soon as
their fastest of :data:`DROP_AFTER` or more timed calls is ``drop_ratio`` times slower than the leader's median).
A layout decision costs the conversion of a throwaway copy per candidate layout, then, per row count in
``LAYOUT_ROWS``, one warm-up call per path and timed rounds within ``budget_s``, at least :data:`LAYOUT_ROUNDS`
within :data:`LAYOUT_SPEND` budgets; no layout is dropped, only a path much slower than another of its layout.

>>> import time
>>> d = Dispatcher(cache_path=False, env={})
>>> key = DispatchKey.make(4096, 4096, "w8-sym-channel", "bfloat16", rows=128)
>>> key.bucket
'65-256'
>>> d.choose(key, {"slow": lambda: time.sleep(0.002), "fast": lambda: None})
'fast'
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

__all__ = ["ROW_BUCKETS", "LAYOUT_ROWS", "REQUEST_CALLS", "COLD_ROWS", "ROTATION_COPIES", "cache_dir", "cold_bytes",
           "evict_caches", "request_cost",
           "last_level_cache", "rotation_copies", "LAYOUT_TIE", "DROP_AFTER", "SIBLING_DROP", "DispatchKey",
           "LayoutKey", "SettingKey",
           "Dispatcher", "row_bucket", "bucket_index", "cpu_info", "fingerprint", "default_cache_path",
           "default_dispatcher"]

#: upper bounds of the row buckets; more rows than the last bound form one more bucket
ROW_BUCKETS = (1, 4, 16, 64, 256)
#: row counts a layout decision times: one row (decoding: reads the weight once, memory-bound), 16 rows (a short
#: turn, or 16 sequences decoding together: between the two regimes) and 128 rows (a prompt: compute-bound, the
#: 65-256 bucket); the path dispatcher still picks the best path of the held layout per bucket.
LAYOUT_ROWS = (1, 16, 128)
#: row counts whose layout trials read the weight from memory at every timed call: a decoding step reads each
#: layer's weight from memory (the model's other layers have evicted it), and timed back to back a small weight
#: stays in cache, which favoured a kernel that is fast on cached weights (a 2048x2048 4-bit layer, bf16: blocked
#: 1.5x int4pack's one-row time back to back, 1.6 ms per token more in a model than that predicted). The eager
#: trials rotate over copies of the weight (:data:`ROTATION_COPIES`), as a model's layers follow one another;
#: ``choose_layout`` evicts the caches before each such call for candidates that cannot rotate (compiled probes).
#: Eviction misled: SmolLM2's 1536x576 8-bit bf16 layer at one row (best calls, AMX Xeon) took 67 us on ``blocked``
#: against 53 on ``int8pack`` after a 32 MB write, 269 against 190 after a 256 MB one, while copies of it called in
#: turn, as in the model, took 49-52 against 66-79 (and a model on ``blocked`` decoded 9% faster, its 41-token
#: prompt 1.6x faster)
COLD_ROWS = (1,)
#: copies of the weight a layout trial rotates over at :data:`COLD_ROWS` at most (together half of
#: :func:`cold_bytes`; the trials of two layouts alternate, so each copy is read again after the whole of that
#: streamed): a 110 KB layer would need over a thousand, and 32 MB of copies already gave the model's order
ROTATION_COPIES = 512
#: calls per row count in the request a layout decision prices: a prompt of 512 tokens (four 128-row calls),
#: then 128 generated tokens (one-row calls). The worst ratio over the two row counts, the rule before, held
#: prompt and decoding equal: AMX made the blocked layout's prompt 3x faster than PyTorch's int4pack kernel on
#: SmolLM2-135M's 576x1536 layers, and that rule then gave them the blocked layout, whose one-row call takes 2.4x
#: int4pack's (0.113 against 0.047 ms, caches evicted): w4a16 decoding fell from 2.03x to 1.43x of dense. Priced as
#: a request they keep int4pack, and 4096x4096 4-bit layers keep blocked (0.63 against 0.49 ms at one row, 4.5
#: against 29.9 ms at 128 rows). A 128-token prompt moved the 4096-wide ones to int4pack too (0.15x of dense at 128
#: rows). One 16-row call stands for the short turns and small batches between.
REQUEST_CALLS = {1: 128, 16: 1, 128: 4}


def request_cost(ms: Mapping, name: str, rows: tuple) -> float | None:
    """A request's cost in ms of one layer in layout ``name``, from a layout decision's timings ``ms`` (keys
    ``"<name>@<rows>"``) at every count of ``rows`` weighted by :data:`REQUEST_CALLS`; None where one is missing.

    >>> request_cost({"blocked@1": 0.1, "blocked@128": 2.0}, "blocked", (1, 128))
    20.8
    """
    times = [ms.get(f"{name}@{r}") for r in rows]
    if not all(isinstance(t, (int, float)) for t in times):
        return None
    return sum(REQUEST_CALLS.get(r, 1) * t for r, t in zip(rows, times))
#: layouts whose request cost is within this factor of the lowest count as tied. Among them the one whose worst row
#: count is closest to the best layout at that count wins (its *regret*; ties of that, within the same factor, go to the
#: cheaper request, equal ones to the static order). One-row calls outweigh the rest of a request, and their cold
#: timings move by 5-10% between runs on a shared machine, so a narrow tie flipped bfloat16 4096x4096 8-bit layers
#: between int8pack and blocked from run to run, on the Zen 4 and on the AMX Xeon alike: within 3% of each other at one
#: row, int8pack 1.3-1.5x slower at 16 rows and 1.2x at 128 (Zen 4), 2.7x and 2x (Xeon, torch 2.11)
LAYOUT_TIE = 1.10
#: timed calls a candidate has made before a race may drop it: one call can be a hiccup (a preemption, a page
#: fault), and a path dropped on it is lost for good. The AMX Xeon beside another job, MiniLM's 384x1536 layer at 104
#: rows: amx's one timed call took 5.6 ms (0.5 ms settled), the leader's 1.5, and the layer ran 3x slower. Two, not
#: more: beside other work a path that waits on a busy core (PyTorch's own ops: 6-20 ms a call there, 0.2 quiet)
#: would otherwise spend the race's budget, and the others would get fewer rounds
DROP_AFTER = 2
#: timed rounds a layout race makes at each row count however slow its calls (a layout decision is kept for good,
#: and the fastest of one call per path decided it before), within :data:`LAYOUT_SPEND` budgets
LAYOUT_ROUNDS = 3
LAYOUT_SPEND = 40
#: how much slower than the fastest path of its own layout a path may be, once it has made :data:`DROP_AFTER`
#: timed calls, and still be timed in a layout race (it cannot set the layout's time; ``drop_ratio`` applies
#: before). A slow sibling kept in the rounds slows the calls timed after it: the blocked layout's AMX one-row path,
#: 2.7x its own one-row kernel on a 2048x2048 4-bit float32 layer (AMX Xeon), stayed in every round under the
#: ratio of 3, and the call after it in each round, vnni's, read 0.153-0.200 ms against 0.121-0.152 without it,
#: and lost a race it wins in a model (decoding 12.86 against 13.49 ms a token, lockstep)
SIBLING_DROP = 2.0
FILE_FORMAT = "qtorch-dispatch"
FILE_VERSION = 1


def row_bucket(rows: int) -> str:
    """The bucket label of a call with ``rows`` rows: ``1``, ``2-4``, ``5-16``, ``17-64``, ``65-256``, ``>256``.

    >>> [row_bucket(r) for r in (1, 3, 16, 17, 128, 4096)]
    ['1', '2-4', '5-16', '17-64', '65-256', '>256']
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be an int >= 1, got {rows!r}")
    lo = 1
    for hi in ROW_BUCKETS:
        if rows <= hi:
            return str(hi) if lo == hi else f"{lo}-{hi}"
        lo = hi + 1
    return f">{ROW_BUCKETS[-1]}"


def bucket_index(rows: int) -> int:
    """Position of ``rows``'s bucket in ``ROW_BUCKETS`` (``len(ROW_BUCKETS)`` past the last bound); unchecked and
    cheap, for the per-call lookup of a layer (comparisons only, so it also traces under ``torch.compile``).

    >>> [bucket_index(r) for r in (1, 3, 16, 17, 128, 4096)]
    [0, 1, 2, 3, 4, 5]
    """
    for i, hi in enumerate(ROW_BUCKETS):
        if rows <= hi:
            return i
    return len(ROW_BUCKETS)


@dataclasses.dataclass(frozen=True)
class DispatchKey:
    """What a decision depends on: layer shape, scheme label, activation dtype, row bucket and torch's threads."""

    out_features: int
    in_features: int
    scheme: str
    dtype: str
    bucket: str
    threads: int

    @classmethod
    def make(cls, out_features: int, in_features: int, scheme: str, dtype, rows: int,
             threads: int | None = None) -> "DispatchKey":
        """Key of a call: ``dtype`` a ``torch.dtype`` or its name, ``rows`` the call's rows (bucketed here)."""
        for name, v in (("out_features", out_features), ("in_features", in_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(scheme, str) or not scheme or "|" in scheme:
            raise ValueError(f"scheme must be a non-empty label without '|', got {scheme!r}")
        dname = str(dtype).removeprefix("torch.")
        threads = torch.get_num_threads() if threads is None else threads
        return cls(out_features, in_features, scheme, dname, row_bucket(rows), int(threads))

    def __str__(self) -> str:
        return (f"{self.out_features}x{self.in_features}|{self.scheme}|{self.dtype}|rows {self.bucket}|"
                f"threads {self.threads}")


@dataclasses.dataclass(frozen=True)
class LayoutKey:
    """What a layout decision depends on: layer shape, scheme label, compute dtype and torch's threads.

    >>> str(LayoutKey.make(4096, 4096, "w8s-channel0-g4096", "bfloat16", threads=2))
    'layout|4096x4096|w8s-channel0-g4096|bfloat16|threads 2'
    """

    out_features: int
    in_features: int
    scheme: str
    dtype: str
    threads: int

    @classmethod
    def make(cls, out_features: int, in_features: int, scheme: str, dtype, threads: int | None = None) -> "LayoutKey":
        d = DispatchKey.make(out_features, in_features, scheme, dtype, 1, threads)  # the same checks
        return cls(d.out_features, d.in_features, d.scheme, d.dtype, d.threads)

    def __str__(self) -> str:  # the prefix keeps these apart from the path decisions in the same file
        return f"layout|{self.out_features}x{self.in_features}|{self.scheme}|{self.dtype}|threads {self.threads}"


@dataclasses.dataclass(frozen=True)
class SettingKey:
    """What a kernel setting measured once per machine depends on (not a layer's shape): its name and torch's
    threads. Decided by :meth:`Dispatcher.choose` like a path, its candidates named by their values.

    >>> str(SettingKey.make("gemv-prefetch-w4", threads=2))
    'setting|gemv-prefetch-w4|threads 2'
    """

    name: str
    threads: int

    @classmethod
    def make(cls, name: str, threads: int | None = None) -> "SettingKey":
        if not isinstance(name, str) or not name or "|" in name:
            raise ValueError(f"a setting's name must be a non-empty label without '|', got {name!r}")
        return cls(name, int(torch.get_num_threads() if threads is None else threads))

    def __str__(self) -> str:  # the prefix keeps these apart from the path and layout decisions in the same file
        return f"setting|{self.name}|threads {self.threads}"


# ------------------------------------------------------------------------------------------------ fingerprint

def cpu_info() -> tuple[str, str]:
    """(CPU model name, space-separated ISA flags) of this machine; Linux reads ``/proc/cpuinfo``, elsewhere the
    platform's processor name and torch's CPU capability stand in for the flags."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and not model:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    flags = flags or f"capability={torch.backends.cpu.get_cpu_capability()}"
    return model, flags


def _qtorch_version() -> str:
    from . import __version__  # a late import: qtorch/__init__ may import this module

    return __version__


def _paths_offered() -> list:
    """Every layout's CPU paths, sorted: part of the fingerprint, so that a build offering another path or layout
    (a kernel added between two commits of the same version) never serves decisions that did not race it."""
    from . import layouts  # late: layouts import this module's users

    names = set()
    for lay in layouts.registered():
        names.add(f"layout:{lay.name}")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for rows in (1, 2, 300):
                for bits in (8, 4):
                    names.update(f"{lay.name}:{p}" for p in lay.paths("cpu", dtype, rows, bits))
    return sorted(names)


def fingerprint() -> dict:
    """What a cache file is valid for: CPU model and flags, machine, torch / qtorch / Python versions, and the
    layouts and paths this build offers."""
    model, flags = cpu_info()
    return {"cpu": model, "flags": flags, "machine": platform.machine(), "torch": torch.__version__,
            "qtorch": _qtorch_version(), "python": platform.python_version(), "paths": _paths_offered(),
            "layout_rule": {str(r): n for r, n in sorted(REQUEST_CALLS.items())}, "layout_rows": list(LAYOUT_ROWS),
            "layout_tie": LAYOUT_TIE}


def _fingerprint_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The folder of qtorch's files kept per machine: ``$QTORCH_CACHE_DIR``, by default ``~/.cache/qtorch``."""
    env = os.environ if env is None else env
    return Path(env.get("QTORCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "qtorch"))


def default_cache_path(env: Mapping[str, str] | None = None) -> Path:
    """``$QTORCH_CACHE_DIR/dispatch-<fingerprint>.json``, by default under ``~/.cache/qtorch``."""
    return cache_dir(env) / f"dispatch-{_fingerprint_id(fingerprint())}.json"


# ------------------------------------------------------------------------------------------------ the file

def _read_decisions(path: Path, fp: dict) -> dict:
    """Decisions in ``path``, or {} when it is missing, corrupt, foreign or written for another fingerprint."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if (not isinstance(data, dict) or data.get("format") != FILE_FORMAT or data.get("version") != FILE_VERSION
            or data.get("fingerprint") != fp or not isinstance(data.get("decisions"), dict)):
        return {}
    return {k: v for k, v in data["decisions"].items()
            if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("path"), str)}


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path.lock`` between processes (POSIX ``flock``; elsewhere none: the rename alone
    keeps the file whole, and a racing writer may drop the other's newest decision, which is then re-measured)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(str(path) + ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_decisions(path: Path, fp: dict, new: dict) -> dict:
    """Merge ``new`` into the decisions on disk and replace the file atomically; returns the merged decisions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path):
        merged = _read_decisions(path, fp)
        merged.update(new)
        data = {"format": FILE_FORMAT, "version": FILE_VERSION, "fingerprint": fp, "decisions": merged}
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return merged


# ------------------------------------------------------------------------------------------------ the dispatcher

class Dispatcher:
    """Measured choice among candidate forward paths, cached per :class:`DispatchKey` in the process and on disk.

    ``cache_path``: a file path, ``None`` for :func:`default_cache_path`, ``False`` for no file. ``timer`` (seconds,
    monotonic) and ``env`` (``QTORCH_PATH``, ``QTORCH_AUTOTUNE``, ``QTORCH_CACHE_DIR``; read once, here) can be
    injected. ``budget_s`` bounds the timed rounds of one decision, ``min_rounds`` / ``max_rounds`` their count.
    ``QTORCH_LAYOUT`` (``forced_layout``) and the deprecated ``QTORCH_TORCH_PACK`` (``torch_pack``: True / False /
    None) are read here too, for :func:`qtorch.layouts.choose`.
    ``others_running`` (injectable) counts other processes' runnable tasks: a decision measured while one ran
    (before or after the timing) is kept for this process only, never written to the file, so that a later
    process on a quieter machine measures again (a path timed beside a busy neighbour is the one that suffers
    least from waiting for a core, not the fastest one).
    ``drop_ratio`` is 3 by default: the first timed calls of a path can be 2-3x slower than its settled speed
    (``dequant_mm``, 128 x 512 -> 300 bf16 on the AMX Xeon: 0.68, 0.59, 0.39, then 0.24 ms), and 1.5 dropped it
    against a kernel it beats.
    """

    def __init__(self, cache_path: str | os.PathLike | None | bool = None, *, timer: Callable[[], float] =
                 time.perf_counter, env: Mapping[str, str] | None = None, budget_s: float = 0.02,
                 min_rounds: int = 3, max_rounds: int = 15, drop_ratio: float = 3.0,
                 others_running: Callable[[], int | None] | None = None,
                 evict: Callable[[], Any] | None = None):
        env = dict(os.environ if env is None else env)
        if not (budget_s >= 0 and 1 <= min_rounds <= max_rounds and drop_ratio > 1):
            raise ValueError(f"need budget_s >= 0, 1 <= min_rounds <= max_rounds and drop_ratio > 1, got "
                             f"{budget_s}, {min_rounds}, {max_rounds}, {drop_ratio}")
        if cache_path is True:
            raise TypeError("cache_path must be a path, None (the default file) or False (no file)")
        self.cache_path = (None if cache_path is False else
                           default_cache_path(env) if cache_path is None else Path(cache_path))
        self.timer = timer
        self.others_running = others_running
        self.evict = evict or evict_caches
        self.budget_s, self.min_rounds, self.max_rounds, self.drop_ratio = budget_s, min_rounds, max_rounds, drop_ratio
        self.forced = env.get("QTORCH_PATH") or None
        flag = env.get("QTORCH_AUTOTUNE", "1").strip().lower()
        if flag not in ("1", "0", "true", "false", "on", "off", "yes", "no", ""):
            raise ValueError(f"QTORCH_AUTOTUNE must be 1 or 0, got {env['QTORCH_AUTOTUNE']!r}")
        self.measuring = flag not in ("0", "false", "off", "no")
        self.forced_layout = env.get("QTORCH_LAYOUT", "").strip() or None
        pack = env.get("QTORCH_TORCH_PACK", "").strip()
        if pack not in ("", "0", "1"):
            raise ValueError(f"QTORCH_TORCH_PACK must be 1 or 0, got {env['QTORCH_TORCH_PACK']!r}")
        self.torch_pack = {"1": True, "0": False}.get(pack)
        if self.torch_pack is not None and self.forced_layout is None:
            warnings.warn("QTORCH_TORCH_PACK is deprecated: the layout is measured on this machine; "
                          "QTORCH_LAYOUT=<name> forces one (int8pack, int4pack, blocked, canonical)",
                          FutureWarning, stacklevel=2)
        self._fp = fingerprint() if self.cache_path is not None else None
        self._lock = threading.Lock()
        self._decisions: dict[str, dict] = {}  # key string -> {"path": name (a layout for LayoutKey), "ms": {...}}
        self._disk_loaded = False
        self._warned_write = False
        self._warned_paths: set = set()

    # -------------------------------------------------------------- lookups
    def _load_disk(self) -> None:
        if self._disk_loaded:
            return
        self._disk_loaded = True
        if self.cache_path is not None:
            on_disk = _read_decisions(self.cache_path, self._fp)
            with self._lock:
                for k, v in on_disk.items():
                    self._decisions.setdefault(k, v)

    def cached(self, key: "DispatchKey | LayoutKey") -> str | None:
        """The decision kept for ``key`` (this process or the file), or None."""
        if not torch.compiler.is_compiling():
            self._load_disk()
        entry = self._decisions.get(str(key))
        return None if entry is None else entry["path"]

    def decisions(self) -> dict[str, dict]:
        """A copy of every decision known to this dispatcher (key string -> path and timings in ms)."""
        self._load_disk()
        with self._lock:
            return {k: dict(v) for k, v in self._decisions.items()}

    # -------------------------------------------------------------- the choice
    def choose(self, key: "DispatchKey | SettingKey", candidates: Mapping[str, Callable[[], Any]],
               tie: float = 1.0) -> str:
        """Name of the path to use for ``key`` among ``candidates`` (name -> a callable running one forward; only
        eligible paths, in the default order). Measures at the first call for ``key`` and remembers the result.
        A :class:`SettingKey` chooses among a setting's values the same way (name -> a callable running the kernel
        with that value). ``tie``: of the candidates whose fastest call is within this factor of the fastest one's,
        the first in the given order wins (1.0: the fastest).

        A candidate that raises while being measured is dropped; if every one raises, the first error is raised.
        """
        if not isinstance(key, (DispatchKey, SettingKey)):
            raise TypeError(f"key must be a DispatchKey or a SettingKey, got {type(key).__name__}")
        names = list(candidates)
        if not names:
            raise ValueError(f"no candidate path for {key}")
        if self.forced is not None and self.forced in candidates and isinstance(key, DispatchKey):  # (a path)
            return self.forced
        if len(names) == 1:
            return names[0]
        compiling = torch.compiler.is_compiling()
        if not self.measuring:
            return names[0]
        found = self.cached(key)
        if found in candidates and (compiling or self._measured_all(key, candidates)):
            return found
        if compiling:  # never time inside tracing: the default until an eager call has measured
            return names[0]
        busy = self._busy()
        errors: dict = {}
        ms = self._measure(candidates, errors)
        fastest = min(ms.values())
        best = next(n for n in names if n in ms and ms[n] <= fastest * tie)
        entry = {"path": best, "ms": {n: round(v, 4) for n, v in ms.items()}}
        failed = [n for n in candidates if n not in ms]
        if failed:  # raced and dropped: not a path this decision missed (else every call would measure again)
            entry["failed"] = failed
            self._warn_failed(key, errors)
        self._remember(key, entry, busy or self._busy(), persist=not failed)
        return best

    def _measured_all(self, key: DispatchKey, candidates: Mapping) -> bool:
        """Whether the kept decision for ``key`` timed every one of ``candidates``: a path that a newer build
        offers (a kernel added since) was never raced, so the decision is measured again."""
        entry = self._decisions.get(str(key)) or {}
        timed = entry.get("ms")
        failed = entry.get("failed") or ()
        return not isinstance(timed, dict) or all(n in timed or n in failed for n in candidates)

    def choose_layout(self, key: LayoutKey, candidates: Mapping[str, Callable[[], Mapping | None]],
                      rows: tuple = LAYOUT_ROWS, tie: float = LAYOUT_TIE, evict_rows: tuple = COLD_ROWS,
                      calls: Mapping[int, int] | None = None, cheaper_ties: bool = True) -> str:
        """Name of the layout to hold for ``key`` among ``candidates`` (name -> a callable that converts a
        throwaway copy of the weight and returns ``{rows: {path name: callable running one forward}}`` for every
        count in ``rows``, or None when the layout cannot hold this weight after all), in the static order.

        Measures at the first call for ``key`` (nothing is converted otherwise) and keeps the result, within the budget
        per row count. Rule: per row count, a layout's time is the fastest call of its fastest path; its cost is the
        time of one request, :data:`REQUEST_CALLS` (a 512-token prompt in 128-row calls, one 16-row call, 128 one-row
        decoding steps; a row count it does not name counts once), and its score that cost over the cheapest layout's.
        Of the layouts scoring within ``tie`` of the lowest, the one with the least regret wins (its largest ratio, over
        the row counts, to the fastest layout at that count; regrets within ``tie`` go to the cheaper request, equal
        ones to the earliest in the static order): a near tie on the request goes to the layout that is never far
        behind. The fastest call, not the median, and no path dropped after one round: other work on the machine only
        adds time, and this decision is kept for good. At ``evict_rows`` (default :data:`COLD_ROWS`) every timed call
        follows an eviction of the caches (untimed); callers whose calls at those rows read a weight out of cache by
        themselves (the eager trials rotate over copies) pass ``()``. ``calls``: row count -> forwards each of its timed
        calls runs (compiled probes that rotate over copies inside one call); the call's time is divided by it.
        ``cheaper_ties=False``: regrets within ``tie`` go to the static order alone (the compiled probes, whose template
        layout's time the blocking chosen after them may still lower).

        >>> import time
        >>> d = Dispatcher(cache_path=False, env={})
        >>> key = LayoutKey.make(64, 64, "w8s-channel0-g64", "bfloat16")
        >>> slow_prompt = {r: {"a": (lambda: time.sleep(0.003)) if r > 1 else (lambda: None)} for r in (1, 16, 128)}
        >>> fast_all = {r: {"b": lambda: None} for r in (1, 16, 128)}
        >>> d.choose_layout(key, {"a": lambda: slow_prompt, "b": lambda: fast_all})
        'b'
        """
        if not isinstance(key, LayoutKey):
            raise TypeError(f"key must be a LayoutKey, got {type(key).__name__}")
        names = list(candidates)
        if not names:
            raise ValueError(f"no candidate layout for {key}")
        if calls and any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in calls.values()):
            raise ValueError(f"calls must map row counts to ints >= 1 (forwards per timed call), got {calls!r}")
        if len(names) == 1 or not self.measuring:
            return names[0]
        found = self.cached(key)
        if found in candidates:
            return found
        if torch.compiler.is_compiling():  # never time (nor convert) inside tracing
            return names[0]
        built = {}
        for name in names:
            runs = candidates[name]()
            if runs is not None:
                built[name] = runs
        if len(built) < 2:  # nothing to compare: not a measured decision, so nothing is kept
            return next(iter(built), names[0])
        busy = self._busy()
        ms: dict[str, dict[int, float]] = {name: {} for name in built}
        errors: dict = {}
        for r in rows:
            flat = {f"{name}:{p}": fn for name, runs in built.items() for p, fn in runs.get(r, {}).items()}
            if not flat:  # no layout runs this row count: none is scored
                continue
            before = self.evict if r in evict_rows else None
            failed_here: dict = {}
            got_here = self._samples(flat, drop=False, before=before, errors=failed_here,
                                     siblings=lambda label: label.partition(":")[0])
            errors.update({f"{label}@{r}": e for label, e in failed_here.items()})
            per = (calls or {}).get(r, 1)
            for label, got in got_here.items():
                name = label.partition(":")[0]
                ms[name][r] = min(ms[name].get(r, float("inf")), min(got) * 1e3 / per)
        scored = [name for name in built if len(ms[name]) == len(rows)]  # a path for every row count ran
        if not scored:
            return names[0]
        eps = 1e-6  # ms; keeps the ratios finite for calls too fast to time
        cost = {n: sum(REQUEST_CALLS.get(r, 1) * ms[n][r] for r in rows) + eps for n in scored}
        cheapest = min(cost.values())
        score = {n: cost[n] / cheapest for n in scored}
        low = min(score.values())
        near = [n for n in names if n in score and score[n] <= low * tie]  # in the static order
        best_at = {r: min(ms[n][r] for n in scored) + eps for r in rows}
        regret = {n: max((ms[n][r] + eps) / best_at[r] for r in rows) for n in near}
        least = min(regret.values())
        # of those never far behind, the cheaper request (equal ones: the static order). The static order alone
        # kept float32 2048x2048 4-bit layers on blocked, 5% dearer on the request than vnni with regrets of 1.12
        # and 1.11, whose decoding it slowed by 5% (13.49 against 12.86 ms a token, AMX Xeon, lockstep)
        tied = [n for n in near if regret[n] <= least * tie]
        pick = min(tied, key=score.__getitem__) if cheaper_ties else tied[0]
        entry = {"path": pick, "ms": {f"{n}@{r}": round(v, 4) for n in ms for r, v in ms[n].items()},
                 "score": {n: round(v, 3) for n, v in score.items()},
                 "regret": {n: round(v, 3) for n, v in regret.items()}}
        if errors:
            entry["failed"] = sorted(errors)
            self._warn_failed(key, errors)
        self._remember(key, entry, busy or self._busy(), persist=not errors)
        return pick

    def _measure(self, candidates: Mapping[str, Callable[[], Any]], errors: dict | None = None) -> dict[str, float]:
        """Fastest call in ms per candidate that ran (the dropped ones keep the samples they have). The fastest,
        not the median: other work on a shared machine only adds time to a call, and a decision is kept for good
        (a median taken while a neighbour held a core picked a path 1.5x slower than its rival on a quiet one)."""
        return {n: min(s) * 1e3 for n, s in self._samples(candidates, errors=errors).items()}

    def _samples(self, candidates: Mapping[str, Callable[[], Any]], drop: bool = True,
                 before: Callable[[], Any] | None = None, errors: dict | None = None,
                 siblings: Callable[[str], str] | None = None) -> dict[str, list[float]]:
        """Timed calls (seconds) per candidate that ran: warm-up, then alternating rounds within the budget
        (``drop``: a clearly slower candidate stops being timed once it made :data:`DROP_AFTER` timed calls;
        ``before``: run, untimed, before every timed call; ``errors``: filled with what each candidate that
        raised in its warm-up call raised).

        ``siblings``: candidate -> its group (a layout's paths, of which only the fastest counts). A candidate
        ``drop_ratio`` times slower than its group's leader after a timed call, or :data:`SIBLING_DROP` times after
        :data:`DROP_AFTER`, stops being timed, whatever ``drop``; and the rounds go on past the slow-call stop (four
        budgets spent) until :data:`LAYOUT_ROUNDS` are done, within :data:`LAYOUT_SPEND` budgets. Without that, a
        128-row race of 4096x4096 4-bit bfloat16 layers (nine paths, 87 ms a round, three of them 15-24 ms) was decided
        on one call per path: on the AMX Xeon `vnni`'s AMX path took 3.0, 4.4 and 4.8 ms in three races, and 2.6-2.8 ms
        timed alone."""
        alive, raised = {}, {}
        for name, fn in candidates.items():  # warm-up: first calls compile, allocate, fill caches
            try:
                fn()
                alive[name] = fn
            except Exception as e:  # an ineligible path is not a decision-breaker
                raised[name] = e
        if errors is not None:
            errors.update(raised)
        if not alive:
            raise next(iter(raised.values()))
        samples: dict[str, list[float]] = {name: [] for name in alive}
        spent, rounds = 0.0, 0
        while True:
            # every other round in reverse: a call slows the one timed after it (an AMX call, the next candidate's
            # cold start), so no candidate always follows the same one
            for name in (list(alive) if rounds % 2 == 0 else list(reversed(alive))):
                if before is not None:
                    before()
                t0 = self.timer()
                alive[name]()
                dt = self.timer() - t0
                samples[name].append(dt)
                spent += dt
            rounds += 1
            med = {n: statistics.median(samples[n]) for n in alive}
            lead = min(med, key=med.get)
            for n in list(alive) if drop and rounds >= DROP_AFTER else ():
                # clearly slower: its best call loses to the leader's typical one
                if n != lead and min(samples[n]) > self.drop_ratio * med[lead]:
                    del alive[n]
            if siblings is not None:  # a path clearly slower than its layout's fastest cannot set the layout's time
                leads: dict = {}
                for n in alive:
                    g = siblings(n)
                    if g not in leads or med[n] < med[leads[g]]:
                        leads[g] = n
                for n in list(alive):
                    first = leads[siblings(n)]
                    ratio = min(SIBLING_DROP, self.drop_ratio) if len(samples[n]) >= DROP_AFTER else self.drop_ratio
                    if n != first and min(samples[n]) > ratio * med[first]:
                        del alive[n]
            if len(alive) == 1 or rounds >= self.max_rounds or (rounds >= self.min_rounds and spent >= self.budget_s):
                break
            if spent >= 4 * self.budget_s and (siblings is None or rounds >= LAYOUT_ROUNDS
                                               or spent >= LAYOUT_SPEND * self.budget_s):
                break  # very slow candidates: do not hold the first call for long
        return samples

    def _warn_failed(self, key, errors: Mapping[str, BaseException]) -> None:
        """One warning per process and failing path: a path that raised was left out of a decision, which is
        therefore kept for this process only (a crash that a later run does not have, a cache being rebuilt,
        must not pin the slower rival on disk for good)."""
        for name, e in errors.items():
            tag = (name, type(e).__name__)
            if tag in self._warned_paths:
                continue
            self._warned_paths.add(tag)
            warnings.warn(f"qtorch: path {name!r} raised while {key} was measured ({type(e).__name__}: {e}); "
                          "decided without it, for this process only", RuntimeWarning, stacklevel=4)

    def _busy(self) -> bool:
        """Whether another process had a runnable task just now (the timings may be skewed by waiting for a core)."""
        try:
            n = (self.others_running or _others_running)()
        except Exception:
            return False
        return n is not None and n > 0

    def keep(self, key: "DispatchKey | LayoutKey", entry: dict) -> None:
        """Keep a decision measured elsewhere (``entry``: ``{"path": name, ...}``, e.g. :func:`qtorch.tune_layouts`'s,
        timed in a model) as this dispatcher's own: for the process, and in the file unless another process was
        running just now."""
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"a decision is a dict with a 'path' name, got {entry!r}")
        self._remember(key, dict(entry), self._busy())

    def _remember(self, key: "DispatchKey | LayoutKey", entry: dict, busy: bool = False,
                  persist: bool = True) -> None:
        if busy:
            entry = {**entry, "busy": True}
        with self._lock:
            self._decisions[str(key)] = entry
        if self.cache_path is None or busy or not persist:  # measured beside other work, or a path failed:
            return                                          # this process only
        try:
            merged = _write_decisions(self.cache_path, self._fp, {str(key): entry})
        except OSError as e:  # a read-only home: the process cache still works
            if not self._warned_write:
                self._warned_write = True
                warnings.warn(f"qtorch: cannot write the dispatch cache {self.cache_path}: {e}", RuntimeWarning,
                              stacklevel=3)
            return
        with self._lock:
            for k, v in merged.items():
                self._decisions.setdefault(k, v)


_EVICT: list = []


_CPU_CACHES = "/sys/devices/system/cpu/cpu0/cache"


def last_level_cache() -> int:
    """Bytes of the CPU's largest cache: what Linux lists for CPU 0 (``/sys/devices/system/cpu/cpu0/cache``), else
    ``os.sysconf``'s where the platform names it, else 0. (Python's ``os.sysconf`` has no ``SC_LEVEL3_CACHE_SIZE``
    on Linux: this once read 0 there, and every eviction took the 32 MB floor on a machine listing 480 MB.)"""
    best = 0
    root = _CPU_CACHES
    try:
        entries = os.listdir(root)
    except OSError:
        entries = []
    for name in entries:
        try:
            with open(os.path.join(root, name, "size")) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if scale > 1 else text
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    if not best:
        try:
            best = int(os.sysconf("SC_LEVEL3_CACHE_SIZE"))
        except (ValueError, OSError, AttributeError):
            best = 0
    return max(best, 0)


def cold_bytes() -> int:
    """Bytes a read must stream to leave no weight in the CPU caches: twice the last-level cache
    (:func:`last_level_cache`), 32-256 MB."""
    return min(max(2 * last_level_cache(), 32 << 20), 256 << 20)


def rotation_copies(nbytes: int) -> int:
    """How many copies of a weight of ``nbytes`` a rotation takes so that each, called in turn, reads from memory:
    together half of :func:`cold_bytes` (the rest for whatever alternates with them), :data:`ROTATION_COPIES` at
    most, 1 for a weight that large.

    >>> rotation_copies(cold_bytes()) == 1 and rotation_copies(1) == ROTATION_COPIES
    True
    """
    return max(1, min(ROTATION_COPIES, -(-(cold_bytes() // 2) // max(1, nbytes))))


def evict_caches() -> None:
    """Write a buffer larger than the last-level cache (:func:`cold_bytes`), so that the next call finds no
    weight in cache, as a layer of a model does."""
    if not _EVICT:
        _EVICT.append(torch.empty(cold_bytes() // 4, dtype=torch.float32))
    _EVICT[0].fill_(1.0)


def _others_running() -> int | None:
    """Runnable tasks of other processes right now: the machine's running count (/proc/loadavg) less this
    process's own (the calling thread and torch's workers, which spin between ops); None where unknown."""
    from qcore import _team

    running = _team.running_tasks()
    if running is None:
        return None
    return running - max(1, torch.get_num_threads())


_DEFAULT: Dispatcher | None = None
_DEFAULT_LOCK = threading.Lock()


def default_dispatcher() -> Dispatcher:
    """The process's dispatcher (environment read at its first use). Once made, read without the lock: a global
    read, which torch.compile can trace (it cannot enter a lock); building any layer makes it."""
    global _DEFAULT
    if _DEFAULT is not None:
        return _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Dispatcher()
        return _DEFAULT

