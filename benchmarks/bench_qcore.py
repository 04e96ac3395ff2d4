"""qcore quantize/dequantize against a straightforward NumPy implementation of the same scheme, same run.

    python benchmarks/bench_qcore.py [--size 4096] [--repeat 7]

Prints the median time of each and the speed-up (NumPy time / qcore time). Targets on the 2-core development
CPU: quantize >= 8x, dequantize >= 4x, for int8 per-channel symmetric and int4 per-group(128) asymmetric.
The two steps apart follow each quantize line: ``qparams`` (compute_qparams, min/max only) and ``params=``
(quantize with those parameters given), against the same NumPy baseline.
"""

import argparse
import time

import numpy as np

import qcore
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from _machine import machine_line


def median_ms(fn, repeat):
    fn()  # warm-up (and numba compile / cache load)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


# --- the baselines: what one writes in NumPy without thinking about memory traffic -------------------------

def np_sym_per_channel(x, bits=8):
    qmax = 2 ** (bits - 1) - 1
    s = (np.abs(x).max(axis=1, keepdims=True) / qmax).astype(np.float32)
    return np.clip(np.rint(x / s), -qmax, qmax).astype(np.int8), s


def np_asym_per_group(x, bits=4, group=128):
    qmax = 2 ** bits - 1
    xg = x.reshape(x.shape[0], -1, group)
    mn = np.minimum(xg.min(axis=-1, keepdims=True), 0)
    mx = np.maximum(xg.max(axis=-1, keepdims=True), 0)
    s = ((mx - mn) / qmax).astype(np.float32)
    zp = np.clip(np.rint(-mn / s), 0, qmax)
    return np.clip(np.rint(xg / s) + zp, 0, qmax).astype(np.uint8).reshape(x.shape), s, zp


def np_sym_per_tensor(x, bits=8):
    qmax = 2 ** (bits - 1) - 1
    s = np.float32(np.abs(x).max() / qmax)
    return np.clip(np.rint(x / s), -qmax, qmax).astype(np.int8), s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    n = args.size
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)

    cases = [
        ("int8 per-channel sym", QuantScheme(8, True, PerChannel(0)), lambda: np_sym_per_channel(x),
         lambda q: q[0].astype(np.float32) * q[1]),
        ("int4 per-group(128) asym", QuantScheme(4, False, PerGroup(128)), lambda: np_asym_per_group(x),
         lambda q: ((q[0].reshape(n, -1, 128).astype(np.float32) - q[2]) * q[1]).reshape(n, n)),
        ("int8 per-tensor sym", QuantScheme(8, True, PerTensor()), lambda: np_sym_per_tensor(x),
         lambda q: q[0].astype(np.float32) * q[1]),
    ]
    print(machine_line())
    print(f"qcore vs NumPy on a {n}x{n} float32 array, median of {args.repeat} (ms); speed-up = NumPy / qcore")
    print(f"{'scheme':26} {'op':10} {'numpy':>8} {'qcore':>8} {'speed-up':>9} {'target':>7}")
    for name, scheme, np_q, np_dq in cases:
        qa = qcore.quantize(x, scheme)
        ref = np_q()
        # same scheme, same codes (up to float32-vs-float64 parameter rounding): a fair comparison
        assert np.abs(ref[0].astype(np.int16) - qa.codes).max() <= 1
        t_np_q = median_ms(np_q, args.repeat)
        t_qc_q = median_ms(lambda: qcore.quantize(x, scheme), args.repeat)
        params = qcore.compute_qparams(x, scheme)
        t_qc_p = median_ms(lambda: qcore.compute_qparams(x, scheme), args.repeat)
        t_qc_qg = median_ms(lambda: qcore.quantize(x, params=params), args.repeat)
        t_np_dq = median_ms(lambda: np_dq(ref), args.repeat)
        t_qc_dq = median_ms(lambda: qcore.dequantize(qa), args.repeat)
        out = np.empty(x.shape, np.float32)
        t_qc_dq_out = median_ms(lambda: qcore.dequantize(qa, out=out), args.repeat)
        target_q, target_dq = ("8x", "4x") if "tensor" not in name else ("-", "-")
        print(f"{name:26} {'quantize':10} {t_np_q:8.2f} {t_qc_q:8.2f} {t_np_q / t_qc_q:8.1f}x {target_q:>7}")
        print(f"{name:26} {'  qparams':10} {t_np_q:8.2f} {t_qc_p:8.2f} {t_np_q / t_qc_p:8.1f}x {'':>7}")
        print(f"{name:26} {'  params=':10} {t_np_q:8.2f} {t_qc_qg:8.2f} {t_np_q / t_qc_qg:8.1f}x {'':>7}")
        print(f"{name:26} {'dequantize':10} {t_np_dq:8.2f} {t_qc_dq:8.2f} {t_np_dq / t_qc_dq:8.1f}x {target_dq:>7}")
        print(f"{name:26} {'  out=':10} {t_np_dq:8.2f} {t_qc_dq_out:8.2f} {t_np_dq / t_qc_dq_out:8.1f}x {'':>7}")
    y = np.empty_like(x)
    print(f"(np.copyto of the float32 input into a preallocated array: "
          f"{median_ms(lambda: np.copyto(y, x), args.repeat):.2f} ms; a new float32 array of that size, filled: "
          f"{median_ms(lambda: np.full(x.shape, 1.0, np.float32), args.repeat):.2f} ms: the floor of any "
          f"dequantize that returns a new array)")


if __name__ == "__main__":
    main()
