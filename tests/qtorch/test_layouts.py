"""qtorch.layouts: layout conversions against qcore packing, the numba kernels and the dispatch table."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qcore
from qtorch.layouts import blocked, codec, int8pack
from qtorch.layouts.canonical import CANONICAL


@given(bits=st.integers(1, 8), rows=st.integers(0, 3), length=st.integers(0, 70), seed=st.integers(0, 2**31))
def test_unpack_and_pack_codes_match_qcore(bits, rows, length, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, (rows, length), dtype=np.uint8)
    packed = qcore.pack(codes, bits)
    got = codec.unpack_codes(torch.from_numpy(packed), bits, length)
    assert np.array_equal(got.numpy(), codes)
    assert np.array_equal(codec.pack_codes(torch.from_numpy(codes), bits).numpy(), packed)


def _random_canonical(bits, sym, kind, n, k, g, seed=0):
    rng = np.random.default_rng(seed)
    if bits == 8 and sym:
        q = torch.from_numpy(rng.integers(-127, 128, (n, k), dtype=np.int8))
    elif bits == 8:
        q = torch.from_numpy(rng.integers(0, 256, (n, k), dtype=np.uint8))
    else:
        q = torch.from_numpy(qcore.pack(rng.integers(0 if not sym else 1, 2**bits, (n, k), dtype=np.uint8), bits))
    pshape = {"tensor": (), "channel": (n,), "group": (n, k // g)}[kind]
    scale = torch.from_numpy(np.asarray(rng.random(pshape) + 0.25, np.float32).reshape(pshape))
    zp = None if sym else torch.from_numpy(np.asarray(rng.integers(0, 2**bits, pshape, dtype=np.uint8)).reshape(pshape))
    return q, scale, zp


CASES = [(8, True, "channel", 1), (8, False, "group", 4), (8, True, "tensor", 1), (4, False, "group", 4),
         (4, True, "channel", 1), (4, False, "tensor", 1)]


@pytest.mark.parametrize("bits,sym,kind,g", CASES)
@pytest.mark.parametrize("tile", [16, 32, 128])
def test_blocked_layout_round_trip_is_exact(bits, sym, kind, g, tile):
    n, k = 2 * tile, 12
    q, s, z = _random_canonical(bits, sym, kind, n, k, g)
    kw = dict(bits=bits, symmetric=sym, kind=kind, group=g, out_features=n, in_features=k)
    wb, sb, zb = blocked.to_blocked(q, s, z, tile=tile, **kw)
    q2, s2, z2 = blocked.from_blocked(wb, sb, zb, **kw)
    assert q2.dtype == q.dtype and torch.equal(q2, q)
    assert s2.shape == s.shape and torch.equal(s2, s)
    assert (z is None and z2 is None) or torch.equal(z2, z)
    # the dequantized tiles are W.T tile by tile, equal to the canonical dequantization bit for bit
    w = codec.dequantize_canonical(q, s, z, axis=0 if kind != "group" else 1, **kw)
    wt = blocked.dequant_blocked(wb, sb, zb, bits=bits, group=(g if kind == "group" else k))
    assert torch.equal(wt.permute(0, 2, 1).reshape(n, k), w)


@pytest.mark.parametrize("bits,sym,kind,g", CASES)
@pytest.mark.parametrize("k", [1, 7, 100, 520])
@pytest.mark.parametrize("rows", [1, 3, 4, 16])
def test_numba_kernel_and_tiles_match_float64_reference(bits, sym, kind, g, k, rows):
    if kind == "group" and k % g:
        g = 1
    n, tile = 48, 16
    q, s, z = _random_canonical(bits, sym, kind, n, k, g, seed=k + rows)
    kw = dict(bits=bits, symmetric=sym, kind=kind, group=g, out_features=n, in_features=k)
    w = codec.dequantize_canonical(q, s, z, axis=0 if kind != "group" else 1, **kw).double()
    wb, sb, zb = blocked.to_blocked(q, s, z, tile=tile, **kw)
    x = torch.randn(rows, k)
    ref = x.double() @ w.T
    bound = x.double().abs() @ w.abs().T
    y = blocked.gemm_blocked(x, wb, sb, zb, (g if kind == "group" else k), bits, n)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert torch.all((y.double() - ref).abs() <= 1e-5 * bound + 1e-30)
    yt = blocked.tiles_blocked(x, wb, sb, zb, (g if kind == "group" else k), bits, n)
    assert torch.all((yt.double() - ref).abs() <= 1e-5 * bound + 1e-30)


def test_numba_kernel_returns_the_input_dtype():
    q, s, z = _random_canonical(8, True, "channel", 32, 16, 1)
    wb, sb, zb = blocked.to_blocked(q, s, z, bits=8, symmetric=True, kind="channel", group=1, out_features=32,
                              in_features=16, tile=16)
    for dt in (torch.bfloat16, torch.float16):
        assert blocked.gemm_blocked(torch.randn(2, 16, dtype=dt), wb, sb, zb, 16, 8, 32).dtype == dt


def test_int8pack_guard_encodes_the_segfault_preconditions():
    assert int8pack.int8pack_ok(torch.bfloat16, 4096)
    for k in (1, 7, 8, 100, 504, 520):
        assert not int8pack.int8pack_ok(torch.bfloat16, k)
    assert int8pack.int8pack_ok(torch.float32, 7) and int8pack.int8pack_ok(torch.float16, 7)
    assert not int8pack.int8pack_ok(torch.float64, 16)


def test_dispatch_table():
    assert blocked.BLOCKED.path("cpu", torch.float32, 1, 8) == "numba"
    big = max(blocked.CPU_MAX_ROWS_NUMBA.values()) + 1
    assert blocked.BLOCKED.path("cpu", torch.bfloat16, big, 4) == "tiles"
    assert blocked.BLOCKED.path("cpu", torch.float32, 0, 8) == "tiles"  # empty input: no kernel launch
    assert blocked.BLOCKED.path("cuda", torch.float16, 1, 8) == "tiles"
    assert CANONICAL.path("cpu", torch.float32, 1, 8) == "dense"
    assert blocked.blocked_tile(4096) == 128 and blocked.blocked_tile(48) == 16 and blocked.blocked_tile(100) == 0


@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (64, 256), (32, 1024)])
def test_int4pack_unpack_reads_back_the_codes_eagerly_and_traced(n, k):
    from qtorch.layouts import int4pack

    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n + k))
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    assert torch.equal(int4pack.int4pack_unpack(packed, n, k), codes)  # the numba loop
    traced = int4pack._unpack_traced(packed, n, k, *int4pack.int4pack_map(n, k))  # the torch ops under tracing
    assert torch.equal(traced, codes)


@pytest.mark.parametrize("bits,sym", [(1, False), (2, True), (2, False), (3, True), (3, False), (5, True),
                                      (5, False), (6, False), (7, True)])  # 1-bit symmetric does not exist
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_holds_every_width_in_containers(bits, sym, dtype):
    """Codes of 1-3 bits sit in 4-bit containers and 5-7 bits in bytes: every path equals F.linear of qcore's
    dequantized weight, and the state_dict is the canonical one, packed at the scheme's width."""
    import torch.nn.functional as F

    import qtorch
    from qcore import PerGroup, QuantScheme

    scheme = QuantScheme(bits, sym, PerGroup(32))
    n, k = 48, 80  # 80 = 2 * 32 + 16: a ragged last group as well
    qa = qcore.quantize(np.random.default_rng(bits).standard_normal((n, k)).astype(np.float32), scheme)
    want_w = torch.from_numpy(qcore.dequantize(qa))
    layer = qtorch.QuantLinear.from_quantized_array(qa, dtype=dtype)
    ref = qtorch.QuantLinear.from_quantized_array(qa, dtype=dtype)
    assert layer._w.hold_layout("blocked", dtype) and ref._w.hold_layout("canonical", dtype)
    assert layer.quantized_weight.layout.name == "blocked"
    torch.testing.assert_close(layer.dequantized_weight(torch.float32), want_w, rtol=0, atol=0)
    for key, t in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[key], t), key
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    w_, lay = layer._w, layer._w.layout
    for rows in (1, 3, 40):
        x = torch.randn(rows, k).to(dtype)
        want = F.linear(x.float(), want_w)
        for path in lay.paths("cpu", dtype, rows, bits, spec=w_.spec):
            got = lay.linear(w_, x, path).float()
            torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()), msg=path)


def _canonical_16(q, scale, zp, bits, sym, kind, g, n, k, dtype):
    return codec.dequantize_canonical(q, scale, zp, bits=bits, symmetric=sym, kind=kind, axis=int(kind != "channel"),
                                      group=g, out_features=n, in_features=k, dtype=dtype)


@pytest.mark.parametrize("bits,sym,kind,g", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1.0, 1e3, 3e4, 6e4, 1e37, 3e38])
def test_16_bit_dequantization_skips_the_saturation_passes_only_where_nothing_saturates(bits, sym, kind, g, dtype,
                                                                                     magnitude, monkeypatch):
    # scales from ordinary to past the 16-bit range: the cast alone where the scales bound every value inside it,
    # the branch-free saturation otherwise; the same bits either way
    n, k = 8, 16
    q, scale, zp = _random_canonical(bits, sym, kind, n, k, g, seed=3)
    scale = scale * (magnitude / 2**bits)
    got = _canonical_16(q, scale, zp, bits, sym, kind, g, n, k, dtype)
    top = float(torch.finfo(dtype).max)
    assert codec.fits(scale, zp, bits, dtype) == (float(scale.max()) * 2**bits <= top)
    monkeypatch.setattr(codec, "fits", lambda *a: False)
    want = _canonical_16(q, scale, zp, bits, sym, kind, g, n, k, dtype)
    assert got.dtype == want.dtype == dtype and torch.equal(got.float().nan_to_num(), want.float().nan_to_num())


def test_fits_is_told_again_after_the_scale_changes_in_place_or_is_replaced():
    scale, top = torch.full((4,), 1.0), float(torch.finfo(torch.float16).max)
    assert codec.fits(scale, None, 8, torch.float16)
    scale.mul_(1e3)  # 256 x 1000 > 65504: a verdict kept from before would let values overflow to inf
    assert not codec.fits(scale, None, 8, torch.float16)
    assert codec.fits(torch.full((4,), top / 512), None, 8, torch.float16)
    assert codec.fits(torch.ones(2), torch.tensor([1e5, 0.0]), 8, torch.float16)  # an integer zero point is a code
    assert not codec.fits(torch.ones(2), torch.tensor([1e5, 0.0]), 8, torch.float16, True)  # a float one adds
    assert codec.fits(torch.full((2,), 1e30), None, 8, torch.float32)  # nothing narrows there


def test_fits_declines_where_values_cannot_be_read():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not codec.fits(torch.ones(4, device="meta"), None, 8, torch.bfloat16)
    assert not codec.fits(torch.nn.Parameter(torch.ones(4)), None, 8, torch.bfloat16)
    with FakeTensorMode() as mode:
        assert not codec.fits(mode.from_tensor(torch.ones(4)), None, 8, torch.bfloat16)
    assert not codec.fits(torch.tensor([float("nan")]), None, 8, torch.bfloat16)
    with torch.inference_mode():
        s = torch.ones(4)
    assert codec.fits(s, None, 8, torch.bfloat16) and codec.fits(s, None, 8, torch.bfloat16)  # no version: no cache
