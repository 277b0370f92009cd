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


def decoder_hidden(model, batch: Batch) -> Tensor:
    """Final hidden states ``[B, T, H]`` (after the last norm) of a HF causal LM."""
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state


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
