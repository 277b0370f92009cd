"""One Trainer run on the tiny test model: in-process, or as one rank under torchrun (tests/test_distributed.py).

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/dist_worker.py DATA.json OUT_DIR --dist fsdp [--fail-at STEP --fail-rank R] [--resume]

Rank 0 writes ``OUT_DIR/result.pt``: the logged history and the final trainable weights. Each rank writes
``OUT_DIR/calls-rankR.json``: per decoder forward, ``[rows of each decoder call, rows of the batch]``: one call
on every row (whole rows), 2-3 calls (shared starts in parts) or one on fewer rows (groups packed).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

sys.path.insert(0, str(Path(__file__).parent))

from test_trainer import tiny_fp  # noqa: E402 - the same tiny Llama as the trainer tests

import qdpo  # noqa: E402
from qdpo.eval.metrics import fp_targets  # noqa: E402
from qdpo.training import distributed as D  # noqa: E402
from qdpo.training import logps  # noqa: E402
from qdpo.training.config import TrainConfig  # noqa: E402
from qdpo.training.trainer import Example, Trainer  # noqa: E402

# SGD-like enough to compare weights: few steps, clipping off; see test_distributed for the tolerance
SETTINGS = dict(steps=8, batch_size=4, micro_batch_size=2, lr=1e-3, warmup_steps=1, eval_every=4, patience=0,
                checkpoint_every=3, beta=0.5, seed=3, max_grad_norm=0.0, kd_weight=0.0)


def models():
    """``(fp, q)``: the tiny FP Llama and its W4 per-row RTN copy (deterministic)."""
    fp = tiny_fp(0)
    q = copy.deepcopy(fp)
    qdpo.quantize_model(q, qdpo.QuantSpec(4, -1))
    return fp, q


def write_examples(path: Path, examples: list[Example]) -> None:
    path.write_text(json.dumps([vars(e) for e in examples]))


def read_examples(path: Path) -> list[Example]:
    return [Example(**r) for r in json.loads(Path(path).read_text())]


class SimulatedFailure(RuntimeError):
    pass


def train(data: Path, out: Path, resume: bool = False, fail_at: int = 0, fail_rank: int = -1, **cfg) -> dict:
    """Train the quantized tiny model on ``data``; return ``{"history", "weights"}`` (weights on rank 0 only)."""
    fp, q = models()
    examples = read_examples(data)
    val_ex = [(e.prompt_ids, e.chosen_ids) for e in examples[:6]]
    val = (val_ex, fp_targets(fp, val_ex, disable=True))
    t = Trainer(q, TrainConfig(**{**SETTINGS, **cfg}).validate(), "qdpo", examples, out, val=val, pad_id=1)
    if fail_at:
        step = t.train_step

        def failing_step():
            rec = step()
            if t.step == fail_at and D.rank() == fail_rank:
                raise SimulatedFailure(f"rank {D.rank()}: simulated failure at step {t.step}")
            return rec

        t.train_step = failing_step
    calls = []  # per decoder_hidden: the rows of each decoder call, then the batch's (see the module docstring)
    hidden = logps.decoder_hidden

    def counting(model, batch):
        n = []
        hook = logps.base_model(model).register_forward_pre_hook(
            lambda m, a, kw: n.append(kw["input_ids"].shape[0]), with_kwargs=True)
        try:
            return hidden(model, batch)
        finally:
            hook.remove()
            calls.append([n, batch.input_ids.shape[0]])

    logps.decoder_hidden = counting
    try:
        t.run(resume=resume)
    finally:
        logps.decoder_hidden = hidden
    (out / f"calls-rank{D.rank()}.json").write_text(json.dumps(calls))
    final = t.final_model(models()[1])
    weights = None if final is None else {n: p.detach().clone() for n, p in final.named_parameters()
                                          if p.requires_grad}
    return {"history": t.history, "weights": weights}


@record  # an uncaught error's message goes into torchrun's summary
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--dist", default="auto")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--latent-dtype", default="float32")
    p.add_argument("--fail-at", type=int, default=0)
    p.add_argument("--fail-rank", type=int, default=-1)
    a = p.parse_args()
    D.init(torch.device("cpu"))
    clean = False
    try:
        res = train(a.data, a.out, a.resume, a.fail_at, a.fail_rank, dist=a.dist,
                    activation_checkpointing=a.activation_checkpointing, latent_dtype=a.latent_dtype)
        if D.is_main():
            torch.save(res, a.out / "result.pt")
        clean = True
    finally:
        D.shutdown(clean)
    D.exit_process(0)  # as qdpo.train does: past the process group's teardown


if __name__ == "__main__":
    main()
