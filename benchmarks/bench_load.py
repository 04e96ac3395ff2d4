"""Benchmark calls under load: qcore.pack, qcore.quantize and a one-row qtorch forward, with torch loaded (so on
torch's OpenMP team), on a quiet machine and with one core held by a busy-loop process this benchmark starts and
stops itself.

For each call: the median time on the library's default threads ("team") and on one thread ("1t"), quiet and
loaded, alternating the two so that noise from other processes hits both alike. Target: loaded team <= 1.5x the
loaded one-thread time (a busy core must never make a call much slower than one thread).
Run:  python benchmarks/bench_load.py [--repeats 31] [--pin] [--busy 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch

import qcore
import qcore._parallel
import qtorch
from qcore import PerGroup, QuantScheme

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


def _measure(calls: dict, repeats: int, order_rng) -> dict:
    times = {(name, mode): [] for name in calls for mode in ("team", "1t")}
    keys = list(times)
    for rep in range(repeats + 1):  # the first round is the warm-up
        order_rng.shuffle(keys)
        for name, mode in keys:
            with _Threads(mode):
                t0 = time.perf_counter()
                calls[name]()
                t = time.perf_counter() - t0
            if rep:
                times[name, mode].append(t)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--busy", type=int, default=1, help="busy-loop processes for the loaded case")
    ap.add_argument("--pin", action="store_true", help="pin each busy loop to one of the last CPUs")
    args = ap.parse_args()
    calls = _calls(args.rows, args.cols)
    order_rng = np.random.default_rng(1)
    print(f"{len(os.sched_getaffinity(0))} cpus, torch {torch.__version__} on {torch.get_num_threads()} threads; "
          f"median of {args.repeats}, ms; loaded: {args.busy} busy-loop process(es)"
          f"{' pinned' if args.pin else ''}; load avg {os.getloadavg()[0]:.2f} at the start")
    quiet = _measure(calls, args.repeats, order_rng)
    with _Busy(args.busy, args.pin):
        loaded = _measure(calls, args.repeats, order_rng)
    head = (f"{'call':<40} | {'quiet 1t':>8} {'team':>6} | {'loaded 1t':>9} {'team':>6} | "
            f"{'loaded team/1t':>14} ok(<=1.5)")
    print(head)
    print("-" * len(head))
    all_ok = True
    for name in calls:
        ratio = loaded[name, "team"] / loaded[name, "1t"]
        ok = ratio <= 1.5
        all_ok &= ok
        print(f"{name:<40} | {quiet[name, '1t']:8.3f} {quiet[name, 'team']:6.3f} | {loaded[name, '1t']:9.3f} "
              f"{loaded[name, 'team']:6.3f} | {ratio:14.2f} {'yes' if ok else 'NO'}")
    print(f"load avg at the end {os.getloadavg()[0]:.2f}; "
          + ("all targets met" if all_ok else "some targets missed (the machine is shared: re-run if noisy)"))


if __name__ == "__main__":
    main()
