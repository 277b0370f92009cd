"""Benchmarks of a mixture of experts' experts module at decode: qdpo's packed experts against bf16.

Conditions: one Mixtral-8x7B experts module on a GPU (8 experts, hidden 4096, intermediate 14336,
top 2; tokens M ∈ {1, 16, 64}, 64 a short prefill of 16 rows per expert on average) and one
Qwen3-30B-A3B experts module (128 experts, hidden 2048, intermediate 768, top 8; M ∈ {4, 256}: a
decode step whose 32 rows leave most experts without one, and a prefill of 16 rows per expert on
average), and one Llama 4 Scout experts module (16 experts, hidden 5120, intermediate 8192, top 1; M = 1),
which takes every token once per expert scaled by its router score; on the CPU tiny ones (hidden 64; 8,
16 and 16 experts); tokens routed at random (fixed seed) to distinct experts, in bf16. The timed call is the
module's forward from routed tokens to their summed outputs (routing itself, a small matmul, is
outside), run eagerly: the packed path's per-expert launches sync once with the host to split tokens
by expert, as transformers' own eager experts loop does; its grouped launches (up to 16 tokens, and on
the GPU backends up to 16 rows per expert on average: experts.ROUTED_ROWS_PER_EXPERT) do not. GB/s
counts the weight bytes of the experts the tokens chose (packed codes + scales + zeros, or bf16).

Impls: ``bf16`` (transformers' module with bf16 weights, its default experts implementation),
``packed-<backend>`` (qdpo W4 g128 (g32 on the CPU) packed experts: each chosen expert's rows through
``dequant_matmul``; the tokens above instead run one grouped launch per product,
``dequant_matmul_experts``, without a host sync) for the backends available, ``packed-cuda-per-expert``
(the per-expert launches with their host sync, to compare), ``packed-<backend>-grouped`` (the grouped
launches at any number of rows per expert), and ``dequantize-all`` (the packed codes
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
GROUP = 128 if GPU else 32
# name: (transformers architecture, its module, its experts arguments, sizes on a GPU, sizes on the CPU)
MODELS = {
    "mixtral": ("Mixtral", "mixtral", dict(num_local_experts=8, num_experts_per_tok=2),
                dict(hidden_size=4096, intermediate_size=14336), dict(hidden_size=64, intermediate_size=128)),
    "qwen3-moe": ("Qwen3Moe", "qwen3_moe", dict(num_experts=128, num_experts_per_tok=8),
                  dict(hidden_size=2048, moe_intermediate_size=768),
                  dict(hidden_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4)),
    # every token laid out once per expert, scaled by its router score (zero for the experts it did not choose)
    "llama4-scout": ("Llama4Text", "llama4", dict(num_local_experts=16, num_experts_per_tok=1),
                     dict(hidden_size=5120, intermediate_size=8192), dict(hidden_size=64, intermediate_size=32)),
}
SORTED = {"llama4-scout"}
IMPLS = ("bf16", "packed-triton", "packed-cuda", "packed-cuda-per-expert", "packed-reference", "dequantize-all")
# -grouped: the grouped launches whatever the rows per expert (experts.ROUTED_ROWS_PER_EXPERT lifted), to find
# where they stop beating the per-expert launches (1024 tokens of Qwen3-MoE: 64 rows per expert on average, the
# triton chunks 64 rows wide; on a GPU only: minutes under the Triton interpreter)
CASES = ([("mixtral", m, impl) for m in (1, 16, 64) for impl in IMPLS]
         + [("qwen3-moe", m, impl) for m in (4, 256) for impl in IMPLS[:4]]
         + [("llama4-scout", m, impl) for m in (1,) for impl in IMPLS[:4]]
         # last: the per-expert triton row tunes its GEMM for several row counts first
         + [("qwen3-moe", 1024, impl) for impl in ("bf16", "packed-cuda", "packed-cuda-grouped",
                                                   "packed-triton-grouped", "packed-triton") if GPU])


@functools.lru_cache(maxsize=None)
def _config(model: str):
    import transformers

    arch, _, moe, gpu_sizes, cpu_sizes = MODELS[model]
    cfg = getattr(transformers, f"{arch}Config")(**{**moe, **(gpu_sizes if GPU else cpu_sizes)})
    cfg._experts_implementation = "grouped_mm" if GPU else "eager"  # what from_pretrained picks on each
    return cfg


def _shape(model: str) -> tuple[int, int, int, int]:
    """(experts, top k, hidden, intermediate) of the model's experts module."""
    cfg = _config(model)
    experts_n = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    return experts_n, cfg.num_experts_per_tok, cfg.hidden_size, inter


@functools.lru_cache(maxsize=1)
def _experts(model: str):
    """A bf16 experts module of the model (weights ~N(0, 0.02))."""
    import importlib

    arch, module = MODELS[model][:2]
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    m = getattr(mod, f"{arch}Experts")(_config(model))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.to(DEV, torch.bfloat16).eval()


def _packed(model: str, backend: str):
    m = copy.deepcopy(_experts(model))
    holder = torch.nn.Module()
    holder.experts = m
    qdpo.quantize_model(holder, qdpo.QuantSpec(4, GROUP), mode="packed", backend=backend, exclude=())
    return m


def _routed(model: str, m: int):
    n_experts, top_k, hidden, _ = _shape(model)
    g = torch.Generator(device="cpu").manual_seed(m)
    x = (torch.randn(m, hidden, generator=g) * 0.5).to(DEV, torch.bfloat16)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(m)]).to(DEV)
    w = torch.softmax(torch.randn(m, top_k, generator=g), -1).to(DEV, torch.bfloat16)
    return x, idx, w


def _call(model: str, mod, m: int):
    """The experts module's call on the routed tokens: (tokens, ids, weights), or for a sorted layout (Llama 4)
    the tokens repeated once per expert and scaled by their router scores (zero where not chosen)."""
    x, idx, w = _routed(model, m)
    if model not in SORTED:
        return lambda: mod(x, idx, w)
    scores = torch.zeros(m, _shape(model)[0], dtype=x.dtype, device=DEV).scatter(1, idx, w)
    routed_in = x.repeat(scores.shape[1], 1) * scores.t().reshape(-1, 1)
    return lambda: mod(routed_in)


@pytest.mark.parametrize("model,m,impl", CASES)
def test_moe_experts_decode(benchmark, model, m, impl):
    backend = (impl.removeprefix("packed-").removesuffix("-per-expert").removesuffix("-grouped")
               if impl.startswith("packed-") else "auto")
    if impl.startswith("packed-") and backend not in backends.available(DEV):
        pytest.skip(f"the {backend} backend is not available here")
    per_expert = impl.endswith("-per-expert")
    _, idx, _ = _routed(model, m)
    chosen = int(idx.unique().numel())
    n_experts, _, h, i = _shape(model)
    weights = 3 * h * i  # per expert: gate, up, down
    if impl == "bf16":
        mod, nbytes = _experts(model), chosen * weights * 2
    else:
        mod = _packed(model, backend)
        q = next(iter(quantized_experts(mod).values()))
        nbytes = chosen * weights * (q.spec.bits / 8 + 3 / GROUP)  # codes, bf16 scale and uint8 zero per group
        if impl == "dequantize-all":
            qs = list(quantized_experts(mod).values())
            nbytes = n_experts * weights * (q.spec.bits / 8 + 3 / GROUP) + n_experts * weights * 2

            def every():
                for t in qs:
                    t._w_hat = None
                    t._w_hat = QuantExpertTensor.dequantized(t)
                try:
                    return call()
                finally:
                    for t in qs:
                        t._w_hat = None

    call = _call(model, mod, m)
    fn = every if impl == "dequantize-all" else call

    experts.ROUTED_DECODE = not per_expert
    rows_per_expert = experts.ROUTED_ROWS_PER_EXPERT
    if impl.endswith("-grouped"):
        experts.ROUTED_ROWS_PER_EXPERT = 1 << 30
    try:
        with torch.no_grad():
            fn()
            row = common.bench(benchmark, "moe_experts", f"{model} M{m}" if GPU else f"tiny {model} M{m}", impl,
                               torch.no_grad()(fn), nbytes=nbytes, M=m, experts_chosen=chosen)
    finally:
        experts.ROUTED_DECODE, experts.ROUTED_ROWS_PER_EXPERT = True, rows_per_expert
    row["speedup"] = _bf16_ms(model, m) / row["median_ms"]


@functools.lru_cache(maxsize=None)
def _bf16_ms(model: str, m: int) -> float:
    """The bf16 module's time on the same routed tokens: each row's ``speedup`` is against it."""
    call = _call(model, _experts(model), m)
    with torch.no_grad():
        return common.time_ms(call)["median_ms"]
