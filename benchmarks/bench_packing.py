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

import numpy as np

import qcore
import qcore.packing


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--numpy-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for qcore's kernels (default: all cpus numba may use)")
    args = ap.parse_args()
    if args.threads is not None:
        qcore.packing._NUM_THREADS = max(1, args.threads)

    rng = np.random.default_rng(0)
    shape = (args.rows, args.cols)
    n = args.rows * args.cols
    print(f"qcore.pack / qcore.unpack, {args.rows}x{args.cols} = {n / 2**20:.0f}M uint8 codes, "
          f"median of {args.repeats} (numpy: {args.numpy_repeats}) after warm-up, "
          f"{qcore.packing._NUM_THREADS} threads on {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}")
    print("copy = np.copyto of the same uint8 codes array into a preallocated output (ms)")
    head = (f"{'bits':>4} {'copy':>6} | {'pack':>6} {'x copy':>6} {'numpy':>7} {'x copy':>6} | "
            f"{'unpack':>6} {'x copy':>6} {'numpy':>7} {'x copy':>6} | {'target':>6} ok")
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
        fns = {
            "copy": lambda: np.copyto(dst, codes),
            "pack": lambda: qcore.pack(codes, bits),
            "unpack": lambda: qcore.unpack(packed, bits, args.cols),
        }
        times = {k: [] for k in fns}
        for k, f in fns.items():  # warm-up
            f()
        for _ in range(args.repeats):
            for k, f in fns.items():
                times[k].append(_timed(f))
        nt = {"np_pack": [], "np_unpack": []}
        for _ in range(args.numpy_repeats):
            nt["np_pack"].append(_timed(lambda: numpy_pack(codes, bits)))
            nt["np_unpack"].append(_timed(lambda: numpy_unpack(packed, bits, args.cols)))
        med = {k: float(np.median(v)) * 1e3 for k, v in {**times, **nt}.items()}
        c = med["copy"]
        target = 0.6 if bits in (1, 2, 4) else (1.5 if bits != 8 else None)
        ok = "" if target is None else ("yes" if max(med["pack"], med["unpack"]) / c <= target else "NO")
        all_ok &= ok != "NO"
        print(f"{bits:>4} {c:6.2f} | {med['pack']:6.2f} {med['pack'] / c:6.2f} {med['np_pack']:7.2f} "
              f"{med['np_pack'] / c:6.1f} | {med['unpack']:6.2f} {med['unpack'] / c:6.2f} "
              f"{med['np_unpack']:7.2f} {med['np_unpack'] / c:6.1f} | "
              f"{'-' if target is None else f'<={target}':>6} {ok}")
    print("all targets met" if all_ok else "some targets missed (the machine is shared: re-run if noisy)")


if __name__ == "__main__":
    main()
