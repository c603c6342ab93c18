"""Resolve ``package.module:attribute`` strings (model and dataset factories)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any

from downpour.errors import ConfigError

_MAIN_ALIAS = "__downpour_main__"  # scripts imported by path are modules named this, plus the path's hash
importing: list[str] = []  # the scripts whose top level runs now (imported by path, for their functions)


def import_object(spec: str, field: str) -> Any:
    """The object ``spec`` names. ``file:/path/script.py:fn`` imports a script by path
    (how :func:`downpour.train` passes functions defined in a ``__main__`` script), once per path:
    a job may name functions of several scripts."""
    if spec.startswith("file:"):
        path, _, attr = spec[len("file:") :].rpartition(":")
        path = os.path.abspath(path)
        name = f"{_MAIN_ALIAS}{hashlib.sha1(path.encode()).hexdigest()[:12]}"
        module = sys.modules.get(name)
        if module is None:
            if not os.path.isfile(path):
                raise ConfigError(f"{field}: no such script {path} (in {spec!r})")
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ConfigError(f"{field}: cannot import script {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            importing.append(path)
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]  # (not left half-run for the next caller)
                raise
            finally:
                importing.pop()
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
