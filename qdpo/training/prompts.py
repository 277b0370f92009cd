"""Prompt sets: reading JSONL, splits, and rendering with the chat template.

A prompt file is JSONL, one object per line, with either ``"prompt"`` (a
string: one user turn) or ``"messages"`` (a list of ``{"role", "content"}``
ending with a user turn), and optionally ``"split"`` (``train``,
``validation`` or ``test``) and ``"id"`` (unique; missing or null:
``line<N>``). Files without splits are split deterministically by ``seed``:
60 % train, 20 % validation, 20 % test.

Rendering: the tokenizer's chat template with the generation prompt when it
has one; otherwise the plain template ``"User: {content}\\nAssistant:"`` per
turn (``"System: ..."`` for a system turn).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

SPLITS = ("train", "validation", "test")
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


class PromptError(ValueError):
    """A user error in a prompt file: printed without a traceback."""


@dataclass
class Prompt:
    id: str
    messages: list[dict]  # [{"role": ..., "content": ...}], ending with a user turn
    split: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The last user turn (for reports)."""
        return self.messages[-1]["content"]


def default_prompts_path() -> Path:
    return Path(str(resources.files("qdpo") / "data" / "prompts.jsonl"))


def _parse_line(obj, where: str, index: int) -> Prompt:
    if not isinstance(obj, dict):
        raise PromptError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in PLAIN_ROLES for m in msgs)
        if not ok:
            raise PromptError(f"{where}: 'messages' must be a non-empty list of {{role, content}} with roles "
                              f"{sorted(PLAIN_ROLES)}")
        if msgs[-1]["role"] != "user":
            raise PromptError(f"{where}: the last message must be a user turn (the answer is generated)")
    elif isinstance(obj.get("prompt"), str):
        msgs = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise PromptError(f"{where}: needs a string 'prompt' or a list 'messages'")
    if not msgs[-1]["content"].strip():
        raise PromptError(f"{where}: the prompt is empty")
    split = obj.get("split", "")
    if split and split not in SPLITS:
        raise PromptError(f"{where}: split {split!r} is not one of {SPLITS}")
    pid = f"line{index + 1}" if obj.get("id") is None else str(obj["id"])  # null: no id (not the id 'None')
    for what, text in (("the id", pid), *((f"message {k + 1}", m["content"]) for k, m in enumerate(msgs))):
        try:  # JSON may escape half of a UTF-16 pair: no character, which tokenizers and UTF-8 files refuse
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(f"{where}: {what} holds '\\u{ord(text[e.start]):04x}' (character {e.start + 1}), half "
                              "of a UTF-16 surrogate pair and no character; escape both halves or write the "
                              "character itself") from None
    extra = {k: v for k, v in obj.items() if k not in ("messages", "prompt", "split", "id")}
    return Prompt(pid, msgs, split, extra)


def read_prompts(path: str | Path, flag: str = "--prompts") -> list[Prompt]:
    """Read a prompt JSONL file; one clear error (with the line number) for each problem. ``flag``: the option
    that named the file, for the message."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file {path} not found; pass {flag} PATH to a JSONL file"
                          + (" or 'default'" if flag == "--prompts" else ""))
    prompts, lines = [], {}  # id -> its line
    with path.open("rb") as f:  # decoded line by line: an error names its line
        for i, raw in enumerate(f):
            where = f"{path}:{i + 1}"
            try:  # utf-8-sig: a BOM (Windows editors, PowerShell) starts no JSON object
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")
            except UnicodeDecodeError as e:
                raise PromptError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start + 1} of the line); save "
                                  "the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            p = _parse_line(obj, where, i)
            if p.id in lines:
                raise PromptError(f"{where}: id {p.id!r} is also the id of line {lines[p.id]} (a line without an id "
                                  "is named line<N>); give every prompt its own id")
            lines[p.id] = i + 1
            prompts.append(p)
    if not prompts:
        raise PromptError(f"prompt file {path} holds no prompts")
    return prompts


def load_prompt_set(source: str, seed: int = 0) -> list[Prompt]:
    """The prompts of ``source`` ("default" or a path), each with a split."""
    prompts = read_prompts(default_prompts_path() if source in ("", "default") else source)
    unsplit = [p for p in prompts if not p.split]
    if unsplit:
        rng = random.Random(seed)
        order = list(range(len(unsplit)))
        rng.shuffle(order)
        n = len(unsplit)
        for rank, i in enumerate(order):
            unsplit[i].split = "train" if rank < 0.6 * n else ("validation" if rank < 0.8 * n else "test")
    return prompts


def split(prompts: list[Prompt], name: str, limit: int = 0) -> list[Prompt]:
    out = [p for p in prompts if p.split == name]
    return out[:limit] if limit else out


def render(tokenizer, messages: list[dict]) -> str:
    """The prompt text up to where the assistant's answer starts."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    turns = [f"{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join(turns) + "\nAssistant:"


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the rendered prompt.

    A chat template writes its own special tokens, so none are added; the
    plain template gets the special tokens the tokenizer puts before a text
    (its BOS), never those after it: an EOS there (a tokenizer that appends
    one) would end the prompt before the answer starts.
    """
    text = render(tokenizer, messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        return ids
    full = tokenizer(text)["input_ids"]
    for k in range(len(full) - len(ids) + 1):  # where the text sits between the added tokens
        if full[k:k + len(ids)] == ids:
            return full[:k] + ids
    return full
