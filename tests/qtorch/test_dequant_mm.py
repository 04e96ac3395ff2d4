"""qtorch.dequant_mm: blocks of output rows dequantized into the activation dtype, then oneDNN/MKL matmul.

The reference is qcore itself: ``qcore.dequantize`` of the same QuantizedArray, rounded to the activation dtype.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qcore
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from qtorch import _omp
from qtorch import dequant_rows as DR
from qtorch.dequant_mm import WeightSpec, block_rows_for, dequant_linear, dequantize

KS = [1, 7, 100, 500, 504, 520]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _group(k, want=8):
    return max(d for d in range(1, want + 1) if k % d == 0)


def _schemes(k, n):
    """(label, scheme) over the widths and granularities the path serves, for a weight [n, k]."""
    g = _group(k)
    return [
        ("w8-sym-channel", QuantScheme(bits=8, symmetric=True, granularity=PerChannel(0))),
        ("w8-asym-tensor", QuantScheme(bits=8, symmetric=False, granularity=PerTensor())),
        ("w8-asym-group", QuantScheme(bits=8, symmetric=False, granularity=PerGroup(g))),
        ("w4-asym-group", QuantScheme(bits=4, symmetric=False, granularity=PerGroup(g))),
        ("w4-sym-channel", QuantScheme(bits=4, symmetric=True, granularity=PerChannel(0))),
        ("w4-sym-tensor", QuantScheme(bits=4, symmetric=True, granularity=PerTensor())),
        ("w3-asym-inputs", QuantScheme(bits=3, symmetric=False, granularity=PerChannel(1))),
        ("w2-sym-group-rows", QuantScheme(bits=2, symmetric=True, granularity=PerGroup(_group(n, 4), axis=0))),
    ]


def _state(scheme, n, k, seed=0):
    """Canonical (qweight, scale, zero_point) of a random weight, its qcore float32 dequantization, the spec."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    qa = qcore.quantize(w, scheme)
    q = torch.from_numpy(np.array(qa.codes if scheme.bits == 8 else qa.packed()))
    s = torch.from_numpy(np.array(qa.scale, np.float32))
    z = None if qa.zero_point is None else torch.from_numpy(np.array(qa.zero_point, np.uint8))
    return q, s, z, torch.from_numpy(qcore.dequantize(qa)), WeightSpec.from_scheme(scheme, n, k)


def _tol(dtype, k):
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype] * max(1.0, k ** 0.5)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("team", [True, False])
def test_weight_blocks_equal_qcore_bit_for_bit(k, team, monkeypatch):
    if team:  # small chunks: several per call, so that torch's team threads share the rows
        monkeypatch.setattr(DR, "_CHUNK_VALUES", 16)
    else:
        monkeypatch.setattr(_omp, "_GOMP_PARALLEL", False)
    n = 36
    for label, scheme in _schemes(k, n):
        q, s, z, ref, spec = _state(scheme, n, k, seed=k)
        assert torch.equal(dequantize(q, s, z, spec, torch.float32), ref), label
        assert torch.equal(dequantize(q, s, z, spec, torch.bfloat16), ref.to(torch.bfloat16)), label
        assert torch.equal(dequantize(q, s, z, spec, torch.float16), ref.to(torch.float16)), label


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_forward_matches_linear_of_the_dequantized_weight(k, dtype, rows):
    n = 37  # not a multiple of any block
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k + rows)).to(dtype)
    for label, scheme in _schemes(k, n):
        q, s, z, ref, spec = _state(scheme, n, k, seed=rows)
        want = F.linear(x.float(), ref.to(dtype).float())
        for block_rows in (0, 16, 8):
            y = dequant_linear(x, q, s, z, spec, block_rows=block_rows)
            assert y.dtype == dtype and y.shape == (rows, n)
            err = (y.float() - want).abs().max().item()
            assert err <= _tol(dtype, k) * max(1.0, want.abs().max().item()), (label, block_rows, err)


def test_float32_blocks_give_the_same_result_as_one_matmul():
    q, s, z, ref, spec = _state(QuantScheme(bits=4, symmetric=False, granularity=PerGroup(32)), 300, 256)
    x = torch.randn(16, 256)
    for block_rows in (16, 48, 0):
        torch.testing.assert_close(dequant_linear(x, q, s, z, spec, block_rows=block_rows), F.linear(x, ref))


def test_the_bfloat16_rounding_is_nearest_even():
    # code 1 times a scale halfway between two bfloat16 values (odd and even neighbours, signed), or next to one
    bits = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x00800000, 0x7F7F8000], np.uint32)
    scale = bits.view(np.float32).reshape(-1, 1)
    out = np.empty((6, 1), np.uint16)
    DR.dequant_rows(np.ones((6, 1), np.int8).view(np.uint8), 8, True, 1, scale, np.zeros((0, 0), np.uint8), 0, 1,
                    0, 6, out)
    neg = np.empty((6, 1), np.uint16)
    DR.dequant_rows(np.full((6, 1), -1, np.int8).view(np.uint8), 8, True, 1, scale, np.zeros((0, 0), np.uint8), 0,
                    1, 0, 6, neg)
    want = torch.from_numpy(scale).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(out, want)
    assert np.array_equal(neg, want | 0x8000)


@pytest.mark.parametrize("k", [32, 64, 77])
@pytest.mark.parametrize("signed", [True, False])
def test_8bit_codes_to_bfloat16_equal_torchs_rounding(k, signed):
    # 32 values a step where the CPU converts by vcvtne2ps2bf16 (then a scalar tail): ties to even, both signs, the
    # largest finite, a subnormal scale and subnormal products (the instruction reads those as zero: such groups
    # take the scalar rounding), zero
    ties = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x00800000, 0x7F7F8000, 0x00000001,
                     0x00400000, 0x00000000], np.uint32).view(np.float32)
    rng = np.random.default_rng(k)
    n = len(ties) + 3
    scale = np.concatenate([ties, rng.random(3, dtype=np.float32)]).reshape(n, 1)
    if signed:
        q = rng.integers(-128, 128, (n, k), dtype=np.int8)
        q[:len(ties)] = rng.choice(np.array([1, -1], np.int8), (len(ties), k))
        z, zero = np.zeros((0, 0), np.uint8), 0
    else:
        q = rng.integers(0, 256, (n, k), dtype=np.uint8)
        z = rng.integers(0, 256, (n, 1), dtype=np.uint8)
        q[:len(ties)] = (z[:len(ties)].astype(np.int16) + rng.choice([1, -1], (len(ties), k))).clip(0, 255)
        zero = 0
    out = np.empty((n, k), np.uint16)
    DR.dequant_rows(q.view(np.uint8), 8, signed, k, scale, z, zero, 1, 0, n, out)
    f32 = (q.astype(np.float32) - (z.astype(np.float32) if z.size else 0)) * scale
    with np.errstate(over="ignore"):
        want = torch.from_numpy(f32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(out, want)


def test_no_rows_and_one_row():
    q, s, z, ref, spec = _state(QuantScheme(bits=8), 20, 16)
    assert dequant_linear(torch.empty(0, 16), q, s, z, spec).shape == (0, 20)
    x = torch.randn(1, 16)
    torch.testing.assert_close(dequant_linear(x, q, s, z, spec), F.linear(x, ref))


def test_input_gradient_is_grad_times_the_weight():
    q, s, z, ref, spec = _state(QuantScheme(bits=4, symmetric=False, granularity=PerGroup(8)), 24, 40)
    x = torch.randn(3, 40, requires_grad=True)
    dequant_linear(x, q, s, z, spec, block_rows=16).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, ref).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


class _Layer(torch.nn.Module):
    def __init__(self, q, s, z, spec):
        super().__init__()
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)
        self.register_buffer("zero_point", z)
        self.spec = spec

    def forward(self, x):
        return dequant_linear(x, self.qweight, self.scale, self.zero_point, self.spec, block_rows=16) + 1.0


@pytest.mark.parametrize("scheme", [QuantScheme(bits=8), QuantScheme(bits=4, symmetric=False,
                                                                      granularity=PerGroup(16))])
def test_runs_under_torch_compile_fullgraph(scheme):
    import qtorch
    q, s, z, ref, spec = _state(scheme, 40, 64)
    m = _Layer(q, s, z, spec)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    compiled = qtorch.compile(m, fullgraph=True, autotune=False)  # freezing: the buffers become constants
    torch.testing.assert_close(compiled(x), m(x), rtol=0, atol=0)


def _bad(**change):
    q, s, z, ref, spec = _state(QuantScheme(bits=4, symmetric=False, granularity=PerGroup(8)), 16, 32)
    args = dict(x=torch.randn(2, 32), qweight=q, scale=s, zero_point=z, spec=spec)
    args.update(change)
    return args


@pytest.mark.parametrize("change,err,match", [
    (dict(x=torch.randn(2, 31)), ValueError, r"x must be \[rows, in_features=32\]"),
    (dict(x=torch.randn(2, 32).to(torch.float64)), TypeError, "x must be float32, bfloat16 or float16"),
    (dict(x=np.zeros((2, 32))), TypeError, "x must be a torch.Tensor"),
    (dict(qweight=torch.zeros(16, 32, dtype=torch.uint8)), ValueError, r"qweight must be torch.uint8 of shape \[16, 16\]"),
    (dict(scale=torch.ones(16, 4, dtype=torch.float64)), ValueError, r"scale must be float32 of shape \[16, 4\]"),
    (dict(zero_point=None), ValueError, r"zero_point must be uint8 of shape \[16, 4\], got NoneType"),
    (dict(zero_point=torch.zeros(16, 4, dtype=torch.int32)), ValueError, "zero_point must be uint8"),
    (dict(spec="w4"), TypeError, "spec must be a WeightSpec"),
])
def test_bad_input_names_the_problem(change, err, match):
    with pytest.raises(err, match=match):
        dequant_linear(**_bad(**change))


def test_symmetric_takes_no_zero_point_and_block_rows_is_checked():
    q, s, z, ref, spec = _state(QuantScheme(bits=8), 16, 32)
    with pytest.raises(ValueError, match="zero_point must be None"):
        dequant_linear(torch.randn(1, 32), q, s, torch.zeros(16, dtype=torch.uint8), spec)
    with pytest.raises(ValueError, match="block_rows must be an int >= 0"):
        dequant_linear(torch.randn(1, 32), q, s, None, spec, block_rows=-1)


def test_kernel_operands_are_checked_before_use():
    q = np.zeros((4, 8), np.uint8)
    S, Z = np.ones((4, 1), np.float32), np.zeros((0, 0), np.uint8)
    out = np.empty((4, 8), np.float32)
    with pytest.raises(ValueError, match="rows of 8 bytes"):
        DR.dequant_rows(q, 4, False, 8, S, Z, 8, 1, 0, 4, out)
    with pytest.raises(TypeError, match="S must be float32"):
        DR.dequant_rows(q, 8, False, 8, S.astype(np.float64), Z, 0, 1, 0, 4, out)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        DR.dequant_rows(q, 8, False, 8, S, Z, 0, 1, 0, 4, np.empty((8, 4), np.float32).T)
    with pytest.raises(ValueError, match=r"need out of shape \[3, 8\]"):
        DR.dequant_rows(q, 8, False, 8, S, Z, 0, 1, 1, 4, out)
    with pytest.raises(ValueError, match="S must be"):
        DR.dequant_rows(q, 8, False, 8, np.ones((2, 1), np.float32), Z, 0, 1, 0, 4, out)


def test_block_rows_hold_about_eight_megabytes():
    assert block_rows_for(4096, torch.bfloat16) == 1024 and block_rows_for(4096, torch.float32) == 512
    assert block_rows_for(10 ** 7, torch.float32) == 16


@pytest.mark.parametrize("block_rows", [6, 16, 0])
def test_groups_along_output_channels_across_block_boundaries(block_rows):
    # groups of 4 output channels, blocks of 6 rows: a group straddles two blocks, its scale row is the same
    scheme = QuantScheme(bits=4, symmetric=False, granularity=PerGroup(4, axis=0))
    q, s, z, ref, spec = _state(scheme, 36, 48, seed=3)
    x = torch.randn(7, 48)
    torch.testing.assert_close(dequant_linear(x, q, s, z, spec, block_rows=block_rows), F.linear(x, ref))


def test_strided_input_equals_its_contiguous_copy():
    q, s, z, ref, spec = _state(QuantScheme(bits=8), 40, 24)
    xt = torch.randn(24, 5).t()  # [5, 24], not C-contiguous
    assert torch.equal(dequant_linear(xt, q, s, z, spec, block_rows=16),
                       dequant_linear(xt.contiguous(), q, s, z, spec, block_rows=16))
