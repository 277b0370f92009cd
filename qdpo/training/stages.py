"""Pipeline stages of ``python -m qdpo.train``, each writing one artifact to the run directory.

========================  ==================================================================
artifact                  stage
========================  ==================================================================
``answers/fp.jsonl``      FP greedy answers for every prompt used (train, validation, test)
``answers/fp_hidden.*``   the FP model's final hidden states at each answer position, kept while
                          decoding (safetensors): KD targets and evaluation targets without
                          another FP forward pass (recomputed when missing)
``initial/``              the initial quantized model (RTN or AWQ), latent weights + grid
``answers/initial.jsonl`` the initial quantized model's greedy answers (train and test)
``pairs.jsonl``           TRL preference pairs (prompt / chosen / rejected) + token ids,
                          first-divergence index and reference log-probs
========================  ==================================================================

A stage whose artifact exists is loaded instead of recomputed (``--resume``).
Every artifact is written under a temporary name and renamed.

Under ``torchrun`` the greedy answers and the reference log-probs are split
across the ranks by prompt (``distributed.shard_map``) and gathered; rank 0
writes each artifact while the others wait, then read it.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qdpo.quant import QuantSpec, quantize_model
from qdpo.quant.experts import fused_expert_tensors
from qdpo.quant.model import DEFAULT_EXCLUDE, quantizable_layers
from qdpo.training import distributed as D
from qdpo.training.config import ConfigError
from qdpo.training.data import collate, common_prefix, fit
from qdpo.training.generate import greedy
from qdpo.training.logps import sequence_logps
from qdpo.training.prompts import Prompt, PromptError, prompt_ids
from qdpo.training.trainer import Example

log = logging.getLogger("qdpo.train")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class ArtifactError(ValueError):
    """An artifact of the run directory that cannot be read back (edited or cut since it was written)."""


def read_artifact(path: Path, keys: tuple[str, ...]) -> list[dict]:
    """The rows of an artifact a stage wrote earlier; a line that is not JSON or lacks one of ``keys`` (the file
    was edited or cut by hand: the stage writes it whole) is one :class:`ArtifactError` naming it and the fix."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        lines, bad = [], f"not UTF-8 ({e.reason} at byte {e.start})"
    else:
        bad = None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            bad = f"line {n} is not JSON ({e})"
            break
        missing = [k for k in keys if k not in row] if isinstance(row, dict) else ["its fields"]
        if missing:
            bad = f"line {n} lacks {', '.join(missing)}"
            break
        rows.append(row)
    if bad:
        raise ArtifactError(f"{path} is damaged ({bad}); it was changed after this run wrote it: delete it and "
                            "rerun with --resume to have it rebuilt, or use --overwrite to start the run again")
    return rows


def publish_jsonl(path: Path, rows: list[dict]) -> list[dict]:
    """Rank 0 writes ``rows``; the other ranks wait, then read the file (one source of truth)."""
    D.on_main(lambda: write_jsonl(path, rows))
    return rows if D.is_main() else read_jsonl(path)


# ----------------------------------------------------------------------------- prompts
def tokenize_prompts(tokenizer, prompts: list[Prompt], max_length: int) -> tuple[list[Prompt], list[list[int]], int]:
    """Token ids of each rendered prompt; prompts that leave no room for an answer are dropped."""
    from jinja2.exceptions import TemplateError

    kept, ids, dropped = [], [], 0
    for p in prompts:
        try:
            t = prompt_ids(tokenizer, p.messages)
        except TemplateError as e:  # e.g. raise_exception('System role not supported') in Gemma's template
            raise PromptError(f"prompt {p.id!r}: the tokenizer's chat template refuses its messages ({e}); write "
                              "them as that template accepts (without a system role: put the system text into the "
                              "first user turn)") from None
        if fit(t, [0], max_length) is None:
            dropped += 1
            continue
        kept.append(p)
        ids.append(t)
    if dropped:
        log.warning("%d prompt(s) longer than --max-length %d were dropped", dropped, max_length)
    return kept, ids, dropped


# ----------------------------------------------------------------------------- answers
def answers(path: Path, model, tokenizer, prompts: list[Prompt], ids: list[list[int]], cfg, desc: str,
            with_logps: bool = False, hidden_path: Path | None = None) -> dict:
    """``{prompt id: answer ids}`` (and ``{id: summed log-prob}`` with ``with_logps``).

    Loaded from ``path`` when it covers every prompt, else generated and written.
    With ``hidden_path``, a fresh generation also writes each answer's final
    hidden states there (``load_hidden`` reads them back).
    """
    if path.exists():
        rows = read_artifact(path, ("id", "answer_ids"))
        have = {r["id"] for r in rows}  # once: a set per prompt made resuming quadratic in the prompts
        if all(p.id in have for p in prompts) and (not with_logps or "logp" in rows[0]):
            return _answer_maps(rows, with_logps)

    def generate(part: list[list[int]]) -> list:
        hidden = [] if hidden_path is not None else None
        out = greedy(model, tokenizer, part, cfg.max_new_tokens, cfg.gen_batch_size, desc=desc, with_logps=with_logps,
                     disable=not D.is_main(), hidden=hidden)
        cols = (*out, hidden) if with_logps else (out, hidden)
        return list(zip(*cols)) if hidden is not None else (list(zip(*out)) if with_logps else out)

    results = D.shard_map(generate, ids, key=len)  # one process: generate(ids)
    if hidden_path is not None:  # (answer, [logp,] hidden) per prompt
        D.on_main(lambda: _save_hidden(hidden_path, {p.id: r[-1] for p, r in zip(prompts, results)}))
        results = [r[:-1] if with_logps else r[0] for r in results]
    answers_, logps = ([r[0] for r in results], [r[1] for r in results]) if with_logps else (results, None)
    rows = [{"id": p.id, "split": p.split, "answer": tokenizer.decode(a, skip_special_tokens=True),
             "answer_ids": a, **({"logp": logps[i]} if with_logps else {})}
            for i, (p, a) in enumerate(zip(prompts, answers_))]
    return _answer_maps(publish_jsonl(path, rows), with_logps)


# fp_hidden's tensors are keyed "id:<prompt id>" (marked in the file's metadata): safetensors reserves the key
# "__metadata__", which is as legal a prompt id as any other
HIDDEN_KEY_PREFIX = "id:"


def _save_hidden(path: Path, hidden: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({HIDDEN_KEY_PREFIX + k: v.contiguous() for k, v in hidden.items()}, str(tmp),
              metadata={"keys": HIDDEN_KEY_PREFIX + "<prompt id>"})
    os.replace(tmp, path)


def load_hidden(path: Path, answers: dict[str, list[int]]) -> dict[str, torch.Tensor] | None:
    """The hidden states ``answers(hidden_path=path)`` wrote, if they exist and match ``answers``' lengths.

    None (so the caller runs the model instead) when the file is missing, damaged
    or from other answers.
    """
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            # a file without the metadata (a run directory from before the prefix) is keyed by the bare ids
            prefixed = (f.metadata() or {}).get("keys") == HIDDEN_KEY_PREFIX + "<prompt id>"
            hidden = {k[len(HIDDEN_KEY_PREFIX):] if prefixed else k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
        log.warning("ignoring %s (%s)", path, e)
        return None
    if any(k not in hidden or hidden[k].shape[0] != len(a) for k, a in answers.items()):
        log.warning("ignoring %s: it does not match %d answers", path, len(answers))
        return None
    return hidden


def _answer_maps(rows: list[dict], with_logps: bool):
    ans = {r["id"]: r["answer_ids"] for r in rows}
    return (ans, {r["id"]: r["logp"] for r in rows}) if with_logps else ans


# ----------------------------------------------------------------------------- initial model
def quantize_initial(fp_model, cfg, calib_ids: list[list[int]], out_dir: Path):
    """A quantized copy of ``fp_model`` (train mode); cached in ``out_dir``."""
    spec = QuantSpec(cfg.bits, cfg.group_size, cfg.symmetric)
    exclude = excluded_layers(fp_model, cfg.exclude_patterns())
    weights = out_dir / "model.safetensors"
    if weights.exists() and (out_dir / "done.json").exists():
        try:
            return _cached_initial(fp_model, spec, exclude, out_dir)
        except Exception as e:  # noqa: BLE001 - a damaged cache is quantized again (the same model), never trusted
            log.warning("ignoring %s (%s): quantizing again", out_dir, f"{type(e).__name__}: {e}"[:300])
    model = copy.deepcopy(fp_model)
    stats: dict = {"init": cfg.init}
    if cfg.init == "awq":
        from qdpo.quant.awq import awq_quantize_model

        calib = [torch.tensor(c) for c in calib_ids]
        awq_quantize_model(model, spec, calib, n_grid=cfg.awq_grid, exclude=exclude)
        stats["awq"] = getattr(model, "qdpo_awq_stats", {})
    else:
        quantize_model(model, spec, exclude=exclude)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, _aliases = _unique_state(model)
    tmp = out_dir / ".model.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, weights)
    atomic_write_text(out_dir / "done.json", json.dumps(_jsonable(stats)))
    return model, stats


def _cached_initial(fp_model, spec: QuantSpec, exclude, out_dir: Path):
    """The model and statistics ``quantize_initial`` wrote to ``out_dir``."""
    model = copy.deepcopy(fp_model)
    quantize_model(model, spec, exclude=exclude)  # the structure; the file holds the actual (maybe AWQ) values
    state = load_file(str(out_dir / "model.safetensors"))
    missing = [k for k in model.state_dict() if k not in state]
    model.load_state_dict({**model.state_dict(), **state}, strict=True)
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()
    stats = json.loads((out_dir / "done.json").read_text())
    if not isinstance(stats, dict):
        raise ValueError("done.json holds no statistics")
    return model, stats


def excluded_layers(model, patterns: list[str]) -> tuple[str, ...]:
    """The exclude list of ``--exclude``'s ``patterns`` (the defaults' too); a pattern that matches no layer
    is refused (a typo would quietly quantize the layer it meant)."""
    if not patterns:
        return DEFAULT_EXCLUDE
    layers = [*quantizable_layers(model, ()), *fused_expert_tensors(model)]
    names = [*(n for n, _ in model.named_modules() if n), *layers]  # lm_head too: already kept, not a typo
    unmatched = [p for p in patterns if not any(n == p or fnmatch.fnmatch(n, p) for n in names)]
    if unmatched:
        raise ConfigError(f"--exclude {','.join(unmatched)} matches no layer of {type(model).__name__}; its "
                          f"layers are named like {layers[0]!r} (globs such as '*.down_proj' match the full name)")
    return (*DEFAULT_EXCLUDE, *patterns)


def _unique_state(model) -> tuple[dict, dict]:
    """State dict with tensors that share memory (tied embeddings) stored once."""
    seen, out, aliases = {}, {}, {}
    for k, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = t.detach().contiguous().cpu()
    return out, aliases


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


# ----------------------------------------------------------------------------- pairs
def reference_logps(model, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                    chunk: int) -> list[float]:
    """Summed completion log-probs under ``model`` (no grad), in order; split across ranks under torchrun."""
    return D.shard_map(lambda part: _reference_logps(model, part, pad_id, batch_size, chunk), examples,
                       key=lambda e: len(e[0]) + len(e[1]))


@torch.no_grad()
def _reference_logps(model, examples, pad_id: int, batch_size: int, chunk: int) -> list[float]:
    from qdpo.quant.linear import frozen_weights

    out = []
    model.eval()
    with frozen_weights(model):
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], pad_id).to(next(model.parameters()).device)
            total, _ = sequence_logps(model, batch, chunk)
            out.extend(total.tolist())
    return out


def windowed_reference(q_model, examples: list[Example], window: int, pad_id: int, cfg) -> list[Example]:
    """Examples cut to ``window`` tokens after the common prefix, with reference log-probs of exactly those."""
    ex = [e.windowed(window) for e in examples]
    seqs = [(e.prompt_ids, e.chosen_ids) for e in ex] + [(e.prompt_ids, e.rejected_ids) for e in ex]
    ref = reference_logps(q_model, seqs, pad_id, cfg.micro_batch_size * 2, cfg.logps_chunk)
    for i, e in enumerate(ex):
        e.ref_chosen, e.ref_rejected = ref[i], ref[len(ex) + i]
    return ex


def build_pairs(path: Path, prompts: list[Prompt], ids: dict[str, list[int]], fp: dict, q: dict, q_model,
                tokenizer, cfg, pad_id: int, q_logps: dict | None = None) -> tuple[list[dict], dict]:
    """TRL-format pairs for ``prompts`` (chosen = FP answer, rejected = quantized); identical ones dropped.

    Reference log-probs (the initial quantized model, no grad) are stored as
    TRL's ``ref_chosen_logps``/``ref_rejected_logps`` for whole answers, or as
    ``window<k>_ref_*`` for the answers cut by ``--window k`` that training uses.
    """
    prefix = f"window{cfg.window}_" if cfg.window else ""  # windowed values are not TRL's full-answer columns
    if path.exists():
        rows = read_artifact(path, ("id", "prompt_ids", "chosen_ids", "rejected_ids", f"{prefix}ref_chosen_logps",
                                    f"{prefix}ref_rejected_logps"))
        return rows, _stored_pair_stats(path, prompts, rows, fp, q)
    rows = []
    for p in prompts:
        pc, pr = fit(ids[p.id], fp[p.id], cfg.max_length), fit(ids[p.id], q[p.id], cfg.max_length)
        if pc[1] == pr[1]:  # answers that differ only past --max-length's cut train as no preference either
            continue
        rows.append({
            "id": p.id, "prompt": p.messages,
            "chosen": [{"role": "assistant", "content": tokenizer.decode(pc[1], skip_special_tokens=True)}],
            "rejected": [{"role": "assistant", "content": tokenizer.decode(pr[1], skip_special_tokens=True)}],
            "prompt_ids": pc[0], "chosen_ids": pc[1], "rejected_ids": pr[1],
            "first_divergence": common_prefix(pc[1], pr[1]),
        })
    stats = pair_stats(prompts, rows, fp, q)
    if q_logps is not None and not cfg.window and not stats["truncated"]:
        # the rejected answers are the quantized model's own: their log-probs came with decoding
        examples = [Example(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], ref, q_logps[r["id"]])
                    for r, ref in zip(rows, reference_logps(q_model, [(r["prompt_ids"], r["chosen_ids"]) for r in rows],
                                                            pad_id, cfg.micro_batch_size * 2, cfg.logps_chunk))]
    else:
        examples = windowed_reference(q_model, [Example(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
                                                for r in rows], cfg.window, pad_id, cfg)
    for r, e in zip(rows, examples):
        r[f"{prefix}ref_chosen_logps"], r[f"{prefix}ref_rejected_logps"] = e.ref_chosen, e.ref_rejected

    def write() -> None:
        atomic_write_text(path.with_suffix(".stats.json"), json.dumps(stats))
        write_jsonl(path, rows)  # last: its presence marks the stage complete

    D.on_main(write)
    if not D.is_main():  # every rank trains on the very rows rank 0 wrote
        return read_jsonl(path), json.loads(path.with_suffix(".stats.json").read_text())
    return rows, stats


def pair_stats(prompts: list[Prompt], rows: list[dict], fp: dict, q: dict) -> dict:
    """pairs.stats.json: the counts of ``build_pairs`` (a pair whose answer --max-length cut is ``truncated``; a
    prompt whose answers are identical once cut is ``identical_dropped``)."""
    truncated = sum(len(r["chosen_ids"]) < len(fp[r["id"]]) or len(r["rejected_ids"]) < len(q[r["id"]]) for r in rows)
    fd = [common_prefix(r["chosen_ids"], r["rejected_ids"]) for r in rows]
    return {"total": len(prompts), "identical_dropped": len(prompts) - len(rows),  # as cut by --max-length
            "pairs": len(rows), "truncated": truncated, "mean_first_divergence": sum(fd) / len(fd) if fd else None,
            "mean_chosen_tokens": sum(len(r["chosen_ids"]) for r in rows) / max(len(rows), 1),
            "mean_rejected_tokens": sum(len(r["rejected_ids"]) for r in rows) / max(len(rows), 1)}


def _stored_pair_stats(pairs: Path, prompts: list[Prompt], rows: list[dict], fp: dict, q: dict) -> dict:
    """pairs.stats.json beside an existing ``pairs`` (pairs.jsonl); counted again from the pairs and the answers
    (and written) when it is missing or damaged: the stage writes it first, so only a hand deleted or edited it."""
    path = pairs.with_suffix(".stats.json")
    try:
        stats = json.loads(path.read_text())
        if isinstance(stats, dict):
            return stats
    except (OSError, ValueError):
        pass
    log.warning("%s is missing or damaged: counted again from %s and the answers", path, pairs)
    stats = pair_stats(prompts, rows, fp, q)
    D.on_main(lambda: atomic_write_text(path, json.dumps(stats)))
    return stats
