"""Batched greedy decoding with a KV cache (``transformers.generate``).

Prompts are left-padded into batches; each answer is the generated ids up to
and including the first EOS (or ``max_new_tokens`` ids). Every step takes the
argmax of the model's logits: logit processors a checkpoint's
``generation_config`` names (a repetition penalty, a minimum length, banned or
forced tokens) are turned off (:data:`ARGMAX_ONLY`), as token flips and the
FP model's targets are argmaxes of the logits too. Quantized layers
run on a cached ŵ during decoding (``frozen_weights``), so the weights are
not re-quantized at every step.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from tqdm.auto import tqdm

from qdpo.quant.linear import frozen_weights
from qdpo.training.data import common_prefix
from qdpo.training.logps import base_model


# generate's options that would make a step's token other than the logits' argmax (or end an answer elsewhere than
# at EOS or max_new_tokens), each set to its no-op; a None here overrides what the checkpoint's generation_config says
ARGMAX_ONLY = dict(repetition_penalty=None, encoder_repetition_penalty=None, no_repeat_ngram_size=None,
                   encoder_no_repeat_ngram_size=None, bad_words_ids=None, sequence_bias=None, suppress_tokens=None,
                   begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None, min_length=None,
                   min_new_tokens=None, exponential_decay_length_penalty=None, stop_strings=None, max_time=None,
                   guidance_scale=None, watermarking_config=None, num_return_sequences=1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p, dtype=torch.long)
        att[i, t - len(p):] = 1
    return ids, att


def cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    return ids


def eos_ids(model, tokenizer) -> set[int]:
    out = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            out.add(src)
        elif isinstance(src, (list, tuple)):
            out.update(int(x) for x in src)
    return out


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16,
           desc: str = "generate", disable: bool = False, with_logps: bool = False, hidden: list | None = None):
    """Greedy answers (token ids) for tokenized prompts, in order.

    With ``with_logps`` also returns each answer's summed log-prob under the
    model (fp32, from the decoding logits): the reference log-prob of an answer
    the model wrote itself, without a second forward pass.

    ``hidden``: a list to fill, in prompt order, with each answer's final hidden
    states ``[len(answer), H]`` (fp32, CPU): the decoder's output (the output
    layer's input, but for MiniCPM3, which scales it in between) at the
    positions that predicted the answer tokens. They are what a teacher-forced
    forward pass over prompt + answer gives at those positions (up to float
    rounding), so the FP model's KD targets and evaluation targets come with
    decoding instead of a second pass.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_ids(model, tokenizer)
    # sort by length so batches pad little; restore order at the end
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, list[int]] = {}
    logps: dict[int, float] = {}
    was_training = model.training
    states: dict[int, torch.Tensor] = {}
    # at the last position of each decoding step: the decoder's output, as completion_hidden takes it, and the
    # output layer's input, the same but where the causal LM scales it between (MiniCPM3) or calls a part of
    # the decoder itself (OPT calls model.decoder, not model): then the decoder's output never comes
    steps: list[torch.Tensor] = []
    head_in: list[torch.Tensor] = []
    with ExitStack() as stack:
        model.eval()
        stack.callback(model.train, was_training)  # back in its mode also when decoding fails
        hook = None
        if hidden is not None:
            hook = base_model(model).register_forward_hook(
                lambda _m, _a, out: steps.append(out[0][:, -1].float().cpu()))
            stack.callback(hook.remove)
            head_hook = model.get_output_embeddings().register_forward_pre_hook(
                lambda _m, args: head_in.append(args[0][:, -1].float().cpu()))
            stack.callback(head_hook.remove)
        stack.enter_context(frozen_weights(model))
        bar = stack.enter_context(tqdm(total=len(prompts), desc=desc, unit="prompt", disable=disable))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, att, cache = _inputs(model, [prompts[i] for i in idx], pad, device, max_new_tokens)
            steps.clear()
            head_in.clear()
            # use_cache: a checkpoint saved from gradient-checkpointed training says False; generate would then rerun
            # the whole sequence at every step, and after a shared prefix's cache decode other tokens
            out = model.generate(
                input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1, use_cache=True,
                pad_token_id=pad, eos_token_id=sorted(eos) or None, **ARGMAX_ONLY,
                return_dict_in_generate=True, output_logits=with_logps, **cache,
            )
            new = out.sequences[:, ids.shape[1]:]
            step_lp = _token_logps(out.logits, new) if with_logps else None  # [B, T] fp32
            seq = torch.stack(steps if len(steps) == len(head_in) else head_in, 1) if hook is not None else None
            for row, i in enumerate(idx):
                answers[i] = cut_at_eos(new[row].tolist(), eos)
                if with_logps:
                    logps[i] = step_lp[row, : len(answers[i])].sum().item()
                if hook is not None:
                    states[i] = seq[row, : len(answers[i])].clone()
            bar.update(len(idx))
    if hidden is not None:
        hidden[:] = [states[i] for i in range(len(prompts))]
    ordered = [answers[i] for i in range(len(prompts))]
    return (ordered, [logps[i] for i in range(len(prompts))]) if with_logps else ordered


def _inputs(model, prompts: list[list[int]], pad_id: int, device, max_new_tokens: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(input_ids, attention_mask, cache kwargs)`` of one generation batch.

    Prompts that share a start (the chat template's system prompt) are laid
    out as ``[shared prefix][left padding][rest]``: the prefix's keys and
    values are computed once and handed to ``generate`` as its cache, and
    the positions (from the attention mask) are those of plain left padding.
    Otherwise plain left padding, and no cache; so too where the model has sliding-window layers and the
    prompts with their ``max_new_tokens`` answers would not fit in the window
    (``qdpo.training.logps.fits_window``).
    """
    from qdpo.training.logps import MIN_SHARED_PREFIX, fits_window, prefix_cache, prefix_sharing_ok, sharded

    p = min(len(x) for x in prompts) - 1  # every row keeps at least one token to prefill
    for x in prompts[1:]:
        p = min(p, common_prefix(prompts[0], x))
    width = max(len(x) for x in prompts) + max_new_tokens
    if len(prompts) < 2 or p < MIN_SHARED_PREFIX or not prefix_sharing_ok(model) or sharded(model) \
            or not fits_window(model, width):
        ids, att = left_pad(prompts, pad_id)
        return ids.to(device), att.to(device), {}
    prefix = torch.tensor([prompts[0][:p]], dtype=torch.long, device=device)
    got = prefix_cache(model, prefix, len(prompts))
    if got is None:
        ids, att = left_pad(prompts, pad_id)
        return ids.to(device), att.to(device), {}
    name, cache, _ = got
    rest, rest_att = left_pad([x[p:] for x in prompts], pad_id)
    ids = torch.cat([prefix.expand(len(prompts), -1), rest.to(device)], 1)
    att = torch.cat([torch.ones_like(ids[:, :p]), rest_att.to(device)], 1)
    # generate refuses a cache beside the cache_implementation a checkpoint's generation_config may name
    return ids, att, {name: cache, "cache_implementation": None}


def _token_logps(step_logits: tuple, tokens: torch.Tensor) -> torch.Tensor:
    """Log-prob ``[B, T]`` of each generated token under the logits of its step."""
    cols = [torch.log_softmax(z.float(), -1).gather(1, tokens[:, t, None]).squeeze(1)
            for t, z in enumerate(step_logits)]
    return torch.stack(cols, 1)
