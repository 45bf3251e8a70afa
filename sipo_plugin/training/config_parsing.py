"""Reading values into the config's sections: key lookup, type checks, unknown keys with the
closest valid name, renamed keys. Import-light (no torch); shared by `config` and `config_layers`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..objectives.catalog import objective_config_classes
from .config_schema import SECTIONS, Config, ConfigError, ObjectiveConfig

# renamed keys: old name -> the one-line migration
MIGRATIONS = {
    "calibration_batches": "'calibration_batches' was replaced by 'calibration_pairs' (pairs, "
                           "whatever train_batch_size is): set calibration_pairs = batches x "
                           "train_batch_size (the old default 32 x 8 = 256)",
}
# removed sections: name -> the one-line migration ({where}: the preset)
SECTION_MIGRATIONS = {
    "toy": "{where}: the [toy] section is gone: toy pairs come from the same path as your model's "
           "now; write [pairs] pairs_prompts = \"toy\", rewards = [\"colour\"] and [evaluate] "
           "eval_after_training = true (see presets/demo.toml)",
}


def section_class(section: str) -> type:
    return Config.__dataclass_fields__[section].default_factory


def section_fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section_class(section))}


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def key_index() -> dict[str, str]:
    """Bare key -> section, for every fixed key (objective hyper-parameters are open-ended)."""
    index = {}
    for section in SECTIONS:
        if section == "objective":
            index["objective"] = "objective"  # --objective sipo sets [objective] name
            continue
        for name in section_fields(section):
            index[name] = section
    index.update(dict.fromkeys(MIGRATIONS, "training"))  # renamed: [training] says what replaced it
    return index


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, help) for every preset key: the README table is generated from it."""
    rows = []
    for section in SECTIONS:
        for name, f in section_fields(section).items():
            if section == "objective" and name == "hyperparameters":
                continue
            rows.append((section, name, field_default(f), f.metadata.get("help", "")))
    return rows


def closest(name: str, candidates) -> str:
    """`` (did you mean 'x'?)`` for the nearest candidate, or ''."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_type(where: str, name: str, value: Any, default: Any) -> Any:
    """Coerce a TOML/CLI value to the type of the field's default, or raise ConfigError."""
    expected = type(default)
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
    elif expected is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    kind = {bool: "true or false", int: "an integer", float: "a finite number",
            list: "a list of strings", str: "a string"}[expected]
    raise ConfigError(f"{where}: '{name}' must be {kind}, got {value!r}")


def build_section(section: str, values: dict, where: str):
    """One section's dataclass from its table: every unknown key (with the closest name or the
    section it belongs in) and every badly typed value reported."""
    fields = section_fields(section)
    cls = section_class(section)
    if section == "objective":
        values = dict(values)
        name = values.pop("name", ObjectiveConfig.name)
        if not isinstance(name, str):
            raise ConfigError(f"{where}: [objective] 'name' must be a string, got {name!r}")
        return cls(name=name, hyperparameters=values)
    kwargs, problems = {}, []
    for key, value in values.items():
        if key in MIGRATIONS:
            problems.append(f"{where}: {MIGRATIONS[key]}")
            continue
        if key not in fields:
            others = {k for s in SECTIONS if s != "objective" for k in section_fields(s)}
            hint = closest(key, fields)
            if not hint and key in others:
                hint = f" (it belongs in [{key_index()[key]}])"
            problems.append(f"{where}: unknown key '{key}' in [{section}]{hint or closest(key, others)}")
            continue
        try:
            kwargs[key] = check_type(f"{where} [{section}]", key, value, field_default(fields[key]))
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return cls(**kwargs)


def parse_override_value(text: str) -> Any:
    """A CLI value in TOML syntax (1e-4, true, ["a","b"], "x"); anything else is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def objective_fields(name: str) -> set[str]:
    """The hyper-parameter names an objective takes, read from its registered config class."""
    classes = objective_config_classes()
    if name not in classes:
        raise KeyError(name)
    return {f.name for f in dataclasses.fields(classes[name])}


def objective_hyperparameter_names() -> set[str]:
    """Every registered objective's hyper-parameters (plugins included): bare CLI names."""
    return {f.name for cls in objective_config_classes().values() for f in dataclasses.fields(cls)}
