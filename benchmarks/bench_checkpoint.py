"""Benchmark `qcore quantize` streaming a synthetic bf16 checkpoint of 2 GiB (2.1 GB) in several shards.

The checkpoint (shaped like a 7B-class decoder: 4096 hidden, 11008 MLP, 32000 vocabulary) is written with
qcore's streaming writer into a temporary folder, removed afterwards. Each configuration runs
`python -m qcore quantize` in a child process, whose peak RSS is read with RUSAGE_CHILDREN in a small
wrapper process between us and it (Linux keeps a process's peak RSS across fork and exec, so a direct child
would report this process's peak). Baselines in the same run, on the same warm page cache:

* copy:  `qcore quantize --include <nothing>`: the same streaming path copying every tensor unchanged
         (read, write, fsync): the I/O floor of the command
* cp:    ``shutil.copyfile`` of every shard, then fsync of each (the file system's own copy, made as durable
         as qcore's output, which is fsynced before it is renamed)

Throughput is input bytes / wall seconds of the child (including interpreter start and imports). Sizes and
rates are printed in binary units (MiB, GiB, GiB/s), as the qcore and qtorch commands print them.
The RSS budget of issue 6 is 3 x the largest tensor + 300 MB (10^6 bytes; printed in MiB).

Run:  python benchmarks/bench_checkpoint.py [--layers 4] [--repeats 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from qcore import checkpoint as ck
from _machine import machine_line

HIDDEN, MLP, VOCAB = 4096, 11008, 32000
MIB, GIB = 2**20, 2**30


def layer_tensors(i: int) -> list:
    p = f"model.layers.{i}"
    out = [(f"{p}.input_layernorm.weight", (HIDDEN,)), (f"{p}.post_attention_layernorm.weight", (HIDDEN,))]
    out += [(f"{p}.self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
    out += [(f"{p}.mlp.gate_proj.weight", (MLP, HIDDEN)), (f"{p}.mlp.up_proj.weight", (MLP, HIDDEN)),
            (f"{p}.mlp.down_proj.weight", (HIDDEN, MLP))]
    return out


def write_checkpoint(folder: str, layers: int) -> dict:
    """Shards: embeddings; one per layer; final norm + lm_head. Random bf16 rows (a fixed random block per
    column count, scaled per piece, with a share of outlier columns that differs per tensor), written piece by
    piece with qcore's streaming writer."""
    rng = np.random.default_rng(0)
    shards = [[("model.embed_tokens.weight", (VOCAB, HIDDEN))]]
    shards += [layer_tensors(i) for i in range(layers)]
    shards += [[("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]]
    blocks: dict = {}
    weight_map = {}
    n = len(shards)
    for s, shard in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        entries = [(name, ml_dtypes.bfloat16, shape) for name, shape in shard]
        with ck.SafetensorsWriter(os.path.join(folder, fname), entries, {"format": "pt"}) as w:
            for name, shape in shard:
                cols = shape[-1]
                if cols not in blocks:
                    blocks[cols] = (rng.standard_normal((256, cols)) * 0.02).astype(np.float32)
                rows = shape[0] if len(shape) == 2 else 1
                # outlier columns (a different share per tensor) so that tensors differ in SQNR
                gain = np.where(rng.random(cols) < 0.002 * (len(weight_map) % 7), 8.0, 1.0).astype(np.float32)
                for r0 in range(0, rows, 256):
                    piece = blocks[cols][:min(256, rows - r0)] * (gain * np.float32(1 + 0.001 * r0))
                    w.write(name, piece.reshape(-1)[:int(np.prod(shape))].astype(ml_dtypes.bfloat16))
                weight_map[name] = fname
    with open(os.path.join(folder, ck.INDEX_NAME), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    sizes = [int(np.prod(shape)) * 2 for shard in shards for _, shape in shard]
    return {"bytes": sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)),
            "shards": n, "largest": max(sizes)}


_WRAPPER = """
import os, resource, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run([sys.executable, "-m", "qcore", "quantize", *sys.argv[1:]], capture_output=True, text=True)
wall = time.perf_counter() - t0
sys.stderr.write(r.stderr)
sys.stdout.write(f"{r.returncode} {wall} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}\\n")
sys.stdout.write(r.stdout)
"""


def run_child(args: list) -> tuple:
    """(wall seconds, peak RSS bytes, stdout) of `python -m qcore quantize ARGS` in a child process.

    The child is started by a small wrapper process that reads RUSAGE_CHILDREN: Linux carries a process's
    peak RSS across fork and exec, so a direct child of this (larger) process would report our own peak.
    """
    r = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True)
    first, _, out = r.stdout.partition("\n")
    rc, wall, peak = first.split()
    if int(rc) != 0 or r.returncode != 0:
        raise SystemExit(f"qcore quantize {' '.join(args)} failed ({rc}):\n{r.stderr}")
    return float(wall), int(peak), out


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (386 MiB each; default 4 -> 2.0 GiB)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration (median reported)")
    ap.add_argument("--dir", default=None, help="where to put the temporary checkpoint (default: system temp)")
    args = ap.parse_args()

    print(machine_line())
    base = tempfile.mkdtemp(prefix="qcore-bench-ckpt-", dir=args.dir)
    try:
        src = os.path.join(base, "in")
        os.mkdir(src)
        t0 = time.perf_counter()
        info = write_checkpoint(src, args.layers)
        t_write = time.perf_counter() - t0
        gib = info["bytes"] / GIB
        budget = 3 * info["largest"] + 300e6
        print(f"checkpoint: {gib:.2f} GiB bf16 in {info['shards']} shards, largest tensor "
              f"{info['largest'] / MIB:.0f} MiB; written by qcore's streaming writer in {t_write:.1f} s "
              f"({gib / t_write:.2f} GiB/s)")
        print(f"RSS budget (3 x largest + 300 MB): {budget / MIB:.0f} MiB;  {os.cpu_count()} CPUs, warm page cache")

        # warm-up: numba caches, imports
        warm = os.path.join(base, "warm")
        os.mkdir(warm)
        ck.save(os.path.join(warm, "model.safetensors"),
                {"a.weight": np.ones((256, 256), ml_dtypes.bfloat16)})
        for extra in (["--bits", "8"], ["--bits", "4", "--group-size", "128"]):
            run_child([warm, os.path.join(base, "warm-out"), "--overwrite", "-q", *extra])

        def cp_fsync() -> float:
            """shutil.copyfile of every file, then fsync of each: the durability qcore quantize gives."""
            dst = os.path.join(base, "cp")
            os.makedirs(dst)
            t0 = time.perf_counter()
            for f in os.listdir(src):
                shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
                fd = os.open(os.path.join(dst, f), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            t = time.perf_counter() - t0
            shutil.rmtree(dst)
            return t

        configs = [
            ("qcore copy (none quantized)", ["--include", "no.such.tensor"]),
            ("int8 per-channel", ["--bits", "8"]),
            ("int4 asym group 128", ["--bits", "4", "--asymmetric", "--group-size", "128"]),
        ]
        cp_times: list = []
        runs: dict = {label: [] for label, _ in configs}
        out_bytes: dict = {}
        summary = ""
        for _ in range(args.repeats):  # interleaved, so that noise from other processes hits all alike
            cp_times.append(cp_fsync())
            for label, extra in configs:
                out = os.path.join(base, "out")
                wall, peak, summary = run_child([src, out, "--overwrite", *extra])
                out_bytes[label] = folder_bytes(out)
                runs[label].append((wall, peak))
                shutil.rmtree(out)
        t_cp = statistics.median(cp_times)
        rows = [(label, statistics.median(w for w, _ in runs[label]), max(p for _, p in runs[label]),
                 out_bytes[label], summary) for label, _ in configs]
        t_copy = rows[0][1]

        print()
        print(f"{'configuration':<28} {'seconds':>8} {'GiB/s':>6} {'vs copy':>8} {'vs cp':>6} {'peak RSS':>10} "
              f"{'budget':>8} {'output':>10}")
        print(f"{'cp + fsync':<28} {t_cp:8.1f} {gib / t_cp:6.2f} {'':>8} {1.0:6.2f} {'':>10} {'':>8} "
              f"{gib:6.2f} GiB")
        for label, wall, peak, out_bytes, _ in rows:
            print(f"{label:<28} {wall:8.1f} {gib / wall:6.2f} {t_copy / wall:8.2f} {t_cp / wall:6.2f} "
                  f"{peak / MIB:6.0f} MiB {budget / MIB:4.0f} MiB {out_bytes / GIB:6.2f} GiB")
        print()
        print("summary printed by the last int4 run:")
        print(rows[-1][4].rstrip())
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
