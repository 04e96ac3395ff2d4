"""qtorch.vnni_lut: bfloat16 rows of the vnni layout on AMX-BF16 tiles whose rows are the weight's channels, and the
layer's ``vnni_lut`` path that runs it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qtorch
from qcore import PerChannel, PerGroup, QuantScheme
from qtorch import autotune, vnni, vnni_lut
from qtorch.layouts import vnni as lv

pytestmark = pytest.mark.skipif(not (vnni.available() and vnni_lut.available()),
                                reason="needs AVX512-VNNI (the vnni layout) and AMX-BF16 tiles (not on this CPU)")


def layer(scheme, n, k, seed=0):
    torch.manual_seed(seed)
    m = qtorch.QuantLinear.from_linear(torch.nn.Linear(k, n), scheme).to(torch.bfloat16)
    assert m.quantized_weight.hold_layout("vnni", torch.bfloat16)
    return m


def bits(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.int16).numpy().view(np.uint16)


def test_the_input_order_of_a_tile_row_is_a_permutation_in_pairs():
    """Element ``e`` of an A tile row and of a B tile's pair rows name the same input: every input of a step
    once, each pair two consecutive inputs (x's 32-bit words)."""
    inputs = [vnni_lut._input(e) for e in range(32)]
    assert sorted(inputs) == list(range(32))
    assert sorted(vnni_lut.PAIRS.tolist()) == list(range(16))
    assert all(inputs[2 * p] == 2 * vnni_lut.PAIRS[p] and inputs[2 * p + 1] == 2 * vnni_lut.PAIRS[p] + 1
               for p in range(16))


@pytest.mark.parametrize("scheme,n,k", [(QuantScheme(4, False, PerGroup(128)), 128, 256),
                                        (QuantScheme(4, True, PerGroup(32)), 192, 96),
                                        (QuantScheme(4, False, PerChannel(0)), 64, 160),
                                        (QuantScheme(4, False, PerGroup(64)), 64, 4160)],
                         ids=["g128", "sym-g32", "channel", "long-k"])
@pytest.mark.parametrize("rows", [1, 2, 16, 21, 40, 64, 170])
def test_run_is_the_bfloat16_dequantized_weights_product(scheme, n, k, rows):
    """Every row: x times bfloat16((code - z) * scale), summed in float32 (within float32 rounding of the exact
    sum), whatever block of 16 rows it falls in: up to two blocks a pass over the weight, more in groups of
    ``GROUP_BLOCKS`` (170 rows: a group of 8 blocks, then a pair and a single block), a panel of
    ``PANEL_STEPS`` steps at a time (K of 96 and 4160: one short panel, a short last one)."""
    m = layer(scheme, n, k)
    w, s, z = lv._arrays(m.qweight, m.scale, m.zero_point)
    x = torch.randn(rows, k).to(torch.bfloat16)
    out = np.full((rows, n), np.nan, np.float32)
    assert vnni_lut.run(bits(x), w, s, z, k // s.shape[1], out) is out
    wb = m.quantized_weight.dequantize(torch.float32).to(torch.bfloat16).double()
    ref = x.double() @ wb.T
    bound = x.double().abs() @ wb.abs().T
    assert torch.all((torch.from_numpy(out).double() - ref).abs() <= 2.0 ** -20 * bound + 1e-30)
    rounded = np.zeros((rows, n), np.uint16)  # the same sums, rounded to bfloat16 as Tensor.to rounds them
    vnni_lut.run(bits(x), w, s, z, k // s.shape[1], rounded)
    assert torch.equal(torch.from_numpy(rounded.view(np.int16)).view(torch.bfloat16),
                       torch.from_numpy(out).to(torch.bfloat16))


def test_bad_operands_are_named():
    m = layer(QuantScheme(4, False, PerGroup(32)), 64, 64)
    w, s, z = lv._arrays(m.qweight, m.scale, m.zero_point)
    x = bits(torch.randn(3, 64).to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"out contiguous float32 or uint16 \[3, 64\]"):
        vnni_lut.run(x, w, s, z, 32, np.zeros((16, 64), np.float32))
    with pytest.raises(ValueError, match="uint16"):
        vnni_lut.run(x.astype(np.int32), w, s, z, 32, np.zeros((3, 64), np.float32))
    with pytest.raises(ValueError, match="K % 32"):
        vnni_lut.run(x[:, :48].copy(), w, s, z, 32, np.zeros((3, 64), np.float32))
    g8 = layer(QuantScheme(4, False, PerGroup(8)), 64, 64)
    w8, s8, z8 = lv._arrays(g8.qweight, g8.scale, g8.zero_point)
    with pytest.raises(ValueError, match="groups of a multiple of 32"):
        vnni_lut.run(x, w8, s8, z8, 8, np.zeros((3, 64), np.float32))


def test_the_path_is_offered_where_steps_fit_the_groups():
    lay = lv.VNNI
    spec = layer(QuantScheme(4, False, PerGroup(32)), 64, 96).quantized_weight.spec
    assert lay.paths("cpu", torch.bfloat16, 16, 4, spec) == ("vnni_mm", "vnni_bf16", "vnni_lut")
    assert lay.paths("cpu", torch.bfloat16, 1, 4, spec) == ("vnni",)
    assert lay.paths("cpu", torch.float32, 16, 4, spec) == ("vnni_mm",)
    channel = layer(QuantScheme(4, False, PerChannel(0)), 64, 96).quantized_weight.spec
    assert "vnni_lut" in lay.paths("cpu", torch.bfloat16, 16, 4, channel)
    g16 = layer(QuantScheme(4, False, PerGroup(16)), 64, 96).quantized_weight.spec  # a step spans two groups
    assert lay.paths("cpu", torch.bfloat16, 16, 4, g16) == ("vnni_mm", "vnni_bf16")


@pytest.mark.parametrize("rows", [2, 17, 40])
def test_a_forced_path_is_taken_by_the_layer_with_an_input_gradient(rows, monkeypatch):
    env = {"QTORCH_PATH": "vnni_lut", "QTORCH_LAYOUT": "vnni"}
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env=env))
    m = layer(QuantScheme(4, False, PerGroup(64)), 128, 256, seed=rows)
    taken = []
    real = lv.VNNI.linear
    monkeypatch.setattr(lv.VNNI, "linear", lambda w, x, p: taken.append(p) or real(w, x, p))
    x = torch.randn(rows, 256).to(torch.bfloat16)
    w = m.quantized_weight.dequantize(torch.float32)
    ref = F.linear(x.float(), w, m.bias.float())
    bound = F.linear(x.float().abs(), w.abs(), m.bias.float().abs())
    with torch.no_grad():
        y = m(x)
    assert taken == ["vnni_lut"] and y.dtype == torch.bfloat16
    assert torch.all((y.float() - ref).abs() <= 2.0 ** -7 * bound + 1e-6)
    xg = x.clone().requires_grad_()
    m(xg).float().sum().backward()  # the op with an input gradient: W's columns summed
    torch.testing.assert_close(xg.grad.float(), w.sum(0).expand(rows, -1), rtol=2e-2, atol=2e-2)


def test_compiled_forward_takes_the_op():
    m = layer(QuantScheme(4, False, PerGroup(64)), 128, 256, seed=3)
    x = torch.randn(24, 256).to(torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = lv.vnni_lut_linear_impl(x, m.qweight, m.scale, m.zero_point, 128)
        traced = torch.compile(lambda x: torch.ops.qtorch.vnni_lut_linear_infer(x, m.qweight, m.scale,
                                                                                  m.zero_point, 128),
                               fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(traced, eager)


def test_non_finite_rows_are_f_linears():
    """NaN and infinities are multiplied as they are: the same pattern as F.linear."""
    m = layer(QuantScheme(4, False, PerGroup(64)), 128, 256, seed=7)
    x = torch.randn(20, 256).to(torch.bfloat16)
    x[3, 5], x[7, 1] = float("inf"), float("nan")
    y = lv.vnni_lut_linear_impl(x, m.qweight, m.scale, m.zero_point, 128).float()
    ref = F.linear(x.float(), m.quantized_weight.dequantize(torch.float32))
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert torch.allclose(y[finite], ref[finite], atol=2e-2 * float(ref[finite].abs().max()), rtol=2e-2)


def test_rows_go_a_chunk_at_a_time_with_the_same_numbers(monkeypatch):
    m = layer(QuantScheme(4, False, PerGroup(64)), 128, 256, seed=9)
    x = torch.randn(45, 256).to(torch.bfloat16)
    whole = lv.vnni_lut_linear_impl(x, m.qweight, m.scale, m.zero_point, 128)
    monkeypatch.setattr(lv, "ROW_CHUNK", 16)
    assert torch.equal(lv.vnni_lut_linear_impl(x, m.qweight, m.scale, m.zero_point, 128), whole)
    assert whole.dtype == torch.bfloat16 and whole.shape == (45, 128)
