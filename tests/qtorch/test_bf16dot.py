"""The blocked layout's AVX512-BF16 path (``qtorch.bf16dot``): F.linear's numbers for every scheme the layout holds,
tile width, row count and K it serves, in bfloat16 and float16; offered only where the CPU has the dot products and
no AMX, for 2+ rows of bfloat16/float16 and shapes it serves; reached through the layer's dispatch as one opaque op
with an input gradient.

Tolerance: ``|y - F.linear(x, W)| <= eps * (|x| @ |W|.T)`` with eps the output dtype's rounding (bfloat16 2^-6,
float16 2^-9: the kernel sums exact products of bfloat16 values in float32, the reference rounds W to x's dtype).
"""

import pytest
import torch
import torch.nn.functional as F

import qtorch
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from qtorch import amx, autotune, bf16dot, gemv
from qtorch.layouts import blocked

runs_here = pytest.mark.skipif(not bf16dot.available(), reason="numba does not compile for a CPU with AVX512-BF16 "
                               "here: the bf16dot path cannot run")
pytestmark = pytest.mark.usefixtures("blocked_kernels")

EPS = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}
GRANULARITIES = {"tensor": PerTensor(), "channel": PerChannel(0), "g32": PerGroup(32), "g64": PerGroup(64),
                 "g128": PerGroup(128), "g256": PerGroup(256)}
ROWS = (2, 3, 5, 12, 16, 17, 29, 64, 100, 128, 300)  # every register block and tail: 4, 2, 1 rows
KS = (32, 384, 1536, 4096)
WIDTHS = {16: 48, 32: 96, 64: 192, 128: 256}  # tile width -> out_features whose largest tile it is


def _layer(scheme, dtype, n, k, seed):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False, dtype=torch.float32)
    with torch.no_grad():  # a spread of magnitudes per channel: per-channel scales and zero points differ
        lin.weight.mul_(torch.rand(n, 1) * 4 + 0.1).add_(torch.randn(n, 1) * 0.05)
    q = qtorch.QuantLinear.from_linear(lin.to(dtype), scheme)
    assert q.weight_layout == "blocked"
    return q


def _assert_close(y, x, q):
    ref = F.linear(x, q.dequantized_weight(x.dtype))
    bound = F.linear(x.float().abs(), q.dequantized_weight(torch.float32).abs())
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs()
    assert torch.all(err <= EPS[x.dtype] * bound + 1e-6), float((err - EPS[x.dtype] * bound).max())


def _cases(gran):
    size = getattr(GRANULARITIES[gran], "size", 32)
    ks = [k for k in KS if k % size == 0]
    widths = list(WIDTHS)
    for i, rows in enumerate(ROWS):
        yield ks[i % len(ks)], widths[i % len(widths)], rows


@runs_here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gran", list(GRANULARITIES))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [8, 4, 3])
def test_bf16dot_path_matches_f_linear(bits, symmetric, gran, dtype):
    scheme = QuantScheme(bits, symmetric, GRANULARITIES[gran])
    layers = {}
    for k, width, rows in _cases(gran):
        q = layers.get((k, width))
        if q is None:
            q = layers[(k, width)] = _layer(scheme, dtype, WIDTHS[width], k, seed=k + width)
        x = torch.randn(rows, k, dtype=dtype)
        if not amx.available():
            assert "bf16dot" in blocked.BLOCKED.paths("cpu", dtype, rows, bits, spec=q.quantized_weight.spec)
        with torch.no_grad():
            _assert_close(blocked.BLOCKED.linear(q.quantized_weight, x, "bf16dot"), x, q)


@runs_here
def test_sums_whole_groups_across_blocks_of_k():
    # per channel over K = 4096 (32 blocks of 128 rows of K, partial sums carried between them) and groups of 256
    # (two blocks a group), at 16 rows (scaled per group) and 64 rows (dequantized panels): against float64
    for scheme in (QuantScheme(8, False, PerChannel(0)), QuantScheme(4, True, PerGroup(256))):
        q = _layer(scheme, torch.bfloat16, 128, 4096, seed=3)
        w = q.dequantized_weight(torch.float64)
        for rows in (16, 64):
            x = torch.randn(rows, 4096, dtype=torch.bfloat16)
            with torch.no_grad():
                y = bf16dot.bf16dot_linear(x, *_operands(q), 128, out_dtype=torch.float32)
                # the bfloat16 output is those sums rounded by the kernel as torch rounds them
                assert torch.equal(bf16dot.bf16dot_linear(x, *_operands(q), 128).view(torch.int16),
                                   y.to(torch.bfloat16).view(torch.int16))
            exact = x.double() @ w.t()
            bound = x.double().abs() @ w.abs().t()
            # float32 sums of exact products (64 rows: of the weight rounded to bfloat16)
            assert float(((y.double() - exact).abs() / bound).max()) < (2.0**-8 if rows == 64 else 1e-5)


@runs_here
def test_bfloat16_output_rounds_overflow_to_infinity_and_keeps_nan():
    # sums past bfloat16's largest value (but within float32's) round to infinity as torch's rounding does; a NaN in
    # a row stays NaN in that row's outputs, and the other rows are untouched by it
    q = _layer(QuantScheme(8, True, PerChannel(0)), torch.bfloat16, 64, 256, seed=5)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    x[1] = 3.0e38 / 256
    x[2, 7] = float("nan")
    ops = _operands(q)
    with torch.no_grad():
        y = bf16dot.bf16dot_linear(x, *ops, 64)
        y32 = bf16dot.bf16dot_linear(x, *ops, 64, out_dtype=torch.float32)
    assert y.dtype == torch.bfloat16 and torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3]]).any()
    assert torch.isinf(y[1]).any()
    keep = [0, 1, 3]
    assert torch.equal(y[keep].view(torch.int16), y32[keep].to(torch.bfloat16).view(torch.int16))


@runs_here
def test_float16_rows_get_float16_output_rounded_as_torch_rounds():
    q = _layer(QuantScheme(4, False, PerGroup(64)), torch.float16, 96, 256, seed=6)
    x = torch.randn(20, 256, dtype=torch.float16)
    ops = _operands(q)
    with torch.no_grad():
        y = bf16dot.bf16dot_linear(x, *ops, 96)
        y32 = bf16dot.bf16dot_linear(x, *ops, 96, out_dtype=torch.float32)
    assert y.dtype == torch.float16 and y32.dtype == torch.float32
    assert torch.equal(y.view(torch.int16), y32.to(torch.float16).view(torch.int16))
    _assert_close(y, x, q)


def _operands(q):
    b, spec = q.quantized_weight.buffers, q.quantized_weight.spec
    scale, zp = blocked.blocked_params(b["scale"], b["zero_point"], spec.out_features)
    return b["qweight"], scale, zp, spec.group, blocked.container_bits(spec.bits)


@runs_here
def test_rows_in_chunks_give_the_same_numbers(monkeypatch):
    q = _layer(QuantScheme(4, False, PerGroup(64)), torch.bfloat16, 96, 256, seed=8)
    x = torch.randn(300, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        whole = blocked.BLOCKED.linear(q.quantized_weight, x, "bf16dot")
        monkeypatch.setattr(amx, "ROW_CHUNK", 48)  # (the row chunks of amx._Prepared, which both kernels share)
        assert torch.equal(blocked.BLOCKED.linear(q.quantized_weight, x, "bf16dot"), whole)
    _assert_close(whole, x, q)


@runs_here
@pytest.mark.parametrize("scheme", [QuantScheme(8, True, PerChannel(0)), QuantScheme(8, False, PerChannel(0)),
                                    QuantScheme(8, False, PerGroup(128)), QuantScheme(8, False, PerGroup(64)),
                                    QuantScheme(8, True, PerGroup(64))],
                         ids=["sym", "asym", "asym-g128", "asym-g64", "sym-g64"])
@pytest.mark.parametrize("rows", [13, 16, 20])
def test_8_bit_panels_converted_during_the_products_give_the_same_numbers(scheme, rows):
    # 13-20 rows of 8-bit codes on units of 4 strips (N = 256) convert the next block of K during the products of
    # this one (asymmetric: blocks in one group); 2 rows a call convert each block before its products: the same
    # panels, the same sums, bit for bit
    q = _layer(scheme, torch.bfloat16, 256, 512, seed=rows)
    x = torch.randn(rows, 512, dtype=torch.bfloat16)
    ops = _operands(q)
    with torch.no_grad():
        y = bf16dot.bf16dot_linear(x, *ops, 256, out_dtype=torch.float32)
        pairs = torch.cat([bf16dot.bf16dot_linear(x[i:i + 2], *ops, 256, out_dtype=torch.float32)
                           for i in range(0, rows, 2)])
    assert torch.equal(y, pairs)
    _assert_close(y.to(torch.bfloat16), x, q)


@runs_here
def test_kernel_checks_its_operands():
    q = _layer(QuantScheme(8, True, PerChannel(0)), torch.bfloat16, 48, 64, seed=1)
    qw, scale, zp, group, bits = _operands(q)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        bf16dot.bf16dot_linear(torch.randn(3, 64), qw, scale, zp, group, bits, 48)
    with pytest.raises(ValueError, match="multiples of 32"):
        bf16dot.bf16dot_linear(torch.randn(3, 48, dtype=torch.bfloat16), qw[:, :48], scale, zp, 48, bits, 48)
    with pytest.raises(ValueError, match="out_dtype"):
        bf16dot.bf16dot_linear(torch.randn(3, 64, dtype=torch.float16), qw, scale, zp, group, bits, 48,
                               out_dtype=torch.bfloat16)
    empty = bf16dot.bf16dot_linear(torch.randn(0, 64, dtype=torch.bfloat16), qw, scale, zp, group, bits, 48)
    assert empty.shape == (0, 48)


def test_offered_where_the_cpu_has_it_and_no_amx(monkeypatch):
    spec = _layer(QuantScheme(8, True, PerChannel(0)), torch.float32, 64, 256, seed=0).quantized_weight.spec
    monkeypatch.setattr(amx, "available", lambda: False)
    monkeypatch.setattr(bf16dot, "available", lambda: True)
    for dt in (torch.bfloat16, torch.float16):
        assert "bf16dot" not in blocked.BLOCKED.paths("cpu", dt, 1, 8, spec=spec)  # one 8-bit row: gemv
        for rows in (2, 16, 4096):
            assert blocked.BLOCKED.paths("cpu", dt, rows, 8, spec=spec)[-1] == "bf16dot"
    for rows in (1, 16):  # float32 rows would need three bfloat16 parts: the float32 kernels are faster
        assert "bf16dot" not in blocked.BLOCKED.paths("cpu", torch.float32, rows, 8, spec=spec)
    assert "bf16dot" not in blocked.BLOCKED.paths("cuda", torch.bfloat16, 16, 8, spec=spec)
    odd = _layer(QuantScheme(8, True, PerChannel(0)), torch.float32, 64, 100, seed=0).quantized_weight.spec
    assert "bf16dot" not in blocked.BLOCKED.paths("cpu", torch.bfloat16, 16, 8, spec=odd)  # K % 32 != 0
    monkeypatch.setattr(amx, "available", lambda: True)  # AMX, where present, is the faster kernel
    assert "bf16dot" not in blocked.BLOCKED.paths("cpu", torch.bfloat16, 16, 8, spec=spec)
    monkeypatch.setattr(amx, "available", lambda: False)
    monkeypatch.setattr(bf16dot, "available", lambda: False)
    assert "bf16dot" not in blocked.BLOCKED.paths("cpu", torch.bfloat16, 16, 8, spec=spec)


@runs_here
def test_a_forced_path_is_taken_by_the_layer_as_one_op_with_an_input_gradient(monkeypatch):
    env = {"QTORCH_PATH": "bf16dot", "QTORCH_LAYOUT": "blocked"}
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env=env))
    monkeypatch.setattr(amx, "available", lambda: False)  # where AMX is, bf16dot is not offered: the force is moot
    taken = []
    real = blocked.BLOCKED.linear
    monkeypatch.setattr(blocked.BLOCKED, "linear", lambda w, x, p: taken.append(p) or real(w, x, p))
    q = _layer(QuantScheme(4, False, PerGroup(32)), torch.bfloat16, 96, 256, seed=5)
    x = torch.randn(2, 9, 256, dtype=torch.bfloat16, requires_grad=True)
    y = q(x)
    assert taken == ["bf16dot"]
    with torch.no_grad():
        direct = real(q.quantized_weight, x.detach().reshape(18, -1), "bf16dot")
    assert torch.equal(y.detach().reshape(18, -1), direct)
    g = torch.randn_like(y)
    y.backward(g)
    w = q.dequantized_weight(torch.float32)
    ref = g.float().reshape(18, -1) @ w
    bound = g.float().abs().reshape(18, -1) @ w.abs()
    assert x.grad.dtype == torch.bfloat16
    assert torch.all((x.grad.float().reshape(18, -1) - ref).abs() <= 2 * EPS[torch.bfloat16] * bound + 1e-5)
    torch._dynamo.reset()
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with torch.no_grad():
        eager = q(x.detach())
        compiled = torch.compile(q, fullgraph=True, backend=backend)(x.detach())
    assert torch.equal(compiled, eager)
    assert any("bf16dot_blocked" in t for t in seen), seen


def test_shapes_it_does_not_serve_take_the_gemm_kernel():
    # named directly on a layer whose K is no multiple of 32, the op computes the layer by the gemm kernel
    q = _layer(QuantScheme(8, True, PerChannel(0)), torch.bfloat16, 64, 100, seed=2)
    x = torch.randn(5, 100, dtype=torch.bfloat16)
    with torch.no_grad():
        _assert_close(blocked.BLOCKED.linear(q.quantized_weight, x, "bf16dot"), x, q)


@pytest.mark.skipif(not gemv.dot_available(), reason="numba does not compile for a CPU with AVX512-BF16 here")
@pytest.mark.parametrize("scheme", [QuantScheme(4, False, PerGroup(128)), QuantScheme(4, True, PerGroup(32)),
                                    QuantScheme(4, False, PerChannel(0)), QuantScheme(3, False, PerGroup(64))],
                         ids=str)
@pytest.mark.parametrize("n, k", [(256, 4096), (192, 384), (128, 576)])  # 576: a ragged last group of 128
def test_one_bfloat16_row_of_4_bit_codes_goes_by_dot_products(scheme, n, k, monkeypatch):
    monkeypatch.setattr(amx, "available", lambda: False)
    q = _layer(scheme, torch.bfloat16, n, k, seed=n + k)
    spec = q.quantized_weight.spec
    assert blocked.BLOCKED.paths("cpu", torch.bfloat16, 1, scheme.bits, spec=spec)[-1] == "bf16dot"
    assert "bf16dot" not in blocked.BLOCKED.paths("cpu", torch.float16, 1, scheme.bits, spec=spec)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    b = q.quantized_weight.buffers
    with torch.no_grad():
        y = blocked.BLOCKED.linear(q.quantized_weight, x, "bf16dot")  # eager: the layer's one-row plan
        op = torch.ops.qtorch.bf16dot_blocked(blocked.pad_columns(x, b["qweight"].shape[1]), b["qweight"],
                                              b["scale"], b["zero_point"], spec.group,
                                              blocked.container_bits(spec.bits), n)  # compiled / autograd: the op
    assert torch.equal(y, op)
    _assert_close(y, x, q)


def test_one_row_8_bit_or_float16_is_not_offered(monkeypatch):
    monkeypatch.setattr(amx, "available", lambda: False)
    monkeypatch.setattr(gemv, "dot_available", lambda: True)
    monkeypatch.setattr(gemv, "planes_available", lambda: False)  # (a CPU with AVX512-BF16 has AVX-512)
    spec8 = _layer(QuantScheme(8, True, PerChannel(0)), torch.float32, 64, 256, seed=0).quantized_weight.spec
    spec4 = _layer(QuantScheme(4, True, PerGroup(64)), torch.float32, 64, 256, seed=0).quantized_weight.spec
    assert "bf16dot" not in blocked.BLOCKED.paths("cpu", torch.bfloat16, 1, 8, spec=spec8)
    assert "bf16dot" in blocked.BLOCKED.paths("cpu", torch.bfloat16, 1, 4, spec=spec4)
    assert "bf16dot" not in blocked.BLOCKED.paths("cpu", torch.float16, 1, 4, spec=spec4)
    assert "bf16dot" not in blocked.BLOCKED.paths("cpu", torch.float32, 1, 4, spec=spec4)
    monkeypatch.setattr(gemv, "dot_available", lambda: False)
    assert "bf16dot" not in blocked.BLOCKED.paths("cpu", torch.bfloat16, 1, 4, spec=spec4)


@runs_here
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_kernel_stores_its_sums_plus_the_bias(bits, dtype):
    # the epilogue: x's dtype's rounding of (the float32 sums + the float32 bias), bit for bit what .to() gives,
    # NaN where it is NaN
    q = _layer(QuantScheme(bits, False, PerGroup(64)), dtype, 192, 128, seed=60 + bits)
    ops = _operands(q)
    bias = (torch.randn(192) * 3).to(dtype)
    bias[0] = float("nan")
    x = torch.randn(20, 128, dtype=dtype)
    sums = bf16dot.bf16dot_linear(x, *ops, 192, out_dtype=torch.float32)
    got = bf16dot.bf16dot_linear(x, *ops, 192, bias=bias)
    want = (sums + bias.float()).to(dtype)
    nan = want.isnan()
    assert got.dtype == dtype and torch.equal(got.isnan(), nan) and nan.any()
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    with pytest.raises(TypeError, match="bias must be a CPU tensor of 192 values"):
        bf16dot.bf16dot_linear(x, *ops, 192, bias=bias[:5])


@runs_here
def test_a_layer_on_the_bf16dot_path_keeps_a_runner_that_adds_its_bias():
    # as on the amx path: later eager calls of the row bucket go to the runner, the bias added by the kernel; the
    # result is F.linear's within bfloat16's rounding
    torch.manual_seed(61)
    q = qtorch.W4A16Linear.from_linear(torch.nn.Linear(256, 96)).to(torch.bfloat16)
    w = q.quantized_weight
    key = ("cpu", torch.bfloat16, autotune.bucket_index(24))
    w._routes[key] = "bf16dot"
    x = torch.randn(2, 12, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        first = q(x)
        assert w._decoders.get(key) is not None
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(w), "linear", lambda *a, **k: pytest.fail("the runner was not taken"))
            again = q(x)
    assert torch.equal(first, again)
    ref = F.linear(x.float(), q.dequantized_weight(torch.float32), q.bias.float())
    bound = F.linear(x.float().abs(), q.dequantized_weight(torch.float32).abs(), q.bias.float().abs())
    assert torch.all((first.float() - ref).abs() <= EPS[torch.bfloat16] * bound + 1e-6)
