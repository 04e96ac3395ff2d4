"""Every qtorch layout keeps qcore's promises: quantize with qcore, hold the weight in the layout, read the codes
back and dequantize from the layout (the conformance suite of qcore.testing, one specification for both)."""

import pytest
import torch
from hypothesis import assume, settings
from hypothesis import strategies as st

import qcore
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from qcore.testing import PROMISES, Promises, Quantized, Quantizer
from qcore.testing.conformance import run_check
from qcore.testing.strategies import expand, schemes
from qtorch import layouts, vnni, vnni8
from qtorch.layouts.int4pack import INT4PACK_GROUPS
from qtorch.weight import QuantizedWeight

# (compute dtype the layout serves, schemes it takes, (min, max) side of the [out, in] weights drawn)
LAYOUTS = {
    "canonical": (torch.float32, lambda rank: schemes(rank=2), (1, 9)),
    "blocked": (torch.float32, lambda rank: st.one_of(
        schemes(bits=st.sampled_from([4, 8]), kinds=("group",), sizes=(1, 2, 4, 8), last_axis_only=True),
        st.builds(lambda b, s: QuantScheme(b, s, PerChannel(0)), st.sampled_from([4, 8]), st.booleans())),
        (16, 16)),
    "int4pack": (torch.bfloat16, lambda rank: st.builds(lambda s, g: QuantScheme(4, s, PerGroup(g)), st.booleans(),
                                                        st.sampled_from(INT4PACK_GROUPS)), (16, 16)),
    "int8pack": (torch.bfloat16, lambda rank: st.just(QuantScheme(8, True, PerChannel(0))), (16, 16)),
    "vnni": (torch.bfloat16, lambda rank: st.one_of(
        st.builds(lambda s, g: QuantScheme(4, s, PerGroup(g)), st.booleans(), st.sampled_from([8, 16, 32, 64])),
        st.builds(lambda s: QuantScheme(4, s, PerChannel(0)), st.booleans())), (64, 64)),
    "vnni8": (torch.bfloat16, lambda rank: st.sampled_from([QuantScheme(8, True, PerChannel(0)),
                                                             QuantScheme(8, True, PerTensor())]), (64, 64)),
}


def layout_quantizer(name):
    compute, scheme_strategy, (lo, hi) = LAYOUTS[name]

    def quantize(x, scheme):
        w = QuantizedWeight.from_quantized_array(qcore.quantize(x, scheme), compute_dtype=compute)
        assume(w.hold_layout(name, compute))  # a weight the layout cannot take is not its promise
        back = w.to_quantized_array()
        zero = 0 if back.zero_point is None else expand(back.zero_point, x.shape, scheme)
        return Quantized(back.codes, expand(back.scale, x.shape, scheme), zero, scheme.qmin, scheme.qmax, w)

    return Quantizer(f"qtorch-{name}", quantize, lambda q: q.native.dequantize(torch.float32).numpy(),
                     Promises(), schemes=scheme_strategy, ranks=(2, 2), min_side=lo, max_side=hi)


def test_every_registered_layout_is_checked():
    assert {lay.name for lay in layouts.registered()} == set(LAYOUTS)


# the promises a layout's round trip can break; NaN rejection and packing are qcore's alone, tested there
LAYOUT_PROMISES = [p for p in PROMISES if p not in ("packing", "bit_order", "rejects_nonfinite")]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_keeps_qcores_promises(name, torch_pack_kernels):
    if name == "vnni" and not vnni.available():
        pytest.skip("the vnni layout needs a CPU with AVX512-VNNI (not eligible here: nothing to hold)")
    if name == "vnni8" and not vnni8.available():
        pytest.skip("the vnni8 layout needs a CPU with AMX-INT8 (not eligible here: nothing to hold)")
    quantizer = layout_quantizer(name)
    examples = max(5, settings().max_examples // 8)  # qcore.quantize itself is checked in depth in tests/qcore
    failed = {p: r for p in LAYOUT_PROMISES if not (r := run_check(p, quantizer, max_examples=examples)).passed}
    assert not failed, "\n".join(f"{p}: {r.message}\n  input: {r.counterexample}" for p, r in failed.items())
