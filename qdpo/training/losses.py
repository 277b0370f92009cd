"""Preference and distillation losses as pure functions of ``(B,)`` log-probs.

DPO (Rafailov et al. 2023). With policy log-probs ``πc, πr`` and reference
log-probs ``ρc, ρr`` of the chosen and rejected answers (summed over the
answer tokens) and ``h = (πc - ρc) - (πr - ρr)``:

* ``sigmoid``: ``-log σ(β h)`` (the DPO paper); with label smoothing ε,
  ``-(1-ε) log σ(β h) - ε log σ(-β h)`` (conservative DPO, as TRL's sigmoid loss);
* ``robust``:  ``(-(1-ε) log σ(β h) + ε log σ(-β h)) / (1 - 2ε)`` (label noise ε);
* ``hinge``:   ``max(0, 1 - β h)`` (SLiC);
* ``ipo``:     ``(h - 1/(2β))²`` with *per-token mean* log-probs (Azar et al. 2023).

Rewards are ``β (πc - ρc)`` and ``β (πr - ρr)``; TRL's metric names are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
    beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses ``(B,)`` and the chosen/rejected rewards ``(B,)`` (detached)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not known; use one of {LOSS_TYPES}")
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to the sigmoid and robust losses, not {loss_type!r}")
    if loss_type == "sigmoid":
        eps = label_smoothing
        losses = -F.logsigmoid(beta * h) if not eps else -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def preference_metrics(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
                       policy_chosen: Tensor, policy_rejected: Tensor) -> dict[str, float]:
    """TRL-named scalars for logging."""
    return {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
    }
