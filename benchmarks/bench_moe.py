"""Benchmarks of a mixture of experts' experts module at decode: qdpo's packed experts against bf16.

Conditions: one Mixtral-8x7B experts module on a GPU (8 experts, hidden 4096, intermediate 14336,
top 2), on the CPU a tiny one (hidden 64, intermediate 128); tokens M ∈ {1, 16, 64} (64: a short
prefill, 16 rows per expert on average), routed at random (fixed seed) in bf16. The timed call is the
module's forward from routed tokens to their summed outputs (routing itself, a small matmul, is
outside), run eagerly: the packed path's per-expert launches sync once with the host to split tokens
by expert, as transformers' own eager experts loop does; its grouped launches (up to 16 tokens, and on
the GPU backends up to 16 rows per expert on average: experts.ROUTED_ROWS_PER_EXPERT) do not. GB/s
counts the weight bytes of the experts the tokens chose (packed codes + scales + zeros, or bf16).

Impls: ``bf16`` (transformers' module with bf16 weights, its default experts implementation),
``packed-<backend>`` (qdpo W4 g128 (g32 on the CPU) packed experts: each chosen expert's rows through
``dequant_matmul``; the tokens above instead run one grouped launch per product,
``dequant_matmul_experts``, without a host sync) for the backends available, ``packed-cuda-per-expert``
(the per-expert launches with their host sync, to compare), and ``dequantize-all`` (the packed codes
dequantized for every expert each call, then the module's own forward: what the packed path avoids).
Each row's ``speedup`` is the bf16 module's time on the same tokens over the row's.
"""

from __future__ import annotations

import copy
import functools

import common
import pytest
import torch

import qdpo
from qdpo.kernels import backends
from qdpo.quant import experts
from qdpo.quant.experts import QuantExpertTensor, quantized_experts

GPU = torch.cuda.is_available()
DEV = common.device()
SIZES = dict(hidden_size=4096, intermediate_size=14336) if GPU else dict(hidden_size=64, intermediate_size=128)
EXPERTS, TOP_K = 8, 2
MS = (1, 16, 64)
GROUP = 128 if GPU else 32
IMPLS = ("bf16", "packed-triton", "packed-cuda", "packed-cuda-per-expert", "packed-reference", "dequantize-all")


@functools.lru_cache(maxsize=1)
def _experts():
    """A bf16 Mixtral experts module (weights ~N(0, 0.02))."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, **SIZES)
    cfg._experts_implementation = "grouped_mm" if GPU else "eager"  # what from_pretrained picks on each
    m = MixtralExperts(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.to(DEV, torch.bfloat16).eval()


def _packed(backend: str):
    m = copy.deepcopy(_experts())
    holder = torch.nn.Module()
    holder.experts = m
    qdpo.quantize_model(holder, qdpo.QuantSpec(4, GROUP), mode="packed", backend=backend, exclude=())
    return m


def _routed(m: int):
    g = torch.Generator(device="cpu").manual_seed(m)
    x = (torch.randn(m, SIZES["hidden_size"], generator=g) * 0.5).to(DEV, torch.bfloat16)
    idx = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(m)]).to(DEV)
    w = torch.softmax(torch.randn(m, TOP_K, generator=g), -1).to(DEV, torch.bfloat16)
    return x, idx, w


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", MS)
def test_moe_experts_decode(benchmark, m, impl):
    backend = impl.removeprefix("packed-").removesuffix("-per-expert") if impl.startswith("packed-") else "auto"
    if impl.startswith("packed-") and backend not in backends.available(DEV):
        pytest.skip(f"the {backend} backend is not available here")
    per_expert = impl.endswith("-per-expert")
    x, idx, w = _routed(m)
    chosen = int(idx.unique().numel())
    h, i = SIZES["hidden_size"], SIZES["intermediate_size"]
    weights = 3 * h * i  # per expert: gate, up, down
    if impl == "bf16":
        mod, nbytes = _experts(), chosen * weights * 2
    else:
        mod = _packed(backend)
        q = next(iter(quantized_experts(mod).values()))
        nbytes = chosen * weights * (q.spec.bits / 8 + 3 / GROUP)  # codes, bf16 scale and uint8 zero per group
        if impl == "dequantize-all":
            qs = list(quantized_experts(mod).values())
            nbytes = EXPERTS * weights * (q.spec.bits / 8 + 3 / GROUP) + EXPERTS * weights * 2

            def every():
                for t in qs:
                    t._w_hat = None
                    t._w_hat = QuantExpertTensor.dequantized(t)
                try:
                    return mod(x, idx, w)
                finally:
                    for t in qs:
                        t._w_hat = None

            fn = every
    if impl != "dequantize-all":
        def fn():
            return mod(x, idx, w)

    experts.ROUTED_DECODE = not per_expert
    try:
        with torch.no_grad():
            fn()
            row = common.bench(benchmark, "moe_experts", f"mixtral M{m}" if GPU else f"tiny M{m}", impl,
                               torch.no_grad()(fn), nbytes=nbytes, M=m, experts_chosen=chosen)
    finally:
        experts.ROUTED_DECODE = True
    row["speedup"] = _bf16_ms(m) / row["median_ms"]


@functools.lru_cache(maxsize=None)
def _bf16_ms(m: int) -> float:
    """The bf16 module's time on the same routed tokens: each row's ``speedup`` is against it."""
    x, idx, w = _routed(m)
    mod = _experts()
    with torch.no_grad():
        return common.time_ms(lambda: mod(x, idx, w))["median_ms"]
