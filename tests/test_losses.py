"""DPO losses against hand-computed values and the DPO paper's formula."""

import math

import pytest
import torch

from qdpo.training.losses import dpo_loss, preference_metrics


def _lp():
    pc = torch.tensor([-10.0, -20.0, -5.0])
    pr = torch.tensor([-12.0, -18.0, -9.0])
    rc = torch.tensor([-11.0, -20.0, -6.0])
    rr = torch.tensor([-11.0, -19.0, -8.0])
    return pc, pr, rc, rr


def test_sigmoid_hand_computed():
    pc, pr, rc, rr = _lp()
    losses, crw, rrw = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")
    # h = (pc - rc) - (pr - rr) = [1 - (-1), 0 - 1, 1 - (-1)] = [2, -1, 2]
    expect = [math.log1p(math.exp(-0.1 * h)) for h in (2.0, -1.0, 2.0)]
    torch.testing.assert_close(losses, torch.tensor(expect))
    torch.testing.assert_close(crw, torch.tensor([0.1, 0.0, 0.1]))
    torch.testing.assert_close(rrw, torch.tensor([-0.1, 0.1, -0.1]))


def test_sigmoid_is_the_paper_formula():
    """-log σ(β log πθ(yw)/πref(yw) − β log πθ(yl)/πref(yl)), Rafailov et al. eq. 7."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g) * 5 for _ in range(4))
    beta = 0.3
    paper = -torch.log(torch.sigmoid(beta * (pc - rc) - beta * (pr - rr)))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta)[0], paper)


def test_sigmoid_with_label_smoothing_is_conservative_dpo():
    """cDPO: a preference label flipped with probability ε, -(1-ε) log σ(βh) - ε log σ(-βh) (TRL's sigmoid)."""
    pc, pr, rc, rr = _lp()
    eps = 0.2
    expect = [(1 - eps) * math.log1p(math.exp(-0.1 * h)) + eps * math.log1p(math.exp(0.1 * h)) for h in (2.0, -1.0, 2.0)]
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", eps)[0], torch.tensor(expect))
    for loss_type in ("hinge", "ipo"):  # no label noise in these: refused, not ignored
        with pytest.raises(ValueError, match=f"label_smoothing applies to the sigmoid and robust losses, not '{loss_type}'"):
            dpo_loss(pc, pr, rc, rr, 0.1, loss_type, eps)


def test_hinge_ipo_robust_hand_computed():
    pc, pr, rc, rr = _lp()
    h = torch.tensor([2.0, -1.0, 2.0])
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.5, "hinge")[0], torch.relu(1 - 0.5 * h))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.5, "ipo")[0], (h - 1.0) ** 2)
    eps = 0.1
    robust = (-(1 - eps) * torch.nn.functional.logsigmoid(0.5 * h)
              + eps * torch.nn.functional.logsigmoid(-0.5 * h)) / (1 - 2 * eps)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.5, "robust", eps)[0], robust)
    # robust with no noise is the sigmoid loss
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.5, "robust", 0.0)[0], dpo_loss(pc, pr, rc, rr, 0.5)[0])


def test_metrics_accuracies_and_margins():
    pc, pr, rc, rr = _lp()
    losses, crw, rrw = dpo_loss(pc, pr, rc, rr, beta=0.1)
    m = preference_metrics(losses, crw, rrw, pc, pr)
    assert m["rewards/accuracies"] == pytest.approx(2 / 3)
    assert m["rewards/margins"] == pytest.approx((0.2 - 0.1 + 0.2) / 3)
    assert m["logps/chosen"] == pytest.approx(pc.mean().item())


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-10.0], requires_grad=True)
    pr = torch.tensor([-10.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-10.0]), torch.tensor([-10.0]), 0.1)[0].sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises chosen, lowers rejected


def test_unknown_loss():
    pc, pr, rc, rr = _lp()
    with pytest.raises(ValueError, match="loss_type='kto' is not known"):
        dpo_loss(pc, pr, rc, rr, 0.1, "kto")
