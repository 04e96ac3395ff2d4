"""The one-row kernel (:mod:`qtorch.gemv`) on cold weights: decoding reads every layer's codes from memory once.

    python benchmarks/bench_gemv_cold.py                       # 4-bit g128, the hidden-2048 decode shapes
    python benchmarks/bench_gemv_cold.py --bits 8 --threads 1 --mib 800

Per layer shape (out x in), enough distinct weights of that shape to exceed ``--mib`` MiB in all (more than the
last-level cache) are called in turn, so that each call reads its codes from memory, as a decoding step does; the
same is done hot (one weight, called repeatedly: what the kernel computes at, from the caches). Cases: asymmetric
codes with the zero point folded per group (``fold``: the forward's 4-bit path, and 8-bit for bfloat16/float16),
asymmetric exact and symmetric exact, and for 4-bit codes on CPUs with AVX512-BF16 the dot-product variant of
bfloat16 rows (``dot``: the ``bf16dot`` path's one row). Printed: best and median ms per call over ``--repeats`` rounds (cases alternating inside each
round) and the codes' GB/s at the best; cold/hot near 1 means the kernel, not memory, is the limit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qtorch import gemv  # noqa: E402
from _machine import machine_line  # noqa: E402

SHAPES = ((2048, 2048), (5504, 2048), (2048, 5504))  # (out, in) of a hidden-2048 Llama block


def _layers(n, k, bits, group, count, rng):
    """``count`` weights of one shape: (plan asymmetric, plan symmetric), arrays kept alive by the plans."""
    nt = 128
    w = nt // 2 if bits == 4 else nt
    none = np.zeros((0, 0), np.uint8)
    out = []
    for _ in range(count):
        wb = rng.integers(0, 256, (n // nt, k, w), dtype=np.uint8)
        sc = (rng.random((k // group, n), dtype=np.float32) + 0.5) * 0.01
        zp = rng.integers(0, 1 << bits, (k // group, n), dtype=np.uint8)
        out.append([gemv.Plan(wb, sc, z, group, bits, wb.ctypes.data, sc.ctypes.data, z.ctypes.data)
                    for z in (zp, none)])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--mib", type=int, default=600, help="codes cycled per shape when cold (exceed the L3)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(machine_line())
    print(f"{a.bits}-bit, groups of {a.group}, threads {torch.get_num_threads()}; ms per call (best / median), "
          f"GB/s of codes at the best")
    rng = np.random.default_rng(0)
    cases = [("fold", 0, True, False), ("asym exact", 0, False, False), ("sym exact", 1, False, False)]
    if a.bits == 4 and gemv.dot_available():
        cases.append(("dot", 0, True, True))
    for n, k in SHAPES:
        codes = n * k * a.bits // 8
        cold = _layers(n, k, a.bits, a.group, max(2, (a.mib << 20) // codes), rng)
        hot = cold[:1] * 8
        x = rng.standard_normal(k).astype(np.float32)
        xb = torch.from_numpy(x).to(torch.bfloat16).float().numpy()  # bfloat16 values, as the dot variant reads
        out = np.empty(n, np.float32)
        times = {}
        for r in range(a.repeats + 1):  # round 0: warm-up (compilation, first touch)
            for name, sym, fold, dot in cases:
                xr = xb if dot else x
                for temp, plans in (("cold", cold), ("hot", hot)):
                    t = time.perf_counter()
                    for pl in plans:
                        gemv.run_plan(pl[sym], xr.ctypes.data, 0, out.ctypes.data, 0, fold, dot)
                    if r:
                        times.setdefault((name, temp), []).append((time.perf_counter() - t) / len(plans) * 1e3)
        cells = []
        for (name, temp), v in times.items():
            cells.append(f"{name} {temp} {min(v):.3f}/{statistics.median(v):.3f} ({codes / min(v) / 1e6:.1f})")
        print(f"{n}x{k}: " + " | ".join(cells))
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
