"""The AMX kernel (``qtorch.amx``) against dense nn.Linear, eager and compiled (``qtorch.compile``: inductor with
``compile_options()``, freezing + max-autotune, so the dense bf16 GEMM is inductor's AMX template), at K = N = 4096
by default.

    python benchmarks/bench_amx.py                      # W8 per-channel, W4 g128; bf16 and f32; 16 and 128 rows
    python benchmarks/bench_amx.py --dtypes bfloat16 --rows 16 --rounds 5

Ours is the ``amx`` path of the blocked layout called directly (``layouts.blocked.amx_blocked_impl``: the kernel
plus the output cast) on the layer's codes in that layout, so the figure is the kernel's, whatever layout and path
the layer's own measured choices would keep. The three calls
alternate inside every round (the machine is shared and noisy); each round reports best-of-N, and the table the
median over rounds of those bests. ratio = dense time / ours (> 1: ours faster).
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
from qtorch import amx  # noqa: E402
from qtorch.compile import compile as qcompile  # noqa: E402
from qtorch.layouts.blocked import BLOCKED, amx_blocked_impl  # noqa: E402
from qtorch.layouts.codec import unpack_codes  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYERS = {"W8": "W8A16Linear", "W4g128": "W4A16Linear"}  # W4A16Linear: groups of 128


def _amx_call(quant):
    """``x -> amx_blocked_impl(x, ...)`` on ``quant``'s codes in the blocked layout (converted if it holds another)."""
    spec = quant.quantized_weight.spec
    qweight, scale, zero_point = quant._canonical()
    codes = qweight if spec.bits == 8 else unpack_codes(qweight, spec.bits, spec.in_features)
    qb, sb, zb, _ = BLOCKED.from_codes(spec, codes, scale, zero_point)

    def call(x):
        return amx_blocked_impl(x, qb, sb, zb, spec.group, spec.bits, spec.out_features)
    return call


def _best(fns, x, reps):
    """Best-of-``reps`` seconds of each of ``fns``, called in turn."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn(x)
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rows", type=int, nargs="+", default=[16, 128])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--rounds", type=int, default=5, help="rounds of best-of-N (the table: their median)")
    p.add_argument("--reps", type=int, default=20, help="calls of each per round")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    if not amx.available():
        print("this process cannot use AMX tiles")
        return 1
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print(f"{os.uname().nodename}: load {os.getloadavg()[0]:.2f}, threads {torch.get_num_threads()}, "
          f"K={args.k} N={args.n}")
    rows_out = []
    for dname in args.dtypes:
        dt = DTYPES[dname]
        dense = nn.Linear(args.k, args.n, bias=False, dtype=dt).eval()
        compiled = None
        if not args.no_compile:
            torch._dynamo.reset()
            compiled = qcompile(dense)
        for lname in args.layers:
            cls = LAYERS[lname]
            quant = getattr(qtorch, cls).from_linear(dense).eval()
            ours = _amx_call(quant)
            for r in args.rows:
                x = torch.randn(r, args.k, dtype=dt)
                with torch.no_grad():
                    ref = torch.nn.functional.linear(x.float(), quant.dequantized_weight(torch.float32))
                    err = (ours(x).float() - ref).abs().max().item() / ref.abs().max().item()
                    fns = [dense, ours] + ([compiled] if compiled is not None else [])
                    _best(fns, x, 5)  # warm-up (compiles)
                    rounds = [_best(fns, x, args.reps) for _ in range(args.rounds)]
                med = [statistics.median(rd[i] for rd in rounds) * 1e3 for i in range(len(fns))]
                comp = (f"{med[2]:.3f}", f"{med[2] / med[1]:.2f}x") if compiled is not None else ("-", "-")
                line = (f"| {lname} | {dname} | {r} | {med[0]:.3f} | {comp[0]} | {med[1]:.3f} | "
                        f"{med[0] / med[1]:.2f}x | {comp[1]} | {err:.1e} |")
                print(line, f"load {os.getloadavg()[0]:.2f}", flush=True)
                rows_out.append(line)
    print("\n| layer | dtype | rows | eager dense ms | compiled dense ms | ours ms | vs eager | vs compiled | "
          "rel. err |\n|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows_out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
