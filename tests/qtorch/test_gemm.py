"""qtorch.gemm: the register-blocked few-rows kernel of the blocked layouts, on torch's team and on qcore's threads."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtorch import _omp, gemm
from qtorch.layouts import blocked, codec

from .test_layouts import CASES, _random_canonical


@pytest.mark.parametrize("bits,sym,kind,g", CASES)
@pytest.mark.parametrize("k", [4, 300, 520])  # 520: more than one block of K (gemm.KB) per group or channel
@pytest.mark.parametrize("tile,rows", [(16, 1), (64, 7), (128, 13), (16, 130)])
@pytest.mark.parametrize("team", [True, False])
def test_matches_float64_reference(bits, sym, kind, g, k, tile, rows, team, monkeypatch):
    if not team:
        monkeypatch.setattr(_omp, "_GOMP_PARALLEL", False)
    if kind == "group" and k % g:
        g = 2
    n = 2 * tile
    q, s, z = _random_canonical(bits, sym, kind, n, k, g, seed=k + tile + rows)
    kw = dict(bits=bits, symmetric=sym, kind=kind, group=g, out_features=n, in_features=k)
    w = codec.dequantize_canonical(q, s, z, axis=0 if kind != "group" else 1, **kw).double()
    wb, sb, zb = blocked.to_blocked(q, s, z, tile=tile, **kw)
    sp, zp = blocked.blocked_params(sb, zb, n)
    x = torch.randn(rows, k)
    out = np.full((rows, n), np.nan, np.float32)
    gemm.gemm_blocked(x.numpy(), wb.numpy(), sp.numpy(), zp.numpy(), g if kind == "group" else k, bits, out)
    ref = x.double() @ w.T
    bound = x.double().abs() @ w.abs().T  # products of (code - zp) exactly: the dot product's own rounding
    assert torch.all((torch.from_numpy(out).double() - ref).abs() <= 1e-5 * bound + 1e-30)


@pytest.mark.parametrize("bits", [8, 4])
def test_team_and_threads_give_the_same_bits(bits, monkeypatch):
    sym = bits == 8
    q, s, z = _random_canonical(bits, sym, "group", 256, 512, 64, seed=bits)
    kw = dict(bits=bits, symmetric=sym, kind="group", group=64, out_features=256, in_features=512)
    wb, sb, zb = blocked.to_blocked(q, s, z, tile=128, **kw)
    sp, zp = blocked.blocked_params(sb, zb, 256)
    x = np.random.default_rng(0).standard_normal((37, 512)).astype(np.float32)
    a = gemm.gemm_blocked(x, wb.numpy(), sp.numpy(), zp.numpy(), 64, bits, np.empty((37, 256), np.float32))
    monkeypatch.setattr(_omp, "_GOMP_PARALLEL", False)
    b = gemm.gemm_blocked(x, wb.numpy(), sp.numpy(), zp.numpy(), 64, bits, np.empty((37, 256), np.float32))
    assert np.array_equal(a, b)  # the same rows and tiles go through the same code, whoever runs them


def test_work_units_cover_every_row():
    assert gemm._row_chunks(1, 32, 2) == 1
    assert gemm._row_chunks(100, 3, 2) == 3  # 3 tiles, 2 threads: rows are split for balance
    assert gemm._row_chunks(5, 1, 8) == 1  # never chunks of fewer than MR rows
    assert gemm._row_chunks(30, 1, 8, gemm.MR_WIDE) == 2


@pytest.mark.parametrize("bits,signed,with_zp", [(8, True, False), (8, False, True), (8, False, False),
                                                 (4, False, True), (4, False, False)])
@pytest.mark.parametrize("width", [8, 16, 32, 64])  # bytes per tile row: the narrower ones keep 8-float vectors
@pytest.mark.parametrize("team", [True, False])
def test_wide_strips_give_the_narrow_kernels_bits(bits, signed, with_zp, width, team, monkeypatch):
    # 16-float vectors over 12 rows and 32 columns sum each output over K in the same order as 8-float vectors
    # over 6 rows: the same bits at every row count (every 12/8/4/2/1-row block and chunk boundary)
    if bits == 8 and width == 8:
        return
    if not team:
        monkeypatch.setattr(_omp, "_GOMP_PARALLEL", False)
    rng = np.random.default_rng(width + bits)
    T, K, g = 3, 320, 64  # groups of 64: every block of K ends a group; 320: a block of 256 then one of 64
    NT = 2 * width if bits == 4 else width
    if signed:
        wb = rng.integers(-128, 128, (T, K, width), dtype=np.int8)
    else:
        wb = rng.integers(0, 256, (T, K, width), dtype=np.uint8)
    sc = rng.random((K // g, T * NT), dtype=np.float32) + 0.5
    zp = (rng.integers(0, 2**bits, (K // g, T * NT), dtype=np.uint8) if with_zp else np.zeros((0, 0), np.uint8))
    for rows in (1, 2, 5, 11, 12, 13, 23, 37, 104):
        x = rng.standard_normal((rows, K)).astype(np.float32)
        a = gemm.gemm_blocked(x, wb, sc, zp, g, bits, np.full((rows, T * NT), np.nan, np.float32), wide=False)
        b = gemm.gemm_blocked(x, wb, sc, zp, g, bits, np.full((rows, T * NT), np.nan, np.float32), wide=True)
        assert np.array_equal(a, b), (rows, float(np.nanmax(np.abs(a - b))))
        assert np.isfinite(b).all()


def test_the_host_decides_the_vector_width():
    assert gemm.wide_strips(64, 8) == gemm.WIDE and gemm.wide_strips(16, 4) == gemm.WIDE
    assert not gemm.wide_strips(16, 8) and not gemm.wide_strips(8, 4)  # a tile row of half a strip


def test_non_contiguous_arrays_are_refused_by_name():
    q, s, z = _random_canonical(8, True, "channel", 32, 16, 1)
    wb, sb, zb = blocked.to_blocked(q, s, z, bits=8, symmetric=True, kind="channel", group=1, out_features=32,
                              in_features=16, tile=16)
    sp, zp = blocked.blocked_params(sb, zb, 32)
    x = np.ones((4, 32), np.float32)[:, ::2]  # a strided view
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        gemm.gemm_blocked(x, wb.numpy(), sp.numpy(), zp.numpy(), 16, 8, np.empty((4, 32), np.float32))
    out = np.empty((32, 4), np.float32).T
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        gemm.gemm_blocked(np.ones((4, 16), np.float32), wb.numpy(), sp.numpy(), zp.numpy(), 16, 8, out)


@settings(deadline=None, max_examples=40)
@given(k=st.integers(1, 600), tiles=st.sampled_from([(16, 1), (64, 1), (128, 2), (64, 3)]), rows=st.integers(1, 20),
       scheme=st.sampled_from(["w8", "w8-asym", "w4-g32", "w4-sym-channel"]), seed=st.integers(0, 2**31 - 1))
def test_module_forward_matches_f_linear_on_random_shapes(k, tiles, rows, scheme, seed):
    import qtorch
    from qcore import PerChannel, PerGroup, QuantScheme
    tile, count = tiles
    n = tile * count
    sch = {"w8": QuantScheme(8, True, PerChannel(0)), "w8-asym": QuantScheme(8, False, PerChannel(0)),
           "w4-g32": QuantScheme(4, False, PerGroup(32)), "w4-sym-channel": QuantScheme(4, True, PerChannel(0))}[scheme]
    if scheme == "w4-g32":
        k = max(32, k // 32 * 32)
    torch.manual_seed(seed)
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(k, n), sch)
    x = torch.randn(rows, k)
    with torch.no_grad():
        y = q(x)
    w = q.dequantized_weight(torch.float64)
    ref = x.double() @ w.T + q.bias.double()
    bound = x.double().abs() @ w.abs().T + q.bias.double().abs()
    assert torch.all((y.double() - ref).abs() <= 1e-5 * bound + 1e-6)


def _small(bits=8):
    q, s, z = _random_canonical(bits, bits == 8, "channel", 32, 16, 1)
    wb, sb, zb = blocked.to_blocked(q, s, z, bits=bits, symmetric=bits == 8, kind="channel", group=1, out_features=32,
                              in_features=16, tile=16)
    sp, zp = blocked.blocked_params(sb, zb, 32)
    return wb.numpy(), sp.numpy(), zp.numpy()


def test_wrong_dtypes_and_shapes_are_refused_by_name():
    wb, sp, zp = _small()
    x, out = np.ones((4, 16), np.float32), np.empty((4, 32), np.float32)
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        gemm.gemm_blocked(x.astype(np.float64), wb, sp, zp, 16, 8, out)
    with pytest.raises(TypeError, match="scale must be float32"):
        gemm.gemm_blocked(x, wb, sp.astype(np.float64), zp, 16, 8, out)
    with pytest.raises(TypeError, match="zp must be uint8"):
        gemm.gemm_blocked(x, wb, sp, zp.astype(np.int32), 16, 8, out)
    with pytest.raises(ValueError, match=r"x must be \[4, 16\], got \[4, 15\]"):
        gemm.gemm_blocked(x[:, :15].copy(), wb, sp, zp, 16, 8, out)
    with pytest.raises(ValueError, match=r"out must be \[4, 32\]"):
        gemm.gemm_blocked(x, wb, sp, zp, 16, 8, np.empty((4, 31), np.float32))
    with pytest.raises(ValueError, match="scale must be"):
        gemm.gemm_blocked(x, wb, sp, zp, 8, 8, out)  # a group size that does not match scale's groups
    assert np.isfinite(gemm.gemm_blocked(x, wb, sp, zp, 16, 8, out)).all()


def test_one_torch_thread_runs_on_the_calling_thread(monkeypatch):
    if not _omp.available():
        pytest.skip("no torch OpenMP team here")
    wb, sp, zp = _small()
    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    a = gemm.gemm_blocked(x, wb, sp, zp, 16, 8, np.empty((40, 32), np.float32))
    split_calls, team_calls = [], []
    monkeypatch.setattr(_omp._parallel, "run_split", lambda *a, **k: split_calls.append(1))
    monkeypatch.setattr(_omp, "team_call", lambda *a, **k: team_calls.append(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = gemm.gemm_blocked(x, wb, sp, zp, 16, 8, np.empty((40, 32), np.float32))
    finally:
        torch.set_num_threads(threads)
    assert split_calls == [] and team_calls == []  # neither qcore's threads nor the team: torch asked for one
    assert np.array_equal(a, b)


@pytest.mark.parametrize("bits,signed,with_zp", [(8, True, False), (8, False, True), (4, False, True),
                                                 (4, False, False)])
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("team", [True, False])
def test_a_decoded_panel_gives_the_same_bits(bits, signed, with_zp, wide, team, monkeypatch):
    # codes decoded once into a float32 panel per block of K, then read by every block of rows: the same operations
    # on each output in the same order as decoding them per block of rows, at every row count and chunking
    if not team:
        monkeypatch.setattr(_omp, "_GOMP_PARALLEL", False)
    rng = np.random.default_rng(bits + 2 * wide + with_zp)
    T, K, g, width = 2, 576, 192, 64  # blocks of K: 192 per group (a group of 192 < KB), 3 groups
    NT = 2 * width if bits == 4 else width
    wb = (rng.integers(-128, 128, (T, K, width), dtype=np.int8) if signed
          else rng.integers(0, 256, (T, K, width), dtype=np.uint8))
    sc = rng.random((K // g, T * NT), dtype=np.float32) + 0.5
    zp = (rng.integers(0, 2**bits, (K // g, T * NT), dtype=np.uint8) if with_zp else np.zeros((0, 0), np.uint8))
    for rows in (1, 5, 17, 18, 19, 36, 37, 104):
        x = rng.standard_normal((rows, K)).astype(np.float32)
        outs = [gemm.gemm_blocked(x, wb, sc, zp, g, bits, np.full((rows, T * NT), np.nan, np.float32), wide=wide,
                                  panel=p) for p in (False, True, None)]
        assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2]), rows
        assert np.isfinite(outs[0]).all()


def test_panel_must_be_a_bool():
    x, wb = np.ones((2, 4), np.float32), np.ones((1, 4, 16), np.int8)
    with pytest.raises(TypeError, match="panel"):
        gemm.gemm_blocked(x, wb, np.ones((1, 16), np.float32), np.zeros((0, 0), np.uint8), 4, 8,
                          np.empty((2, 16), np.float32), panel=1)


@pytest.mark.parametrize("team", [True, False])
@pytest.mark.parametrize("rows", [2, 7, 40])
def test_a_bias_stored_with_the_sums_equals_adding_it_after(rows, team, monkeypatch):
    if not team:
        monkeypatch.setattr(_omp, "_GOMP_PARALLEL", False)
    rng = np.random.default_rng(rows)
    wb = rng.integers(-128, 128, (3, 256, 64), dtype=np.int8)
    sc = rng.random((1, 192), dtype=np.float32)
    zp = np.zeros((0, 0), np.uint8)
    x = rng.standard_normal((rows, 256)).astype(np.float32)
    bias = rng.standard_normal(192).astype(np.float32)
    plain = gemm.gemm_blocked(x, wb, sc, zp, 256, 8, np.empty((rows, 192), np.float32))
    fused = gemm.gemm_blocked(x, wb, sc, zp, 256, 8, np.empty((rows, 192), np.float32), bias=bias)
    assert np.array_equal(fused, plain + bias)
    with pytest.raises(TypeError, match="bias"):
        gemm.gemm_blocked(x, wb, sc, zp, 256, 8, np.empty((rows, 192), np.float32), bias=bias.astype(np.float64))
    with pytest.raises(ValueError, match="bias"):
        gemm.gemm_blocked(x, wb, sc, zp, 256, 8, np.empty((rows, 192), np.float32), bias=bias[:100])
