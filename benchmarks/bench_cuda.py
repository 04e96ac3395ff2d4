"""Quantized Linear layers on a CUDA device against nn.Linear of the same dtype: ratio = dense / quantized time.

    python benchmarks/bench_cuda.py                        # K = N = 4096, rows 1/16/128/2048, bf16 and f16
    python benchmarks/bench_cuda.py --rows 1 --dtypes bfloat16 --no-compile

On a GPU the layers keep the canonical layout and their forward is plain torch ops (unpack, dequantize, matmul),
so eager mode materialises the dense weight on every call and compiled mode (``qtorch.compile``: inductor's
Triton code, CUDA graphs) is where fusion can pay. Times come from CUDA events around ``--reps`` calls after
warm-up, median of 5 such rounds; the first line names the GPU and torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qtorch  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gpu_ms(fn, x, reps: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean milliseconds of one call, ``reps`` calls per round."""
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        torch.cuda.synchronize()
        out = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn(x)
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / reps)
    return statistics.median(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128, 2048])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=list(DTYPES))
    p.add_argument("--layers", nargs="+", default=["W8A16Linear", "W4A16Linear"])
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--no-autotune", action="store_true", help="compile without max-autotune (faster to build)")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print(f"gpu: {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")
    print(f"K={args.k} N={args.n}; ratio = dense ms / quantized ms (median of rounds)")
    lines = ["| layer | dtype | mode | " + " | ".join(f"rows={r}" for r in args.rows) + " |",
             "|" + "---|" * (3 + len(args.rows))]
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    for dname in args.dtypes:
        dt = DTYPES[dname]
        dense = nn.Linear(args.k, args.n, dtype=dt, device="cuda").eval()
        for lname in args.layers:
            quant = getattr(qtorch, lname).from_linear(dense).eval()
            for mode in modes:
                cells = []
                for r in args.rows:
                    x = torch.randn(r, args.k, dtype=dt, device="cuda")
                    fd, fq = dense, quant
                    if mode == "compiled":
                        torch._dynamo.reset()
                        at = not args.no_autotune
                        fd, fq = qtorch.compile(dense, autotune=at), qtorch.compile(quant, rows=r, autotune=at)
                    td, tq = gpu_ms(fd, x, args.reps), gpu_ms(fq, x, args.reps)
                    cells.append(f"{td / tq:.2f}x ({td * 1e3:.0f}/{tq * 1e3:.0f} us)")
                    print(f"  {lname:12s} {dname:9s} {mode:8s} rows={r:5d}: dense {td * 1e3:8.1f} us  "
                          f"quantized {tq * 1e3:8.1f} us  ratio {td / tq:5.2f}x", flush=True)
                lines.append(f"| {lname} | {dname} | {mode} | " + " | ".join(cells) + " |")
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
