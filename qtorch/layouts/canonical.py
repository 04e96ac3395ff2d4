"""The canonical layout: the state_dict form, served on every device.

``qweight`` holds the codes ``[N, ceil(K*bits/8)]`` packed along K, LSB first (docs/packing.md; int8 codes
-127..127 for 8-bit symmetric, uint8 otherwise), scale and zero point in qcore's shapes. The forward
dequantizes the whole weight (float32 on CPU: AVX2 has no bf16/fp16 FMA; the input dtype elsewhere) and runs one
``F.linear``: slow per call, but it serves every scheme, shape and device. CPU calls of several rows may take
``dequant_mm`` instead (:mod:`qtorch.layouts.dequant_path`) where the layer measured it faster.
"""

from __future__ import annotations

from . import dequant_path
from .base import Layout
from .codec import dense_linear, dequantize_canonical, unpack_codes

__all__ = ["CANONICAL"]


class Canonical(Layout):
    """Every scheme, shape and device: the fallback that the default policy always ranks last."""

    name = holds = "canonical"
    tuned = True

    def eligible(self, spec, device, compute_dtype):
        return True

    def path(self, device_type, dtype, rows, bits):
        return "dense"

    def paths(self, device_type, dtype, rows, bits, spec=None):
        if dequant_path.eligible(device_type, dtype, rows):
            return ("dense", dequant_path.NAME)
        return ("dense",)

    def linear(self, weight, x2, path):
        if path == dequant_path.NAME:
            return dequant_path.linear(weight, x2)
        return dense_linear(x2, weight.dequantize)

    def from_canonical(self, spec, qweight, scale, zero_point):
        return qweight, scale, zero_point, None

    def to_codes(self, spec, qweight, scale, zero_point):
        codes = qweight if spec.bits == 8 else unpack_codes(qweight, spec.bits, spec.in_features)
        return codes, scale, zero_point

    def to_canonical(self, spec, qweight, scale, zero_point):
        return qweight, scale, zero_point

    def dequantize(self, spec, qweight, scale, zero_point, dtype):
        return dequantize_canonical(qweight, scale, zero_point, bits=spec.bits, symmetric=spec.symmetric,
                                    kind=spec.kind, axis=spec.axis, group=spec.group,
                                    out_features=spec.out_features, in_features=spec.in_features, dtype=dtype,
                                    zero_point_kind=spec.zero_point_kind)


CANONICAL = Canonical()
