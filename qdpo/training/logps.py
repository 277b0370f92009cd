"""Completion log-probs and token-level KL without ever holding ``(B, T, V)`` logits.

The decoder runs once to hidden states ``[B, T, H]``; only the ``P`` positions
that predict a completion token go through the output layer, ``chunk``
positions at a time, and the backward pass recomputes each chunk's logits
instead of storing them. Peak extra memory is ``chunk × V`` fp32 floats
however long the batch is. This is the same trick as a fused
linear-cross-entropy, written for log-probs of the label only (DPO) and for
KL against a teacher's hidden states (KD).

Models whose output layer applies a final soft-capping or logit scale
(e.g. Gemma 2, Cohere) are not handled specially here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdpo.training.data import Batch


MIN_SHARED_PREFIX = 8  # tokens every row must share before the prefix is run once


def base_model(model: nn.Module) -> nn.Module:
    """The decoder a causal LM wraps (``model.base_model``). Where ``base_model_prefix`` names an attribute
    the model does not have (Llama 4's ``language_model``, its decoder being ``model``), transformers gives
    the LM itself back: then the child that holds the input embeddings."""
    base = model.base_model
    if base is not model:
        return base
    emb = model.get_input_embeddings()
    for child in model.children():
        if hasattr(child, "get_input_embeddings") and child.get_input_embeddings() is emb:
            return child
    return base


def decoder_hidden(model, batch: Batch) -> Tensor:
    """Final hidden states ``[B, T, H]`` (after the last norm) of a HF causal LM.

    Shared starts of rows run once: the prefix every row shares (the chat
    template's system prompt) as one row, and, when every row has a partner
    that shares more (a DPO pair's prompt and the common start of its chosen
    and rejected answers), that longer start once per group of rows. Their
    keys and values are reused for the rest of each row. The numbers are a
    whole-row forward's up to float rounding, with or without gradients (they
    flow back through the reuse), for less compute. Positions at padding
    (right of each row's length) hold unspecified values.
    """
    if prefix_sharing_ok(model):
        p = shared_prefix(batch)
        out = _with_row_groups(model, batch, p)
        if out is None and p:
            out = _with_shared_prefix(model, batch, p)
        if out is not None:
            return out
    out = base_model(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state


def shared_prefix(batch: Batch) -> int:
    """Tokens ``P`` that every row of ``batch`` holds identically at its start (0 when fewer than
    :data:`MIN_SHARED_PREFIX`, or when there is one row); at most ``T - 1``."""
    ids, att = batch.input_ids, batch.attention_mask
    if ids.shape[0] < 2 or ids.shape[1] <= MIN_SHARED_PREFIX:
        return 0
    same = ((ids == ids[:1]) & (att == 1)).all(0)  # [T]
    p = int(same.long().cumprod(0).sum())
    p = min(p, ids.shape[1] - 1)
    return p if p >= MIN_SHARED_PREFIX else 0


def row_groups(batch: Batch, p: int) -> tuple[list[int], list[int]] | None:
    """``(group of each row, shared length of each group)`` when every row shares at least
    ``p + MIN_SHARED_PREFIX`` tokens with another row; each group's length leaves every row of it at
    least one token of its own. None otherwise (a lone row, or nothing worth sharing)."""
    from qdpo.training.data import common_prefix

    lengths = batch.attention_mask.sum(1).tolist()
    rows = [batch.input_ids[i, :n].tolist() for i, n in enumerate(lengths)]
    if len(rows) < 4:
        return None
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    groups: list[list[int]] = [[order[0]]]
    shared = [len(rows[order[0]])]
    for prev, i in zip(order, order[1:]):
        cp = common_prefix(rows[prev], rows[i])
        if cp >= p + MIN_SHARED_PREFIX:
            groups[-1].append(i)
            shared[-1] = min(shared[-1], cp)
        else:
            groups.append([i])
            shared.append(len(rows[i]))
    shared = [min(s, min(lengths[i] for i in g) - 1) for g, s in zip(groups, shared)]
    if any(len(g) < 2 for g in groups) or any(s < p + MIN_SHARED_PREFIX for s in shared):
        return None
    group_of = [0] * len(rows)
    for k, g in enumerate(groups):
        for i in g:
            group_of[i] = k
    return group_of, shared


def prefix_sharing_ok(model) -> bool:
    """Whether this model's forward may start from a cache (decoder-only, plain dynamic KV cache) and may
    call each decoder layer more than once (not under activation checkpointing or FSDP2).

    FSDP2 gathers a layer's weights on each call and reduce-scatters its gradients after each call's
    backward: two or three parts cost that many times the communication, and the ranks would have to
    agree on the number of parts. Measured on the CPU (2 ranks, gloo, SmolLM2-135M W4, 4 pairs per rank):
    a step took 1.5x longer with the shared starts than with whole rows; under DDP (whole copies, one
    gradient all-reduce per step) it took 0.9x.
    """
    if sharded(model):
        return False
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False) or getattr(model, "qdpo_no_prefix_sharing", False):
        return False
    return getattr(model, "_qdpo_prefix_ok", True)


def sharded(model) -> bool:
    """Whether FSDP2 shards some of ``model``'s modules (in an initialised process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _new_cache(model):
    """``(cache kwarg name, empty DynamicCache)``, or None when the model's cache is not a plain dynamic one
    (remembered on the model: sliding-window, linear-attention or static caches run whole rows)."""
    import inspect

    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=model.config)
    layers = getattr(cache, "layers", None)
    params = inspect.signature(base_model(model).forward).parameters
    name = "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.x
    if not layers or any(type(layer) is not DynamicLayer for layer in layers) or name not in params:
        model._qdpo_prefix_ok = False
        return None
    return name, cache


def prefix_cache(model, prefix: Tensor, batch_size: int):
    """``(cache kwarg name, cache, prefix hidden [1, P, H])``: the keys and values of ``prefix`` (``[1, P]``
    token ids) computed once and repeated ``batch_size`` times, for a forward or ``generate`` that continues
    from them; None when the model's cache is not a plain dynamic one."""
    got = _new_cache(model)
    if got is None:
        return None
    name, cache = got
    pre = base_model(model)(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True,
                           **{name: cache})
    cache.batch_repeat_interleave(batch_size)
    return name, cache, pre.last_hidden_state


def _with_shared_prefix(model, batch: Batch, p: int) -> Tensor | None:
    """``decoder_hidden`` with the first ``p`` tokens run once; None when the model cannot (see ``prefix_cache``)."""
    ids, att = batch.input_ids, batch.attention_mask
    b = ids.shape[0]
    got = prefix_cache(model, ids[:1, :p], b)
    if got is None:
        return None
    name, cache, h_pre = got
    rest = base_model(model)(input_ids=ids[:, p:], attention_mask=att, use_cache=True, **{name: cache})
    return torch.cat([h_pre.expand(b, -1, -1), rest.last_hidden_state], 1)


def _with_row_groups(model, batch: Batch, p: int) -> Tensor | None:
    """``decoder_hidden`` in three parts: the batch's shared prefix (``p`` tokens, one row), each row group's
    longer shared start (one row per group), each row's own rest. None when :func:`row_groups` finds no
    groups or the model cannot start from a cache.

    Cache layout of row i in group g: ``[prefix p][group start m_g][padding to M][own rest]``; the
    padding is masked and the positions are given explicitly, so each token sees exactly the tokens
    before it in its own row, at the positions a whole-row forward gives them.
    """
    plan = row_groups(batch, p)
    if plan is None:
        return None
    group_of, shared = plan
    got = prefix_cache(model, batch.input_ids[:1, :p], len(shared)) if p else _new_cache(model)
    if got is None:
        return None
    name, cache = got[0], got[1]
    base, ids, dev = base_model(model), batch.input_ids, batch.input_ids.device
    lengths = batch.attention_mask.sum(1).tolist()
    b, t, g = ids.shape[0], ids.shape[1], len(shared)
    first = [group_of.index(k) for k in range(g)]  # a row of each group: its tokens up to shared[k]
    mid_len = [s - p for s in shared]
    m = max(mid_len)
    mid_ids = torch.zeros(g, m, dtype=ids.dtype, device=dev)
    mid_att = torch.zeros(g, m, dtype=batch.attention_mask.dtype, device=dev)
    for k, (r, n) in enumerate(zip(first, mid_len)):
        mid_ids[k, :n], mid_att[k, :n] = ids[r, p:p + n], 1
    ones = torch.ones(g, p, dtype=mid_att.dtype, device=dev)
    mid_pos = (torch.arange(m, device=dev) + p).expand(g, -1)
    h_mid = base(input_ids=mid_ids, attention_mask=torch.cat([ones, mid_att], 1), position_ids=mid_pos,
                 use_cache=True, **{name: cache}).last_hidden_state  # [G, M, H]
    sel = torch.tensor(group_of, device=dev)
    cache.batch_select_indices(sel)
    own = [lengths[i] - shared[group_of[i]] for i in range(b)]
    r = max(own)
    rest_ids = torch.zeros(b, r, dtype=ids.dtype, device=dev)
    rest_att = torch.zeros(b, r, dtype=mid_att.dtype, device=dev)
    rest_pos = torch.zeros(b, r, dtype=torch.long, device=dev)
    for i in range(b):
        s = shared[group_of[i]]
        rest_ids[i, :own[i]], rest_att[i, :own[i]] = ids[i, s:lengths[i]], 1
        rest_pos[i] = torch.arange(r, device=dev) + s
    att = torch.cat([torch.ones(b, p, dtype=mid_att.dtype, device=dev), mid_att[sel], rest_att], 1)
    h_rest = base(input_ids=rest_ids, attention_mask=att, position_ids=rest_pos, use_cache=True,
                  **{name: cache}).last_hidden_state  # [B, R, H]
    # gather every row's hidden states back into the [B, T] layout of the batch
    h_pre = got[2][0] if p else h_mid.new_zeros(0, h_mid.shape[-1])
    src = torch.cat([h_pre, h_mid.reshape(-1, h_mid.shape[-1]), h_rest.reshape(-1, h_rest.shape[-1])])
    index = torch.zeros(b, t, dtype=torch.long)
    for i in range(b):
        k, s, n = group_of[i], shared[group_of[i]], lengths[i]
        index[i, :p] = torch.arange(p)
        index[i, p:s] = p + k * m + torch.arange(s - p)
        index[i, s:n] = p + g * m + i * r + torch.arange(n - s)
    return src[index.to(dev)]


def output_layer(model) -> tuple[Tensor, Tensor | None]:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding layer (not a causal LM?)")
    return head.weight, getattr(head, "bias", None)


def _chunks(n: int, chunk: int):
    for i in range(0, n, chunk):
        yield slice(i, min(i + chunk, n))


class _LabelLogProb(torch.autograd.Function):
    """``log softmax(h Wᵀ + b)[label]`` per row, chunked, logits recomputed in backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk):
        out = h.new_empty(h.shape[0], dtype=torch.float32)
        for c in _chunks(h.shape[0], chunk):
            logits = F.linear(h[c], weight, bias).float()  # [chunk, V]
            out[c] = logits.gather(1, labels[c, None]).squeeze(1) - torch.logsumexp(logits, -1)
        ctx.save_for_backward(h, weight, bias, labels)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        h, weight, bias, labels = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.zeros_like(h) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        for c in _chunks(h.shape[0], ctx.chunk):
            logits = F.linear(h[c], weight, bias).float()
            dlogits = -torch.softmax(logits, -1) * g[c, None]  # d/dlogits of lp[label]
            dlogits.scatter_add_(1, labels[c, None], g[c, None])
            _accumulate(dlogits, h[c], weight, dh, dw, db, c)
        return dh, _cast(dw, weight), _cast(db, bias), None, None


class _TokenKL(torch.autograd.Function):
    """``KL(softmax(t) ‖ softmax(s))`` per row, student ``s = h Wᵀ + b``, teacher ``t = ht Wtᵀ + bt``."""

    @staticmethod
    def forward(ctx, h, weight, bias, h_t, weight_t, bias_t, chunk):
        out = h.new_empty(h.shape[0], dtype=torch.float32)
        for c in _chunks(h.shape[0], chunk):
            ls = torch.log_softmax(F.linear(h[c], weight, bias).float(), -1)
            lt = torch.log_softmax(F.linear(h_t[c], weight_t, bias_t).float(), -1)
            out[c] = (lt.exp() * (lt - ls)).sum(-1)
        ctx.save_for_backward(h, weight, bias, h_t, weight_t, bias_t)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        h, weight, bias, h_t, weight_t, bias_t = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.zeros_like(h) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        for c in _chunks(h.shape[0], ctx.chunk):
            ps = torch.softmax(F.linear(h[c], weight, bias).float(), -1)
            pt = torch.softmax(F.linear(h_t[c], weight_t, bias_t).float(), -1)
            _accumulate((ps - pt) * g[c, None], h[c], weight, dh, dw, db, c)
        return dh, _cast(dw, weight), _cast(db, bias), None, None, None, None


def _accumulate(dlogits, h_c, weight, dh, dw, db, c) -> None:
    if dh is not None:
        dh[c] = (dlogits.to(weight.dtype) @ weight).to(dh.dtype)
    if dw is not None:
        dw += dlogits.t() @ h_c.float()
    if db is not None:
        db += dlogits.sum(0)


def _cast(t, like):
    return None if t is None else t.to(like.dtype)


def label_logps(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int = 1024) -> Tensor:
    """Log-prob ``[P]`` fp32 of each label under the output layer applied to ``h`` ``[P, H]``."""
    return _LabelLogProb.apply(h, weight, bias, labels, chunk)


def token_kl(h, weight, bias, h_teacher, weight_teacher, bias_teacher, chunk: int = 1024) -> Tensor:
    """``KL(teacher ‖ student)`` ``[P]`` fp32 per position; gradients reach the student only."""
    return _TokenKL.apply(h, weight, bias, h_teacher.detach(), weight_teacher.detach(),
                          None if bias_teacher is None else bias_teacher.detach(), chunk)


def completion_hidden(model, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """``(h [P, H], labels [P], row [P])`` at the positions predicting completion tokens."""
    pos, labels, row = batch.targets
    hid = decoder_hidden(model, batch)
    return hid.reshape(-1, hid.shape[-1])[pos], labels, row


def sequence_logps(model, batch: Batch, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Summed completion log-prob ``[B]`` fp32 and completion token counts ``[B]``."""
    h, labels, row = completion_hidden(model, batch)
    w, b = output_layer(model)
    lp = label_logps(h, w, b, labels, chunk)
    n = batch.input_ids.shape[0]
    total = torch.zeros(n, dtype=torch.float32, device=lp.device).index_add(0, row, lp)
    count = torch.zeros(n, dtype=torch.float32, device=lp.device).index_add(0, row, torch.ones_like(lp))
    return total, count
