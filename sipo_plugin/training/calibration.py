"""Before the first step: the calibration sample, the objective's calibration hook, and the
first timestep drawn (``skip_masked_timesteps``).

The calibration sample is the reference errors and timesteps of the run's calibration pairs (the
first ``calibration_pairs`` of the data's epoch-0 order), with draws keyed by (seed, pair), so it
is the same whatever train_batch_size is, and the same for the trainer and ``--analyze``; with
``reference = "cached"`` it is every cached draw. An objective registered with a ``calibrate``
hook (SIPO and DPO-C&M: ``kappa = "auto"``) is calibrated on it; a resumed run takes the
checkpoint's calibrated hyper-parameters.
"""

from __future__ import annotations

import torch

from ..data import PairBatchSampler
from ..data.loader import make_dataloader
from ..models.base import ModelAdapter
from ..objectives import CalibrationSample, first_kept_timestep, get_objective
from .forward import PairDraws, pair_forward
from .reference import AdapterOffReference

CALIBRATION_STEP = -1  # the draws' step key: training's steps count from 0


def calibration_pairs(config, num_pairs: int) -> list[int]:
    """The pairs calibration uses: the first ``calibration_pairs`` of the data's epoch-0 order
    for ``seed`` (all pairs when there are fewer)."""
    order = PairBatchSampler(num_pairs, 1, seed=config.training.seed, total=0).epoch_order(0)
    return order[:min(config.training.calibration_pairs, num_pairs)].tolist()


def calibration_loader(config, records, stores=None):
    """The calibration pairs in batches of at most train_batch_size (through the run's stores)."""
    return make_dataloader(config, records, total=0, stores=stores,
                           subset=calibration_pairs(config, len(records)))


@torch.no_grad()
def calibration_sample(adapter: ModelAdapter, loader, seed: int, reference=None,
                       cached=None) -> CalibrationSample:
    """Reference errors [2B] and timesteps [2B] of each calibration batch (or of every cached
    reference draw). Each pair's VAE sample, noise and timestep come from generators keyed by
    (seed, pair index), so batching does not change them; no policy runs."""
    if cached is not None:
        return CalibrationSample(*cached.calibration_sample())
    reference = reference or AdapterOffReference()
    errors, timesteps = [], []
    for batch in loader:
        draws = PairDraws.for_batch(seed, CALIBRATION_STEP, 0, batch.indices)
        out = pair_forward(adapter, batch, draws, reference=reference, policy=False)
        errors.append(out.reference)
        timesteps.append(out.timesteps)
    return CalibrationSample(errors, timesteps)


def run_calibration_sample(config, adapter, records, reference=None,
                           stores=None) -> CalibrationSample:
    """The run's calibration sample: its calibration pairs (through the run's stores when it
    caches), or every cached reference draw."""
    return calibration_sample(adapter, calibration_loader(config, records, stores),
                              config.training.seed, reference,
                              stores.reference if stores is not None else None)


def calibrated_values(before, after) -> dict:
    """The hyper-parameters the calibration hook changed: name -> new value."""
    old = before.hyperparameters()
    return {k: v for k, v in after.hyperparameters().items() if old.get(k) != v}


def shown(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


def objective_for_run(config, adapter, records, checkpoint, log, reference=None, stores=None,
                      sample: CalibrationSample | None = None):
    """The configured objective, its calibration hook run once on the run's calibration sample
    (or ``sample``) with the run's reference and caches; on resume, the checkpoint's."""
    if checkpoint is not None:
        return get_objective(checkpoint["objective_name"], **checkpoint["objective_hyperparameters"])
    objective = get_objective(config.objective.name, **config.objective.hyperparameters)
    if not objective.needs_calibration:
        return objective
    sample = sample or run_calibration_sample(config, adapter, records, reference, stores)
    calibrated = objective.calibrate(sample, adapter.noise_scheduler)
    changed = calibrated_values(objective, calibrated)
    before = objective.hyperparameters()
    log.info("; ".join(f"{k} = {shown(before.get(k))} calibrated to {shown(v)}"
                       for k, v in changed.items()) or f"'{objective.name}' calibrated")
    log.event("calibration", **changed)
    return calibrated


def first_timestep_for_run(config, objective, adapter, sample, log) -> int:
    """skip_masked_timesteps: the smallest timestep training draws (0: every timestep)."""
    if not config.training.skip_masked_timesteps:
        return 0
    if type(adapter).draw_noise_and_timesteps is not ModelAdapter.draw_noise_and_timesteps:
        raise ValueError(f"skip_masked_timesteps: the {config.model.family} family draws its own "
                         "(continuous) timesteps; set skip_masked_timesteps = false")
    cfg = objective.config
    first = first_kept_timestep(*sample, adapter.noise_scheduler, kappa=cfg.kappa,
                                mask_threshold=cfg.mask_threshold)
    total = adapter.noise_scheduler.config.num_train_timesteps
    log.info(f"skip_masked_timesteps: every calibration pair at t < {first} was masked; "
             f"training draws t in [{first}, {total}) and scales the loss by "
             f"{timestep_share(first, total):.4f}")
    log.event("skip_masked_timesteps", first_timestep=first)
    return first


def timestep_share(first: int, total: int) -> float:
    """The share of timesteps drawn, ``(T - t_0) / T``: the loss scale that keeps its
    expectation when the skipped timesteps are masked (objectives.first_kept_timestep)."""
    return (total - first) / total
