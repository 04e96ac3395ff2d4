"""qtorch.dequant: tiles of the blocked layouts dequantized to float32, bfloat16 or float16, bit for bit the canonical
values (rounded once more by torch for the 16-bit formats)."""

import numpy as np
import pytest
import torch

from qtorch import _omp, dequant
from qtorch.layouts import blocked, codec

from .test_layouts import CASES, _random_canonical


@pytest.mark.parametrize("bits,sym,kind,g", CASES)
@pytest.mark.parametrize("tile", [16, 64, 128])
@pytest.mark.parametrize("team", [True, False])
@pytest.mark.parametrize("t0,t1", [(0, 3), (1, 3), (2, 2)])
def test_tiles_equal_the_canonical_dequantization(bits, sym, kind, g, tile, team, t0, t1, monkeypatch):
    if not team:
        monkeypatch.setattr(_omp, "_GOMP_PARALLEL", False)
    n, k = 3 * tile, 260
    q, s, z = _random_canonical(bits, sym, kind, n, k, g, seed=tile + bits)
    kw = dict(bits=bits, symmetric=sym, kind=kind, group=g, out_features=n, in_features=k)
    w = codec.dequantize_canonical(q, s, z, axis=0 if kind != "group" else 1, **kw)  # [n, k] float32
    wb, sb, zb = blocked.to_blocked(q, s, z, tile=tile, **kw)
    sp, zp = blocked.blocked_params(sb, zb, n)
    out = np.full((k, (t1 - t0) * tile), np.nan, np.float32)
    dequant.dequant_tiles(wb.numpy(), bits, sp.numpy(), zp.numpy(), t0, t1, out)
    assert torch.equal(torch.from_numpy(out), w[t0 * tile:t1 * tile].T.contiguous())  # bit for bit, every value


def _scales(rng, shape, kind):
    """float32 scales of four kinds: random, ties of bfloat16 / float16 rounding for codes of +-1 and +-2 (the
    dropped bits exactly half an ulp), a range from float16 subnormals to float16 overflow, and float32 subnormals
    beside normal scales (the CPU's bfloat16 conversion would read those values as 0)."""
    if kind == "subnormal":
        return np.exp(rng.uniform(np.log(1e-44), np.log(1e-36), shape)).astype(np.float32)
    if kind == "random":
        return (rng.random(shape) + 0.25).astype(np.float32)
    if kind == "ties":
        hi = rng.integers(0x3C00, 0x4200, shape, dtype=np.uint32)  # 2^-7 .. 2^5
        low = np.where(rng.random(shape) < 0.5, 0x8000, 0x1000).astype(np.uint32)  # bf16 tie / fp16 tie
        return ((hi << 16) | low).view(np.float32)
    return np.exp(rng.uniform(np.log(1e-9), np.log(2e3), shape)).astype(np.float32)


def _tiles_arrays(bits, sym, G, T, K, W, rng, scale_kind):
    NT = 2 * W if bits == 4 else W
    if bits == 8 and sym:
        wb = rng.integers(-127, 128, (T, K, W), dtype=np.int8)
        wb[:, :, :4] = np.array([-2, -1, 1, 2], np.int8)  # the codes that make ties with the "ties" scales
    else:
        wb = rng.integers(0, 256, (T, K, W), dtype=np.uint8)
    scale = _scales(rng, (G, T * NT), scale_kind)
    zp = rng.integers(0, 2**bits, (G, T * NT), dtype=np.uint8) if not sym else np.zeros((0, 0), np.uint8)
    return wb, scale, zp


def _codes(wb, bits, sym):
    """The codes of the tiles ``[T, K, NT]`` minus the zero offset of symmetric 4-bit codes (NumPy reference)."""
    if bits == 8:
        return wb.astype(np.int32)
    c = np.concatenate([wb & 15, wb >> 4], axis=2).astype(np.int32)
    return c - 8 if sym else c


@pytest.mark.parametrize("bits,sym", [(8, True), (8, False), (4, True), (4, False)])
@pytest.mark.parametrize("G", [1, 4])  # per channel / tensor (expanded to [1, N]) and groups along K
@pytest.mark.parametrize("W", [8, 16, 24, 64])  # bytes per tile row: 24 = a 16-byte step and the 8-byte tail
def test_tiles_equal_a_numpy_reference_for_every_row_width(bits, sym, G, W):
    rng = np.random.default_rng(bits * 100 + W + G)
    T, K = 3, 8 * G
    wb, scale, zp = _tiles_arrays(bits, sym, G, T, K, W, rng, "random")
    NT = 2 * W if bits == 4 else W
    c = _codes(wb, bits, sym)  # [T, K, NT]
    z = zp.reshape(G, T, NT).transpose(1, 0, 2).repeat(K // G, axis=1) if not sym else 0
    s = scale.reshape(G, T, NT).transpose(1, 0, 2).repeat(K // G, axis=1)
    ref = ((c - z).astype(np.float32) * s).transpose(1, 0, 2).reshape(K, T * NT)  # W.T, one float32 rounding
    out = np.full((K, T * NT), np.nan, np.float32)
    dequant.dequant_tiles(wb, bits, scale, zp, 0, T, out)
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("bits,sym", [(8, True), (8, False), (4, True), (4, False)])
@pytest.mark.parametrize("G", [1, 8])
@pytest.mark.parametrize("W", [8, 24, 64])
# bfloat16 as this CPU allows (its conversion instruction where it has one) and by the rounding in integers
@pytest.mark.parametrize("dtype,cpu_cvt", [(torch.bfloat16, None), (torch.bfloat16, False), (torch.float16, None)],
                         ids=str)
@pytest.mark.parametrize("scale_kind", ["random", "ties", "range", "subnormal"])
@pytest.mark.parametrize("team", [True, False])
def test_16_bit_tiles_are_the_float32_tiles_rounded_by_torch(bits, sym, G, W, dtype, scale_kind, team, cpu_cvt,
                                                             monkeypatch):
    # bit for bit dequantize(...).to(dtype): round to nearest even, ties, subnormals and float16 overflow included
    if not team:
        monkeypatch.setattr(_omp, "_GOMP_PARALLEL", False)
    if cpu_cvt is not None:
        monkeypatch.setattr(dequant, "_CVT", cpu_cvt)
    rng = np.random.default_rng(W * 7 + bits + G)
    T, K = 4, 1024  # several chunks for the team's threads
    wb, scale, zp = _tiles_arrays(bits, sym, G, T, K, W, rng, scale_kind)
    NT = 2 * W if bits == 4 else W
    t0, t1 = 1, 4
    ref = np.empty((K, (t1 - t0) * NT), np.float32)
    dequant.dequant_tiles(wb, bits, scale, zp, t0, t1, ref)
    want = torch.from_numpy(ref).to(dtype)
    got = torch.full(want.shape, float("nan"), dtype=dtype)
    view = got.numpy() if dtype == torch.float16 else got.view(torch.int16).numpy().view(np.uint16)
    assert dequant.dequant_tiles(wb, bits, scale, zp, t0, t1, view) is view
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    if scale_kind == "subnormal":  # what the CPU's conversion would have flushed to 0 is there
        assert np.any((ref != 0) & (np.abs(ref) < np.finfo(np.float32).tiny))
    if scale_kind == "ties":  # the ties are there: values exactly half a unit between two neighbours
        u = ref.view(np.uint32)
        assert np.any((u & 0xFFFF) == 0x8000) if dtype == torch.bfloat16 else np.any((u & 0x1FFF) == 0x1000)


def test_out_of_another_dtype_or_shape_is_refused_by_name():
    wb = np.zeros((1, 4, 16), np.int8)
    s, z = np.ones((1, 16), np.float32), np.zeros((0, 0), np.uint8)
    for bad, err in ((np.zeros((4, 16), np.float64), TypeError), (np.zeros((4, 16), np.int16), TypeError),
                     (np.zeros((4, 32), np.float32)[:, ::2], ValueError), (np.zeros((4, 15), np.uint16), ValueError),
                     ([[0.0] * 16] * 4, TypeError)):
        with pytest.raises(err, match="out"):
            dequant.dequant_tiles(wb, 8, s, z, 0, 1, bad)
    with pytest.raises(ValueError, match="scale"):
        dequant.dequant_tiles(wb, 8, np.ones((1, 8), np.float32), z, 0, 1, np.zeros((4, 16), np.float32))
    with pytest.raises(ValueError, match="tiles"):
        dequant.dequant_tiles(wb, 8, s, z, 0, 2, np.zeros((4, 32), np.float32))


def test_after_a_call_starved_a_team_thread_the_kernel_runs_on_the_calling_thread(monkeypatch):
    # the typed team runtime's cap (qcore._team.thread_cap) applies to this kernel as to gemv / gemm
    if not _omp.available():
        pytest.skip("no torch OpenMP team here")
    import time

    from qcore import _team
    rng = np.random.default_rng(5)
    wb, scale, zp = _tiles_arrays(4, False, 4, 4, 1024, 64, rng, "random")

    def call():
        out = np.empty((1024, 4 * 128), np.float32)
        return dequant.dequant_tiles(wb, 4, scale, zp, 0, 4, out)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(_team, "_CAP", None)
        on_team = call()
        runs, plain = [], []
        monkeypatch.setattr(_team, "run", lambda *a, **k: runs.append(a) or False)
        monkeypatch.setattr(_omp, "team_call", lambda *a, **k: plain.append(a) or False)
        monkeypatch.setattr(_team, "_CAP", (time.monotonic() + 600, 1, 600.0))  # a starved call just now
        capped = call()
        assert runs == [] and plain == []
        monkeypatch.setattr(_omp._parallel, "DYNAMIC", False)  # a fixed thread count: the whole team regardless
        call()
        assert len(runs) == 1 and runs[0][2] == 2 and plain == []
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(on_team, capped)


def test_the_cpu_conversion_is_used_only_where_numba_compiles_for_a_cpu_that_has_it(monkeypatch):
    from numba.core import config

    from qtorch import _ir
    monkeypatch.setattr(config, "CPU_NAME", "generic")  # portable code: no AVX512-BF16 assumed
    assert not _ir.host_has("avx512bf16")
    monkeypatch.setattr(config, "CPU_NAME", None)
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx512f,+avx512bw")
    assert not _ir.host_has("avx512bf16") and _ir.host_has("avx512f")
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx512f,+avx512bf16")
    assert _ir.host_has("avx512bf16")


def test_float16_tiles_where_the_cpu_has_no_float16_conversion(monkeypatch):
    # no F16C: float32 tiles cast by NumPy (round to nearest even), the same bits
    rng = np.random.default_rng(11)
    wb, scale, zp = _tiles_arrays(4, False, 2, 3, 64, 16, rng, "range")
    want = np.empty((64, 3 * 32), np.float16)
    dequant.dequant_tiles(wb, 4, scale, zp, 0, 3, want)
    monkeypatch.setattr(dequant, "_native_f16", lambda: False)
    got = np.full_like(want, np.nan)
    assert dequant.dequant_tiles(wb, 4, scale, zp, 0, 3, got) is got
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
