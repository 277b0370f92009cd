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
from torch import Tensor

from qdpo.training.data import Batch


MIN_SHARED_PREFIX = 8  # tokens every row must share before the prefix is run once


def decoder_hidden(model, batch: Batch) -> Tensor:
    """Final hidden states ``[B, T, H]`` (after the last norm) of a HF causal LM.

    When every row starts with the same tokens (the chat template's system
    prompt; a DPO pair's common prompt), that prefix runs once, as one row,
    and its keys and values are repeated for the rest of the batch: the same
    numbers up to float rounding, with or without gradients (they flow back
    through the repeat), for less compute. Rows are right-padded, so the
    prefix sits at positions ``0..P-1`` of every row.
    """
    p = shared_prefix(batch) if prefix_sharing_ok(model) else 0
    if p:
        out = _with_shared_prefix(model, batch, p)
        if out is not None:
            return out
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
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


def prefix_sharing_ok(model) -> bool:
    """Whether this model's forward may start from a cache (decoder-only, plain dynamic KV cache) and is not
    under a wrapper that must see one forward per step (torch.distributed, activation checkpointing)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False) or getattr(model, "qdpo_no_prefix_sharing", False):
        return False
    return getattr(model, "_qdpo_prefix_ok", True)


def prefix_cache(model, prefix: Tensor, batch_size: int):
    """``(cache kwarg name, cache, prefix hidden [1, P, H])``: the keys and values of ``prefix`` (``[1, P]``
    token ids) computed once and repeated ``batch_size`` times, for a forward or ``generate`` that continues
    from them; None when the model's cache is not a plain dynamic one (remembered on the model)."""
    import inspect

    from transformers.cache_utils import DynamicCache, DynamicLayer

    base = model.base_model
    cache = DynamicCache(config=model.config)
    layers = getattr(cache, "layers", None)
    params = inspect.signature(base.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.x
    if not layers or any(type(layer) is not DynamicLayer for layer in layers) or name not in params:
        model._qdpo_prefix_ok = False  # sliding-window, linear-attention or static caches: whole rows
        return None
    pre = base(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, **{name: cache})
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
    rest = model.base_model(input_ids=ids[:, p:], attention_mask=att, use_cache=True, **{name: cache})
    return torch.cat([h_pre.expand(b, -1, -1), rest.last_hidden_state], 1)


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
