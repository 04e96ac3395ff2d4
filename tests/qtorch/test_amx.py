"""The blocked layout's AMX path (``qtorch.amx``): F.linear's numbers for every scheme the layout holds, tile width,
row count and K it serves, in float32, bfloat16 and float16; reached through the layer's dispatch as one opaque op
with an input gradient; not offered for the shapes it does not serve; usable in a forked child.

Tolerance: ``|y - F.linear(x, W)| <= eps * (|x| @ |W|.T)``, W the layer's dequantized weight in x's dtype, with
eps 1e-5 for float32 (the kernel's float32 sums of exact bfloat16 products, against oneDNN's float32 sums: both
round each partial sum; observed: below 3e-7 of that bound at K = 384 and 4096, as for the gemm kernel) and the
output rounding for bfloat16 / float16 (2^-6, 2^-9: the reference rounds W to that dtype, the kernel does not).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qtorch
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from qtorch import amx, autotune
from qtorch.layouts import blocked

pytestmark = [pytest.mark.skipif(not amx.available(), reason="the CPU has no AMX-BF16 tiles numba compiles for "
                                 "(or Linux refused the tile state): the amx path is not offered here"),
              pytest.mark.usefixtures("blocked_kernels")]

EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}
GRANULARITIES = {"tensor": PerTensor(), "channel": PerChannel(0), "g32": PerGroup(32), "g64": PerGroup(64),
                 "g128": PerGroup(128)}
ROWS = (1, 3, 15, 16, 17, 64, 100, 128, 300)
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
    """(K, tile width) pairs covering every K and width the granularity allows, and all rows between them."""
    size = getattr(GRANULARITIES[gran], "size", 32)
    ks = [k for k in KS if k % size == 0]
    widths = list(WIDTHS)
    for i, rows in enumerate(ROWS):
        yield ks[i % len(ks)], widths[i % len(widths)], rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gran", list(GRANULARITIES))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [8, 4])
def test_amx_path_matches_f_linear(bits, symmetric, gran, dtype):
    scheme = QuantScheme(bits, symmetric, GRANULARITIES[gran])
    layers = {}
    for k, width, rows in _cases(gran):
        q = layers.get((k, width))
        if q is None:
            q = layers[(k, width)] = _layer(scheme, dtype, WIDTHS[width], k, seed=k + width)
        assert blocked.blocked_tile(q.out_features) == width
        x = torch.randn(rows, k, dtype=dtype)
        assert "amx" in blocked.BLOCKED.paths("cpu", dtype, rows, bits, spec=q.quantized_weight.spec)
        with torch.no_grad():
            _assert_close(blocked.BLOCKED.linear(q.quantized_weight, x, "amx"), x, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_split_rows_sums_to_x_in_a_tiles(dtype):
    # the parts add up to x exactly (normal floats), rows in 16 x 32 tiles, padding rows zero
    x = (torch.randn(37, 96) * torch.logspace(-8, 8, 96)).to(dtype)
    p = amx.tile_rows(amx.split_rows(x), 96)
    assert p.shape == ({torch.float32: 3, torch.float16: 2, torch.bfloat16: 1}[dtype], 48, 96)
    assert torch.equal(p[:, :37].double().sum(0), x.double()) and not p[:, 37:].any()


def test_float32_accuracy_is_float32s_not_bfloat16s():
    # the three bfloat16 parts of x carry all of its bits: far below bfloat16's rounding (2^-9 of the bound)
    q = _layer(QuantScheme(8, True, PerChannel(0)), torch.float32, 256, 4096, seed=1)
    x = torch.randn(16, 4096)
    w = q.dequantized_weight(torch.float64)
    with torch.no_grad():
        y = blocked.BLOCKED.linear(q.quantized_weight, x, "amx")
    exact = x.double() @ w.t()
    bound = x.double().abs() @ w.abs().t()
    assert float(((y.double() - exact).abs() / bound).max()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_finite_inputs_give_what_f_linear_gives(dtype):
    # inf splits into (inf, 0, 0), not (inf, NaN, ...): a row with one inf is +-inf where F.linear's is
    q = _layer(QuantScheme(8, True, PerChannel(0)), dtype, 96, 64, seed=7)
    x = torch.randn(4, 64, dtype=dtype)
    x[0, 3], x[1, 5], x[2, 7] = float("inf"), float("-inf"), float("nan")
    with torch.no_grad():
        y = blocked.BLOCKED.linear(q.quantized_weight, x, "amx")
    ref = F.linear(x.float(), q.dequantized_weight(torch.float32))
    assert torch.equal(y[:3].isnan(), ref[:3].isnan()) and torch.equal(y[:2].isinf(), ref[:2].isinf())
    assert torch.equal(y[:2][ref[:2].isinf()].float(), ref[:2][ref[:2].isinf()])
    _assert_close(y[3:], x[3:], q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_in_chunks_give_the_same_numbers(dtype, monkeypatch):
    # chunks of 48 rows (3 tiles of 16) over 300 rows: every row computed as in one call, the last chunk ragged
    q = _layer(QuantScheme(4, False, PerGroup(64)), dtype, 96, 256, seed=8)
    x = torch.randn(300, 256, dtype=dtype)
    with torch.no_grad():
        whole = blocked.BLOCKED.linear(q.quantized_weight, x, "amx")
        monkeypatch.setattr(amx, "ROW_CHUNK", 48)
        assert torch.equal(blocked.BLOCKED.linear(q.quantized_weight, x, "amx"), whole)
    _assert_close(whole, x, q)


def test_kernel_on_numpy_operands_checks_them():
    wb = np.ones((1, 64, 16), np.int8)
    scale = np.ones((1, 16), np.float32)
    none = np.zeros((0, 0), np.uint8)
    out = np.empty((3, 16), np.float32)
    x = np.ones((3, 64), np.float32)
    assert np.array_equal(amx.amx_blocked(x, wb, scale, none, 64, 8, out), np.full((3, 16), 64, np.float32))
    with pytest.raises(ValueError, match="multiples of 32"):
        amx.amx_blocked(x, wb, np.ones((4, 16), np.float32), none, 16, 8, out)
    with pytest.raises(TypeError, match="x must be float32"):
        amx.amx_blocked(x.astype(np.float64), wb, scale, none, 64, 8, out)
    with pytest.raises(ValueError, match="out must be"):
        amx.amx_blocked(x, wb, scale, none, 64, 8, np.empty((2, 16), np.float32))


def _spec(n, k, scheme):
    return _layer(scheme, torch.float32, n, k, seed=0).quantized_weight.spec


@pytest.mark.parametrize("k, scheme", [(100, QuantScheme(8, True, PerChannel(0))),
                                       (96, QuantScheme(4, False, PerGroup(48))),
                                       (520, QuantScheme(8, False, PerTensor()))])
def test_shapes_it_does_not_serve_are_not_offered(k, scheme):
    spec = _spec(64, k, scheme)
    assert not amx.eligible(spec.in_features, spec.group)
    for rows in (1, 16, 300):
        assert "amx" not in blocked.BLOCKED.paths("cpu", torch.bfloat16, rows, scheme.bits, spec=spec)
    # named directly, it still computes the layer (by the gemm kernel)
    q = _layer(scheme, torch.float32, 64, k, seed=2)
    x = torch.randn(5, k)
    with torch.no_grad():
        _assert_close(blocked.BLOCKED.linear(q.quantized_weight, x, "amx"), x, q)


def test_offered_at_every_row_count_on_cpu_only():
    spec = _spec(64, 256, QuantScheme(8, True, PerChannel(0)))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for rows in (1, 2, 16, 256, 257, 4096):
            names = blocked.BLOCKED.paths("cpu", dt, rows, 8, spec=spec)
            assert names[-1] == "amx" and names[0] == blocked.BLOCKED.path("cpu", dt, rows, 8)
    assert "amx" not in blocked.BLOCKED.paths("cuda", torch.bfloat16, 16, 8, spec=spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_forced_amx_path_is_taken_by_the_layer_with_an_input_gradient(dtype, monkeypatch):
    env = {"QTORCH_PATH": "amx", "QTORCH_LAYOUT": "blocked"}
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env=env))
    taken = []
    real = blocked.BLOCKED.linear
    monkeypatch.setattr(blocked.BLOCKED, "linear", lambda w, x, p: taken.append(p) or real(w, x, p))
    q = _layer(QuantScheme(4, False, PerGroup(32)), dtype, 96, 256, seed=5)
    x = torch.randn(2, 9, 256, dtype=dtype, requires_grad=True)
    y = q(x)
    assert taken == ["amx"]
    with torch.no_grad():
        direct = real(q.quantized_weight, x.detach().reshape(18, -1), "amx")
    assert torch.equal(y.detach().reshape(18, -1), direct)  # the op computes what its body does
    _assert_close(direct, x.detach().reshape(18, -1), q)
    g = torch.randn_like(y)
    y.backward(g)
    w = q.dequantized_weight(torch.float32)
    ref = g.float().reshape(18, -1) @ w
    bound = g.float().abs().reshape(18, -1) @ w.abs()
    assert x.grad.dtype == dtype
    assert torch.all((x.grad.float().reshape(18, -1) - ref).abs() <= 2 * EPS[dtype] * bound + 1e-5)


def test_amx_is_one_opaque_op_under_torch_compile(monkeypatch):
    env = {"QTORCH_PATH": "amx", "QTORCH_LAYOUT": "blocked"}
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env=env))
    torch._dynamo.reset()
    q = _layer(QuantScheme(8, True, PerChannel(0)), torch.bfloat16, 96, 256, seed=6)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    eager = q(x)
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    y = torch.compile(q, fullgraph=True, backend=backend)(x)
    assert torch.equal(y, eager)
    assert any("amx_blocked" in t for t in seen), seen
    assert not any("dequant" in t for t in seen)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_the_amx_path():
    # the tile state Linux granted the parent is inherited: the child's first tile instruction is no SIGILL; 300
    # rows of float32 are split on the parent's thread team, and in the child (where a libgomp team would hang)
    # on the calling thread
    script = textwrap.dedent("""
        import os, sys, torch
        import qtorch
        from qcore import PerChannel, QuantScheme
        from qtorch.layouts import blocked
        q = qtorch.QuantLinear.from_linear(torch.nn.Linear(256, 128, bias=False), QuantScheme(8, True, PerChannel(0)))
        x = torch.randn(300, 256)
        with torch.no_grad():
            parent = blocked.BLOCKED.linear(q.quantized_weight, x, "amx")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            with torch.no_grad():
                child = blocked.BLOCKED.linear(q.quantized_weight, x, "amx")
            os.write(w, b"ok" if torch.equal(child, parent) else b"differs")
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(os.read(r, 16).decode(), status)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["ok", "0"], (res.stdout, res.stderr[-2000:])


def test_a_layer_whose_shape_amx_does_not_serve_is_never_timed_under_that_name(monkeypatch):
    # K = 100 is no multiple of 32: the layer's dispatcher must not be offered "amx" (it would time the gemm
    # fallback under that name and record a misleading decision)
    d = autotune.Dispatcher(cache_path=False, env={"QTORCH_LAYOUT": "blocked"})
    monkeypatch.setattr(autotune, "_DEFAULT", d)
    q = _layer(QuantScheme(8, True, PerChannel(0)), torch.float32, 64, 100, seed=7)
    with torch.no_grad():
        q(torch.randn(16, 100))
    offered = [set(v["ms"]) for k, v in d.decisions().items() if not k.startswith("layout|")]
    assert offered and all("amx" not in names for names in offered)


def _every_code_case(bits, nt, asym, k=64, gsize=32, seed=0):
    """Operands of the blocked layout (``nt`` channels a tile, two tiles) holding every code, and every code with
    every zero point, plus the exact dequantized weight ``[K, N]`` (float64: scales are powers of two)."""
    n = 2 * nt
    kk, nn = np.meshgrid(np.arange(k), np.arange(n), indexing="ij")
    g = np.arange(k // gsize)[:, None]
    scale = (2.0 ** -(1 + (np.arange(n)[None, :] + g) % 5)).astype(np.float32)
    if bits == 4:
        codes = (kk + 3 * nn + kk // 16) % 16
        zp = ((7 * np.arange(n)[None, :] + 5 * g) % 16).astype(np.uint8) if asym else np.zeros((0, 0), np.uint8)
        t = codes.reshape(k, 2, nt).transpose(1, 0, 2)  # [T, K, NT]
        wb = (t[:, :, :nt // 2] | t[:, :, nt // 2:] << 4).astype(np.uint8)
        z = zp[kk // gsize, nn] if asym else np.full((k, n), 8)
    else:
        codes = (16 * kk + nn + kk // 8) % 256
        if not asym:
            codes = codes - 128  # every int8 value, -128 included
        zp = ((37 * np.arange(n)[None, :] + 101 * g) % 256).astype(np.uint8) if asym else np.zeros((0, 0), np.uint8)
        wb = codes.reshape(k, 2, nt).transpose(1, 0, 2).astype(np.uint8 if asym else np.int8)
        z = zp[kk // gsize, nn] if asym else np.zeros((k, n))
    deq = (codes - z) * scale[kk // gsize, nn].astype(np.float64)
    return np.ascontiguousarray(wb), scale, zp, gsize, deq


@pytest.mark.parametrize("bits, nt, asym", [(4, nt, asym) for nt in (16, 32, 64, 128) for asym in (True, False)]
                         + [(8, nt, asym) for nt in (16, 64, 128) for asym in (True, False)])
def test_every_code_and_zero_point_converts_exactly(bits, nt, asym):
    # one-hot rows of x read the weight back row by row: (code - zp) * scale exactly, for every code and every zero
    # point of the width, at 16 rows (4 strips per A tile) and 64 rows (2 x 2 tiles); all groups of 32 rows
    wb, scale, zp, gsize, deq = _every_code_case(bits, nt, asym)
    k, n = deq.shape
    for rows in (16, 64):
        x = np.eye(rows, k, dtype=np.float32)
        out = amx.amx_blocked(x, wb, scale, zp, gsize, bits, np.empty((rows, n), np.float32))
        np.testing.assert_array_equal(out, deq[:rows].astype(np.float32))


def _dequantized_panel_case(bits):
    # a grouped layer and 64 bfloat16 rows: the calls that multiply dequantized bfloat16 panels
    q = _layer(QuantScheme(bits, False, PerGroup(64)), torch.bfloat16, 96, 256, seed=11)
    torch.manual_seed(12)
    return q, torch.randn(64, 256, dtype=torch.bfloat16)


def test_fallback_conversions_without_avx512_bf16_or_bw_give_the_same_numbers(tmp_path):
    # the code numba builds where the CPU lacks AVX512-BF16 (float32 -> bfloat16 by the bits, rounded to nearest
    # even) or AVX512-BW (no vpermw table): compiled here in a child with both switched off and an empty numba
    # cache, it reads every code back exactly and gives the dequantized-panel calls' numbers bit for bit
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import torch
        from qtorch import amx, autotune, layouts
        from qtorch.layouts import blocked
        amx._CVT = amx._BW = False
        # as the fixtures set it in this process: the blocked layout, and no measured (or user-cached) dispatch
        layouts.TORCH_PACK_KERNELS = False
        autotune._DEFAULT = autotune.Dispatcher(cache_path=False, env={"QTORCH_AUTOTUNE": "0"})
        sys.path.insert(0, sys.argv[1])
        import test_amx
        for bits, nt, asym in ((4, 16, True), (4, 64, False), (8, 64, False), (8, 16, True)):
            wb, scale, zp, gsize, deq = test_amx._every_code_case(bits, nt, asym)
            x = np.eye(16, deq.shape[0], dtype=np.float32)
            out = amx.amx_blocked(x, wb, scale, zp, gsize, bits, np.empty((16, deq.shape[1]), np.float32))
            assert np.array_equal(out, deq[:16].astype(np.float32)), (bits, nt, asym)
        for bits in (4, 8):
            q, x = test_amx._dequantized_panel_case(bits)
            with torch.no_grad():
                y = blocked.BLOCKED.linear(q.quantized_weight, x, "amx")
            np.save(sys.argv[2] + f"/y{bits}.npy", y.float().numpy())
        print("ok")
    """)
    # the child runs the layouts' own paths with no dispatch file, as the tests here do (a measured layout choice
    # could put the layer elsewhere than on the blocked layout)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), NUMBA_CACHE_DIR=str(tmp_path),
               QTORCH_AUTOTUNE="0", QTORCH_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0 and res.stdout.split() == ["ok"], res.stderr[-3000:]
    for bits in (4, 8):
        q, x = _dequantized_panel_case(bits)
        assert amx.dequantizes(x.dtype, 64, 256, 64)
        with torch.no_grad():
            y = blocked.BLOCKED.linear(q.quantized_weight, x, "amx")
        assert torch.equal(torch.from_numpy(np.load(tmp_path / f"y{bits}.npy")), y.float())
        _assert_close(y, x, q)


def test_dequantized_panels_are_the_bfloat16_weight():
    # 64 bfloat16 rows of a grouped layer: the kernel's float32 sums (before the output's rounding) are those of
    # the dequantized weight rounded to bfloat16, as F.linear's bfloat16 weight is (exact codes would be 2^-9 off)
    for bits in (4, 8):
        q, x = _dequantized_panel_case(bits)
        spec, b = q.quantized_weight.spec, q.quantized_weight.buffers
        scale, zp = blocked.blocked_params(b["scale"], b["zero_point"], spec.out_features)
        y = amx.amx_linear(x, b["qweight"], scale, zp, spec.group, bits, spec.out_features)
        w = q.dequantized_weight(torch.bfloat16).double()
        exact, bound = x.double() @ w.t(), x.double().abs() @ w.abs().t()
        assert y.dtype == torch.float32
        assert float(((y.double() - exact).abs() / bound).max()) < 1e-6


def _direct(q, x):
    b, spec = q.quantized_weight.buffers, q.quantized_weight.spec
    scale, zp = blocked.blocked_params(b["scale"], b["zero_point"], spec.out_features)
    return amx.amx_linear(x, b["qweight"], scale, zp, spec.group, spec.bits, spec.out_features)


def test_returned_outputs_never_share_the_reused_parts_buffer():
    # the calling thread's parts buffer serves every call; what a call returns is its own: a later call (larger,
    # smaller, another layer) leaves it as it was
    q1 = _layer(QuantScheme(8, True, PerChannel(0)), torch.float32, 96, 384, seed=20)
    q2 = _layer(QuantScheme(4, False, PerGroup(128)), torch.float32, 192, 256, seed=21)
    xs = [torch.randn(rows, 384) for rows in (104, 17, 300)] + [torch.randn(33, 256)]
    ys = [_direct(q1, x) for x in xs[:3]] + [_direct(q2, xs[3])]
    kept = [y.clone() for y in ys]
    for x, y in zip(xs[:3], ys[:3]):
        assert torch.equal(_direct(q1, x), y)
    assert torch.equal(_direct(q2, xs[3]), ys[3])
    assert all(torch.equal(y, k) for y, k in zip(ys, kept))
    assert len({y.data_ptr() for y in ys}) == len(ys)
    buf = amx._SCRATCH.buf
    assert buf is not None and all(not (buf.ctypes.data <= y.data_ptr() < buf.ctypes.data + buf.nbytes) for y in ys)
    for x, k in zip(xs[:3], kept[:3]):
        _assert_close(k, x, q1)


def test_padding_rows_of_a_reused_parts_buffer_are_zeroed():
    # a call of 300 rows of NaN fills the buffer; a call of 17 rows then splits into it: its 15 padding rows are
    # zeros again, not the NaNs left before
    q = _layer(QuantScheme(8, True, PerChannel(0)), torch.float32, 96, 64, seed=22)
    _direct(q, torch.full((300, 64), float("nan")))
    x = torch.randn(17, 64)
    y = _direct(q, x)
    parts = torch.from_numpy(amx._SCRATCH.buf[:3 * 2 * 16 * 64].copy()).view(torch.bfloat16).reshape(3, 2, 16 * 64)
    p = amx.tile_rows(parts, 64)
    assert not p[:, 17:].isnan().any() and not p[:, 17:].any()
    assert torch.equal(p[:, :17], amx.tile_rows(amx.split_rows(x), 64)[:, :17])
    _assert_close(y, x, q)


def test_a_call_re_entered_on_the_same_thread_uses_a_buffer_of_its_own():
    # a call that finds this thread's buffer in use (a signal handler or finalizer running a layer mid-call)
    # splits into a fresh one: the buffer of the call it interrupted is left as it is
    q = _layer(QuantScheme(8, True, PerChannel(0)), torch.float32, 96, 64, seed=23)
    _direct(q, torch.randn(40, 64))
    before = amx._SCRATCH.buf.copy()
    amx._SCRATCH.busy = True
    try:
        x = torch.randn(20, 64)
        y = _direct(q, x)
        assert np.array_equal(amx._SCRATCH.buf, before) and amx._SCRATCH.busy
    finally:
        amx._SCRATCH.busy = False
    _assert_close(y, x, q)


def test_two_threads_two_layers_give_their_own_numbers():
    # each thread splits into its own buffer: calls of two layers on two threads at once give what each gives alone
    import threading
    layers = [_layer(QuantScheme(8, True, PerChannel(0)), torch.float32, 96, 384, seed=24),
              _layer(QuantScheme(4, False, PerGroup(64)), torch.float16, 192, 256, seed=25)]
    inputs = [[torch.randn(rows, 384) for rows in (104, 7)], [torch.randn(rows, 256, dtype=torch.float16)
                                                               for rows in (33, 64)]]
    expected = [[_direct(q, x) for x in xs] for q, xs in zip(layers, inputs)]
    bad = []

    def work(i):
        for r in range(60):
            x = inputs[i][r % 2]
            if not torch.equal(_direct(layers[i], x), expected[i][r % 2]):
                bad.append((i, r))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and bad == []


def test_one_thread_gives_the_team_s_numbers():
    # with torch on one thread the team kernel runs on the calling thread: the same units, the same numbers
    q = _layer(QuantScheme(4, True, PerGroup(128)), torch.float32, 256, 384, seed=26)
    x = torch.randn(104, 384)
    threads = torch.get_num_threads()
    team = _direct(q, x)
    try:
        torch.set_num_threads(1)
        alone = _direct(q, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, team)
    _assert_close(alone, x, q)


@pytest.mark.parametrize("scheme", [QuantScheme(8, True, PerChannel(0)), QuantScheme(4, False, PerGroup(32))],
                         ids=["w8-channel", "w4-g32"])
def test_a_team_claiming_whole_tiles_gives_every_unit_s_numbers(scheme):
    # 8 tiles of 128 channels (2 units each) for 2 threads: the team claims tiles, a chunk runs both its units;
    # a unit skipped or run twice shows against one thread's numbers (units claimed alone) and F.linear
    q = _layer(scheme, torch.bfloat16, 1024, 128, seed=27)
    x = torch.randn(48, 128, dtype=torch.bfloat16)
    b = q.quantized_weight.buffers["qweight"]
    T, _, W = b.shape
    assert amx._chunks(T, amx._units(T, W, scheme.bits), 2) == T < amx._units(T, W, scheme.bits)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        team = _direct(q, x)
        torch.set_num_threads(1)
        alone = _direct(q, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(team, alone)
    _assert_close(team.to(x.dtype), x, q)


def test_the_kernel_reads_its_operands_in_their_fields(monkeypatch):
    # _run writes OPERANDS' fields by position: each lands in the field of its name
    q = _layer(QuantScheme(8, False, PerChannel(0)), torch.bfloat16, 96, 64, seed=27)
    seen = []
    real = amx._omp.new_block
    monkeypatch.setattr(amx._omp, "new_block", lambda n, t, ops: seen.append(ops) or real(n, t, ops))
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    y = _direct(q, x)
    b = q.quantized_weight.buffers
    ops = dict(zip(amx.OPERANDS.fields, seen[0]))
    assert ops["parts"] == 1 and ops["M"] == 16 and ops["K"] == 64 and ops["x"] == x.data_ptr()
    assert ops["out"] == y.data_ptr() and ops["wb"] == b["qweight"].data_ptr() and ops["flags"] & 255 == 8
    assert ops["T"] * ops["W"] == 96 and ops["gsize"] == 64 and ops["flags"] >> 16 == 1  # zero point rows
    assert ops["bias"] == 0 and ops["flags"] >> 10 & 7 == 0  # no bias; float32 out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_meta_default_device_does_not_move_the_kernels_buffers(dtype):
    # layouts are timed while a model is built under torch.device("meta"); the kernel's output and split buffers
    # were allocated on the default device, and the kernel wrote through a meta tensor's null address (a crash)
    q = _layer(QuantScheme(8, True, PerGroup(64)), dtype, 48, 128, seed=5)
    x = torch.randn(20, 128, dtype=dtype)
    with torch.no_grad():
        want = blocked.BLOCKED.linear(q.quantized_weight, x, "amx")
        with torch.device("meta"):
            got = blocked.BLOCKED.linear(q.quantized_weight, x, "amx")
            parts = amx.split_rows(x.float())
    assert got.device.type == "cpu" and torch.equal(got, want)
    assert parts.device.type == "cpu"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_kernel_stores_its_sums_plus_the_bias_in_the_output_dtype(bits, dtype):
    # the epilogue: out_dtype's rounding of (the float32 sums + the float32 bias), bit for bit what .to() gives,
    # infinities included, NaN where it is NaN; rows 20 (a split, a padded block) and 32 (bfloat16: tiles read from x itself)
    q = _layer(QuantScheme(bits, False, PerGroup(64)), dtype, 192, 128, seed=40 + bits)
    b, spec = q.quantized_weight.buffers, q.quantized_weight.spec
    scale, zp = blocked.blocked_params(b["scale"], b["zero_point"], spec.out_features)
    bias = (torch.randn(192) * 3).to(dtype)
    bias[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for rows in (20, 32):
        x = torch.randn(rows, 128, dtype=dtype) * 2
        x[1, 5] = float("nan")
        sums = amx.amx_linear(x, b["qweight"], scale, zp, spec.group, bits, spec.out_features)
        for with_bias in (False, True):
            want = (sums + bias.float() if with_bias else sums).to(dtype)
            got = amx.amx_linear(x, b["qweight"], scale, zp, spec.group, bits, spec.out_features,
                                 bias=bias if with_bias else None, out_dtype=dtype)
            assert got.dtype == dtype and got.shape == want.shape
            nan = want.isnan()  # (a NaN's payload: torch's own conversions differ there, by CPU and path)
            assert nan.any() and torch.equal(got.isnan(), nan)
            as_int = torch.int16 if dtype != torch.float32 else torch.int32
            assert torch.equal(got.view(as_int)[~nan], want.view(as_int)[~nan])


def test_a_bad_bias_or_output_dtype_is_refused():
    q = _layer(QuantScheme(8, True, PerChannel(0)), torch.float32, 48, 64, seed=44)
    b, spec = q.quantized_weight.buffers, q.quantized_weight.spec
    scale, zp = blocked.blocked_params(b["scale"], b["zero_point"], spec.out_features)
    x = torch.randn(4, 64)
    with pytest.raises(TypeError, match="bias a CPU tensor of 48 values"):
        amx.amx_linear(x, b["qweight"], scale, zp, spec.group, 8, 48, bias=torch.zeros(47))
    with pytest.raises(TypeError, match="out_dtype must be"):
        amx.amx_linear(x, b["qweight"], scale, zp, spec.group, 8, 48, out_dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_layer_with_a_bias_adds_it_in_the_kernel_and_still_differentiates_it(dtype):
    # eager calls without a gradient take the fused bias: F.linear's numbers, float32 ones bit for bit those of
    # the kernel's sums plus the bias; with a gradient to record (x or a bias that requires one) the layer adds
    # the bias itself, and autograd differentiates it
    lin = torch.nn.Linear(128, 192).to(dtype)
    q = qtorch.W8A16Linear.from_linear(lin)
    w = q.quantized_weight
    w._routes = {("cpu", dtype, autotune.bucket_index(24)): "amx"}
    x = torch.randn(24, 128, dtype=dtype)
    calls = []
    real = amx.amx_linear
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(amx, "amx_linear", lambda *a, **k: calls.append(k.get("bias")) or real(*a, **k))
        with torch.no_grad():
            y = q(x)
    assert len(calls) == 1 and calls[0] is q.bias
    ref = F.linear(x, q.dequantized_weight(dtype), q.bias)
    bound = F.linear(x.float().abs(), q.dequantized_weight(torch.float32).abs(), q.bias.float().abs())
    assert torch.all((y.float() - ref.float()).abs() <= EPS[dtype] * bound + 1e-6)
    if dtype == torch.float32:
        with torch.no_grad():
            assert torch.equal(y, blocked.BLOCKED.linear(w, x, "amx") + q.bias)
    xg = x.clone().requires_grad_()
    q(xg).sum().backward()
    assert xg.grad is not None and torch.allclose(xg.grad.float(), q.dequantized_weight(dtype).float().sum(0)
                                                  .expand(24, 128), rtol=1e-2, atol=1e-2)
    bias = torch.nn.Parameter(q.bias.detach().clone())
    q._buffers["bias"] = bias
    q(x).sum().backward()
    assert bias.grad is not None and torch.equal(bias.grad, torch.full_like(bias, 24))


def test_a_layers_later_calls_of_several_rows_take_its_runner_and_see_a_replaced_weight():
    # the first eager call of a row bucket keeps the layout's runner (the AMX call, the weight's operands read once);
    # later calls of that bucket go straight to it, 2-d and 3-d, contiguous or not, with the result of linear();
    # buffers replaced (load_state_dict of another weight) are seen: the runner is dropped and made again
    torch.manual_seed(50)
    lin, other = torch.nn.Linear(128, 96), torch.nn.Linear(128, 96)
    q = qtorch.W8A16Linear.from_linear(lin)
    w = q.quantized_weight
    for bucket in (autotune.bucket_index(24), autotune.bucket_index(40)):
        w._routes[("cpu", torch.float32, bucket)] = "amx"
    x = torch.randn(2, 12, 128)
    with torch.no_grad():
        first = q(x)
        assert ("cpu", torch.float32, autotune.bucket_index(24)) in w._decoders
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(w), "linear", lambda *a, **k: pytest.fail("the runner was not taken"))
            again, flat = q(x), q(x.reshape(24, 128))
            strided = q(torch.randn(128, 24).t())
        assert torch.equal(first, again) and torch.equal(flat, first.reshape(24, 96))
        assert torch.equal(first, w.linear(x) + q.bias)
        assert strided.shape == (24, 96)
        q.load_state_dict(qtorch.W8A16Linear.from_linear(other).state_dict())
        want = F.linear(x, q.dequantized_weight(), q.bias)
        got = q(x)
    assert not torch.equal(got, first)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_on_lines_starts_an_array_on_a_64_byte_line():
    """The A tiles' 64-byte rows each load one line only where their array starts on one (NumPy aligns to 16
    bytes): the parts buffer, vnni8's planes and vnni_amx's scratch all come from here."""
    for n, dtype in ((1, np.int16), (512, np.int16), (3 * 16 * 4096 + 7, np.int16), (100, np.int8),
                     (33, np.float32)):
        buf = amx.on_lines(n, dtype)
        assert buf.ctypes.data % 64 == 0 and buf.dtype == dtype and buf.size == n and buf.flags.c_contiguous
