"""`train_sipo.py --estimate`: the memory a run needs, from its preset, before it starts.

build.py (the run's model on the meta device), states.py (gradients and optimizer states),
activations.py (calibrated activation memory), estimate.py (the parts), report.py (the text).
"""

from __future__ import annotations

from .build import EstimateError


def config_for_estimate(preset, overrides: list[str], config_file=None):
    """(Config, notes): the checked preset; when its only problems are paths that do not exist
    here (the model folder, the pair data), the preset as written, with those problems as notes:
    the estimate reads neither."""
    from ..training import checks
    from ..training.config import ConfigError, parse_config
    parsed = parse_config(preset, overrides, config_file=config_file)
    problems = checks.config_problems(parsed)
    if not problems:
        return checks.check_config(parsed), []
    try:
        checks.files.paths(parsed)
        missing: list[str] = []
    except ConfigError as err:
        missing = err.problems
    if any(p not in missing for p in problems):
        raise ConfigError(problems)
    return parsed, missing


def estimate_report(config, vram: list[float], notes: list[str] = ()) -> str:
    from .estimate import estimate
    from .report import format_estimate
    result = estimate(config, resolutions=[512, 768, 1024] if config.data.resolution >= 256 else [])
    result.notes[:0] = [f"not checked here: {n}" for n in notes]
    return format_estimate(result, vram)
