"""User classes named in the config by import path `module:Class` (policies, engines)."""

from __future__ import annotations

import importlib
from typing import TypeVar

T = TypeVar("T")


def is_import_path(name: str) -> bool:
    module_name, sep, class_name = name.partition(":")
    return bool(sep and module_name and class_name)


def import_subclass(path: str, base: type[T], what: str) -> type[T]:
    """The class `module:Class` at `path`, which must subclass `base` (TypeError otherwise)."""
    module_name, _, class_name = path.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{what} '{path}' is not a subclass of {base.__module__}.{base.__name__}")
    return cls
