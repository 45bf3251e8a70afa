"""The reward registry: names -> reward factories, plus entry points and user functions.

A reward spec is a string, the same on every command line and in presets:

    NAME              a registered reward without a model file ("colour", "geometry", "hpsv2")
    NAME=PATH         a registered reward and its model folder or file ("pickscore=/models/PickScore_v1")
    package.module:function      a user function (its code runs in this process)

The text before the first ``=`` is the name; everything after it is the path, verbatim (paths
may hold ``=`` or ``:``; registered names hold neither, and a Python module path never holds ``=``).

Built-ins register themselves next to their implementation (`register_reward` at the bottom of
each module). Third-party packages add rewards through the entry-point group
``sipo_plugin.rewards``: the loaded object is a `RewardSpec` (registered here), or a module or
callable that calls `register_reward` itself. Entry points are read lazily.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..objectives.validation import closest
from ..utils.plugins import (adopt_entry_point_object, check_new_name, load_entry_points,
                             registering_decorator)
from .base import Reward, RewardError, ScoreFn

__all__ = [
    "ENTRY_POINT_GROUP",
    "RewardSpec",
    "available_rewards",
    "build_reward",
    "default_device",
    "describe_rewards",
    "parse_reward_spec",
    "register_reward",
]

ENTRY_POINT_GROUP = "sipo_plugin.rewards"
# factory(path or None, device, **options) -> a scoring function (images, prompts) -> [N]
RewardFactory = Callable[..., ScoreFn]
PATH_REQUIRED, PATH_OPTIONAL, PATH_NONE = "required", "optional", "none"


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward. ``path``: whether ``NAME=PATH`` is required, optional or refused;
    ``path_help`` says what PATH is (shown when it is missing)."""

    name: str
    factory: RewardFactory
    description: str
    path: str = PATH_NONE
    path_help: str = ""


_SPECS: dict[str, RewardSpec] = {}
_ENTRY_POINTS_LOADED = False


def register_reward(*, name: str, description: str, factory: RewardFactory | None = None,
                    path: str = PATH_NONE, path_help: str = ""):
    """Register ``factory(path, device, **options) -> fn(images, prompts) -> [N] scores``.

    Without ``factory`` it is a decorator: ``@register_reward(name="sharpness", description=...)``
    above the factory registers it and returns it unchanged. ValueError for a badly formed or
    duplicate name, a multi-line description or an unknown ``path`` mode; TypeError for a
    non-callable factory.
    """
    if factory is None:
        return registering_decorator(register_reward, "factory", name=name,
                                     description=description, path=path, path_help=path_help)
    check_new_name(_SPECS, name, "reward", lambda spec: getattr(spec.factory, "__module__", "?"))
    if not callable(factory):
        raise TypeError(f"factory of reward {name!r} must be callable, got {factory!r}")
    if not isinstance(description, str) or "\n" in description.strip():
        raise ValueError(f"description of reward {name!r} must be one line of text")
    if path not in (PATH_REQUIRED, PATH_OPTIONAL, PATH_NONE):
        raise ValueError(f"reward {name!r}: path must be 'required', 'optional' or 'none'")
    spec = RewardSpec(name, factory, description.strip(), path, path_help)
    _SPECS[name] = spec
    return spec


def _register_spec(spec: RewardSpec) -> None:
    register_reward(name=spec.name, factory=spec.factory, description=spec.description,
                    path=spec.path, path_help=spec.path_help)


def _adopt_entry_point_object(obj: Any) -> None:
    adopt_entry_point_object(obj, RewardSpec, _SPECS, _register_spec)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True  # set first: a plugin may list rewards while importing
        load_entry_points(ENTRY_POINT_GROUP, _adopt_entry_point_object, "reward")


def available_rewards() -> list[str]:
    """Sorted names of every registered reward: built-ins and entry points."""
    _load_entry_points()
    return sorted(_SPECS)


def describe_rewards() -> dict[str, str]:
    """Name -> one-line description (with the form of its spec), sorted by name."""
    _load_entry_points()
    out = {}
    for name in sorted(_SPECS):
        spec = _SPECS[name]
        form = {PATH_REQUIRED: f"{name}=PATH", PATH_OPTIONAL: f"{name}[=PATH]"}.get(spec.path, name)
        out[name] = f"{spec.description} [{form}]"
    out["module:function"] = ("your own function fn(images, prompts) -> N scores "
                              "[package.module:function] (runs your code)")
    return out


def parse_reward_spec(spec: str) -> tuple[str, str | None]:
    """``"NAME=PATH"`` -> (NAME, PATH); ``"NAME"`` -> (NAME, None). See the module docstring."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"a reward spec must be a non-empty string, got {spec!r} "
                          f"(e.g. 'pickscore=/models/PickScore_v1' or 'colour')")
    name, sep, path = spec.partition("=")
    name = name.strip()
    if sep and not path.strip():
        raise RewardError(f"reward {spec!r}: nothing after '='; give NAME=PATH or just NAME")
    return name, (path.strip() if sep else None)


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _user_function(name: str, path: str | None) -> ScoreFn:
    module_name, _, attr = name.partition(":")
    if path is not None:
        raise RewardError(f"reward {name!r}: a user function takes no '=PATH'; read your files "
                          f"inside the function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"reward {name!r}: cannot import module {module_name!r} ({err}); "
                          f"check the name and that it is on PYTHONPATH") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {name!r}: module {module_name!r} has no function {attr!r}")
    return fn


def _registered(name: str) -> RewardSpec:
    if name not in _SPECS:
        _load_entry_points()
    if name in _SPECS:
        return _SPECS[name]
    hint = closest(name, sorted(_SPECS))
    suggestion = f" Did you mean {hint!r}?" if hint else ""
    raise RewardError(f"unknown reward {name!r}.{suggestion} Available: "
                      f"{', '.join(sorted(_SPECS))}, or package.module:function (--list-rewards)")


def _check_path(spec: RewardSpec, path: str | None) -> str | None:
    if spec.path == PATH_REQUIRED and path is None:
        raise RewardError(f"reward {spec.name!r} needs its model: --reward {spec.name}=PATH "
                          f"({spec.path_help}); see README 'Reward models'")
    if spec.path == PATH_NONE and path is not None:
        raise RewardError(f"reward {spec.name!r} takes no model path; give just '{spec.name}'")
    if path is not None:
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.exists(path):
            raise RewardError(f"{path}: reward model for {spec.name!r} not found ({spec.path_help})")
    return path


def build_reward(spec: str, device: str | torch.device | None = None, **options: Any) -> Reward:
    """The reward named by ``spec`` (see the module docstring), loaded on ``device`` (default: cuda
    if available, else cpu). ``options`` go to the factory (e.g. ``dtype``). Bad specs, missing
    or wrong model files raise `RewardError` with one line naming the file and the fix."""
    name, path = parse_reward_spec(spec)
    device = torch.device(device) if device is not None else default_device()
    if ":" in name:
        return Reward(name=name, spec=name, fn=_user_function(name, path), device=device)
    registered = _registered(name)
    path = _check_path(registered, path)
    fn = registered.factory(path, device, **options)
    canonical = name if path is None else f"{name}={path}"
    return Reward(name=name, spec=canonical, fn=fn, device=device)
