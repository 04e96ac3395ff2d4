"""``import qcore`` (and its whole public surface) must never import torch: checked in a fresh interpreter."""

import subprocess
import sys


def test_import_qcore_does_not_import_torch():
    code = ("import sys, numpy as np, qcore\n"
            "qa = qcore.quantize(np.ones((2, 8), np.float32), qcore.QuantScheme(4, False, qcore.PerGroup(4)))\n"
            "qcore.dequantize(qa); qcore.metrics.sqnr_db(np.ones(2), np.ones(2))\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"torch modules imported by qcore: {out.stdout.strip()}"
