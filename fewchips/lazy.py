"""Package attributes loaded on first use (PEP 562): names that need torch stay out of an import of the
package, so `fewchips --help` and the planner start without loading it."""

from __future__ import annotations

import importlib


def lazy_attributes(package: str, names: dict[str, str]):
    """A module `__getattr__` for `package`: attribute `name` is `name` in submodule `names[name]`,
    imported when first asked for."""

    def __getattr__(name):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{names[name]}", package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
