"""The vnni layout (qtorch.layouts.vnni): who it holds, the canonical state it gives back, and its forward at every
row count, dtype, with autograd and under torch.compile, against F.linear on the dequantized weight."""

import copy

import pytest
import torch
import torch.nn.functional as F

import qcore
import qtorch
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from qtorch import vnni
from qtorch.layouts import WeightSpec
from qtorch.layouts.vnni import VNNI

pytestmark = pytest.mark.skipif(not vnni.available(), reason="the vnni layout needs AVX512-VNNI (not on this CPU)")

CPU = torch.device("cpu")
SCHEMES = [QuantScheme(4, False, PerGroup(128)), QuantScheme(4, True, PerGroup(64)),
           QuantScheme(4, False, PerGroup(32)), QuantScheme(4, True, PerChannel(0))]


def layer(scheme, n=128, k=256, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    m = qtorch.QuantLinear.from_linear(torch.nn.Linear(k, n, dtype=dtype), scheme)
    assert m.quantized_weight.hold_layout("vnni", dtype)
    return m


def check_close(y, x, m):
    """|y - F.linear(x, W) - b| within the rounding of x into the planes and of the output's dtype."""
    w = m.quantized_weight.dequantize(torch.float32)
    ref = F.linear(x.float(), w, m.bias.float())
    bound = F.linear(x.float().abs(), w.abs(), m.bias.float().abs())
    tol = {torch.float32: 2.0**-18, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}[x.dtype]
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs()
    assert torch.all(err <= tol * bound + 1e-6), float((err - tol * bound).max())


def test_eligible_for_4_bit_groups_along_k_and_channels():
    ok = lambda scheme, n=128, k=256, dt=torch.bfloat16: VNNI.eligible(WeightSpec.of(scheme, n, k), CPU, dt)  # noqa
    assert all(ok(s) for s in SCHEMES) and ok(SCHEMES[0], dt=torch.float32) and ok(SCHEMES[0], dt=torch.float16)
    assert not ok(QuantScheme(8, True, PerChannel(0)))  # 8 bits: the blocked layout's
    assert not ok(QuantScheme(4, False, PerTensor()))
    assert not ok(SCHEMES[0], n=96)  # tiles of 64 channels
    assert not ok(QuantScheme(4, False, PerGroup(64)), k=100)  # whole words of 8 inputs, whole groups
    assert not ok(QuantScheme(4, False, PerGroup(12)), k=96)
    assert not VNNI.eligible(WeightSpec.of(SCHEMES[0], 128, 256), torch.device("meta"), torch.bfloat16)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_state_dict_stays_canonical(scheme):
    m = qtorch.QuantLinear.from_linear(torch.nn.Linear(256, 128), scheme)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    codes = m.quantized_weight.to_quantized_array()
    assert m.quantized_weight.hold_layout("vnni", torch.float32)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    back = m.quantized_weight.to_quantized_array()
    assert (back.codes == codes.codes).all() and (back.scale == codes.scale).all()
    twin = copy.deepcopy(m)
    assert twin.quantized_weight.layout is VNNI
    x = torch.randn(3, 256)
    assert torch.equal(twin(x), m(x))


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 17, 130])
def test_forward_matches_f_linear(scheme, dtype, rows):
    m = layer(scheme, dtype=dtype, seed=rows)
    x = (torch.randn(rows, 256) * torch.exp(torch.randn(rows, 256))).to(dtype)
    with torch.no_grad():
        check_close(m(x), x, m)
        check_close(m(x.view(rows, 1, 256)).view(rows, 128), x, m)  # the decoder's shapes and the layer's


def test_non_finite_x_is_f_linears():
    m = layer(SCHEMES[0], dtype=torch.float32)
    w = m.quantized_weight.dequantize(torch.float32)
    for rows in (1, 4):
        x = torch.randn(rows, 256)
        x[0, 3] = float("inf")
        x[-1, 9] = float("nan")
        with torch.no_grad():
            y, ref = m(x), F.linear(x, w, m.bias)
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))


def test_input_gradient():
    m = layer(SCHEMES[1], dtype=torch.float32)
    x = torch.randn(5, 256, requires_grad=True)
    m(x).sum().backward()
    w = m.quantized_weight.dequantize(torch.float32)
    assert torch.allclose(x.grad, torch.ones(5, 128) @ w, rtol=1e-5, atol=1e-5)


def test_compiled_forward_is_the_eager_one():
    m = layer(SCHEMES[0], dtype=torch.float32)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for rows in (1, 6):
        x = torch.randn(rows, 256)
        with torch.no_grad():
            assert torch.equal(compiled(x), m(x))


def test_qtorch_compile_keeps_a_float32_layer_on_vnni():
    # float32: no template layout to choose (qtorch.compile's candidates are bfloat16's), so the layer keeps vnni
    # and inductor traces its op
    m = layer(SCHEMES[0], dtype=torch.float32)
    compiled = qtorch.compile(m, autotune=False)
    for rows in (1, 5):
        x = torch.randn(rows, 256)
        with torch.no_grad():
            want = m(x)
        assert m.quantized_weight.layout is VNNI and torch.equal(compiled(x), want)


def test_the_ops_one_row_plan_is_kept_per_weight_and_never_keeps_it_alive():
    # the op path (compiled graphs, autograd) reuses the plan of the codes tensor it is given, per activation
    # dtype, builds a new one when the scale tensor changes, and drops it with the codes
    import gc
    import weakref

    from qtorch.layouts import vnni as lv

    q = layer(QuantScheme(4, False, PerGroup(64)))
    b = q.quantized_weight.buffers
    args = (b["qweight"], b["scale"], b["zero_point"], 128)
    x = torch.randn(1, 256)
    y = lv.vnni_linear_impl(x, *args)
    plan = lv._OP_PLANS[b["qweight"]][torch.float32][3]
    assert torch.equal(lv.vnni_linear_impl(x, *args), y) and lv._OP_PLANS[b["qweight"]][torch.float32][3] is plan
    lv.vnni_linear_impl(x.bfloat16(), *args)
    assert set(lv._OP_PLANS[b["qweight"]]) == {torch.float32, torch.bfloat16}
    y2 = lv.vnni_linear_impl(x, b["qweight"], b["scale"] * 2, *args[2:])
    assert lv._OP_PLANS[b["qweight"]][torch.float32][3] is not plan
    torch.testing.assert_close(y2, 2 * y)
    qw = b["qweight"].clone()
    torch.testing.assert_close(lv.vnni_linear_impl(x, qw, *args[1:]), y)
    ref = weakref.ref(qw)
    assert qw in lv._OP_PLANS
    del qw
    gc.collect()
    assert ref() is None
