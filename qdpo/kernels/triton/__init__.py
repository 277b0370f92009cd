"""The ``triton`` backend: importing this package registers its implementations.

One module per kernel family; each opens with its contract and registers
itself with ``qdpo.kernels.backends.register("triton", op)``.
"""

import importlib

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

_MODULES = ("quantize", "dequantize", "fake_quant", "dequant_matmul", "fake_quant_matmul")

for _name in _MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:  # a kernel module not written yet
        if e.name != f"{__name__}.{_name}":
            raise
