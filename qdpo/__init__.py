"""qdpo: quantization-aware direct preference optimization for weight-quantized chat LLMs."""

__version__ = "0.1.0"

from qdpo.quant import (  # noqa: E402
    QuantizedWeight,
    QuantSpec,
    dequant_matmul,
    dequantize,
    fake_quant,
    fake_quant_matmul,
    quantize,
)

__all__ = [
    "QuantSpec",
    "QuantizedWeight",
    "quantize",
    "dequantize",
    "dequant_matmul",
    "fake_quant",
    "fake_quant_matmul",
]
