"""AWQ initialisation: activation-aware per-channel weight scaling before RTN.

Activation-aware weight quantization (Lin et al., 2023, arXiv 2306.00978):
input channels that carry large activations matter most, so scale their
weights *up* before round-to-nearest (less relative rounding error) and fold
the inverse scale into the operation that produces those activations, so the
full-precision function is unchanged::

    y = x Wᵀ = (x · diag(1/s)) (W · diag(s))ᵀ        s = mean_t |x|^α / geomean(...)

For each group of linears sharing one input ``x`` (``T`` calibration tokens ×
``K`` channels), ``α`` runs over ``n_grid`` points of ``[0, 1]`` and the one
minimising the group's output MSE ``Σ_i ‖x (Q(W_i·diag(s))·diag(1/s) - W_i)ᵀ‖² / (T·Σ_i N_i)``
is kept, where ``Q`` is qdpo's RTN fake-quant for the spec
(``torch.ops.qdpo.qparams`` + ``fake_quant``). ``α = 0`` gives ``s = 1``
exactly, i.e. plain RTN, so on the calibration tokens AWQ is never worse than RTN.

Where the scales are folded (Llama / Qwen2 / Mistral style decoders; GPT-2):

=====================================  ====================  ===========================================
group (one shared input)               × s on                ÷ s folded into
=====================================  ====================  ===========================================
every linear fed by a norm's output    weight columns        that norm's weight and bias
(q/k/v_proj, gate/up_proj, c_attn,
c_fc)
``o_proj``                             weight columns        rows and bias of the sibling ``v_proj``;
                                                             with GQA (fewer KV heads) one scale per
                                                             ``v_proj`` row, shared by the ``o_proj``
                                                             channels of every query head reading it
``down_proj``                          weight columns        rows and bias of the sibling ``up_proj``
a mixture of experts' block: the       input channels of     the post-attention norm's weight
experts' ``gate_up_proj`` (all         every expert, and
experts, every token), router, shared  the router's and the
experts                                shared experts'
expert ``e``'s ``down_proj`` (the      its columns           expert ``e``'s ``up`` rows of
tokens routed to ``e``)                                      ``gate_up_proj`` (and their bias)
=====================================  ====================  ===========================================

The first MoE row applies where the experts read the flattened output of the norm itself (Mixtral,
Qwen2/3-MoE, OLMoE, gpt-oss), or a view of the output that the router and shared experts read
(DeepSeek-V3, GLM-4-MoE: one group, one scale for all of them). The
second applies to transformers' ``(experts, out, in)`` experts whose first product is ``(gate;
up)`` (Mixtral, Qwen2/3-MoE, OLMoE, ...; not gpt-oss or Llama 4): each expert's ``down_proj``
input is ``act(gate)·up`` of the tokens routed to it, recomputed from the captured tokens and
routing; an expert no calibration token reached keeps RTN.

Any other layer (GPT-2's ``c_proj``, a norm whose output is not ``weight·x``
like Gemma's ``(1 + weight)·x``, tied weights) keeps ``s = 1`` (plain RTN),
with a logged note. Every fold is checked: a norm or MLP is run on random
input before and after folding, and at the end the logits of the first
calibration sequence must be unchanged (``FOLD_MIN_SQNR_DB``: 90 dB for fp32
weights, 40 / 30 dB for fp16 / bf16); folds that fail are undone and their
layers fall back to RTN. (In 16-bit, a wrong fold with scales near 1 can hide
in the rounding; the architectures above are covered by tests.)

The statistics (α and calibration MSE vs RTN per group) are returned by
:func:`awq_scale_model` and stored as ``model.qdpo_awq_stats`` by
:func:`awq_quantize_model` (read them with :func:`awq_stats`).

Memory: the calibration inputs of every scaled group are held at once, fp32:
``num_layers × (sum of group input widths) × max_tokens × 4`` bytes
(≈1.6 GB for SmolLM2-135M at the default 4096 tokens); lower ``max_tokens``
to shrink it. An MoE layer whose experts' ``down_proj`` is scaled holds its
experts' input once more (``hidden × max_tokens × 4`` bytes, with the chosen
experts of each token), from which each expert's ``down_proj`` input is
recomputed one expert at a time.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from qdpo.kernels import ops
from qdpo.quant.experts import fused_expert_tensors, is_experts_module, moe_routers
from qdpo.quant.experts import transposed as experts_layout
from qdpo.quant.linear import MODES, _linear_weight
from qdpo.quant.model import DEFAULT_EXCLUDE, _excluded, _is_linear, check_quantizable, quantize_model
from qdpo.quant.spec import QuantSpec

log = logging.getLogger(__name__)

CALIB_BATCH_TOKENS = 8192  # a 2-D calibration tensor is forwarded in row chunks of at most this many tokens
CHECK_TOKENS = 64  # tokens of the first calibration sequence that check the folded model's logits
MIN_STAT = 1e-5  # floor of mean|x| relative to its max, so a dead channel gets a finite scale
# Least SQNR (dB) of the folded model's logits vs the original, by weight dtype: folding only
# rounds each rescaled weight once (measured on tiny models: fp32 ≈ 130-140 dB, fp16 ≈ 63-73,
# bf16 ≈ 44-55), while a fold through a nonlinearity changes the logits far more.
FOLD_MIN_SQNR_DB = {torch.float32: 90.0, torch.float16: 40.0, torch.bfloat16: 30.0}
SEED = 0  # token subsampling and the random inputs of the fold checks are deterministic


@dataclass
class _Group:
    """The linears that read one input tensor, and the module that produced it (if seen)."""

    members: list[str]  # every linear reading the input, excluded ones too: all must be rescaled
    producer: str | None  # name of the norm-like module whose output the input is
    chunks: list[Tensor] = field(default_factory=list)  # captured input rows [t, K] fp32
    view_of: str | None = None  # the norm whose output the input is a view of (an MoE block's flattened tokens)


@dataclass(eq=False)
class _Fold:
    """One scale folded into a predecessor (``kind`` "norm", "rows" or "expert") and its consumers."""

    kind: str
    pred: nn.Module
    consumers: list[Tensor]  # each reader's weight with its input channels last (a view of the parameter)
    s_pred: Tensor  # [C] divides the predecessor's output channels
    s_in: Tensor  # [K] multiplies the consumers' input columns (s_pred expanded for GQA)
    check: nn.Module | None  # run on random input to verify the fold; None: end-to-end check only
    entry: dict  # the group's stats entry, updated if the fold is undone
    expert: int | None = None  # kind "expert": the predecessor is expert ``expert``'s up rows of gate_up_proj


# --------------------------------------------------------------------------- public API
@torch.no_grad()
def awq_quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    calib_input_ids: list[Tensor] | Tensor,
    attention_mask: list[Tensor] | Tensor | None = None,
    *,
    n_grid: int = 20,
    max_tokens: int = 4096,
    mode: str = "train",
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    backend: str = "auto",
    progress: Callable[[Iterable], Iterable] | None = None,
) -> nn.Module:
    """AWQ-scale the model (:func:`awq_scale_model`), then RTN-quantize it, in place; returns ``model``.

    The layers become :class:`~qdpo.quant.linear.QuantLinear` exactly as with
    ``quantize_model(model, spec, mode=mode, exclude=exclude)``, but their
    latent weights are ``W·diag(s)`` and the preceding norms / projections
    carry ``1/s``. The search statistics are stored as ``model.qdpo_awq_stats``
    (see :func:`awq_stats`).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not known; use one of {MODES}")
    stats = awq_scale_model(model, spec, calib_input_ids, attention_mask, n_grid=n_grid,
                            max_tokens=max_tokens, exclude=exclude, backend=backend, progress=progress)
    quantize_model(model, spec, mode=mode, exclude=exclude, backend=backend, progress=progress)
    model.qdpo_awq_stats = stats
    return model


def awq_stats(model: nn.Module) -> dict:
    """The AWQ statistics of a model quantized by :func:`awq_quantize_model` (JSON-serialisable).

    Keys: ``method``, ``spec``, ``n_grid``, ``calib_tokens`` (real tokens
    given), ``sampled_tokens`` (used per layer), ``groups`` (one entry per
    scaled group: ``layers``, ``folded_into``, ``alpha``, ``mse_rtn``,
    ``mse_awq``, ``mse_reduction`` = 1 - awq/rtn), ``mse_reduction_mean``
    over the groups, and ``fallback`` (layer → why it kept plain RTN).
    """
    stats = getattr(model, "qdpo_awq_stats", None)
    if stats is None:
        raise ValueError(f"{type(model).__name__} was not quantized with AWQ; use qdpo.quant.awq.awq_quantize_model")
    return stats


@torch.no_grad()
def awq_scale_model(
    model: nn.Module,
    spec: QuantSpec,
    calib_input_ids: list[Tensor] | Tensor,
    attention_mask: list[Tensor] | Tensor | None = None,
    *,
    n_grid: int = 20,
    max_tokens: int = 4096,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    backend: str = "auto",
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict:
    """Search and fold the AWQ scales into the full-precision model, in place; returns the stats.

    The model still computes the same function (up to rounding).

    Args:
        spec: the :class:`QuantSpec` the layers will be quantized with (the search target).
        calib_input_ids: a list of batches (``(T,)`` or ``(B, T)`` integer
            tensors, forwarded as given) or one ``(B, T)`` tensor (forwarded in
            chunks of at most ``CALIB_BATCH_TOKENS`` tokens).
        attention_mask: ``None`` or the same structure as the ids; 0 marks
            padding, which is not calibrated on.
        n_grid: α candidates, evenly spaced on ``[0, 1]``; 1 means α = 0 only (plain RTN).
        max_tokens: real tokens sampled (uniformly, seeded) for every layer group.
        exclude: as in ``quantize_model``; excluded layers stay FP but are
            still rescaled when they share an input with a quantized one.
        backend: kernel backend of the fake-quant used in the search.
        progress: optional wrapper (e.g. ``tqdm``) for the calibration
            batches, the group search and the layer conversion.
    """
    exclude = tuple(exclude)
    layers = _checked_layers(model, spec, exclude, n_grid, max_tokens)
    # fused expert tensors quantize_model will quantize: the first product's joins its input's group
    layers.update({n: None for n in fused_expert_tensors(model) if not _excluded(n, exclude)})
    batches = _calibration_batches(model, calib_input_ids, attention_mask)
    positions, total = _sample_positions(batches, max_tokens)
    was_training = model.training
    model.eval()
    try:
        groups, routed = _capture(model, set(layers), batches, positions, max_tokens, progress)
        stats = {"method": "awq", "spec": spec.name, "n_grid": n_grid, "calib_tokens": total,
                 "sampled_tokens": min(total, max_tokens), "groups": [], "fallback": {}}
        check_ids = [t[:1, :CHECK_TOKENS] if t is not None else None for t in batches[0]]
        ref_logits = _logits(model, *check_ids)
        folds = _plan_and_search(model, spec, groups, set(layers), n_grid, backend, stats, progress)
        folds += _expert_down_folds(model, routed, set(layers), n_grid, spec, backend, stats)
        _apply_checked(model, folds, check_ids, ref_logits, stats)
    finally:
        model.train(was_training)
    red = [g["mse_reduction"] for g in stats["groups"]]
    stats["mse_reduction_mean"] = sum(red) / len(red) if red else 0.0
    log.info("AWQ %s: %d layer groups scaled, mean calibration output-MSE reduction vs RTN %.1f%%; "
             "%d layers kept plain RTN", spec.name, len(red), 100 * stats["mse_reduction_mean"],
             len(stats["fallback"]))
    return stats


# --------------------------------------------------------------------------- inputs
def _checked_layers(model, spec, exclude, n_grid, max_tokens) -> dict[str, nn.Module]:
    """The layers to quantize, after every check that must pass before the model is touched."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a qdpo.QuantSpec, got {type(spec).__name__}")
    if type(n_grid) is not int or n_grid < 1:
        raise ValueError(f"n_grid={n_grid!r} must be an int >= 1 (1 = alpha 0 only = plain RTN)")
    if type(max_tokens) is not int or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} must be an int >= 1")
    # quantize_model's checks, fused expert tensors included (their shapes too: before, a group size that did
    # not divide an expert's down_proj failed after the calibration, in the search, naming no layer)
    layers, _ = check_quantizable(model, spec, exclude)
    return layers


def _as_list(x, what: str) -> list:
    if isinstance(x, Tensor):
        if x.dim() == 1:
            return [x]
        if x.dim() != 2:
            raise ValueError(f"{what} must be (T,) or (B, T), got shape {tuple(x.shape)}")
        rows = max(1, CALIB_BATCH_TOKENS // max(1, x.shape[1]))
        return list(x.split(rows))
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"{what} must be a tensor or a list of tensors, got {type(x).__name__}")


def _calibration_batches(model, ids, mask) -> list[tuple[Tensor, Tensor | None]]:
    """Validated ``(ids [B, T] long, mask [B, T] or None)`` batches on the model's input device."""
    ids_list = _as_list(ids, "calib_input_ids")
    mask_list = [None] * len(ids_list) if mask is None else _as_list(mask, "attention_mask")
    if not ids_list:
        raise ValueError("calibration data is empty; pass at least one sequence of token ids")
    if len(mask_list) != len(ids_list):
        raise ValueError(f"attention_mask has {len(mask_list)} batches but calib_input_ids has {len(ids_list)}")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = emb.num_embeddings if isinstance(emb, nn.Embedding) else None
    device = emb.weight.device if isinstance(emb, nn.Embedding) else next(model.parameters()).device
    out = []
    for i, (t, m) in enumerate(zip(ids_list, mask_list)):
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"calibration batch {i} must be an integer tensor of token ids, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        t = t.reshape(1, -1) if t.dim() == 1 else t
        if t.dim() != 2 or t.numel() == 0:
            raise ValueError(f"calibration batch {i} has shape {tuple(t.shape)}; calibration data must not be empty")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            bad = lo if lo < 0 else hi
            raise ValueError(f"calibration batch {i} holds token id {bad}, out of range for the model's "
                             f"vocabulary of {vocab} (valid ids 0..{vocab - 1 if vocab else '?'}); "
                             "tokenize with the model's own tokenizer")
        if m is not None:
            m = m.reshape(1, -1) if m.dim() == 1 else m
            if m.shape != t.shape:
                raise ValueError(f"attention_mask batch {i} has shape {tuple(m.shape)}, ids have {tuple(t.shape)}")
            m = m.to(device=device, dtype=torch.long)
        out.append((t.to(device=device, dtype=torch.long), m))
    return out


def _sample_positions(batches, max_tokens: int) -> tuple[list[Tensor], int]:
    """Flat indices into each batch's ``B·T`` positions: ≤ ``max_tokens`` real tokens in all."""
    valid = [torch.arange(ids.numel(), device=ids.device) if m is None else (m.reshape(-1) != 0).nonzero().squeeze(1)
             for ids, m in batches]
    total = sum(v.numel() for v in valid)
    if total == 0:
        raise ValueError("attention_mask marks every calibration position as padding; no tokens to calibrate on")
    gen = torch.Generator().manual_seed(SEED)
    chosen = torch.randperm(total, generator=gen)[:max_tokens].sort().values
    out, start = [], 0
    for v in valid:
        sel = chosen[(chosen >= start) & (chosen < start + v.numel())] - start
        out.append(v[sel.to(v.device)])
        start += v.numel()
    return out, total


# --------------------------------------------------------------------------- calibration
class _StopForward(Exception):
    """Raised at the LM head: every layer input is captured, the logits are not needed."""


class _Recorder:
    """Forward hooks that group linears by their (identical) input tensor and capture it.

    In the first batch a linear whose input *is* (same tensor object) a norm's
    output gets that norm as producer, and linears reading the same object
    form one group; afterwards groups without a quantized layer are dropped
    and only each group's leader captures rows (the sampled positions).
    """

    def __init__(self) -> None:
        self.groups: dict[str, _Group] = {}  # leader (first reader) → group
        self.leader_of: dict[str, str] = {}
        self.outputs: dict[int, tuple] = {}  # id(norm output) → (weakref, norm name), first batch only
        self.output_data: dict[tuple, tuple] = {}  # (data pointer, numel) of a norm output → the same
        self.inputs: dict[int, tuple] = {}  # id(linear input) → (weakref, leader), first batch only
        self.routed: dict[str, list[tuple[Tensor, Tensor]]] = {}  # experts module → (tokens, chosen experts)
        self.first, self.index, self.n_rows = True, None, 0

    def experts_hook(self, name: str):
        """An experts module called as transformers' experts are (tokens, chosen experts, their weights):
        keep the sampled tokens and the experts each was routed to (the inputs of every expert's down_proj)."""
        def hook(module, args):
            if len(args) != 3 or not all(isinstance(a, Tensor) for a in args) or args[1].dim() != 2:
                return
            x, idx = args[0].detach().reshape(-1, args[0].shape[-1]), args[1].detach()
            if x.shape[0] == self.n_rows and idx.shape[0] == x.shape[0]:
                keep = self.index.to(x.device)
                x, idx = x[keep], idx[keep]
            self.routed.setdefault(name, []).append((x.to(torch.float32, copy=True), idx.clone()))
        return hook

    def norm_hook(self, name: str):
        def hook(module, args, out):
            if self.first and isinstance(out, Tensor):
                self.outputs[id(out)] = (weakref.ref(out), name)
                self.output_data[(out.data_ptr(), out.numel())] = (weakref.ref(out), name)
        return hook

    def linear_hook(self, name: str):
        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, Tensor):
                return
            if self.first and name not in self.leader_of:
                self._join(name, x)
            group = self.groups.get(name)  # only the leader captures the shared input
            if group is not None:
                rows = x.detach().reshape(-1, x.shape[-1])
                rows = rows[self.index.to(rows.device)] if rows.shape[0] == self.n_rows else rows
                group.chunks.append(rows.to(torch.float32, copy=True))
        return hook

    def _join(self, name: str, x: Tensor) -> None:
        hit = self.inputs.get(id(x))
        if hit is not None and hit[0]() is x:
            self.groups[hit[1]].members.append(name)
            self.leader_of[name] = hit[1]
            return
        prod = self.outputs.get(id(x))
        producer = prod[1] if prod is not None and prod[0]() is x else None
        view_of = None
        if producer is None:  # a view of a norm's output (an MoE block flattens it to tokens × channels)
            prod = self.output_data.get((x.data_ptr(), x.numel()))
            alive = prod[0]() if prod is not None else None
            if alive is not None and alive.data_ptr() == x.data_ptr() and alive.dtype == x.dtype:
                view_of = prod[1]
        self.groups[name] = _Group([name], producer, view_of=view_of)
        self.inputs[id(x)] = (weakref.ref(x), name)
        self.leader_of[name] = name


def _capture(model, quantized, batches, positions, max_tokens, progress) -> tuple[dict[str, _Group], dict]:
    """Run the FP model on the calibration batches; return the groups with quantized members, and each
    experts module's sampled tokens with the experts they were routed to."""
    rec = _Recorder()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    handles = []
    modules = dict(model.named_modules())
    routers = moe_routers(model)
    for name, m in modules.items():
        if _is_linear(m):
            handles.append(m.register_forward_pre_hook(rec.linear_hook(name)))
        elif _is_norm_like(m):
            handles.append(m.register_forward_hook(rec.norm_hook(name)))
        elif is_experts_module(m):  # its input's readers: the fused tensor of the first product
            up = next((t for t in ("gate_up_proj", "up_proj") if t in m._parameters), None)
            if up is not None:
                handles.append(m.register_forward_pre_hook(rec.linear_hook(f"{name}.{up}" if name else up)))
            if f"{name}.down_proj" in quantized:
                handles.append(m.register_forward_pre_hook(rec.experts_hook(name)))
        elif name in routers:  # a router module of its own: rescaled with the experts
            handles.append(m.register_forward_pre_hook(rec.linear_hook(name)))
    if isinstance(head, nn.Module):  # registered last: runs after the head's capture hook
        handles.append(head.register_forward_pre_hook(_stop_forward))
    items = list(zip(batches, positions))
    try:
        for (ids, mask), pos in (progress(items) if progress else items):
            rec.index, rec.n_rows = pos, ids.numel()
            rec.outputs.clear(), rec.inputs.clear()
            try:
                model(**_forward_kwargs(model, ids, mask))
            except _StopForward:
                pass
            if rec.first:
                rec.first = False
                _adopt_views(rec.groups, modules)
                rec.groups = {k: g for k, g in rec.groups.items() if any(n in quantized for n in g.members)}
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(SEED)
    for g in rec.groups.values():
        x = torch.cat(g.chunks)
        g.chunks = [x[torch.randperm(x.shape[0], generator=gen)[:max_tokens].to(x.device)]
                    if x.shape[0] > max_tokens else x]
    routed = {}
    for name, chunks in rec.routed.items():
        x, idx = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        keep = torch.randperm(x.shape[0], generator=gen)[:max_tokens].to(x.device)
        routed[name] = (x[keep], idx[keep]) if x.shape[0] > max_tokens else (x, idx)
    return rec.groups, routed


def _adopt_views(groups: dict[str, _Group], modules: dict[str, nn.Module]) -> None:
    """Groups that read a view of a norm's output (an MoE block flattens it to tokens × channels). Where
    another group reads that output itself and folds into the norm, the view's readers join it: one
    scale for every reader of the same data (DeepSeek-style blocks: router and shared experts read the
    output, the experts its view). Otherwise a group holding a fused expert tensor takes the norm itself
    (the experts, router and shared experts of a standard MoE block all read the flattened tokens).
    Other views keep RTN: a norm output read both as a view and through derived tensors (Llama 4 scales
    its experts' input by the router) cannot take a fold that only the view's readers follow."""
    owner = {g.producer: leader for leader, g in groups.items() if g.producer is not None}
    for leader, g in list(groups.items()):
        if g.producer is not None or g.view_of is None:
            continue
        if g.view_of in owner:
            groups[owner[g.view_of]].members.extend(g.members)
            del groups[leader]
        elif any(n not in modules for n in g.members):  # a fused expert tensor's name is not a module's
            g.producer = g.view_of
            owner[g.view_of] = leader


def _stop_forward(module, args):
    raise _StopForward


def _is_norm_like(m: nn.Module) -> bool:
    """A module with a per-channel ``weight`` vector that is not a linear or an embedding (a norm)."""
    w = getattr(m, "weight", None)
    return isinstance(w, Tensor) and w.dim() == 1 and not isinstance(m, nn.Embedding) and not _is_linear(m)


def _forward_kwargs(model, ids, mask) -> dict:
    kw = {"input_ids": ids}
    if mask is not None:
        kw["attention_mask"] = mask
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kw["use_cache"] = False
    return kw


def _logits(model, ids, mask) -> Tensor:
    out = model(**_forward_kwargs(model, ids, mask))
    out = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    return out.detach().float()


# --------------------------------------------------------------------------- search
def _plan_and_search(model, spec, groups, quantized, n_grid, backend, stats, progress) -> list[_Fold]:
    """Search α for every foldable group (recording stats); return the folds with α > 0."""
    modules = dict(model.named_modules())
    tied = _tied_modules(model)
    grid = [i / (n_grid - 1) for i in range(n_grid)] if n_grid > 1 else [0.0]
    folds = []
    items = list(groups.values())
    for g in (progress(items) if progress else items):
        qnames = [n for n in g.members if n in quantized]
        plan = _plan(modules, g, tied)
        if isinstance(plan, str):
            _fallback(stats, qnames, plan, logging.INFO)
            continue
        kind, pred_name, expand, check = plan
        weights = [_member_weight(modules, n) for n in qnames]
        weights = [w.reshape(-1, w.shape[-1]) for w in weights]  # fused experts: (E·O, K)
        alpha, s_pred, s_in, mse_rtn, mse_awq = _search(g.chunks.pop(), weights, expand, spec, grid, backend)
        entry = {"layers": qnames, "folded_into": pred_name, "alpha": alpha, "mse_rtn": mse_rtn,
                 "mse_awq": mse_awq, "mse_reduction": 1 - mse_awq / mse_rtn if mse_rtn > 0 else 0.0}
        stats["groups"].append(entry)
        if alpha > 0:
            folds.append(_Fold(kind, modules[pred_name], [_member_weight(modules, n) for n in g.members],
                               s_pred, s_in, check, entry))
    return folds


def _expert_down_folds(model, routed: dict, quantized: set[str], n_grid: int, spec, backend, stats) -> list[_Fold]:
    """Each expert's ``down_proj`` scaled like a dense ``down_proj``: its input is ``act(gate)·up`` of the
    tokens routed to that expert, so ``1/s`` folds into that expert's ``up`` rows of ``gate_up_proj``
    (transformers' ``(gate; up)`` halves) and ``s`` into its ``down_proj`` columns. Experts modules of
    another kind (no gate, the transposed gpt-oss layout, not called with the routing) keep RTN there."""
    grid = [i / (n_grid - 1) for i in range(n_grid)] if n_grid > 1 else [0.0]
    folds = []
    for name, (m, t) in fused_expert_tensors(model).items():
        if t != "down_proj" or name not in quantized:
            continue
        mod = name.rpartition(".")[0]
        why = None
        if experts_layout(m) or not getattr(m, "has_gate", True) or "gate_up_proj" not in m._parameters:
            why = ("its experts module is not transformers' (experts, out, in) kind with a (gate; up) first "
                   "product, through which a scale folds exactly (gpt-oss, Llama 4)")
        elif mod not in routed:
            why = "its experts module was not called with the routing (tokens, chosen experts, weights)"
        if why:
            _fallback(stats, [name], why, logging.INFO)
            continue
        x, idx = routed[mod]
        gate_up, down = m._parameters["gate_up_proj"], m._parameters["down_proj"]
        inter = down.shape[-1]
        apply_gate = m._apply_gate if hasattr(m, "_apply_gate") else (lambda h: m.act_fn(h[..., :inter]) * h[..., inter:])
        for e in range(down.shape[0]):
            rows = (idx == e).any(-1)
            label = f"{name}[{e}]"
            if not bool(rows.any()):
                _fallback(stats, [label], "no calibration token was routed to this expert", logging.INFO)
                continue
            gu = x[rows] @ gate_up[e].float().t()
            if getattr(m, "has_bias", False):
                gu = gu + m.gate_up_proj_bias[e].float()
            h = apply_gate(gu).float()
            alpha, s_pred, s_in, mse_rtn, mse_awq = _search(h, [down[e]], None, spec, grid, backend)
            entry = {"layers": [label], "folded_into": f"{mod}.gate_up_proj[{e}] (up rows)", "alpha": alpha,
                     "mse_rtn": mse_rtn, "mse_awq": mse_awq,
                     "mse_reduction": 1 - mse_awq / mse_rtn if mse_rtn > 0 else 0.0}
            stats["groups"].append(entry)
            if alpha > 0:
                folds.append(_Fold("expert", m, [down[e]], s_pred, s_in, m, entry, expert=e))
    return folds


def _plan(modules: dict[str, nn.Module], g: _Group, tied: set[str]) -> tuple | str:
    """``(kind, predecessor name, GQA expand map or None, check module)``, or why the group keeps RTN."""
    k = _member_weight(modules, g.members[0]).shape[-1]
    parent_name, _, child = g.members[0].rpartition(".")
    if g.producer is not None:
        plan = ("norm", g.producer, None, modules[g.producer])
        if modules[g.producer].weight.numel() != k:
            return f"its input comes from {g.producer}, whose weight does not have {k} channels"
    elif len(g.members) == 1 and child in ("o_proj", "down_proj"):
        sib = "v_proj" if child == "o_proj" else "up_proj"
        pred = getattr(modules[parent_name], sib, None)
        if not isinstance(pred, nn.Linear):
            return f"it has no sibling nn.Linear {sib} to fold a scale into"
        expand = _kv_expand(modules[parent_name], pred.out_features, k) if child == "o_proj" else None
        if isinstance(expand, str) or (child == "down_proj" and pred.out_features != k):
            return expand if isinstance(expand, str) else f"{sib} has {pred.out_features} rows, not {k}"
        plan = ("rows", f"{parent_name}.{sib}" if parent_name else sib, expand,
                None if child == "o_proj" else modules[parent_name])
    else:
        return ("its input is neither a norm's output nor o_proj's (after v_proj) or down_proj's "
                "(after up_proj), so there is no operation to fold a scale into")
    shared = [n for n in (plan[1], *g.members) if n in tied]
    if shared:
        return f"{shared[0]} shares its weight with another module (tied), so it cannot be rescaled"
    return plan


def _kv_expand(attn: nn.Module, n_v: int, k: int) -> Tensor | None | str:
    """Map o_proj input channel → v_proj row: channel ``h·hd + d`` reads KV head ``h // n_rep``."""
    if n_v == k:
        return None
    hd = getattr(attn, "head_dim", None)
    if not isinstance(hd, int) or hd < 1 or k % n_v or n_v % hd:
        return (f"o_proj has {k} input channels and v_proj {n_v} rows with head_dim={hd!r}: "
                "the grouped-query head mapping is unknown")
    n_kv, n_rep = n_v // hd, k // n_v
    return torch.arange(n_v).view(n_kv, 1, hd).expand(n_kv, n_rep, hd).reshape(-1)  # [K] → v row


def _member_weight(modules: dict[str, nn.Module], name: str) -> Tensor:
    """A group member's weight as a view with its K input channels last: a linear layer's ``(N, K)``, a
    router's ``(E, K)`` weight, or a fused expert tensor ``<experts module>.<tensor>`` (``(E, O, K)``, or
    its transposed storage seen as such)."""
    m = modules.get(name)
    if m is None:  # a fused expert tensor
        parent, _, t = name.rpartition(".")
        p = modules[parent]._parameters[t]
        return p.transpose(1, 2) if experts_layout(modules[parent]) else p
    return _linear_weight(m) if _is_linear(m) else m.weight


def _tied_modules(model: nn.Module) -> set[str]:
    """Names of modules holding a parameter that another module holds too (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def _search(x: Tensor, weights: list[Tensor], expand, spec, grid, backend):
    """Best α on the grid for inputs ``x`` [T, K]: ``(α, s_pred [C], s_in [K], mse_rtn, mse_awq)``."""
    stat = x.abs().mean(0)  # [K] mean |x| per input channel
    if expand is not None:  # GQA: one scale per v_proj row, from the mean over the heads reading it
        expand = expand.to(x.device)
        c = int(expand.max()) + 1
        stat = torch.zeros(c, device=x.device).index_add_(0, expand, stat) / torch.bincount(expand, minlength=c)
    stat = stat.clamp_min(stat.max() * MIN_STAT) if stat.max() > 0 else torch.ones_like(stat)
    xc = x if x.shape[0] <= x.shape[1] else torch.linalg.qr(x, mode="r").R  # ‖x dᵀ‖ = ‖R dᵀ‖, fewer rows
    denom = x.shape[0] * sum(w.shape[0] for w in weights)
    results = []
    for alpha in grid:
        s = stat.pow(alpha)
        s = s / s.log().mean().exp()  # geometric mean 1; α = 0 gives exactly 1
        s_in = s if expand is None else s[expand]
        results.append((_output_sq_error(xc, weights, s_in, spec, backend) / denom, alpha, s, s_in))
    best = min(results, key=lambda r: r[0])  # the first (smallest α) among ties
    return best[1], best[2], best[3], results[0][0], best[0]


def _output_sq_error(xc: Tensor, weights: list[Tensor], s_in: Tensor, spec: QuantSpec, backend: str) -> float:
    """``Σ_i ‖xc (Q(W_i·diag(s))·diag(1/s) - W_i)ᵀ‖²`` with ``Q`` = RTN fake-quant in the weight's dtype."""
    total = 0.0
    for w in weights:
        ws = (w.float() * s_in).to(w.dtype)  # exactly the latent weight the folded layer will hold
        if not bool(torch.isfinite(ws).all()):
            return math.inf
        sc, z = ops.qparams(ws, spec.bits, spec.group_size, spec.symmetric, backend)
        d = ops.fake_quant(ws, sc, z, spec.bits, None, backend).float() / s_in - w.float()  # [N, K]
        total += float((xc @ d.t()).pow(2).sum())
    return total


# --------------------------------------------------------------------------- folding
def _apply(f: _Fold, inverse: bool = False) -> None:
    """Divide the predecessor's output channels by s and multiply the consumers' columns by s (or undo)."""
    shrink, grow = (torch.mul, torch.div) if inverse else (torch.div, torch.mul)
    p = f.pred
    if f.kind == "expert":  # the up half of the expert's (gate; up) rows, and their bias
        half = p.gate_up_proj.shape[1] // 2
        w, bias = p.gate_up_proj[f.expert, half:], getattr(p, "gate_up_proj_bias", None)
        bias = bias[f.expert, half:] if isinstance(bias, Tensor) and getattr(p, "has_bias", False) else None
    else:
        w, bias = (p.weight if f.kind == "norm" else _linear_weight(p)), getattr(p, "bias", None)
    sp = f.s_pred.to(w.device)
    w.copy_(shrink(w.float(), sp if f.kind == "norm" else sp[:, None]).to(w.dtype))
    if isinstance(bias, Tensor):
        bias.copy_(shrink(bias.float(), sp).to(bias.dtype))
    for w in f.consumers:
        w.copy_(grow(w.float(), f.s_in.to(w.device)).to(w.dtype))


def _apply_locally_checked(f: _Fold, gen: torch.Generator) -> str | None:
    """Apply the fold; if its check module (norm or MLP) changes output, undo it and say why."""
    if f.check is None:
        _apply(f)
        return None
    if f.kind == "expert":  # the experts module on tokens all routed to this expert
        w = f.pred.gate_up_proj
        x = torch.randn(4, w.shape[-1], generator=gen).to(w.device, w.dtype)
        route = (torch.full((4, 1), f.expert, device=w.device), torch.ones(4, 1, device=w.device, dtype=w.dtype))
        args = (x, *route)
    else:
        w = f.pred.weight
        width = w.numel() if f.kind == "norm" else f.pred.in_features
        args = (torch.randn(1, 4, width, generator=gen).to(w.device, w.dtype),)
    try:
        y0 = _first(f.check(*args)).float()
    except (TypeError, RuntimeError, ValueError) as e:
        return f"{type(f.check).__name__} could not be run on a test input to verify the fold ({e})"
    _apply(f)
    y1 = _first(f.check(*args)).float()
    if f.kind == "norm":
        y1 = y1 * f.s_pred.to(y1.device)  # the norm's output must come out divided by s
    err = float((y1 - y0).norm() / y0.norm().clamp_min(1e-30))
    if err <= (1e-4 if w.dtype == torch.float32 else 1e-2):
        return None
    _apply(f, inverse=True)
    return (f"{type(f.check).__name__} does not scale linearly with the folded weights "
            f"(relative output change {err:.2g})")


def _apply_checked(model, folds: list[_Fold], check_ids, ref: Tensor, stats: dict) -> None:
    """Fold every scale; folds that change the FP logits are undone and their layers keep RTN."""
    gen = torch.Generator().manual_seed(SEED)
    applied = []
    for f in folds:
        reason = _apply_locally_checked(f, gen)
        if reason is None:
            applied.append(f)
        else:
            _undone(stats, f, reason)
    min_db = min((FOLD_MIN_SQNR_DB.get(c.dtype, 30.0) for f in folds for c in f.consumers),
                 default=FOLD_MIN_SQNR_DB[torch.float32])
    # Folds checked only end to end (v_proj → o_proj) are the first suspects, then all of them.
    for only_unverified in (True, False):
        db = _sqnr(ref, _logits(model, *check_ids))
        if db >= min_db:
            return
        suspects = [f for f in applied if f.check is None or not only_unverified]
        if not suspects:
            continue
        log.warning("AWQ: folding the scales changed the FP logits (SQNR %.1f dB < %.0f dB); undoing %d folds",
                    db, min_db, len(suspects))
        for f in suspects:
            _apply(f, inverse=True)
            _undone(stats, f, f"folding into {f.entry['folded_into']} changed the model's FP logits")
        applied = [f for f in applied if f not in suspects]
    db = _sqnr(ref, _logits(model, *check_ids))
    if db < min_db:
        raise RuntimeError(f"AWQ: undoing every fold left the FP logits at SQNR {db:.1f} dB vs the original; "
                           "the model's weights may be damaged: reload it and use quantize_model (RTN)")


def _undone(stats: dict, f: _Fold, reason: str) -> None:
    stats["groups"] = [e for e in stats["groups"] if e is not f.entry]
    _fallback(stats, f.entry["layers"], reason, logging.WARNING)


def _fallback(stats: dict, names: list[str], reason: str, level: int) -> None:
    for n in names:
        stats["fallback"][n] = reason
        log.log(level, "AWQ: %s keeps plain RTN: %s", n, reason)


def _first(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _sqnr(ref: Tensor, new: Tensor) -> float:
    """SQNR (dB) of ``new`` vs ``ref`` over the positions where ``ref`` is finite; -inf if ``new`` is not."""
    ok = torch.isfinite(ref)
    r, n = ref[ok].double(), new[ok].double()
    if not bool(torch.isfinite(n).all()):
        return -math.inf
    noise = (r - n).pow(2).sum()
    return math.inf if noise == 0 else float(10 * torch.log10(r.pow(2).sum() / noise))
