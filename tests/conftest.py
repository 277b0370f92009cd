"""Shared test policy: Triton interpreter switch, GPU marker, tolerances, shapes.

Tolerance policy (one place, used by every test):

* integer codes, zero points and packed bytes: bit-exact (:func:`assert_exact`);
* floats: the error of the result under test against an fp32 reference may be
  at most 2× the error of the same PyTorch computation run in the low
  precision dtype, plus a small floor (:func:`assert_close_2x`);
* whole layers and models: SQNR in dB (:func:`sqnr`).
"""

import os

# The Triton interpreter runs tl.dot through numpy: OpenBLAS threads only add
# contention on small tiles (about 1000x slower on a loaded 2-core machine).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

# Triton kernels run on the CPU only through the interpreter, and the switch
# must be set before any @triton.jit decorator runs: here, before qdpo imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()

# Shapes that find bugs: M of one, odd and just past a power of two.
MS = (1, 3, 17, 129)
# (N, K) pairs, with N/K not multiples of the usual block sizes where the
# format allows (K must be divisible by the group size and even for 4 bits).
ODD_NK = ((1, 64), (7, 96), (33, 128), (67, 320), (130, 256))
# Real layer shapes (N, K) = (out_features, in_features).
LLAMA_SHAPES = {
    "llama2-7b.qkv": (4096, 4096),
    "llama2-7b.o": (4096, 4096),
    "llama2-7b.gate_up": (11008, 4096),
    "llama2-7b.down": (4096, 11008),
    "llama3-8b.q": (4096, 4096),
    "llama3-8b.kv": (1024, 4096),
    "llama3-8b.gate_up": (14336, 4096),
    "llama3-8b.down": (4096, 14336),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUPS = (-1, 32, 64, 128, 256)
# one odd shape per group size with several groups per row (K = G for 256: K equal to one group)
SHAPE_FOR = {-1: (67, 320), 32: (67, 320), 64: (33, 128), 128: (130, 256), 256: (130, 256)}


def randn(n: int, k: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal ``(n, k)`` weights in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).to(dtype)


# A test body shared by the kernel backends takes the ``backend`` fixture: triton
# everywhere (on the CPU through the interpreter), cuda only on a GPU.
KERNEL_BACKENDS = ("triton", pytest.param("cuda", marks=pytest.mark.gpu))


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request) -> str:
    """The backend under test; its cuda variant skips (not fails) where ``qdpo._C`` was not built."""
    if request.param == "cuda":
        pytest.importorskip("qdpo.kernels.cuda", reason="qdpo._C was not built (no nvcc at install time)")
    return request.param


def on(backend: str, *ts):
    """Inputs where ``backend`` runs them: moved to the GPU for cuda, as they are for the others.

    One tensor in, one out; several in, a list out (non-tensors pass through). References
    are computed on the CPU originals, so results are compared after ``.cpu()``.
    """
    moved = [t.to("cuda") if backend == "cuda" and isinstance(t, torch.Tensor) else t for t in ts]
    return moved[0] if len(moved) == 1 else moved


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of uint8 ``t`` one byte past an aligned address (kernels that read words must fall back)."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    out.copy_(t)
    return out


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, what: str = "codes") -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = (actual != expected).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} mismatches, first at {bad[0].tolist()}"
    if actual.is_floating_point():  # bit for bit: a zero carries the reference's sign too
        sign = ((actual == 0) & (torch.signbit(actual) != torch.signbit(expected))).nonzero()
        assert sign.numel() == 0, f"{what}: {sign.shape[0]} zeros of the other sign, first at {sign[0].tolist()}"


def assert_close_2x(actual, ref_fp32, ref_lowp, floor: float = 1e-6, what: str = "output") -> None:
    """``max|actual - ref_fp32| <= 2 · max|ref_lowp - ref_fp32| + floor · max|ref_fp32|``."""
    assert actual.shape == ref_fp32.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref_fp32.shape)}"
    a, r, lp = actual.double(), ref_fp32.double(), ref_lowp.double()
    err = (a - r).abs().max().item() if a.numel() else 0.0
    base = (lp - r).abs().max().item() if a.numel() else 0.0
    scale = r.abs().max().item() if a.numel() else 0.0
    limit = 2 * base + floor * max(scale, 1.0)
    assert err <= limit, f"{what}: max error {err:.3g} > 2 × PyTorch's {base:.3g} + floor"


def fp32_sum_floor(length: int) -> float:
    """``floor`` for :func:`assert_close_2x` on a sum of ``length`` fp32 terms accumulated in another order
    than PyTorch's: 4·√length·2⁻²⁴ of the largest output, at least 1e-6.

    A kernel that accumulates a long reduction tile by tile (Triton's ``tl.dot`` over K or M) rounds
    in another order than cuBLAS; both are fp32-exact to about √length ulps, so at K = 8192 the
    2×-of-PyTorch rule alone would demand cuBLAS's particular rounding, not fp32 accuracy.
    """
    return max(1e-6, 4 * length**0.5 * 2.0**-24)


def sqnr(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    s, n = signal.double(), (signal.double() - approx.double())
    return (10 * torch.log10(s.pow(2).sum() / n.pow(2).sum().clamp_min(1e-300))).item()
