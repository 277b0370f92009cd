"""qdpo kernels: reference math, Triton and CUDA backends, and the ``torch.ops.qdpo`` ops."""

from qdpo.kernels import ops  # noqa: F401  (registers torch.ops.qdpo.*)
