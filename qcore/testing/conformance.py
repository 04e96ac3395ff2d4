"""Run every promised check under Hypothesis and keep the smallest counterexample it finds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as seed_decorator

from .checks import CHECKS, Packer
from .promises import PROMISES, Quantizer

_PACKING = ("packing", "bit_order")


@dataclass(frozen=True)
class Result:
    """One promise of one quantizer: ``promised`` False means not checked; ``counterexample`` is the smallest
    failing input Hypothesis found, ``message`` what broke on it."""

    promised: bool
    passed: Optional[bool] = None
    message: str = ""
    counterexample: str = ""


def describe(case) -> str:
    """A short, exact text of a check's input (arrays printed in full up to 64 values)."""
    parts = []
    for item in case if isinstance(case, tuple) else (case,):
        if isinstance(item, np.ndarray):
            text = np.array2string(item.ravel(), separator=", ", threshold=64, edgeitems=4, floatmode="unique",
                                   max_line_width=10**6)
            parts.append(f"{item.dtype} {item.shape} {text}")
        else:
            parts.append(str(item))
    return "; ".join(parts)


def run_check(name: str, subject, max_examples: int = 60, seed: int = 0, shrink: bool = True) -> Result:
    """Run one check on ``subject`` (a :class:`Quantizer`, or a :class:`Packer` for the packing promises).

    ``seed=0`` draws the same examples on every run; ``shrink=False`` reports the first failing input found
    instead of searching for the smallest one (faster, for a quick pass/fail)."""
    strategy_for, check = CHECKS[name]
    last = {}

    phases = [p for p in Phase if shrink or p is not Phase.shrink]
    if seed:
        prop_seed = seed_decorator(seed)
    else:
        prop_seed = lambda f: f  # noqa: E731

    @prop_seed
    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=seed == 0, phases=phases,
              suppress_health_check=list(HealthCheck), print_blob=False, report_multiple_bugs=False)
    @given(strategy_for(subject))
    def prop(case):
        last["case"] = case  # Hypothesis replays the shrunk example last: this ends as the smallest one
        check(subject, case)

    try:
        prop()
    except Exception as e:  # noqa: BLE001 - a crash of the library under test is a failure like any other
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, AssertionError):
            msg = f"{type(e).__name__}: {msg}"
        return Result(True, False, msg, describe(last["case"]) if "case" in last else "")
    return Result(True, True)


def run_conformance(quantizer: Optional[Quantizer] = None, packer: Optional[Packer] = None, max_examples: int = 60,
                    only=None, promises=None) -> dict:
    """``{promise: Result}`` for every promise (in :data:`PROMISES` order); only promised ones are run.

    The packing promises need ``packer``; the others ``quantizer``. ``only`` restricts to some promise names.
    """
    promises = promises if promises is not None else quantizer.promises
    unknown = [n for n in (only or ()) if n not in PROMISES]
    if unknown:
        raise ValueError(f"unknown promise(s) {unknown}; known: {list(PROMISES)}")
    out = {}
    for name in PROMISES:
        if only is not None and name not in only:
            continue
        subject = packer if name in _PACKING else quantizer
        if not promises.made(name) or subject is None:
            out[name] = Result(False)
        else:
            out[name] = run_check(name, subject, max_examples)
    return out


def conformance_table(results: dict) -> str:
    """A Markdown table, promise by library, from ``{library: {promise: Result}}``; failures are numbered and
    their counterexamples listed under the table."""
    libs = list(results)
    names = [n for n in PROMISES if any(n in r for r in results.values())]
    lines = ["| promise | " + " | ".join(libs) + " |", "| --- |" + " --- |" * len(libs)]
    notes = []
    for name in names:
        cells = []
        for lib in libs:
            r = results[lib].get(name)
            if r is None or not r.promised:
                cells.append("not promised")
            elif r.passed:
                cells.append("passed")
            else:
                notes.append(f"[{len(notes) + 1}] {lib}, {name}: {r.message}\n    input: {r.counterexample}")
                cells.append(f"FAILED [{len(notes)}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"
