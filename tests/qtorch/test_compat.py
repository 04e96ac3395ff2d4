"""The prior art's quick-starts run as written (only the import line adapted), and their functions take torch.

Each ``test_readme_*`` holds one quick-start snippet of a reference README verbatim; names the snippet leaves to
the reader (``MyCustomModel``, ``input_data``, ``original_weights``) are defined above it.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

import qcore
import qtorch
from qtorch._torch_numpy import to_numpy


def test_readme_w8a16_linear_basic_example():
    import torch
    from qtorch import W8A16LinearLayer

    # Create quantized layer
    layer = W8A16LinearLayer(in_features=4, out_features=8, bias=True)

    # Generate weights to quantize
    weights = torch.randn((8, 4), dtype=torch.float32)
    layer.quantize(weights)

    # Forward pass
    input_tensor = torch.randn((2, 4), dtype=torch.float32)
    output = layer(input_tensor)

    assert output.shape == (2, 8)
    assert torch.equal(layer.int8_weights, torch.from_numpy(qcore.quantize_weight_per_channel(weights.numpy())[0]))


def test_readme_modular_quantization_example_usage():
    import torch
    from qtorch import QWQALinearLayer

    layer = QWQALinearLayer(16, 32)
    input = torch.randn(4, 16)
    output = layer(input)

    assert output.shape == (4, 32) and torch.equal(output, torch.zeros(4, 32))  # not quantized yet: zero weight


def test_readme_model_quantizer_quick_start():
    from qtorch import Quantizer, W8A16LinearLayer

    class MyCustomModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(512, 256)
            self.lm_head = nn.Linear(256, 10)

        def forward(self, x):
            return self.lm_head(torch.relu(self.body(x)))

    input_data = torch.randn(3, 512)
    original_weights = torch.randn(256, 512)

    # Create your model
    model = MyCustomModel()

    # Apply quantization (excluding specific layers)
    Quantizer(model, W8A16LinearLayer, ["lm_head"])

    # Use as normal
    output = model(input_data)

    # Manual layer creation
    quant_layer = W8A16LinearLayer(in_features=512, out_features=256, bias=True)

    # Quantize existing weights
    quant_layer.quantize(original_weights)

    assert output.shape == (3, 10)
    assert isinstance(model.body, W8A16LinearLayer) and type(model.lm_head) is nn.Linear
    for name, module in model.named_modules():  # the README's "Manual Quantization Control"
        if isinstance(module, W8A16LinearLayer):
            assert name == "body" and module.scales.shape == (256,)
    assert quant_layer.int8_weights.shape == (256, 512)


def test_readme_smolquant_quick_start_and_api_reference():
    import torch
    import torch.nn as nn
    from qtorch import W8A16LinearLayer, replace_linear_with_target_and_quantize

    # Create a simple model
    model = nn.Sequential(
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10)
    )

    # Quantize all linear layers
    replace_linear_with_target_and_quantize(model, W8A16LinearLayer, [])
    print("Model quantized successfully!")

    assert isinstance(model[0], W8A16LinearLayer) and isinstance(model[2], W8A16LinearLayer)
    # the API reference: W8A16LinearLayer(in_features, out_features, dtype=torch.float32, bias=None)
    layer = W8A16LinearLayer(128, 64, dtype=torch.bfloat16, bias=None)
    assert layer.bias is None and layer.dtype == torch.bfloat16
    assert W8A16LinearLayer(128, 64, dtype=torch.float16, bias=True).bias.dtype == torch.float16
    # linear_quantize(tensor, dtype=torch.int8) -> scale, zero_point, quantized_tensor
    from qtorch import channel_linear_quantize, linear_dequantize, linear_quantize
    tensor = torch.randn(64, 128)
    scale, zero_point, quantized_tensor = linear_quantize(tensor, dtype=torch.int8)
    assert quantized_tensor.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == ()
    assert (tensor - linear_dequantize(scale, zero_point, quantized_tensor)).abs().max() <= scale / 2 * 1.0001
    scales, zero_pts, quant = channel_linear_quantize(tensor, dim=0, dtype=torch.int8)
    assert scales.shape == zero_pts.shape == (64, 1) and quant.shape == (64, 128)
    reconstructed = linear_dequantize(scales, zero_pts, quant)
    mse = (tensor - reconstructed).pow(2).mean()
    assert mse < float(scales.max()) ** 2 / 4


def test_readme_int8_symmetric_quick_start(capsys):
    from qtorch import (
        quantize_symmetric,
        dequantize,
        quantize_weight_per_channel,
        calculate_quantization_error,
        QuantizedLinear,
    )

    # Quantize a weight tensor
    weight = torch.randn(4096, 4096, dtype=torch.float16)
    weight_int8, scale = quantize_symmetric(weight)

    # Check accuracy
    errors = calculate_quantization_error(weight, weight_int8, scale)
    print(f"SNR: {errors['snr_db']:.1f} dB")

    # Use in a model
    linear = torch.nn.Linear(4096, 4096)
    qlinear = QuantizedLinear.from_linear(linear)

    assert capsys.readouterr().out.startswith("SNR: ")
    assert weight_int8.dtype == torch.int8 and scale.shape == ()  # the README: scale.shape: ()
    weight_int8, scales = quantize_weight_per_channel(weight)
    assert scales.shape == (4096,)  # the README: scales.shape: (out_features,)
    deq = dequantize(weight_int8, scales)
    assert deq.dtype == torch.float32 and (deq - weight.float()).abs().max() <= scales.max() / 2 * 1.0001
    assert set(errors) >= {"max_abs_error", "mean_abs_error", "relative_error_pct", "snr_db"}
    assert errors["snr_db"] > 35 and isinstance(qlinear, QuantizedLinear)


# ------------------------------------------------------------------ the functions themselves

FUNCS = ["quantize_symmetric", "quantize_weight_per_channel", "linear_quantize", "channel_linear_quantize"]


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_torch_input_gives_qcores_numbers_as_torch_tensors(name, dtype):
    x = torch.randn(6, 10).to(dtype)
    got = getattr(qtorch, name)(x)
    want = getattr(qcore, name)(to_numpy(x))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert isinstance(g, torch.Tensor) and g.device == x.device and tuple(g.shape) == np.shape(w)
        assert np.array_equal(g.numpy(), w) and g.numpy().dtype == np.asarray(w).dtype


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, np.int8, np.uint8], ids=str)
def test_torch_and_numpy_dtypes_are_accepted(dtype):
    x = torch.randn(5, 7)
    for fn in (qtorch.linear_quantize, lambda t, dtype: qtorch.channel_linear_quantize(t, 1, dtype)):
        scale, zp, q = fn(x, dtype=dtype)
        assert q.dtype == (dtype if isinstance(dtype, torch.dtype) else torch.from_numpy(np.zeros(1, dtype)).dtype)
        assert zp.dtype == q.dtype
        back = qtorch.linear_dequantize(scale, zp, q)
        assert back.dtype == torch.float32 and torch.all((back - x).abs() <= scale / 2 * 1.0001 + 1e-7)
    with pytest.raises(TypeError, match=r"torch.int8 or torch.uint8 \(or np.int8 / np.uint8\), got torch.int16"):
        qtorch.linear_quantize(x, dtype=torch.int16)
    with pytest.raises(TypeError, match="dtype must be np.int8 or np.uint8"):
        qtorch.channel_linear_quantize(x, 0, np.float32)


def test_linear_dequantize_inverts_on_numpy_and_torch_alike():
    x = np.random.default_rng(0).standard_normal((4, 9)).astype(np.float32)
    for fn in (qcore.linear_quantize, qcore.channel_linear_quantize):
        s, z, q = fn(x)
        want = qcore.linear_dequantize(s, z, q)
        got = qtorch.linear_dequantize(*(torch.from_numpy(np.asarray(a)) for a in (s, z, q)))
        assert np.array_equal(got.numpy(), want)
        assert np.array_equal(qtorch.linear_dequantize(s, z, q), want)  # NumPy in, NumPy out
    calc = qtorch.calculate_quantization_error(torch.from_numpy(x), *(torch.from_numpy(np.asarray(a))
                                                                     for a in qcore.quantize_symmetric(x)))
    assert calc == qcore.calculate_quantization_error(x, *qcore.quantize_symmetric(x))


def test_bias_must_be_a_flag():
    with pytest.raises(TypeError, match="bias must be True, False or None.*got Tensor.*bias.copy_"):
        qtorch.W8A16LinearLayer(4, 8, bias=torch.zeros(8))
    with pytest.raises(TypeError, match="got Tensor"):
        qtorch.W8A16LinearLayer(4, 8, bias=torch.zeros(1))  # was silently "no bias"
    with pytest.raises(TypeError, match="got the dtype torch.bfloat16; pass it as dtype=torch.bfloat16"):
        qtorch.W8A16LinearLayer(4, 8, torch.bfloat16)  # was a float32 layer with a bias
    with pytest.raises(TypeError, match="bias must be"):
        qtorch.QuantLinear(4, 8, "yes", scheme=qcore.QuantScheme())
    assert qtorch.W8A16LinearLayer(4, 8, False).bias is None
    assert qtorch.W8A16LinearLayer(4, 8, np.bool_(True)).bias.shape == (8,)
