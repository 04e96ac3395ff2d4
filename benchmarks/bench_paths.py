"""Forward paths of one quantized layer against dense ``F.linear``: ratio = dense ms / path ms (> 1: faster).

    python benchmarks/bench_paths.py                        # K = N = 4096, rows 1/16/128, bf16 + f32, W8 + W4
    python benchmarks/bench_paths.py --rows 128 --dtypes bfloat16 --reps 30 --threads 1
    python benchmarks/bench_paths.py --layers W8A16Linear --dtypes float32 --rows 128 --n 4100   # canonical layout

Paths per cell (eager, no autograd):

* ``off``: the ``qtorch.W8A16Linear`` / ``W4A16Linear`` (``from_linear``) forward with ``QTORCH_AUTOTUNE=0`` (each
  layout's own path);
* ``on``: the same layer measuring its paths (a fresh in-memory dispatcher, no file): the path it kept is printed;
* ``dequant_mm``: :func:`qtorch.dequant_mm.dequant_linear` on the canonical state (blocks of output rows
  dequantized into the activation dtype, then ``F.linear``: oneDNN/AMX in bfloat16 where the CPU has it);
* ``int8pack``: ``torch._weight_int8pack_mm`` (W8, symmetric per channel; preconditions checked);
* ``int4pack``: ``torch._weight_int4pack_mm_for_cpu`` (W4 in groups of 32..256, bfloat16 only);
* ``amx``: the blocked layout's AMX path (:mod:`qtorch.amx`) on a blocked copy of the weight, where the CPU has
  AMX-BF16 and the shape is one it serves.

Every path of a cell and the dense layer run in turn inside each repetition (the machine may be shared: all see
the same conditions, but each path pays for the caches the one before it left: ``on`` runs right after ``off``);
the table shows medians, the per-cell lines also the best. ``on kept`` is the path the measuring layer kept for the
cell's row bucket (``-``: its layout has a single path); ``tuned`` is what :class:`qtorch.autotune.Dispatcher`
picks among all the columns, measured in the same process. The first line names the
machine (CPU model, ISA flags, torch's CPU capability), so that a table from one machine is never taken for
another's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qtorch  # noqa: E402
from qtorch import amx, autotune  # noqa: E402
from qtorch.layouts.blocked import amx_blocked_impl, blocked_tile, to_blocked  # noqa: E402
from qtorch.layouts.codec import complete_groups, pad_columns, padded_k, unpack_codes  # noqa: E402
from qtorch.layouts.int4pack import INT4PACK_GROUPS, to_int4pack  # noqa: E402
from qtorch.layouts.int8pack import int8pack_ok  # noqa: E402
from qtorch.dequant_mm import WeightSpec, dequant_linear  # noqa: E402
from _machine import machine_line  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _with_dispatcher(layer, env, routes):
    """``layer(x)`` with ``qtorch.autotune``'s process dispatcher replaced by one reading ``env`` (no file) and the
    layer's kept paths by ``routes``: "off" and "on" run the same weight (a copy would sit elsewhere in cache)."""
    d = autotune.Dispatcher(cache_path=False, env=env)

    def run(x):
        w = layer.quantized_weight
        saved = autotune._DEFAULT, w._routes
        autotune._DEFAULT, w._routes = d, routes
        try:
            return layer(x)
        finally:
            autotune._DEFAULT, w._routes = saved
    return run


def _kept(layer, routes, dtype, rows) -> str:
    """The path kept for CPU calls of ``rows`` rows in ``dtype`` (``-`` when the layout has no choice), named by
    what runs: a layout keeps its own path under the name ``path()`` gives it (int8pack's reads "dense")."""
    kept = routes.get(("cpu", dtype, autotune.bucket_index(rows)))
    if kept is None:
        return "-"
    lay, bits = layer.quantized_weight.layout, layer.scheme.bits
    return lay.paths("cpu", dtype, rows, bits)[0] if kept == lay.path("cpu", dtype, rows, bits) else kept


def _paths(layer, on_routes, dtype, x_rows):
    """name -> callable(x) of every eligible path of ``layer`` (canonical state taken from its state_dict)."""
    state = layer.state_dict()
    q, s, z = state["qweight"], state["scale"], state.get("zero_point")
    n, k = layer.out_features, layer.in_features
    spec = WeightSpec.from_scheme(layer.scheme, n, k)
    paths = {"off": _with_dispatcher(layer, {"QTORCH_AUTOTUNE": "0"}, {}),
             "on": _with_dispatcher(layer, {}, on_routes),
             "dequant_mm": lambda x: dequant_linear(x, q, s, z, spec)}
    sc = layer.scheme
    if (sc.bits == 8 and sc.symmetric and spec.kind == "channel" and spec.axis == 0
            and int8pack_ok(dtype, k)):
        s_dt = s.to(dtype)
        paths["int8pack"] = lambda x: torch._weight_int8pack_mm(x, q, s_dt)
    if (dtype == torch.bfloat16 and sc.bits == 4 and spec.kind == "group" and spec.axis == 1
            and spec.group in INT4PACK_GROUPS and n % 16 == 0):
        # a ragged last group completed as the layout completes it (codes at the zero point, x padded with zeros)
        kp = padded_k(k, spec.kind, spec.group)
        packed = to_int4pack(complete_groups(unpack_codes(q, 4, k), z, kp, 8), s, z, symmetric=sc.symmetric,
                             group=spec.group)
        if packed is not None:
            p, sz = packed
            paths["int4pack"] = lambda x: torch._weight_int4pack_mm_for_cpu(pad_columns(x, kp), p, spec.group, sz)
    tile = blocked_tile(n)
    group = spec.group if spec.kind == "group" else k
    if (amx.available() and tile and sc.bits in (4, 8) and amx.eligible(padded_k(k, spec.kind, group), group)
            and (spec.kind != "group" or spec.axis == 1) and (spec.kind != "channel" or spec.axis == 0)):
        wb, sb, zb = to_blocked(q, s, z, bits=sc.bits, symmetric=sc.symmetric, kind=spec.kind, group=group,
                                out_features=n, in_features=k, tile=tile)
        # a ragged last group is completed in the copy (codes at the zero point): x padded with zeros to match, as
        # the layout pads it
        paths["amx"] = lambda x: amx_blocked_impl(pad_columns(x, wb.shape[1]), wb, sb, zb, group, sc.bits, n)
    return paths


def _time(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    p.add_argument("--layers", nargs="+", default=["W8A16Linear", "W4A16Linear"])
    p.add_argument("--reps", type=int, default=15, help="timed repetitions per cell (default 15)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    k, n = args.k, args.n
    print(machine_line())
    print(f"K={k} N={n}; ratio = dense median ms / path median ms; each repetition runs dense and every path in turn")
    tuner = autotune.Dispatcher(cache_path=False, env={})
    names = ["off", "on", "dequant_mm", "int8pack", "int4pack", "amx"]
    lines = ["| layer | N | dtype | rows | dense ms | " + " | ".join(names) + " | on kept | tuned |",
             "|" + "---|" * (7 + len(names))]
    with torch.no_grad():
        for dname in args.dtypes:
            dt = DTYPES[dname]
            dense = torch.nn.Linear(k, n, bias=False, dtype=dt).eval()
            for lname in args.layers:
                layer = getattr(qtorch, lname).from_linear(dense).eval()
                on_routes = {}  # the paths the "on" layer measured and kept
                for r in args.rows:
                    x = torch.randn(r, k, dtype=dt)
                    paths = _paths(layer, on_routes, dt, r)
                    ref = F.linear(x.float(), layer.dequantized_weight(torch.float32))
                    for name, fn in paths.items():  # warm-up and a correctness check of every path
                        err = (fn(x).float() - ref).abs().max().item() / max(1e-6, ref.abs().max().item())
                        if err > (2e-2 if dt == torch.bfloat16 else 1e-4):
                            raise SystemExit(f"{lname} {dname} rows={r}: path {name} is off by {err:.2e} (relative)")
                    dense(x)
                    times = {"dense": []}
                    times.update({name: [] for name in paths})
                    for _ in range(args.reps):
                        times["dense"].append(_time(dense, x))
                        for name, fn in paths.items():
                            times[name].append(_time(fn, x))
                    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                    best = {name: min(t) * 1e3 for name, t in times.items()}
                    key = autotune.DispatchKey.make(n, k, f"{lname}", dt, rows=r)
                    tuned = tuner.choose(key, {name: (lambda fn=fn: fn(x)) for name, fn in paths.items()})
                    cells = [f"{med['dense'] / med[name]:.2f}x ({med[name]:.2f})" if name in med else "-"
                             for name in names]
                    kept = _kept(layer, on_routes, dt, r)
                    lines.append(f"| {lname} | {n} | {dname} | {r} | {med['dense']:.2f} | " + " | ".join(cells)
                                 + f" | {kept} | {tuned} |")
                    print(f"  {lname:11s} {dname:8s} rows={r:4d} layout={layer.quantized_weight.layout.name:9s} "
                          + "  ".join(f"{name} {med[name]:.2f}/{best[name]:.2f}" for name in med)
                          + f" ms (median/best)  on kept: {kept}  tuned: {tuned}", flush=True)
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
