"""Benchmarks of ``qdpo::fake_quant_matmul`` forward + backward: one QAT step of one linear layer.

Conditions: on a GPU, M = 4096 rows of bf16 activations against every distinct
Llama layer shape of ``tests/conftest.LLAMA_SHAPES``; fp32 latent weights (the
master copy QAT trains) on a W4 g128 asymmetric grid, no bias; on the CPU one
tiny shape under the Triton interpreter (not a speed reference). One timed call
is the forward and the backward (``dx``, ``dw``; ``dscales`` too for
``triton+lsq``) given ``dy``, eager (milliseconds of work: launch overhead is
negligible at this M).

Impls:

* ``bf16-linear``: ``F.linear`` with a bf16 weight, autograd (the baseline:
  target ``triton`` <= 1.3× its time at M = 4096 on an H100);
* ``triton`` / ``triton+lsq``: ``qdpo.fake_quant_matmul(backend="triton")`` through
  autograd, default dispatch (``WORKSPACE_MIN_M``);
* ``cuda``: the same through the ``cuda`` backend (``csrc/fake_quant.cu`` + cuBLAS);
* ``triton-fused`` / ``triton-workspace``: the backend functions with the path
  forced, to place ``WORKSPACE_MIN_M``;
* ``fake_quant+linear``: ``qdpo::fake_quant`` (reference backend) then ``F.linear``,
  autograd: what the fused op replaces (peak-memory target: ``triton`` below it);
* ``reference``: ``qdpo.fake_quant_matmul(backend="reference")``;
* ``compile(reference)``: ``torch.compile`` of ``F.linear(x, fake_quant_autograd(w))``.

Extra fields: ``peak_MiB`` (``torch.cuda.max_memory_allocated`` above the
inputs during one call; absent on the CPU), ``speedup`` (``bf16-linear`` time /
this row's), ``vs_bf16_linear`` (its inverse: the 1.3× target).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import common
import pytest
import torch
import torch.nn.functional as F

import qdpo
from qdpo import QuantSpec
from qdpo.kernels import reference as ref
from qdpo.kernels.triton import fake_quant_matmul as fqm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import LLAMA_SHAPES  # noqa: E402

GPU = torch.cuda.is_available()
DEV = common.device()
M = 4096 if GPU else 32
SPEC = QuantSpec(4, 128, False)
# distinct (N, K) only: q, o and qkv of Llama-2-7B are all 4096 × 4096
SHAPES = {nk: name for name, nk in reversed(LLAMA_SHAPES.items())} if GPU else {(64, 256): "tiny"}
IMPLS = ("bf16-linear", "triton", "cuda", "triton+lsq", "triton-fused", "triton-workspace",
         "fake_quant+linear", "reference", "compile(reference)")
_BASE_MS: dict[tuple[int, int], float] = {}  # (N, K) → median ms of bf16-linear


@functools.lru_cache(maxsize=1)  # one shape's tensors alive at a time
def _problem(n: int, k: int):
    g = torch.Generator(device=DEV).manual_seed(0)
    w = torch.randn(n, k, device=DEV, generator=g) * 0.02  # fp32 latent weight
    s, z = ref.qparams(w, SPEC.bits, SPEC.group_size, SPEC.symmetric)
    x = torch.randn(M, k, device=DEV, generator=g).to(torch.bfloat16)
    dy = torch.randn(M, n, device=DEV, generator=g).to(torch.bfloat16)
    return w, s, z, x, dy


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    def f(x, w, s, z):
        return F.linear(x, ref.fake_quant_autograd(w, s, z, SPEC.bits).to(x.dtype))

    return torch.compile(f)


def _autograd(forward, x, w, dy, s=None):
    """fwd + bwd through autograd; ``torch.autograd.grad`` so no ``.grad`` accumulates between calls."""
    leaves = [x.requires_grad_(), w.requires_grad_()] + ([s.requires_grad_()] if s is not None else [])
    return lambda: torch.autograd.grad(forward(), leaves, dy)


def _fn(impl: str, w, s, z, x, dy):
    """The callable timed for ``impl``, or ``pytest.skip``."""
    x, w, s = x.detach().clone(), w.detach().clone(), s.detach().clone()
    if impl == "bf16-linear":
        wb = w.to(torch.bfloat16)
        return _autograd(lambda: F.linear(x, wb), x, wb, dy)
    if impl == "cuda":
        common.cuda_backend()
        return _autograd(lambda: qdpo.fake_quant_matmul(x, w, SPEC, s, z, backend="cuda"), x, w, dy)
    if impl in ("triton", "triton+lsq"):
        lsq = s if impl == "triton+lsq" else None
        return _autograd(lambda: qdpo.fake_quant_matmul(x, w, SPEC, s, z, backend="triton"), x, w, dy, lsq)
    if impl in ("triton-fused", "triton-workspace"):
        path = impl.split("-")[1]

        def step():
            fqm.fake_quant_matmul(x, w, s, z, SPEC.bits, None, path=path)
            return fqm.fake_quant_matmul_backward(dy, x, w, s, z, SPEC.bits, False, path=path)
        return step
    if impl == "fake_quant+linear":
        return _autograd(lambda: F.linear(x, torch.ops.qdpo.fake_quant(w, s, z, SPEC.bits, x.dtype, "reference")),
                         x, w, dy)
    if impl == "reference":
        return _autograd(lambda: qdpo.fake_quant_matmul(x, w, SPEC, s, z, backend="reference"), x, w, dy)
    if not GPU:
        pytest.skip("torch.compile baseline only on a GPU")
    f = _compiled_reference()
    return _autograd(lambda: f(x, w, s, z), x, w, dy)


def _peak_mib(fn) -> float | None:
    """Peak memory above what is allocated before one call, in MiB (GPU only)."""
    if not GPU:
        return None
    fn()  # compile / autotune first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _bytes(m: int, n: int, k: int, w_bytes: int) -> int:
    """Minimum traffic of fwd + bwd: x, dy twice, y, dx once (bf16); w read twice, dw written."""
    return 2 * (2 * m * k + 2 * m * n + m * n + m * k) + 3 * n * k * w_bytes


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nk", list(SHAPES), ids=lambda nk: SHAPES[nk])
def test_fake_quant_matmul_fwd_bwd(benchmark, nk, impl):
    n, k = nk
    fn = _fn(impl, *_problem(n, k))
    peak = _peak_mib(fn)
    w_bytes = 2 if impl == "bf16-linear" else 4
    row = common.bench(benchmark, "fake_quant_matmul_fwd_bwd", f"{SHAPES[nk]} M={M}", impl, fn,
                       nbytes=_bytes(M, n, k, w_bytes), flops=6 * M * n * k, M=M, N=n, K=k,
                       **({"peak_MiB": peak} if peak is not None else {}))
    if impl == "bf16-linear":
        _BASE_MS[nk] = row["median_ms"]
    if nk in _BASE_MS:
        row["speedup"] = _BASE_MS[nk] / row["median_ms"]
        row["vs_bf16_linear"] = row["median_ms"] / _BASE_MS[nk]
