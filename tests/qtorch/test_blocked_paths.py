"""The blocked layout's paths (``numba``, ``tiles``, ``tiles_act``, and ``amx`` where the CPU has AMX): every one it
offers gives F.linear's numbers on this machine, is reached through the layer's dispatch, and stays one opaque op
under torch.compile with an input gradient."""

import pytest
import torch
import torch.nn.functional as F

import qtorch
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from qtorch import amx, autotune, bf16dot, gemv
from qtorch.layouts import blocked

EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}  # the dtype's rounding of a dot product
SCHEMES = [QuantScheme(8, True, PerChannel(0)), QuantScheme(4, False, PerGroup(32)), QuantScheme(8, False, PerTensor()),
           QuantScheme(4, True, PerChannel(0)), QuantScheme(4, True, PerGroup(64))]

pytestmark = pytest.mark.usefixtures("blocked_kernels")  # bf16 layers too: the blocked layout, whatever the CPU


def _layer(scheme, dtype, n=96, k=256, seed=0):
    torch.manual_seed(seed)
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(k, n, bias=False, dtype=dtype), scheme)
    assert q.weight_layout == "blocked"
    return q


def _assert_close(y, x, q):
    """|y - F.linear(x, W)| <= eps(dtype) * (|x| @ |W|.T), W the layer's dequantized weight in x's dtype."""
    ref = F.linear(x, q.dequantized_weight(x.dtype))
    bound = F.linear(x.float().abs(), q.dequantized_weight(torch.float32).abs())
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs()
    assert torch.all(err <= EPS[x.dtype] * bound + 1e-6), float((err - EPS[x.dtype] * bound).max())


def test_paths_offered(monkeypatch):
    # a CPU without AMX tiles or AVX512-BF16 (test_amx_offered_where_... below; tests/qtorch/test_bf16dot.py)
    monkeypatch.setattr(amx, "available", lambda: False)
    monkeypatch.setattr(bf16dot, "available", lambda: False)
    monkeypatch.setattr(gemv, "dot_available", lambda: False)
    monkeypatch.setattr(gemv, "planes_available", lambda: False)
    paths = blocked.BLOCKED.paths
    assert blocked.BLOCKED.tuned
    assert paths("cpu", torch.bfloat16, 128, 8) == ("numba", "tiles_act", "tiles")
    assert paths("cpu", torch.float16, 2, 4) == ("numba", "tiles_act", "tiles")
    assert paths("cpu", torch.bfloat16, 1000, 4) == ("tiles", "tiles_act")
    assert paths("cpu", torch.float32, 128, 8) == ("numba", "tiles")  # float32: tiles_act would be tiles itself
    assert paths("cpu", torch.float32, 1000, 8) == ("tiles",)
    assert paths("cpu", torch.bfloat16, 1, 8) == ("numba",)  # one row: the decoding kernel only
    assert paths("cuda", torch.bfloat16, 128, 8) == ("tiles",)
    for dt in (torch.float32, torch.bfloat16, torch.float16):  # the own path first, under its old name
        for rows in (1, 2, 16, 256, 257, 4096):
            assert paths("cpu", dt, rows, 8)[0] == blocked.BLOCKED.path("cpu", dt, rows, 8)


@pytest.mark.parametrize("usable", [True, False])
def test_amx_offered_where_the_process_may_use_tiles_last_at_every_row_count(usable, monkeypatch):
    monkeypatch.setattr(amx, "available", lambda: usable)
    spec = _layer(QuantScheme(8, True, PerChannel(0)), torch.float32).quantized_weight.spec
    ragged = _layer(QuantScheme(8, True, PerChannel(0)), torch.float32, k=100).quantized_weight.spec
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for rows in (1, 2, 16, 256, 257, 4096):
            names = blocked.BLOCKED.paths("cpu", dt, rows, 8)
            assert blocked.BLOCKED.paths("cpu", dt, rows, 8, spec=spec) == names  # a shape the kernel serves
            assert ("amx" in names) == usable and (names[-1] == "amx") == usable
            assert "amx" not in blocked.BLOCKED.paths("cpu", dt, rows, 8, spec=ragged)  # K % 32 != 0
    assert "amx" not in blocked.BLOCKED.paths("cuda", torch.bfloat16, 16, 8, spec=spec)
    assert "amx" not in blocked.BLOCKED.paths("cpu", torch.float64, 16, 8, spec=spec)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [2, 7, 300])
def test_every_path_matches_f_linear(scheme, dtype, rows):
    q = _layer(scheme, dtype, seed=rows)
    x = torch.randn(rows, 256, dtype=dtype)
    names = blocked.BLOCKED.paths("cpu", dtype, rows, scheme.bits)
    assert len(names) >= 1 + (dtype != torch.float32 or rows <= 256) + amx.available()
    with torch.no_grad():
        for name in names:
            _assert_close(blocked.BLOCKED.linear(q.quantized_weight, x, name), x, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tiles_act_computes_with_the_weight_rounded_to_the_activation_dtype(dtype):
    # the dequantized chunk is dequantize(...).to(dtype): the product equals one matmul with that weight
    q = _layer(QuantScheme(4, False, PerGroup(32)), dtype, n=64, k=128, seed=3)
    x = torch.randn(5, 128, dtype=dtype)
    with torch.no_grad():
        y = blocked.BLOCKED.linear(q.quantized_weight, x, "tiles_act")
    assert torch.equal(y, torch.mm(x, q.dequantized_weight(dtype).t().contiguous()))


@pytest.mark.skipif(not gemv.planes_available(), reason="numba does not compile for a CPU with AVX2 and without "
                                                         "AVX-512 here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_int8dot_is_offered_for_one_16bit_row_of_4bit_codes_and_taken_eager_and_compiled(dtype, monkeypatch):
    # offered where the one-row kernel's integer variant serves the layer (4-bit codes, tiles of 64+ columns,
    # groups with a block of x); forced, the layer takes it for one row, eagerly and as one opaque op compiled
    paths = blocked.BLOCKED.paths
    spec = _layer(QuantScheme(4, True, PerGroup(64)), dtype, n=128).quantized_weight.spec
    assert paths("cpu", dtype, 1, 4, spec) == ("numba", "int8dot")
    assert paths("cpu", torch.float32, 1, 4, spec) == ("numba",)
    assert paths("cpu", dtype, 1, 8, spec) == ("numba",)
    assert paths("cpu", dtype, 2, 4, spec)[-1] == paths("cpu", dtype, 4, 4, spec)[-1] == "int8dot"
    assert "int8dot" not in paths("cpu", dtype, 5, 4, spec)
    assert blocked.BLOCKED.traced_path("cpu", dtype, 2, 4, spec) == "numba"  # never traced for any row count
    narrow = _layer(QuantScheme(4, True, PerGroup(64)), dtype, n=96).quantized_weight.spec  # tiles of 32 columns
    assert paths("cpu", dtype, 1, 4, narrow) == ("numba",)
    env = {"QTORCH_PATH": "int8dot", "QTORCH_LAYOUT": "blocked"}
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env=env))
    taken = []
    real = blocked.BLOCKED.linear
    monkeypatch.setattr(blocked.BLOCKED, "linear", lambda w, x, p: taken.append(p) or real(w, x, p))
    q = _layer(QuantScheme(4, False, PerGroup(32)), dtype, n=128, seed=8)
    x = torch.randn(1, 256, dtype=dtype)
    with torch.no_grad():
        y = q(x)
    assert taken == ["int8dot"]
    _assert_close(y, x, q)
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        yc = torch.compile(q, fullgraph=True, backend=backend)(x)
    assert any("qtorch.int8dot_blocked_infer" in t for t in seen), seen
    assert torch.equal(yc, y)


@pytest.mark.skipif(not gemv.planes_available(), reason="numba does not compile for a CPU with AVX2 and without "
                                                         "AVX-512 here")
def test_int8dot_takes_two_rows_one_at_a_time_and_more_by_the_few_rows_kernel():
    # two sequences decoded together: each row the one-row integer variant's own bits; 3-4 rows (the same row
    # bucket) the few-rows kernel's, as numba; either way within bfloat16's rounding of F.linear
    q = _layer(QuantScheme(4, False, PerGroup(64)), torch.bfloat16, n=128, seed=9)
    w = q.quantized_weight
    with torch.no_grad():
        for rows in (2, 3, 4):
            x = torch.randn(rows, 256, dtype=torch.bfloat16)
            y = blocked.BLOCKED.linear(w, x, "int8dot")
            if rows <= blocked.INT8DOT_ROWS:
                want = torch.cat([blocked.BLOCKED.linear(w, x[i:i + 1], "int8dot") for i in range(rows)])
            else:
                want = blocked.BLOCKED.linear(w, x, "numba")
            assert torch.equal(y, want)
            _assert_close(y, x, q)


def test_chunks_cover_every_output_channel(monkeypatch):
    # several chunks of tiles (a small chunk budget): the same numbers as one chunk, in both paths
    q = _layer(QuantScheme(8, False, PerGroup(64)), torch.bfloat16, n=160, k=256, seed=4)
    x = torch.randn(9, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        whole = {p: blocked.BLOCKED.linear(q.quantized_weight, x, p) for p in ("tiles", "tiles_act")}
        monkeypatch.setattr(blocked, "_CHUNK_BYTES", 256 * 32 * 2 * 2)  # 2 tiles of 32 columns in bfloat16
        for p in ("tiles", "tiles_act"):
            assert torch.equal(blocked.BLOCKED.linear(q.quantized_weight, x, p), whole[p])


@pytest.mark.parametrize("path", ["tiles_act", "tiles"] + (["amx"] if amx.available() else []))
def test_a_forced_path_is_taken_by_the_layer_with_an_input_gradient(path, monkeypatch):
    env = {"QTORCH_PATH": path, "QTORCH_LAYOUT": "blocked"}  # the layout under test, not a measured one
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env=env))
    taken = []
    real = blocked.BLOCKED.linear
    monkeypatch.setattr(blocked.BLOCKED, "linear", lambda w, x, p: taken.append(p) or real(w, x, p))
    q = _layer(QuantScheme(4, False, PerGroup(32)), torch.bfloat16, seed=5)
    x = torch.randn(2, 6, 256, dtype=torch.bfloat16, requires_grad=True)
    y = q(x)
    assert taken == [path]
    _assert_close(y.detach().reshape(12, -1), x.detach().reshape(12, -1), q)
    g = torch.randn_like(y)
    y.backward(g)
    w = q.dequantized_weight(torch.float32)
    ref = g.float().reshape(12, -1) @ w
    bound = g.float().abs().reshape(12, -1) @ w.abs()
    assert x.grad.dtype == torch.bfloat16
    assert torch.all((x.grad.float().reshape(12, -1) - ref).abs() <= 2 * EPS[torch.bfloat16] * bound + 1e-5)


def test_tiles_act_is_one_opaque_op_under_torch_compile(monkeypatch):
    env = {"QTORCH_PATH": "tiles_act", "QTORCH_LAYOUT": "blocked"}
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env=env))
    torch._dynamo.reset()
    q = _layer(QuantScheme(8, True, PerChannel(0)), torch.bfloat16, seed=6)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    eager = q(x)  # the layer keeps its (forced) choice for this row bucket; tracing reads it
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    y = torch.compile(q, fullgraph=True, backend=backend)(x)
    assert torch.equal(y, eager)
    assert any("tiles_act_blocked" in t for t in seen), seen
    assert not any("dequant" in t for t in seen)  # no full-precision weight in the graph to fold


_OPS = {"numba": "gemm_blocked", "tiles": "tiles_blocked", "tiles_act": "tiles_act_blocked", "amx": "amx_blocked",
        "bf16dot": "bf16dot_blocked", "int8dot": "int8dot_blocked"}


@pytest.mark.parametrize("usable", [True, False], ids=["tile-kernels", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_trace_with_no_kept_path_takes_the_tile_kernel_for_several_rows(usable, dtype, monkeypatch):
    """Nothing is measured while tracing: a layer given straight to torch.compile takes the tile kernel its CPU
    offers (amx, else bf16dot) for 2+ rows, where measured 2-4x faster than the own path, and gemv for one row;
    with no tile kernel offered, the own path. With measuring off (``QTORCH_AUTOTUNE=0``) a trace takes the own
    path, as an eager call does."""
    if not usable:
        monkeypatch.setattr(amx, "available", lambda: False)
        monkeypatch.setattr(bf16dot, "available", lambda: False)
        monkeypatch.setattr(gemv, "dot_available", lambda: False)
    measuring = autotune.Dispatcher(cache_path=False, env={"QTORCH_LAYOUT": "blocked"})
    monkeypatch.setattr(autotune, "_DEFAULT", measuring)
    q = _layer(QuantScheme(8, True, PerChannel(0)), dtype, seed=7)
    spec = q.quantized_weight.spec
    for rows in (1, 16):
        torch._dynamo.reset()
        offered = blocked._tile_kernels_offered("cpu", dtype, rows, 8, spec)
        want = offered[0] if rows > 1 and offered else blocked.BLOCKED.path("cpu", dtype, rows, 8)
        assert bool(offered and rows > 1) == (want in ("amx", "bf16dot"))
        seen = []

        def backend(gm, inputs):
            seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward

        x = torch.randn(rows, 256, dtype=dtype)
        with torch.no_grad():
            y = torch.compile(q, fullgraph=True, backend=backend)(x)
        assert any(f"qtorch.{_OPS[want]}_infer" in t for t in seen), (want, seen)
        assert q.quantized_weight._routes == {}  # nothing measured or kept
        _assert_close(y, x, q)
    if usable and (amx.available() or bf16dot.available()):
        assert blocked.BLOCKED.traced_path("cpu", torch.bfloat16, 16, 8, spec) in ("amx", "bf16dot")
    # measuring off: the own path, traced as eager
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env={"QTORCH_AUTOTUNE": "0"}))
    torch._dynamo.reset()
    x = torch.randn(16, 256, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(torch.compile(q, fullgraph=True, backend="aot_eager")(x), q(x))


def test_the_ops_one_row_plan_is_kept_per_weight_and_never_keeps_it_alive():
    # the op path (compiled graphs, autograd) reuses the plan of the qweight tensor it is given, builds a new one
    # when the scale tensor changes, and drops it with the tensor
    import gc
    import weakref

    q = _layer(QuantScheme(4, False, PerGroup(32)), torch.float32, n=256)
    b, spec = q.quantized_weight.buffers, q.quantized_weight.spec
    assert gemv.eligible(4, b["qweight"].shape[2])  # tiles the one-row kernel reads
    x = torch.randn(1, spec.in_features)
    args = (b["qweight"], b["scale"], b["zero_point"], spec.group, 4, spec.out_features)
    y = blocked.gemm_blocked_impl(x, *args)
    plan = blocked._OP_PLANS[b["qweight"]][3]
    assert torch.equal(blocked.gemm_blocked_impl(x, *args), y) and blocked._OP_PLANS[b["qweight"]][3] is plan
    # later calls of one row go by a launch kept with the plan, one per dtype and dot flag, same bits as the plan's
    # call; a row whose elements are not adjacent is read as its contiguous copy
    assert set(blocked._OP_PLANS[b["qweight"]][4]) == {(torch.float32, False)}
    xs = torch.randn(spec.in_features, 2)[:, :1].t()
    assert xs.stride(-1) != 1 and torch.equal(blocked.gemm_blocked_impl(xs, *args), blocked.gemv_planned(xs, plan, 256))
    for dt in (torch.bfloat16, torch.float16):
        xd = x.to(dt)
        first = blocked.gemm_blocked_impl(xd, *args)
        assert torch.equal(blocked.gemm_blocked_impl(xd, *args), first)
        assert torch.equal(first, blocked.gemv_planned(xd, plan, 256))
    assert set(blocked._OP_PLANS[b["qweight"]][4]) == {(torch.float32, False), (torch.bfloat16, False),
                                                      (torch.float16, False)}
    scale2 = b["scale"].clone() * 2
    y2 = blocked.gemm_blocked_impl(x, b["qweight"], scale2, *args[2:])
    assert blocked._OP_PLANS[b["qweight"]][3] is not plan
    torch.testing.assert_close(y2, 2 * y)
    qw = b["qweight"].clone()
    blocked.gemm_blocked_impl(x, qw, *args[1:])
    ref = weakref.ref(qw)
    assert qw in blocked._OP_PLANS
    del qw
    gc.collect()
    assert ref() is None


def test_a_compiled_model_restores_the_grad_mode_it_was_called_in():
    m = torch.nn.Sequential(qtorch.W8A16Linear(64, 32))
    m[0].quantize(torch.randn(32, 64))
    cm = qtorch.compile(m, fullgraph=True, autotune=False)
    x = torch.randn(2, 64)
    for mode in (True, False):
        torch.set_grad_enabled(mode)
        try:
            assert not cm(x).requires_grad
            assert torch.is_grad_enabled() is mode
        finally:
            torch.set_grad_enabled(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 40])
def test_the_few_rows_kernel_adds_the_bias_as_the_layer_did(dtype, rows, monkeypatch):
    # float32 rows of several: the kernel stores sums plus bias; else the layer adds it after. Either way the bits
    # of the kernel's output plus the bias, as before
    env = {"QTORCH_PATH": "numba", "QTORCH_LAYOUT": "blocked"}
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env=env))
    torch.manual_seed(rows)
    lin = torch.nn.Linear(256, 96, dtype=dtype)
    q = qtorch.QuantLinear.from_linear(lin, QuantScheme(8, True, PerChannel(0)))
    x = torch.randn(rows, 256, dtype=dtype)
    with torch.no_grad():
        y = q(x)
        plain = blocked.BLOCKED.linear(q.quantized_weight, x, "numba")
    assert torch.equal(y, plain + q.bias.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_few_rows_runner_gives_the_kernels_numbers_and_drops_replaced_buffers(dtype, monkeypatch):
    env = {"QTORCH_PATH": "numba", "QTORCH_LAYOUT": "blocked"}
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env=env))
    torch.manual_seed(3)
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(256, 96, dtype=dtype), QuantScheme(4, False, PerGroup(64)))
    w = q.quantized_weight
    run = blocked.BLOCKED.runner(w, dtype, "numba")
    assert run is not None
    b = w.buffers
    for rows in (2, 7, 40, 7):  # a row count again: its kept block
        x = torch.randn(rows, 256, dtype=dtype)
        plain = blocked.gemm_blocked_impl(x, b["qweight"], b["scale"], b["zero_point"], 64, 4, 96)
        assert torch.equal(run(x, None), plain)
        assert torch.equal(run(x, q.bias), plain + q.bias.to(dtype))
        with torch.no_grad():  # the layer keeps the runner after its first call of the bucket: the same numbers
            assert torch.equal(q(x), plain + q.bias.to(dtype)) and torch.equal(q(x), plain + q.bias.to(dtype))
    b["qweight"] = b["qweight"].clone()
    assert run(torch.randn(3, 256, dtype=dtype), None) is None
