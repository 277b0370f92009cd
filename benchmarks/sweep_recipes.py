"""Sweep training recipes on the validation split of an existing run directory.

Reuses a run's cached stages (FP answers, initial quantized model, pairs) and
trains one fresh copy of the initial model per recipe, recording the
validation flip rate every ``--eval-every`` steps. Only the validation split
is used here: choosing a recipe never looks at the test split.

    python -m qdpo.train --output-dir runs/default --steps 1   # once: makes the cached stages
    python benchmarks/sweep_recipes.py runs/default --recipes "lr=1e-5" "lr=1e-5,window=16" --steps 20

Each recipe is a comma-separated list of TrainConfig overrides; ``method=kd``
and ``method=sft`` sweep the baselines. Two more keys try ideas that are not
pipeline flags (they did not earn one; README "Choosing the QDPO recipe"):
``samples=N`` adds N answers sampled from the initial quantized model
(temperature ``temp``, default 1) per training prompt as extra rejected
answers, and ``onpolicy=K`` replaces every rejected answer by the current
model's greedy answer every K steps (on-policy rounds; reference log-probs
stay the initial model's). Results are appended as JSON lines to
``<run>/sweep.jsonl`` and printed as a table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path

from qdpo.training import stages as S


EXTRA = {"samples": int, "temp": float, "onpolicy": int}  # harness-only recipe keys (see the docstring)


def _parse(recipe: str, base: dict) -> dict:
    from qdpo.training.config import TrainConfig

    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    out = dict(base)
    for item in filter(None, recipe.split(",")):
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if k in EXTRA:
            out[k] = EXTRA[k](v)
            continue
        typ = {"int": int, "float": float, "bool": lambda s: s.lower() in ("1", "true", "yes"), "str": str}[
            types[k] if isinstance(types[k], str) else types[k].__name__]
        out[k] = typ(v)
    return out


def _summary(rows: list[dict]) -> str:
    """A markdown table: mean ± sample std over seeds of each recipe's best validation and test numbers."""
    import statistics

    def ms(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.4f} ± {sd:.4f}" if len(vals) > 1 else f"{vals[0]:.4f}"

    order = list(dict.fromkeys(r["recipe"] for r in rows))
    lines = ["| recipe | seeds | val flip (best) | best step | test flip | test KL | s/run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for rec in order:
        rs = [r for r in rows if r["recipe"] == rec]
        lines.append(f"| `{rec}` | {len(rs)} | {ms([r['best'] for r in rs])} | "
                     f"{', '.join(str(r['best_step']) for r in rs)} | {ms([r.get('test_flip') for r in rs])} | "
                     f"{ms([r.get('test_kl') for r in rs])} | {sum(r['seconds'] for r in rs) / len(rs):.0f} |")
    return "\n".join(lines)


def _sampled_pairs(q0, tok, pairs: list[dict], n: int, temperature: float, cfg, pad: int, seed: int) -> list:
    """``n`` sampled answers of the initial quantized model per pair's prompt, as extra rejected answers.

    Samples equal to the chosen answer or to the greedy rejected one are dropped; reference log-probs
    are the initial model's (a forward pass, so they do not depend on the sampling temperature).
    """
    import torch

    from qdpo.quant.linear import frozen_weights
    from qdpo.training.generate import cut_at_eos, eos_ids, left_pad
    from qdpo.training.trainer import Example

    eos = eos_ids(q0, tok)
    torch.manual_seed(10_007 + seed)
    new = []
    q0.eval()
    with torch.no_grad(), frozen_weights(q0):
        for s in range(0, len(pairs), cfg.gen_batch_size):
            part = pairs[s:s + cfg.gen_batch_size]
            ids, att = left_pad([r["prompt_ids"] for r in part], pad)
            ids, att = ids.repeat_interleave(n, 0), att.repeat_interleave(n, 0)
            out = q0.generate(input_ids=ids, attention_mask=att, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                              temperature=temperature, top_p=None, top_k=None, pad_token_id=pad,
                              eos_token_id=sorted(eos))
            gen = out[:, ids.shape[1]:].tolist()
            for j, g in enumerate(gen):
                r = part[j // n]
                a = cut_at_eos(g, eos)
                if a and a != r["chosen_ids"] and a != r["rejected_ids"]:
                    new.append((r["prompt_ids"], r["chosen_ids"], a))
    ref = S.reference_logps(q0, [(p, c) for p, c, _ in new] + [(p, a) for p, _, a in new], pad,
                            cfg.micro_batch_size * 2, cfg.logps_chunk)
    print(f"sampled {len(new)} extra rejected answers ({n} per prompt, temperature {temperature})", flush=True)
    return [Example(p, c, a, ref[i], ref[len(new) + i]) for i, (p, c, a) in enumerate(new)]


def _on_policy_trainer(q0, tok, every: int, pad: int):
    """A Trainer that regenerates every rejected answer with the current model every ``every`` steps."""
    from qdpo.training.generate import greedy
    from qdpo.training.trainer import Example, Trainer

    class OnPolicy(Trainer):
        def train_step(self) -> dict:
            rec = super().train_step()
            if self.step % every == 0 and self.step < self.cfg.steps:
                self._refresh()
            return rec

        def _refresh(self) -> None:
            ex = self.examples
            answers = greedy(self.model, tok, [e.prompt_ids for e in ex], self.cfg.max_new_tokens,
                             self.cfg.gen_batch_size, disable=True)
            keep = [(e, a) for e, a in zip(ex, answers) if a and a != e.chosen_ids]
            ref = S.reference_logps(q0, [(e.prompt_ids, a) for e, a in keep], pad, self.cfg.micro_batch_size * 2,
                                    self.cfg.logps_chunk)
            self.examples = [Example(e.prompt_ids, e.chosen_ids, a, e.ref_chosen, r) for (e, a), r in zip(keep, ref)]
            changed = sum(a != e.rejected_ids for e, a in keep)
            print(f"on-policy round at step {self.step}: {changed}/{len(ex)} rejected answers changed, "
                  f"{len(ex) - len(keep)} now match the chosen one", flush=True)

    return OnPolicy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--recipes", nargs="+", required=True, help="TrainConfig overrides per recipe; 'rtn' = untrained")
    p.add_argument("--steps", type=int, default=None, help="default: the run's --steps")
    p.add_argument("--eval-every", type=int, default=None, help="default: the run's --eval-every")
    p.add_argument("--patience", type=int, default=0, help="early stopping as in a run (0: train every step)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--test", action="store_true",
                   help="also evaluate each recipe's best-validation weights on the test split (flip rate, KL)")
    p.add_argument("--out", default=None, help="JSON lines file to append to (default: <run>/sweep.jsonl)")
    p.add_argument("--table", action="store_true", help="only print the table of --out's rows for --recipes")
    a = p.parse_args()
    run = Path(a.run_dir)
    out = Path(a.out) if a.out else run / "sweep.jsonl"
    if a.table:
        rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
        print(_summary([r for r in rows if r["recipe"] in a.recipes and r["seed"] in a.seeds]))
        return

    import torch

    from qdpo.eval import metrics as M
    from qdpo.train import _examples, _load, _per_example, _teacher
    from qdpo.training.config import TrainConfig
    from qdpo.training.prompts import load_prompt_set, prompt_ids
    from qdpo.training.trainer import Trainer

    base = json.loads((run / "run.json").read_text())["config"]
    cfg0 = TrainConfig(**base)
    fp_model, tok = _load(cfg0, torch.device("cpu"))
    q0, _ = S.quantize_initial(fp_model, cfg0, [], run / "initial")
    pairs = S.read_jsonl(run / "pairs.jsonl")
    fp_rows = S.read_jsonl(run / "answers" / "fp.jsonl")
    prompts = {p.id: p for p in load_prompt_set(cfg0.prompts, cfg0.seed)}
    fp = {r["id"]: r["answer_ids"] for r in fp_rows}
    ids = {pid: prompt_ids(tok, prompts[pid].messages) for pid in fp}
    train_p = [prompts[r["id"]] for r in fp_rows if r["split"] == "train"]
    split_ex = {s: [(ids[r["id"]], r["answer_ids"]) for r in fp_rows if r["split"] == s]
                for s in ("validation", "test")}
    val_ex, test_ex = split_ex["validation"], split_ex["test"]
    pad = tok.pad_token_id
    bs = cfg0.micro_batch_size * 2
    fp_hidden = S.load_hidden(run / "answers" / "fp_hidden.safetensors", fp)  # FP targets kept while decoding
    split_p = {s: [prompts[r["id"]] for r in fp_rows if r["split"] == s] for s in ("validation", "test")}
    targets = M.fp_targets(fp_model, val_ex, batch_size=bs, disable=True,
                           fp_hidden=_per_example(fp_hidden, split_p["validation"]))
    start = M.flip_rate(q0, val_ex, targets, batch_size=bs, disable=True)
    ev = dict(batch_size=bs, chunk=cfg0.logps_chunk, disable=True, pad_id=pad, fp_cache={},
              fp_hidden=_per_example(fp_hidden, split_p["test"]))
    print(f"validation flip rate of the initial model: {start:.4f}", flush=True)

    def test_metrics(model) -> dict:
        if not a.test:
            return {}
        tf = M.teacher_forced(fp_model, model, test_ex, **ev)
        return {"test_flip": tf["flip_rate"], "test_kl": tf["kl"], "test_ppl_ratio": tf["ppl_ratio"]}

    rows = []
    for seed in a.seeds:
        for recipe in a.recipes:
            t0 = time.perf_counter()
            if recipe == "rtn":  # the initial quantized model, untrained
                rec = {"recipe": recipe, "method": "rtn", "steps": 0, "seed": seed, "start": start,
                       "val_flip": {0: start}, "best": start, "best_step": 0, **test_metrics(q0)}
            else:
                over = {"seed": seed, "patience": a.patience, "checkpoint_every": 0}
                over.update({k: v for k, v in (("steps", a.steps), ("eval_every", a.eval_every)) if v is not None})
                values = _parse(recipe, {**base, **over})
                extra = {k: values.pop(k) for k in EXTRA if k in values}
                cfg = TrainConfig(**values).validate()
                model = copy.deepcopy(q0)
                method = cfg.method if cfg.method != "all" else "qdpo"
                examples = _examples(method, pairs, train_p, ids, fp, max_length=cfg.max_length)
                if method == "qdpo" and extra.get("samples"):
                    examples = examples + _sampled_pairs(q0, tok, pairs, extra["samples"], extra.get("temp", 1.0),
                                                         cfg, pad, seed)
                if method == "qdpo" and cfg.window:
                    examples = S.windowed_reference(q0, examples, cfg.window, pad, cfg)
                name = recipe.replace("=", "").replace(",", "_") + f"_s{seed}"
                cls = Trainer
                if method == "qdpo" and extra.get("onpolicy"):
                    cls = _on_policy_trainer(q0, tok, extra["onpolicy"], pad)
                teacher = _teacher(method, cfg, examples[:len(pairs) if method == "qdpo" else None], pairs, train_p,
                                   fp_hidden)  # sampled extra pairs repeat chosen answers already in it
                tr = cls(model, cfg, method, examples, run / "sweep" / name, fp_model=fp_model,
                         val=(val_ex, targets), pad_id=pad, disable_progress=True, teacher=teacher)
                summary = tr.run()
                curve = {h["step"]: h["val/flip_rate"] for h in tr.history if h.get("val/flip_rate") is not None}
                rec = {"recipe": recipe, "method": method, "steps": cfg.steps, "seed": seed, "start": start,
                       "val_flip": curve, "best": min(curve.values()), "best_step": min(curve, key=curve.get),
                       "steps_run": summary["steps_run"], **test_metrics(model)}
                del tr, model
                shutil.rmtree(run / "sweep" / name / "checkpoints", ignore_errors=True)  # ~1.6 GB each, not needed
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(rec)
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            test = f"  test flip {rec['test_flip']:.4f} KL {rec['test_kl']:.4f}" if a.test else ""
            print(f"seed {seed} {recipe:40s} best val {rec['best']:.4f} at step {rec['best_step']:3d}{test}  curve "
                  + " ".join(f"{s}:{v:.4f}" for s, v in rec["val_flip"].items()) + f"  ({rec['seconds']} s)",
                  flush=True)
    print(_summary(rows))


if __name__ == "__main__":
    main()
