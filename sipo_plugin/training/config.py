"""The run configuration: a TOML preset (plus command-line overrides) -> frozen dataclasses.

A preset has one table per section (`config_schema`); every key name is unique across sections, so
a command-line override can name it bare (``--learning_rate 1e-4``) or qualified
(``--training.learning_rate``). `parse_config` is parsing only: unknown keys are rejected with the
closest valid name and values are type-checked, every problem reported (``ConfigError.problems``),
and nothing but the settings files is read. `load_config` parses, then runs every start-up rule
once (`checks`: ranges, cross-field rules, the family's rules, paths, devices). Nothing here
imports torch or diffusers (``--check`` stays fast).
"""

from __future__ import annotations

from pathlib import Path

from . import checks
from .config_layers import fold_command_line, with_config_file, with_dataset_config
from .config_parsing import (MIGRATIONS, SECTION_MIGRATIONS, build_section, closest,  # noqa: F401
                             describe_keys, key_index, objective_fields, tomllib)
from .config_schema import (OPTIMIZER_TYPES, REFERENCE_MODES, SAVE_PRECISIONS,  # noqa: F401
                            SECTIONS, SEED_MAX, TRACKERS, Config, ConfigError, DataConfig,
                            EvaluateConfig, ExportConfig, ModelConfig, NetworkConfig,
                            ObjectiveConfig, PairsConfig, SamplingConfig, TrainingConfig)

_key_index = key_index  # the name the tests and older callers use


def read_preset(preset: str | Path) -> dict:
    """A preset's tables (ConfigError: a missing file, bad TOML, a removed section)."""
    path = Path(preset)
    if not path.is_file():
        raise ConfigError(f"preset not found: {path} (see presets/ for examples)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    for section in raw:
        if section in SECTION_MIGRATIONS:
            raise ConfigError(SECTION_MIGRATIONS[section].format(where=path))
    return raw


def apply_overrides(raw: dict, overrides: list[str], unused: list[str] | None = None) -> dict:
    """Fold command-line options into the raw preset dict: this project's keys, and sd-scripts'
    spellings (`sipo_plugin.sdscripts`); sd-scripts options with no effect here go to `unused`."""
    return fold_command_line(raw, overrides, [] if unused is None else unused)


def _drop_foreign_hyperparameters(preset: dict, merged: dict) -> dict:
    """When the command line switches the objective, the preset's hyper-parameters that the new
    objective does not take are dropped with a note; the command line's own are kept (and checked)."""
    name = merged.get("name", ObjectiveConfig.name)
    if name == preset.get("name", ObjectiveConfig.name):
        return merged
    try:
        accepted = objective_fields(name)
    except (KeyError, ValueError, TypeError):
        return merged  # an unknown name is reported by validation
    dropped = [k for k in preset if k != "name" and k not in accepted and merged.get(k) == preset[k]]
    if dropped:
        print(f"note: objective '{name}' does not take the preset's {', '.join(dropped)}: ignored")
    return {k: v for k, v in merged.items() if k not in dropped}


def parse_config(preset: str | Path | None, overrides: list[str] | None = None, *,
                 config_file: str | Path | None = None) -> Config:
    """Read a preset (and/or an sd-scripts ``config_file``), apply command-line overrides and
    type-check every value (ConfigError listing every problem); no rule across keys, files or
    devices runs (`checks.check_config` does). Settings sd-scripts has and this project does not
    use are listed in one "not used here" line."""
    raw: dict = {}
    where = "<defaults>"
    if preset is not None:
        raw, where = read_preset(preset), str(Path(preset))
    raw.pop("run", None)  # the [run] table of a run.toml written by a run: not a setting
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{section}]{closest(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: '{section}' must be a table ([{section}])")
    unused: list[str] = []
    if config_file is not None:
        raw = with_config_file(raw, config_file, unused)
        where = str(config_file) if preset is None else where
    preset_objective = dict(raw.get("objective", {}))
    raw = apply_overrides(raw, overrides or [], unused)
    raw["objective"] = _drop_foreign_hyperparameters(preset_objective, raw["objective"])
    raw = with_dataset_config(raw, unused)
    if unused:
        print(f"note: not used here (sd-scripts settings with no counterpart): {', '.join(unused)}")
    sections, problems = {}, []
    for section in SECTIONS:
        try:
            sections[section] = build_section(section, raw.get(section, {}), where)
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return Config(**sections, source=where)


def load_config(preset: str | Path | None, overrides: list[str] | None = None, *,
                config_file: str | Path | None = None) -> Config:
    """`parse_config`, then every start-up rule once (`checks.check_config`): the checked config,
    with the settings of the LoRA file it starts from applied; else ConfigError with one clear line
    per problem (and the parsed config as ``err.config``, for ``--check``)."""
    return checks.check_config(parse_config(preset, overrides, config_file=config_file))


def load_sections(preset: str | Path, sections: tuple[str, ...]) -> dict:
    """Some sections of a preset, each type-checked, the family known, without the whole-run
    rules (a step such as `sipo-pairs sample` needs the model before any pair data exists)."""
    raw = read_preset(preset)
    out = {s: build_section(s, raw.get(s, {}), str(preset)) for s in sections}
    return checks.check_sections(out, str(preset))
