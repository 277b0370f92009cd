"""The ``cuda`` backend: hand-written CUDA kernels from ``csrc/`` in the extension ``qdpo._C``.

Importing this module fails with ImportError when the extension was not
built (no ``nvcc`` at install time, or ``QDPO_SKIP_CUDA_BUILD=1``); the
backend registry then reports the backend unavailable and the other
backends serve every op. Kernels register themselves here with
``backends.register("cuda", op)`` as they are added; an op without a CUDA
kernel is served by the next backend under ``backend="auto"``.
"""

from qdpo import _C  # noqa: F401  (ImportError: extension not built)

RUNTIME_VERSION = _C.runtime_version()
