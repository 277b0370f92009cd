"""Quantization: spec, packed format, functional API, QuantLinear and model conversion."""

from qdpo.quant.spec import QuantSpec
from qdpo.quant.format import QuantizedWeight
from qdpo.quant.functional import dequant_matmul, dequantize, fake_quant, fake_quant_matmul, quantize
from qdpo.quant.linear import QuantLinear
from qdpo.quant.model import quantizable_layers, quantize_model, quantized_layers, to_packed, weight_coverage
from qdpo.quant.experts import QuantExpertTensor, quantized_experts
from qdpo.quant.io import load_quantized, save_quantized
from qdpo.quant.awq import awq_quantize_model

__all__ = [
    "QuantSpec", "QuantizedWeight", "quantize", "dequantize", "dequant_matmul", "fake_quant",
    "fake_quant_matmul", "QuantLinear", "quantize_model", "quantizable_layers", "quantized_layers",
    "to_packed", "save_quantized", "load_quantized", "weight_coverage", "QuantExpertTensor", "quantized_experts",
]
