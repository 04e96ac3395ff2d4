"""Benchmark qcore.pack / qcore.unpack on 16M codes (4096 x 4096) of every width 1..8.

Baselines measured in the same run, interleaved with the packing calls so that noise from other
processes hits all of them alike:

* copy:  ``np.copyto`` of the same 16 MB uint8 codes array into a preallocated output
* numpy: a straightforward NumPy implementation (shifts and ORs over strided slices)

Targets (issue 3): widths 1, 2, 4 pack and unpack <= 0.6x the copy; 3, 5, 6, 7 <= 1.5x.
Run:  python benchmarks/bench_packing.py [--repeats 15] [--rows 4096] [--cols 4096]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import qcore
import qcore._parallel
import qcore.packing
from _machine import machine_line


def numpy_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Reference: shifts and ORs over strided slices (last axis a multiple of 8)."""
    if bits == 8:
        return codes.copy()
    if 8 % bits == 0:
        per = 8 // bits
        out = codes[..., 0::per].copy()
        for t in range(1, per):
            out |= codes[..., t::per] << np.uint8(t * bits)
        return out
    # straddling widths: 8 codes -> one 8*bits-bit value in a uint64, keep its low `bits` bytes
    acc = codes[..., 0::8].astype(np.uint64)
    for i in range(1, 8):
        acc |= codes[..., i::8].astype(np.uint64) << np.uint64(i * bits)
    b = acc.view(np.uint8).reshape(acc.shape + (8,))[..., :bits]
    return b.reshape(codes.shape[:-1] + (-1,))


def numpy_unpack(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    if bits == 8:
        return packed.copy()
    mask = np.uint8((1 << bits) - 1)
    out = np.empty(packed.shape[:-1] + (length,), np.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        for t in range(per):
            out[..., t::per] = (packed >> np.uint8(t * bits)) & mask
        return out
    groups = packed.reshape(packed.shape[:-1] + (-1, bits))
    acc = np.zeros(groups.shape[:-1] + (8,), np.uint8)
    acc[..., :bits] = groups
    acc = acc.view(np.uint64)[..., 0]
    for i in range(8):
        out[..., i::8] = (acc >> np.uint64(i * bits)).astype(np.uint8) & mask
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _Threads:
    """Run qcore's packing with a fixed thread count (auto = the library default)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.saved = qcore._parallel.NUM_THREADS, qcore._parallel.DYNAMIC
        if self.n != "auto":
            qcore._parallel.NUM_THREADS, qcore._parallel.DYNAMIC = self.n, False

    def __exit__(self, *exc):
        qcore._parallel.NUM_THREADS, qcore._parallel.DYNAMIC = self.saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--numpy-repeats", type=int, default=3)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    order_rng = np.random.default_rng(1)
    shape = (args.rows, args.cols)
    n = args.rows * args.cols
    ncpu = os.cpu_count()
    configs = ["auto", 1, qcore._parallel.NUM_THREADS] if qcore._parallel.NUM_THREADS > 1 else ["auto"]
    print(machine_line())
    print(f"qcore.pack / qcore.unpack, {args.rows}x{args.cols} = {n / 2**20:.0f}M uint8 codes, "
          f"median of {args.repeats} (numpy: {args.numpy_repeats}) after warm-up, {ncpu} cpus, "
          f"load avg {os.getloadavg()[0]:.1f} (auto would use {qcore._parallel.threads()} thread(s) right now)")
    print("copy: np.copyto of the same uint8 codes array into a preallocated output, ms; other columns: "
          "time / copy time")
    print("auto: the library default (threads = idle cores at each call); 1t / 2t: forced 1 / 2 threads;")
    print("numpy: shifts and ORs over strided slices;")
    print("floor: one thread only streaming the input bytes in (ndarray.max) plus the output bytes out (fill)")
    labels = [("auto" if c == "auto" else f"{c}t") for c in configs]
    head = (f"{'bits':>4} {'copy ms':>7} | pack {' '.join(f'{lb:>5}' for lb in labels)} {'numpy':>6} {'floor':>5} | "
            f"unpack {' '.join(f'{lb:>5}' for lb in labels)} {'numpy':>6} {'floor':>5} | {'target':>6} ok(auto)")
    print(head)
    print("-" * len(head))
    all_ok = True
    for bits in range(1, 9):
        codes = rng.integers(0, 1 << bits, shape, dtype=np.uint8)
        dst = np.empty_like(codes)
        packed = qcore.pack(codes, bits)
        # correctness first: the kernels, the NumPy reference and the round trip agree
        if not np.array_equal(packed, numpy_pack(codes, bits)):
            raise SystemExit(f"pack({bits}) disagrees with the NumPy reference")
        if not np.array_equal(qcore.unpack(packed, bits, args.cols), codes):
            raise SystemExit(f"unpack({bits}) does not invert pack")
        if not np.array_equal(numpy_unpack(packed, bits, args.cols), codes):
            raise SystemExit(f"numpy_unpack({bits}) does not invert pack")
        nbytes = packed.size
        fns = {
            "copy": (None, lambda: np.copyto(dst, codes)),
            # single-thread memory floor: stream the bytes in (max) and the bytes out (fill)
            "read_in": (None, lambda: codes.max()),
            "write_out": (None, lambda: dst.reshape(-1)[:nbytes].fill(1)),
            "read_packed": (None, lambda: packed.max()),
            "write_codes": (None, lambda: dst.fill(1)),
        }
        for c in configs:
            fns[f"pack{c}"] = (c, lambda: qcore.pack(codes, bits))
            fns[f"unpack{c}"] = (c, lambda: qcore.unpack(packed, bits, args.cols))
        times = {k: [] for k in fns}
        order = list(fns)
        for rep in range(args.repeats + 1):  # the first round is the warm-up
            # a fresh order every round: what ran just before (and left in the caches) varies evenly
            order_rng.shuffle(order)
            for k in order:
                c, f = fns[k]
                with _Threads(c if c is not None else "auto"):
                    t = _timed(f)
                if rep:
                    times[k].append(t)
        for k, f in (("np_pack", lambda: numpy_pack(codes, bits)),
                     ("np_unpack", lambda: numpy_unpack(packed, bits, args.cols))):
            times[k] = [_timed(f) for _ in range(args.numpy_repeats)]
        med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        c0 = med["copy"]
        target = {1: 0.6, 2: 0.6, 4: 0.6, 8: None}.get(bits, 1.5)
        ok = "" if target is None else (
            "yes" if max(med["packauto"], med["unpackauto"]) / c0 <= target else "NO")
        all_ok &= ok != "NO"
        pk = " ".join(f"{med[f'pack{c}'] / c0:5.2f}" for c in configs)
        up = " ".join(f"{med[f'unpack{c}'] / c0:5.2f}" for c in configs)
        pfloor = (med["read_in"] + med["write_out"]) / c0
        ufloor = (med["read_packed"] + med["write_codes"]) / c0
        print(f"{bits:>4} {c0:7.2f} | pack {pk} {med['np_pack'] / c0:6.1f} {pfloor:5.2f} | unpack {up} "
              f"{med['np_unpack'] / c0:6.1f} {ufloor:5.2f} | {'-' if target is None else f'<={target}':>6} {ok}")
    # context for the 2-thread column: how much more memory bandwidth a second core brings here
    src = rng.integers(0, 256, shape, dtype=np.uint8)
    dst = np.empty_like(src)
    half = shape[0] // 2
    pool = ThreadPoolExecutor(1)

    def copy2():
        f = pool.submit(np.copyto, dst[half:], src[half:])
        np.copyto(dst[:half], src[:half])
        f.result()

    t1, t2 = [], []
    for rep in range(args.repeats + 1):
        a, b = _timed(lambda: np.copyto(dst, src)), _timed(copy2)
        if rep:
            t1.append(a)
            t2.append(b)
    print(f"memory scaling: np.copyto split over 2 threads takes {np.median(t2) / np.median(t1):.2f}x "
          f"the 1-thread copy")
    print(f"load avg at the end {os.getloadavg()[0]:.1f}; "
          + ("all targets met" if all_ok else "some targets missed (the machine is shared: re-run if noisy)"))


if __name__ == "__main__":
    main()
