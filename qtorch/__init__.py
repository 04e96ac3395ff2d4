from .memory import memory_footprint
from .replace import (IncompatibleLayersError, Quantizer, plan, quantize_model, replace_linear_layers_with_w8a16,
                      replace_linear_with_target_and_quantize)
from .report import LayerReport, QuantizationReport
from .linear import QuantizedLinear, QuantLinear, W4A16Linear, W8A16Linear, W8A16LinearLayer
from .serialization import empty_weights, load_quantized, save_quantized
from .compile import compile
