"""Every rule a run's settings must pass, run once at start-up (`config.load_config`, hence
``train``, ``--check``, ``--analyze``, ``--evaluate`` and library use), none while a `Config` is
built: ranges and cross-field rules (`settings`), the model family's rules (`family`), paths and
devices (`files`); then the model folder and the pair data (`startup_problems`, before the model
loads and in ``--check``). None imports torch unless a setting it checks needs it.
"""

from __future__ import annotations

from ..config_schema import Config, ConfigError
from . import family, files, settings
from .files import data_problems, model_family_problems, model_folder  # noqa: F401

# in the order their problems are listed
CONFIG_RULES = (settings.ranges, settings.choices, family.family, files.paths,
                settings.reference_and_caches, settings.network_start_and_layers,
                settings.buckets_and_augmentation, settings.sampling, settings.objective,
                settings.online)


def config_problems(config: Config) -> list[str]:
    """Every problem of the settings, one line each (every rule runs)."""
    problems = []
    for rule in CONFIG_RULES:
        try:
            rule(config)
        except ConfigError as err:
            problems.extend(err.problems)
    return problems


def check_config(config: Config) -> Config:
    """``config`` when every rule passes, with the settings of the LoRA file it starts from
    (``network_weights``) applied; else ConfigError listing every problem, carrying the config
    as ``err.config`` (``--check`` reads the model folder and the data further)."""
    problems = config_problems(config)
    if problems:
        err = ConfigError(problems)
        err.config = config
        raise err
    if not config.network.network_weights:
        return config
    # reading the LoRA file needs the export package (torch): only when a run starts from one
    from ..network_start import LoraFileError, resolve_network_weights
    try:  # the LoRA a run starts from sets its rank, alpha, conv layers, DoRA, text encoders
        return resolve_network_weights(config)
    except LoraFileError as err:
        raise ConfigError(f"{config.source}: {err}") from None


def check_sections(sections: dict, where: str) -> dict:
    """The rules some sections need on their own (`config.load_sections`: `sipo-pairs sample`
    reads [model], [sampling] and [training] before any pair data exists): a known family."""
    if "model" in sections:
        family.known_family(sections["model"].family, where)
    return sections


def startup_problems(config: Config, *, deep: bool = False) -> list[str]:
    """Every problem of the model folder and the data (``deep``: decode every image too)."""
    return model_family_problems(config) + data_problems(config, deep=deep)
