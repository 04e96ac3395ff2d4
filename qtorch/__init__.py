"""qtorch: quantized ``nn.Linear`` layers and whole-model quantization on top of qcore (qtorch -> qcore, never back).

>>> import torch, qtorch
>>> model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
>>> report = qtorch.quantize_model(model, "w8a16", exclude=())   # in place; lm_head is excluded by default
>>> len(report.quantized), type(model[0]).__name__
(2, 'QuantLinear')
"""

from .compat import (calculate_quantization_error, channel_linear_quantize, dequantize, linear_dequantize,
                     linear_quantize, quantize_symmetric, quantize_weight_per_channel)
from .allocate import BitPlan, allocate_bits
from .compile import compile
from . import gguf  # qtorch.gguf: GGUF (llama.cpp) files into QuantLinear models and back
from .gguf import from_gguf
from .linear import QuantizedLinear, QuantLinear, QWQALinearLayer, W4A16Linear, W8A16Linear, W8A16LinearLayer
from .memory import memory_footprint
from .pretrained import from_pretrained, save_folder
from .replace import (IncompatibleLayersError, Quantizer, plan, quantize_model, replace_linear_layers_with_w8a16,
                      replace_linear_with_target_and_quantize, untie)
from .report import LayerReport, QuantizationReport
from .serialization import empty_weights, load_quantized, save_quantized
from .tune import settle_layouts, tune_layouts
from .weight import QuantizedWeight

__version__ = "0.1.0"
