"""One lazy loader for a package's public names (data, evaluation, models, objectives, toy).

Each name loads from its module on first use, so the light parts of a package (config parsing,
``--check``) import without torch; this module itself imports nothing but importlib.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def module_of_names(exports: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """{module: names} -> {name: module}."""
    return {name: module for module, names in exports.items() for name in names}


def lazy_getattr(package: str, module_of: Mapping[str, str], namespace: dict[str, Any]
                 ) -> Callable[[str], Any]:
    """The module-level ``__getattr__`` of ``package``: ``name`` comes from
    ``package.<module_of[name]>`` on first use and is kept in ``namespace`` (the package's
    globals), so later reads never come here; other names raise AttributeError."""
    def __getattr__(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)
        namespace[name] = value
        return value
    return __getattr__
