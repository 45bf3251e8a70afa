"""Objectives: values on hand-made tensors, invariants, weights, schedules and kappa calibration.

Expected numbers are computed by hand or by an independent float64 formula in the test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from sipo_plugin.objectives import (
    ImportanceWeights,
    PairErrors,
    calibrate_kappa,
    diffusion_dpo_loss,
    dpo_cm_loss,
    get_objective,
    per_sample_error,
    schedule_error_factor,
    sipo_loss,
    split_pair,
    step_log_weight,
)

LN2 = math.log(2.0)
DPO_FAMILY = ["diffusion-dpo", "dpo-cm", "sipo"]
WEIGHTED_VARIANTS = [
    ("dpo-cm", {"weight_model": "step"}),
    ("dpo-cm", {"weight_model": "reference"}),
    ("sipo", {"weight_model": "step", "pair_weight": "per_side"}),
    ("sipo", {"weight_model": "step", "pair_weight": "shared_max"}),
    ("sipo", {"weight_model": "reference", "pair_weight": "per_side"}),
    ("sipo", {"weight_model": "reference", "pair_weight": "shared_max"}),
]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def schedulers() -> dict[str, object]:
    return {
        "epsilon": DDPMScheduler(),
        "v_prediction": DDPMScheduler(prediction_type="v_prediction"),
        "flow": FlowMatchEulerDiscreteScheduler(),
    }


def build(name: str, **kwargs):
    """An objective with a fixed kappa when it has one (no calibration needed)."""
    objective = get_objective(name, **kwargs)
    return objective.with_kappa(50.0) if objective.needs_calibration else objective


def batch_from_errors(m_w, m_l, r_w, r_l, dim: int = 4, dtype=torch.float32):
    """``(model_pred, ref_pred, target)`` [2B, dim] whose per-sample errors are the given values."""
    m = torch.tensor(list(m_w) + list(m_l), dtype=torch.float64)
    r = torch.tensor(list(r_w) + list(r_l), dtype=torch.float64)
    target = torch.zeros(len(m), dim, dtype=dtype)
    model_pred = m.sqrt()[:, None].expand(-1, dim).to(dtype).clone().requires_grad_()
    ref_pred = r.sqrt()[:, None].expand(-1, dim).to(dtype).clone()
    return model_pred, ref_pred, target


def random_batch(pairs: int, dim: int = 16, seed: int = 0, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * pairs, dim, generator=g)
    model_pred = (target + spread * torch.randn(2 * pairs, dim, generator=g)).requires_grad_()
    ref_pred = target + spread * torch.randn(2 * pairs, dim, generator=g)
    return model_pred, ref_pred, target


# Hand-made pairs: d_w = [0.05, -0.10], d_l = [-0.05, 0.10]; with beta = 10,
# u = -5 (d_w - d_l) = [-0.5, 1.0].
M_W, M_L, R_W, R_L = [0.30, 0.10], [0.20, 0.40], [0.25, 0.20], [0.25, 0.30]
U = [-0.5, 1.0]


def hand_errors():
    return tuple(torch.tensor(x) for x in (M_W, M_L, R_W, R_L))


def hand_pairs(m_w, m_l, r_w, r_l) -> PairErrors:
    """Errors as the weighted losses take them (they read neither timesteps nor scheduler)."""
    return PairErrors(m_w, m_l, r_w, r_l, timesteps=torch.tensor([100, 200]), scheduler=None)


# ---------------------------------------------------------------- errors and layout


def test_per_sample_error_is_fp32_mean_over_non_batch_dims():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 2.0]]], dtype=torch.float16)
    target = torch.zeros_like(pred)
    err = per_sample_error(pred, target)
    assert err.dtype == torch.float32 and err.shape == (2,)
    assert err.tolist() == [(1 + 4 + 9 + 16) / 4, 4 / 4]


def test_split_pair_winners_first_and_odd_batch_error():
    x = torch.arange(6)
    x_w, x_l = split_pair(x)
    assert x_w.tolist() == [0, 1, 2] and x_l.tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="even"):
        split_pair(torch.arange(5))


def test_timesteps_of_2b_must_repeat_per_pair():
    model_pred, ref_pred, target = random_batch(2)
    objective = get_objective("diffusion-dpo")
    scheduler = DDPMScheduler()
    out_b = objective(model_pred, ref_pred, target, torch.tensor([10, 20]), scheduler)
    out_2b = objective(model_pred, ref_pred, target, torch.tensor([10, 20, 10, 20]), scheduler)
    assert out_b.loss.item() == out_2b.loss.item()
    with pytest.raises(ValueError, match="winners and losers"):
        objective(model_pred, ref_pred, target, torch.tensor([10, 20, 20, 10]), scheduler)


# ---------------------------------------------------------------- Diffusion-DPO values


def test_diffusion_dpo_hand_values():
    out = diffusion_dpo_loss(*hand_errors(), beta=10.0)
    expected = [softplus(-u) for u in U]  # -log sigmoid(u) = softplus(-u)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert float(out.metrics["implicit_acc"]) == 0.5
    assert float(out.metrics["rewards/chosen"]) == pytest.approx(0.025, abs=1e-7)
    assert float(out.metrics["rewards/rejected"]) == pytest.approx(-0.025, abs=1e-7)
    assert float(out.metrics["rewards/margins"]) == pytest.approx(0.05, abs=1e-7)


def test_diffusion_dpo_objective_matches_hand_values_and_reports_trl_metrics():
    model_pred, ref_pred, target = batch_from_errors(M_W, M_L, R_W, R_L)
    out = get_objective("diffusion-dpo", beta=10.0)(
        model_pred, ref_pred, target, torch.tensor([5, 500]), DDPMScheduler()
    )
    assert out.loss.dtype == torch.float32 and out.loss.ndim == 0
    assert out.loss.item() == pytest.approx(sum(softplus(-u) for u in U) / 2, rel=1e-5)
    assert out.per_pair_loss.mean().item() == pytest.approx(out.loss.item(), rel=1e-7)
    assert out.metrics["mse/policy_w"] == pytest.approx(0.2, rel=1e-6)
    assert out.metrics["mse/policy_l"] == pytest.approx(0.3, rel=1e-6)
    assert out.metrics["mse/ref_w"] == pytest.approx(0.225, rel=1e-6)
    assert out.metrics["mse/ref_l"] == pytest.approx(0.275, rel=1e-6)
    assert out.metrics["loss"] == out.loss.item()
    assert all(isinstance(v, float) for v in out.metrics.values())


def test_label_smoothing_and_hinge_values():
    a = 0.1
    smoothed = diffusion_dpo_loss(*hand_errors(), beta=10.0, label_smoothing=a)
    expected = [(1 - a) * softplus(-u) + a * softplus(u) for u in U]
    assert smoothed.losses.tolist() == pytest.approx(expected, rel=1e-5)
    hinge = diffusion_dpo_loss(*hand_errors(), beta=10.0, loss_type="hinge")
    assert hinge.losses.tolist() == pytest.approx([1.5, 0.0], abs=1e-6)  # max(0, 1 - u)
    with pytest.raises(ValueError, match="sigmoid"):
        diffusion_dpo_loss(*hand_errors(), beta=10.0, label_smoothing=a, loss_type="hinge")
    with pytest.raises(ValueError, match="sigmoid"):
        get_objective("sipo", loss_type="hinge", label_smoothing=0.1)


def test_implicit_acc_counts_ties_as_half():
    m_w, m_l = torch.tensor([0.1, 0.3, 0.2]), torch.tensor([0.2, 0.1, 0.2])
    r_w, r_l = torch.full((3,), 0.2), torch.full((3,), 0.2)
    out = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta=1.0)  # u > 0, u < 0, u == 0
    assert float(out.metrics["implicit_acc"]) == pytest.approx(0.5)


def test_loss_decreases_when_the_policy_improves_on_the_winner():
    objective = get_objective("diffusion-dpo", beta=10.0)
    t, scheduler = torch.tensor([100, 200]), DDPMScheduler()
    base = objective(*batch_from_errors(M_W, M_L, R_W, R_L), t, scheduler).loss.item()
    better = objective(*batch_from_errors([0.2, 0.05], M_L, R_W, R_L), t, scheduler).loss.item()
    assert better < base


# ---------------------------------------------------------------- DPO-C&M and SIPO values


def test_dpo_cm_hand_values():
    w_w, w_l = torch.tensor([0.95, 0.5]), torch.tensor([1.3, 1.0])
    weights = ImportanceWeights(w_w, w_l, clip_eps=0.1, mask_threshold=0.9)
    out = dpo_cm_loss(hand_pairs(*hand_errors()), weights, beta=10.0)
    c0 = min(max(math.sqrt(0.95 * 1.3), 0.9), 1.1)  # pair 1 masked (0.5 < 0.9)
    assert out.losses.tolist() == pytest.approx([c0 * softplus(0.5), 0.0], rel=1e-5)
    assert float(out.metrics["mask_fraction"]) == 0.5
    assert float(out.metrics["weights/chosen"]) == pytest.approx((0.95 + 0.9) / 2)
    assert float(out.metrics["weights/rejected"]) == pytest.approx((1.1 + 1.0) / 2)


@pytest.mark.parametrize("pair_weight", ["per_side", "shared_max"])
def test_sipo_hand_values(pair_weight):
    w_w, w_l = torch.tensor([0.95, 1.05]), torch.tensor([1.3, 0.92])
    weights = ImportanceWeights(w_w, w_l, clip_eps=0.1, mask_threshold=0.9)
    out = sipo_loss(hand_pairs(*hand_errors()), weights, beta=10.0, pair_weight=pair_weight)
    c_w, c_l = [0.95, 1.05], [1.1, 0.92]
    d_w, d_l = [0.05, -0.10], [-0.05, 0.10]
    if pair_weight == "per_side":
        u_is = [-5.0 * (c_w[i] * d_w[i] - c_l[i] * d_l[i]) for i in range(2)]
    else:
        u_is = [-5.0 * max(c_w[i], c_l[i]) * (d_w[i] - d_l[i]) for i in range(2)]
    assert out.losses.tolist() == pytest.approx([softplus(-u) for u in u_is], rel=1e-5)
    assert float(out.metrics["mask_fraction"]) == 0.0
    assert float(out.metrics["implicit_acc"]) == 0.5  # reported on the unweighted u


@pytest.mark.parametrize("name", DPO_FAMILY)
@pytest.mark.parametrize("param", ["epsilon", "v_prediction", "flow"])
def test_ln2_and_chance_accuracy_when_policy_equals_reference(name, param):
    target = torch.randn(8, 3, 4, 4)
    ref_pred = target + 0.2 * torch.randn_like(target)
    model_pred = ref_pred.clone().requires_grad_()
    kwargs = {} if name == "diffusion-dpo" else {"weight_model": "reference", "kappa": 100.0}
    t = torch.tensor([0, 1, 400, 999])
    if param == "flow":
        t = torch.tensor([0.0, 1.0, 400.5, 1000.0])
    out = get_objective(name, **kwargs)(model_pred, ref_pred, target, t, schedulers()[param])
    assert out.loss.item() == pytest.approx(LN2, abs=1e-7)
    assert out.metrics["implicit_acc"] == 0.5
    assert out.metrics["rewards/margins"] == 0.0


def test_sipo_step_weights_keep_ln2_on_unmasked_pairs():
    target = torch.randn(8, 16)
    ref_pred = target + 0.2 * torch.randn_like(target)
    model_pred = ref_pred.clone().requires_grad_()
    out = get_objective("sipo", kappa=1.0)(
        model_pred, ref_pred, target, torch.tensor([0, 20, 400, 999]), DDPMScheduler()
    )
    assert out.per_pair_loss.tolist() == pytest.approx([0.0, LN2, LN2, LN2], abs=1e-7)  # t=0 masked
    assert out.metrics["mask_fraction"] == 0.25


def variant_id(variant) -> str:
    return "-".join([variant[0], *variant[1].values()])


@pytest.mark.parametrize("variant", WEIGHTED_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "smoothed"])
def test_weighted_objectives_reduce_exactly_to_diffusion_dpo(variant, loss_type):
    name, kwargs = variant
    extra = {"label_smoothing": 0.2} if loss_type == "smoothed" else {"loss_type": loss_type}
    model_pred, ref_pred, target = random_batch(4, spread=0.05)
    t = torch.tensor([0, 3, 500, 999])  # t = 0: weight 0, still kept at tau = 0
    scheduler = DDPMScheduler()
    dpo = get_objective("diffusion-dpo", beta=500.0, sft_weight=0.5, **extra)
    weighted = get_objective(
        name, beta=500.0, sft_weight=0.5, clip_eps=0.0, mask_threshold=0.0, kappa=1e4,
        **kwargs, **extra,
    )
    out_dpo = dpo(model_pred, ref_pred, target, t, scheduler)
    (grad_dpo,) = torch.autograd.grad(out_dpo.loss, model_pred)
    out_w = weighted(model_pred, ref_pred, target, t, scheduler)
    (grad_w,) = torch.autograd.grad(out_w.loss, model_pred)
    assert torch.equal(out_w.per_pair_loss, out_dpo.per_pair_loss)
    assert torch.equal(grad_w, grad_dpo)
    assert out_w.metrics["mask_fraction"] == 0.0


@pytest.mark.parametrize("name", ["dpo-cm", "sipo"])
def test_masked_pairs_get_exactly_zero_gradient(name):
    model_pred, ref_pred, target = random_batch(4, seed=3)
    # step model: pair 0 sits at t = 0 (weight 0), the rest have weights near 1 (kappa small)
    t = torch.tensor([0, 50, 400, 900])
    out = build(name, beta=50.0, kappa=1.0)(model_pred, ref_pred, target, t, DDPMScheduler())
    out.loss.backward()
    grad = model_pred.grad
    assert out.metrics["mask_fraction"] == 0.25
    assert torch.all(grad[[0, 4]] == 0)
    assert torch.all(grad[[1, 2, 3, 5, 6, 7]].abs().sum(dim=1) > 0)
    # reference model: make pair 2's winner much worse than the reference, so w_w << tau
    model_pred.grad = None
    with torch.no_grad():
        model_pred[2] += 3.0
    out = get_objective(name, beta=50.0, weight_model="reference", kappa=10.0)(
        model_pred, ref_pred, target, t, DDPMScheduler()
    )
    out.loss.backward()
    assert torch.all(model_pred.grad[[2, 6]] == 0) and out.metrics["mask_fraction"] > 0


def independent_step_weights(m, t, scheduler, kappa):
    """exp(-kappa * k_t * e), k_t = 0.5 (SNR(t-1) / SNR(t) - 1), epsilon parametrization."""
    abar = scheduler.alphas_cumprod.double()
    snr = abar / (1 - abar)
    k_t = 0.5 * (snr[t - 1] / snr[t] - 1)
    return torch.exp(-kappa * k_t * m.detach())


@pytest.mark.parametrize(
    "name,pair_weight", [("dpo-cm", None), ("sipo", "per_side"), ("sipo", "shared_max")]
)
def test_weights_carry_no_gradient(name, pair_weight):
    model_pred, ref_pred, target = random_batch(3, seed=5)
    t, scheduler, beta, kappa = torch.tensor([100, 300, 600]), DDPMScheduler(), 500.0, 50.0
    kwargs = {"pair_weight": pair_weight} if pair_weight else {}
    objective = get_objective(name, beta=beta, kappa=kappa, **kwargs)
    out = objective(model_pred, ref_pred, target, t, scheduler)
    (grad,) = torch.autograd.grad(out.loss, model_pred)
    # independent float64 loss with the weights as constants
    x = model_pred.detach().double().requires_grad_()
    m = ((x - target.double()) ** 2).mean(dim=1)
    r = ((ref_pred.double() - target.double()) ** 2).mean(dim=1)
    (m_w, m_l), (r_w, r_l) = m.chunk(2), r.chunk(2)
    w_w = independent_step_weights(m_w, t, scheduler, kappa)
    w_l = independent_step_weights(m_l, t, scheduler, kappa)
    assert torch.all((w_w > 0.9) & (w_w < 1.0) & (w_l > 0.9) & (w_l < 1.0))  # unclipped, unmasked
    d_w, d_l = m_w - r_w, m_l - r_l
    if name == "dpo-cm":
        expected = (-(w_w * w_l).sqrt() * F.logsigmoid(-beta / 2 * (d_w - d_l))).mean()
    elif pair_weight == "per_side":
        expected = (-F.logsigmoid(-beta / 2 * (w_w * d_w - w_l * d_l))).mean()
    else:
        expected = (-F.logsigmoid(-beta / 2 * torch.maximum(w_w, w_l) * (d_w - d_l))).mean()
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", DPO_FAMILY)
def test_sft_weight_adds_exactly_weighted_winner_mse(name):
    model_pred, ref_pred, target = random_batch(4, seed=7)
    t, scheduler = torch.tensor([10, 200, 500, 800]), DDPMScheduler()
    base = build(name, beta=10.0)(model_pred, ref_pred, target, t, scheduler)
    with_sft = build(name, beta=10.0, sft_weight=0.3)(model_pred, ref_pred, target, t, scheduler)
    m_w = ((model_pred.detach()[:4].double() - target[:4]) ** 2).mean(dim=1)  # [B]
    per_pair = with_sft.per_pair_loss - base.per_pair_loss
    torch.testing.assert_close(per_pair.double(), 0.3 * m_w, rtol=1e-5, atol=1e-7)
    delta = with_sft.loss.item() - base.loss.item()
    assert delta == pytest.approx(0.3 * m_w.mean().item(), rel=1e-5)
    assert with_sft.metrics["loss/sft"] == pytest.approx(0.3 * m_w.mean().item(), rel=1e-6)
    assert "loss/sft" not in base.metrics


def test_sft_is_winner_only_mse():
    model_pred, ref_pred, target = random_batch(3, seed=8)
    t = torch.tensor([1, 2, 3])
    out = get_objective("sft")(model_pred, ref_pred, target, t, DDPMScheduler())
    m_w = ((model_pred.detach()[:3] - target[:3]) ** 2).mean().item()
    assert out.loss.item() == pytest.approx(m_w, rel=1e-6)
    assert {"loss", "mse/policy_w", "mse/policy_l"} <= set(out.metrics)
    out.loss.backward()
    assert torch.all(model_pred.grad[3:] == 0) and torch.all(model_pred.grad[:3] != 0)


def test_weighted_metrics_and_timestep_buckets():
    model_pred, ref_pred, target = random_batch(4)
    t = torch.tensor([5, 95, 450, 999])
    out = build("sipo")(model_pred, ref_pred, target, t, DDPMScheduler())
    assert out.metrics["kappa"] == 50.0
    buckets = sorted(k for k in out.metrics if k.startswith("weights_by_t/"))
    assert buckets == ["weights_by_t/000-099", "weights_by_t/400-499", "weights_by_t/900-999"]
    for key in ("mask_fraction", "weights/chosen", "weights/rejected", "rewards/margins"):
        assert key in out.metrics


def test_grad_flows_through_model_pred_only():
    model_pred, ref_pred, target = random_batch(2)
    ref_pred.requires_grad_()
    target.requires_grad_()
    out = build("sipo")(model_pred, ref_pred, target, torch.tensor([10, 600]), DDPMScheduler())
    out.loss.backward()
    assert model_pred.grad is not None and ref_pred.grad is None and target.grad is None


# ---------------------------------------------------------------- robustness


@pytest.mark.parametrize("name", ["diffusion-dpo", "dpo-cm", "sipo", "sft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("errors", ["zero", "huge"])
def test_finite_loss_and_grads_on_extreme_errors_and_low_precision(name, dtype, errors):
    # dim 64 keeps the true gradient of the 1e6 errors (about 4e4 per element) within fp16 range
    if errors == "zero":  # every error 0
        errs = ([0, 0], [0, 0], [0, 0], [0, 0])
    else:  # policy errors 1e6 against 0 for the reference, and the reverse
        errs = ([1e6, 0], [0, 1e6], [0, 1e6], [1e6, 0])
    model_pred, ref_pred, target = batch_from_errors(*errs, dim=64, dtype=dtype)
    for weight_model in ("step", "reference"):
        weighted = name in ("dpo-cm", "sipo")
        kwargs = {"weight_model": weight_model, "kappa": 1e3} if weighted else {}
        model_pred.grad = None
        objective = get_objective(name, **kwargs)
        out = objective(model_pred, ref_pred, target, torch.tensor([0, 999]), DDPMScheduler())
        out.loss.backward()
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        assert torch.isfinite(model_pred.grad).all() and model_pred.grad.dtype == dtype
        # raw weights may overflow to inf (reference model, 1e6 errors); nothing is NaN
        assert all(math.isfinite(v) or v == math.inf for v in out.metrics.values())


def test_step_weight_is_zero_not_nan_at_t0_with_zero_error():
    a_t = schedule_error_factor(torch.tensor([0, 1]), DDPMScheduler())
    log_w = step_log_weight(torch.zeros(2), a_t, kappa=1e4)
    assert log_w[0] == -math.inf and log_w[1] == 0.0
    assert log_w.exp().tolist() == [0.0, 1.0]


# ---------------------------------------------------------------- schedules and parametrizations


def kl_form(t: torch.Tensor, scheduler, kind: str) -> torch.Tensor:
    """k_t * (epsilon-space error per unit native error): the spec's unstable form, float64."""
    if kind == "flow":
        s = t.double() / 1000
        sp = s - 1e-3
        snr_t, snr_p = ((1 - s) / s) ** 2, ((1 - sp) / sp) ** 2
        return 0.5 * (snr_p / snr_t - 1) * (1 - s) ** 2
    abar = scheduler.alphas_cumprod.double()
    snr = abar / (1 - abar)
    k_t = 0.5 * (snr[t - 1] / snr[t] - 1)
    return k_t if kind == "epsilon" else k_t * abar[t]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_stable_factor_equals_kl_form_where_finite(kind):
    scheduler = schedulers()[kind]
    t = torch.tensor([1, 2, 3, 10, 63, 100, 500, 900, 998, 999])
    if kind == "flow":
        t = torch.cat([t[1:].double(), torch.tensor([1.5, 333.3])])
    a_t = schedule_error_factor(t, scheduler)
    assert a_t.dtype == torch.float64
    torch.testing.assert_close(a_t, kl_form(t, scheduler, kind), rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_t0_is_infinite_factor_and_always_masked(kind):
    scheduler = schedulers()[kind]
    t = torch.tensor([0.0, 1.0]) if kind == "flow" else torch.tensor([0])
    assert torch.isinf(schedule_error_factor(t, scheduler)).all()
    model_pred, ref_pred, target = random_batch(2)
    t2 = torch.tensor([0.0, 500.0]) if kind == "flow" else torch.tensor([0, 500])
    objective = get_objective("sipo", kappa=1e-3, mask_threshold=0.01)
    out = objective(model_pred, ref_pred, target, t2, scheduler)
    assert out.per_pair_loss[0].item() == 0.0 and out.metrics["mask_fraction"] == 0.5
    assert torch.isfinite(out.loss)


def test_zero_terminal_snr_schedule():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    abar = scheduler.alphas_cumprod.double()
    assert abar[-1] == 0.0  # SNR(999) = 0: k_t is infinite, the stable form is not
    a_t = schedule_error_factor(torch.tensor([998, 999]), scheduler)
    assert a_t[1].item() == pytest.approx(0.5 * (abar[998] / (1 - abar[998])).item(), rel=1e-12)
    torch.testing.assert_close(a_t[:1], kl_form(torch.tensor([998]), scheduler, "v_prediction"))
    model_pred, ref_pred, target = random_batch(2)
    out = build("dpo-cm")(model_pred, ref_pred, target, torch.tensor([999, 0]), scheduler)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(model_pred.grad).all()
    # epsilon prediction at zero terminal SNR: the x0 error is unbounded, the pair is masked
    eps_sched = DDPMScheduler(rescale_betas_zero_snr=True)
    assert math.isinf(schedule_error_factor(torch.tensor([999]), eps_sched).item())


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_weight_decreases_toward_t0(kind):
    scheduler = schedulers()[kind]
    t = torch.tensor([0, 1, 2, 5, 10, 20, 50, 100, 200])
    a_t = schedule_error_factor(t.double() if kind == "flow" else t, scheduler)
    w = step_log_weight(torch.full((len(t),), 0.1), a_t, kappa=50.0).exp()
    first = 2 if kind == "flow" else 1  # flow: s_prev = s - 1/1000 <= 0 for t <= 1
    assert torch.all(w[:first] == 0.0)
    assert torch.all(w[first + 1 :] > w[first:-1]), w


def test_ddim_scheduler_and_bad_schedulers():
    a_ddim = schedule_error_factor(torch.tensor([10, 500]), DDIMScheduler())
    a_ddpm = schedule_error_factor(torch.tensor([10, 500]), DDPMScheduler())
    torch.testing.assert_close(a_ddim, a_ddpm)
    with pytest.raises(ValueError, match="prediction_type"):
        schedule_error_factor(torch.tensor([10]), DDPMScheduler(prediction_type="sample"))
    with pytest.raises(ValueError, match="unsupported scheduler"):
        schedule_error_factor(torch.tensor([10]), object())
    with pytest.raises(ValueError, match="integers in"):
        schedule_error_factor(torch.tensor([1000]), DDPMScheduler())
    with pytest.raises(ValueError, match="flow timesteps"):
        schedule_error_factor(torch.tensor([1200.0]), FlowMatchEulerDiscreteScheduler())


# ---------------------------------------------------------------- kappa calibration


def calibration_data(kind: str, pairs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * pairs, 8, generator=g)
    scale = torch.exp(torch.randn(2 * pairs, 1, generator=g))  # per-sample error spread
    ref_pred = target + 0.3 * scale * torch.randn(2 * pairs, 8, generator=g)
    if kind == "flow":
        t = torch.rand(pairs, generator=g, dtype=torch.float64) * 1000
    else:
        t = torch.randint(0, 1000, (pairs,), generator=g)
    return ref_pred, target, t


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
@pytest.mark.parametrize("fraction", [0.06, 0.2])
def test_calibrated_kappa_masks_the_target_fraction(kind, fraction):
    scheduler, n = schedulers()[kind], 300
    ref_pred, target, t = calibration_data(kind, n, seed=11)
    ref_errors = per_sample_error(ref_pred, target)
    kappa = calibrate_kappa(ref_errors, t, scheduler, target_mask_fraction=fraction)
    objective = get_objective("dpo-cm", target_mask_fraction=fraction)
    assert objective.needs_calibration
    calibrated = objective.with_kappa(kappa)
    assert not calibrated.needs_calibration and objective.needs_calibration
    policy_pred = ref_pred.clone().requires_grad_()  # policy == reference
    out = calibrated(policy_pred, ref_pred, target, t, scheduler)
    assert abs(out.metrics["mask_fraction"] - fraction) <= 1 / n
    assert calibrated.hyperparameters()["kappa"] == kappa


def test_calibration_from_a_list_of_batches():
    scheduler, batches = DDPMScheduler(), []
    for seed in range(3):
        batches.append(calibration_data("epsilon", 100, seed=seed))
    errors = [per_sample_error(ref, tgt) for ref, tgt, _ in batches]
    times = [t.repeat(2) for _, _, t in batches]  # [2B] timesteps are accepted too
    kappa = calibrate_kappa(errors, times, scheduler)
    sipo = get_objective("sipo", kappa=kappa)
    fractions = [sipo(ref, ref, y, t, scheduler).metrics["mask_fraction"] for ref, y, t in batches]
    assert abs(sum(fractions) / 3 - 0.06) <= 1 / 300
    with pytest.raises(ValueError, match="lists of equal length"):
        calibrate_kappa(errors, times[:2], scheduler)


def test_calibration_errors():
    scheduler = DDPMScheduler()
    with pytest.raises(ValueError, match="no calibration pair"):
        calibrate_kappa(torch.zeros(8), torch.tensor([1, 2, 3, 4]), scheduler)
    with pytest.raises(ValueError, match="mask_threshold"):
        calibrate_kappa(torch.rand(8), torch.tensor([1, 2, 3, 4]), scheduler, mask_threshold=0.0)


def test_uncalibrated_objective_refuses_to_run():
    model_pred, ref_pred, target = random_batch(2)
    objective = get_objective("sipo")
    assert objective.needs_calibration and objective.config.kappa == "auto"
    with pytest.raises(RuntimeError, match="calibrate_kappa.*with_kappa"):
        objective(model_pred, ref_pred, target, torch.tensor([1, 2]), DDPMScheduler())


@pytest.mark.parametrize("pair_weight", ["per_side", "shared_max"])
def test_sipo_gradient_is_the_analytic_one_and_skips_the_weights(pair_weight):
    m_w, m_l, r_w, r_l = (x.clone().requires_grad_(i < 2) for i, x in enumerate(hand_errors()))
    w_w = torch.tensor([0.95, 1.05], requires_grad=True)
    w_l = torch.tensor([1.3, 0.92], requires_grad=True)
    weights = ImportanceWeights(w_w, w_l, clip_eps=0.1, mask_threshold=0.9)
    out = sipo_loss(hand_pairs(m_w, m_l, r_w, r_l), weights, beta=10.0, pair_weight=pair_weight)
    out.losses.sum().backward()
    assert w_w.grad is None and w_l.grad is None  # weights are stop-gradient
    c_w, c_l = torch.tensor([0.95, 1.05]), torch.tensor([1.1, 0.92])
    if pair_weight == "shared_max":
        c_w = c_l = torch.maximum(c_w, c_l)
    d_w, d_l = m_w.detach() - r_w, m_l.detach() - r_l
    u_is = -5.0 * (c_w * d_w - c_l * d_l)
    # d/dm_w of -log sigmoid(u_is) = sigmoid(-u_is) * (beta/2) c_w, and the opposite for m_l
    torch.testing.assert_close(m_w.grad, torch.sigmoid(-u_is) * 5.0 * c_w)
    torch.testing.assert_close(m_l.grad, -torch.sigmoid(-u_is) * 5.0 * c_l)
