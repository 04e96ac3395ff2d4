"""qtorch.amx_rows: bfloat16 calls of several rows on 8-bit codes held row by row, on AMX tiles. The int8pack
layout offers it on AMX CPUs (K a multiple of 32); it gives F.linear's numbers on the dequantized weight within
bfloat16's rounding, with a bias, any row count and a channel count that 16 does not divide; bad operands are named."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qcore
from qcore import PerChannel, QuantScheme
from qtorch import amx_rows
from qtorch.layouts import int8pack
from qtorch.weight import QuantizedWeight

EPS = 2.0**-6  # bfloat16's rounding of a dot product
needs_amx = pytest.mark.skipif(not amx_rows.available(), reason="needs AMX-BF16 tiles and AVX512-BF16")


def _held(n, k, seed=0):
    qa = qcore.quantize(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32),
                        QuantScheme(8, True, PerChannel(0)))
    w = QuantizedWeight.from_quantized_array(qa, compute_dtype=torch.bfloat16)
    return w if w.hold_layout("int8pack", torch.bfloat16) else None


def _assert_close(y, x, w, bias=None):
    ref = F.linear(x, w.dequantize(torch.bfloat16), None if bias is None else bias.to(x.dtype))
    bound = F.linear(x.float().abs(), w.dequantize(torch.float32).abs()) + (0 if bias is None else bias.abs())
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs()
    assert torch.all(err <= EPS * bound + 1e-6), float((err - EPS * bound).max())


@needs_amx
@pytest.mark.parametrize("n,k", [(16, 32), (192, 576), (40, 96), (1536, 64)])
@pytest.mark.parametrize("rows", [2, 16, 17, 41, 130])
def test_the_int8pack_path_gives_f_linear(n, k, rows):
    w = _held(n, k)
    assert w is not None
    assert int8pack.AMX_ROWS in w.layout.paths("cpu", torch.bfloat16, rows, 8, spec=w.spec)
    torch.manual_seed(rows)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    with torch.no_grad():
        _assert_close(w.layout.linear(w, x, int8pack.AMX_ROWS), x, w)
    bias = torch.randn(n)
    _assert_close(amx_rows.linear(x, w.buffers["qweight"], w.buffers["scale"], bias), x, w, bias)


def test_offered_only_where_it_runs():
    w = _held(32, 48)  # K % 32 != 0 (int8pack itself takes K % 16 == 0)
    assert w is not None
    paths = w.layout.paths("cpu", torch.bfloat16, 16, 8, spec=w.spec)
    assert int8pack.AMX_ROWS not in paths
    w = _held(32, 64)
    assert (int8pack.AMX_ROWS in w.layout.paths("cpu", torch.bfloat16, 16, 8, spec=w.spec)) == amx_rows.available()
    assert int8pack.AMX_ROWS not in w.layout.paths("cpu", torch.bfloat16, 1, 8, spec=w.spec)  # one row: the op
    assert int8pack.AMX_ROWS not in w.layout.paths("cpu", torch.float32, 16, 8, spec=w.spec)


@needs_amx
def test_a_gradient_or_a_trace_takes_a_path_that_has_one():
    w = _held(32, 64)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    y = w.layout.linear(w, x, int8pack.AMX_ROWS)  # needs a gradient: the differentiable path
    y.float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    _assert_close(y.detach(), x.detach(), w)


def test_bad_operands_are_named():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    q = torch.ones(16, 64, dtype=torch.int8)
    s = torch.ones(16)
    with pytest.raises(TypeError, match="x must be a 2-d bfloat16"):
        amx_rows.linear(x.float(), q, s)
    with pytest.raises(ValueError, match="multiple of 32"):
        amx_rows.linear(torch.randn(2, 48, dtype=torch.bfloat16), q[:, :48], s)
    with pytest.raises(ValueError, match="codes must be int8"):
        amx_rows.linear(x, q.to(torch.uint8), s)
    with pytest.raises(ValueError, match="scale must be float32 with 16"):
        amx_rows.linear(x, q, s[:8])
    with pytest.raises(ValueError, match="bias must have 16"):
        amx_rows.linear(x, q, s, torch.ones(3))
