"""Run the model over a pair dataset at stratified timesteps and gather the analysis statistics.

Everything goes through the model adapter interface (encode, conditioning, noise, predict,
reference) and the registered objectives, so every model family the trainer supports works.
Per timestep bucket and pair: policy and reference errors of winner and loser, the importance
weights of both weight models, and the per-pair gradient norm of each objective on the trainable
(LoRA) parameters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from ..data import read_pairs
from ..data.loader import make_dataloader
from ..models import get_model_adapter
from ..models.base import repeat_pair
from ..objectives import get_objective, per_sample_error
from ..objectives.errors import PairErrors, split_pair
from ..objectives.importance import importance_weights
from ..objectives.schedule import num_train_timesteps
from ..training.forward import PairDraws, batch_conditioning, pair_forward
from .stats import (bucket_bounds, bucket_index, masked_fraction, pair_gradient_norm, per_bucket,
                    stratified_timesteps)

COMPARED_OBJECTIVES = ("sft", "diffusion-dpo", "dpo-cm", "sipo")
# whose defaults (tau, target fraction) apply when the run's objective has none
WEIGHT_DEFAULTS = "dpo-cm"


def objective_fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(get_objective(name).config)}


def compared_objectives(config, kappa: float) -> dict:
    """The built-in objectives (plus the run's own) with the run's hyper-parameters where they
    apply and the calibrated ``kappa``."""
    hp = dict(config.objective.hyperparameters)
    names = list(dict.fromkeys([*COMPARED_OBJECTIVES, config.objective.name]))
    out = {}
    for name in names:
        accepted = objective_fields(name)
        kwargs = {k: v for k, v in hp.items() if k in accepted}
        if "kappa" in accepted:
            kwargs["kappa"] = kappa
        out[name] = get_objective(name, **kwargs)
    return out


def weight_settings(config) -> dict:
    """tau, target_mask_fraction, clip_eps, kappa of the run (dpo-cm's defaults if absent)."""
    name = config.objective.name
    source = name if "mask_threshold" in objective_fields(name) else WEIGHT_DEFAULTS
    cfg = get_objective(source, **({k: v for k, v in config.objective.hyperparameters.items()
                                     if k in objective_fields(source)})).config
    return {"mask_threshold": cfg.mask_threshold, "target_mask_fraction": cfg.target_mask_fraction,
            "clip_eps": cfg.clip_eps, "kappa": cfg.kappa, "weight_model": cfg.weight_model}


def per_sample_gradients(adapter, params, noisy, cond, index: list[int]):
    """Policy errors of the samples ``index`` and the squared norms / dot of their gradients."""
    sub_cond = {k: v[index] for k, v in cond.items()}
    pred = adapter.predict(noisy.noisy[index], noisy.timesteps[index], sub_cond)
    err = per_sample_error(pred, noisy.target[index])  # [2]
    grads = [torch.autograd.grad(err[i], params, retain_graph=i == 0, allow_unused=True)
             for i in range(2)]
    flat = [torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                       for g, p in zip(gs, params, strict=True)]) for gs in grads]
    return err.detach(), flat[0].dot(flat[0]), flat[1].dot(flat[1]), flat[0].dot(flat[1])


def error_partials(objective, policy_err, ref_err, timesteps, scheduler):
    """``dL_i/dm_w``, ``dL_i/dm_l`` of each pair's loss (``[B]`` each) by autograd on the errors."""
    m = policy_err.detach().clone().requires_grad_(True)  # [2B]
    out = objective.from_errors(m, ref_err, timesteps, scheduler)
    (grad,) = torch.autograd.grad(out.per_pair_loss.sum(), m, allow_unused=True)
    grad = torch.zeros_like(m) if grad is None else grad
    return split_pair(grad.detach())


def stratified_noise(adapter, bucket: int, n_buckets: int):
    """The ``noise`` of ``pair_forward``: each pair's noise from ``generator``, its timestep
    drawn uniformly inside ``bucket``."""
    n_t = num_train_timesteps(adapter.noise_scheduler)

    def noisy_inputs(latents, generator):
        b = latents.shape[0] // 2
        noise, drawn = adapter.draw_noise_and_timesteps(latents[:b].shape, generator)
        t = stratified_timesteps(bucket, b, n_t, n_buckets, generator,
                                 integer=not drawn.is_floating_point()).to(drawn.device, drawn.dtype)
        return adapter.make_noisy(latents, repeat_pair(noise).to(latents.device, latents.dtype),
                                  repeat_pair(t).to(latents.device))
    return noisy_inputs


def bucket_batch(adapter, params, reference, batch, bucket: int, n_buckets: int, generator,
                 grad_count: int):
    """One micro-batch at timesteps stratified in ``bucket``: policy and reference errors of
    every pair (the trainer's forward path, training/forward.py), and the per-sample gradient
    terms of its first ``grad_count`` pairs."""
    with torch.no_grad():
        out = pair_forward(adapter, batch, PairDraws(images=generator, pairs=generator),
                           reference=reference, noise=stratified_noise(adapter, bucket, n_buckets))
    noisy, cond, b = out.noisy, out.cond, batch.num_pairs
    rows = []
    for i in range(min(grad_count, b)):
        if adapter.trains_text_encoder:  # the text encoder's LoRA gets gradient via the prompts
            cond = batch_conditioning(adapter, batch)
        rows.append(per_sample_gradients(adapter, params, noisy, cond, [i, b + i])[1:])
    terms = [torch.stack([r[k] for r in rows]) if rows else torch.zeros(0, dtype=torch.float64)
             for k in (0, 1, 2)]  # 3 x [grad_count]
    return out.policy, out.reference.float(), noisy.timesteps, terms


def collect(config, adapter, params, reference, records, *, n_buckets: int, grad_pairs: int,
            generator) -> dict:
    """Errors and timesteps of every pair at one timestep in every bucket, and the gradient
    terms of the first ``grad_pairs`` pairs (per-pair backward passes are the costly part).

    The pairs come through the trainer's own data loader (same order for every bucket), so
    every family's data layout (images, video clips, aspect buckets) works.
    """
    batches = max(1, len(records) // config.training.train_batch_size)
    parts = {"policy_err": [], "ref_err": [], "timesteps": [], "terms": []}
    for bucket in range(n_buckets):
        seen = 0
        for batch in make_dataloader(config, records, total=batches):
            p, r, t, terms = bucket_batch(adapter, params, reference, batch, bucket, n_buckets,
                                          generator, grad_pairs - seen)
            seen += len(terms[0])
            parts["policy_err"].append(p.cpu())
            parts["ref_err"].append(r.cpu())
            parts["timesteps"].append(t.cpu())
            parts["terms"].append([x.cpu() for x in terms])
    return parts


def summarize(parts: dict, objectives: dict, scheduler, settings: dict, n_buckets: int) -> dict:
    """Per bucket: weight distributions (both models), masked fraction, gradient-norm spread."""
    n_t = num_train_timesteps(scheduler)
    pairs = [PairErrors(*split_pair(p), *split_pair(r), t[: len(t) // 2], scheduler)
             for p, r, t in zip(parts["policy_err"], parts["ref_err"], parts["timesteps"],
                                strict=True)]
    t_pair = torch.cat([pe.timesteps for pe in pairs])
    buckets = bucket_index(t_pair, n_t, n_buckets)  # [P]
    grad_buckets = torch.cat([bucket_index(pe.timesteps[: len(terms[0])], n_t, n_buckets)
                              for pe, terms in zip(pairs, parts["terms"], strict=True)])
    tau, kappa = settings["mask_threshold"], settings["kappa"]
    weights, masked = {}, {}
    for model in ("step", "reference"):
        ws = [importance_weights(pe, weight_model=model, kappa=kappa) for pe in pairs]
        w_w, w_l = torch.cat([w[0] for w in ws]), torch.cat([w[1] for w in ws])
        weights[model] = per_bucket(torch.cat([w_w, w_l]), torch.cat([buckets, buckets]), n_buckets)
        masked[model] = [masked_fraction(w_w[buckets == b], w_l[buckets == b], tau)
                         for b in range(n_buckets)]
        masked[model + "_overall"] = masked_fraction(w_w, w_l, tau)
    grad_norms = {}
    for name, objective in objectives.items():
        norms = []
        for pe, p, r, t, terms in zip(pairs, parts["policy_err"], parts["ref_err"],
                                      parts["timesteps"], parts["terms"], strict=True):
            k = len(terms[0])  # the first k pairs of the chunk have gradient terms
            a, b = error_partials(objective, p, r, t, scheduler)
            norms.append(pair_gradient_norm(a[:k], b[:k], *terms))
        grad_norms[name] = per_bucket(torch.cat(norms), grad_buckets, n_buckets)
    return {"buckets": [list(bounds) for bounds in bucket_bounds(n_t, n_buckets)],
            "pairs_per_bucket": [int((buckets == b).sum()) for b in range(n_buckets)],
            "grad_pairs_per_bucket": [int((grad_buckets == b).sum()) for b in range(n_buckets)],
            "timestep_range_seen": [float(t_pair.min()), float(t_pair.max())],
            "importance_weights": weights, "masked_fraction": masked,
            "grad_norm": grad_norms}


def load_for_analysis(config):
    """The adapter with what the run trains (a fresh LoRA, or full weights), the run's reference
    (training/reference.py, chosen as the trainer chooses it, taken before any training; a cached
    one becomes the model its pre-pass ran, since the analysis draws its own timesteps), and,
    when ``resume`` is set, the checkpoint's trained state loaded."""
    from ..training.checkpoint import load_checkpoint, resolve_resume
    from ..training.loop import load_lora_state
    from ..training.run_folder import folder_run_id
    from ..training.reference import make_reference

    # the checkpoint first: a missing, pickled or foreign one is refused before the model loads
    output_dir = Path(config.training.output_dir)
    resume_from = resolve_resume(config.training.resume, output_dir, folder_run_id(output_dir))
    checkpoint = load_checkpoint(resume_from) if resume_from else None
    adapter = get_model_adapter(config.model.family).load(config.model, device=torch.device("cpu"),
                                                          weight_dtype=torch.float32)
    reference = make_reference(config, adapter, SimpleNamespace(info=tqdm.write), live=True)
    params = adapter.add_trainable(config.network)
    if checkpoint is not None:
        load_lora_state(adapter, checkpoint["lora"])
    return adapter, params, reference, checkpoint


def analysis_records(config, n_pairs: int):
    if config.pairs.pairs_prompts:
        from ..pairs.onpolicy import make_training_pairs
        make_training_pairs(config)
    records = read_pairs(config.data.train_data, caption_extension=config.data.caption_extension)
    return records[:n_pairs]
