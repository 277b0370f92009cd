"""Training-step speed and peak memory: qdpo's QDPO step vs TRL's DPOTrainer, same model and batches.

The model is SmolLM2-135M-Instruct with every decoder Linear replaced by a
W4 g64 fake-quant ``QuantLinear`` (train mode); a step is 8 preference pairs
(16 sequences, ~1,400 padded tokens) forward + backward + AdamW, fp32 on the
CPU (bf16 autocast on a GPU). Each trainer runs in its own process so the
peak memory (max RSS; max allocated on a GPU) is its own. TRL is timed only
where it is installed (``pip install trl``); it is not a qdpo dependency.

Run directly for a table: ``python benchmarks/bench_train_step.py [--steps 4]``.
Under pytest (``make bench``) it records rows through ``common.bench``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
N_PAIRS = 8
# ~40-token prompts after the chat template and ~48-token answers: about 1,400 padded tokens per step
ANSWER_WORDS = 34


def _pairs():
    from qdpo.training.prompts import load_prompt_set, split

    prompts = split(load_prompt_set("default"), "train")[:N_PAIRS]
    filler = "The answer depends on the details, but in most cases it is simple to explain step by step "
    words = (filler * 6).split()
    chosen = " ".join(words[:ANSWER_WORDS])
    rejected = " ".join(words[3:ANSWER_WORDS + 3])
    return [(p.messages, chosen, rejected) for p in prompts]


def _model():
    import copy

    import qdpo
    from qdpo.loading import load_model

    fp, tok = load_model()
    q = copy.deepcopy(fp)
    qdpo.quantize_model(q, qdpo.QuantSpec(4, 64))
    return fp, q, tok


def _peak_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_qdpo(steps: int) -> dict:
    import torch

    from qdpo.training.config import TrainConfig
    from qdpo.training.data import completion_ids
    from qdpo.training.prompts import prompt_ids
    from qdpo.training.trainer import Example, Trainer

    fp, q, tok = _model()
    del fp  # QDPO needs only the precomputed reference log-probs, not the FP model
    if torch.cuda.is_available():
        q = q.cuda()
    ex = [Example(prompt_ids(tok, m), completion_ids(tok, c), completion_ids(tok, r), -50.0, -50.0)
          for m, c, r in _pairs()]
    cfg = TrainConfig(steps=steps, batch_size=N_PAIRS, micro_batch_size=N_PAIRS, eval_every=0,
                      checkpoint_every=0, kd_weight=0.0).validate()  # the DPO step alone, as TRL's
    import tempfile

    t = Trainer(q, cfg, "qdpo", ex, Path(tempfile.mkdtemp()), pad_id=tok.pad_token_id, disable_progress=True)
    times, tokens = [], 0
    for _ in range(steps):
        t0 = time.perf_counter()
        rec = t.train_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens = rec["num_tokens"]
    return {"impl": "qdpo", "step_s": times, "padded_tokens": _padded(tok, ex), "tokens": tokens,
            "peak_mb": _peak_mb()}


def _padded(tok, ex) -> int:
    longest = max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in ex)
    return 2 * len(ex) * longest


def run_trl(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    fp, q, tok = _model()
    del fp
    rows = [{"prompt": m, "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for m, c, r in _pairs()]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    import tempfile

    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=N_PAIRS, max_steps=steps,
                     learning_rate=1e-5, logging_steps=1000, save_strategy="no", report_to=[],
                     bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                     dataloader_num_workers=0, max_length=512)
    trainer = DPOTrainer(model=q, args=args, train_dataset=Dataset.from_list(rows * steps), processing_class=tok,
                         callbacks=[Timer()])
    trainer.train()
    return {"impl": "trl", "step_s": times, "peak_mb": _peak_mb()}


def measure(impl: str, steps: int) -> dict:
    """Run one trainer in a fresh process; returns its record."""
    out = subprocess.run([sys.executable, __file__, "--one", impl, "--steps", str(steps)], capture_output=True,
                         text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} step benchmark failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_after_first(times: list[float]) -> float:
    rest = sorted(times[1:] or times)
    return rest[len(rest) // 2]


def test_train_step(benchmark):
    import importlib.util

    sys.path.insert(0, str(HERE))
    import common

    steps = 3
    rows = [measure("qdpo", steps)]
    if importlib.util.find_spec("trl") and importlib.util.find_spec("datasets"):
        rows.append(measure("trl", steps))
    base = None
    for r in rows:
        med = _median_after_first(r["step_s"])
        base = base or med
        rec = {"op": "train_step", "case": f"SmolLM2-135M W4g64 {N_PAIRS} pairs", "impl": r["impl"],
               "median_ms": med * 1e3, "p20_ms": min(r["step_s"][1:] or r["step_s"]) * 1e3,
               "p80_ms": max(r["step_s"][1:] or r["step_s"]) * 1e3, "device": common.device_name(),
               "peak_MiB": r["peak_mb"]}
        common.ROWS.append(rec)
    if len(rows) == 2:
        common.ROWS[-2]["speedup"] = _median_after_first(rows[1]["step_s"]) / _median_after_first(rows[0]["step_s"])
    benchmark.extra_info.update({r["impl"]: r for r in rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--one", choices=["qdpo", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        rec = run_qdpo(a.steps) if a.one == "qdpo" else run_trl(a.steps)
        print(json.dumps(rec))
        return
    rows = [measure("qdpo", a.steps)]
    try:
        rows.append(measure("trl", a.steps))
    except RuntimeError as e:
        print(f"TRL not measured: {str(e)[:300]}")
    for r in rows:
        print(f"{r['impl']:5s} step {_median_after_first(r['step_s']):.2f} s (all: "
              f"{', '.join(f'{t:.2f}' for t in r['step_s'])}), peak {r['peak_mb']:.0f} MB")
    if len(rows) == 2:
        print(f"qdpo is {_median_after_first(rows[1]['step_s']) / _median_after_first(rows[0]['step_s']):.2f}x "
              "faster than TRL")


if __name__ == "__main__":
    main()
