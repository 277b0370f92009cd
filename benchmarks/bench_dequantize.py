"""Benchmarks of ``qdpo::dequantize`` (packed codes → bf16 ŵ).

Conditions: weights quantized from bf16 (bf16 scales) in W4 g128 asymmetric
and W8 per-channel symmetric, dequantized to bf16; on a GPU every weight of
``common.SHAPES``, on the CPU one tiny shape under the Triton interpreter (not
a speed reference). GB/s counts packed codes + scales + zeros read and ŵ
written. Timing as in ``bench_quantize.py`` (CUDA graphs, cold L2).

Impls: ``triton`` (the backend function), ``triton-4w`` and ``triton-8k`` (its tile with 4 warps, and
8192-element tiles: ``bench_quantize.variant_tile``), ``cuda`` (16-code chunks where the rows allow
them), ``cuda-v8`` (8-code chunks, as before them), ``reference``, ``compile(reference)`` (GPU only).
Target on an H100: ``triton`` close to copy bandwidth.
"""

from __future__ import annotations

import functools

import common
import pytest
import torch
from bench_quantize import FORMATS, TILE_VARIANTS, cold_cycle, variant_tile

from qdpo.kernels import reference as ref
from qdpo.kernels.triton import dequantize as td

GPU = torch.cuda.is_available()
DEV = common.device()
SHAPES = common.SHAPES if GPU else {"tiny": (64, 256)}
IMPLS = ("triton", *TILE_VARIANTS, "cuda", "cuda-v8", "reference", "compile(reference)")


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(ref.dequantize, dynamic=False)


def _fn(impl: str, packed, bits: int):
    if impl == "triton":
        return lambda: td.dequantize(*packed, bits, torch.bfloat16)
    if impl in TILE_VARIANTS:
        q, s, z = packed
        cfg = variant_tile(impl, q.shape[0], q.shape[1] * 8 // bits, s.shape[1], q.device)
        return lambda: td.launch(q, s, z, bits, torch.bfloat16, cfg)
    if impl in ("cuda", "cuda-v8"):
        cuda = common.cuda_backend()
        vec = 8 if impl == "cuda-v8" else 16
        return lambda: cuda.dequantize(*packed, bits, torch.bfloat16, max_vec=vec)
    if impl == "reference":
        return lambda: ref.dequantize(*packed, bits, torch.bfloat16)
    f = _compiled_reference()
    return lambda: f(*packed, bits, torch.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize(benchmark, shape, fmt, impl):
    if impl == "compile(reference)" and not GPU:
        pytest.skip("torch.compile baseline only on a GPU")
    n, k = SHAPES[shape]
    bits, gs, sym = FORMATS[fmt]
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    packed = ref.quantize(w, bits, gs, sym)  # (qweight, scales, zeros)
    del w
    nbytes = sum(t.numel() * t.element_size() for t in packed) + n * k * 2

    def make():
        return _fn(impl, tuple(t.clone() for t in packed), bits)

    fn, eager = cold_cycle(make, nbytes)
    name = f"{impl}-eager" if eager and GPU else impl
    common.bench(benchmark, "dequantize", f"{shape} {fmt}", name, fn, nbytes=nbytes, fmt=fmt, N=n, K=k)
