"""Benchmarks of ``qdpo::dequant_matmul`` (W4A16 g128, W8A16 per-channel) and its x-gradient.

Conditions: bf16 activations and bf16-derived scales; on a GPU every weight of
``common.SHAPES`` (8192², 16384², Llama layers) at M ∈ {1, 16, 512, 4096} rows;
on the CPU one tiny shape (the Triton interpreter is not a speed reference).
Each row records ``speedup`` = time of bf16 ``torch.matmul`` (cuBLAS) on the
same (M, N, K) / time of the row, and GB/s over the bytes the op must move
(packed weight + scales + zeros + x + y; bf16 weight for torch.matmul).

On a GPU the calls run back to back from one CUDA graph (``common.graph_batch``,
times per call): the times are the kernels' (decode-sized work takes ~10 µs, less
than Python's launch overhead and the event round trip), as in a CUDA-graphed
decode loop. Rows whose impl ends in ``-eager`` (and peers that cannot be
captured) include the Python launch overhead. Successive calls cycle through copies of the weight
that together exceed twice the L2 cache, so every call reads its weight from
HBM (cold L2), as in a real model where each layer has its own weight.

Impls: ``triton`` (the kernel wrapper, default path), ``cuda`` (the ``cuda``
backend: ``csrc/`` GEMV for M <= 16, dequantize + cuBLAS above; ``cuda-eager``
with launch overhead), ``triton-eager`` and
``qdpo-op-eager`` (``torch.ops.qdpo.dequant_matmul``: plus custom-op
dispatch), ``triton-gemm`` / ``triton-workspace`` (paths forced, to place
``WORKSPACE_MIN_M``), ``cuda-gemm`` (the ``cuda`` backend's hand-written
tensor-core GEMM, forced at M > 16), ``reference`` and ``compile(reference)``, and peers when
importable: torchao int4 weight-only, bitsandbytes NF4 (W4 rows only).

H100 targets: W4 M=1 >= 2.5× and >= 70 % of copy bandwidth; W4 M=16 >= 2.0×;
W8 M=1 >= 1.7×; M=4096 >= 0.85× (``benchmarks/gpu_check.py`` checks them).
"""

from __future__ import annotations

import functools
import math

import common
import pytest
import torch
import torch.nn.functional as F

from qdpo.kernels import reference as ref
from qdpo.kernels.triton import dequant_matmul as dm

GPU = torch.cuda.is_available()
DEV = common.device()
SHAPES = common.SHAPES if GPU else {"tiny": (128, 256)}
MS = (1, 16, 512, 4096) if GPU else (1, 16)
FORMATS = {"W4g128": (4, 128), "W8": (8, -1)}  # name → (bits, group_size)
IMPLS = ("torch.matmul-bf16", "triton", "cuda", "triton-eager", "cuda-eager", "qdpo-op-eager", "triton-gemm",
         "triton-workspace", "cuda-gemm", "reference", "compile(reference)", "torchao-int4", "bnb-nf4")
CASES = [(s, f, m) for s in SHAPES for f in FORMATS for m in MS]


@functools.lru_cache(maxsize=2)  # two weights alive at most: 16384² bf16 is 512 MiB
def _weight(n: int, k: int, bits: int, gs: int):
    """bf16 weight ``(N, K)`` and its packed quantization (reference quantizer)."""
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    q, s, z = ref.quantize(w, bits, gs, symmetric=False)
    return w, (q, s, z, bits)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(ref.dequant_matmul, dynamic=True)


def _packed_bytes(packed) -> int:
    return sum(t.numel() * t.element_size() for t in packed[:3])


def _copies(w: torch.Tensor, packed) -> list:
    """``[(w, packed), ...]``: enough copies that cycling through them overflows 2× the L2 cache."""
    if not GPU:
        return [(w, packed)]
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    n = math.ceil(2 * l2 / _packed_bytes(packed))
    return [(w, packed)] + [(w.clone(), (*(t.clone() for t in packed[:3]), packed[3])) for _ in range(n - 1)]


def _bytes(m: int, n: int, k: int, packed) -> int:
    return _packed_bytes(packed) + 2 * (m * k + m * n)


_BASE_MS: dict[tuple[int, int, int], float] = {}  # (M, N, K) → median ms of bf16 torch.matmul


def _matmul_ms(m: int, n: int, k: int) -> float:
    """Median ms of bf16 ``x @ wᵀ`` (cuBLAS), the speed-up baseline (measured once per shape)."""
    if (m, n, k) not in _BASE_MS:
        w, packed = _weight(n, k, *FORMATS["W4g128"])
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        fn, _ = common.cycled([_fn("torch.matmul-bf16", x, wc, pc) for wc, pc in _copies(w, packed)], False)
        _BASE_MS[(m, n, k)] = common.time_ms(fn)["median_ms"]
    return _BASE_MS[(m, n, k)]

def _peer(impl: str, w: torch.Tensor):
    """A peer's W4 linear layer built from ``w``, or ``pytest.skip`` with the reason."""
    if not GPU:
        pytest.skip(f"{impl} needs a CUDA GPU")
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16, device=DEV)
    lin.weight.data.copy_(w)
    try:
        if impl == "torchao-int4":
            from torchao.quantization import quantize_
            try:
                from torchao.quantization import Int4WeightOnlyConfig as cfg
            except ImportError:
                from torchao.quantization import int4_weight_only as cfg
            quantize_(lin, cfg(group_size=128))
            return lin
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                              compute_dtype=torch.bfloat16, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
        return q.to(DEV)
    except Exception as e:  # not installed, or an API this version lacks
        pytest.skip(f"{impl} unavailable: {type(e).__name__}: {e}")


def _fn(impl: str, x: torch.Tensor, w: torch.Tensor, packed):
    """The callable timed for ``impl``, or ``pytest.skip``."""
    m = x.shape[0]
    if impl == "torch.matmul-bf16":
        return lambda: F.linear(x, w)
    if impl in ("triton", "triton-eager"):
        return lambda: dm.forward(x, *packed)
    if impl in ("cuda", "cuda-eager"):
        cuda = common.cuda_backend()
        return lambda: cuda.dequant_matmul(x, *packed)
    if impl == "cuda-gemm":  # the hand-written tensor-core GEMM, forced (prefill sizes)
        cuda = common.cuda_backend()
        if m <= dm.GEMV_MAX_M:
            pytest.skip("the GEMM path is timed at prefill sizes")
        return lambda: cuda.dequant_matmul(x, *packed, path="gemm")
    if impl == "qdpo-op-eager":
        return lambda: torch.ops.qdpo.dequant_matmul(x, *packed, None, "triton")
    if impl in ("triton-gemm", "triton-workspace"):
        path = impl.split("-")[1]
        if m <= dm.GEMV_MAX_M or dm.choose_path(m) == path:
            pytest.skip(f"{path} is {'the default' if m > dm.GEMV_MAX_M else 'not meant'} for M={m}")
        return lambda: dm.forward(x, *packed, path=path)
    if impl == "reference":
        return lambda: ref.dequant_matmul(x, *packed)
    if impl == "compile(reference)":
        if not GPU:
            pytest.skip("torch.compile baseline only on a GPU")
        f = _compiled_reference()
        return lambda: f(x, *packed)
    if packed[3] != 4:
        pytest.skip(f"{impl} is a 4-bit peer")
    lin = _peer(impl, w)
    return lambda: lin(x)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-M{c[2]}")
def test_dequant_matmul(benchmark, case, impl):
    shape, fmt, m = case
    n, k = SHAPES[shape]
    w, packed = _weight(n, k, *FORMATS[fmt])
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    if impl.endswith("-eager") and (m > dm.GEMV_MAX_M or not GPU):
        pytest.skip("launch overhead is measured for decode-sized M on a GPU")
    fn, eager = common.cycled([_fn(impl, x, wc, pc) for wc, pc in _copies(w, packed)], impl.endswith("-eager"))
    impl = impl if impl.endswith("-eager") or not eager else f"{impl}-eager"
    nbytes = 2 * (n * k + m * k + m * n) if impl == "torch.matmul-bf16" else _bytes(m, n, k, packed)
    row = common.bench(benchmark, "dequant_matmul", f"{shape} {fmt} M={m}", impl, fn,
                       nbytes=nbytes, flops=2 * m * n * k, fmt=fmt, M=m, N=n, K=k)
    if impl == "torch.matmul-bf16":
        _BASE_MS.setdefault((m, n, k), row["median_ms"])
    row["speedup"] = _matmul_ms(m, n, k) / row["median_ms"]


DX_FNS = {
    "torch.matmul-bf16": lambda dy, w, packed: lambda: dy @ w,
    "triton": lambda dy, w, packed: lambda: dm.backward_dx(dy, *packed),
    "triton-fused": lambda dy, w, packed: lambda: dm.backward_dx(dy, *packed, path="fused"),
    "cuda": lambda dy, w, packed: functools.partial(common.cuda_backend().dequant_matmul_dx, dy, *packed),
}


@pytest.mark.parametrize("impl", DX_FNS)
@pytest.mark.parametrize("case", [c for c in CASES if c[1] == "W4g128" and c[2] in (16, MS[-1])],
                         ids=lambda c: f"{c[0]}-{c[1]}-M{c[2]}")
def test_dequant_matmul_dx(benchmark, case, impl):
    """``dx = dy @ ŵ`` (training backward); baseline bf16 ``dy @ w``."""
    shape, fmt, m = case
    n, k = SHAPES[shape]
    w, packed = _weight(n, k, *FORMATS[fmt])
    dy = torch.randn(m, n, device=DEV, dtype=torch.bfloat16)
    copies = _copies(w, packed)
    fn, _ = common.cycled([DX_FNS[impl](dy, wc, pc) for wc, pc in copies], False)
    row = common.bench(benchmark, "dequant_matmul_dx", f"{shape} {fmt} M={m}", impl, fn,
                       nbytes=_bytes(m, k, n, packed), flops=2 * m * n * k, fmt=fmt, M=m, N=n, K=k)
    base, _ = common.cycled([DX_FNS["torch.matmul-bf16"](dy, wc, pc) for wc, pc in copies], False)
    row["speedup"] = common.time_ms(base)["median_ms"] / row["median_ms"]
