"""Quantized Linear layers against nn.Linear of the same dtype: ratio = dense time / quantized time (> 1: faster).

    python benchmarks/bench_linear.py                       # K = N = 4096, rows 1/16/128, f32/bf16/f16, eager+compiled
    python benchmarks/bench_linear.py --no-compile --dtypes bfloat16 --rows 1 128
    python benchmarks/bench_linear.py --cold --dtypes bfloat16   # weights from memory at every call (decoding)

Eager is compared with eager, and compiled (``qtorch.compile``: inductor, freezing, max-autotune) with the dense
layer compiled the same way, once per cell with ``rows=`` that cell's rows (the layout a compiled layer holds is
chosen for the rows it will run; the per-cell line prints the compile time, layout probes included, and the end
the probes' timings). Dense and quantized calls alternate inside every round (the machine is shared and noisy, so
both see the same conditions). The table reports best-of-N times (the usual estimator of the uncontended time on a
shared machine, as ``timeit`` recommends); the per-cell lines also print the medians.
Warm (the default) or cold: two alternating layers of 4096 x 4096 (a 32 MB bfloat16 weight, 16 MB of 8-bit codes)
share a last-level cache of about their size, which keeps part of each between calls, and the larger dense weight
gains the most. ``--cold`` reads twice that cache's size before every timed call (untimed), so that every call
reads its weights from memory, as each layer of a model larger than the cache does when it decodes; the Python
of a call then runs from cold caches too (a model's big layers evict it as well).
Threads: torch's default (numba uses as many). The first line names the machine (CPU model, ISA flags, torch's
CPU capability); every cell names the path the quantized layer took, ``layout/kernel`` (see ``_layers.py``):
the layout its weight is held in and the kernel kept for that row count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qtorch  # noqa: E402
from qtorch.autotune import last_level_cache  # noqa: E402
from qtorch.compile import TEMPLATE_LAYOUTS, compile as qcompile, probe_dispatcher  # noqa: E402
from _layers import layer_path, prefetch_line  # noqa: E402
from _machine import machine_line  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_LLC: list = []


def read_past_cache() -> None:
    """Read a buffer twice the last-level cache's size (64-512 MB), untimed: the next call then reads its weights
    from memory, as each layer of a model larger than the cache does. Reading, not writing: no dirty lines are
    left to write back during the timed call (the previous layers of a model only read theirs)."""
    if not _LLC:
        llc = last_level_cache()
        _LLC.append(torch.ones(min(max(2 * llc, 64 << 20), 512 << 20) // 8, dtype=torch.int64))
    _LLC[0].sum()


def _time(fn, x, cold: bool = False) -> float:
    if cold:
        read_past_cache()
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def paired_times(dense, quant, x, budget_s: float, min_reps: int = 7, max_reps: int = 80, warmup_s: float = 0.5,
                 cold: bool = False):
    """(best, median) seconds of dense(x) and of quant(x), measured alternately after warm-up; ``cold``: each
    timed call after :func:`read_past_cache`."""
    with torch.no_grad():
        t_end = time.perf_counter() + warmup_s  # compiled code settles only after some calls (workers, caches)
        n = 0
        while n < 3 or time.perf_counter() < t_end:
            dense(x)
            quant(x)
            n += 1
        est = _time(dense, x) + _time(quant, x) + (_time(lambda _: read_past_cache(), None) if cold else 0.0)
        reps = int(min(max_reps, max(min_reps, budget_s / max(est, 1e-6))))
        td, tq = [], []
        for _ in range(reps):
            td.append(_time(dense, x, cold))
            tq.append(_time(quant, x, cold))
    return (min(td), statistics.median(td)), (min(tq), statistics.median(tq))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"], choices=list(DTYPES))
    p.add_argument("--layers", nargs="+", default=["W8A16Linear", "W4A16Linear"])
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per cell (default 1.0)")
    p.add_argument("--cold", action="store_true",
                   help="read past the last-level cache before every timed call: weights come from memory, as in "
                        "a model larger than the cache (default: dense and quantized calls only alternate)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    k, n = args.k, args.n
    print(machine_line())
    print(f"K={k} N={n}; ratio = dense ms / quantized ms (best of N), then the quantized layer's path; "
          + ("cold: every timed call reads its weights from memory" if args.cold else
             "warm: dense and quantized calls alternate (what the last-level cache keeps of a weight between them "
             "is read from there)"))
    header = "| layer | dtype | mode | " + " | ".join(f"rows={r}" for r in args.rows) + " |"
    lines = [header, "|" + "---|" * (3 + len(args.rows))]
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    for dname in args.dtypes:
        dt = DTYPES[dname]
        dense = nn.Linear(k, n, bias=True, dtype=dt).eval()
        for lname in args.layers:
            quant = getattr(qtorch, lname).from_linear(dense).eval()
            for mode in modes:
                cells = []
                for r in args.rows:
                    x = torch.randn(r, k, dtype=dt)
                    fd, fq, built = dense, quant, ""
                    if mode == "compiled":
                        torch._dynamo.reset()
                        t0 = time.perf_counter()
                        fd = qcompile(dense)
                        with torch.no_grad():
                            fd(x)
                        t1 = time.perf_counter()
                        fq = qcompile(quant, rows=r)
                        with torch.no_grad():  # the first call chooses the layout for r rows (probes),
                            fq(x)              # the second compiles
                            fq(x)
                        t2 = time.perf_counter()
                        built = f" | compile dense {t1 - t0:.1f} s, quantized {t2 - t1:.1f} s"
                    (td, tdm), (tq, tqm) = paired_times(fd, fq, x, args.budget, cold=args.cold)
                    path = layer_path(quant, dt, r)
                    lay = quant.quantized_weight.layout.name
                    if mode == "compiled" and lay in TEMPLATE_LAYOUTS and dt == torch.bfloat16:
                        path = f"{lay}/inductor"  # its op in the graph: inductor's template or the ATen kernel
                    cells.append(f"{td / tq:.2f}x ({td * 1e3:.2f}/{tq * 1e3:.2f} ms) {path}")
                    print(f"  {lname:12s} {dname:9s} {mode:8s} rows={r:4d}: best dense {td * 1e3:8.2f} ms  "
                          f"quantized {tq * 1e3:8.2f} ms  ratio {td / tq:5.2f}x | median {tdm * 1e3:8.2f} / "
                          f"{tqm * 1e3:8.2f} ms  ratio {tdm / tqm:5.2f}x | {path}{built}", flush=True)
                lines.append(f"| {lname} | {dname} | {mode} | " + " | ".join(cells) + " |")
    print()
    print("\n".join(lines))
    line = prefetch_line()
    if line:
        print(line)
    probes = {k: v for k, v in probe_dispatcher().decisions().items() if "|compiled-" in k}
    if probes:  # the compiled layout decisions: best ms of each candidate's compiled probe per row count
        print("\ncompiled layout decisions (probe ms per layout@rows):")
        for k, v in sorted(probes.items()):
            print(f"  {k}: {v['path']}  {v.get('ms')}{'  (busy)' if v.get('busy') else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
