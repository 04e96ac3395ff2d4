"""The vnni8 layout (qtorch.layouts.vnni8): who it holds, the canonical state it gives back, and its forward at every
row count, dtype, with autograd and under torch.compile, against F.linear on the dequantized weight."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import qtorch
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from qtorch import vnni8
from qtorch.layouts import WeightSpec
from qtorch.layouts import vnni8 as lv
from qtorch.layouts.vnni8 import VNNI8

pytestmark = pytest.mark.skipif(not vnni8.available(), reason="the vnni8 layout needs AMX-INT8 (not on this CPU)")

CPU = torch.device("cpu")
W8 = QuantScheme(8, True, PerChannel(0))
SCHEMES = [W8, QuantScheme(8, True, PerTensor())]


def layer(scheme=W8, n=128, k=256, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    m = qtorch.QuantLinear.from_linear(torch.nn.Linear(k, n, dtype=dtype), scheme)
    assert m.quantized_weight.hold_layout("vnni8", dtype)
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


def test_eligible_for_8_bit_symmetric_channels_and_tensors():
    ok = lambda scheme, n=128, k=256, dt=torch.bfloat16: VNNI8.eligible(WeightSpec.of(scheme, n, k), CPU, dt)  # noqa
    assert all(ok(s, dt=dt) for s in SCHEMES for dt in (torch.bfloat16, torch.float32, torch.float16))
    assert not ok(QuantScheme(8, False, PerChannel(0)))  # zero points: the blocked layout's
    assert not ok(QuantScheme(8, True, PerGroup(64)))
    assert not ok(QuantScheme(4, True, PerChannel(0)))
    assert not ok(W8, n=96) and not ok(W8, k=96)  # tiles of 64 channels, steps of 64 inputs
    assert not VNNI8.eligible(WeightSpec.of(W8, 128, 256), torch.device("meta"), torch.bfloat16)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_state_dict_stays_canonical(scheme):
    m = qtorch.QuantLinear.from_linear(torch.nn.Linear(256, 128), scheme)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    codes = m.quantized_weight.to_quantized_array()
    assert m.quantized_weight.hold_layout("vnni8", torch.float32)
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape and torch.equal(before[k], after[k]) for k in before)
    back = m.quantized_weight.to_quantized_array()
    assert (back.codes == codes.codes).all() and (back.scale == codes.scale).all()
    twin = copy.deepcopy(m)
    assert twin.quantized_weight.layout is VNNI8
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


def test_one_row_offers_the_dot_kernel_where_it_serves_the_weight():
    spec = WeightSpec.of(W8, 128, 256)
    dot = vnni8.dot_eligible(256)
    assert VNNI8.tuned
    assert VNNI8.paths("cpu", torch.bfloat16, 1, 8, spec=spec) == (("vnni8", "vnni8_dot") if dot else ("vnni8",))
    assert VNNI8.paths("cpu", torch.bfloat16, 2, 8, spec=spec) == ("vnni8",)
    long = WeightSpec.of(W8, 64, vnni8.DOT_MAX_K + 64)  # its lane sums could pass 2^31
    assert VNNI8.paths("cpu", torch.float32, 1, 8, spec=long) == ("vnni8",)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_every_one_row_path_and_its_decoder_match_f_linear(dtype):
    m = layer(dtype=dtype, seed=5)
    w, lay = m.quantized_weight, m.quantized_weight.layout
    x = (torch.randn(1, 256) * torch.exp(torch.randn(1, 256))).to(dtype)
    b = m.bias
    with torch.no_grad():
        for path in lay.paths("cpu", dtype, 1, 8, spec=w.spec):
            check_close(lay.linear(w, x, path) + b.to(dtype), x, m)
            decode = lay.decoder(w, dtype, path)
            check_close((decode(x.view(256)) + b.to(dtype)).view(1, 128), x, m)


def test_calls_in_chunks_of_rows_give_the_same_numbers(monkeypatch):
    m = layer()
    x = torch.randn(37, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        whole = m(x)
        monkeypatch.setattr(lv, "ROW_CHUNK", 8)
        assert torch.equal(m(x), whole)


def test_non_finite_x_is_f_linears():
    m = layer(dtype=torch.float32)
    w = m.quantized_weight.dequantize(torch.float32)
    for rows in (1, 7):
        x = torch.randn(rows, 256)
        x[0, 3] = float("inf")
        x[-1, 9] = float("nan")
        with torch.no_grad():
            y, ref = m(x), F.linear(x, w, m.bias)
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))


def test_input_gradient():
    m = layer(dtype=torch.float32)
    x = torch.randn(5, 256, requires_grad=True)
    m(x).sum().backward()
    w = m.quantized_weight.dequantize(torch.float32)
    assert torch.allclose(x.grad, torch.ones(5, 128) @ w, rtol=1e-5, atol=1e-5)


def test_compiled_forward_is_the_eager_one():
    m = layer(dtype=torch.float32)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for rows in (1, 6):
        x = torch.randn(rows, 256)
        with torch.no_grad():
            assert torch.equal(compiled(x), m(x))


def test_the_ops_plan_is_kept_per_weight_and_never_keeps_it_alive():
    q = layer()
    b = q.quantized_weight.buffers
    x = torch.randn(2, 256)
    y = lv.vnni8_linear_impl(x, b["qweight"], b["scale"], 128)
    plan = lv._PLANS[b["qweight"]][2]
    assert torch.equal(lv.vnni8_linear_impl(x, b["qweight"], b["scale"], 128), y)
    assert lv._PLANS[b["qweight"]][2] is plan
    y2 = lv.vnni8_linear_impl(x, b["qweight"], b["scale"] * 2, 128)  # a new scale tensor: a new plan
    assert lv._PLANS[b["qweight"]][2] is not plan
    torch.testing.assert_close(y2, 2 * y)
    qw = b["qweight"].clone()
    torch.testing.assert_close(lv.vnni8_linear_impl(x, qw, b["scale"], 128), y)
    ref = weakref.ref(qw)
    assert qw in lv._PLANS
    del qw
    gc.collect()
    assert ref() is None
