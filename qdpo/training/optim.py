"""The optimizer: AdamW, with an fp32 master copy when the latent weights are bf16.

``--latent-dtype float32`` (default): ``torch.optim.AdamW`` on the fp32 latent weights.

``--latent-dtype bfloat16``: the model holds its latent weights (and so their
gradients, the all-gathered FSDP2 copies and the DDP buckets) in bf16. An
update of ``lr = 1e-5`` is below bf16's resolution (2⁻⁸ relative), so
:class:`MasterAdamW` keeps an fp32 ``master`` copy of each weight in its
state, next to fp32 ``exp_avg``/``exp_avg_sq``, steps the master and rounds it
into the bf16 weight. Living in the optimizer state, the master is sharded
with its weight under FSDP2 and saved and resumed by
``torch.distributed.checkpoint`` like the moments.
"""

from __future__ import annotations

import math

import torch

LATENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class MasterAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) on fp32 masters of possibly-bf16 parameters."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the fp32 state stays fp32 (torch casts floating state to each parameter's dtype)."""
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for k, v in state_dict["state"].get(i, {}).items():
                if k != "step" and torch.is_tensor(v):
                    self.state[p][k] = v.to(device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["master"] = p.detach().float().clone()  # [N, K] fp32, sharded like p under FSDP2
            st["exp_avg"] = torch.zeros_like(st["master"])
            st["exp_avg_sq"] = torch.zeros_like(st["master"])
        master, m, v = st["master"], st["exp_avg"], st["exp_avg_sq"]
        st["step"] += 1
        t = st["step"].item()
        (b1, b2), lr = group["betas"], group["lr"]
        g = p.grad.float()
        master.mul_(1 - lr * group["weight_decay"])
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
        master.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        p.copy_(master)


def make_optimizer(groups: list[dict], latent_dtype: str) -> torch.optim.Optimizer:
    if latent_dtype == "float32":
        return torch.optim.AdamW(groups, betas=(0.9, 0.999))
    return MasterAdamW(groups, betas=(0.9, 0.999))


def set_latent_dtype(model, latent_dtype: str) -> None:
    """Store every trainable QuantLinear's (and quantized expert tensor's) latent weight in ``latent_dtype``, keeping its integer codes.

    Rounding a latent weight that sits near a code boundary to bf16 can move
    it into the next bin, and the model would no longer be the one whose
    reference log-probs were computed: such weights start at their ŵ instead
    (the middle of their bin, which bf16 holds well inside it). Scales stay as they are.
    """
    from qdpo.quant.experts import QuantExpertTensor
    from qdpo.quant.linear import QuantLinear

    dtype = LATENT_DTYPES[latent_dtype]
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExpertTensor)) and m.mode == "train" and m.weight.dtype != dtype:
            m.weight = torch.nn.Parameter(_keeping_codes(m, dtype), requires_grad=m.weight.requires_grad)


@torch.no_grad()
def _keeping_codes(m, dtype: torch.dtype) -> torch.Tensor:
    from qdpo.kernels.reference import dequantize_codes, quantize_codes

    w, s, z, bits = m.weight.detach(), m.scales.detach(), m.zeros, m.spec.bits
    codes = quantize_codes(w, s, z, bits)  # [N, K] uint8
    low = w.to(dtype)
    moved = quantize_codes(low, s, z, bits) != codes
    return torch.where(moved, dequantize_codes(codes, s, z, dtype), low)
