"""qdpo: quantization-aware direct preference optimization for weight-quantized chat LLMs.

The public API (stable names other projects use)::

    from qdpo import QuantSpec, quantize, dequantize, dequant_matmul, fake_quant, fake_quant_matmul
    from qdpo import QuantLinear, quantize_model, save_quantized, load_quantized

and the ops ``torch.ops.qdpo.*`` registered by ``qdpo.kernels.ops``.
"""

__version__ = "0.1.0"

from qdpo.quant import (  # noqa: E402
    QuantizedWeight,
    QuantLinear,
    QuantSpec,
    dequant_matmul,
    dequantize,
    fake_quant,
    fake_quant_matmul,
    load_quantized,
    quantize,
    quantize_model,
    save_quantized,
)

__all__ = [
    "QuantSpec",
    "QuantizedWeight",
    "quantize",
    "dequantize",
    "dequant_matmul",
    "fake_quant",
    "fake_quant_matmul",
    "QuantLinear",
    "quantize_model",
    "save_quantized",
    "load_quantized",
]
