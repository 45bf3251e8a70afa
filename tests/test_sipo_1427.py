"""``sipo-1427`` (sd-scripts PR #1427's reading of SDPO): values and gradients computed by hand.

Every expected number below is written out with ``math`` from the formula, independently of the
code under test: ``v_y = clip(exp(kappa d_y), 1 - eps, 1 + eps)`` (with gradient),
``c = max(v_w, v_l)``, ``u = -(beta/2) c (d_w - d_l)``, loss ``softplus(-u)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sipo_plugin.objectives import available_objectives, get_objective, sipo_1427_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


BETA, KAPPA, EPS = 10.0, 2.0, 0.1
# pair 0: the winner's weight is the larger one and not clipped (gradient flows through it);
# pair 1: both weights clipped (0.82 -> 0.9, 1.35 -> 1.1), the loser's 1.1 is shared;
# pair 2: the loser's weight is the larger one and not clipped.
M_W, R_W = [0.32, 0.10, 0.28], [0.30, 0.20, 0.30]  # d_w = +0.02, -0.10, -0.02
M_L, R_L = [0.17, 0.45, 0.23], [0.20, 0.30, 0.20]  # d_l = -0.03, +0.15, +0.03


def hand_pair(d_w: float, d_l: float):
    """(loss, dL/dm_w, dL/dm_l) of one pair, derived on paper for the cases above."""
    raw_w, raw_l = math.exp(KAPPA * d_w), math.exp(KAPPA * d_l)
    v_w, v_l = min(max(raw_w, 1 - EPS), 1 + EPS), min(max(raw_l, 1 - EPS), 1 + EPS)
    c = max(v_w, v_l)
    u = -(BETA / 2) * c * (d_w - d_l)
    # dc/dm_y = kappa * exp(kappa d_y) on the side that sets c, if it is not clipped; else 0
    dc_w = KAPPA * raw_w if (v_w >= v_l and v_w == raw_w) else 0.0
    dc_l = KAPPA * raw_l if (v_l > v_w and v_l == raw_l) else 0.0
    du_w = -(BETA / 2) * (c + (d_w - d_l) * dc_w)
    du_l = -(BETA / 2) * (-c + (d_w - d_l) * dc_l)
    dloss_du = -sigmoid(-u)  # d softplus(-u) / du
    return softplus(-u), dloss_du * du_w, dloss_du * du_l, c


def test_registered_with_defaults_and_checked_values():
    assert "sipo-1427" in available_objectives()
    objective = get_objective("sipo-1427")
    assert objective.hyperparameters() == {"beta": 5000.0, "label_smoothing": 0.0,
                                           "loss_type": "sigmoid", "sft_weight": 0.0,
                                           "clip_eps": 0.1, "kappa": 1.0}
    assert not objective.needs_calibration and objective.needs_reference
    with pytest.raises(ValueError, match="clip_eps"):
        get_objective("sipo-1427", clip_eps=1.0)
    with pytest.raises(ValueError, match="kappa"):
        get_objective("sipo-1427", kappa=0.0)


def test_hand_computed_losses_and_gradients_through_the_weight():
    objective = get_objective("sipo-1427", beta=BETA, kappa=KAPPA, clip_eps=EPS)
    policy = torch.tensor(M_W + M_L, dtype=torch.float64, requires_grad=True)  # [2B]
    ref = torch.tensor(R_W + R_L, dtype=torch.float64)
    out = objective.from_errors(policy, ref, torch.tensor([500, 500, 500]), DDPMScheduler())
    out.loss.backward()

    expected = [hand_pair(mw - rw, ml - rl) for mw, rw, ml, rl in zip(M_W, R_W, M_L, R_L)]
    # pair 0 by hand: c = exp(0.04) = 1.0408108, u = -5 * c * 0.05 = -0.2602027
    assert expected[0][3] == pytest.approx(1.0408108, abs=1e-7)
    assert expected[1][3] == 1.1 and expected[2][3] == pytest.approx(math.exp(0.06))
    assert out.per_pair_loss.tolist() == pytest.approx([e[0] for e in expected], abs=1e-6)
    assert out.loss.item() == pytest.approx(sum(e[0] for e in expected) / 3, abs=1e-6)
    grad_w, grad_l = policy.grad[:3].tolist(), policy.grad[3:].tolist()
    assert grad_w == pytest.approx([e[1] / 3 for e in expected], abs=1e-6)
    assert grad_l == pytest.approx([e[2] / 3 for e in expected], abs=1e-6)
    # not detached: pair 0's winner gradient is 1.1x what a stop-gradient weight would give
    # (du/dm_w = -5 (c + 0.05 * 2 c) instead of -5 c)
    detached = -sigmoid(0.2602027) * -(BETA / 2) * 1.0408108 / 3
    assert grad_w[0] == pytest.approx(1.1 * detached, rel=1e-5)
    assert out.metrics["weights/clipped_fraction"] == pytest.approx(1 / 3)
    assert out.metrics["weights/shared"] == pytest.approx(sum(e[3] for e in expected) / 3)


def test_elementwise_errors_average_the_per_element_losses():
    """The PR's own granularity: weight, max and sigmoid per element, then the mean."""
    m_w = torch.tensor([[M_W[0], M_W[1]]]); r_w = torch.tensor([[R_W[0], R_W[1]]])  # noqa: E702
    m_l = torch.tensor([[M_L[0], M_L[1]]]); r_l = torch.tensor([[R_L[0], R_L[1]]])  # noqa: E702
    out = sipo_1427_loss(m_w, m_l, r_w, r_l, beta=BETA, clip_eps=EPS, kappa=KAPPA)
    first, second = hand_pair(0.02, -0.03)[0], hand_pair(-0.10, 0.15)[0]
    assert out.losses.shape == (1,)
    assert out.losses.item() == pytest.approx((first + second) / 2, abs=1e-6)
    # ... which is not the loss of the element-averaged errors (d_w = -0.04, d_l = +0.06)
    assert abs(out.losses.item() - hand_pair(-0.04, 0.06)[0]) > 0.05


def test_equals_diffusion_dpo_where_policy_equals_reference():
    """d = 0: every weight is exp(0) = 1, loss ln 2, and Diffusion-DPO's gradient."""
    errors = torch.tensor([0.3, 0.1, 0.5, 0.2], dtype=torch.float64)
    grads = {}
    for name in ("sipo-1427", "diffusion-dpo"):
        policy = errors.clone().requires_grad_()
        out = get_objective(name, beta=BETA).from_errors(policy, errors, torch.tensor([10, 900]),
                                                         DDPMScheduler())
        out.loss.backward()
        assert out.loss.item() == pytest.approx(math.log(2.0))
        grads[name] = policy.grad
    torch.testing.assert_close(grads["sipo-1427"], grads["diffusion-dpo"])
