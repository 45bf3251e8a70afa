"""The layers of a run's settings besides the preset: the command line's tokens, an sd-scripts
``--config_file`` and an sd-scripts dataset config (`sipo_plugin.sdscripts`), folded into the raw
sectioned dict that `config.parse_config` reads. Import-light (no torch).

Order (later wins): this project's defaults < sd-scripts' defaults (with a config file) < preset
< config file < command line < the dataset config's per-run settings (as in sd-scripts, where the
dataset config comes first in the fallback chain).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..sdscripts.config_file import (SD_SCRIPTS_DEFAULTS, SD_SCRIPTS_VALUES, SdScriptsError,
                                     read_config_file, translate)
from ..sdscripts.dataset_config import read_dataset_config
from .config_parsing import (check_type, closest, field_default, key_index,
                             objective_hyperparameter_names, parse_override_value, section_class,
                             section_fields, tomllib)
from .config_schema import OPTIMIZER_TYPES, SECTIONS, ConfigError


class _Bare:
    """A ``--flag`` given without a value (sd-scripts' store_true options): true for a boolean."""


BARE = _Bare()


def split_command_line(tokens: list[str]) -> list[tuple[str, str, Any]]:
    """``--key value``, ``--key=value`` and a bare ``--flag`` -> [(token, key, value or BARE)]."""
    out, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got '{token}'")
        name, has_value, text = token[2:].partition("=")
        key = name if "." in name else name.replace("-", "_")
        if has_value:
            value, i = parse_override_value(text), i + 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value, i = parse_override_value(tokens[i + 1]), i + 2
        else:
            value, i = BARE, i + 1
        out.append((f"--{name}", key, value))
    return out


def resolve_key(key: str, index: dict, objective_keys: set) -> tuple[str, str] | None:
    """(section, name) of a bare or qualified key of this project, or None."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"command line: unknown section '{section}'{closest(section, SECTIONS)}")
        return section, name
    if key == "objective":
        return "objective", "name"
    if key in index:
        return index[key], key
    if key in objective_keys:
        return "objective", key
    return None


def place(raw: dict, mapped: dict, index: dict, objective_keys: set, where: str) -> None:
    """Put translated sd-scripts settings ({bare key: value}) into their sections, type-checked."""
    for key, value in mapped.items():
        section, name = resolve_key(key, index, objective_keys)
        if section != "objective":
            value = check_type(where, name, value, field_default(section_fields(section)[name]))
        raw[section][name] = value


def fold_command_line(raw: dict, overrides: list[str], unused: list[str]) -> dict:
    """Command-line options into the raw preset dict (see `config.apply_overrides`)."""
    raw = {section: dict(raw.get(section, {})) for section in {*SECTIONS, *raw}}
    index = key_index()
    objective_keys = objective_hyperparameter_names()
    for token, key, value in split_command_line(overrides):
        resolved = resolve_key(key, index, objective_keys)
        if resolved is not None and value is BARE:
            if not isinstance(getattr(_section_defaults(resolved[0]), resolved[1], None), bool):
                raise ConfigError(f"command line: '{token}' needs a value")
            value = True
        if resolved is not None and key not in SD_SCRIPTS_VALUES:
            raw[resolved[0]][resolved[1]] = value
            continue
        try:  # an sd-scripts name, or one of ours given in sd-scripts' spelling ("512,512")
            mapped, extra = translate({key: True if value is BARE else value}, "command line",
                                      [*index, *objective_keys], strict=True,
                                      optimizer_types=OPTIMIZER_TYPES)
        except SdScriptsError as err:
            raise ConfigError(str(err)) from None
        place(raw, mapped, index, objective_keys, "command line")
        unused.extend(f"--{k}" for k in extra)
    return raw


def _section_defaults(section: str):
    return section_class(section)()


def with_config_file(raw: dict, path: str | Path, unused: list[str]) -> dict:
    """sd-scripts' ``--config_file`` on top of the preset (sections cosmetic, keys translated,
    sd-scripts' defaults where it differs from ours); a file in this project's own sectioned
    layout (what --output_config writes) is read as a preset."""
    own = _read_own_layout(path)
    raw = {section: dict(raw.get(section, {})) for section in {*SECTIONS, *raw}}
    if own is not None:
        for section, values in own.items():
            raw[section].update(values)
        return raw
    index, objective_keys = key_index(), objective_hyperparameter_names()
    try:
        mapped, extra = translate(read_config_file(path), str(path), [*index, *objective_keys],
                                  optimizer_types=OPTIMIZER_TYPES)
    except SdScriptsError as err:
        raise ConfigError(str(err)) from None
    for key, value in SD_SCRIPTS_DEFAULTS.items():
        raw[index[key]].setdefault(key, value)
    place(raw, mapped, index, objective_keys, str(path))
    unused.extend(extra)
    return raw


def _read_own_layout(path: str | Path) -> dict | None:
    """The file's tables when every top-level entry is one of this project's sections, else None."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except tomllib.TOMLDecodeError:
        return None  # reported by the sd-scripts reader, with the file name
    if raw and all(k in SECTIONS and isinstance(v, dict) for k, v in raw.items()):
        return raw
    return None


def with_dataset_config(raw: dict, unused: list[str]) -> dict:
    """train_data = an sd-scripts dataset config (.toml): its per-run settings (resolution,
    batch_size, buckets, flip_aug, caption_dropout_rate) win, as in sd-scripts, where the dataset
    config comes first in the fallback chain."""
    train_data = raw.get("data", {}).get("train_data", "")
    if not (isinstance(train_data, str) and train_data.lower().endswith(".toml")):
        return raw
    try:
        dataset = read_dataset_config(train_data)
    except SdScriptsError as err:
        raise ConfigError(str(err)) from None
    place(raw, dataset.settings, key_index(), set(), str(train_data))
    unused.extend(f"{key} (dataset_config)" for key in dataset.unused)
    return raw


def _toml_value(value: Any) -> str:
    """One TOML value: bool, int, float (inf/nan as TOML spells them), str, or a list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string


def config_to_toml(tables: dict[str, dict]) -> str:
    """The resolved settings in this project's sectioned preset layout (``Config.to_dict()``)."""
    lines = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
