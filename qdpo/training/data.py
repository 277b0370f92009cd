"""Token sequences (prompt + completion) and right-padded batches.

Completions are kept as the token ids the model generated (stored in the
pairs file), so training sees exactly the answers that were compared; a
completion given only as text is tokenized after the rendered prompt, with
EOS appended. Truncation keeps the start: the completion is cut to fit
``max_length``; an example whose prompt alone fills ``max_length`` is dropped
(and counted by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T] int64
    completion_mask: torch.Tensor  # [B, T] bool: tokens that belong to the completion

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device))

    @property
    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pos, labels, row)``: for every completion token, the position whose
        output predicts it (``[P]`` flat index into ``[B, T]``), the token, and its row."""
        b, t = self.input_ids.shape
        m = self.completion_mask[:, 1:]  # token t+1 is a completion token
        rows, cols = m.nonzero(as_tuple=True)
        return rows * t + cols, self.input_ids[:, 1:][m], rows

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def fit(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]] | None:
    """Truncate keeping the start; None when the prompt leaves no room for one completion token."""
    if len(prompt) >= max_length:
        return None
    return prompt, completion[: max_length - len(prompt)]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-pad ``(prompt_ids, completion_ids)`` pairs into one :class:`Batch`."""
    t = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), t), dtype=torch.long)
    comp = torch.zeros((len(examples), t), dtype=torch.bool)
    for i, (p, c) in enumerate(examples):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        att[i, :n] = 1
        comp[i, len(p):n] = True
    return Batch(ids, att, comp)


def completion_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a plain-string completion, with EOS appended."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix: the index of the first divergent token."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
