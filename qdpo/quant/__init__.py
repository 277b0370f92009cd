"""Quantization: spec, packed format, functional API, QuantLinear and model conversion."""

from qdpo.quant.spec import QuantSpec
from qdpo.quant.format import QuantizedWeight
from qdpo.quant.functional import dequant_matmul, dequantize, fake_quant, fake_quant_matmul, quantize

__all__ = ["QuantSpec", "QuantizedWeight", "quantize", "dequantize", "dequant_matmul", "fake_quant", "fake_quant_matmul"]
