"""Sweep training recipes on the validation split of an existing run directory.

Reuses a run's cached stages (FP answers, initial quantized model, pairs) and
trains one fresh copy of the initial model per recipe, recording the
validation flip rate every ``--eval-every`` steps. Only the validation split
is used here: choosing a recipe never looks at the test split.

    python -m qdpo.train --output-dir runs/default --steps 1   # once: makes the cached stages
    python benchmarks/sweep_recipes.py runs/default --recipes "lr=1e-5" "lr=1e-5,window=16" --steps 20

Each recipe is a comma-separated list of TrainConfig overrides; ``method=kd``
and ``method=sft`` sweep the baselines. Results are appended as JSON lines to
``<run>/sweep.jsonl`` and printed as a table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path


def _parse(recipe: str, base: dict) -> dict:
    from qdpo.training.config import TrainConfig

    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    out = dict(base)
    for item in filter(None, recipe.split(",")):
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        typ = {"int": int, "float": float, "bool": lambda s: s.lower() in ("1", "true", "yes"), "str": str}[
            types[k] if isinstance(types[k], str) else types[k].__name__]
        out[k] = typ(v)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--recipes", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import torch

    from qdpo.eval import metrics as M
    from qdpo.train import _examples, _load
    from qdpo.training import stages as S
    from qdpo.training.config import TrainConfig
    from qdpo.training.trainer import Trainer

    run = Path(a.run_dir)
    base = json.loads((run / "run.json").read_text())["config"]
    cfg0 = TrainConfig(**base)
    fp_model, tok = _load(cfg0, torch.device("cpu"))
    q0, _ = S.quantize_initial(fp_model, cfg0, [], run / "initial")
    pairs = S.read_jsonl(run / "pairs.jsonl")
    fp_rows = S.read_jsonl(run / "answers" / "fp.jsonl")
    from qdpo.training.prompts import load_prompt_set, prompt_ids

    prompts = {p.id: p for p in load_prompt_set(cfg0.prompts, cfg0.seed)}
    fp = {r["id"]: r["answer_ids"] for r in fp_rows}
    ids = {pid: prompt_ids(tok, prompts[pid].messages) for pid in fp}
    train_p = [prompts[r["id"]] for r in fp_rows if r["split"] == "train"]
    val_ex = [(ids[r["id"]], r["answer_ids"]) for r in fp_rows if r["split"] == "validation"]
    pad = tok.pad_token_id
    targets = M.fp_targets(fp_model, val_ex, batch_size=16, disable=True)
    start = M.flip_rate(q0, val_ex, targets, batch_size=16, disable=True)
    print(f"validation flip rate of the initial model: {start:.4f}")
    results = []
    for recipe in a.recipes:
        cfg = TrainConfig(**_parse(recipe, {**base, "steps": a.steps, "eval_every": a.eval_every, "patience": 0,
                                            "seed": a.seed, "checkpoint_every": 0})).validate()
        model = copy.deepcopy(q0)
        method = cfg.method if cfg.method != "all" else "qdpo"
        examples = _examples(method, pairs, train_p, ids, fp)
        if method == "qdpo" and cfg.window:
            examples = S.windowed_reference(q0, examples, cfg.window, pad, cfg)
        t0 = time.perf_counter()
        tr = Trainer(model, cfg, method, examples, run / "sweep" / recipe.replace("=", "").replace(",", "_"),
                     fp_model=fp_model, val=(val_ex, targets), pad_id=pad, disable_progress=True)
        tr.run()
        curve = {h["step"]: h["val/flip_rate"] for h in tr.history if h.get("val/flip_rate") is not None}
        rec = {"recipe": recipe, "method": method, "steps": a.steps, "seed": a.seed, "start": start,
               "val_flip": curve, "best": min(curve.values()), "best_step": min(curve, key=curve.get),
               "seconds": round(time.perf_counter() - t0, 1)}
        results.append(rec)
        with (run / "sweep.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{recipe:40s} best {rec['best']:.4f} at step {rec['best_step']:3d}  curve "
              + " ".join(f"{s}:{v:.4f}" for s, v in curve.items()) + f"  ({rec['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
