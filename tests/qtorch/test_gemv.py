"""qtorch.gemv: the one-row kernel of the blocked layouts, on torch's OpenMP team and on qcore's threads."""

import copy
import os
import sys

import numpy as np
import pytest
import torch

import qtorch
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from qtorch import _omp, autotune, gemv, planes
from qtorch.linear import QuantLinear
from qtorch.layouts import blocked, codec

from .test_layouts import CASES, _random_canonical


def _blocked(bits, sym, kind, g, n, k, tile, seed):
    q, s, z = _random_canonical(bits, sym, kind, n, k, g, seed=seed)
    kw = dict(bits=bits, symmetric=sym, kind=kind, group=g, out_features=n, in_features=k)
    w = codec.dequantize_canonical(q, s, z, axis=0 if kind != "group" else 1, **kw).double()
    wb, sb, zb = blocked.to_blocked(q, s, z, tile=tile, **kw)
    return w, wb, sb, zb


def _no_team(monkeypatch):
    monkeypatch.setattr(_omp, "_GOMP_PARALLEL", False)


@pytest.mark.parametrize("bits,sym,kind,g", CASES)
@pytest.mark.parametrize("k", [4, 100, 520])
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("team", [True, False])
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("wide", [False, True])
def test_one_row_matches_float64_reference(bits, sym, kind, g, k, tile, team, fold, wide, monkeypatch):
    if not team:
        _no_team(monkeypatch)
    if kind == "group" and k % g:
        g = 2 if k % 2 == 0 else 1
    n = 3 * tile
    w, wb, sb, zb = _blocked(bits, sym, kind, g, n, k, tile, seed=k + tile)
    assert gemv.eligible(bits, wb.shape[2])
    x = torch.randn(1, k)
    ref = (x.double() @ w.T)[0]
    sp, zp = blocked.blocked_params(sb, zb, n)
    gsize = g if kind == "group" else k
    out = gemv.gemv_blocked(x[0].numpy(), wb.numpy(), sp.numpy(), zp.numpy(), gsize, bits,
                            np.full(n, np.nan, np.float32), fold=fold, wide=wide)
    bound = (x.double().abs() @ w.abs().T)[0]  # code - zero point is exact: only the dot product rounds
    if fold:  # z * sum(x) subtracted per group: the rounding scales with the codes and zero points (< 2^bits)
        bound = (x.double().abs() @ (2.0 ** (bits + 1) * sp.T.double().repeat_interleave(gsize, dim=1)).T)[0]
    assert np.isfinite(out).all()
    assert torch.all((torch.from_numpy(out).double() - ref).abs() <= 1e-5 * bound + 1e-30)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("fold", [False, True])
def test_team_and_threads_give_the_same_bits(bits, fold, monkeypatch):
    w, wb, sb, zb = _blocked(bits, bits == 8, "group" if bits == 4 else "channel", 32 if bits == 4 else 1,
                             512, 256, 128, seed=bits)
    sp, zp = blocked.blocked_params(sb, zb, 512)
    x = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    g = 32 if bits == 4 else 256
    a = gemv.gemv_blocked(x, wb.numpy(), sp.numpy(), zp.numpy(), g, bits, np.empty(512, np.float32), fold=fold)
    _no_team(monkeypatch)
    b = gemv.gemv_blocked(x, wb.numpy(), sp.numpy(), zp.numpy(), g, bits, np.empty(512, np.float32), fold=fold)
    assert np.array_equal(a, b)  # every tile is computed by the same code, whoever claims it


@pytest.mark.parametrize("bits,sym,kind,g", CASES)
@pytest.mark.parametrize("k", [1, 7, 100, 520])
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("fold", [False, True])
def test_lane_width_and_prefetch_change_no_bit(bits, sym, kind, g, k, tile, fold):
    # 16-float (AVX-512) and 8-float vectors, with and without prefetching, run the same operations on each column
    # in the same order: forced on or off on any host (LLVM splits wide vectors where the CPU lacks them), the
    # results are equal bit for bit; ragged K, groups of 4 and zero points included
    if kind == "group" and k % g:
        g = 1
    n = 3 * tile
    w, wb, sb, zb = _blocked(bits, sym, kind, g, n, k, tile, seed=7 * k + tile)
    sp, zp = blocked.blocked_params(sb, zb, n)
    gsize = g if kind == "group" else k
    x = np.random.default_rng(k).standard_normal(k).astype(np.float32)
    outs = [gemv.gemv_blocked(x, wb.numpy(), sp.numpy(), zp.numpy(), gsize, bits, np.full(n, np.nan, np.float32),
                              fold=fold, wide=wide, prefetch=pf)
            for wide in (False, True) for pf in (0, 64, 4096)]
    assert np.isfinite(outs[0]).all()
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_the_host_decides_the_lane_width():
    from qtorch._ir import host_has
    assert gemv.WIDE == host_has("avx512f")
    w = qtorch.W4A16Linear.from_linear(torch.nn.Linear(256, 128)).quantized_weight
    assert w.hold_layout("blocked", torch.float32)
    assert blocked.BLOCKED.plan(w).wide == gemv.WIDE


@pytest.mark.parametrize("prefetch", [-64, 1.5, True, 1 << 30])
def test_a_bad_prefetch_distance_is_refused(prefetch):
    wb = np.ones((1, 128, 64), np.int8)
    with pytest.raises(ValueError, match="prefetch"):
        gemv.gemv_blocked(np.ones(128, np.float32), wb, np.ones((1, 64), np.float32), np.zeros((0, 0), np.uint8),
                          128, 8, np.empty(64, np.float32), prefetch=prefetch)


def test_eligibility_by_bytes_per_tile_row():
    assert gemv.eligible(8, 128) and gemv.eligible(8, 64) and not gemv.eligible(8, 32)
    assert gemv.eligible(4, 64) and gemv.eligible(4, 32) and not gemv.eligible(4, 16)
    assert not gemv.eligible(3, 64)


@pytest.mark.skipif(not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info()
                    or os.environ.get("QTORCH_OMP_TEAM") == "0",
                    reason="torch runs on GNU OpenMP only on Linux builds (and QTORCH_OMP_TEAM=0 opts out)")
def test_torch_openmp_team_is_found():
    assert _omp.available()


@pytest.mark.parametrize("cls", [qtorch.W8A16Linear, qtorch.W4A16Linear])
@pytest.mark.parametrize("shape", [(1, 256), (256,), (1, 1, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_single_row_forward_takes_the_one_row_kernel(cls, shape, dtype, monkeypatch, blocked_kernels):
    lin = torch.nn.Linear(256, 128, dtype=dtype)
    q = cls.from_linear(lin)
    assert q.weight_layout == "blocked"
    calls = []
    real, launch = gemv.run_plan, gemv.Launcher.__call__
    monkeypatch.setattr(gemv, "run_plan", lambda *a: calls.append("op") or real(*a))
    monkeypatch.setattr(gemv.Launcher, "__call__", lambda *a: calls.append("decoder") or launch(*a))
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        y = q(x)
        assert torch.equal(q(x), y)
    assert calls == ["op", "decoder"]  # the first call keeps the layer's decoder, which the next one takes
    ref = torch.nn.functional.linear(x.float(), q.dequantized_weight(torch.float32), q.bias.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]  # rounding of the output
    assert y.dtype == dtype and y.shape == ref.shape and torch.allclose(y.float(), ref, rtol=tol, atol=tol)


def test_zero_points_cost_no_precision():
    # codes and zero points near 128 with a positive input: subtracting z * sum(x) in float32 would lose ~1e-4 of
    # the result; subtracting in integers keeps the float32 rounding of the dot product itself
    rng = np.random.default_rng(0)
    n, k, tile = 128, 4096, 128
    q = torch.from_numpy(rng.integers(120, 137, (n, k), dtype=np.uint8))
    s = torch.full((n,), 0.01)
    z = torch.full((n,), 128, dtype=torch.uint8)
    kw = dict(bits=8, symmetric=False, kind="channel", group=1, out_features=n, in_features=k)
    w = codec.dequantize_canonical(q, s, z, axis=0, **kw).double()
    wb, sb, zb = blocked.to_blocked(q, s, z, tile=tile, **kw)
    sp, zp = blocked.blocked_params(sb, zb, n)
    x = torch.rand(k)
    out = gemv.gemv_blocked(x.numpy(), wb.numpy(), sp.numpy(), zp.numpy(), k, 8, np.empty(n, np.float32))
    ref = x.double() @ w.T
    assert torch.all((torch.from_numpy(out).double() - ref).abs() <= 1e-5 * (x.double().abs() @ w.abs().T))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_forked_child_runs_the_kernels_on_its_own_thread(dtype, monkeypatch):
    # an OpenMP team does not survive fork: after the parent used it, the child must not call into it (GNU OpenMP
    # would hang); the child runs the kernels on its calling thread (bfloat16: the integer variant where it runs)
    env = {"QTORCH_LAYOUT": "blocked"}
    if dtype == torch.bfloat16 and gemv.planes_available():
        env["QTORCH_PATH"] = "int8dot"
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env=env))
    q = qtorch.W4A16Linear.from_linear(torch.nn.Linear(512, 256, dtype=dtype))
    x = torch.randn(1, 512, dtype=dtype)
    with torch.no_grad():
        y = q(x)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        import signal
        signal.alarm(60)  # a hang ends the child instead of the test run
        code = 3
        try:
            assert _omp._IN_FORKED_CHILD
            with torch.no_grad():
                code = 0 if torch.equal(q(x), y) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _plain(monkeypatch):
    monkeypatch.setattr(blocked.BLOCKED, "plan", lambda weight: None)


@pytest.mark.parametrize("scheme", [QuantScheme(8, True, PerChannel(0)), QuantScheme(8, False, PerGroup(64)),
                                    QuantScheme(4, True, PerGroup(32)), QuantScheme(4, False, PerChannel(0)),
                                    QuantScheme(8, True, PerTensor())], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_layers_one_row_plan_gives_the_plain_paths_bits(scheme, dtype, monkeypatch, blocked_kernels):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128, dtype=dtype)
    q = QuantLinear.from_linear(lin, scheme)
    x = torch.randn(1, 256, dtype=dtype)
    with torch.no_grad():
        planned = q(x)
        with monkeypatch.context() as m:
            _plain(m)
            plain = q(x)
    assert torch.equal(planned, plain)
    has_plan = blocked.BLOCKED.plan(q.quantized_weight) is not None
    assert has_plan == (q.weight_layout == "blocked" and not isinstance(scheme.granularity, PerTensor))


@pytest.mark.parametrize("scheme", [QuantScheme(8, True, PerChannel(0)), QuantScheme(4, False, PerGroup(64)),
                                    QuantScheme(8, True, PerTensor())], ids=str)
def test_the_plan_follows_the_layers_buffers(scheme, blocked_kernels):
    # in place (load_state_dict), replaced (a copy of the layer), and copied layers: no stale plan
    torch.manual_seed(1)
    a = QuantLinear.from_linear(torch.nn.Linear(256, 128), scheme)
    b = QuantLinear.from_linear(torch.nn.Linear(256, 128), scheme)
    x = torch.randn(1, 256)
    with torch.no_grad():
        ya, yb = a(x), b(x)
        assert not torch.equal(ya, yb)
        c = copy.deepcopy(a)
        assert torch.equal(c(x), ya)
        a.load_state_dict(b.state_dict())  # copies into a's own buffers: same tensors, new values
        assert torch.equal(a(x), yb)
        assert torch.equal(c(x), ya)  # the copy kept its own weights
        c.load_state_dict(b.state_dict())
        assert torch.equal(c(x), yb)
        d = QuantLinear.from_linear(torch.nn.Linear(256, 128), scheme)
        d.bias = c.bias
        yd = d(x)
        for name in ("qweight", "scale", "zero_point"):  # replaced buffers
            c._buffers[name] = d._buffers[name].clone()
        assert torch.equal(c(x), yd)


@pytest.mark.parametrize("rows", [1, 7])
def test_after_a_call_starved_a_team_thread_the_kernels_run_on_the_calling_thread(rows, monkeypatch):
    # another process held a team thread's core, and the team's barrier waited for it: for a while, the calls
    # that follow do not wait for that core (qcore._team.thread_cap); the bits stay the same
    if not _omp.available():
        pytest.skip("no torch OpenMP team here")
    import time
    from qcore import _team
    from qtorch import gemm
    w, wb, sb, zb = _blocked(4, False, "group", 32, 256, 512, 64, seed=3)
    sp, zp = blocked.blocked_params(sb, zb, 256)
    x = np.random.default_rng(0).standard_normal((rows, 512)).astype(np.float32)

    def call():
        out = np.empty((rows, 256), np.float32)
        if rows == 1:
            return gemv.gemv_blocked(x[0], wb.numpy(), sp.numpy(), zp.numpy(), 32, 4, out[0])
        return gemm.gemm_blocked(x, wb.numpy(), sp.numpy(), zp.numpy(), 32, 4, out)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(_team, "_CAP", None)
        on_team = call()
        runs = []
        monkeypatch.setattr(_team, "run", lambda *a, **k: runs.append(a) or False)
        monkeypatch.setattr(_team, "_CAP", (time.monotonic() + 600, 1, 600.0))  # a starved call just now
        capped = call()
        assert runs == []
        monkeypatch.setattr(_omp._parallel, "DYNAMIC", False)  # a fixed thread count: the whole team regardless
        call()
        assert len(runs) == 1 and runs[0][2] == 2
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(on_team, capped)


@pytest.mark.skipif(not gemv.dot_available(), reason="numba does not compile for a CPU with AVX512-BF16 here")
@pytest.mark.parametrize("sym,kind,g", [(False, "group", 4), (True, "group", 32), (True, "channel", 1),
                                        (False, "tensor", 1), (False, "group", 128)])
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("team", [True, False])
def test_the_dot_variant_matches_float64_for_bfloat16_rows(sym, kind, g, tile, team, monkeypatch):
    # 4-bit codes of a bfloat16 row, two rows of K per vdpbf16ps: the float path's bound (the zero point folded)
    if not team:
        _no_team(monkeypatch)
    k = 512
    n = 3 * tile
    w, wb, sb, zb = _blocked(4, sym, kind, g, n, k, tile, seed=tile + g)
    x = torch.randn(1, k).to(torch.bfloat16).float()
    sp, zp = blocked.blocked_params(sb, zb, n)
    gsize = g if kind == "group" else k
    plan = gemv.Plan(wb.numpy(), sp.numpy(), zp.numpy(), gsize, 4, wb.data_ptr(), sp.data_ptr(), zp.data_ptr())
    assert plan.dot_ok
    xs = x[0].numpy()
    outs = {}
    for dot in (False, True):
        out = np.full(n, np.nan, np.float32)
        gemv.run_plan(plan, xs.ctypes.data, 0, out.ctypes.data, 0, True, dot)
        outs[dot] = torch.from_numpy(out).double()
    ref = (x.double() @ w.T)[0]
    bound = (x.double().abs() @ (2.0 ** 5 * sp.T.double().repeat_interleave(gsize, dim=1)).T)[0]
    for out in outs.values():
        assert torch.all((out - ref).abs() <= 1e-5 * bound + 1e-30)


def test_the_dot_variant_falls_back_where_the_layer_does_not_allow_it():
    # odd groups (a pair of K rows would straddle two) and 8-bit codes take the float path, bit for bit
    for bits, g, k in ((4, 3, 9), (8, 4, 64)):
        w, wb, sb, zb = _blocked(bits, False, "group", g, 128, k, 128, seed=1)
        sp, zp = blocked.blocked_params(sb, zb, 128)
        plan = gemv.Plan(wb.numpy(), sp.numpy(), zp.numpy(), g, bits, wb.data_ptr(), sp.data_ptr(), zp.data_ptr())
        assert not plan.dot_ok
        xs = torch.randn(k).to(torch.bfloat16).float().numpy()
        a, b = np.empty(128, np.float32), np.empty(128, np.float32)
        gemv.run_plan(plan, xs.ctypes.data, 0, a.ctypes.data, 0, True, False)
        gemv.run_plan(plan, xs.ctypes.data, 0, b.ctypes.data, 0, True, True)
        assert np.array_equal(a, b)


def _planes_call(plan, x, dot, okind=0):
    """run_plan on a bfloat16 / float16 row ``x`` (its own bits), float32 sums (or ``okind``'s) as a tensor."""
    out = torch.full((plan.N,), float("nan"), dtype=torch.float32 if okind == 0 else x.dtype)
    gemv.run_plan(plan, x.data_ptr(), gemv.TORCH_KINDS[x.dtype], out.data_ptr(), okind, True, dot)
    return out


@pytest.mark.parametrize("planes,xkind,dot", [(False, 0, True), (False, 1, True), (False, 2, False), (True, 0, False),
                                              (True, 1, True), (True, 2, True)])
def test_the_dot_flag_reaches_a_kernel_only_for_rows_it_takes(planes, xkind, dot, monkeypatch):
    # bfloat16 dot products (AVX512-BF16): rows of bfloat16 values, as bfloat16 or float32, never float16 ones; the
    # integer variant (AVX2, PLANES): 16-bit rows, split into two planes (float32 would need three)
    monkeypatch.setattr(gemv, "PLANES", planes)
    wb, scale, zp = np.ones((1, 128, 64), np.uint8), np.ones((1, 128), np.float32), np.zeros((1, 128), np.uint8)
    plan = gemv.Plan(wb, scale, zp, 128, 4, wb.ctypes.data, scale.ctypes.data, zp.ctypes.data)
    plan.dot_ok = True  # (as a layer the variant serves)
    assert bool(gemv._call_flags(plan, xkind, 0, True, True) & 4) == dot


@pytest.mark.skipif(not gemv.planes_available(), reason="numba does not compile for a CPU with AVX2 and without "
                                                         "AVX-512 here")
@pytest.mark.parametrize("sym,kind,g", [(False, "group", 8), (True, "group", 32), (False, "group", 40),
                                        (False, "group", 128), (True, "channel", 1), (False, "tensor", 1)])
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("team", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_integer_variant_is_within_the_rounding_of_x_into_planes(sym, kind, g, tile, team, dtype, monkeypatch):
    # x per block of inputs as q = round(x * 2^(14 - e)) (|x| < 2^e, the block's largest): exact integer sums of
    # q (code - z), so the one rounding beyond float32's is x's, at most 2^(e - 15) <= 2^-14 of the block's largest
    if not team:
        _no_team(monkeypatch)
    k = 640
    n = 3 * tile
    w, wb, sb, zb = _blocked(4, sym, kind, g, n, k, tile, seed=tile + g)
    x = (torch.randn(k) * torch.logspace(-3, 2, k)[torch.randperm(k)]).to(dtype)  # magnitudes far apart
    sp, zp = blocked.blocked_params(sb, zb, n)
    gsize = g if kind == "group" else k
    plan = gemv.Plan(wb.numpy(), sp.numpy(), zp.numpy(), gsize, 4, wb.data_ptr(), sp.data_ptr(), zp.data_ptr())
    assert plan.dot_ok
    out = _planes_call(plan, x, True).double()
    ref = x.double() @ w.T
    bsize = planes.block_size(gsize)
    block_max = x.double().abs().reshape(-1, bsize).amax(1).repeat_interleave(bsize)
    bound = 2.0 ** -14 * (block_max @ w.abs().T) + 1e-6 * (x.double().abs() @ w.abs().T) + 1e-30
    assert torch.all((out - ref).abs() <= bound)
    assert not torch.equal(out, _planes_call(plan, x, False).double())  # the float path: another rounding


@pytest.mark.skipif(not gemv.planes_available(), reason="numba does not compile for a CPU with AVX2 and without "
                                                         "AVX-512 here")
def test_the_integer_variant_rounds_x_below_its_blocks_resolution_away():
    # one input of each block of 32 is 1, the others 2^-20: within each block 2^-20 rounds to 0 (2^-15 is the
    # resolution), so every sum is exactly the codes of the first inputs; the float path keeps the small terms.
    # A NaN or an infinity cannot be split: such a row takes the float path
    k, n, g = 256, 128, 32
    w, wb, sb, zb = _blocked(4, False, "group", g, n, k, 128, seed=3)
    sp, zp = blocked.blocked_params(sb, zb, n)
    plan = gemv.Plan(wb.numpy(), sp.numpy(), zp.numpy(), g, 4, wb.data_ptr(), sp.data_ptr(), zp.data_ptr())
    x = torch.full((k,), 2.0 ** -20, dtype=torch.bfloat16)
    x[::g] = 1
    exact = torch.zeros(n)
    for c in range(0, k, g):  # group by group in float32, as the kernel adds them: (code - z) * scale each
        exact += w[:, c].float()
    assert torch.equal(_planes_call(plan, x, True), exact)
    assert not torch.equal(_planes_call(plan, x, False), exact)
    for bad, finite in ((float("nan"), False), (float("inf"), False), (1e30, True)):
        y = x.clone()
        y[5] = bad
        out = _planes_call(plan, y, True)
        assert _same(out, _planes_call(plan, y, False)) != finite


@pytest.mark.parametrize("sym,kind,g", [(False, "group", 4), (False, "group", 128), (False, "channel", 1),
                                        (True, "group", 32)])
@pytest.mark.parametrize("wide", [False, True])
def test_folded_4bit_codes_keep_the_exact_subtractions_bound(sym, kind, g, wide):
    # centred codes (code - 8) and (z - 8) sum(x) per group: every term at most 8 scales, as |code - z| <= 15 is
    # (without AVX-512, gemv.MASKED: codes masked in place, uncentred, z sum(x) folded: terms up to 15 scales): a
    # float32 row folds and stays within the float32 rounding of the exact path's own terms
    k, tile = 512, 128
    n = 2 * tile
    w, wb, sb, zb = _blocked(4, sym, kind, g, n, k, tile, seed=g + 7)
    x = torch.randn(1, k) * 3 + 1  # a mean far from 0: sum(x) large against the centred sums
    sp, zp = blocked.blocked_params(sb, zb, n)
    gsize = g if kind == "group" else k
    ref = (x.double() @ w.T)[0]
    out = gemv.gemv_blocked(x[0].numpy(), wb.numpy(), sp.numpy(), zp.numpy(), gsize, 4,
                            np.full(n, np.nan, np.float32), fold=True, wide=wide)
    scales = sp.T.double().repeat_interleave(gsize, dim=1)  # [n, k]
    bound = (x.double().abs() @ (16.0 * scales).T)[0]
    err = (torch.from_numpy(out).double() - ref).abs()
    assert torch.all(err <= 2 ** -20 * bound)


def _same(a, b):
    # the same values bit for bit, NaN where the other has NaN (whose payload no conversion promises)
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int16), b[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits,sym,kind,g", [(4, False, "group", 32), (4, True, "channel", 1), (8, False, "group", 64),
                                             (8, True, "channel", 1)])
@pytest.mark.parametrize("team", [True, False])
@pytest.mark.parametrize("dot", [False, True])
def test_half_rows_in_and_out_are_the_float32_call_rounded(dtype, bits, sym, kind, g, team, dot, monkeypatch):
    # the kernel widens a bfloat16/float16 row itself and rounds its own float32 sums into the output's dtype:
    # bit for bit the float32 call on x.float(), then .to(dtype), NaN and overflow included
    if not team:
        _no_team(monkeypatch)
    k, n = 256, 192
    w, wb, sb, zb = _blocked(bits, sym, kind, g, n, k, 64, seed=bits + g)
    sp, zp = blocked.blocked_params(sb, zb, n)
    gsize = g if kind == "group" else k
    plan = gemv.Plan(wb.numpy(), sp.numpy(), zp.numpy(), gsize, bits, wb.data_ptr(), sp.data_ptr(), zp.data_ptr())
    kind_ = gemv.TORCH_KINDS[dtype]
    torch.manual_seed(bits + g)  # rows whose float16 sums overflow in some columns, not all, whatever ran before
    for case in ("plain", "overflow", "nan"):
        x = (torch.randn(k) * (3e3 if case == "overflow" else 1.0)).clamp(-6e4, 6e4).to(dtype)  # sums past 65504
        if case == "nan":
            x[7] = float("nan")
        xf = x.float()
        ref = torch.empty(n)
        if dot and gemv.planes_available() and plan.dot_ok:  # the integer variant splits 16-bit rows only
            gemv.run_plan(plan, x.data_ptr(), kind_, ref.data_ptr(), 0, True, True)
        else:
            gemv.run_plan(plan, xf.data_ptr(), 0, ref.data_ptr(), 0, True, dot and dtype == torch.bfloat16)
        out = torch.full((n,), 5.0, dtype=dtype)
        gemv.run_plan(plan, x.data_ptr(), kind_, out.data_ptr(), kind_, True,
                      dot and (dtype == torch.bfloat16 or gemv.planes_available()))
        assert _same(out, ref.to(dtype))
        if case == "overflow" and dtype == torch.float16:
            assert torch.isinf(out).any() and torch.isfinite(out).any()
    assert torch.isnan(out.float()).all()  # a NaN of x reaches every column


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_row_with_strides_reads_only_its_elements(dtype):
    # a single row sliced from a wider tensor, and a column of a transposed one: the forward reads the row's values
    q = qtorch.W4A16Linear.from_linear(torch.nn.Linear(256, 128, dtype=dtype))
    wide = torch.randn(3, 512, dtype=dtype)
    with torch.no_grad():
        for x in (wide[1:2, 100:356], torch.randn(256, 2, dtype=dtype).t()[:1]):
            assert torch.equal(q(x), q(x.contiguous()))


@pytest.mark.parametrize("bits,sym,kind,g", [(4, False, "group", 32), (8, True, "channel", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("team,native", [(True, True), (True, False), (False, False)],
                         ids=["native", "python", "no-team"])
def test_a_launcher_gives_run_plans_bits_call_after_call_and_on_several_threads(bits, sym, kind, g, dtype, team,
                                                                               native, monkeypatch):
    # the decoder's launch reuses its blocks (refilled from the template): every call starts from an unclaimed block,
    # and calls on other threads at the same time each take a block of their own (the native launch's one block:
    # whoever finds it taken goes the Python way)
    import threading

    if not team:
        _no_team(monkeypatch)
    monkeypatch.setattr(gemv, "NATIVE_LAUNCH", native)
    k, n = 256, 192
    _, wb, sb, zb = _blocked(bits, sym, kind, g, n, k, 64, seed=bits)
    sp, zp = blocked.blocked_params(sb, zb, n)
    plan = gemv.Plan(wb.numpy(), sp.numpy(), zp.numpy(), g if kind == "group" else k, bits, wb.data_ptr(),
                     sp.data_ptr(), zp.data_ptr())
    kd = gemv.TORCH_KINDS[dtype]
    launch = gemv.Launcher(plan, kd, kd, True, dtype == torch.bfloat16)
    xs = [torch.randn(k).to(dtype) for _ in range(6)]
    refs = []
    for x in xs:
        ref = torch.empty(n, dtype=dtype)
        gemv.run_plan(plan, x.data_ptr(), kd, ref.data_ptr(), kd, True, dtype == torch.bfloat16)
        refs.append(ref)
    for _ in range(3):
        for x, ref in zip(xs, refs):
            out = torch.full((n,), 7.0, dtype=dtype)
            launch(x.data_ptr(), out.data_ptr())
            assert torch.equal(out, ref)
    if native and torch.get_num_threads() > 1:  # every call went natively: its block holds the last call's row
        assert launch.native is not None and not launch.free
        assert launch.native.blocks[0][gemv._X] == xs[-1].data_ptr()
    else:
        assert launch.native is None or torch.get_num_threads() < 2
        assert 1 <= len(launch.free) <= 4
    bad = []

    def worker(i):
        for _ in range(50):
            out = torch.empty(n, dtype=dtype)
            launch(xs[i].data_ptr(), out.data_ptr())
            if not torch.equal(out, refs[i]):
                bad.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad and len(launch.free) <= 4
