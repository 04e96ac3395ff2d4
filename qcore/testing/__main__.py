"""``python -m qcore.testing --against qcore,gguf``: the conformance table, promise by library (the torch-based
peers: ``python -m qtorch.conformance --against qcore,torchao,quanto,hqq,gguf``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import adapters
from .conformance import conformance_table, run_conformance


def main(argv=None, libraries=None, prog: str = "python -m qcore.testing") -> int:
    """The command; ``libraries`` (name -> (module, adapter factory)) defaults to qcore's own (qcore, gguf):
    ``python -m qtorch.conformance`` adds the torch-based peers."""
    libraries = adapters.LIBRARIES if libraries is None else libraries
    p = argparse.ArgumentParser(prog=prog, description="The conformance table of qcore.testing's promises, promise "
                                "by library: which of the numeric promises each quantizer keeps.")
    p.add_argument("--against", default="qcore,gguf", help="comma-separated libraries, from "
                   f"{','.join(libraries)}; those not installed are reported and skipped")
    p.add_argument("--max-examples", type=int, default=100, help="Hypothesis examples per promise (default 100)")
    p.add_argument("--only", default=None, help="comma-separated promise names to run")
    p.add_argument("--ordinary", action="store_true", help="only ordinary magnitudes (1e-3 to 1e4) for every "
                   "library, instead of each one's own range (subnormals to 3e38 unless it declares less)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.against.split(",") if n.strip()]
    unknown = [n for n in names if n not in libraries]
    if unknown:
        torchy = [n for n in unknown if n in adapters.TORCH_PEERS]
        hint = f" ({', '.join(torchy)}: python -m qtorch.conformance)" if torchy else ""
        p.error(f"unknown library {unknown}; known: {', '.join(libraries)}{hint}")
    if args.max_examples < 1:
        p.error(f"--max-examples must be >= 1, got {args.max_examples}")
    only = None if args.only is None else [n.strip() for n in args.only.split(",")]
    results = {}
    for name in names:
        if not adapters.installed(name, libraries):
            print(f"{name}: not installed, skipped", file=sys.stderr)
            continue
        try:
            quantizers = libraries[name][1]()
        except ImportError as e:
            print(f"{name}: cannot be imported ({e}), skipped", file=sys.stderr)
            continue
        for qz in quantizers:
            if args.ordinary:
                qz = dataclasses.replace(qz, magnitudes=adapters.ORDINARY_MAGNITUDES)
            print(f"checking {qz.name} ...", file=sys.stderr, flush=True)
            packer = adapters.qcore_packer() if name == "qcore" else None
            try:
                results[qz.name] = run_conformance(qz, packer, args.max_examples, only=only)
            except ValueError as e:
                p.error(str(e))
    if not results:
        print("no library to check", file=sys.stderr)
        return 2
    print(conformance_table(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
