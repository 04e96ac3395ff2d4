"""Quantize a weight-like NumPy array with several schemes and print what each costs in error and bytes.

    python examples/quickstart.py
"""

import numpy as np

import qcore
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme


def main():
    rng = np.random.default_rng(0)
    # a weight matrix with a few outlier rows, as real layers have
    w = rng.standard_normal((1024, 1024)).astype(np.float32) * 0.02
    w[::97] *= 8
    schemes = [
        QuantScheme(8, True, PerTensor()),
        QuantScheme(8, True, PerChannel(0)),
        QuantScheme(4, True, PerChannel(0)),
        QuantScheme(4, False, PerGroup(128)),
        QuantScheme(4, False, PerGroup(32)),
        QuantScheme(3, False, PerGroup(64)),
        QuantScheme(2, False, PerGroup(32)),
    ]
    print(f"weight {w.shape} float32: {w.nbytes / 2**20:.2f} MiB")
    print(f"{'scheme':36} {'SQNR dB':>8} {'max abs err':>12} {'rel err %':>10} {'MiB':>6}")
    for s in schemes:
        qa = qcore.quantize(w, s)
        err = qcore.quantization_error(w, qcore.dequantize(qa))
        print(f"{str(s):36} {err['snr_db']:8.2f} {err['max_abs_error']:12.5f} {err['relative_error_pct']:10.3f} "
              f"{qa.nbytes / 2**20:6.2f}")


if __name__ == "__main__":
    main()
