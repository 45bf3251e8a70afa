"""The objective registry: names -> (loss function, hyper-parameter dataclass), plus entry points.

Built-in objectives register themselves where they are defined (``@register_objective(...)`` on
each module's objective function). Third-party packages add objectives through the entry-point
group ``sipo_plugin.objectives``: the loaded object is either an :class:`ObjectiveSpec`
(registered here) or a module / callable that calls :func:`register_objective` itself. Entry
points are read lazily: when a name is not among the registered ones, and when listing.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .errors import (LossOutput, PairErrors, drop_empty_groups, pair_timesteps, per_sample_error,
                     split_pair)
from ..utils.plugins import (adopt_entry_point_object, check_new_name, load_entry_points,
                             registering_decorator)
from .catalog import ENTRY_POINT_GROUP, build_hyperparameters, unknown_objective_message

__all__ = [
    "ENTRY_POINT_GROUP",
    "CalibrationSample",
    "Objective",
    "ObjectiveOutput",
    "ObjectiveSpec",
    "UnknownObjectiveError",
    "available_objectives",
    "describe_objectives",
    "get_objective",
    "get_objective_spec",
    "register_objective",
]

ObjectiveFn = Callable[[PairErrors, Any], LossOutput]


class CalibrationSample(NamedTuple):
    """What a calibration hook sees: per calibration batch, the reference errors ``[2B]``
    (winners first, ``per_sample_error`` of the reference prediction) and the timesteps
    (``[B]`` or ``[2B]``), taken before training (the policy equals the reference then)."""

    errors: list[torch.Tensor]
    timesteps: list[torch.Tensor]


# calibrate(config, sample, scheduler) -> the calibrated config (an instance of config_cls)
CalibrateFn = Callable[[Any, CalibrationSample, Any], Any]


class UnknownObjectiveError(KeyError, ValueError):
    """An objective name that is neither built in nor provided by an entry point."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: ``fn(pairs: PairErrors, config) -> LossOutput([B], metrics)``."""

    name: str
    fn: ObjectiveFn
    config_cls: type
    description: str = ""
    needs_reference: bool = True  # False: ``fn`` never reads ref_err_* (they are None)
    # the calibration hook the trainer calls before the first step, and when it is needed
    # (default: always, once a hook is given); see register_objective
    calibrate: CalibrateFn | None = None
    needs_calibration: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class ObjectiveOutput:
    """``loss``: fp32 scalar (mean over pairs); ``metrics``: floats; ``per_pair_loss``: ``[B]``."""

    loss: torch.Tensor
    metrics: dict[str, float]
    per_pair_loss: torch.Tensor


_SPECS: dict[str, ObjectiveSpec] = {}
_ENTRY_POINTS_LOADED = False


def _registered_by(spec: ObjectiveSpec) -> str:
    """``module.qualname`` of the spec's loss function (for the duplicate-name message)."""
    fn = spec.fn
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


def _first_paragraph(docstring: str | None) -> str:
    """The text of a docstring up to its first blank line."""
    return re.split(r"\n\s*\n", (docstring or "").strip(), maxsplit=1)[0]


def _check_spec(name: Any, fn: Any, config_cls: Any, description: Any) -> str:
    check_new_name(_SPECS, name, "objective", _registered_by)
    if not callable(fn):
        raise TypeError(f"fn of objective {name!r} must be callable, got {fn!r}")
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"config_cls of objective {name!r} must be a dataclass, got {config_cls!r}")
    if not config_cls.__dataclass_params__.frozen:
        raise TypeError(f"config_cls of objective {name!r} must be frozen: @dataclass(frozen=True)")
    if not isinstance(description, str):
        raise TypeError(f"description of objective {name!r} must be a string")
    text = description.strip() or " ".join(_first_paragraph(fn.__doc__).split())
    if "\n" in text:
        raise ValueError(f"description of objective {name!r} must be one line")
    return text


def register_objective(
    *,
    name: str,
    fn: ObjectiveFn | None = None,
    config_cls: type,
    description: str = "",
    needs_reference: bool = True,
    calibrate: CalibrateFn | None = None,
    needs_calibration: Callable[[Any], bool] | None = None,
) -> ObjectiveSpec | Callable[[ObjectiveFn], ObjectiveFn]:
    """Register ``fn`` under ``name`` with its frozen hyper-parameter dataclass ``config_cls``;
    returns the :class:`ObjectiveSpec`.

    Without ``fn`` it is a decorator: ``@register_objective(name=..., config_cls=...)`` above the
    objective function registers it and returns it unchanged.

    ``needs_reference=False`` declares that ``fn`` never reads the reference errors: the trainer
    then runs no reference forward (and no reference pre-pass), and ``fn`` gets ``None`` for
    ``ref_err_w`` / ``ref_err_l``.

    ``calibrate(config, sample, scheduler) -> config``: a calibration hook. Before the first
    step the trainer (and ``--analyze``) computes a :class:`CalibrationSample` (reference errors
    and timesteps of ``calibration_pairs`` pairs) and trains with the config the hook returns
    (stored in checkpoints: a resumed run is not calibrated again). ``needs_calibration(config)``
    says whether a config still needs it (default: always, when a hook is given); SIPO and
    DPO-C&M calibrate ``kappa = "auto"`` this way.

    Raises ValueError for a badly formed or duplicate name, TypeError for a non-callable ``fn``
    (or hook) or a ``config_cls`` that is not a frozen dataclass. An empty description falls back
    to the first paragraph of ``fn``'s docstring, on one line.
    """
    if fn is None:
        return registering_decorator(
            register_objective, "fn", name=name, config_cls=config_cls, description=description,
            needs_reference=needs_reference, calibrate=calibrate,
            needs_calibration=needs_calibration,
        )
    text = _check_spec(name, fn, config_cls, description)
    if not isinstance(needs_reference, bool):
        raise TypeError(f"needs_reference of objective {name!r} must be True or False")
    for hook, value in (("calibrate", calibrate), ("needs_calibration", needs_calibration)):
        if value is not None and not callable(value):
            raise TypeError(f"{hook} of objective {name!r} must be callable, got {value!r}")
    if needs_calibration is not None and calibrate is None:
        raise TypeError(f"objective {name!r} gives needs_calibration without a calibrate hook")
    spec = ObjectiveSpec(
        name=name, fn=fn, config_cls=config_cls, description=text,
        needs_reference=needs_reference, calibrate=calibrate, needs_calibration=needs_calibration,
    )
    _SPECS[name] = spec
    return spec


def _register_spec(spec: ObjectiveSpec) -> None:
    register_objective(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})


def _adopt_entry_point_object(obj: Any) -> None:
    adopt_entry_point_object(obj, ObjectiveSpec, _SPECS, _register_spec)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True  # set first: a plugin may list objectives while importing
    load_entry_points(ENTRY_POINT_GROUP, _adopt_entry_point_object, "objective")


def available_objectives() -> list[str]:
    """Sorted names of every objective: built-ins and entry points."""
    return list(describe_objectives())


def describe_objectives() -> dict[str, str]:
    """Name -> one-line description, sorted by name."""
    _load_entry_points()
    return {name: _SPECS[name].description for name in sorted(_SPECS)}


def _get_spec(name: str) -> ObjectiveSpec:
    if name not in _SPECS:
        _load_entry_points()
    if name in _SPECS:
        return _SPECS[name]
    raise UnknownObjectiveError(unknown_objective_message(name, sorted(_SPECS)))


def _build_config(spec: ObjectiveSpec, hyperparameters: dict[str, Any]) -> Any:
    return build_hyperparameters(spec.name, spec.config_cls, hyperparameters)


def get_objective_spec(name: str) -> ObjectiveSpec:
    """The registered spec of ``name`` (its loss function and hyper-parameter class)."""
    return _get_spec(name)


def get_objective(name: str, **hyperparameters: Any) -> Objective:
    """The objective ``name`` with its hyper-parameters: ``get_objective("sipo", beta=5000.0)``."""
    spec = _get_spec(name)
    return Objective(spec, _build_config(spec, hyperparameters))


def metrics_to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Floats of a dict of floats and 0-dim tensors, the tensors read in one host transfer."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
    floats = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([v.detach().float().reshape(()).to(device) for v in tensors.values()])
        floats.update(zip(tensors, stacked.tolist(), strict=True))  # one host sync
    return {k: floats[k] for k in metrics}


class Objective:
    """A configured objective: ``objective(model_pred, ref_pred, target, timesteps, scheduler)``.

    Immutable: ``with_kappa`` returns a new objective.
    """

    def __init__(self, spec: ObjectiveSpec, config: Any):
        self.spec = spec
        self.config = config

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def description(self) -> str:
        return self.spec.description

    def hyperparameters(self) -> dict[str, object]:
        """The config as a plain dict (run metadata); ``get_objective(name, **it)`` rebuilds it."""
        return dataclasses.asdict(self.config)

    @property
    def needs_reference(self) -> bool:
        """False when the loss never reads the reference (e.g. ``sft``): no reference forward."""
        return self.spec.needs_reference

    @property
    def needs_calibration(self) -> bool:
        """True while the objective's calibration hook has to run (e.g. ``kappa = "auto"``)."""
        spec = self.spec
        if spec.calibrate is None:
            return False
        return spec.needs_calibration is None or bool(spec.needs_calibration(self.config))

    def calibrate(self, sample: CalibrationSample | tuple, scheduler: Any) -> Objective:
        """The objective with its calibration hook applied to ``sample`` (a
        :class:`CalibrationSample` or ``(errors, timesteps)``); itself when it needs none."""
        if not self.needs_calibration:
            return self
        config = self.spec.calibrate(self.config, CalibrationSample(*sample), scheduler)
        if not isinstance(config, self.spec.config_cls):
            raise TypeError(f"the calibrate hook of objective {self.name!r} must return a "
                            f"{self.spec.config_cls.__name__}, got {config!r}")
        calibrated = Objective(self.spec, config)
        if calibrated.needs_calibration:
            raise ValueError(f"the calibrate hook of objective {self.name!r} returned a config "
                             "that still needs calibration")
        return calibrated

    def with_kappa(self, kappa: float) -> Objective:
        """A new objective with ``kappa`` set (e.g. the value from ``calibrate_kappa``)."""
        if "kappa" not in {f.name for f in dataclasses.fields(self.config)}:
            raise ValueError(f"objective {self.name!r} has no kappa hyper-parameter")
        return Objective(self.spec, dataclasses.replace(self.config, kappa=kappa))

    def __repr__(self) -> str:
        return f"Objective(name={self.name!r}, config={self.config!r})"

    def __call__(
        self,
        model_pred: torch.Tensor,
        ref_pred: torch.Tensor | None,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        scheduler: Any,
    ) -> ObjectiveOutput:
        """Loss of a ``[2B, ...]`` winners-first batch; ``timesteps`` is ``[B]`` or ``[2B]``;
        ``ref_pred`` may be None for an objective that does not need the reference."""
        ref_shape = target.shape if ref_pred is None else ref_pred.shape
        if not (model_pred.shape == ref_shape == target.shape):
            raise ValueError(
                "model_pred, ref_pred and target must have the same shape, got "
                f"{tuple(model_pred.shape)}, {tuple(ref_shape)}, {tuple(target.shape)}"
            )
        target = target.detach()
        ref_err = None
        if ref_pred is not None:
            with torch.no_grad():
                ref_err = per_sample_error(ref_pred.detach(), target)
        return self.from_errors(per_sample_error(model_pred, target), ref_err, timesteps, scheduler)

    def from_errors(
        self,
        policy_err: torch.Tensor,
        ref_err: torch.Tensor | None,
        timesteps: torch.Tensor,
        scheduler: Any,
        *,
        metrics_on_device: bool = False,
    ) -> ObjectiveOutput:
        """Loss from per-sample errors ``[2B]`` (winners first), e.g. with cached reference errors.

        ``policy_err`` carries the gradient; ``ref_err`` is treated as a constant (None: no
        reference, for an objective that declared ``needs_reference=False``). The metrics are
        floats (read in one host sync, empty timestep groups left out); ``metrics_on_device``
        leaves them as the detached tensors the objective made (see
        :meth:`from_errors_on_device`).
        """
        if self.needs_calibration:
            raise RuntimeError(
                f"objective {self.name!r} is not calibrated (e.g. kappa='auto'): run "
                "objective = objective.calibrate((ref_errors, timesteps), scheduler) on a few "
                "reference batches; for kappa: kappa = calibrate_kappa(ref_errors, timesteps, "
                "scheduler, ...), then objective = objective.with_kappa(kappa) (or pass a number)"
            )
        m_w, m_l = split_pair(policy_err)  # [B] each, with grad
        t = pair_timesteps(timesteps, m_w.shape[0]).to(m_w.device)  # [B]
        r_w, r_l = self._reference_pair(ref_err, m_w.device)  # [B] each, or None
        pairs = PairErrors(m_w, m_l, r_w, r_l, t, scheduler)
        result = self.spec.fn(pairs, self.config)
        per_pair = result.losses
        if per_pair.shape != pairs.policy_err_w.shape:
            raise ValueError(
                f"objective {self.name!r} returned losses of shape {tuple(per_pair.shape)}, "
                f"expected one per pair {tuple(pairs.policy_err_w.shape)}"
            )
        loss = per_pair.float().mean()  # masked pairs count in the denominator
        metrics = {"loss": loss.detach(), **result.metrics}
        if not metrics_on_device:
            metrics = drop_empty_groups(metrics_to_floats(metrics))
        return ObjectiveOutput(loss=loss, metrics=metrics, per_pair_loss=per_pair)

    # the trainer's form: no host sync per micro-batch, it reads the metrics when it logs
    from_errors_on_device = functools.partialmethod(from_errors, metrics_on_device=True)

    def _reference_pair(self, ref_err: torch.Tensor | None, device: torch.device):
        """``(r_w, r_l)`` ``[B]`` each in fp32 on ``device``; ``(None, None)`` without one."""
        if ref_err is None:
            if self.needs_reference:
                raise ValueError(f"objective {self.name!r} needs the reference errors, got None")
            return None, None
        r_w, r_l = split_pair(ref_err.detach().float())
        return r_w.to(device), r_l.to(device)
