"""`qcore quantize` killed with SIGKILL at random moments: no partial output ever loads, the input is never
touched, and the next run on the same OUTPUT succeeds and leaves nothing behind.

Seeded: ``QCORE_CRASH_SEED`` picks other moments (a failure names the seed, the kill and its moment).
"""

import hashlib
import json
import os
import random
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from qcore import checkpoint as ck

SEED = int(os.environ.get("QCORE_CRASH_SEED", "7"))
KILLS = 5
CONFIGS = {"w8": ["--bits", "8"], "w4": ["--bits", "4", "--asymmetric", "--group-size", "128"]}


def _checkpoint(folder):
    """~37 MiB of bf16 in two shards: a run takes about a second of work after its imports."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((512, 1024)).astype(ml_dtypes.bfloat16)  # 1 MiB
    folder.mkdir()
    weight_map = {}
    for s in range(2):
        fname = f"model-{s + 1:05d}-of-00002.safetensors"
        names = [f"layers.{s}.w{t}.weight" for t in range(16)] + [f"layers.{s}.norm{t}.weight" for t in range(2)]
        with ck.SafetensorsWriter(folder / fname, [(k, "BF16", block.shape) for k in names]) as w:
            for i, k in enumerate(names):
                w.write(k, np.roll(block, i, axis=1))
                weight_map[k] = fname
    (folder / ck.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "toy"}')


def _digest(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _start(src, out, config):
    return subprocess.Popen([sys.executable, "-m", "qcore", "quantize", str(src), str(out), *CONFIGS[config],
                             "--overwrite", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _staging_seen(out) -> bool:
    return any(n.startswith(f".{out.name}.") for n in os.listdir(out.parent))


def _complete(src, out, config):
    """Run to the end; returns (seconds until the run began writing beside OUTPUT, seconds in all)."""
    t0 = time.monotonic()
    p, began = _start(src, out, config), None
    while p.poll() is None:
        if began is None and _staging_seen(out):
            began = time.monotonic() - t0
        time.sleep(0.005)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and stdout == "", stderr
    total = time.monotonic() - t0
    return (began if began is not None else total), total


def _leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".")]


def test_kill_9_at_random_moments(tmp_path):
    src, out = tmp_path / "model", tmp_path / "out"
    _checkpoint(src)
    source = _digest(src)
    refs, writing = {}, []
    for config in CONFIGS:  # the complete results each kind of run must leave
        began, total = _complete(src, out, config)
        writing.append(total - began)
        refs[config] = _digest(out)
        ck.load(out)
    assert refs["w8"] != refs["w4"]
    rng = random.Random(SEED)
    configs = list(CONFIGS)
    for k in range(KILLS):
        config = configs[k % 2]
        p, t0 = _start(src, out, config), time.monotonic()
        if k == 0:  # anywhere, imports included
            moment = rng.uniform(0.0, 2.0)
        else:  # while writing: from the moment its temporary output appears to (about) the commit
            while p.poll() is None and not _staging_seen(out):
                time.sleep(0.002)
            moment = time.monotonic() - t0 + rng.uniform(0.0, max(writing) * 1.1)
        time.sleep(max(0.0, t0 + moment - time.monotonic()))
        where = f"seed {SEED}, kill {k} ({config}) after {moment:.2f} s"
        p.kill()
        p.communicate(timeout=60)
        # right after the kill: OUTPUT is absent (killed between the commit's renames: the next run repairs
        # it) or one of the two complete results, which loads; never anything partial
        if out.exists():
            state = _digest(out)
            assert state in refs.values(), f"{where}: OUTPUT is neither complete result"
            ck.load(out)
        assert _digest(src) == source, f"{where}: the input changed"
        nxt = configs[rng.randrange(2)]
        _complete(src, out, nxt)
        assert _digest(out) == refs[nxt], f"{where}: the next run's OUTPUT differs from a clean run's"
        assert _leftovers(tmp_path) == [] and _leftovers(out) == [], f"{where}: {_leftovers(tmp_path)}"
    assert _digest(src) == source
