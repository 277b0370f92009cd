"""The training loop: QDPO (DPO through fake-quant), KD and SFT on the same data and budget.

An explicit loop: for each optimizer step, take ``batch_size`` examples in a
seeded per-epoch order, run them in ``micro_batch_size`` pieces (gradient
accumulation), clip, step AdamW, step the warm-up + cosine schedule, log one
line per ``log_every`` steps, check the validation flip rate every
``eval_every`` steps (early stopping keeps the best weights), and write a
checkpoint every ``checkpoint_every`` steps. Only the quantized layers'
latent weights (and, with ``learn_scales``, their scales) train; everything
else is frozen.

Under ``torchrun`` (``qdpo.training.distributed``) the model is wrapped with
FSDP2 or DDP, each rank runs its contiguous slice of every global batch (so
the global batch, the loss curve and the weights equal a one-process run's),
metrics are summed over the ranks, validation runs on every rank and rank 0's
value decides early stopping everywhere, and only rank 0 writes logs and
shows progress. Checkpoints are ``torch.distributed.checkpoint`` folders
(``checkpoints/step-NNNNNN/``, complete once ``.metadata`` exists, the last
two kept) that any number of processes can resume.

Losses per method, each a mean over the whole (global) batch, whatever its
split into micro-batches and ranks: per-pair terms are averaged over the
batch's examples, per-token terms over the batch's answer tokens (each
micro-batch contributes its sum over the batch's count, so the gradient is
that of one forward over the batch):

* ``qdpo``: the DPO loss of ``qdpo.training.losses`` on chosen (FP answer)
  vs rejected (quantized answer), reference = the initial quantized model,
  plus optional ``nll_weight`` · NLL(chosen) and ``kd_weight`` · KL(FP‖q) on
  the chosen tokens; ``window`` keeps k tokens after the common prefix;
* ``kd``: mean token KL(FP ‖ q) on the FP answers (the paper's baseline);
* ``sft``: mean token NLL of the FP answers.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qdpo.quant.experts import QuantExpertTensor
from qdpo.quant.linear import QuantLinear

QUANTIZED = (QuantLinear, QuantExpertTensor)  # what holds latent weights
from qdpo.training import distributed as D
from qdpo.training.config import TrainConfig
from qdpo.training.data import Batch, collate
from qdpo.training.logps import completion_hidden, label_logps, logit_transform, output_layer, token_kl
from qdpo.training.losses import dpo_loss, preference_metrics
from qdpo.training.optim import make_optimizer, set_latent_dtype

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
        if isinstance(m, QUANTIZED):
            if m.mode != "train":
                raise ValueError("the model's quantized layers are packed; convert them with to_train()")
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


def trainable_params(model) -> tuple[list, list]:
    """The latent weights and learned scales of the quantized layers and expert tensors (after any wrapping
    replaced them)."""
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED)]
    return [m.weight for m in layers], [m.scales for m in layers if m.scales.requires_grad]


def prepare_for_training(model, cfg: TrainConfig) -> None:
    """Latent weights in ``cfg.latent_dtype``, everything but them (and learned scales) frozen, dropout
    off (:func:`disable_dropout`)."""
    set_latent_dtype(model, cfg.latent_dtype)
    freeze_for_training(model, cfg.learn_scales)
    disable_dropout(model)


def disable_dropout(model) -> None:
    """Dropout off in train mode too, in place: every dropout module's ``p`` and every module's float
    attribute named for a dropout (``attention_dropout``, what transformers' attention functions read in
    train mode; OPT's ``dropout`` and ``layerdrop``, Starcoder2's ``residual_dropout``, Bloom's
    ``hidden_dropout``, GPT-BigCode's ``attn_dropout``: probabilities their layers pass to
    ``F.dropout``) become 0. The training targets the deterministic (eval-mode) answers and log-probs:
    the FP model's answers, the reference log-probs of the pairs, the KD teacher's distributions. With
    dropout (GPT-2's 0.1, for one) the policy's log-probs of a DPO pair would differ from the reference's
    at step 0 by noise."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if "drop" in name and type(value) is float:
                setattr(m, name, 0.0)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def lr_lambda(cfg: TrainConfig):
    """The learning-rate factor of step ``step`` (0-based): linear warm-up to 1, then cosine decay, reaching 0.1
    after the last step."""
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
def compute_dtype(dtype: str, device_type: str) -> str:
    """What ``--dtype`` computes in on ``device_type``: bf16 autocast on a GPU (auto, bfloat16), else fp32."""
    return "bfloat16" if device_type == "cuda" and dtype in ("auto", "bfloat16") else "float32"


def _autocast(cfg: TrainConfig, device: torch.device):
    use = compute_dtype(cfg.dtype, device.type) == "bfloat16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def answer_tokens(examples: list[Example]) -> int:
    """The chosen-answer tokens of ``examples`` that a forward predicts (all but a first token without a prompt
    before it): what the per-token terms (KD, SFT) average over."""
    return sum(max(len(e.chosen_ids) - (not e.prompt_ids), 0) for e in examples)


def micro_loss(model, fp_model, examples: list[Example], cfg: TrainConfig, method: str, pad_id: int,
               device, teacher: "TeacherCache | None" = None, whole: tuple[int, int] | None = None
               ) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch and its metrics, as its share of the loss of the batch it belongs to.

    ``whole``: ``(examples, answer tokens)`` of that batch (:func:`answer_tokens`); per-pair terms are
    summed over this micro-batch's examples and divided by the first, per-token terms (KD, SFT) summed over
    its tokens and divided by the second, so the shares of a batch's micro-batches add up to the batch's
    loss (and metrics) however it is split. None: the micro-batch is the whole batch (the means over it).

    ``teacher``: the FP model's hidden states at the chosen answers' positions,
    kept across steps (the FP model is frozen and the chosen answers fixed), so
    the KD term runs the FP decoder once per example instead of once per step.
    """
    n = len(examples)
    n_all, tok_all = whole or (n, answer_tokens(examples))
    w, b = output_layer(model)
    if method in ("kd", "sft"):
        batch = collate([(e.prompt_ids, e.chosen_ids) for e in examples], pad_id).to(device)
        with _autocast(cfg, device):
            h, labels, row = completion_hidden(model, batch)
        if method == "sft":
            tok = -label_logps(h, w, b, labels, cfg.logps_chunk, logit_transform(model, batch))
        else:
            tok = _kd_tokens(model, fp_model, batch, h, cfg, device, examples, teacher)
        loss = tok.sum() / max(tok_all, 1)
        return loss, {"loss": loss.item(), "num_tokens": batch.num_tokens}
    batch = collate([(e.prompt_ids, e.chosen_ids) for e in examples]
                    + [(e.prompt_ids, e.rejected_ids) for e in examples], pad_id).to(device)
    with _autocast(cfg, device):
        h, labels, row = completion_hidden(model, batch)
    lp = label_logps(h, w, b, labels, cfg.logps_chunk, logit_transform(model, batch))
    total = torch.zeros(2 * n, device=lp.device).index_add(0, row, lp)
    count = torch.zeros(2 * n, device=lp.device).index_add(0, row, torch.ones_like(lp))
    ref = torch.tensor([e.ref_chosen for e in examples] + [e.ref_rejected for e in examples], device=lp.device)
    pol = total
    if cfg.loss == "ipo":  # IPO compares per-token mean log-probs
        pol, ref = total / count.clamp_min(1), ref / count.clamp_min(1)
    losses, rc, rr = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], cfg.beta, cfg.loss, cfg.label_smoothing)
    loss = losses.sum() / n_all
    metrics = {k: v * n / n_all for k, v in preference_metrics(losses, rc, rr, total[:n], total[n:]).items()}
    if cfg.nll_weight:
        nll = -(total[:n] / count[:n].clamp_min(1)).sum() / n_all
        loss = loss + cfg.nll_weight * nll
        metrics["nll"] = nll.item()
    if cfg.kd_weight:
        chosen = row < n
        cb = Batch(batch.input_ids[:n], batch.attention_mask[:n], batch.completion_mask[:n])
        kd = _kd_tokens(model, fp_model, cb, h[chosen], cfg, device, examples, teacher).sum() / max(tok_all, 1)
        loss = loss + cfg.kd_weight * kd
        metrics["kd"] = kd.item()
    metrics["loss"] = loss.item()
    metrics["num_tokens"] = batch.num_tokens
    return loss, metrics


def _kd_tokens(model, fp_model, batch: Batch, h, cfg: TrainConfig, device, examples: list[Example],
               teacher: "TeacherCache | None" = None) -> torch.Tensor:
    """Token KL(FP ‖ q) on ``batch`` (the chosen answers of ``examples``, one row each); ``h``: q's hidden."""
    if fp_model is None:
        raise ValueError("KD needs the FP model")
    w, b = output_layer(model)
    if teacher is None:
        teacher = TeacherCache(max_bytes=0)
    h_t = teacher.hidden(fp_model, batch, examples, cfg, device)
    wt, bt = output_layer(fp_model)
    return token_kl(h, w, b, h_t, wt, bt, cfg.logps_chunk, logit_transform(model, batch),
                    logit_transform(fp_model, batch))


class TeacherCache:
    """The FP model's hidden states at each example's chosen-answer positions, computed once.

    Keyed by the example's (prompt, chosen) token ids; kept in CPU memory up to
    ``max_bytes`` (then the rest is recomputed each time). The FP model runs on
    each missing example alone, so its hidden states are the same bits whatever
    batch first asked for them: in a batch, shared starts (``decoder_hidden``)
    and padding widths depend on the other rows and change the float rounding,
    and a resumed run, its cache empty, would meet each example in another batch
    than the straight run did.
    """

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes, self.bytes, self.rows = max_bytes, 0, {}

    def add(self, prompt_ids: list[int], chosen_ids: list[int], hidden: torch.Tensor) -> bool:
        """Keep ``hidden`` (``[len(chosen_ids), H]``, the FP model's at the chosen positions, e.g. from
        decoding) for that example; False when it does not fit in ``max_bytes``."""
        if hidden.shape[0] != len(chosen_ids):
            raise ValueError(f"hidden states for {hidden.shape[0]} positions but the chosen answer has "
                             f"{len(chosen_ids)} tokens")
        key, size = (tuple(prompt_ids), tuple(chosen_ids)), hidden.numel() * hidden.element_size()
        if key in self.rows:
            return True
        if self.bytes + size > self.max_bytes:
            return False
        self.rows[key] = hidden.detach().to("cpu")
        self.bytes += size
        return True

    @torch.no_grad()
    def hidden(self, fp_model, batch: Batch, examples: list[Example], cfg: TrainConfig, device) -> torch.Tensor:
        keys = [(tuple(e.prompt_ids), tuple(e.chosen_ids)) for e in examples]
        got = {i: self.rows[k] for i, k in enumerate(keys) if k in self.rows}
        missing = [i for i in range(len(keys)) if i not in got]
        for i in missing:  # one row, unpadded: see the class docstring
            n = int(batch.attention_mask[i].sum())
            one = Batch(batch.input_ids[i:i + 1, :n], batch.attention_mask[i:i + 1, :n],
                        batch.completion_mask[i:i + 1, :n])
            with _autocast(cfg, device):
                got[i], _, _ = completion_hidden(fp_model, one)
            self.add(*keys[i], got[i])
        return torch.cat([got[i].to(device) for i in range(len(keys))])


@torch.no_grad()
def sharded_flip_rate(model, examples, targets, batch_size: int, chunk: int) -> float:
    """``qdpo.eval.metrics.flip_rate`` for a model FSDP2 shards (call it through the Runner).

    The same length-sorted batches and FP targets, but without caching every
    layer's ŵ up front (the layers are sharded until their own forward): each
    QuantLinear fake-quantizes its gathered weight as it runs.
    """
    was = model.training
    model.eval()
    head, device = model.get_output_embeddings(), next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
    flips = 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        h, _, _ = completion_hidden(model, collate([examples[i] for i in idx], 0).to(device))
        want = torch.cat([targets.example(i)[0] for i in idx]).to(device)
        for c in range(0, h.shape[0], chunk):
            flips += int((head(h[c:c + chunk]).argmax(-1) != want[c:c + chunk]).sum())
    model.train(was)
    return flips / targets.num_tokens


# ----------------------------------------------------------------------------- the loop
def needs_fp(method: str, cfg: TrainConfig) -> bool:
    """Whether training ``method`` runs the FP model (KD, or QDPO with a KD term)."""
    return method == "kd" or (method == "qdpo" and cfg.kd_weight > 0)


class Trainer:
    """Trains ``model`` in place with ``method`` on ``examples``; see the module docstring."""

    def __init__(self, model, cfg: TrainConfig, method: str, examples: list[Example], out_dir: Path,
                 fp_model=None, val=None, pad_id: int = 0, disable_progress: bool = False,
                 teacher: TeacherCache | None = None):
        if not examples:
            raise ValueError(f"no training examples for {method}")
        if fp_model is None and needs_fp(method, cfg):
            raise ValueError(f"{method} with kd_weight {cfg.kd_weight} needs fp_model (the teacher); "
                             "pass it, or set kd_weight=0 for plain DPO")
        self.model, self.cfg, self.method, self.fp_model = model, cfg, method, fp_model
        self.teacher = teacher or TeacherCache()  # FP hidden states on the chosen answers, for the KD terms
        self.examples = examples  # QDPO: already cut to cfg.window, with matching reference log-probs
        self.out_dir, self.pad_id, self.val = Path(out_dir), pad_id, val  # val: (examples, FPTargets)
        self.device = next(model.parameters()).device
        self.disable = disable_progress or not D.is_main()
        self.mode = D.resolve_mode(cfg.dist, cfg.batch_size, cfg.learn_scales, cfg.latent_dtype)  # none|ddp|fsdp
        prepare_for_training(model, cfg)
        first = examples[0]  # the models' logit scale and soft-capping, found before any wrapping (logit_transform)
        for m in (model, fp_model if needs_fp(method, cfg) else None):
            if m is not None:
                logit_transform(m, first.prompt_ids + first.chosen_ids)
        if cfg.activation_checkpointing:
            D.activation_checkpointing(model)
        self.runner = D.wrap(model, self.mode, self.device)  # runner(fn) = fn(model) under FSDP2/DDP's hooks
        weights, scales = trainable_params(model)
        groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if scales:
            groups.append({"params": scales, "lr": cfg.scale_lr, "weight_decay": 0.0})
        self.opt = make_optimizer(groups, cfg.latent_dtype)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.history: list[dict] = []
        self.best = {"metric": float("inf"), "step": 0, "bad": 0, "state": None}
        self.step = 0
        self.saved_step = -1  # the step of the newest checkpoint this process wrote
        self.unloadable: set[Path] = set()  # checkpoints resume failed to load: they must not prune this run's

    # -- persistence
    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> None:
        meta = {"step": self.step, "scheduler": self.sched.state_dict(), "history": self.history,
                "best": {k: v for k, v in self.best.items() if k != "state"},
                "has_best_state": self.best["state"] is not None, "world_size": D.world_size()}
        tensors = {"rng": torch.get_rng_state()}
        if self.best["state"] is not None:
            tensors["best_state"] = self.best["state"]
        folder = self.ckpt_dir / f"step-{self.step:06d}"
        try:
            D.save_checkpoint(folder, self.model, self.opt, tensors, meta, unloadable=self.unloadable - {folder})
            self.saved_step = self.step
            self.unloadable.discard(folder)
        except OSError as e:
            raise D.mark_from_main(CheckpointError(
                f"could not write checkpoint {folder} ({e.strerror or e}); free space and rerun with --resume: the "
                "previous checkpoint is intact"), e) from None

    def resume(self) -> bool:
        """Continue from the newest checkpoint that loads (saved by any number of processes)."""
        start = None  # the state before any load: a checkpoint that fails part-way has written into it
        for folder in reversed(D.complete_checkpoints(self.ckpt_dir)):
            if start is None:
                start = self._fresh_state()
            try:
                meta = self._load(folder)
                self.saved_step = self.step  # on disk already: a finished run is not written again
            except (Exception, D.CheckpointException) as e:  # noqa: BLE001 - a damaged one: try the one before
                log.warning("checkpoint %s does not load (%s); trying an older one", folder, D.failure_reason(e))
                self.unloadable.add(folder)
                # as before the load: DCP created the AdamW state (a step with zero gradients) and filled part
                # of it, and of the weights, and a meta that does not fit may fail after the optimizer took the
                # checkpoint's learning rates; a run that finds no loadable checkpoint starts as a fresh one
                self._restore(start)
                continue
            if D.is_main():
                self.out_dir.mkdir(parents=True, exist_ok=True)
                with (self.out_dir / "metrics.jsonl").open("w") as f:  # drop lines logged after the checkpoint
                    f.writelines(json.dumps(r) + "\n" for r in self.history)
            log.info("%s: resumed from step %d (saved by %d process(es))", self.method, self.step, meta["world_size"])
            return True
        return False

    def _fresh_state(self) -> tuple:
        return (trainable_state(self.model), copy.deepcopy(self.opt.state_dict()), self.sched.state_dict(),
                torch.get_rng_state(), dict(self.best))

    def _restore(self, state: tuple) -> None:
        weights, opt, sched, rng, best = state
        load_trainable_state(self.model, weights)
        self.opt.load_state_dict(copy.deepcopy(opt))  # its param groups' learning rates too; no AdamW state
        self.sched.load_state_dict(sched)
        torch.set_rng_state(rng)
        self.best = dict(best)

    def _load(self, folder: Path) -> dict:
        tensors = {"rng": torch.get_rng_state()}  # templates DCP loads into, laid out like this run's
        if D.read_meta(folder)["has_best_state"]:
            tensors["best_state"] = trainable_state(self.model)
        meta = D.load_checkpoint(folder, self.model, self.opt, tensors)
        self.sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng"])
        self.best = {**meta["best"], "state": tensors.get("best_state")}
        self.step, self.history = meta["step"], meta["history"]
        return meta

    def final_model(self, template):
        """The trained weights in a plain module, for evaluation and export.

        ``self.model`` itself unless FSDP2 sharded it; then a copy of
        ``template`` (the untrained model) holding the gathered weights, on
        rank 0 (None on the others). Every rank must call it.
        """
        if self.mode != "fsdp":
            return self.model
        state = D.full_tensors({n: p for n, p in self.model.named_parameters() if p.requires_grad})
        if not D.is_main():
            return None
        model = copy.deepcopy(template).to(self.device)
        prepare_for_training(model, self.cfg)
        load_trainable_state(model, state)
        return model.eval()

    # -- evaluation for early stopping
    def validate(self) -> float | None:
        if self.val is None or not self.cfg.eval_every:
            return None
        fr = D.broadcast(self._flip_rate(*self.val))  # rank 0's value: the same decision on every rank
        if fr < self.best["metric"] - 1e-12:
            self.best.update(metric=fr, step=self.step, bad=0, state=trainable_state(self.model))
        else:
            self.best["bad"] += 1
        return fr

    def _flip_rate(self, examples, targets) -> float:
        bs, chunk = self.cfg.micro_batch_size * 2, self.cfg.logps_chunk
        if self.mode != "fsdp":
            from qdpo.eval.metrics import flip_rate

            return flip_rate(self.model, examples, targets, batch_size=bs, chunk=chunk, disable=True)
        with torch.no_grad():  # every rank runs the same batches: each layer is gathered for its own forward
            fr = self.runner(lambda m: sharded_flip_rate(m, examples, targets, bs, chunk))
        D.reshard(self.runner)
        return fr

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if D.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with (self.out_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")

    # -- one optimizer step
    def _micro_step(self, examples: list[Example], whole: tuple[int, int], sync: bool) -> dict:
        """Forward and backward of one micro-batch of a global batch of ``whole`` = (examples, answer tokens)."""
        def loss_of(model):
            return micro_loss(model, self.fp_model, examples, self.cfg, self.method, self.pad_id, self.device,
                              self.teacher, whole)

        with D.gradient_sync(self.runner, sync):
            loss, metrics = self.runner(loss_of)  # this micro-batch's share of the global batch's loss
            # DDP and FSDP2 average gradients over the ranks: each rank's shares sum to its part of the global loss
            (loss * D.world_size()).backward()
        return metrics

    def train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        idx = batch_indices(len(self.examples), self.step, cfg.batch_size, cfg.seed)
        mine = D.local_slice(idx)
        micro = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
        whole = (len(idx), answer_tokens([self.examples[i] for i in idx]))
        agg: dict[str, float] = {}
        t0 = time.perf_counter()
        for j, mb in enumerate(micro):
            m = self._micro_step([self.examples[i] for i in mb], whole, sync=j == len(micro) - 1)
            for k, v in m.items():  # shares of the global batch's values (num_tokens: counts)
                agg[k] = agg.get(k, 0.0) + v
        agg = D.all_reduce_sum(agg)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        gn = D.clip_grad_norm(params, cfg.max_grad_norm)
        lr = self.opt.param_groups[0]["lr"]  # this step's (the scheduler then sets the next step's)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step += 1
        dt = time.perf_counter() - t0
        return {"step": self.step, **agg, "grad_norm": gn, "lr": lr,
                "tokens_per_s": agg.get("num_tokens", 0) / dt, "step_s": dt}

    def run(self, resume: bool = False) -> dict:
        """Train to ``cfg.steps`` (or early stop); leave the best weights in the model; return a summary."""
        cfg = self.cfg
        if not (resume and self.resume()):
            if D.is_main():
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            fr = self.validate()
            self._log({"step": 0, **({"val/flip_rate": fr} if fr is not None else {})})
        t0 = time.perf_counter()
        stopped = bool(cfg.patience) and self.best["bad"] >= cfg.patience  # a resumed run that had stopped early
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
        if self.saved_step != self.step:  # a checkpoint of this step (with the best weights in it) resumes as done
            self.save_checkpoint()
        if self.best["state"] is not None:
            load_trainable_state(self.model, self.best["state"])
        self.model.eval()
        # no validation check ran: the weights of the last step stay (not those of step 0)
        return {"steps_run": self.step, "best_step": self.best["step"] if self.best["state"] is not None else self.step,
                "best_val_flip_rate": None if self.best["state"] is None else self.best["metric"],
                "early_stopped": stopped, "train_s": time.perf_counter() - t0}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"
