"""The vnni8 kernel (qtorch.vnni8): the weight's tile order, the activations' planes and their one rounding, the
sums against a float64 product, non-finite inputs and bad operands."""

import numpy as np
import pytest
import torch

from qtorch import vnni8

AMX = pytest.mark.skipif(not vnni8.available(), reason="the vnni8 kernel needs AMX-INT8 (not on this CPU)")
KINDS = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}


def bits(x: torch.Tensor) -> np.ndarray:
    """The kernel's view of ``x``: float32 as is, 16-bit floats as their bits."""
    return x.numpy() if x.dtype == torch.float32 else x.view(torch.int16).numpy().view(np.uint16)


def weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    return codes, scale


def check(out, x, codes, scale, planes):
    """``out`` against the float64 product, within ``x``'s rounding into ``planes`` planes (``2^(e - P - 1)`` an
    element, ``|x| < 2^e`` per row) and float32's rounding of the combined sums."""
    xd, wd = x.double(), codes.double() * scale.double()[:, None]
    ref = xd @ wd.T
    e = torch.frexp(xd.abs().amax(1, keepdim=True)).exponent.double()
    step = torch.pow(2.0, e - vnni8.P_OF[planes] - 1)
    bound = step * wd.abs().sum(1)[None, :] + 2.0**-21 * (xd.abs() @ wd.abs().T)
    err = (torch.as_tensor(out).double() - ref).abs()
    assert torch.all(err <= bound), float((err - bound).max())


def test_pack_and_unpack_are_inverse():
    codes = np.random.default_rng(0).integers(-127, 128, (128, 192)).astype(np.int8)
    w = vnni8.pack(codes)
    assert w.shape == (2, 2, 3, 2, 16, 64) and (vnni8.unpack(w) == codes).all()
    # a B tile row: four consecutive inputs of each of 16 channels
    assert w[0, 0, 1, 0, 2, :8].tolist() == [codes[0, 72 + j] for j in range(4)] + [codes[1, 72 + j] for j in range(4)]
    assert w[1, 1, 0, 1, 0, :4].tolist() == codes[64 + 48, :4].tolist()  # tile 1, strip 3
    t = torch.from_numpy(codes)
    assert torch.equal(vnni8.unpack(vnni8.pack(t)), t)


def test_planes_are_four_for_float32_and_few_rows():
    assert vnni8.planes(0, 100) == 4 and vnni8.planes(1, 4) == 4 and vnni8.planes(2, 1) == 4
    assert vnni8.planes(1, 16, np.array([2, 3, 2])) == 3


@AMX
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 21, 40])
def test_sums_match_the_float64_product(kind, rows):
    codes, scale = weight(128, 320, seed=rows)
    x = (torch.randn(rows, 320) * torch.exp(torch.randn(rows, 1))).to(KINDS[kind])
    out = np.full((rows, 128), np.nan, np.float32)
    assert vnni8.run(bits(x), kind, vnni8.pack(codes.numpy()), scale.numpy(), out) is out
    check(out, x, codes, scale, 2 if kind and rows > 4 else 4)  # normal rows: two planes are enough


@AMX
def test_a_row_far_above_its_mean_takes_more_planes():
    # one input 2^12 times the others: two planes would round the rest to 2^-3 of their size; the planes are chosen
    # so that x's rounding stays within the weight's rounding to bfloat16
    codes, scale = weight(64, 256)
    x = torch.randn(16, 256)
    x[5, 7] = 4096.0
    xb = x.bfloat16()
    out = np.empty((16, 64), np.float32)
    vnni8.run(bits(xb), 1, vnni8.pack(codes.numpy()), scale.numpy(), out)
    check(out, xb, codes, scale, 3)
    ref = xb.double() @ (codes.double() * scale.double()[:, None]).T
    weight_rounding = 2.0**-8 * (xb.double().abs() @ (codes.double() * scale.double()[:, None]).abs().T)
    assert torch.all((torch.from_numpy(out).double() - ref).abs() <= weight_rounding)


@AMX
def test_exact_inputs_give_exact_sums():
    # inputs of few significant bits are held exactly: the sums are the integer products, scaled by powers of two
    codes, _ = weight(64, 128)
    scale = torch.ones(64)
    x = torch.randint(-8, 9, (6, 128)).float() * 0.25
    out = np.empty((6, 64), np.float32)
    vnni8.run(bits(x), 0, vnni8.pack(codes.numpy()), scale.numpy(), out)
    assert np.array_equal(out, (x.double() @ codes.double().T).numpy())


@AMX
@pytest.mark.parametrize("rows", [1, 2, 16])
def test_outputs_in_16_bit_kinds_are_the_float32_sums_rounded(rows):
    codes, scale = weight(128, 256)
    w = vnni8.pack(codes.numpy())
    plan = vnni8.Plan(w, scale.numpy())
    x = torch.randn(rows, 256, dtype=torch.bfloat16)
    f32 = torch.empty(rows, 128)
    assert plan(x.data_ptr(), 1, rows, f32.data_ptr())
    for okind, dt in ((1, torch.bfloat16), (2, torch.float16)):
        y = torch.empty(rows, 128, dtype=dt)
        assert plan(x.data_ptr(), 1, rows, y.data_ptr(), okind)
        assert torch.equal(y, f32.to(dt))


@AMX
@pytest.mark.parametrize("rows", [1, 4, 9])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_x_is_refused_and_out_untouched(rows, bad):
    codes, scale = weight(64, 128)
    x = torch.randn(rows, 128)
    x[-1, 5] = bad
    out = np.full((rows, 64), 7.0, np.float32)
    assert vnni8.run(bits(x), 0, vnni8.pack(codes.numpy()), scale.numpy(), out) is None
    assert (out == 7.0).all()  # found before any tile ran
    xb = x.bfloat16()
    assert vnni8.run(bits(xb), 1, vnni8.pack(codes.numpy()), scale.numpy(), out) is None


@AMX
def test_bad_operands_are_named():
    codes, scale = weight(64, 128)
    w = vnni8.pack(codes.numpy())
    out = np.empty((2, 64), np.float32)
    with pytest.raises(ValueError, match="x must be contiguous"):
        vnni8.run(np.zeros((2, 128), np.float64), 0, w, scale.numpy(), out)
    with pytest.raises(ValueError, match="scale float32"):
        vnni8.run(np.zeros((2, 128), np.float32), 0, w, scale.numpy()[:32], out)
    with pytest.raises(ValueError, match="out float32"):
        vnni8.run(np.zeros((2, 128), np.float32), 0, w, scale.numpy(), np.empty((3, 64), np.float32))


def test_eligible_shapes():
    assert vnni8.eligible(64, 64) and vnni8.eligible(4096, 11008)
    assert not vnni8.eligible(96, 128) and not vnni8.eligible(64, 96) and not vnni8.eligible(64, 2 * vnni8.MAX_K)


@AMX
def test_a_plan_splits_into_the_planes_its_last_call_needed_and_again_where_too_few():
    codes, scale = weight(64, 256)
    plan = vnni8.Plan(vnni8.pack(codes.numpy()), scale.numpy())
    out = torch.empty(16, 64)
    normal = torch.randn(16, 256).bfloat16()
    wide = normal.clone()
    wide[3, 0] = 4096.0  # this row needs three planes
    for x, want in ((normal, 2), (wide, 3), (normal, 2)):
        assert plan(x.data_ptr(), 1, 16, out.data_ptr())
        assert plan.parts == want  # what this call needed: the next call's first split
        check(out.numpy(), x, codes, scale, want)


@pytest.mark.usefixtures("native_launches")
@AMX
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: every call runs on the caller")
@pytest.mark.parametrize("xkind", [0, 1], ids=["float32", "bfloat16"])
def test_one_row_as_one_native_launch_gives_the_python_launchs_bits(xkind):
    codes, scale = weight(256, 256, seed=31)
    w = vnni8.pack(codes.numpy())
    plan, python = vnni8.Plan(w, scale.numpy()), vnni8.Plan(w, scale.numpy())
    python.natives = {(xkind, xkind, vnni8.KB, False): None}  # the Python launch (as QTORCH_NATIVE_LAUNCH=0)
    dtype = KINDS[xkind]
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(32)).to(dtype)
    want = torch.full((1, 256), 5.0, dtype=dtype)
    assert python(x.data_ptr(), xkind, 1, want.data_ptr(), xkind)
    for _ in range(3):
        got = torch.full((1, 256), 5.0, dtype=dtype)
        assert plan(x.data_ptr(), xkind, 1, got.data_ptr(), xkind)
        assert torch.equal(got, want)
    assert plan.natives[(xkind, xkind, vnni8.KB, False)] is not None  # four tiles: the launch went natively
    if xkind == 0:  # (a bfloat16 output adds its own rounding: the bits above are the Python launch's)
        check(want, x, codes, scale, 4)
    bad = x.clone()
    bad[0, 100] = float("inf")
    out = torch.full((1, 256), 5.0, dtype=dtype)
    assert not plan(bad.data_ptr(), xkind, 1, out.data_ptr(), xkind)  # reported, out left alone
    assert torch.all(out == 5.0)
    assert plan(x.data_ptr(), xkind, 1, out.data_ptr(), xkind) and torch.equal(out, want)


def test_the_scratch_of_the_planes_starts_on_a_64_byte_line():
    """An A tile's 64-byte rows each load one line only where the planes' scratch starts on one (NumPy aligns its
    arrays to 16 bytes: a 128-row call took 1.5x as long in the processes where it fell across lines)."""
    scratch = vnni8._Scratch()
    for n, dtype in ((100, np.int8), (5000, np.int8), (3, np.float32)):
        arr, address = scratch.get(f"a{n}", n, dtype)
        assert address % 64 == 0 and arr.ctypes.data == address and arr.dtype == dtype and arr.size >= n


# -- one row by vpdpbusd (dot=True)

DOT = pytest.mark.skipif(not (vnni8.available() and vnni8.dot_eligible(64)),
                         reason="the one-row dot kernel needs AVX512-VNNI and the vnni8 layout AMX-INT8")


def run_dot(x, kind, codes, scale, okind=0, touch=False):
    out = torch.full((1, codes.shape[0]), 7.0, dtype=KINDS[okind])
    plan = vnni8.Plan(vnni8.pack(codes.numpy()), scale.numpy(), touch=touch)
    ok = plan(x.data_ptr(), kind, 1, out.data_ptr(), okind, dot=True)
    return out if ok else None


@DOT
@pytest.mark.parametrize("kind", [0, 1], ids=["float32", "bfloat16"])
def test_reading_each_line_twice_changes_no_bit(kind):
    # whether it does is the machine's choice (qtorch.prefetch.vnni8_touch)
    codes, scale = weight(192, 320, seed=41)
    x = torch.randn(1, 320, generator=torch.Generator().manual_seed(42)).to(KINDS[kind])
    once, twice = (run_dot(x, kind, codes, scale, kind, touch=t) for t in (False, True))
    assert once is not None and torch.equal(once, twice)


@DOT
def test_code_sums_given_to_the_plan_are_those_it_would_make():
    codes, scale = weight(128, 256, seed=43)
    w = vnni8.pack(codes.numpy())
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(44))
    outs = []
    for colsum in (None, vnni8.colsums(w)):
        out = torch.empty(1, 128)
        assert vnni8.Plan(w, scale.numpy(), colsum=colsum)(x.data_ptr(), 0, 1, out.data_ptr(), 0, dot=True)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="colsum"):
        vnni8.Plan(w, scale.numpy(), colsum=np.zeros(64, np.int32))


def test_colsums_are_each_channels_code_sum():
    codes, _ = weight(192, 320, seed=3)
    got = vnni8.colsums(vnni8.pack(codes.numpy()))
    assert got.dtype == np.int32 and np.array_equal(got, codes.numpy().astype(np.int64).sum(1))


def test_dot_serves_k_up_to_its_exact_bound():
    assert vnni8.DOT_MAX_K * 255 * 128 < 2**31  # every 32-bit lane sum of digits times codes stays exact
    if vnni8.dot_eligible(64):
        assert vnni8.dot_eligible(vnni8.DOT_MAX_K) and not vnni8.dot_eligible(vnni8.DOT_MAX_K + 64)


@DOT
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("n,k", [(64, 64), (128, 320), (192, 1024)])
def test_dot_sums_match_the_float64_product(kind, n, k):
    codes, scale = weight(n, k, seed=k + kind)
    x = (torch.randn(1, k) * torch.exp(torch.randn(1, k))).to(KINDS[kind])
    out = run_dot(x, kind, codes, scale)
    check(out, x, codes, scale, 4 if kind == 0 else 2)  # 16-bit rows: at least two planes
    if kind == 0:  # four planes either way: the tiles' sums, up to their combination in float32
        tiles = torch.empty(1, n)
        assert vnni8.Plan(vnni8.pack(codes.numpy()), scale.numpy())(x.data_ptr(), kind, 1, tiles.data_ptr())
        torch.testing.assert_close(out, tiles, rtol=2.0**-20, atol=1e-30)


@DOT
def test_dot_takes_more_planes_for_a_row_far_above_its_mean():
    codes, scale = weight(64, 256)
    x = torch.randn(1, 256)
    x[0, 7] = 4096.0
    xb = x.bfloat16()
    out = run_dot(xb, 1, codes, scale)
    ref = xb.double() @ (codes.double() * scale.double()[:, None]).T
    weight_rounding = 2.0**-8 * (xb.double().abs() @ (codes.double() * scale.double()[:, None]).abs().T)
    assert torch.all((out.double() - ref).abs() <= weight_rounding)


@DOT
@pytest.mark.parametrize("kind", [0, 1])
def test_dot_sums_stay_exact_at_its_longest_rows(kind):
    # every code -128 and x just under a power of two: the lower digits 0xFF and 0xC0, the top one 0x7F, each lane's
    # 32-bit sum within 2^31 of zero at K = DOT_MAX_K; the result is the exact product (few significant bits)
    k = vnni8.DOT_MAX_K
    codes = torch.full((64, k), -128, dtype=torch.int8)
    scale = torch.ones(64)
    v = 1 - 2.0**-24 if kind == 0 else 1 - 2.0**-8
    x = torch.full((1, k), v).to(KINDS[kind])
    out = run_dot(x, kind, codes, scale)
    assert torch.equal(out, torch.full((1, 64), -128.0 * k * v))


@DOT
def test_dot_outputs_in_16_bit_kinds_are_the_float32_sums_rounded():
    codes, scale = weight(128, 256)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    f32 = run_dot(x, 1, codes, scale)
    for okind, dt in ((1, torch.bfloat16), (2, torch.float16)):
        assert torch.equal(run_dot(x, 1, codes, scale, okind), f32.to(dt))


@DOT
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_dot_refuses_non_finite_x_and_leaves_out_untouched(bad):
    codes, scale = weight(64, 128)
    for kind in (0, 1):
        x = torch.randn(1, 128).to(KINDS[kind])
        x[0, 5] = bad
        assert run_dot(x, kind, codes, scale) is None
        out = np.full((1, 64), 7.0, np.float32)
        assert vnni8.run(bits(x), kind, vnni8.pack(codes.numpy()), scale.numpy(), out, dot=True) is None
        assert (out == 7.0).all()


@pytest.mark.usefixtures("native_launches")
@DOT
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: every call runs on the caller")
def test_dot_as_one_native_launch_gives_the_python_launchs_bits():
    codes, scale = weight(256, 256, seed=31)
    w = vnni8.pack(codes.numpy())
    plan, python = vnni8.Plan(w, scale.numpy()), vnni8.Plan(w, scale.numpy())
    python.natives = {(1, 1, vnni8.KB, True): None}  # the Python launch
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    want = torch.empty(1, 256, dtype=torch.bfloat16)
    assert python(x.data_ptr(), 1, 1, want.data_ptr(), 1, dot=True)
    got = torch.empty(1, 256, dtype=torch.bfloat16)
    assert plan(x.data_ptr(), 1, 1, got.data_ptr(), 1, dot=True) and torch.equal(got, want)
    assert plan.natives[(1, 1, vnni8.KB, True)] is not None


@DOT
def test_a_plan_makes_its_code_sums_at_its_first_dot_call_only():
    # 56 ms for a 4096 x 4096 weight: not paid by every layer a model loads, only by those that decode on vpdpbusd
    codes, scale = weight(128, 256)
    plan = vnni8.Plan(vnni8.pack(codes.numpy()), scale.numpy())
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    out = torch.empty(1, 128, dtype=torch.bfloat16)
    assert plan(x.data_ptr(), 1, 1, out.data_ptr(), 1) and len(plan.arrays) == 2  # the tiles: none made
    assert plan(x.data_ptr(), 1, 1, out.data_ptr(), 1, dot=True) and len(plan.arrays) == 3
    assert np.array_equal(plan.arrays[2], vnni8.colsums(plan.arrays[0]))
