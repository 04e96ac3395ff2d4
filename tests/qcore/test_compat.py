"""qcore.compat: the prior art's names on NumPy; linear_dequantize inverts linear_quantize; torch input points
to qtorch (qcore never imports torch: a stand-in class from module ``torch`` plays the tensor here)."""

import numpy as np
import pytest

import qcore
from qcore import PerChannel, PerTensor, QuantScheme


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("dim", [None, 0, 1])
def test_linear_dequantize_inverts_linear_quantize(dtype, dim):
    x = np.random.default_rng(1).standard_normal((5, 12)).astype(np.float32)
    x[2, 3] = 0.0
    if dim is None:
        scale, zp, q = qcore.linear_quantize(x, dtype=dtype)
        scheme = QuantScheme(8, False, PerTensor())
    else:
        scale, zp, q = qcore.channel_linear_quantize(x, dim=dim, dtype=dtype)
        scheme = QuantScheme(8, False, PerChannel(dim))
    assert q.dtype == dtype and zp.dtype == dtype
    back = qcore.linear_dequantize(scale, zp, q)
    # the same values as qcore's own dequantize of the same quantization (int8 is the uint8 grid shifted by 128)
    assert back.dtype == np.float32 and np.array_equal(back, qcore.dequantize(qcore.quantize(x, scheme)))
    assert np.all(np.abs(back - x) <= scale / 2 * (1 + 1e-6)) and back[2, 3] == 0.0


def test_linear_dequantize_takes_a_per_row_scale_of_one_dimension():
    q = np.array([[1, 2], [3, 4]], np.int8)
    out = qcore.linear_dequantize(np.array([1.0, 10.0], np.float32), np.array([1, 0], np.int8), q)
    assert out.tolist() == [[0.0, 1.0], [30.0, 40.0]]


class Tensor:
    """Stands in for torch.Tensor: qcore sees only the class's module."""

    __module__ = "torch"


@pytest.mark.parametrize("name", ["quantize_symmetric", "quantize_weight_per_channel", "linear_quantize",
                                  "channel_linear_quantize"])
def test_torch_input_points_to_the_qtorch_function(name):
    with pytest.raises(TypeError, match=f"torch Tensor; qcore works on NumPy arrays.*from qtorch import {name}"):
        getattr(qcore, name)(Tensor())
    with pytest.raises(TypeError, match="from qtorch import linear_dequantize"):
        qcore.linear_dequantize(np.float32(1), np.int8(0), Tensor())


def test_torch_dtypes_point_to_qtorch():
    class dtype:  # noqa: N801 - torch.dtype's name
        __module__ = "torch"

        def __repr__(self):
            return "torch.int8"

    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match=r"got torch.int8 \(for torch dtypes use `from qtorch import linear_quantize`\)"):
        qcore.linear_quantize(x, dtype=dtype())
    with pytest.raises(TypeError, match="dtype must be np.int8 or np.uint8, got <class 'numpy.int16'>"):
        qcore.channel_linear_quantize(x, dtype=np.int16)
