"""Entry-point plugins: load every object of a group, warn about (and skip) the broken ones; the
name rule, the decorator form and entry-point adoption the objective and reward registries
share."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

# a registered plugin name: lowercase letters and digits, words joined by single hyphens
PLUGIN_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def load_entry_points(group: str, adopt: Callable[[Any], None], kind: str) -> None:
    """``adopt(entry_point.load())`` for every entry point of ``group``; one that fails to load or
    to be adopted becomes a RuntimeWarning naming the ``kind`` of plugin, so it cannot hide the
    built-ins."""
    for entry_point in importlib.metadata.entry_points(group=group):
        try:
            adopt(entry_point.load())
        except Exception as exc:  # noqa: BLE001 - any failure of third-party code
            warnings.warn(f"skipping {kind} plugin {entry_point.name!r} ({entry_point.value}): "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)


def check_new_name(registered: Mapping[str, Any], name: Any, kind: str,
                   registered_by: Callable[[Any], str]) -> None:
    """ValueError unless ``name`` matches :data:`PLUGIN_NAME` and is not yet a key of
    ``registered`` (the message names ``registered_by(spec)`` of the one already there)."""
    if not isinstance(name, str) or not PLUGIN_NAME.fullmatch(name):
        raise ValueError(f"{kind} names use lowercase letters, digits and single hyphens "
                         f"(e.g. 'my-{kind}'), got {name!r}")
    if name in registered:
        raise ValueError(f"{kind} {name!r} is already registered "
                         f"(by {registered_by(registered[name])})")


def registering_decorator(register: Callable[..., Any], fn_keyword: str, **settings: Any):
    """The decorator form of a ``register`` function: the decorated function is registered with
    ``register(**settings, <fn_keyword>=function)`` and returned unchanged."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        register(**settings, **{fn_keyword: fn})
        return fn
    return decorate


def adopt_entry_point_object(obj: Any, spec_cls: type, registered: Mapping[str, Any],
                             register: Callable[[Any], Any]) -> None:
    """Register what an entry point loaded: a ``spec_cls`` instance (``register(spec)``, unless
    ``registered`` already holds that very spec), a module (it registered its plugins on import)
    or a callable (called; a ``spec_cls`` it returns is adopted, otherwise it registered itself).
    TypeError for anything else."""
    if isinstance(obj, spec_cls):
        if registered.get(obj.name) != obj:
            register(obj)
    elif isinstance(obj, types.ModuleType):
        return
    elif callable(obj):
        result = obj()
        if isinstance(result, spec_cls):
            adopt_entry_point_object(result, spec_cls, registered, register)
    else:
        article = "an" if spec_cls.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"expected {article} {spec_cls.__name__}, a module or a callable, "
                        f"got {obj!r}")


# torch-free modules that register names a preset may use instead of a path (the toy world's "toy"
# model and prompt set); third-party packages add theirs through the entry-point group below
BUILTIN_REGISTRATIONS = ("sipo_plugin.toy.registration",)
REGISTRATIONS_GROUP = "sipo_plugin.registrations"
_registered = False


def load_registrations() -> None:
    """Import the built-in registration modules and call every ``sipo_plugin.registrations``
    entry point, once (the registries call this before a lookup)."""
    global _registered
    if _registered:
        return
    _registered = True
    for module in BUILTIN_REGISTRATIONS:
        importlib.import_module(module)
    load_entry_points(REGISTRATIONS_GROUP, lambda register: register(), "registration")
