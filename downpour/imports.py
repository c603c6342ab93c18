"""Resolve ``package.module:attribute`` strings (model and dataset factories)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from downpour.errors import ConfigError

_MAIN_ALIAS = "__downpour_main__"


def import_object(spec: str, field: str) -> Any:
    """The object ``spec`` names. ``file:/path/script.py:fn`` imports a script by path
    (how :func:`downpour.train` passes functions defined in a ``__main__`` script)."""
    if spec.startswith("file:"):
        path, _, attr = spec[len("file:") :].rpartition(":")
        module = sys.modules.get(_MAIN_ALIAS)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(_MAIN_ALIAS, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ConfigError(f"{field}: cannot import script {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[_MAIN_ALIAS] = module
            loader_spec.loader.exec_module(module)
    else:
        mod_name, sep, attr = spec.partition(":")
        if not sep or not mod_name or not attr:
            raise ConfigError(f"{field}: expected 'package.module:function', got {spec!r}")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as err:
            raise ConfigError(f"{field}: cannot import {mod_name!r}: {err}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{field}: {spec!r} has no attribute {part!r}") from None
    if not callable(obj):
        raise ConfigError(f"{field}: {spec!r} is not callable")
    return obj


def object_path(fn: Any, field: str) -> str:
    """The import string for a module-level function (inverse of :func:`import_object`)."""
    if isinstance(fn, str):
        return fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        raise ConfigError(f"{field}: {fn!r} cannot be found by other processes; pass a module-level function")
    if module == "__main__":
        main = sys.modules["__main__"]
        path = getattr(main, "__file__", None)
        if not path:
            raise ConfigError(f"{field}: functions defined interactively cannot run in worker processes; put them in a module")
        return f"file:{os.path.abspath(path)}:{qualname}"
    return f"{module}:{qualname}"
