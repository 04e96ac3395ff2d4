"""A model's call time by how deep the caller stands, with and without qtorch's frame-stack chunk cache.

    python benchmarks/bench_call_depth.py                     # 100 one-row layers 64 wide, bfloat16
    python benchmarks/bench_call_depth.py --width 576 --layers 30 --depths 48

On CPython 3.11 and 3.12 a call whose frame falls just past the end of the thread's frame-stack chunk maps a new
chunk and unmaps it as it returns (``qtorch._stack_cache``). Which calls do depends on the stack depth of the caller,
so the same model is fast from one script and slow from another. Here a model of ``--layers`` square Linear layers
(dense, and ``w8a16`` on the ``blocked`` layout, whose one-row calls run Python around their kernels) is called
with one row from ``0..--depths-1`` extra Python frames, eagerly and through ``torch.compile``, with the cache
installed and removed in turn (``qtorch._stack_cache.install`` / ``uninstall``, in the same process: the passes
alternate, and each depth keeps its best median of ``--calls`` calls over ``--passes`` passes). Printed per model,
mode and cache: the best, median and worst depth (ms a call) and how many depths run 1.3x or more slower than the
best depth of the row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qtorch  # noqa: E402
from qtorch import _stack_cache  # noqa: E402
from _machine import machine_line  # noqa: E402


def _nested(k: int, fn):
    return fn() if k == 0 else _nested(k - 1, fn)


def _sweep(fn, depths: int, calls: int) -> list:
    out = []
    for k in range(depths):
        ts = []
        for _ in range(calls):
            t = time.perf_counter()
            _nested(k, fn)
            ts.append(time.perf_counter() - t)
        out.append(statistics.median(ts) * 1e3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--depths", type=int, default=40)
    p.add_argument("--calls", type=int, default=15)
    p.add_argument("--passes", type=int, default=3)
    a = p.parse_args(argv)
    if not _stack_cache.applicable():
        print(f"this interpreter ({sys.version.split()[0]}) has no chunk-edge cost to remove, or "
              f"{_stack_cache.ENV}=0: nothing to compare")
        return 0
    os.environ.setdefault("QTORCH_LAYOUT", "blocked")  # (read as the layers are made)
    print(machine_line())
    print(f"python {sys.version.split()[0]}; {a.layers} layers {a.width} x {a.width}, bfloat16, one row; "
          f"depths 0..{a.depths - 1}, best of {a.passes} passes of {a.calls} calls")
    torch.manual_seed(0)
    x = torch.randn(1, a.width, dtype=torch.bfloat16)
    models = {}
    for name in ("dense", "w8a16"):
        m = torch.nn.Sequential(*[torch.nn.Linear(a.width, a.width) for _ in range(a.layers)]).to(torch.bfloat16)
        if name != "dense":
            qtorch.quantize_model(m, name, exclude=())
        models[name] = m.eval()
    runs = {}
    with torch.no_grad():
        for name, m in models.items():
            c = torch.compile(m)
            runs[(name, "eager")] = lambda m=m: m(x)
            runs[(name, "compiled")] = lambda c=c: c(x)
        for fn in runs.values():  # compile, measure layouts, warm up
            for _ in range(5):
                fn()
        best = {(key, on): [float("inf")] * a.depths for key in runs for on in (True, False)}
        for _ in range(a.passes):
            for on in (False, True):
                (_stack_cache.install if on else _stack_cache.uninstall)()
                for key, fn in runs.items():
                    best[(key, on)] = [min(b, t) for b, t in zip(best[(key, on)], _sweep(fn, a.depths, a.calls))]
        _stack_cache.install()
    print()
    print("| model | mode | chunk cache | best depth ms | median ms | worst depth ms | depths >= 1.3x best |")
    print("|---|---|---|---|---|---|---|")
    for (name, mode), fn in runs.items():
        for on in (False, True):
            t = best[((name, mode), on)]
            slow = sum(v >= 1.3 * min(t) for v in t)
            print(f"| {name} | {mode} | {'on' if on else 'off'} | {min(t):.2f} | {statistics.median(t):.2f} | "
                  f"{max(t):.2f} | {slow} of {len(t)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
