"""``python -m qdpo.train`` end to end on tiny random-weight models of many transformers architectures.

What README's "Models" paragraph says ran the pipeline comes from this script. Each architecture is built
from its config (2 layers, hidden 64, the test suite's 200-word tokenizer and chat template), saved, and
trained with a few QDPO steps: generation, quantization, pairs, training, evaluation, export and the
export's reload all run. Extra arguments after ``--`` go to ``qdpo.train``::

    python benchmarks/arch_sweep.py                                 # every architecture, RTN W4 g32
    python benchmarks/arch_sweep.py --archs Falcon,GPT2 -- --init awq --method all --activation-checkpointing
    python benchmarks/arch_sweep.py --group-size -1 -- --bits 8 --symmetric --learn-scales
    python benchmarks/arch_sweep.py --nproc 2 -- --dist fsdp --device cpu   # torchrun, 2 processes (gloo)

One line per architecture (``rc``, the test split's flip rate before and after, what the export check
recorded); ``--out DIR/results.json`` keeps them. The models are random, so the flip rates say only that
the run completed, not how well QDPO works. An architecture the installed transformers lacks is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_experts import ARCHS as EXPERT_LAYOUTS  # noqa: E402
from tests.test_experts import MORE_ARCHS as MORE_EXPERT_LAYOUTS  # noqa: E402

# name: what differs from the base sizes (head_dim where the config's default is not hidden / heads)
DENSE = {
    "Llama": {}, "Qwen2": {}, "Qwen3": {"head_dim": 16}, "Mistral": {}, "Gemma": {"head_dim": 16},
    "Gemma2": {"head_dim": 16}, "Gemma3Text": {"head_dim": 16}, "Phi": {}, "Phi3": {}, "Olmo": {}, "Olmo2": {},
    "Olmo3": {}, "Granite": {}, "Cohere": {}, "Cohere2": {}, "StableLm": {}, "Starcoder2": {}, "GPTNeoX": {},
    "Glm": {}, "Glm4": {}, "SmolLM3": {}, "Exaone4": {}, "Helium": {"head_dim": 16}, "Arcee": {},
    "Ernie4_5": {}, "SeedOss": {}, "Apertus": {}, "Falcon": {}, "GPT2": {},
}
# the test suite's MoE layouts (tests/test_experts.py), and three more
MOE = {**EXPERT_LAYOUTS, **MORE_EXPERT_LAYOUTS,
       "Olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
       "GraniteMoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
       "Ernie4_5_Moe": {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32}}
ARCHS = {**DENSE, **MOE}
MODEL_CLASS = {"Llama4Text": "Llama4ForCausalLM", "GPT2": "GPT2LMHeadModel", "Gemma3Text": "Gemma3ForCausalLM"}


def build(arch: str, directory: Path) -> None:
    """A tiny random ``arch`` model and the test tokenizer, saved in ``directory``."""
    import torch
    import transformers

    from tests.test_pipeline import VOCAB, _tokenizer

    transformers.utils.logging.disable_progress_bar()
    if arch == "GPT2":
        kw = dict(n_embd=64, n_layer=2, n_head=4)
    else:
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
    kw.update(vocab_size=VOCAB, eos_token_id=2, pad_token_id=2, bos_token_id=None, **ARCHS[arch])
    config = getattr(transformers, f"{arch}Config")(**kw)
    torch.manual_seed(0)
    model = getattr(transformers, MODEL_CLASS.get(arch, f"{arch}ForCausalLM"))(config)
    with torch.no_grad():  # larger weights than the configs' init, so quantization flips some answers
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    _tokenizer(chat=True).save_pretrained(directory)


def summary(out: Path) -> str:
    m = json.loads((out / "metrics.json").read_text())
    flips = {k: v.get("flip_rate") for k, v in m.get("eval", {}).items()}
    export = m.get("training", {}).get("qdpo", {}).get("export", {})
    check = {k: export[k] for k in ("reproduces_eval", "compressed_tensors_max_abs_logit_diff",
                                    "compressed_tensors_checked") if k in export}
    return f"flip {flips.get('initial')} -> {flips.get('qdpo')}, export {check}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="all", help="comma-separated names of ARCHS (default: all)")
    ap.add_argument("--out", default="runs/arch_sweep", help="models, runs and results.json go here")
    ap.add_argument("--group-size", default="32")
    ap.add_argument("--nproc", type=int, default=1, help="> 1: each run under torchrun with this many processes")
    ap.add_argument("train_args", nargs="*", help="after --: more qdpo.train arguments")
    args = ap.parse_args(argv)
    import transformers

    from tests.test_pipeline import _prompts

    names = list(ARCHS) if args.archs == "all" else args.archs.split(",")
    unknown = [n for n in names if n not in ARCHS]
    if unknown:
        ap.error(f"unknown architectures {unknown}; choose from {', '.join(ARCHS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = _prompts(out / "prompts.jsonl", n=15, system="w7 w8 w9 w10 w11 w12")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable, "-m", "qdpo.train"] if args.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "-m", "qdpo.train"]
    results = {}
    for arch in names:
        if not hasattr(transformers, f"{arch}Config"):
            results[arch] = f"skipped: transformers {transformers.__version__} has no {arch}Config"
            print(f"{arch:14s} {results[arch]}", flush=True)
            continue
        model_dir, run_dir = out / f"model_{arch}", out / f"run_{arch}"
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        build(arch, model_dir)
        t = time.perf_counter()
        cmd = launcher + ["--model", str(model_dir), "--prompts", str(prompts), "--output-dir", str(run_dir),
                          "--max-new-tokens", "6", "--steps", "4", "--batch-size", "4", "--micro-batch-size", "2",
                          "--group-size", args.group_size, "--eval-every", "2", "--checkpoint-every", "2",
                          "--lr", "1e-3", *args.train_args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        (out / f"log_{arch}.txt").write_text(proc.stdout + proc.stderr)
        if proc.returncode == 0:
            results[arch] = f"rc=0 ({time.perf_counter() - t:.0f} s): {summary(run_dir)}"
        else:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            results[arch] = f"rc={proc.returncode}: {last[:300]} (log_{arch}.txt)"
        print(f"{arch:14s} {results[arch]}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    failed = [a for a, r in results.items() if r.startswith("rc=") and not r.startswith("rc=0")]
    print(f"{len(results) - len(failed)} of {len(results)} ran" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
