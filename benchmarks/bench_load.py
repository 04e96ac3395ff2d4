"""Benchmark calls under load: qcore.pack, qcore.quantize and a one-row qtorch forward, with torch loaded (so on
torch's OpenMP team), on a quiet machine and with one core held by a busy-loop process this benchmark starts and
stops itself.

For each call: the median time on the library's default threads ("team") and on one thread ("1t"), quiet and
loaded, every cell's calls shuffled together so that noise from other processes hits them alike. Target: loaded
team <= 1.5x the loaded one-thread time (a busy core must never make a call much slower than one thread).
``--trace`` adds, per cell, what the team calls did: how many ran on 2+ threads, how many of those waited for a
thread kept off its core (qcore._team's under-load guard then caps the team), and their median time.
Run:  python benchmarks/bench_load.py [--repeats 31] [--pin] [--busy 1] [--trace]   (about 10-20 s)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

import numpy as np
import torch

import qcore
import qcore._parallel
import qcore._team
import qtorch
from qcore import PerGroup, QuantScheme
from qtorch.autotune import cpu_info

ISA = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "sve")

BUSY_LOOP = "while True: pass"


class _Busy:
    """``n`` busy-loop processes (each pinned to one of the last CPUs with ``pin``), stopped on exit."""

    def __init__(self, n: int, pin: bool):
        self.n, self.pin, self.procs = n, pin, []

    def __enter__(self):
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        for k in range(self.n):
            cpu = cpus[-1 - k % len(cpus)] if (self.pin and cpus) else None
            pre = (lambda c=cpu: os.sched_setaffinity(0, {c})) if cpu is not None else None
            self.procs.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP], preexec_fn=pre))
        time.sleep(0.5)  # the scheduler places it
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


class _Threads:
    """The library default ("team"), or one thread for qcore's kernels and torch's ops ("1t")."""

    def __init__(self, mode: str):
        self.mode = mode

    def __enter__(self):
        self.saved = qcore._parallel.NUM_THREADS, qcore._parallel.DYNAMIC, torch.get_num_threads()
        if self.mode == "1t":
            qcore._parallel.NUM_THREADS, qcore._parallel.DYNAMIC = 1, False
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        qcore._parallel.NUM_THREADS, qcore._parallel.DYNAMIC, threads = self.saved
        torch.set_num_threads(threads)


def _calls(rows: int, cols: int):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (rows, cols), dtype=np.uint8)
    x = rng.standard_normal((rows // 4, cols)).astype(np.float32)
    scheme = QuantScheme(4, False, PerGroup(128))
    torch.manual_seed(0)
    layer = qtorch.W4A16Linear.from_linear(torch.nn.Linear(cols, cols, bias=False))
    row = torch.randn(1, cols)

    def forward():
        with torch.no_grad():
            layer(row)

    return {f"pack {rows * cols / 2**20:.0f}M 4-bit codes": lambda: qcore.pack(codes, 4),
            f"quantize {x.size / 2**20:.0f}M floats, 4-bit groups of 128": lambda: qcore.quantize(x, scheme),
            f"forward, 1 row, 4-bit {cols}x{cols}": forward}


class _Trace:
    """The team calls (``qcore._team.run``) made during one timed call: threads, whether any thread starved or the
    others waited for a straggler, and the time of each."""

    def __init__(self):
        self.runs, self._run = [], qcore._team.run

    def __enter__(self):
        def traced(kernel, block, nthreads, nchunks=None):
            t0 = time.perf_counter()
            ok = self._run(kernel, block, nthreads, nchunks)
            if ok and nchunks is not None:
                trailer = block[qcore._team.HEADER + nchunks:]
                late = bool(trailer[qcore._team.STARVED]) or (nchunks >= 4 * nthreads and qcore._team._waited(trailer))
                self.runs.append((nthreads, late, time.perf_counter() - t0))
            return ok
        qcore._team.run = traced
        return self

    def __exit__(self, *exc):
        qcore._team.run = self._run


def _measure(calls: dict, repeats: int, order_rng, trace: bool) -> tuple[dict, dict]:
    """(median ms, team runs) per (call, mode); the team runs of a timed call: a list of (threads, late, s)."""
    times = {(name, mode): [] for name in calls for mode in ("team", "1t")}
    runs = {k: [] for k in times}
    keys = list(times)
    for rep in range(repeats + 1):  # the first round is the warm-up
        order_rng.shuffle(keys)
        for name, mode in keys:
            with _Threads(mode), (_Trace() if trace else contextlib.nullcontext()) as tr:
                t0 = time.perf_counter()
                calls[name]()
                t = time.perf_counter() - t0
            if rep:
                times[name, mode].append(t)
                if tr is not None:
                    runs[name, mode].append(tr.runs)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}, runs


def _trace_cell(runs: list) -> str:
    """One cell's team calls: how many of the timed calls used a team of 2+ threads, how many of those waited for
    a late thread, and the median time of the calls that used a team."""
    teamed = [r for r in runs if any(n > 1 for n, _, _ in r)]
    late = [r for r in teamed if any(n > 1 and bad for n, bad, _ in r)]
    med = f"{np.median([sum(s for _, _, s in r) for r in teamed]) * 1e3:.2f}" if teamed else "-"
    return f"{len(teamed):>2}/{len(runs)} on 2+ threads, {len(late):>2} late, median {med}"


def _other_tasks(samples: int = 20) -> float | None:
    """Other processes' running tasks, averaged over ``samples`` reads of /proc/loadavg 10 ms apart (the load
    average lags by a minute); None where there is no such file."""
    counts = []
    try:
        for _ in range(samples):
            with open("/proc/loadavg", "rb") as f:  # "0.59 0.96 0.99 1/80 11928": running/all tasks
                counts.append(int(f.read().split()[3].split(b"/")[0]) - 1)  # not this thread
            time.sleep(0.01)
    except (OSError, ValueError, IndexError):
        return None
    return float(np.mean(counts))


def _where(module) -> str:
    """Where ``module`` was imported from, with the git commit there (benchmarks compare checkouts)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(module.__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{root}" + (f" (git {rev})" if rev else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--busy", type=int, default=1, help="busy-loop processes for the loaded case")
    ap.add_argument("--pin", action="store_true", help="pin each busy loop to one of the last CPUs")
    ap.add_argument("--trace", action="store_true", help="per cell: the team calls, and how many waited for a thread")
    args = ap.parse_args()
    calls = _calls(args.rows, args.cols)
    order_rng = np.random.default_rng(1)
    model, flags = cpu_info()
    have = [f for f in ISA if f in flags.split()]
    print(f"CPU: {model} | {len(os.sched_getaffinity(0))} cpus | ISA: {' '.join(have) or '-'}")
    print(f"qcore from {_where(qcore)}; torch {torch.__version__} on {torch.get_num_threads()} threads")
    others = _other_tasks()
    print(f"median of {args.repeats} calls, ms; loaded: {args.busy} busy-loop process(es)"
          f"{' pinned to the last CPU(s)' if args.pin else ', not pinned'}; before it, other processes' running "
          f"tasks: {others:.1f} on average" if others is not None else "")
    quiet, quiet_runs = _measure(calls, args.repeats, order_rng, args.trace)
    with _Busy(args.busy, args.pin):
        loaded, loaded_runs = _measure(calls, args.repeats, order_rng, args.trace)
    head = (f"{'call':<40} | {'quiet 1t':>8} {'team':>6} {'team/1t':>7} | {'loaded 1t':>9} {'team':>6} "
            f"{'team/1t':>7} | target loaded team/1t <= 1.5")
    print(head)
    print("-" * len(head))
    all_ok = True
    for name in calls:
        ratio = loaded[name, "team"] / loaded[name, "1t"]
        ok = ratio <= 1.5
        all_ok &= ok
        print(f"{name:<40} | {quiet[name, '1t']:8.3f} {quiet[name, 'team']:6.3f} "
              f"{quiet[name, 'team'] / quiet[name, '1t']:7.2f} | {loaded[name, '1t']:9.3f} {loaded[name, 'team']:6.3f} "
              f"{ratio:7.2f} | {'yes' if ok else 'NO'}")
    if args.trace:
        print("team calls of the 'team' cells (a late one waited for a thread kept off its core):")
        for name in calls:
            print(f"  {name:<40} quiet: {_trace_cell(quiet_runs[name, 'team'])} | "
                  f"loaded: {_trace_cell(loaded_runs[name, 'team'])}")
    print(("all targets met" if all_ok else "some targets missed (the machine is shared: re-run if noisy)"))
    if others is not None and others >= 0.3:
        print(f"note: other processes kept cores busy before the busy loop started ({others:.1f} running tasks on "
              f"average, {len(os.sched_getaffinity(0))} cpus): 'quiet' is not quiet, and a call the scheduler preempts "
              "takes a time slice longer (a 1.5 ms pack: 5-13 ms), so both columns' medians jump between two values")


if __name__ == "__main__":
    main()
