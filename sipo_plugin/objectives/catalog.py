"""Objective names and hyper-parameter classes without importing torch.

Config parsing and ``--check`` need only which objectives exist and what hyper-parameters they
take. The built-ins answer from ``configs.py``; once the registry is loaded (an objective was
built, a plugin registered one) or an entry-point plugin is installed, the registry answers, so
runtime registrations and plugins are never missed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import sys
from typing import Any

from .configs import BUILTIN_CONFIGS
from .validation import closest

ENTRY_POINT_GROUP = "sipo_plugin.objectives"
_REGISTRY = "sipo_plugin.objectives.registry"


def _registry_needed() -> bool:
    return _REGISTRY in sys.modules or bool(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def objective_config_classes() -> dict[str, type]:
    """Objective name -> its hyper-parameter dataclass, sorted by name."""
    if not _registry_needed():
        return dict(sorted(BUILTIN_CONFIGS.items()))
    objectives = importlib.import_module("sipo_plugin.objectives")  # registers the built-ins
    return {name: objectives.get_objective_spec(name).config_cls
            for name in objectives.available_objectives()}


def unknown_objective_message(name: Any, names: list[str]) -> str:
    hint = closest(name, names) if isinstance(name, str) else None
    suggestion = f" Did you mean {hint!r}?" if hint else ""
    return f"unknown objective {name!r}.{suggestion} Available: {', '.join(names)}"


def build_hyperparameters(objective: str, config_cls: type, hyperparameters: dict[str, Any]) -> Any:
    """``config_cls(**hyperparameters)``; ValueError (one line) for an unknown name or bad value."""
    valid = [f.name for f in dataclasses.fields(config_cls) if f.init]
    for key in hyperparameters:
        if key not in valid:
            hint = closest(key, valid)
            suggestion = f"; did you mean {hint!r}?" if hint else ""
            accepted = ", ".join(valid) if valid else "none"
            raise ValueError(
                f"unknown hyper-parameter {key!r} for objective {objective!r}{suggestion} "
                f"(accepted: {accepted})"
            )
    try:
        return config_cls(**hyperparameters)
    except TypeError as exc:
        raise ValueError(f"objective {objective!r}: {exc}") from exc


def check_objective(name: str, hyperparameters: dict[str, Any]) -> Any:
    """The validated hyper-parameters of objective ``name`` (ValueError, one line, if not)."""
    classes = objective_config_classes()
    if name not in classes:
        raise ValueError(unknown_objective_message(name, list(classes)))
    return build_hyperparameters(name, classes[name], hyperparameters)
