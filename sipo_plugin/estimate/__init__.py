"""`train_sipo.py --estimate`: the memory a run needs, from its preset, before it starts.

build.py (the run's model on the meta device), states.py (gradients and optimizer states),
activations.py (calibrated activation memory), estimate.py (the parts), report.py (the text).
"""

from __future__ import annotations

from .build import EstimateError


def config_for_estimate(preset, overrides: list[str], config_file=None):
    """(Config, notes): the validated preset; when its only problems are paths that do not exist
    here (the model folder, the pair data), the preset as written, with those problems as notes:
    the estimate reads neither."""
    from ..training import config as config_module
    try:
        return config_module.load_config(preset, overrides, config_file=config_file), []
    except config_module.ConfigError as err:
        unchecked = getattr(err, "config", None)
        if unchecked is None:
            raise
        try:
            config_module._validate_paths(unchecked)
            missing: list[str] = []
        except config_module.ConfigError as paths:
            missing = paths.problems
        if not missing or any(p not in missing for p in err.problems):
            raise
        return unchecked, missing


def estimate_report(config, vram: list[float], notes: list[str] = ()) -> str:
    from .estimate import estimate
    from .report import format_estimate
    result = estimate(config, resolutions=[512, 768, 1024] if config.data.resolution >= 256 else [])
    result.notes[:0] = [f"not checked here: {n}" for n in notes]
    return format_estimate(result, vram)
