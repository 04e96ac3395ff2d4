"""Mutated checkpoints: every outcome of ``load`` is a clean ValueError/TypeError naming the file, or exactly the
data that safetensors' own NumPy loader reads, in bounded memory.

Seeded: ``QCORE_FUZZ_SEED`` picks another seed (a failure message names the seed and the mutation, so any
failing file can be rebuilt). ``QCORE_FUZZ_FILES`` sets how many mutated files a run checks (default 1200).
"""

import json
import os
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from qcore import PerChannel, PerGroup, PerTensor, QuantScheme, QuantizedArray, quantize
from qcore import checkpoint as ck

SEED = int(os.environ.get("QCORE_FUZZ_SEED", "20261203"))
FILES = int(os.environ.get("QCORE_FUZZ_FILES", "1200"))
#: Most bytes one load of a file of a few hundred bytes may allocate at its peak.
PEAK_BUDGET = 4 << 20


def _bases():
    """Small valid files: quantized (several widths, modes, granularities) and plain (every dtype class)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 32)).astype(np.float32)
    quantized = {"a.weight": quantize(w, QuantScheme(4, False, PerGroup(16))),
                 "b.weight": quantize(w, QuantScheme(8, True, PerChannel(0))),
                 "c.weight": quantize(w[:2, :7].copy(), QuantScheme(3, True, PerTensor())),
                 "d.weight": quantize(w[:1], QuantScheme(1, False, PerGroup(8))),
                 "a.bias": w[0, :4].copy()}
    plain = {"f32": w[:2, :3].copy(), "bf16": w[:1, :5].astype(ml_dtypes.bfloat16), "f16": w[0, :3].astype(np.float16),
             "i64": np.arange(3, dtype=np.int64), "u8": np.arange(5, dtype=np.uint8), "bool": np.array([True, False]),
             "empty": np.zeros((0, 3), np.float32), "scalar": np.array(2.5, np.float64)}
    e8 = {"e.weight": quantize(w[:2, :16].copy(), QuantScheme(8, False, PerGroup(8)))}
    return [("quantized", quantized), ("plain", plain), ("asym8", e8)]


def _split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8:8 + n], raw[8 + n:]


def _pack(header: dict, data: bytes, length=None) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h) if length is None else length) + h + data


_JSON_BYTES = b'{}[]":,-0123456789eE.+ \\untrufalsF32U8I8BF16"'
_DIMS = [0, 1, 2, 3, 7, 16, 31, 32, 33, 255, 2**31, 2**32, 2**40, 2**48, 2**48 + 1, 2**62, 2**64, -1]
_VALUES = [0, 1, -1, 2**63, 2**64, "x", "", None, True, 1.5, [], {}, [[[[1]]]], "F32", "I8", "U8", "C64", 1e308]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _mutate_structure(rng, header: dict) -> str:
    """Edit one field of a parsed header in place; returns what was done (for the failure message)."""
    names = [k for k in header if k != "__metadata__"]
    name = _pick(rng, names)
    entry = header[name]
    kind = int(rng.integers(9))
    if kind == 0:
        entry["dtype"] = _pick(rng, sorted(ck.DTYPES) + ["F8_E4M3", "C64", "f32", 7])
        return f"dtype of {name} -> {entry['dtype']!r}"
    if kind == 1:
        shape = list(entry["shape"])
        op = int(rng.integers(4))
        if op == 0 and shape:
            shape[int(rng.integers(len(shape)))] = _pick(rng, _DIMS)
        elif op == 1:
            shape.insert(int(rng.integers(len(shape) + 1)), _pick(rng, _DIMS))
        elif op == 2 and shape:
            shape.pop(int(rng.integers(len(shape))))
        else:
            shape = shape[::-1]
        entry["shape"] = shape
        return f"shape of {name} -> {shape}"
    if kind == 2:
        offs = list(entry["data_offsets"])
        i = int(rng.integers(2))
        offs[i] = max(0, offs[i] + int(rng.integers(-9, 10))) if rng.random() < 0.7 else _pick(rng, _DIMS)
        entry["data_offsets"] = offs
        return f"data_offsets of {name} -> {offs}"
    if kind == 3:
        other = _pick(rng, names)
        entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
        return f"swapped the offsets of {name} and {other}"
    if kind == 4:
        key = _pick(rng, ["dtype", "shape", "data_offsets"])
        entry[key] = _pick(rng, _VALUES)
        return f"{key} of {name} -> {entry[key]!r}"
    if kind == 5:
        new = _pick(rng, ["", "__metadata__", name + ".x", name.split(".")[0], "a.weight", "b.weight.scale"])
        header[new] = header.pop(name)
        return f"renamed {name} -> {new!r}"
    if kind == 6:
        del header[name]
        return f"removed {name}"
    md = header.setdefault("__metadata__", {})
    if kind == 7 and "qcore.quantized" in md:
        table = json.loads(md["qcore.quantized"])
        if table:
            qname = _pick(rng, sorted(table))
            e = table[qname]
            path = _pick(rng, [("scheme", "bits"), ("scheme", "symmetric"), ("scheme", "granularity"), ("shape",),
                               ("dtype",), ("scheme", "version"), ("scheme", "granularity", "size"),
                               ("scheme", "granularity", "axis")])
            target = e
            for k in path[:-1]:
                target = target.setdefault(k, {}) if isinstance(target, dict) else {}
            value = _pick(rng, _VALUES + [2, 3, 4, 8, 9, [4, 32], [2, 7], [4, 31], [2**40, 0], "per_group"])
            if isinstance(target, dict):
                target[path[-1]] = value
            md["qcore.quantized"] = json.dumps(table)
            return f"qcore.quantized {qname}.{'.'.join(path)} -> {value!r}"
    key = _pick(rng, ["qcore.format_version", "qcore.quantized", "qcore.other", "format"])
    md[key] = _pick(rng, ["1", "2", "", "{}", "[]", "{oops", '{"zz": {"scheme": {}, "shape": [1]}}'])
    return f"metadata {key} -> {md[key]!r}"


def _mutate(rng, raw: bytes):
    """One mutated file of ``raw``, and what was done."""
    n, head, data = _split(raw)
    try:
        json.loads(head)
    except ValueError:  # a mutated file whose header no longer parses: flip bytes anywhere, or cut it
        b = bytearray(raw)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
        return bytes(b[:int(rng.integers(8, len(b) + 1))] if rng.random() < 0.3 else b), "bytes anywhere"
    kind = int(rng.integers(8))
    if kind <= 2:  # structured edit of the header, re-serialized (kind 2: keeping the old length)
        header = json.loads(head)
        try:
            what = _mutate_structure(rng, header)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError):  # an earlier mutation's shape
            kind = 3
        else:
            if kind == 2:
                return _pack(header, data, length=n), what + " (old header length kept)"
            return _pack(header, data), what
    if kind == 3:  # bytes of the header JSON
        h = bytearray(head)
        for _ in range(int(rng.integers(1, 4))):
            h[int(rng.integers(len(h)))] = _pick(rng, _JSON_BYTES)
        return raw[:8] + bytes(h) + data, "header bytes"
    if kind == 4:  # the length field
        m = _pick(rng, [n + int(rng.integers(-16, 17)), 0, 1, 2**63, 2**64 - 1, n * 2, len(raw)])
        return struct.pack("<Q", max(0, min(m, 2**64 - 1))) + raw[8:], f"header length {n} -> {m}"
    if kind == 5:  # tensor data: codes, scales (NaN, inf, 0, huge, negative), zero points
        d = bytearray(data)
        if d:
            for _ in range(int(rng.integers(1, 6))):
                i = int(rng.integers(len(d)))
                if rng.random() < 0.5 and i + 4 <= len(d):
                    d[i:i + 4] = np.array(_pick(rng, [np.nan, np.inf, 0.0, -1.0, 3e38, 1e-45, 1e38]),
                                          np.float32).tobytes()
                else:
                    d[i] = int(rng.integers(256))
        return raw[:8] + head + bytes(d), "data bytes"
    if kind == 6:  # truncated or extended
        cut = int(rng.integers(len(raw) + 1))
        return (raw[:cut], f"truncated to {cut}") if rng.random() < 0.6 else (raw + b"\0" * (1 + cut % 9), "extended")
    # a random slice of the header replaced by a deep or odd JSON value
    h = head.decode()
    i = h.find(":", int(rng.integers(len(h))))
    j = h.find(",", i + 1) if i >= 0 else -1
    if i < 0 or j < 0:
        return raw[:8] + head[::-1] + data, "header reversed"
    value = _pick(rng, ["[" * 200 + "]" * 200, '"\\ud800"', "-0", "1e400", "NaN", "Infinity", "null", "[]", "{}",
                        '"\\u0046\\u0033\\u0032"'])
    new = (h[:i + 1] + value + h[j:]).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + data, f"value after byte {i} -> {value}"


def _reference(path):
    try:
        return load_file(path)
    except Exception:  # noqa: BLE001 - any refusal of the reference reader counts as a refusal
        return None


def _header_ok(path) -> bool:
    try:
        ck.read_header(path)
    except (ValueError, TypeError):
        return False
    return True


def _same(ours: dict, ref: dict, what: str) -> None:
    stored = set()
    for name, value in ours.items():
        if isinstance(value, QuantizedArray):
            parts = {"qweight": ck.encode_qweight(value), "scale": value.scale, "zero_point": value.zero_point}
            for suffix, arr in parts.items():
                if arr is None:
                    continue
                key = f"{name}.{suffix}"
                stored.add(key)
                assert key in ref, what
                assert ref[key].dtype == arr.dtype and ref[key].shape == arr.shape, (what, key)
                assert ref[key].tobytes() == arr.tobytes(), (what, key)
            # what load promises beyond the bytes: every code dequantizes to a finite value
            assert np.isfinite(value.scale).all() and (value.scale > 0).all(), what
        else:
            stored.add(name)
            assert name in ref, what
            assert ref[name].dtype == value.dtype and ref[name].shape == value.shape, (what, name)
            assert ref[name].tobytes() == value.tobytes(), (what, name)
    assert stored == set(ref), (what, sorted(set(ref) - stored))


def test_mutated_checkpoints_load_cleanly_or_exactly(tmp_path):
    rng = np.random.default_rng(SEED)
    raws = []
    for label, tensors in _bases():
        path = tmp_path / f"{label}.safetensors"
        ck.save(path, tensors)
        raws.append((label, path.read_bytes()))
        _same(ck.load(path), load_file(path), label)  # the bases themselves are valid
    path = tmp_path / "m.safetensors"
    outcomes = {"refused": 0, "loaded": 0}
    tracemalloc.start()
    try:
        for i in range(FILES):
            label, raw = raws[i % len(raws)]
            mutated, what = _mutate(rng, raw)
            for _ in range(int(rng.integers(0, 2))):  # sometimes a second mutation on top
                mutated, more = _mutate(rng, mutated) if len(mutated) > 16 else (mutated, "")
                what += "; " + more
            what = f"seed {SEED}, file {i} ({label}): {what}"
            path.write_bytes(mutated)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                ours = ck.load(path)
            except (ValueError, TypeError) as e:
                assert str(path) in str(e), (what, str(e))
                ours = None
            except Exception as e:  # noqa: BLE001 - anything else is the failure this test looks for
                pytest.fail(f"{what}: {type(e).__name__}: {e}")
            peak = tracemalloc.get_traced_memory()[1] - base
            assert peak < PEAK_BUDGET, f"{what}: loading a {len(mutated)}-byte file took {peak} bytes"
            ref = _reference(path)
            if _header_ok(path):
                assert ref is not None, f"{what}: read_header accepted a file that safetensors refuses"
            if ours is None:
                outcomes["refused"] += 1
                continue
            outcomes["loaded"] += 1
            assert ref is not None, f"{what}: load accepted a file that safetensors refuses"
            _same(ours, ref, what)
    finally:
        tracemalloc.stop()
    # the mutations reach both outcomes: the test would notice a loader that refuses everything
    assert outcomes["refused"] > FILES // 4 and outcomes["loaded"] > FILES // 20, outcomes
