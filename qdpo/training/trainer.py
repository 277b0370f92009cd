"""The training loop: QDPO (DPO through fake-quant), KD and SFT on the same data and budget.

An explicit loop: for each optimizer step, take ``batch_size`` examples in a
seeded per-epoch order, run them in ``micro_batch_size`` pieces (gradient
accumulation), clip, step AdamW, step the warm-up + cosine schedule, log one
line per ``log_every`` steps, check the validation flip rate every
``eval_every`` steps (early stopping keeps the best weights), and write an
atomic checkpoint every ``checkpoint_every`` steps. Only the quantized
layers' latent weights (and, with ``learn_scales``, their scales) train;
everything else is frozen.

Losses per method (all per micro-batch, averaged over the batch):

* ``qdpo``: the DPO loss of ``qdpo.training.losses`` on chosen (FP answer)
  vs rejected (quantized answer), reference = the initial quantized model,
  plus optional ``nll_weight`` · NLL(chosen) and ``kd_weight`` · KL(FP‖q) on
  the chosen tokens; ``window`` keeps k tokens after the common prefix;
* ``kd``: mean token KL(FP ‖ q) on the FP answers (the paper's baseline);
* ``sft``: mean token NLL of the FP answers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qdpo.quant.linear import QuantLinear
from qdpo.training.config import TrainConfig
from qdpo.training.data import Batch, collate
from qdpo.training.logps import completion_hidden, label_logps, output_layer, token_kl
from qdpo.training.losses import dpo_loss, preference_metrics

log = logging.getLogger("qdpo.train")


@dataclass
class Example:
    """One training item: an FP answer (``chosen``) and, for QDPO, a quantized one (``rejected``)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None = None
    ref_chosen: float = 0.0  # summed log-prob of chosen under the initial quantized model
    ref_rejected: float = 0.0

    def windowed(self, k: int) -> "Example":
        """Keep ``k`` answer tokens after the common prefix of chosen and rejected.

        The reference log-probs are carried over unchanged: they must already be
        those of the cut answers (``stages.windowed_reference`` computes them).
        """
        if not k or self.rejected_ids is None:
            return self
        from qdpo.training.data import common_prefix

        end = common_prefix(self.chosen_ids, self.rejected_ids) + k
        if end >= max(len(self.chosen_ids), len(self.rejected_ids)):
            return self  # nothing to cut: keep the reference log-probs
        return Example(self.prompt_ids, self.chosen_ids[:end], self.rejected_ids[:end], self.ref_chosen,
                       self.ref_rejected)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read: printed without a traceback."""


# ----------------------------------------------------------------------------- setup
def freeze_for_training(model, learn_scales: bool) -> tuple[list, list]:
    """Freeze everything but the quantized layers' latent weights (and scales); return both lists."""
    for p in model.parameters():
        p.requires_grad_(False)
    weights, scales = [], []
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m.mode != "train":
                raise ValueError("the model's QuantLinear layers are packed; convert them with to_train()")
            m.weight.requires_grad_(True)
            weights.append(m.weight)
            if learn_scales:
                if not isinstance(m.scales, torch.nn.Parameter):
                    m.scales = torch.nn.Parameter(m.scales.detach().clone())
                m.scales.requires_grad_(True)
                scales.append(m.scales)
    if not weights:
        raise ValueError("the model has no QuantLinear layers to train; quantize it first")
    return weights, scales


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to 1, then cosine decay to 0.1 at the last step."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        rest = max(cfg.steps - cfg.warmup_steps, 1)
        t = min((step - cfg.warmup_steps) / rest, 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return f


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: a deterministic function of (n, step, seed)."""
    out = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(j, n)
        out.append(epoch_order(n, seed, epoch)[pos])
    return out


# ----------------------------------------------------------------------------- losses
def _autocast(cfg: TrainConfig, device: torch.device):
    use = device.type == "cuda" and cfg.dtype in ("auto", "bfloat16")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def micro_loss(model, fp_model, examples: list[Example], cfg: TrainConfig, method: str, pad_id: int,
               device) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch (mean over its examples) and its metrics."""
    w, b = output_layer(model)
    if method in ("kd", "sft"):
        batch = collate([(e.prompt_ids, e.chosen_ids) for e in examples], pad_id).to(device)
        with _autocast(cfg, device):
            h, labels, row = completion_hidden(model, batch)
        if method == "sft":
            tok = -label_logps(h, w, b, labels, cfg.logps_chunk)
        else:
            tok = _kd_tokens(model, fp_model, batch, h, cfg, device)
        return tok.mean(), {"loss": tok.mean().item(), "num_tokens": batch.num_tokens}
    n = len(examples)
    batch = collate([(e.prompt_ids, e.chosen_ids) for e in examples]
                    + [(e.prompt_ids, e.rejected_ids) for e in examples], pad_id).to(device)
    with _autocast(cfg, device):
        h, labels, row = completion_hidden(model, batch)
    lp = label_logps(h, w, b, labels, cfg.logps_chunk)
    total = torch.zeros(2 * n, device=lp.device).index_add(0, row, lp)
    count = torch.zeros(2 * n, device=lp.device).index_add(0, row, torch.ones_like(lp))
    ref = torch.tensor([e.ref_chosen for e in examples] + [e.ref_rejected for e in examples], device=lp.device)
    pol = total
    if cfg.loss == "ipo":  # IPO compares per-token mean log-probs
        pol, ref = total / count.clamp_min(1), ref / count.clamp_min(1)
    losses, rc, rr = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], cfg.beta, cfg.loss, cfg.label_smoothing)
    loss = losses.mean()
    metrics = preference_metrics(losses, rc, rr, total[:n], total[n:])
    if cfg.nll_weight:
        nll = -(total[:n] / count[:n].clamp_min(1)).mean()
        loss = loss + cfg.nll_weight * nll
        metrics["nll"] = nll.item()
    if cfg.kd_weight:
        chosen = row < n
        cb = Batch(batch.input_ids[:n], batch.attention_mask[:n], batch.completion_mask[:n])
        kd = _kd_tokens(model, fp_model, cb, h[chosen], cfg, device).mean()
        loss = loss + cfg.kd_weight * kd
        metrics["kd"] = kd.item()
    metrics["loss"] = loss.item()
    metrics["num_tokens"] = batch.num_tokens
    return loss, metrics


def _kd_tokens(model, fp_model, batch: Batch, h, cfg: TrainConfig, device) -> torch.Tensor:
    if fp_model is None:
        raise ValueError("KD needs the FP model")
    w, b = output_layer(model)
    with torch.no_grad(), _autocast(cfg, device):
        h_t, _, _ = completion_hidden(fp_model, batch)
    wt, bt = output_layer(fp_model)
    return token_kl(h, w, b, h_t, wt, bt, cfg.logps_chunk)


# ----------------------------------------------------------------------------- checkpoints
def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {path} ({e.strerror or e}); free space and rerun "
                              "with --resume: the previous checkpoint is intact") from None


def latest_checkpoint(ckpt_dir: Path) -> dict | None:
    """The newest checkpoint that loads; None if there is none."""
    for path in sorted(ckpt_dir.glob("step-*.pt"), reverse=True):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file: fall back to the previous one
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, e)
    return None


# ----------------------------------------------------------------------------- the loop
class Trainer:
    """Trains ``model`` in place with ``method`` on ``examples``; see the module docstring."""

    def __init__(self, model, cfg: TrainConfig, method: str, examples: list[Example], out_dir: Path,
                 fp_model=None, val=None, pad_id: int = 0, disable_progress: bool = False):
        if not examples:
            raise ValueError(f"no training examples for {method}")
        self.model, self.cfg, self.method, self.fp_model = model, cfg, method, fp_model
        self.examples = examples  # QDPO: already cut to cfg.window, with matching reference log-probs
        self.out_dir, self.pad_id, self.val = Path(out_dir), pad_id, val  # val: (examples, FPTargets)
        self.device = next(model.parameters()).device
        self.disable = disable_progress
        weights, scales = freeze_for_training(model, cfg.learn_scales)
        groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if scales:
            groups.append({"params": scales, "lr": cfg.scale_lr, "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.history: list[dict] = []
        self.best = {"metric": float("inf"), "step": 0, "bad": 0, "state": None}
        self.step = 0

    # -- persistence
    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "trainable": trainable_state(self.model), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "rng": torch.get_rng_state(), "best": self.best,
                 "history": json.dumps(self.history)}
        _atomic_save(state, self.ckpt_dir / f"step-{self.step:06d}.pt")
        for old in sorted(self.ckpt_dir.glob("step-*.pt"))[:-2]:  # keep the last two
            old.unlink(missing_ok=True)

    def resume(self) -> bool:
        ck = latest_checkpoint(self.ckpt_dir)
        if ck is None:
            return False
        load_trainable_state(self.model, ck["trainable"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        self.best, self.step = ck["best"], ck["step"]
        self.history = json.loads(ck["history"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / "metrics.jsonl").open("w") as f:  # drop lines logged after the checkpoint
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        log.info("%s: resumed from step %d", self.method, self.step)
        return True

    # -- evaluation for early stopping
    def validate(self) -> float | None:
        if self.val is None or not self.cfg.eval_every:
            return None
        from qdpo.eval.metrics import flip_rate

        examples, targets = self.val
        fr = flip_rate(self.model, examples, targets, batch_size=self.cfg.micro_batch_size * 2,
                       chunk=self.cfg.logps_chunk, disable=True)
        if fr < self.best["metric"] - 1e-12:
            self.best.update(metric=fr, step=self.step, bad=0, state=trainable_state(self.model))
        else:
            self.best["bad"] += 1
        return fr

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")

    # -- one optimizer step
    def train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        idx = batch_indices(len(self.examples), self.step, cfg.batch_size, cfg.seed)
        micro = [idx[i:i + cfg.micro_batch_size] for i in range(0, len(idx), cfg.micro_batch_size)]
        agg: dict[str, float] = {}
        t0 = time.perf_counter()
        for mb in micro:
            loss, m = micro_loss(self.model, self.fp_model, [self.examples[i] for i in mb], cfg, self.method,
                                 self.pad_id, self.device)
            (loss * len(mb) / len(idx)).backward()
            for k, v in m.items():
                agg[k] = agg.get(k, 0.0) + (v if k == "num_tokens" else v * len(mb) / len(idx))
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if cfg.max_grad_norm:
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        else:
            gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)).item()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step += 1
        dt = time.perf_counter() - t0
        return {"step": self.step, **agg, "grad_norm": gn, "lr": self.sched.get_last_lr()[0],
                "tokens_per_s": agg.get("num_tokens", 0) / dt, "step_s": dt}

    def run(self, resume: bool = False) -> dict:
        """Train to ``cfg.steps`` (or early stop); leave the best weights in the model; return a summary."""
        cfg = self.cfg
        if not (resume and self.resume()):
            metrics = self.out_dir / "metrics.jsonl"
            metrics.unlink(missing_ok=True)
            fr = self.validate()
            self._log({"step": 0, **({"val/flip_rate": fr} if fr is not None else {})})
        t0 = time.perf_counter()
        stopped = False
        with tqdm(total=cfg.steps, initial=self.step, desc=f"train {self.method}", unit="step",
                  disable=self.disable) as bar:
            while self.step < cfg.steps and not stopped:
                rec = self.train_step()
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    rec["val/flip_rate"] = self.validate()
                    stopped = bool(cfg.patience) and self.best["bad"] >= cfg.patience
                self._log(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if self.step % max(cfg.log_every, 1) == 0:
                    log.info("%s step %d/%d loss %.4f margin %s acc %s grad %.3g lr %.2e %.0f tok/s%s", self.method,
                             self.step, cfg.steps, rec["loss"], _fmt(rec.get("rewards/margins")),
                             _fmt(rec.get("rewards/accuracies")), rec["grad_norm"], rec["lr"], rec["tokens_per_s"],
                             f" val flip {rec['val/flip_rate']:.4f}" if rec.get("val/flip_rate") is not None else "")
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not stopped:
                    self.save_checkpoint()
        if stopped:
            log.info("%s: early stop at step %d (best validation flip rate %.4f at step %d)", self.method,
                     self.step, self.best["metric"], self.best["step"])
        if self.best["state"] is not None:
            load_trainable_state(self.model, self.best["state"])
        self.save_checkpoint()
        self.model.eval()
        return {"steps_run": self.step, "best_step": self.best["step"],
                "best_val_flip_rate": None if self.best["state"] is None else self.best["metric"],
                "early_stopped": stopped, "train_s": time.perf_counter() - t0}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"
