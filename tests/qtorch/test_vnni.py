"""qtorch.vnni and qtorch.vnni_amx: the activations' integer planes, the one-row kernel, the dequantization of
``W.T`` and the AMX-INT8 kernel of several rows (on CPUs that have them: the layout is not eligible elsewhere)."""

import numpy as np
import pytest
import torch

from qtorch import _omp, vnni, vnni_amx

needs_vnni = pytest.mark.skipif(not vnni.available(), reason="the vnni kernels need AVX512-VNNI (not on this CPU)")
needs_amx = pytest.mark.skipif(not vnni_amx.available(), reason="AMX-INT8 tiles are not granted on this CPU")


def kernel_words(codes: np.ndarray) -> np.ndarray:
    """Codes ``[N, K]`` (0..15) -> the layout's words ``[N/64, K/8, 64]``: input ``8 o + b`` in the low nibble of
    byte ``b``, ``8 o + 4 + b`` in its high nibble (written out here independently of the layout's conversion)."""
    n, k = codes.shape
    c = codes.astype(np.uint32).reshape(n, k // 8, 8)
    words = np.zeros((n, k // 8), np.uint32)
    for j in range(8):
        words |= c[:, :, j] << np.uint32(8 * j if j < 4 else 8 * (j - 4) + 4)
    return np.ascontiguousarray(words.reshape(n // 64, 64, k // 8).transpose(0, 2, 1))


def tiles(p):
    """``[G, N]`` parameters -> ``[N/64, G, 64]``."""
    if p is None:
        return None
    g, n = p.shape
    return np.ascontiguousarray(p.reshape(g, n // 64, 64).transpose(1, 0, 2))


def weight(n, k, g, sym, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    scale = (rng.random((k // g, n)) + 0.05).astype(np.float32)
    zp = None if sym else rng.integers(0, 16, (k // g, n)).astype(np.uint8)
    z = np.full((k // g, n), 8.0) if sym else zp.astype(np.float64)
    w64 = (codes - np.repeat(z.T, g, axis=1)) * np.repeat(scale.T.astype(np.float64), g, axis=1)
    return codes, scale, zp, w64


def rough_x(shape, seed):
    """Activations over several orders of magnitude, with zeros and a block of zeros."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * np.exp(2 * rng.standard_normal(shape))).astype(np.float32)
    x.reshape(-1)[::7] = 0
    return x


# ------------------------------------------------------------------------------------------------ planes

@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("bsize", [8, 64, 128])
def test_planes_hold_x_rounded_within_the_bound(parts, bsize):
    k = 512
    x = rough_x(k, 1)
    x[:bsize] = 0  # a block of zeros: its multiplier is 0
    xq, xm, xs = vnni.split(x, bsize, parts)
    P = 14 if parts == 2 else 22
    p = xq.astype(np.int64)
    q = p[0] * 256 + p[1] if parts == 2 else p[0] * 65536 + p[1] * 256 + p[2]
    assert xq.dtype == np.int8 and np.all(np.abs(q) <= 2**P)
    for b in range(k // bsize):
        blk = slice(b * bsize, (b + 1) * bsize)
        top = np.abs(x[blk]).max()
        if top == 0:
            assert xm[b] == 0 and not q[blk].any()
            continue
        e = int(np.frexp(top)[1])
        assert xm[b] == 2.0 ** (e - P)
        err = np.abs(q[blk] * np.float64(xm[b]) - x[blk])
        assert np.all(err <= 2.0 ** (e - P - 1))  # rounded to nearest: under 2^-P of the block's largest |x|
        if parts == 2:
            assert xs[b, 0] == q[blk].sum()
        else:
            hi = xq[0, blk].astype(np.int64)
            assert xs[b, 0] == hi.sum() and xs[b, 1] == (q[blk] - 65536 * hi).sum()


def test_planes_of_bfloat16_and_float16_bits_are_those_of_their_values():
    x = torch.from_numpy(rough_x(256, 2))
    for dtype, kind in ((torch.bfloat16, 1), (torch.float16, 2)):
        xt = x.clamp(-6e4, 6e4).to(dtype)
        bits = xt.view(torch.int16).numpy().view(np.uint16)
        got, want = vnni.split(bits, 64, 2, kind), vnni.split(xt.float().numpy(), 64, 2)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_planes_refuse_what_they_cannot_hold(bad):
    x = np.ones(64, np.float32)
    x[5] = bad
    assert vnni.split(x, 64, 2) is None


def test_block_size_divides_the_group():
    assert [vnni.block_size(g) for g in (8, 32, 64, 128, 256, 4096, 192, 96, 12, 4)] == [8, 32, 64, 128, 128, 128,
                                                                                           96, 96, 0, 0]


# ------------------------------------------------------------------------------------------------ one row

@needs_vnni
@pytest.mark.parametrize("n,k,g", [(64, 128, 128), (128, 256, 32), (192, 512, 64), (64, 768, 768), (128, 384, 192),
                                   (64, 64, 8)])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("team", [True, False])
def test_one_row_matches_float64_reference(n, k, g, sym, team, monkeypatch):
    if not team:
        monkeypatch.setattr(_omp, "_GOMP_PARALLEL", False)
    codes, scale, zp, w64 = weight(n, k, g, sym, seed=n + k + g)
    x = rough_x(k, 3)
    out = vnni.gemv_vnni(x, kernel_words(codes), tiles(scale), tiles(zp), g, np.empty(n, np.float32))
    ref = w64 @ x.astype(np.float64)
    # x's rounding (2^-22 of its block's largest |x|, three planes for float32) and float32 sums
    blocks = np.abs(x).reshape(-1, vnni.block_size(g)).max(1).repeat(vnni.block_size(g))
    bound = 2.0**-21 * (np.abs(w64) @ blocks) + 2.0**-20 * (np.abs(w64) @ np.abs(x).astype(np.float64))
    assert np.all(np.abs(out - ref) <= bound)


@needs_vnni
def test_one_row_of_bfloat16_writes_the_rounded_float32_sums():
    n, k, g = 128, 256, 64
    codes, scale, zp, _ = weight(n, k, g, False, seed=5)
    w, s, z = kernel_words(codes), tiles(scale), tiles(zp)
    xt = torch.from_numpy(rough_x(k, 6)).to(torch.bfloat16)
    f32 = torch.empty(n, dtype=torch.float32)
    bf = torch.empty(n, dtype=torch.bfloat16)
    assert vnni.Plan(w, s, z, g, 1, 0)(xt.data_ptr(), f32.data_ptr())
    assert vnni.Plan(w, s, z, g, 1, 1)(xt.data_ptr(), bf.data_ptr())
    assert torch.equal(bf, f32.to(torch.bfloat16))


@needs_vnni
def test_one_row_reports_a_non_finite_x_and_leaves_out_alone():
    n, k, g = 64, 128, 64
    codes, scale, zp, _ = weight(n, k, g, True, seed=7)
    x = np.ones(k, np.float32)
    x[100] = np.inf
    out = np.full(n, 3.0, np.float32)
    assert not vnni.Plan(kernel_words(codes), tiles(scale), np.zeros((0, 0, 0), np.uint8), g, 0, 0)(
        x.ctypes.data, out.ctypes.data)
    assert np.all(out == 3.0)
    with pytest.raises(ValueError, match="NaN or an infinity"):
        vnni.gemv_vnni(x, kernel_words(codes), tiles(scale), None, g, out)


needs_team = pytest.mark.skipif(not _omp.available() or torch.get_num_threads() < 2,
                                reason="no OpenMP team of 2+ threads in this process")


@needs_vnni
@pytest.mark.parametrize("xkind", [0, 1], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("sym", [True, False])
def test_how_the_codes_are_read_changes_no_bit(xkind, sym):
    # the prefetch distance and the second reads of each line (qtorch.prefetch.vnni_reads) are the machine's choice
    n, k, g = 192, 512, 128
    codes, scale, zp, _ = weight(n, k, g, sym, seed=23)
    w, s = kernel_words(codes), tiles(scale)
    z = np.zeros((0, 0, 0), np.uint8) if sym else tiles(zp)
    x = torch.from_numpy(rough_x(k, 24)).to(torch.bfloat16 if xkind else torch.float32)
    outs = []
    for ahead in (0, 64, 4096):
        for touch in (False, True):
            out = torch.empty(n, dtype=x.dtype)
            assert vnni.Plan(w, s, z, g, xkind, xkind, prefetch=ahead, touch=touch)(x.data_ptr(), out.data_ptr())
            outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.usefixtures("native_launches")
@needs_vnni
@needs_team
@pytest.mark.parametrize("okind", [0, 1], ids=["float32-out", "bfloat16-out"])
def test_one_row_as_one_native_launch_gives_the_python_launchs_bits(okind):
    n, k, g = 256, 256, 64
    codes, scale, zp, _ = weight(n, k, g, False, seed=21)
    w, s, z = kernel_words(codes), tiles(scale), tiles(zp)
    plan, python = vnni.Plan(w, s, z, g, 1, okind), vnni.Plan(w, s, z, g, 1, okind)
    python.native = None  # the Python launch (as with QTORCH_NATIVE_LAUNCH=0)
    assert plan.native is not None  # four tiles: two work units or more
    dtype = torch.bfloat16 if okind else torch.float32
    x = torch.from_numpy(rough_x(k, 22)).to(torch.bfloat16)
    want = torch.full((n,), 5.0, dtype=dtype)
    assert python(x.data_ptr(), want.data_ptr())
    for _ in range(3):
        got = torch.full((n,), 5.0, dtype=dtype)
        assert plan(x.data_ptr(), got.data_ptr())
        assert torch.equal(got, want)
    assert not plan.free  # never the Python path's blocks
    bad = x.clone()
    bad[17] = float("nan")
    out = torch.full((n,), 5.0, dtype=dtype)
    assert not plan(bad.data_ptr(), out.data_ptr())  # reported through the native launch too, out left alone
    assert torch.all(out == 5.0)
    assert plan(x.data_ptr(), out.data_ptr()) and torch.equal(out, want)  # the next launch starts afresh


@pytest.mark.usefixtures("native_launches")
@needs_vnni
@needs_team
@pytest.mark.parametrize("okind", [0, 1], ids=["float32-out", "bfloat16-out"])
def test_a_chain_of_plans_gives_each_plans_own_bits(okind):
    k, g = 256, 64
    plans = []
    for n, sym, seed in ((128, False, 1), (64, True, 2), (192, False, 3)):
        codes, scale, zp, _ = weight(n, k, g, sym, seed=seed)
        z = tiles(zp) if not sym else np.zeros((0, 0, 0), np.uint8)
        plans.append(vnni.Plan(kernel_words(codes), tiles(scale), z, g, 1, okind))
    dtype = torch.bfloat16 if okind else torch.float32
    x = torch.from_numpy(rough_x(k, 5)).to(torch.bfloat16)
    want = []
    for p in plans:
        want.append(torch.empty(p.N, dtype=dtype))
        assert p(x.data_ptr(), want[-1].data_ptr())
    for chosen in (plans, plans[1:]):
        chain = vnni.Chain(chosen)
        for _ in range(2):
            got = [torch.full((p.N,), 5.0, dtype=dtype) for p in chosen]
            assert chain(x.data_ptr(), [o.data_ptr() for o in got])
            assert all(torch.equal(a, b) for a, b in zip(got, want[len(plans) - len(chosen):]))
    bad = x.clone()
    bad[3] = float("inf")
    assert not vnni.Chain(plans)(bad.data_ptr(), [o.data_ptr() for o in want])  # reported: the caller goes apart
    with pytest.raises(ValueError, match="one K"):
        codes, scale, zp, _ = weight(64, 128, g, False, seed=4)
        vnni.Chain([plans[0], vnni.Plan(kernel_words(codes), tiles(scale), tiles(zp), g, 1, okind)])


@needs_vnni
@needs_team
def test_one_row_calls_from_several_threads_at_once_each_get_their_own_bits():
    import concurrent.futures
    n, k, g = 512, 512, 128
    codes, scale, zp, _ = weight(n, k, g, True, seed=23)
    plan = vnni.Plan(kernel_words(codes), tiles(scale), np.zeros((0, 0, 0), np.uint8), g, 1, 0)
    xs = [torch.from_numpy(rough_x(k, 30 + i)).to(torch.bfloat16) for i in range(4)]
    want = []
    for x in xs:
        out = torch.empty(n)
        assert plan(x.data_ptr(), out.data_ptr())
        want.append(out)

    def call(i):  # one launch runs natively at a time; the others take the Python path with blocks of their own
        out = torch.empty(n)
        for _ in range(20):
            assert plan(xs[i].data_ptr(), out.data_ptr())
            if not torch.equal(out, want[i]):
                return False
        return True

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(call, range(4)))


@needs_vnni
def test_gemv_vnni_names_bad_operands():
    codes, scale, zp, _ = weight(64, 128, 64, False, seed=8)
    w, s, z = kernel_words(codes), tiles(scale), tiles(zp)
    x, out = np.ones(128, np.float32), np.empty(64, np.float32)
    with pytest.raises(TypeError, match="w must be"):
        vnni.gemv_vnni(x, w.astype(np.int64), s, z, 64, out)
    with pytest.raises(ValueError, match="scale must be"):
        vnni.gemv_vnni(x, w, s[:, :1], z, 64, out)
    with pytest.raises(ValueError, match="group size"):
        vnni.gemv_vnni(x, w, s, z, 48, out)
    with pytest.raises(ValueError, match="zp must be"):
        vnni.gemv_vnni(x, w, s, z.astype(np.int8), 64, out)
    with pytest.raises(ValueError, match="x must be"):
        vnni.gemv_vnni(np.ones(64, np.float32), w, s, z, 64, out)
    with pytest.raises(ValueError, match="out must be"):
        vnni.gemv_vnni(x, w, s, z, 64, np.empty(32, np.float32))


# ------------------------------------------------------------------------------------------------ several rows

@needs_vnni
@pytest.mark.parametrize("sym", [True, False])
def test_dequant_t_is_qcores_float32_arithmetic(sym):
    n, k, g = 128, 256, 32
    codes, scale, zp, _ = weight(n, k, g, sym, seed=9)
    z = np.full((k // g, n), 8, np.float32) if sym else zp.astype(np.float32)
    want = ((codes.astype(np.float32) - np.repeat(z.T, g, axis=1)) * np.repeat(scale.T, g, axis=1)).T
    w, s, zt = kernel_words(codes), tiles(scale), tiles(zp)
    f32 = vnni.dequant_t(w, s, zt, g, 0, 2, np.empty((k, n), np.float32))
    assert np.array_equal(f32, want)
    bf = vnni.dequant_t(w, s, zt, g, 1, 2, np.empty((k, 64), np.uint16))
    assert np.array_equal(bf, torch.from_numpy(want[:, 64:].copy()).to(torch.bfloat16).view(torch.int16).numpy()
                          .view(np.uint16))
    with pytest.raises(ValueError, match="tiles must satisfy"):
        vnni.dequant_t(w, s, zt, g, 1, 3, np.empty((k, 128), np.float32))
    with pytest.raises(ValueError, match="dst must be"):
        vnni.dequant_t(w, s, zt, g, 0, 1, np.empty((k, 128), np.float32))


@needs_amx
@pytest.mark.parametrize("m,n,k,g", [(1, 64, 128, 128), (3, 64, 128, 128), (17, 128, 256, 64), (9, 192, 512, 128),
                                     (130, 128, 384, 128), (16, 64, 1024, 1024)])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("kind", [0, 1, 2])
def test_amx_rows_are_the_one_row_kernels_rows(m, n, k, g, sym, kind):
    codes, scale, zp, w64 = weight(n, k, g, sym, seed=m + n)
    w, s = kernel_words(codes), tiles(scale)
    z = np.zeros((0, 0, 0), np.uint8) if sym else tiles(zp)
    x = rough_x((m, k), 10)
    if kind:
        xt = torch.from_numpy(x).clamp(-6e4, 6e4).to(torch.bfloat16 if kind == 1 else torch.float16)
        xin = xt.view(torch.int16).numpy().view(np.uint16)
    else:
        xin = x
    out = np.empty((m, n), np.float32)
    assert vnni_amx.run(np.ascontiguousarray(xin), kind, w, s, z, g, out)
    rows = np.empty((m, n), np.float32)
    plan = vnni.Plan(w, s, z, g, kind, 0)
    for i in range(m):
        row = np.ascontiguousarray(xin[i])
        assert plan(row.ctypes.data, rows[i].ctypes.data)
    if vnni.block_size(g) == g:  # one block a group: the same sums scaled in the same order
        assert np.array_equal(out, rows)
    else:  # per block into the output, or per group then scaled: float32 rounding apart
        assert np.allclose(out, rows, rtol=1e-5, atol=1e-5 * np.abs(rows).max())


@needs_amx
def test_amx_rows_report_a_non_finite_x():
    codes, scale, _, _ = weight(64, 128, 64, True, seed=11)
    x = np.ones((5, 128), np.float32)
    x[3, 7] = np.nan
    out = np.full((5, 64), 2.0, np.float32)
    assert not vnni_amx.run(x, 0, kernel_words(codes), tiles(scale), np.zeros((0, 0, 0), np.uint8), 64, out)


def test_amx_blocks_are_whole_tile_steps():
    assert [vnni_amx.eligible(g) for g in (64, 128, 256, 4096, 32, 96, 192)] == [True, True, True, True, False,
                                                                                False, False]


@needs_amx
def test_amx_rows_off_the_team_are_the_same(monkeypatch):
    codes, scale, zp, _ = weight(128, 256, 128, False, seed=12)
    w, s, z = kernel_words(codes), tiles(scale), tiles(zp)
    x = rough_x((20, 256), 13)
    on_team = np.empty((20, 128), np.float32)
    assert vnni_amx.run(x, 0, w, s, z, 128, on_team)
    monkeypatch.setattr(_omp, "_GOMP_PARALLEL", False)  # no OpenMP team: qcore's own threads claim the chunks
    alone = np.empty((20, 128), np.float32)
    assert vnni_amx.run(x, 0, w, s, z, 128, alone)
    assert np.array_equal(on_team, alone)
