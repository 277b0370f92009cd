"""The run's results: ``metrics.json`` (stable schema, for tools) and ``report.md`` (for people).

``metrics.json``, ``schema_version`` 1::

    {
      "schema_version": 1,
      "config": {...},            # the run configuration (TrainConfig.to_dict(): every --flag and its value)
      "pairs": {                  # preference pairs built from greedy answers on the training prompts
        "total": int,             #   prompts answered by both models
        "identical_dropped": int, #   prompts whose FP and quantized answers were identical (no preference),
                                  #   also where they differ only past the --max-length cut
        ...                       #   anything else the caller counts (python -m qdpo.train: "pairs" kept,
                                  #   "truncated", "mean_first_divergence", "mean_chosen_tokens",
                                  #   "mean_rejected_tokens", "prompts_dropped_too_long")
      },
      "eval": {                   # one entry per model that was evaluated, in this order when present:
        "fp": {...},              #   the full-precision model itself (the ceiling: flip 0, KL 0)
        "initial": {...},         #   the quantized start (RTN or AWQ, see config.init), before training
        "qdpo": {...}, "kd": {...}, "sft": {...}   # each trained method that ran (python -m qdpo.train
                                  #   --resume: also those an earlier call trained in the run directory,
                                  #   their rows copied from its metrics.json, training.<method>.earlier_call)
      },
      "timing": {                 # per stage (python -m qdpo.train: "load", "fp_answers", "quantize",
                                  # "initial_answers", "pairs", "eval_start", then "train_<method>",
                                  # "eval_<method>", "export_<method>" per method, and "judge"):
        "<stage>": {"seconds": float, "peak_rss_gb": float, "peak_gpu_gb": float (on a GPU)}
                                  # or a plain number of seconds; peak_rss_gb: the process's peak RSS up to
                                  # the stage's end (never falls), peak_gpu_gb: the stage's own GPU peak
      },
      ...                         # extra top-level keys passed by the caller, same cleaning rules;
                                  # python -m qdpo.train adds "training" (per method: steps run, best step,
                                  # early stop, export checks, earlier_call), "init" (RTN/AWQ/--init statistics and
                                  # "weights": the quantized share) and, with --judge-url, "judge" (url, model,
                                  # scale; per model: judged, unrated, answers_sha256 of the answers it rated)
    }

Each ``eval`` entry holds the metrics of :mod:`qdpo.eval.metrics` on the test
split (teacher-forced on the FP answers unless noted):

==================  =========  =====  ====================================================================
key                 units      best   meaning
==================  =========  =====  ====================================================================
flip_rate           fraction   lower  answer positions whose top-1 token differs from the FP top-1
top1_agreement      fraction   higher 1 − flip_rate (llama.cpp "same top p")
kl                  nats/token lower  mean KL(p_FP ‖ p_q) over answer positions, exact over the vocabulary
first_divergence    tokens     higher mean length of the common prefix of the greedy and FP answers
exact_match         fraction   higher greedy answers identical to the FP answers
rouge_l             F1 [0, 1]  higher mean word-level ROUGE-L of greedy vs FP answer texts
fp_nll              nats/token lower  the FP model's mean NLL of this model's own greedy answers (FP as judge)
ppl                 —          lower  exp(mean NLL of the FP answers under this model)
delta_p_rms         prob.      lower  RMS of p_q(y) − p_FP(y) for the FP answer token y (llama.cpp "Δp RMS")
judge_score         1–10       higher only with ``--judge-url``: mean LLM-judge rating of the greedy answers
==================  =========  =====  ====================================================================

plus ``tokens`` (answer positions measured), ``nll``, ``fp_ppl``, ``ppl_ratio``
(ppl / fp_ppl), ``answer_tokens`` / ``fp_answer_tokens`` (mean greedy answer
lengths), ``empty_answers`` and ``examples`` when the caller passes them.

Cleaning: 0-dim tensors and NumPy scalars become numbers; every other tensor or
array (e.g. the per-position ``margins`` / ``flipped``) is dropped; NaN and
±inf become ``null``; paths become strings. Both files are written to a
temporary name and renamed, so an existing file is never left half-written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

SCHEMA_VERSION = 1
METRIC_KEYS = ("flip_rate", "top1_agreement", "kl", "first_divergence", "exact_match", "rouge_l", "fp_nll", "ppl")
EXTRA_METRIC_KEYS = ("delta_p_rms", "judge_score")  # shown in the table when present
LOWER_IS_BETTER = {"flip_rate", "kl", "fp_nll", "ppl", "delta_p_rms"}
PERCENT_KEYS = {"flip_rate", "top1_agreement", "exact_match"}
UNITS = {"kl": "nats/token", "fp_nll": "nats/token", "first_divergence": "tokens", "rouge_l": "F1 in [0, 1]",
         "delta_p_rms": "probability", "judge_score": "rating 1–10"}  # the % cells say theirs; ppl has none
MODEL_ORDER = ("fp", "initial")  # then the methods, in the order they were given
LABELS = {"fp": "FP", "initial": "initial", "qdpo": "QDPO", "kd": "KD", "sft": "SFT"}
_DROP = object()


# ---------------------------------------------------------------------------- writing
def _write_atomic(path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _clean(x):
    """JSON-ready copy of ``x`` (see the module docstring); ``_DROP`` for what is stripped."""
    if isinstance(x, torch.Tensor):
        return _clean(x.item()) if x.dim() == 0 else _DROP
    if isinstance(x, np.ndarray):
        return _DROP
    if isinstance(x, np.generic):
        return _clean(x.item())
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        out = {str(k): _clean(v) for k, v in x.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    if isinstance(x, (list, tuple)):
        return [v for v in map(_clean, x) if v is not _DROP]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _clean(dataclasses.asdict(x))
    return str(x)


def _ordered_models(ev: Mapping) -> list[str]:
    return [m for m in MODEL_ORDER if m in ev] + [m for m in ev if m not in MODEL_ORDER]


def write_metrics_json(path, *, config: dict, pairs: dict, eval: dict[str, dict], timing: dict, **extra) -> Path:
    """Write ``metrics.json`` with the schema of the module docstring; returns the path."""
    clash = {"schema_version"} & set(extra)
    if clash:
        raise ValueError(f"write_metrics_json: extra key(s) {sorted(clash)} would overwrite the schema's own")
    for name, metrics in eval.items():
        if not isinstance(metrics, Mapping):
            raise TypeError(f"eval[{name!r}] must be a dict of metrics, got {type(metrics).__name__}")
    doc = {
        "schema_version": SCHEMA_VERSION,
        "config": _clean(config),
        "pairs": _clean(pairs),
        "eval": {m: _clean(eval[m]) for m in _ordered_models(eval)},
        "timing": _clean(timing),
        **{k: _clean(v) for k, v in extra.items()},
    }
    return _write_atomic(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------- formatting
def _label(model: str) -> str:
    return LABELS.get(model, model.upper() if len(model) <= 4 else model)


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _fmt(key: str, v) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if key in PERCENT_KEYS:
        return _pct(v)
    if key == "first_divergence":
        return f"{v:.2f}"
    return f"{v:.4g}"


def _num(metrics: Mapping, key: str):
    v = metrics.get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _spec_name(cfg: Mapping) -> str | None:
    if "bits" not in cfg:
        return None
    gs = cfg.get("group_size", -1)
    return f"W{cfg['bits']}A16-{'ch' if gs == -1 else f'g{gs}'}-{'sym' if cfg.get('symmetric') else 'asym'}"


def _config_lines(cfg: Mapping, training: Mapping | None = None) -> list[str]:
    """The configuration facts a reader needs, then the full config folded away. ``training`` (metrics.json's
    summaries) tells whether a validation check ran: without validation prompts early stopping was off."""
    g = cfg.get
    recipe = [f"{k}={g(k)}" for k in ("loss", "beta", "label_smoothing", "lr", "warmup_steps", "steps",
                                      "batch_size", "max_grad_norm", "nll_weight", "kd_weight", "window",
                                      "learn_scales") if k in cfg]
    if g("eval_every") is not None:
        stop = (f"validation flip rate every {g('eval_every')} steps, patience {g('patience')}"
                if g("eval_every") and g("patience") else "off")
    else:
        stop = None
    if stop and stop != "off" and training and all(t.get("best_val_flip_rate") is None for t in training.values()):
        stop = "off (no validation prompts: the last step's weights are kept)"
    earlier = [m for m, t in (training or {}).items() if isinstance(t, Mapping) and t.get("earlier_call")]
    method = f"{g('method')} (this call; {', '.join(earlier)} from an earlier call)" if earlier else g("method")
    facts = [("Model", g("model")), ("Quantization", _spec_name(cfg)), ("Initial quantization", g("init")),
             ("Method(s)", method), ("Recipe", ", ".join(recipe) or None), ("Early stopping", stop),
             ("Greedy answers", f"max_new_tokens={g('max_new_tokens')}" if "max_new_tokens" in cfg else None),
             ("Seed", g("seed"))]
    lines = [f"- **{k}**: {v}" for k, v in facts if v is not None]
    if cfg:
        lines += ["", "<details><summary>Full configuration</summary>", "", "```json",
                  json.dumps(cfg, indent=2), "```", "", "</details>"]
    return lines or ["(no configuration recorded)"]


def _coverage_lines(w: Mapping | None) -> list[str]:
    """The quantized share of the weights (``qdpo.quant.model.weight_coverage``), and a warning when
    3-D weight tensors stayed in full precision."""
    if not isinstance(w, Mapping) or "quantized_fraction" not in w:
        return []
    fused = f" and {w['quantized_expert_tensors']} fused expert tensors" if w.get("quantized_expert_tensors") else ""
    out = [f"- **Quantized weights**: {_pct(w['quantized_fraction'])} of the weight matrices "
           f"({w['quantized_layers']} linear layers{fused}; full precision: embeddings {w['embedding_weights']:,}, "
           f"other {w['other_fp_weights']:,} weights)"]
    excluded = w.get("fp_excluded_expert_tensors") or []
    left = [n for n in w.get("fp_fused_expert_tensors") or [] if n not in excluded]
    if excluded:
        out.append(f"- **Expert tensors kept in full precision** (`--exclude`, or the `--init` checkpoint): "
                   f"{len(excluded)}, {', '.join(excluded[:4])}{' …' if len(excluded) > 4 else ''}")
    if left:
        out.append(f"- **Warning**: {len(left)} 3-D weight tensors (experts of a module qdpo does not know) "
                   "stay in full precision: every number below is for a model where they are not quantized")
    return out


def _eval_table(ev: Mapping, earlier: set = frozenset()) -> list[str]:
    """The metrics of each model; ``earlier``: the methods whose row an earlier call in the run directory wrote."""
    models = _ordered_models(ev)
    keys = list(METRIC_KEYS) + [k for k in EXTRA_METRIC_KEYS if any(_num(ev[m], k) is not None for m in models)]
    best = {}  # key -> best value among the quantized models (bolded when at least two compete)
    for k in keys:
        vals = [v for m in models if m != "fp" and (v := _num(ev[m], k)) is not None]
        if len(vals) >= 2:
            best[k] = min(vals) if k in LOWER_IS_BETTER else max(vals)
    rows = []
    for m in models:
        cells = []
        for k in keys:
            cell = _fmt(k, ev[m].get(k))
            cells.append(f"**{cell}**" if m != "fp" and k in best and _num(ev[m], k) == best[k] else cell)
        rows.append([_label(m) + (" (earlier call)" if m in earlier else "")] + cells)
    header = ["model"] + [f"{k} {'↓' if k in LOWER_IS_BETTER else '↑'}" for k in keys]
    units = "; ".join(f"{k}: {UNITS[k]}" for k in keys if k in UNITS)
    return _table(header, rows) + ["", "↓ lower is better, ↑ higher is better; bold: best quantized model. "
                                   f"Units ({units}). Teacher-forced metrics on the FP answers of the test prompts; "
                                   "first_divergence, exact_match, rouge_l and fp_nll on each model's own "
                                   "greedy answers."]


def verdict(metrics: Mapping) -> list[str]:
    """Plain-language conclusions computed from ``metrics['eval']``."""
    ev = metrics.get("eval", {})
    init = str(metrics.get("config", {}).get("init", ""))
    origin = (f"{init.upper()} start" if init in ("rtn", "awq") else  # else --init PATH: the path as written
              f"start: the --init checkpoint {init}" if init else "quantized start")
    methods = [m for m in _ordered_models(ev) if m not in MODEL_ORDER]
    flips = {m: _num(ev[m], "flip_rate") for m in ev}
    start = flips.get("initial")
    out = []
    if not methods:
        if start is not None:
            out.append(f"No training method ran; the initial model ({origin}) flips {_pct(start)} of the test "
                       "tokens.")
        return out
    lead = "qdpo" if "qdpo" in methods else methods[0]
    others = [f"{_label(m)} reached {_pct(flips[m])}" for m in methods if m != lead and flips[m] is not None]
    if start is None or flips[lead] is None:
        missing = "The initial quantized model was not evaluated" if "initial" not in ev else \
            f"{'The initial model' if start is None else _label(lead)} has no flip rate"
        out.append(f"{missing}, so there is no before/after comparison.")
    else:
        verb = "lowered" if flips[lead] < start else "raised" if flips[lead] > start else None
        rel = f", {100 * (flips[lead] - start) / start:+.0f} % relative" if start > 0 else ""
        change = f"{verb} the test flip rate from {_pct(start)} to {_pct(flips[lead])}" if verb else \
            f"left the test flip rate at {_pct(start)}"
        text = f"{_label(lead)} {change} ({origin}{rel if verb else ''})"
        out.append(text + ("; " + ", ".join(others) if others else "") + ".")
    if "qdpo" in methods and "kd" in methods and flips["qdpo"] is not None and flips["kd"] is not None:
        q, k = flips["qdpo"], flips["kd"]
        if q < k:
            out.append(f"QDPO beats KD on flip rate ({_pct(q)} vs {_pct(k)}).")
        elif q > k:
            out.append(f"QDPO does not beat KD: KD's flip rate {_pct(k)} is lower than QDPO's {_pct(q)}.")
        else:
            out.append(f"QDPO and KD tie on flip rate ({_pct(q)}).")
        kq, kk = _num(ev["qdpo"], "kl"), _num(ev["kd"], "kl")
        if kq is not None and kk is not None and kq != kk and (kq < kk) != (q < k):
            lower, (a, b) = ("QDPO", (kq, kk)) if kq < kk else ("KD", (kk, kq))
            out.append(f"On KL the order differs: {lower} is lower ({a:.4g} vs {b:.4g} nats/token).")
        out.append("These come from one seed: rerun with other --seed values to tell a gap from noise "
                   "(README, \"Choosing the QDPO recipe\", has the spread over seeds).")
    for key, what, fmt in (("kl", "KL(FP ‖ quantized) in nats/token", "{:.4g}"),
                           ("exact_match", "Greedy answers identical to FP", None)):
        vals = [(m, _num(ev[m], key)) for m in ["initial", *methods] if m in ev]
        vals = [(m, v) for m, v in vals if v is not None]
        if vals:
            out.append(f"{what}: " + ", ".join(f"{_label(m)} {fmt.format(v) if fmt else _pct(v)}"
                                               for m, v in vals) + ".")
    return out


def _generic(value) -> list[str]:
    """A table for a dict of dicts or of scalars; JSON otherwise."""
    if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
        cols = list(dict.fromkeys(k for v in value.values() for k in v))
        return _table([""] + cols, [[str(r)] + [_cell(v.get(c)) for c in cols] for r, v in value.items()])
    if isinstance(value, Mapping) and value:
        return _table(["", "value"], [[str(k), _cell(v)] for k, v in value.items()])
    return ["```json", json.dumps(value, indent=2), "```"]


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v) if not isinstance(v, (Mapping, list)) else json.dumps(v)


def _export_cell(rec: Mapping, base: Path) -> str:
    """A method's export record (``training.<method>.export``) in words: where, and what the checks found."""
    def where(p) -> str:
        p = Path(p)
        try:
            return p.resolve().relative_to(base.resolve()).as_posix() + "/"
        except ValueError:  # outside the report's directory
            return p.as_posix()

    text = where(rec.get("path", "?"))
    if "reproduces_eval" in rec:
        text += ", reproduces the evaluation" if rec["reproduces_eval"] else ", DOES NOT reproduce the evaluation"
    if "compressed_tensors" in rec:
        ct = rec["compressed_tensors"]
        diff, layers = rec.get("compressed_tensors_max_abs_logit_diff"), rec.get("compressed_tensors_layers")
        check = (f"max \\|Δlogit\\| {diff:.3g}" if isinstance(diff, (int, float)) else
                 f"{layers.get('layers')} layers decompress to qdpo's weights" if isinstance(layers, Mapping) else
                 "not checked")
        text += "; compressed-tensors: skipped" if ct is None else f"; compressed-tensors {where(ct)} ({check})"
    return text


def _timing(timing: Mapping) -> list[str]:
    rows = {k: (v if isinstance(v, Mapping) else {"seconds": v}) for k, v in timing.items()}
    return _generic(rows) if rows else ["(not recorded)"]


# ---------------------------------------------------------------------------- report
STANDARD_KEYS = ("schema_version", "config", "pairs", "eval", "timing")


def write_report_md(path, metrics: dict, plots: dict[str, Path] | None = None, notes: list[str] | None = None) -> Path:
    """Write a readable ``report.md`` from the ``metrics.json`` document; returns the path.

    ``plots`` maps a caption to an image file; it is embedded by its path relative to the report.
    """
    path = Path(path)
    metrics = _clean(metrics)
    cfg, ev = metrics.get("config") or {}, metrics.get("eval") or {}
    weights = (metrics.get("init") or {}).get("weights")
    lines = ["# QDPO run report", "", "## Configuration", "", *_coverage_lines(weights),
             *_config_lines(cfg, metrics.get("training")), ""]
    lines += ["## Preference pairs", "", *(_generic(metrics["pairs"]) if metrics.get("pairs") else ["(none)"]), ""]
    training = metrics.get("training") if isinstance(metrics.get("training"), Mapping) else {}
    earlier = {m for m, t in training.items() if isinstance(t, Mapping) and t.get("earlier_call")}
    lines += ["## Evaluation", "", *(_eval_table(ev, earlier) if ev else ["(no model was evaluated)"]), ""]
    lines += ["## Verdict", "", *[f"- {s}" for s in verdict(metrics) or ["Nothing to compare."]], ""]
    for key in metrics:
        if key not in STANDARD_KEYS:
            value = metrics[key]
            if key == "init" and isinstance(value, Mapping):  # its "weights" has its own line above
                value = {k: v for k, v in value.items() if k != "weights"}
            if key == "training" and isinstance(value, Mapping):  # each export record in words, not as JSON
                value = {m: {**t, "export": _export_cell(t["export"], path.parent)}
                         if isinstance(t, Mapping) and isinstance(t.get("export"), Mapping) else t
                         for m, t in value.items()}
            lines += [f"## {key.replace('_', ' ').capitalize()}", "", *_generic(value), ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    lines += ["## Timing and peak memory", "", *_timing(metrics.get("timing") or {}), ""]
    if plots:
        lines += ["## Plots", ""]
        for caption, p in plots.items():
            rel = Path(os.path.relpath(Path(p).resolve(), path.resolve().parent)).as_posix()
            lines += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    return _write_atomic(path, "\n".join(lines))
