"""Quantized experts of a mixture of experts: transformers' fused 3-D expert tensors.

``transformers`` keeps the experts of its own MoE models (Mixtral, Qwen2/3-MoE,
DeepSeek, OLMoE, gpt-oss, ...) as fused parameters of one experts module, not as
``nn.Linear`` layers: ``gate_up_proj`` ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)``,
each ``(experts, out_features, in_features)``, or ``(experts, in, out)`` where the
module says ``is_transposed`` (the attributes ``use_experts_implementation`` sets), and
Llama 4's experts module, ``(experts, in, out)`` without those attributes (:data:`KNOWN_LAYOUTS`).

``qdpo.quantize_model`` gives each such tensor a :class:`QuantExpertTensor` (:func:`install`): expert
``e``'s ``(out, in)`` matrix is quantized exactly as a :class:`~qdpo.quant.linear.QuantLinear`
weight of that shape (rows ``e·out .. (e+1)·out`` of one ``(E·out, in)`` weight in qdpo's
canonical format), in ``train`` mode (latent weights, fake-quant with straight-through
gradients, optional LSQ scales) or ``packed`` mode (codes).
The experts module keeps its own forward, routing included: its class becomes a subclass in
which reading ``gate_up_proj`` returns ŵ, computed once per forward. When every expert tensor of
the module is packed, the forward instead runs each chosen expert's rows of the packed weights
through ``torch.ops.qdpo.dequant_matmul`` (:func:`_packed_forward`, and :func:`_packed_sorted_forward`
for Llama 4's tokens laid out expert by expert; one launch per expert and product). A decode step's
few tokens (and, on the GPU kernels, a prefill of few rows per expert) take one grouped launch per
product instead, the expert ids read on the device (``torch.ops.qdpo.dequant_matmul_experts`` and
``dequant_matmul_segments``, :func:`_grouped_products`): no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdpo.kernels import backends, ops
from qdpo.kernels.reference import expert_segments
from qdpo.quant.linear import MODES, QuantModes, autocast_dtype, autocast_input
from qdpo.quant.spec import QuantSpec

EXPERT_TENSORS = ("gate_up_proj", "up_proj", "down_proj")  # transformers' names for fused expert weights
PREFIX = "qdpo_"  # the QuantExpertTensor of tensor `name` is the experts module's submodule PREFIX + name


class QuantExpertTensor(QuantModes, nn.Module):
    """One fused expert tensor, quantized: ``weight`` (train) or ``qweight`` (packed) of shape
    ``(E·out, in[·bits/8])`` with ``scales``/``zeros`` ``(E·out, in/G)``; :meth:`value` is ŵ in the
    experts module's own layout."""

    def __init__(self, experts: int, out_features: int, in_features: int, spec: QuantSpec,
                 transposed: bool = False, mode: str = "train", dtype: torch.dtype = torch.float32, device=None,
                 learn_scales: bool = False, backend: str = "auto") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not known; use one of {MODES}")
        spec.check_shape(experts * out_features, in_features, "QuantExpertTensor")
        self.experts, self.out_features, self.in_features = experts, out_features, in_features
        self.spec, self.transposed, self.mode, self.backend = spec, transposed, mode, backend
        self._allocate(experts * out_features, in_features, spec, mode, dtype, device, learn_scales)

    _w_hat: Tensor | None = None  # set by frozen_weights(): a cached ŵ for inference

    @classmethod
    def from_tensor(cls, w: Tensor, spec: QuantSpec, transposed: bool = False, mode: str = "train",
                    learn_scales: bool = False, backend: str = "auto") -> "QuantExpertTensor":
        """Quantize a fused ``(E, out, in)`` tensor (``(E, in, out)`` when ``transposed``) round to nearest."""
        w = w.detach()
        if w.dim() != 3:
            raise ValueError(f"a fused expert tensor is 3-D (experts, out, in); got shape {tuple(w.shape)}")
        w2 = (w.transpose(1, 2) if transposed else w).reshape(-1, w.shape[1 if transposed else 2]).contiguous()
        e, o = w.shape[0], w2.shape[0] // w.shape[0]
        q = cls(e, o, w2.shape[1], spec, transposed, mode, w.dtype, w.device, learn_scales, backend)
        q._fill(w2, *ops.qparams(w2, spec.bits, spec.group_size, spec.symmetric, backend))
        return q

    def _layout(self, w2: Tensor) -> Tensor:
        w = w2.view(self.experts, self.out_features, self.in_features)
        return w.transpose(1, 2) if self.transposed else w

    def value(self, dtype: torch.dtype | None = None) -> Tensor:
        """ŵ in the experts module's layout: fake-quantized latent weights with straight-through gradients
        (train), or the dequantized codes (packed)."""
        if self._w_hat is not None:
            return self._w_hat if dtype is None else self._w_hat.to(dtype)
        dtype = dtype or self.scales.dtype
        if self.mode == "train":
            return self._layout(ops.fake_quant(self.weight, self.scales, self.zeros, self.spec.bits, dtype,
                                               self.backend))
        return self._layout(ops.dequantize(self.qweight, self.scales, self.zeros, self.spec.bits, dtype, self.backend))

    def matmul_routed(self, x: Tensor, experts: Tensor, bias: Tensor | None = None, max_rows: int = 0) -> Tensor:
        """``x[p] @ ŵ_eᵀ (+ bias[e])``, ``e = experts[p]``, for the P rows of x ``(P, in)`` of a packed
        tensor (``torch.ops.qdpo.dequant_matmul_experts``: one launch, the ids stay on the device); bias
        ``(experts, out)``; an id outside ``[0, experts)`` gives a row of zeros; ``max_rows``: the rows
        one expert is expected to take, which sizes the kernels' tiles (0: up to all; more still come out
        right)."""
        return ops.dequant_matmul_experts(x, experts, self.qweight, self.scales, self.zeros, self.spec.bits,
                                          self.experts, bias, max_rows, backend=self.backend)

    def matmul_segments(self, x: Tensor, offsets: Tensor, bias: Tensor | None = None, max_rows: int = 0) -> Tensor:
        """:meth:`matmul_routed` on rows sorted by expert, expert e's at ``offsets[e] .. offsets[e + 1]``
        (``torch.ops.qdpo.dequant_matmul_segments``; ``qdpo.kernels.reference.expert_segments`` sorts)."""
        return ops.dequant_matmul_segments(x, offsets, self.qweight, self.scales, self.zeros, self.spec.bits,
                                           self.experts, bias, max_rows, backend=self.backend)

    def matmul(self, x: Tensor, expert: int, bias: Tensor | None = None) -> Tensor:
        """``x @ ŵ_eᵀ (+ bias)`` for expert ``e`` of a packed tensor, on its rows of the packed weight
        (``torch.ops.qdpo.dequant_matmul``: only that expert's codes are read)."""
        rows = slice(expert * self.out_features, (expert + 1) * self.out_features)
        return ops.dequant_matmul(x, self.qweight[rows], self.scales[rows], self.zeros[rows], self.spec.bits, bias,
                                  self.backend)

    @torch.no_grad()
    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.value(dtype)

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, out_features={self.out_features}, in_features={self.in_features}, "
                f"transposed={self.transposed}, spec={self.spec.name}, mode={self.mode}")


# experts modules of transformers without use_experts_implementation's attributes: class name → transposed
KNOWN_LAYOUTS = {"Llama4TextExperts": True}
# of those, the ones called on tokens already laid out expert by expert ((E·T, H): every expert gets T rows)
SORTED_INPUT = {"Llama4TextExperts"}


def transposed(m: nn.Module) -> bool | None:
    """Whether an experts module stores ``(experts, in, out)``; None for a module that is not one."""
    if hasattr(m, "is_transposed"):
        return bool(m.is_transposed)
    for cls in type(m).__mro__:  # a class qdpo swapped in keeps its original as a base
        if cls.__name__ in KNOWN_LAYOUTS:
            return KNOWN_LAYOUTS[cls.__name__]
    return None


def is_experts_module(m: nn.Module) -> bool:
    """A transformers experts module (``use_experts_implementation``, or one of :data:`KNOWN_LAYOUTS`),
    quantized or not."""
    return transposed(m) is not None and any(
        isinstance(m._parameters.get(n), nn.Parameter) or PREFIX + n in m._modules
        for n in EXPERT_TENSORS)


def moe_routers(model: nn.Module) -> set[str]:
    """Names of the modules beside an experts module in its MoE block that hold a 2-D weight: the router
    (a module of its own, or an ``nn.Linear``) and gates such as Qwen2-MoE's ``shared_expert_gate``. They
    decide which experts, and how much of the shared expert, each token gets; they stay in full precision,
    as in every deployed MoE checkpoint (vLLM builds them unquantized)."""
    out = set()
    for block, b in model.named_modules():
        if not any(is_experts_module(c) for c in b.children()):
            continue
        for child, c in b.named_children():
            w = getattr(c, "weight", None)
            if not is_experts_module(c) and isinstance(w, Tensor) and w.dim() == 2 and w.is_floating_point():
                out.add(f"{block}.{child}" if block else child)
    return out


def fused_expert_tensors(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``"<module>.<tensor>"`` → (experts module, tensor name) for every fused expert tensor not yet quantized."""
    out = {}
    for name, m in model.named_modules():
        if not is_experts_module(m):
            continue
        for t in EXPERT_TENSORS:
            p = m._parameters.get(t)
            if isinstance(p, nn.Parameter) and p.dim() == 3 and p.is_floating_point():
                out[f"{name}.{t}" if name else t] = (m, t)
    return out


def quantized_experts(model: nn.Module) -> dict[str, QuantExpertTensor]:
    """``"<module>.<tensor>"`` → :class:`QuantExpertTensor` (its submodule is ``<module>.qdpo_<tensor>``)."""
    out = {}
    for name, m in model.named_modules():
        for t in EXPERT_TENSORS:
            q = m._modules.get(PREFIX + t)
            if isinstance(q, QuantExpertTensor):
                out[f"{name}.{t}" if name else t] = q
    return out


def submodule_name(name: str) -> str:
    """``"<module>.<tensor>"`` → the path of its :class:`QuantExpertTensor`, ``"<module>.qdpo_<tensor>"``."""
    mod, _, t = name.rpartition(".")
    return f"{mod}.{PREFIX}{t}" if mod else PREFIX + t


def expert_shape(m: nn.Module, tensor: str) -> tuple[int, int]:
    """``(E·out, in)``: the 2-D weight a fused tensor is quantized as."""
    e, a, b = m._parameters[tensor].shape
    return (e * b, a) if transposed(m) else (e * a, b)


_classes: dict[type, type] = {}


def _quantized_class(cls: type) -> type:
    """``cls`` with its expert tensors read from the qdpo submodules, ŵ computed once per forward."""
    if getattr(cls, "_qdpo_experts", False):
        return cls
    if cls not in _classes:
        def forward(self, *args, **kwargs):
            qs = list(self._qdpo_modules())
            # transformers' experts interface (tokens, chosen experts, their weights), packed: expert by expert
            packed = all(q.mode == "packed" and q._w_hat is None for q in qs) and not any(
                n in self._parameters for n in EXPERT_TENSORS)  # none kept in full precision (exclude)
            if packed and len(args) == 3 and not kwargs and not getattr(self, "_is_expert_parallel", False):
                return _packed_forward(self, *args)
            if packed and len(args) == 1 and not kwargs and cls.__name__ in SORTED_INPUT:
                return _packed_sorted_forward(self, args[0])
            self._qdpo_values = {}  # each tensor's ŵ, made at its first read in this forward
            dev = qs[0].scales.device.type
            # under autocast ŵ comes in the autocast dtype, as QuantLinear computes (grouped_mm does not autocast)
            self._qdpo_dtype = autocast_dtype(dev)
            try:
                return cls.forward(self, *args, **kwargs)
            finally:
                self._qdpo_values = None

        def tensor(name: str) -> property:
            def get(self):
                q = self._modules.get(PREFIX + name)
                if q is None:  # a tensor this module does not have, or kept as it was
                    return nn.Module.__getattr__(self, name)
                cache = self.__dict__.get("_qdpo_values")
                if cache is None:
                    return q.value()
                if name not in cache:
                    cache[name] = q.value(self.__dict__.get("_qdpo_dtype"))
                return cache[name]
            return property(get)

        def modules(self):
            return (m for m in self._modules.values() if isinstance(m, QuantExpertTensor))

        body = {"forward": forward, "_qdpo_modules": modules, "_qdpo_experts": True, "_qdpo_values": None}
        body.update({n: tensor(n) for n in EXPERT_TENSORS})
        _classes[cls] = type(f"Quant{cls.__name__}", (cls,), body)
    return _classes[cls]


def _expert_output(self, y: Tensor) -> Tensor:
    return self.post_expert_norm(y) if getattr(self, "has_post_expert_norm", False) else y


# False: packed experts run one launch per chosen expert and product at decode too (benchmarks compare)
ROUTED_DECODE = True
ROUTED_MAX_TOKENS = 16  # up to this many tokens (a decode step's batch) take the grouped launches
# More tokens (prefill) too, on the GPU kernels, while the (token, expert) pairs make at most this many rows
# per expert on average: one GEMV tile (16 rows), the kernel the per-expert launches would give most experts
ROUTED_ROWS_PER_EXPERT = 16


def _expected_rows(t: int, top_k: int, experts: int) -> int:
    """The rows one expert is expected to take from ``t`` tokens that each pick ``top_k`` experts (the
    grouped ops' ``max_rows``, which sizes their tiles): all of a decode step's, else at least one GEMV
    tile's and the average (the triton kernels widen their tile for more)."""
    return min(t, max(ROUTED_MAX_TOKENS, -(-t * top_k // experts)))


def _routed(up: QuantExpertTensor, x: Tensor, top_k: int) -> bool:
    """Whether the packed forward takes one grouped launch per product (:func:`_packed_routed_forward`):
    a decode step's few tokens (each expert then gets at most one row per token, at most 16 rows, one
    GEMV tile's), or more tokens (prefill) whose pairs make at most :data:`ROUTED_ROWS_PER_EXPERT` rows
    per expert on average, where the grouped op runs on the GPU kernels (the cuda or triton backend; the
    reference one dequantizes an expert per row). Then the per-expert launches would run the same GEMV on
    most experts, one launch pair per expert after a host sync; an expert given more rows gets more
    chunks of the grouped kernel (per expert, more than 16 rows go to the GEMM route). More rows per
    expert keep the per-expert launches. Also: a backend that implements the op, and no gradient to
    carry (the grouped op has none)."""
    if not (ROUTED_DECODE and backends.serves(up.backend, "dequant_matmul_experts")
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return False
    if x.shape[0] <= ROUTED_MAX_TOKENS:
        return True
    backend = backends.requested(up.backend)
    kernels = backend in ("cuda", "triton") or (backend == "auto" and x.is_cuda)
    return kernels and x.shape[0] * top_k <= ROUTED_ROWS_PER_EXPERT * up.experts


def _grouped_products(x: Tensor, token: Tensor | None, ids: Tensor, up: QuantExpertTensor, down: QuantExpertTensor,
                      up_bias: Tensor | None, down_bias: Tensor | None, act, rows: int) -> Tensor:
    """``down_e(act(up_e(x[token[p]])))`` for each pair p of a row of x and its expert ``e = ids[p]`` (an id
    outside the experts: zeros; ``token`` None: pair p is row p), ``(P, out)`` in the pairs' order, in one
    grouped launch per product and without a host sync. ``rows`` (the rows one expert is expected to
    take) 1: each pair its own block (``dequant_matmul_experts``), nothing to sort; more: the pairs sorted
    by expert on the device once for both products (``dequant_matmul_segments``), the tile sized for
    ``rows``."""
    if rows == 1:
        xs = x if token is None else x[token]
        return down.matmul_routed(act(up.matmul_routed(xs, ids, up_bias, 1)).to(x.dtype), ids, down_bias, 1)
    order, offsets = expert_segments(ids, up.experts)
    h = act(up.matmul_segments(x[order if token is None else token[order]], offsets, up_bias, rows))
    ys = down.matmul_segments(h.to(x.dtype), offsets, down_bias, rows)
    return torch.empty_like(ys).index_copy_(0, order, ys)  # back to the pairs' order


def _packed_routed_forward(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, up: QuantExpertTensor,
                           down: QuantExpertTensor, up_name: str) -> Tensor:
    """A decode step's (or a short prefill's) experts in two grouped launches (``dequant_matmul_experts``
    over the (token, expert) pairs, the ids read on the device; each token picks distinct experts, so at
    most T rows share one, the tile sized for up to 16):
    no host sync and a fixed number of launches, so a decode step can be captured in a CUDA graph. The
    same sums as :func:`_packed_forward`, in the same order: each pair's fp32 output times its routing
    weight, added to zero in ascending expert order (ids past the experts give zeros)."""
    t, k = top_k_index.shape
    ids = top_k_index.reshape(-1)  # (T·k,) pairs, token-major
    valid = (ids >= 0) & (ids < up.experts)
    clamped = torch.where(valid, ids, torch.zeros_like(ids))
    up_bias = getattr(self, f"{up_name}_bias") if self.has_bias else None
    down_bias = self.down_proj_bias if self.has_bias else None

    def act(h: Tensor) -> Tensor:
        return self._apply_gate(h) if self.has_gate else self.act_fn(h)

    y = _grouped_products(x, torch.arange(t, device=x.device).repeat_interleave(k), ids, up, down, up_bias,
                          down_bias, act, _expected_rows(t, k, up.experts))
    y = _expert_output(self, y).float() * top_k_weights.reshape(-1, 1).float()
    y = torch.where(valid[:, None], y, torch.zeros_like(y)).view(t, k, -1)
    order = torch.argsort(clamped.masked_fill(~valid, up.experts).view(t, k), dim=1, stable=True)
    y = torch.gather(y, 1, order[..., None].expand(-1, -1, y.shape[-1]))
    out = torch.zeros(t, y.shape[-1], dtype=torch.float32, device=x.device)
    for j in range(k):
        out = out + y[:, j]
    return out


def _packed_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The experts of a packed model: each expert hit runs its rows of the packed weights through
    ``dequant_matmul`` (at decode, a GEMV per chosen expert), instead of dequantizing every expert.
    The interface of transformers' experts implementations: tokens (T, H), the chosen experts and their
    routing weights (T, top_k); gating by the module's own ``_apply_gate`` (or ``act_fn``), optional
    biases and post-expert norm. Outputs are summed in fp32 in a fixed order (by expert). A decode step's
    few tokens (and, on the GPU kernels, more tokens with few rows per expert: :func:`_routed`) take
    :func:`_packed_routed_forward` instead, without a host sync."""
    x = autocast_input(hidden_states)
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    up, down = self._modules[PREFIX + up_name], self._modules[PREFIX + "down_proj"]
    if _routed(up, x, top_k_index.shape[-1]):
        try:
            return _packed_routed_forward(self, x, top_k_index, top_k_weights, up, down, up_name).to(
                hidden_states.dtype)
        except backends.Refused:  # a backend named explicitly that cannot take these (cuda: fp32 x): per expert
            pass
    k = top_k_index.shape[-1]
    experts, weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)
    tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=up.experts).tolist()  # one host sync, as the eager loop has
    out = torch.zeros(x.shape[0], down.out_features, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts[: up.experts]):  # ids past the experts (expert-parallel sentinels) are skipped
        if n == 0:
            continue
        pick = order[start:start + n]
        start += n
        rows = tokens[pick]
        h = up.matmul(x[rows], e, getattr(self, f"{up_name}_bias")[e] if self.has_bias else None)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = _expert_output(self, down.matmul(h.to(x.dtype), e, self.down_proj_bias[e] if self.has_bias else None))
        out.index_add_(0, rows, y.float() * weights[pick, None].float())
    return out.to(hidden_states.dtype)


def _packed_sorted_forward(self, hidden_states: Tensor) -> Tensor:
    """Packed experts called on tokens laid out expert by expert (Llama 4: ``(E·T, H)``, expert ``e``'s
    rows ``e·T .. (e+1)·T``): each expert's rows through ``dequant_matmul`` on its own packed rows, gated
    as the module's forward does (``gate_up`` halves, ``up · act(gate)``). Where the routed launches
    serve (:func:`_routed`: a decode step's few tokens, or on the GPU kernels a prefill of few rows per
    expert), both products are instead one grouped launch each over the rows that are not all zero: Llama
    4 scales each expert's copy of the tokens by their router scores, zero for the experts a token did
    not choose, and such a row's output is exactly zero (no bias; act(0)·0 = 0), so only the chosen
    experts' weights are read (with top 1 of 16 experts, a 16th of them at one token)."""
    x = autocast_input(hidden_states)
    up, down = self._modules[PREFIX + "gate_up_proj"], self._modules[PREFIX + "down_proj"]
    t = x.shape[0] // up.experts

    def act(h: Tensor) -> Tensor:
        gate, u = h.chunk(2, dim=-1)
        return u * self.act_fn(gate)

    if _routed(up, x[:t], 1):
        expert = torch.arange(up.experts, device=x.device).repeat_interleave(t)  # the layout's expert of each row
        ids = torch.where((x != 0).any(dim=1), expert, -1)  # an all-zero row: no expert, a zero row out
        try:
            return _grouped_products(x, None, ids, up, down, None, None, act, _expected_rows(t, 1, up.experts)).to(
                hidden_states.dtype)
        except backends.Refused:  # a backend named explicitly that cannot take these (cuda: fp32 x): per expert
            pass
    x = x.view(up.experts, -1, x.shape[-1])
    outs = [down.matmul(act(up.matmul(x[e], e)).to(x.dtype), e) for e in range(up.experts)]
    return torch.cat(outs).to(hidden_states.dtype)


def install(m: nn.Module, tensor: str, q: QuantExpertTensor) -> None:
    """Replace the experts module's fused parameter ``tensor`` by ``q``, in place."""
    if tensor in m._parameters:
        del m._parameters[tensor]
    m.add_module(PREFIX + tensor, q)
    m.__class__ = _quantized_class(type(m))
