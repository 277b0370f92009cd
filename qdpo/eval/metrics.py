"""Faithfulness of a quantized model to its full-precision (FP) original.

An *example* is ``(prompt_ids, answer_ids)``: token ids of a rendered prompt
and the FP model's greedy answer to it. Every metric is measured at the
*answer positions*: the positions whose output predicts an answer token
given the prompt and the answer prefix (teacher forcing). With ``P`` such
positions, FP logits ``z_f`` and quantized logits ``z_q`` (``[V]`` each),
``p = softmax(z)``, and ``y`` the FP answer token:

* ``flip_rate``: ``mean[argmax z_q != argmax z_f]`` — the quantized model
  would pick another next token than the FP model; ``top1_agreement = 1 - flip_rate``
  (llama.cpp's "same top p"). ``argmax`` is taken on the logits and a tie goes
  to the lowest token id, as in greedy decoding: a tie between the FP token and
  a lower id counts as a flip;
* ``kl``: ``mean KL(p_f ‖ p_q)`` in nats, exact over the whole vocabulary;
* ``nll``/``ppl``: the quantized model's mean ``-log p_q(y)`` and its exp (inf past float range);
  ``fp_ppl`` the same for the FP model, ``ppl_ratio = ppl / fp_ppl``;
* ``delta_p_rms``: ``sqrt(mean (p_q(y) - p_f(y))²)`` (llama.cpp's "Δp RMS");
* generation: first divergence, exact match and ROUGE-L of the quantized
  model's own greedy answers against the FP answers, and ``fp_nll``, the FP
  model's mean NLL of the quantized answers ("the FP model as judge").

Memory: the decoder runs to hidden states ``[B, T, H]``; only the answer
positions go through the output layer, ``chunk`` positions at a time, so no
``(B, T, V)`` logits ever exist (peak extra ``2 × chunk × V`` fp32 floats).
Everything runs under ``torch.no_grad()`` in eval mode with quantized layers
on a cached ŵ (:class:`~qdpo.quant.linear.frozen_weights`); each model's
``training`` flag is restored afterwards. Examples are batched by length (to
pad little); per-position outputs come back in example order. Means are
pooled over positions (token-weighted), not averaged per example.
"""

from __future__ import annotations

import math
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from qdpo.quant.linear import frozen_weights
from qdpo.training.data import Batch, collate, common_prefix
from qdpo.training.logps import completion_hidden, final_logits, label_logps, logit_transform, output_layer

Example = tuple[list[int], list[int]]


@dataclass
class FPTargets:
    """The FP model's teacher-forced top-1 tokens, computed once and reused (e.g. every validation check)."""

    argmax: Tensor  # [P] int64 (CPU): FP top-1 token at each answer position, examples concatenated in order
    margin: Tensor  # [P] fp32 (CPU): FP top-1 minus top-2 logit at each answer position
    offsets: Tensor  # [n + 1] int64: example i owns positions offsets[i]:offsets[i + 1]

    @property
    def num_examples(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def example(self, i: int) -> tuple[Tensor, Tensor]:
        """``(argmax, margin)`` of example ``i``, one entry per answer token."""
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.argmax[s:e], self.margin[s:e]


# ---------------------------------------------------------------------------- plumbing
def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _inference(*models):
    """no_grad, eval mode and cached ŵ for each distinct model; training flags restored on exit."""
    unique = list({id(m): m for m in models}.values())
    modes = [m.training for m in unique]
    try:
        with torch.no_grad(), ExitStack() as stack:
            for m in unique:
                m.eval()
                stack.enter_context(frozen_weights(m))
            yield
    finally:
        for m, mode in zip(unique, modes):
            m.train(mode)


def _check_examples(examples: list[Example], what: str = "examples") -> None:
    if not examples:
        raise ValueError(f"{what}: no examples to evaluate")
    for i, (prompt, _) in enumerate(examples):
        if not prompt:
            raise ValueError(f"{what}[{i}] has an empty prompt: the first answer token needs a position that "
                             "predicts it; render the prompt with the chat template (or at least a BOS token)")
    if not any(answer for _, answer in examples):
        raise ValueError(f"{what}: every answer is empty, so there is no answer position to evaluate")


def _batches(examples: list[Example], batch_size: int, pad_id: int, desc: str, disable: bool):
    """``(indices, Batch)`` over length-sorted batches (sorting keeps the padding small)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
    with tqdm(total=len(examples), desc=desc, unit="example", disable=disable) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            yield idx, collate([examples[i] for i in idx], pad_id)
            bar.update(len(idx))


def _head(model, examples: list[Example]) -> tuple[Tensor, Tensor | None, tuple[float, float | None]]:
    """Output-layer weight ``[V, H]``, bias, and the model's logit scale and soft-capping (``logit_transform``,
    found on the first example); a quantized head contributes its ŵ, not its latent weight."""
    prompt, answer = examples[0]
    return (*output_layer(model), logit_transform(model, prompt + answer))


def _hidden(model, batch: Batch) -> tuple[Tensor, Tensor]:
    """Hidden states ``[P, H]`` at the answer positions (row-major: example by example) and labels ``[P]``."""
    h, labels, _ = completion_hidden(model, batch.to(_device(model)))
    return h, labels


def _check_hidden(hidden: list[Tensor] | None, examples: list[Example]) -> None:
    if hidden is None:
        return
    bad = [i for i, (h, (_, a)) in enumerate(zip(hidden, examples)) if h.shape[0] != len(a)]
    if len(hidden) != len(examples) or bad:
        raise ValueError(f"fp_hidden holds {len(hidden)} entries for {len(examples)} examples"
                         + (f" and example {bad[0]}'s has {hidden[bad[0]].shape[0]} rows for "
                            f"{len(examples[bad[0]][1])} answer tokens" if bad else "")
                         + "; pass one [len(answer), H] tensor per example (greedy(..., hidden=...))")


def _fp_hidden(fp_model, batch: Batch, idx: list[int], examples: list[Example],
               fp_hidden: list[Tensor] | None) -> tuple[Tensor, Tensor]:
    """The FP model's answer-position hidden states and labels of a batch: given (``fp_hidden``) or computed."""
    if fp_hidden is None:
        return _hidden(fp_model, batch)
    dev = _device(fp_model)
    labels = torch.tensor([t for i in idx for t in examples[i][1]], dtype=torch.long, device=dev)
    return torch.cat([fp_hidden[i] for i in idx]).to(dev), labels


def _chunks(n: int, chunk: int):
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    for i in range(0, n, chunk):
        yield slice(i, min(i + chunk, n))


def _logits(h: Tensor, head: tuple, c: slice) -> Tensor:
    """The model's logits ``[chunk, V]`` fp32 (its scale and soft-capping applied) at the rows ``c`` of ``h``."""
    # h in the head's dtype: given FP hidden states are fp32 (greedy's), a bf16 model's head is not
    return final_logits(F.linear(h[c].to(head[0].dtype), head[0], head[1]).float(), *head[2])[0]


def _exp(x: float) -> float:
    """``math.exp``, but inf past the float range (a diverged model's NLL of hundreds of nats) instead of raising."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _scatter(out: list, idx: list[int], lengths: list[int], values: Tensor) -> None:
    """Split the per-position ``values`` of one batch back into per-example pieces of ``out``."""
    for i, piece in zip(idx, values.split([lengths[i] for i in idx])):
        out[i] = piece


# ---------------------------------------------------------------------------- teacher forcing
def fp_targets(fp_model, examples: list[Example], batch_size: int = 8, chunk: int = 1024,
               disable: bool = False, pad_id: int = 0, fp_hidden: list[Tensor] | None = None) -> FPTargets:
    """The FP model's top-1 token and top-1 − top-2 logit margin at every answer position.

    ``fp_hidden``: the FP model's hidden states at each example's answer positions
    (``[len(answer), H]``, e.g. kept while decoding the answers); then only its
    output layer runs.
    """
    _check_examples(examples)
    _check_hidden(fp_hidden, examples)
    lengths = [len(a) for _, a in examples]
    arg = [torch.empty(0, dtype=torch.long)] * len(examples)  # empty answers keep these
    mar = [torch.empty(0)] * len(examples)
    with _inference(fp_model):
        head = _head(fp_model, examples)
        for idx, batch in _batches(examples, batch_size, pad_id, "FP targets", disable):
            h, _ = _fp_hidden(fp_model, batch, idx, examples, fp_hidden)
            if h.shape[0] == 0:  # a batch of empty answers
                continue
            a, m = [], []
            for c in _chunks(h.shape[0], chunk):
                z = _logits(h, head, c)
                top2 = z.topk(2, dim=-1).values
                a.append(z.argmax(-1))
                m.append(top2[:, 0] - top2[:, 1])
            _scatter(arg, idx, lengths, torch.cat(a).cpu())
            _scatter(mar, idx, lengths, torch.cat(m).cpu())
    offsets = torch.tensor([0] + lengths, dtype=torch.long).cumsum(0)
    return FPTargets(torch.cat(arg), torch.cat(mar), offsets)


def flip_rate(q_model, examples: list[Example], targets: FPTargets, batch_size: int = 8, chunk: int = 1024,
              disable: bool = False, pad_id: int = 0) -> float:
    """Fraction of answer positions where ``q_model``'s top-1 token differs from the FP one (only q runs)."""
    _check_examples(examples)
    lengths = [len(a) for _, a in examples]
    if targets.num_examples != len(examples) or targets.offsets.diff().tolist() != lengths:
        raise ValueError(f"targets were computed for {targets.num_examples} examples / {targets.num_tokens} answer "
                         f"tokens but {len(examples)} examples / {sum(lengths)} tokens were given; call "
                         "fp_targets on the same examples")
    flips = torch.zeros((), dtype=torch.long, device=_device(q_model))
    with _inference(q_model):
        head = _head(q_model, examples)
        for idx, batch in _batches(examples, batch_size, pad_id, "flip rate", disable):
            h, _ = _hidden(q_model, batch)
            want = torch.cat([targets.example(i)[0] for i in idx]).to(h.device)
            for c in _chunks(h.shape[0], chunk):
                flips += (_logits(h, head, c).argmax(-1) != want[c]).sum()
    return flips.item() / targets.num_tokens


def teacher_forced(fp_model, q_model, examples: list[Example], batch_size: int = 8, chunk: int = 1024,
                   disable: bool = False, pad_id: int = 0, fp_cache: dict | None = None,
                   fp_hidden: list[Tensor] | None = None) -> dict:
    """Flip rate, top-1 agreement, KL(FP ‖ q), perplexity and Δp RMS on the FP answers.

    Returns floats ``flip_rate``, ``top1_agreement``, ``kl`` (nats/token), ``nll``, ``ppl``,
    ``fp_ppl``, ``ppl_ratio``, ``delta_p_rms``; the int ``tokens``; and per-position CPU
    tensors in example order for the flip-vs-margin plot: ``margins`` ``[P]`` fp32 (FP
    top-1 − top-2 logit) and ``flipped`` ``[P]`` bool. ``fp_model`` may be ``q_model`` (one
    forward then). ``fp_cache``: a dict kept by the caller across calls on the same examples and
    batch size; it holds the FP hidden states at answer positions (``P × H`` floats, small), so
    the FP decoder runs once however many models are compared. ``fp_hidden``: those hidden
    states given per example (as for :func:`fp_targets`); then the FP decoder does not run.
    """
    _check_examples(examples)
    _check_hidden(fp_hidden, examples)
    lengths = [len(a) for _, a in examples]
    dev = _device(q_model)
    sums = torch.zeros(5, dtype=torch.float64, device=dev)  # flips, kl, q nll, fp nll, Δp²
    margins = [torch.empty(0)] * len(examples)  # empty answers keep these
    flipped = [torch.empty(0, dtype=torch.bool)] * len(examples)
    with _inference(fp_model, q_model):
        head_f, head_q = _head(fp_model, examples), _head(q_model, examples)
        for idx, batch in _batches(examples, batch_size, pad_id, "teacher-forced eval", disable):
            key = tuple(idx)
            if fp_cache is not None and key in fp_cache:
                h_f, labels = fp_cache[key]
            else:
                h_f, labels = _fp_hidden(fp_model, batch, idx, examples, fp_hidden)
                if fp_cache is not None:
                    fp_cache[key] = (h_f, labels)
            h_q = h_f if q_model is fp_model else _hidden(q_model, batch)[0]
            if h_q.shape[0] == 0:  # a batch of empty answers
                continue
            labels = labels.to(dev)[:, None]
            m_all, f_all = [], []
            for c in _chunks(h_q.shape[0], chunk):
                z_f = _logits(h_f, head_f, c).to(dev)
                z_q = _logits(h_q, head_q, c)
                lf, lq = torch.log_softmax(z_f, -1), torch.log_softmax(z_q, -1)
                top2 = z_f.topk(2, dim=-1).values
                flip = z_q.argmax(-1) != z_f.argmax(-1)  # logits, as fp_targets: log_softmax can round a near-tie equal
                lf_y, lq_y = lf.gather(1, labels[c]).squeeze(1), lq.gather(1, labels[c]).squeeze(1)
                sums += torch.stack([flip.sum(), (lf.exp() * (lf - lq)).sum(), -lq_y.sum(), -lf_y.sum(),
                                     (lq_y.exp() - lf_y.exp()).pow(2).sum()]).double()
                m_all.append(top2[:, 0] - top2[:, 1])
                f_all.append(flip)
            _scatter(margins, idx, lengths, torch.cat(m_all).cpu())
            _scatter(flipped, idx, lengths, torch.cat(f_all).cpu())
    n = sum(lengths)
    flips, kl, nll, fp_nll, dp2 = (s / n for s in sums.tolist())
    return {
        "flip_rate": flips, "top1_agreement": 1.0 - flips, "kl": kl, "nll": nll, "ppl": _exp(nll),
        "fp_ppl": _exp(fp_nll), "ppl_ratio": _exp(nll - fp_nll), "delta_p_rms": math.sqrt(dp2),
        "tokens": n, "margins": torch.cat(margins), "flipped": torch.cat(flipped),
    }


# ---------------------------------------------------------------------------- generation
def rouge_l(a_words: list[str], b_words: list[str]) -> float:
    """ROUGE-L F1 (symmetric): ``2 · LCS / (len(a) + len(b))``; 1.0 for two empty sequences."""
    if not a_words and not b_words:
        return 1.0
    if not a_words or not b_words:
        return 0.0
    prev = [0] * (len(b_words) + 1)  # LCS lengths of a[:i] against every prefix of b, one row at a time
    for x in a_words:
        row = [0]
        for j, y in enumerate(b_words):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return 2.0 * prev[-1] / (len(a_words) + len(b_words))


# Scripts written without spaces between words (Chinese, Japanese kana and kanji): each character is a word,
# as ROUGE is usually computed for them; otherwise a whole sentence would be one word and ROUGE-L all or nothing.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def words(text: str) -> list[str]:
    """Lower-cased words of ``text``, punctuation dropped; each CJK character a word of its own."""
    return WORD.findall(text.lower())


def _words(tokenizer, ids: list[int]) -> list[str]:
    """:func:`words` of the decoded text (token ids as words without a tokenizer)."""
    if tokenizer is None:
        return [str(t) for t in ids]
    return words(tokenizer.decode(ids, skip_special_tokens=True))


def _pad_id(tokenizer) -> int:
    for pid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(pid, int):
            return pid
    return 0


def mean_nll(model, examples: list[Example], batch_size: int = 8, chunk: int = 1024, disable: bool = False,
             pad_id: int = 0, desc: str = "NLL") -> float:
    """``model``'s mean per-token NLL (nats) of the answers given the prompts, pooled over tokens."""
    _check_examples(examples)
    total = torch.zeros((), dtype=torch.float64, device=_device(model))
    with _inference(model):
        w, b, transform = _head(model, examples)
        for _, batch in _batches(examples, batch_size, pad_id, desc, disable):
            h, labels = _hidden(model, batch)
            total -= label_logps(h, w, b, labels, chunk, transform).double().sum()
    return total.item() / sum(len(a) for _, a in examples)


def generation_metrics(fp_model, examples: list[Example], q_answers: list[list[int]], tokenizer,
                       batch_size: int = 8, chunk: int = 1024, disable: bool = False,
                       pad_id: int | None = None, fp_nll: float | None = None) -> dict:
    """Compare the quantized model's greedy answers ``q_answers`` with the FP answers of ``examples``.

    Returns ``first_divergence`` (mean common-prefix length, tokens), ``exact_match`` (fraction),
    ``rouge_l`` (mean word-level ROUGE-L F1 of the decoded texts; CJK per character, :func:`words`),
    ``fp_nll`` (the FP model's mean per-token NLL of the non-empty quantized answers, nats; NaN if all are empty),
    ``answer_tokens`` / ``fp_answer_tokens`` (mean lengths), ``empty_answers`` and ``examples`` (counts).
    ``tokenizer`` may be ``None``: ROUGE-L then treats token ids as words. ``fp_nll`` may be
    passed when already known (the FP model's own answers: its teacher-forced ``nll``).
    """
    if len(q_answers) != len(examples):
        raise ValueError(f"{len(q_answers)} quantized answers for {len(examples)} examples; "
                         "pass one answer per example, in order")
    if not examples:
        raise ValueError("examples: no examples to evaluate")
    fp_answers = [a for _, a in examples]
    n = len(examples)
    judged = [(p, q) for (p, _), q in zip(examples, q_answers) if q]
    pid = _pad_id(tokenizer) if pad_id is None else pad_id
    if fp_nll is None:
        fp_nll = mean_nll(fp_model, judged, batch_size, chunk, disable, pid, "FP judge") if judged else math.nan
    return {
        "first_divergence": sum(common_prefix(q, f) for q, f in zip(q_answers, fp_answers)) / n,
        "exact_match": sum(q == f for q, f in zip(q_answers, fp_answers)) / n,
        "rouge_l": sum(rouge_l(_words(tokenizer, q), _words(tokenizer, f))
                       for q, f in zip(q_answers, fp_answers)) / n,
        "fp_nll": fp_nll,
        "answer_tokens": sum(len(q) for q in q_answers) / n,
        "fp_answer_tokens": sum(len(f) for f in fp_answers) / n,
        "empty_answers": n - len(judged),
        "examples": n,
    }
