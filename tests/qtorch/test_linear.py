"""qtorch.linear: every forward path against F.linear(x, dequantized_weight()), state, devices, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qcore
import qtorch
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from qtorch import layouts
from qtorch._torch_numpy import from_numpy, to_numpy

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}

W8 = QuantScheme(8, True, PerChannel(0))
W4 = QuantScheme(4, False, PerGroup(4))


def _check_close(y, x, q):
    """|y - F.linear(x, W)| <= eps(dtype) * (|x| @ |W|.T): the dtype's rounding of a dot product of these terms."""
    w = q.dequantized_weight(torch.float32)
    ref = F.linear(x, q.dequantized_weight(x.dtype), None if q.bias is None else q.bias.to(x.dtype))
    bound = F.linear(x.float().abs(), w.abs()) + (0 if q.bias is None else q.bias.float().abs())
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs()
    assert torch.all(err <= EPS[x.dtype] * bound + 1e-6), float((err - EPS[x.dtype] * bound).max())


@pytest.fixture
def paths(monkeypatch):
    """Records the path chosen for every forward call."""
    seen = []

    def spy(orig):
        def path(*a):
            seen.append(orig(*a))
            return seen[-1]
        return path

    for lay in layouts.registered():
        monkeypatch.setattr(lay, "path", spy(lay.path))
    return seen


# (scheme, out_features): blocked layout (N % 16 == 0) or canonical (N = 30), granularities, widths
SCHEMES = [(W8, 48), (W8, 30), (W4, 32), (W4, 30), (QuantScheme(4, True, PerChannel(0)), 16),
           (QuantScheme(8, False, PerTensor()), 16), (QuantScheme(3, True, PerGroup(4)), 16),
           (QuantScheme(2, False, PerChannel(1)), 16), (QuantScheme(8, True, PerGroup(4, axis=0)), 16)]


@pytest.mark.parametrize("scheme,n", SCHEMES, ids=lambda v: str(v))
@pytest.mark.parametrize("k", [100, 500, 504, 520])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_f_linear_on_every_path(scheme, n, k, dtype, paths):
    if isinstance(scheme.granularity, PerGroup) and k % scheme.granularity.size and scheme.granularity.axis == -1:
        pytest.skip("group size does not divide k")
    torch.manual_seed(k + n)
    lin = torch.nn.Linear(k, n, dtype=dtype)
    q = qtorch.QuantLinear.from_linear(lin, scheme)
    for rows in (1, 3, 4, 16, 260):
        x = torch.randn(rows, k, dtype=dtype)
        _check_close(q(x), x, q)
    assert set(paths) == ({"numba", "tiles"} if q.weight_layout == "blocked" else {"dense"})


@pytest.mark.parametrize("k", [1, 7])
def test_tiny_and_odd_in_features(k):
    for scheme in (W8, QuantScheme(4, False, PerChannel(0)), QuantScheme(5, True, PerTensor())):
        q = qtorch.QuantLinear.from_linear(torch.nn.Linear(k, 32), scheme)
        for rows in (1, 4, 300):
            x = torch.randn(rows, k)
            _check_close(q(x), x, q)


def test_bfloat16_int8pack_path_is_guarded(monkeypatch, torch_pack_kernels):
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[0]) or real(*a))
    for n in (30, 48):
        for k in (32, 512, 504, 520, 7):  # only K % 16 == 0 may reach the kernel (504, 520, 7 would crash it)
            q = qtorch.W8A16Linear.from_linear(torch.nn.Linear(k, n, dtype=torch.bfloat16))
            assert q.weight_layout == ("canonical" if k % 16 == 0 or n == 30 else "blocked")
            for rows in (1, 4, 16, 130):
                x = torch.randn(rows, k, dtype=torch.bfloat16)
                _check_close(q(x), x, q)
            x = torch.randn(3, k)  # a float32 input to a bfloat16 module: the portable path
            _check_close(q(x), x, q)
    assert calls and all(t.shape[1] in (32, 512) and t.dtype == torch.bfloat16 for t in calls)


@pytest.mark.parametrize("layer", ["W8A16Linear", "W4A16Linear"])
def test_three_d_input_and_many_rows(layer):
    q = getattr(qtorch, layer).from_linear(torch.nn.Linear(256, 64, dtype=torch.bfloat16))
    x = torch.randn(2, 130, 256, dtype=torch.bfloat16)  # 260 rows: the tiles path
    y = q(x)
    assert y.shape == (2, 130, 64)
    _check_close(y.reshape(260, 64), x.reshape(260, 256), q)
    assert q(torch.randn(0, 256, dtype=torch.bfloat16)).shape == (0, 64)


@pytest.mark.parametrize("scheme", [W8, W4, QuantScheme(3, True, PerGroup(4)), QuantScheme(1, False, PerTensor()),
                                    QuantScheme(8, False, PerChannel(1))], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantization_is_qcores_and_state_dict_is_canonical(scheme, dtype):
    lin = torch.nn.Linear(24, 32, dtype=dtype)
    q = qtorch.QuantLinear.from_linear(lin, scheme)
    qa = qcore.quantize(to_numpy(lin.weight), scheme)
    assert torch.equal(q.dequantized_weight(torch.float32), torch.from_numpy(qcore.dequantize(qa)))
    sd = q.state_dict()
    assert set(sd) == {"qweight", "scale", "bias"} | ({"zero_point"} if not scheme.symmetric else set())
    expected_q = qa.codes if scheme.bits == 8 else qa.packed()
    assert sd["qweight"].dtype == from_numpy(expected_q).dtype and np.array_equal(sd["qweight"].numpy(), expected_q)
    assert sd["scale"].dtype == torch.float32 and np.array_equal(sd["scale"].numpy(), qa.scale)
    if not scheme.symmetric:
        assert np.array_equal(sd["zero_point"].numpy(), qa.zero_point)
    assert torch.equal(sd["bias"], lin.bias.detach())
    assert q.quantized_array().codes.tobytes() == qa.codes.tobytes()
    # round trip into a fresh module, exact
    q2 = qtorch.QuantLinear(24, 32, scheme=scheme, dtype=dtype)
    q2.load_state_dict(sd)
    for key, t in q2.state_dict().items():
        assert torch.equal(t, sd[key]), key
    x = torch.randn(5, 24, dtype=dtype)
    assert torch.equal(q2(x), q(x))


def test_no_full_precision_copy_of_the_weight():
    q = qtorch.W8A16Linear.from_linear(torch.nn.Linear(512, 256))
    for name, t in list(q.named_buffers()) + list(q.named_parameters()):
        assert not (t.is_floating_point() and t.numel() >= 512 * 256 // 8), name
    q4 = qtorch.W4A16Linear.from_linear(torch.nn.Linear(512, 256))
    assert sum(t.numel() * t.element_size() for t in q4.buffers() if not t.is_floating_point()) <= 512 * 256 // 2 + 4096


@pytest.mark.parametrize("scheme", [QuantScheme(4, True, PerGroup(32)), QuantScheme(8, True, PerTensor()),
                                    QuantScheme(4, False, PerTensor()), QuantScheme(4, True, PerChannel(0)), W8, W4],
                         ids=str)
def test_blocked_layout_holds_no_more_than_the_canonical_state(scheme):
    lin = torch.nn.Linear(128, 64)
    q = qtorch.QuantLinear.from_linear(lin, scheme)
    assert q.weight_layout == "blocked"
    state = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert qtorch.memory_footprint(q) == state  # no zero point of 8s, a per-tensor scale stays 0-d
    m = torch.nn.Sequential(torch.nn.Linear(128, 64))
    p = qtorch.plan(m, scheme)
    r = qtorch.quantize_model(m, scheme)
    assert [a.bytes_after for a in p] == [b.bytes_after for b in r] == [state]
    x = torch.randn(300, 128)
    for rows in (1, 300):  # numba and tiles paths
        _check_close(q(x[:rows]), x[:rows], q)


def test_load_state_dict_lists_every_offending_key():
    q = qtorch.W4A16Linear(256, 64)
    sd = q.state_dict()
    bad = dict(sd)
    bad["qweight"] = torch.zeros(64, 64, dtype=torch.uint8)  # a 2-bit-wide row: wrong bit width
    bad["scale"] = bad["scale"].double()
    del bad["zero_point"]
    with pytest.raises(RuntimeError) as e:
        qtorch.W4A16Linear(256, 64).load_state_dict(bad)
    msg = str(e.value)
    assert "qweight" in msg and "[64, 128]" in msg and "[64, 64]" in msg
    assert "scale" in msg and "torch.float64" in msg and "zero_point" in msg
    # values are checked too, and nothing is half-loaded
    target = qtorch.W4A16Linear(256, 64)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    bad = dict(sd)
    bad["scale"] = torch.zeros_like(sd["scale"])
    bad["zero_point"] = torch.full_like(sd["zero_point"], 16)
    with pytest.raises(RuntimeError, match="finite and > 0") as e:
        target.load_state_dict(bad)
    assert "zero_point 16 at index (0, 0) is outside 0..15" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        qtorch.W4A16Linear(256, 64).load_state_dict({**sd, "weight": torch.zeros(1)})


@pytest.mark.parametrize("scheme", [W8, W4, QuantScheme(4, True, PerGroup(32)), QuantScheme(3, True, PerChannel(0))],
                         ids=str)
def test_failed_load_changes_nothing(scheme):
    a = qtorch.QuantLinear.from_linear(torch.nn.Linear(64, 32), scheme)
    b = qtorch.QuantLinear.from_linear(torch.nn.Linear(64, 32), scheme)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    for drop in ("bias", "scale"):
        sd = a.state_dict()
        del sd[drop]
        with pytest.raises(RuntimeError, match="Missing key"):
            b.load_state_dict(sd)
        assert all(torch.equal(before[k], v) for k, v in b.state_dict().items()), drop
    with pytest.raises(RuntimeError, match="Unexpected key"):
        b.load_state_dict({**a.state_dict(), "extra": torch.zeros(1)})
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    # all or nothing with strict=False too (the layer cannot tell): reported, nothing loaded
    sd = a.state_dict()
    del sd["bias"]
    res = b.load_state_dict(sd, strict=False)
    assert res.missing_keys == ["bias"]
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize("bits,sym,low", [(8, True, -128), (4, True, -8), (3, True, -4), (2, True, -2),
                                          (1, False, None), (4, False, None), (8, False, None)])
def test_load_checks_the_code_range_of_every_width(bits, sym, low):
    scheme = QuantScheme(bits, sym, PerChannel(0))
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(20, 16), scheme)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    sd = q.state_dict()
    sd["qweight"] = torch.zeros_like(sd["qweight"])  # signed 8-bit: -128 below; packed: unsigned 0 everywhere
    if bits == 8 and sym:
        sd["qweight"][0, 0] = -128
    if low is None:  # every stored pattern is a valid code of an asymmetric scheme
        q.load_state_dict(sd)
        assert q.quantized_array().codes.min() == 0
        return
    with pytest.raises(RuntimeError, match=f"qweight: code {low} is outside {scheme.qmin}..{scheme.qmax}"):
        q.load_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    q.quantized_array()  # still valid


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", ["W4A16Linear", "W8A16Linear"])  # W8 in bf16 switches to the int8pack layout
def test_to_dtype_changes_compute_dtype_never_the_codes(device, layer):
    q = getattr(qtorch, layer).from_linear(torch.nn.Linear(256, 48)).to(device)
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        q = q.to(dt)
        assert q.dtype == dt and q.bias.dtype == dt and q.scale.dtype == torch.float32
        for key in ("qweight", "scale", "zero_point"):
            assert key not in sd or torch.equal(q.state_dict()[key], sd[key])
        x = torch.randn(3, 256, dtype=dt, device=device)
        _check_close(q(x), x, q)
    q.half()
    assert q.dtype == torch.float16
    with pytest.raises(TypeError, match="float64"):
        q.double()


@pytest.mark.parametrize("device", DEVICES)
def test_from_linear_keeps_device_and_dtype(device):
    lin = torch.nn.Linear(64, 32, dtype=torch.bfloat16, device=device)
    q = qtorch.QuantLinear.from_linear(lin, W4)
    assert q.dtype == torch.bfloat16 and q.qweight.device.type == device and q.bias.device.type == device
    x = torch.randn(2, 64, dtype=torch.bfloat16, device=device)
    _check_close(q(x), x, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_round_trip_keeps_state():
    q = qtorch.W8A16Linear.from_linear(torch.nn.Linear(64, 48))
    sd = q.state_dict()
    q.cuda()
    assert q.weight_layout == "canonical"
    q.cpu()
    assert all(torch.equal(v, sd[k]) for k, v in q.state_dict().items())


def test_bad_input():
    q = qtorch.W8A16Linear(64, 32)
    with pytest.raises(ValueError, match="in_features=64.*got 63"):
        q(torch.randn(2, 63))
    with pytest.raises(ValueError, match="in_features=64"):
        q(torch.tensor(1.0))
    for bad in (torch.ones(2, 64, dtype=torch.int64), torch.ones(2, 64, dtype=torch.bool),
                torch.ones(2, 64, dtype=torch.float64)):
        with pytest.raises(TypeError, match="dtype"):
            q(bad)
    with pytest.raises(ValueError, match=r"\[32, 65\].*\[32, 64\]"):
        q.quantize(torch.randn(32, 65))
    with pytest.raises(TypeError):
        q.quantize(torch.ones(32, 64, dtype=torch.int32))
    with pytest.raises(TypeError):
        qtorch.QuantLinear(64, 32, scheme="int8")
    with pytest.raises(ValueError):
        qtorch.W8A16Linear(0, 32)
    with pytest.raises(TypeError):
        qtorch.W8A16Linear(64, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="NaN|nan"):
        q.quantize(torch.full((32, 64), float("nan")))
    with pytest.raises(ValueError):
        qtorch.W8A16Linear.from_linear(torch.nn.Linear(64, 32), W4)


def test_prior_art_api():
    layer = qtorch.W8A16LinearLayer(4, 8, True, torch.float32)
    w = torch.randn(8, 4)
    layer.quantize(w)
    assert layer.int8_weights.dtype == torch.int8 and layer.int8_weights.shape == (8, 4)
    assert torch.allclose(layer.int8_weights.float() * layer.scales[:, None], w, atol=float(layer.scales.max()) / 2)
    x = torch.randn(2, 4)
    assert layer(x).shape == (2, 8)
    lin = torch.nn.Linear(16, 32)
    ql = qtorch.QuantizedLinear.from_linear(lin)
    assert isinstance(ql, qtorch.QuantizedLinear) and ql.scheme == W8
    assert ql.quantize_weights(lin.weight) is ql
    q4 = qtorch.W4A16Linear.from_linear(torch.nn.Linear(256, 16))
    assert isinstance(q4, qtorch.W4A16Linear) and q4.scheme.bits == 4
    assert "scheme=asym int4 per-group(128" in repr(q4) and "in_features=256" in repr(q4)


def test_quantization_error_is_small():
    lin = torch.nn.Linear(512, 64)
    for cls, min_db in ((qtorch.W8A16Linear, 35), (qtorch.W4A16Linear, 15)):
        q = cls.from_linear(lin)
        x = torch.randn(8, 512)
        ref, y = lin(x).detach(), q(x)
        assert qcore.metrics.sqnr_db(ref.numpy(), y.numpy()) > min_db


@pytest.mark.parametrize("n,rows", [(48, 3), (48, 300), (30, 3)])  # numba op, tiles op, canonical
def test_input_gradient_flows_through_frozen_codes(n, rows):
    q = qtorch.W8A16Linear.from_linear(torch.nn.Linear(64, n))
    x = torch.randn(rows, 64, requires_grad=True)
    q(x).square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    F.linear(xr, q.dequantized_weight(), q.bias).square().sum().backward()
    assert torch.allclose(x.grad, xr.grad, rtol=1e-4, atol=1e-4)


# (layer, scheme, n, k, dtype, rows, path): every forward path, the bf16 PyTorch kernels included
GRAD_CASES = [
    ("W8A16Linear", None, 64, 256, torch.bfloat16, 3, "int8pack"),
    ("W8A16Linear", None, 64, 256, torch.bfloat16, 300, "int8pack"),
    ("W4A16Linear", None, 64, 256, torch.bfloat16, 3, "int4pack"),
    ("QuantLinear", QuantScheme(4, True, PerGroup(32)), 32, 96, torch.bfloat16, 300, "int4pack"),
    ("QuantLinear", W4, 32, 64, torch.bfloat16, 3, "numba"),
    ("W8A16Linear", None, 128, 256, torch.bfloat16, 1, "numba"),  # the one-row kernel, bf16 on the blocked layout
    ("W4A16Linear", None, 64, 256, torch.bfloat16, 1, "numba"),
    ("W4A16Linear", None, 64, 256, torch.bfloat16, 300, "tiles"),
    ("QuantLinear", QuantScheme(4, True, PerTensor()), 32, 64, torch.float16, 300, "tiles"),
    ("QuantLinear", QuantScheme(8, False, PerTensor()), 32, 64, torch.float32, 3, "numba"),
    ("QuantLinear", QuantScheme(3, True, PerGroup(4)), 16, 64, torch.bfloat16, 3, "numba"),  # 4-bit containers
    ("QuantLinear", QuantScheme(3, True, PerGroup(4)), 30, 64, torch.bfloat16, 3, "dense"),  # N = 30: canonical
]


@pytest.mark.parametrize("layer,scheme,n,k,dtype,rows,path", GRAD_CASES, ids=str)
def test_input_gradient_on_every_path(layer, scheme, n, k, dtype, rows, path, paths, monkeypatch):
    # bf16 layers take PyTorch's kernels or the blocked ones depending on the CPU: each case names its own
    monkeypatch.setattr(layouts, "TORCH_PACK_KERNELS", path in ("int8pack", "int4pack"))
    calls = []
    for op in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"):
        real = getattr(torch, op)
        monkeypatch.setattr(torch, op, lambda *a, _r=real, _op=op: calls.append(_op) or _r(*a))
    torch.manual_seed(n + rows)
    cls = getattr(qtorch, layer)
    lin = torch.nn.Linear(k, n, dtype=dtype)
    q = cls.from_linear(lin) if scheme is None else cls.from_linear(lin, scheme)
    lead = (2, rows) if rows > 1 else (1, 1)  # one row in all: the decoding kernel
    x = torch.randn(*lead, k, dtype=dtype, requires_grad=True)
    g = torch.randn(*lead, n, dtype=dtype)
    q(x).backward(g)
    w = q.dequantized_weight(torch.float32)
    ref = g.float() @ w
    bound = g.float().abs() @ w.abs()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert torch.all((x.grad.float() - ref).abs() <= 2 * EPS[dtype] * bound + 1e-5)
    kernel = {"int8pack": "_weight_int8pack_mm", "int4pack": "_weight_int4pack_mm_for_cpu"}.get(path)
    assert calls == ([kernel] if kernel else [])
    assert paths == ["dense" if path == "int8pack" else path]
    # no grad needed: the same kernel, the output equal to the one with a gradient
    with torch.no_grad():
        y0 = q(x)
    assert torch.equal(y0, q(x).detach())


@pytest.mark.parametrize("layer", ["W8A16Linear", "W4A16Linear"])
def test_bfloat16_kernels_have_an_input_gradient_under_compile(layer):
    torch._dynamo.reset()
    q = getattr(qtorch, layer).from_linear(torch.nn.Linear(256, 64).bfloat16())
    c = torch.compile(q, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 256, dtype=torch.bfloat16, requires_grad=True)
    c(x).float().square().sum().backward()
    xr = x.detach().float().requires_grad_(True)
    F.linear(xr, q.dequantized_weight(torch.float32), q.bias.float()).square().sum().backward()
    assert torch.allclose(x.grad.float(), xr.grad, rtol=0.05, atol=0.05 * float(xr.grad.abs().max()))


@pytest.mark.parametrize("sym,g,n,k", [(False, 128, 48, 256), (True, 32, 16, 96), (False, 64, 64, 64)])
def test_bfloat16_int4pack_path(sym, g, n, k, monkeypatch, torch_pack_kernels):
    calls = []
    real = torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(a[0].shape) or real(*a))
    scheme = QuantScheme(4, sym, PerGroup(g))
    lin = torch.nn.Linear(k, n, dtype=torch.bfloat16)
    q = qtorch.QuantLinear.from_linear(lin, scheme)
    assert q.weight_layout == "int4pack" and q.kernel_nbytes() == (k // g) * n * 2 * 2
    qa = qcore.quantize(to_numpy(lin.weight), scheme)
    assert torch.equal(q.dequantized_weight(torch.float32), torch.from_numpy(qcore.dequantize(qa)))
    assert np.array_equal(q.state_dict()["qweight"].numpy(), qa.packed())
    for rows in (1, 3, 4, 16, 130):
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        _check_close(q(x), x, q)
    assert len(calls) == 5
    x = torch.randn(2, k)  # float32 input to a bfloat16 module: the portable path
    _check_close(q(x), x, q)
    sd = q.state_dict()
    q.float()
    assert q.weight_layout == "blocked" and all(torch.equal(v, sd[k2]) for k2, v in q.state_dict().items()
                                                  if k2 != "bias")
    q.bfloat16()
    assert q.weight_layout == "int4pack" and torch.equal(q.state_dict()["qweight"], sd["qweight"])


def test_bfloat16_int8_layers_without_a_tile_keep_int8pack(blocked_kernels, monkeypatch):
    # N % 16 != 0 has no blocked tile: PyTorch's int8 kernel still beats dequantizing the whole weight per call
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
    q = qtorch.W8A16Linear.from_linear(torch.nn.Linear(64, 1000, dtype=torch.bfloat16))
    assert q.weight_layout == "canonical" and q.kernel_nbytes() == 1000 * 2
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    _check_close(q(x), x, q)
    assert calls == [1]
    assert qtorch.W8A16Linear.from_linear(torch.nn.Linear(64, 1024, dtype=torch.bfloat16)).weight_layout == "blocked"


def _other_strides(t):
    """``t`` with the same values in another memory layout: column-major when 2-D, every other element when 1-D."""
    if t.dim() == 2:
        return t.t().contiguous().t()
    if t.dim() == 1 and t.numel() > 1:
        return torch.stack([t, t], -1)[..., 0]
    return t


@pytest.mark.parametrize("scheme,n", SCHEMES + [(QuantScheme(4, False, PerGroup(32)), 32)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loaded_state_is_canonical_whatever_the_strides_of_the_source(scheme, n, dtype, torch_pack_kernels):
    k = 64
    torch.manual_seed(n)
    src = qtorch.QuantLinear.from_linear(torch.nn.Linear(k, n, dtype=dtype), scheme)
    sd = src.state_dict()
    strided = {key: _other_strides(t) for key, t in sd.items()}
    assert not strided["qweight"].is_contiguous()
    dst = qtorch.QuantLinear(k, n, scheme=scheme, dtype=dtype)
    dst.load_state_dict(strided)
    assert dst.weight_layout == src.weight_layout
    for key, t in src._buffers.items():  # the layout the layer builds itself, bit for bit, strides included (int4pack
        if t is not None:                 # holds its scale and zero point group-major on purpose: strides (1, N))
            assert dst._buffers[key].stride() == t.stride(), key
            assert dst._buffers[key].is_contiguous() or (src.weight_layout == "int4pack" and key != "qweight"), key
            assert torch.equal(dst._buffers[key], t), key
    for rows in (1, 3, 300):
        x = torch.randn(rows, k, dtype=dtype)
        assert torch.equal(dst(x), src(x)), rows




@pytest.mark.parametrize("scheme", [W8, QuantScheme(8, False, PerTensor())], ids=str)
def test_float32_outputs_after_loading_a_column_major_state_are_the_sources_bit_for_bit(scheme):
    # the dense path (N = 100 has no blocked tile) summed in another order on column-major codes: up to 8e-7 off
    torch.manual_seed(0)
    src = qtorch.QuantLinear.from_linear(torch.nn.Linear(500, 100), scheme)
    dst = qtorch.QuantLinear(500, 100, scheme=scheme)
    dst.load_state_dict({key: _other_strides(t) for key, t in src.state_dict().items()})
    x = torch.randn(3, 500)
    assert torch.equal(dst(x), src(x))
@pytest.mark.parametrize("scheme", [W8, W4, QuantScheme(2, False, PerTensor())], ids=str)
def test_load_refuses_finite_scales_whose_codes_dequantize_to_inf(scheme):
    src = qtorch.QuantLinear.from_linear(torch.nn.Linear(64, 32), scheme)
    dst = qtorch.QuantLinear.from_linear(torch.nn.Linear(64, 32), scheme)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = src.state_dict()
    huge = sd["scale"].clone()
    huge.view(-1)[-1] = 3e38  # finite, but 3e38 * (code - zero point) overflows float32
    with pytest.raises(RuntimeError, match=r"scale: scale 3e\+38 at index .* dequantize to inf"):
        dst.load_state_dict({**sd, "scale": huge})
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    assert torch.isfinite(dst.dequantized_weight()).all()
    # a large scale that keeps every code finite (255 * 1e36 < 3.4e38) still loads
    ok = sd["scale"].clone()
    ok.view(-1)[-1] = 1e36
    dst.load_state_dict({**sd, "scale": ok})
    assert torch.isfinite(dst.dequantized_weight()).all()


META_LAYERS = [lambda: qtorch.QuantLinear(64, 32, scheme=W8), lambda: qtorch.W4A16Linear(64, 32, group_size=32),
               lambda: qtorch.QuantLinear(64, 32, scheme=QuantScheme(3, True, PerGroup(16))),
               lambda: qtorch.W8A16LinearLayer(64, 32, dtype=torch.bfloat16)]


@pytest.mark.parametrize("build", META_LAYERS)
def test_layers_built_on_meta_behave_like_nn_linear(build):
    with torch.device("meta"):
        q = build()
    cpu = build()
    assert {k: (v.device.type, v.dtype, v.shape) for k, v in q.state_dict().items()} == \
        {k: ("meta", v.dtype, v.shape) for k, v in cpu.state_dict().items()}
    assert q(torch.randn(3, 64, dtype=q.dtype, device="meta")).shape == (3, 32)
    with pytest.raises(NotImplementedError, match="to_empty"):  # nn.Linear's answer too: there is nothing to copy
        q.to("cpu")
    # to_empty: a valid zero weight on the new device, ready for load_state_dict
    q.to_empty(device="cpu")
    assert all(t.device.type == "cpu" for t in q.state_dict().values())
    assert torch.equal(q.dequantized_weight(), torch.zeros(32, 64, dtype=q.dtype))
    assert torch.equal(q(torch.ones(2, 64, dtype=q.dtype)), torch.zeros(2, 32, dtype=q.dtype))
    src = qtorch.QuantLinear.from_linear(torch.nn.Linear(64, 32, dtype=q.dtype), q.scheme)
    q.load_state_dict(src.state_dict())
    x = torch.randn(5, 64, dtype=q.dtype)
    assert q.weight_layout == src.weight_layout and torch.equal(q(x), src(x))


def test_a_model_built_on_meta_loads_with_assign_true():
    """What transformers users do: build the model on meta (no memory), then assign the loaded tensors."""
    def build():
        return torch.nn.Sequential(torch.nn.Linear(64, 64), qtorch.QuantLinear(64, 32, scheme=W8),
                                   qtorch.W4A16Linear(32, 16, group_size=32))
    src = build()
    src[1].quantize(torch.randn(32, 64))
    src[2].quantize(torch.randn(16, 32))
    with torch.device("meta"):
        model = build()
    model.load_state_dict(src.state_dict(), assign=True)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    x = torch.randn(3, 64)
    assert torch.equal(model(x), src(x))
    # values are checked on the way in, whatever the target
    with torch.device("meta"):
        model = build()
    bad = src.state_dict()
    bad["1.scale"] = torch.full_like(bad["1.scale"], 3e38)
    with pytest.raises(RuntimeError, match=r"1\.scale: scale 3e\+38"):
        model.load_state_dict(bad, assign=True)
    assert model[1].qweight.device.type == "meta"


def test_meta_state_dicts_load_as_into_nn_linear():
    src = qtorch.QuantLinear.from_linear(torch.nn.Linear(64, 32), W4)
    meta_sd = qtorch.QuantLinear(64, 32, scheme=W4, device="meta").state_dict()
    # into a real layer: nothing to copy, an error that names every key; the layer is unchanged
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(64, 32), W4)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(RuntimeError) as e:
        q.load_state_dict(meta_sd)
    for key in ("qweight", "scale", "zero_point", "bias"):
        assert f"{key}: is on the meta device" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    # with assign=True the layer takes them and moves to meta, as nn.Linear does
    q.load_state_dict(meta_sd, assign=True)
    assert all(t.device.type == "meta" for t in q.state_dict().values())
    # meta into meta: shapes and dtypes are checked, the layer stays on meta
    m = qtorch.QuantLinear(64, 32, scheme=W4, device="meta")
    m.load_state_dict(meta_sd)
    with pytest.raises(RuntimeError, match=r"qweight: expected torch.uint8 of shape \[32, 32\]"):
        m.load_state_dict({**meta_sd, "qweight": torch.empty(32, 31, dtype=torch.uint8, device="meta")})
    # real tensors into a meta layer without assign: a no-op with nn.Linear's warning
    with pytest.warns(UserWarning, match="assign=True"):
        m.load_state_dict(src.state_dict())
    assert m.qweight.device.type == "meta"


def test_quantizing_a_meta_weight_names_the_problem():
    with pytest.raises(ValueError, match="meta device"):
        qtorch.QuantLinear.from_linear(torch.nn.Linear(64, 32, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        qtorch.W8A16Linear(64, 32).quantize(torch.empty(32, 64, device="meta"))


@pytest.mark.parametrize("field", ["qweight", "zero_point"])
def test_load_state_dict_and_qcore_refuse_a_bad_state_in_the_same_words(field):
    """One validation: load_state_dict reports what qcore's own checks say of the same arrays."""
    from qcore.params import check_codes, check_zero_point

    scheme = QuantScheme(8, True, PerChannel(0)) if field == "qweight" else QuantScheme(4, False, PerChannel(0))
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(16, 8), scheme)
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    codes = q.quantized_array().codes
    if field == "qweight":
        sd["qweight"][3, 5] = -128
        codes = sd["qweight"].numpy()
        check, args = check_codes, (codes, scheme)
    else:
        sd["zero_point"][6] = 16
        check, args = check_zero_point, (sd["zero_point"].numpy(), scheme)
    with pytest.raises(ValueError) as ref:
        check(*args)
    with pytest.raises(ValueError) as via_qcore:
        qcore.QuantizedArray.from_parts(codes, sd["scale"].numpy(),
                                        None if scheme.symmetric else sd["zero_point"].numpy(), scheme)
    with pytest.raises(RuntimeError) as via_torch:
        q.load_state_dict(sd)
    assert str(ref.value) in str(via_qcore.value)
    assert str(ref.value) in str(via_torch.value)


@pytest.mark.parametrize("layout", ["blocked", "canonical"])
def test_a_data_parallel_replica_computes_with_its_own_buffers(layout):
    """torch.nn.parallel.replicate gives each replica a _buffers dict of its own and assigns the buffers' copies
    on its device into it; the replica's weight read the original module's dict (device 0's tensors)."""
    q = qtorch.W8A16Linear.from_linear(torch.nn.Linear(256, 96)).eval()
    if not q._w.hold_layout(layout, torch.float32):
        pytest.skip(f"{layout} does not hold this weight here")
    x = torch.randn(4, 256)
    with torch.no_grad():
        y = q(x)
        r = q._replicate_for_data_parallel()  # what replicate() calls for each device
        r.scale = r.scale * 2  # as replicate() assigns each buffer's copy
        torch.testing.assert_close(r(x) - q.bias, 2 * (y - q.bias))
        assert torch.equal(q(x), y) and r._w is not q._w and r._w.buffers is r._buffers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_share_memory_shares_the_codes_and_scales_too(dtype):
    """module.share_memory() (torch.multiprocessing's way to hand a model to worker processes without copying)
    shared only the bias: the codes, scales and zero points stayed private, copied into every worker."""
    m = torch.nn.Sequential(qtorch.W8A16Linear.from_linear(torch.nn.Linear(256, 96)),
                            qtorch.W4A16Linear.from_linear(torch.nn.Linear(96, 64))).to(dtype)
    x = torch.randn(1, 256, dtype=dtype)
    with torch.no_grad():
        y, y3 = m(x), m(x.expand(3, 256))
        m.share_memory()
        assert all(b.is_shared() for _, b in m.named_buffers())
        assert torch.equal(m(x), y) and torch.equal(m(x.expand(3, 256)), y3)  # decoders and plans follow the move


@pytest.mark.parametrize("layer", ["W8A16Linear", "W4A16Linear"])
@pytest.mark.parametrize("rows", [1, 5])
def test_under_autocast_a_layer_computes_in_the_autocast_dtype_as_nn_linear(layer, rows):
    """nn.Linear under torch.autocast("cpu", bfloat16) computes and returns bfloat16; the quantized layers took
    the float32 input as it came and returned float32."""
    lin = torch.nn.Linear(256, 96)
    q = getattr(qtorch, layer).from_linear(lin).eval()
    x = torch.randn(rows, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
        assert y.dtype == lin(x).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(y.detach(), q(x.detach().to(torch.bfloat16))) and q(x).dtype == torch.float32
    y.float().sum().backward()  # the cast is on the graph: the float32 input still gets its gradient
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_autocast_applies_under_torch_compile_as_in_eager_and_leaves_float64_alone():
    torch._dynamo.reset()
    q = qtorch.W8A16Linear.from_linear(torch.nn.Linear(256, 96)).eval()
    c = torch.compile(q, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 256)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(c(x), q(x)) and c(x).dtype == torch.bfloat16
            with pytest.raises(TypeError, match="input dtype must be float32, float16 or bfloat16, got torch.float64"):
                q(x.double())
        assert c(x).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_dequantized_weight_narrows_as_qcore_does(dtype):
    """qcore saturates a grid end within one step past the 16-bit range; qtorch's dequantized_weight gave inf."""
    import ml_dtypes

    top = float(torch.finfo(dtype).max)
    x = np.tile(np.array([0.76 * top, -0.76 * top, 1, 0], np.float32), (4, 1))
    for scheme in (QuantScheme(2, False, PerChannel(0)), QuantScheme(2, False, PerGroup(4))):
        qa = qcore.quantize(x, scheme)
        want = qcore.dequantize(qa, dtype=np.float16 if dtype == torch.float16 else ml_dtypes.bfloat16)
        got = qtorch.QuantLinear.from_quantized_array(qa).dequantized_weight(dtype)
        assert np.isfinite(want.astype(np.float32)).all() and np.abs(want.astype(np.float32)).max() == top
        np.testing.assert_array_equal(got.float().numpy(), want.astype(np.float32))
