"""The one header line every benchmark prints first: which CPU, which ISA extensions, which torch, how loaded.

A table is only meaningful with the machine it came from (an AVX2 EPYC and an AMX Xeon take different kernels),
so every script in ``benchmarks/`` starts with :func:`machine_line`::

    machine: AMD EPYC 7B13 | 2 cpus, load 0.4 | ISA avx2 no-avx512f no-avx512_bf16 no-amx_bf16 no-amx_int8 | ...

It never imports torch into the benchmark's process: qcore's kernels pick their thread team by whether torch is
loaded, so a qcore benchmark that imported torch here would measure something else. When torch is not loaded
yet, its version and capability come from a short child process.

>>> isa_summary({"fpu", "avx2", "avx512f", "amx_int8"})
'avx2 avx512f no-avx512_bf16 no-amx_bf16 amx_int8'
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

#: always named, present or not (``no-`` prefix), so that a table says what its CPU lacks
ISA_REQUIRED = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")
#: named only when present
ISA_EXTRA = ("avx512_fp16", "avx512_vnni", "amx_tile", "asimd", "sve")


def cpu_model_and_flags() -> tuple[str, set]:
    """(CPU model name, set of ISA flags) from ``/proc/cpuinfo``; elsewhere the platform's processor name and no
    flags."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("model name", "Model", "cpu model") and not model:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU", flags


def isa_summary(flags) -> str:
    """The required ISA names (absent ones as ``no-<name>``), then whichever extras ``flags`` holds."""
    flags = set(flags)
    return " ".join([f if f in flags else f"no-{f}" for f in ISA_REQUIRED] + [f for f in ISA_EXTRA if f in flags])


_CHILD = ("import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability(), "
          "torch.get_num_threads())")


def torch_summary() -> str:
    """``torch <version>, capability <AVX2|AVX512|...>, <n> threads``, or why it is unknown."""
    torch = sys.modules.get("torch")
    if torch is not None:
        ver, cap, threads = torch.__version__, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    else:
        try:
            out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"torch: not queried ({type(e).__name__})"
        if out.returncode != 0:
            return "torch: not installed"
        ver, cap, threads = out.stdout.split()
        threads = f"{threads} (in a fresh process)"
    return f"torch {ver}, capability {cap}, threads {threads}"


def machine_line() -> str:
    """One line: CPU model, usable CPUs and load average, ISA flags, torch version / capability / threads
    (``... | torch 2.13.0+cpu, capability AVX2, threads 2``)."""
    model, flags = cpu_model_and_flags()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    isa = isa_summary(flags) if flags else "unknown (no /proc/cpuinfo)"
    return f"machine: {model} | {cpus} cpus{load} | ISA {isa} | {torch_summary()}"


if __name__ == "__main__":
    print(machine_line())
