"""What running shared starts once saves: training-step time and peak memory, shared starts against whole rows.

The numbers in README ("Shared starts run once", "Multi-GPU and multi-node") come from these two commands:

    # one process: the step of bench_train_step (8 pairs of SmolLM2-135M W4 g64), optionally checkpointed
    python benchmarks/shared_starts.py step --mode shared [--checkpointing] [--steps 8]
    # several processes: the same pairs split across the ranks (gloo on the CPU, nccl on GPUs)
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/shared_starts.py step --dist fsdp --mode whole \
        --micro-batch-size 4 --steps 12
    # peak memory of one forward and backward: a 16-layer, 512-wide Llama, 8 pairs sharing a 300-token
    # system prompt, each pair a 150-token prompt (CPU: peak RSS growth; GPU: peak allocated)
    python benchmarks/shared_starts.py memory --mode shared [--checkpointing]

``--mode whole`` runs every row whole (``model.qdpo_no_prefix_sharing``); ``shared`` runs the shared starts
once: in parts in one process or under DDP, packed rows under FSDP2 (``qdpo.training.logps``). Each
command prints one JSON line (rank 0). Compare modes within one machine and one run of this script's
settings; the first steps include warm-up (the README quotes medians of the later steps).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def _peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(a) -> None:
    sys.path.insert(0, str(HERE))
    import bench_train_step as B

    from qdpo.training import distributed as D
    from qdpo.training.config import TrainConfig
    from qdpo.training.data import completion_ids
    from qdpo.training.prompts import prompt_ids
    from qdpo.training.trainer import Example, Trainer

    device = D.init(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        fp, q, tok = B._model()
        del fp
        if device.type == "cuda":
            q = q.to(device)
        q.qdpo_no_prefix_sharing = a.mode == "whole"
        ex = [Example(prompt_ids(tok, m), completion_ids(tok, c), completion_ids(tok, r), -50.0, -50.0)
              for m, c, r in B._pairs()]
        cfg = TrainConfig(steps=a.steps, batch_size=B.N_PAIRS, micro_batch_size=a.micro_batch_size, eval_every=0,
                          checkpoint_every=0, kd_weight=0.0, dist=a.dist,
                          activation_checkpointing=a.checkpointing).validate()
        t = Trainer(q, cfg, "qdpo", ex, Path(tempfile.mkdtemp()), pad_id=tok.pad_token_id, disable_progress=True)
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            t.train_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(round(time.perf_counter() - t0, 3))
        rec = {"what": "step", "mode": a.mode, "dist": a.dist, "ranks": D.world_size(),
               "micro_batch_size": a.micro_batch_size, "checkpointing": a.checkpointing, "step_s": times,
               "peak_MiB": round(_peak_mb())}
        if D.is_main():
            print(json.dumps(rec), flush=True)
    finally:
        D.shutdown(True)
    D.exit_process(0)  # as qdpo.train does: past the process group's teardown


def memory(a) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdpo.training.data import collate
    from qdpo.training.distributed import activation_checkpointing
    from qdpo.training.logps import decoder_hidden

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
                      num_attention_heads=8, num_key_value_heads=8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(cfg).to(device).train()
    model.qdpo_no_prefix_sharing = a.mode == "whole"
    if a.checkpointing:
        activation_checkpointing(model)
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, 100, (n,), generator=g).tolist()

    system = tokens(300)
    prompts = [system + tokens(150) for _ in range(8)]
    batch = collate([(p, tokens(40)) for p in prompts] + [(p, tokens(40)) for p in prompts], 0).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _peak_mb() if device == "cpu" else torch.cuda.memory_allocated() / 2**20
    decoder_hidden(model, batch).float().pow(2).mean().backward()
    rec = {"what": "memory", "mode": a.mode, "checkpointing": a.checkpointing, "device": device,
           "peak_growth_MiB": round(_peak_mb() - base)}
    print(json.dumps(rec), flush=True)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["step", "memory"])
    p.add_argument("--mode", choices=["shared", "whole"], default="shared")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (per decoder layer)")
    p.add_argument("--dist", choices=["auto", "none", "ddp", "fsdp"], default="auto", help="step: under torchrun")
    p.add_argument("--micro-batch-size", type=int, default=8, help="step: pairs per micro-batch on each rank")
    p.add_argument("--steps", type=int, default=8, help="step: optimizer steps timed")
    a = p.parse_args()
    step(a) if a.what == "step" else memory(a)


if __name__ == "__main__":
    main()
