"""A small declarative validator for the plain data in messages and saved state.

A schema is built once from a few node types and checks a value in one call, raising
:class:`SchemaError` (a :class:`~downpour.errors.ProtocolError`) that names the field and the
value. Types are exact: ``True`` is not an integer, ``1.0`` is not an integer, ``1`` is a number;
numbers are finite; strings, lists and mappings have length limits. Checking a push's meta costs
a few microseconds (benchmarks/RESULTS.md).

    Int(lo, hi)            an int (not a bool) in [lo, hi]
    Num(lo, hi, f32=False) an int or float, finite, in [lo, hi]; ``f32``: finite as a float32 too
    Bool(), Str(n, choices), Null()
    Opt(s)                 None or ``s``
    List(s, max_len, length=None)
    Tuple(s1, s2, ...)     a list of exactly these items
    Record({field: s}, required=(...), rest=s)
                           a mapping with str keys; listed fields have their schema, others ``rest``
                           (None: refused), up to ``max_fields``
    Dict(key, value, max_len)
    Plain(max_depth, max_items)
                           any msgpack-plain value (None, bool, finite numbers, short strings, lists,
                           str-keyed mappings) within the bounds: for free-form stats

Handlers read only the fields their schema names, so a validated mapping holds no surprise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from downpour.errors import ProtocolError

F32_MAX = 3.4028234663852886e38  # the largest finite float32
# A file or folder name that cannot leave its folder: no separators, no leading dot.
SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
I64_MAX = (1 << 63) - 1


class SchemaError(ProtocolError):
    """A value does not match its schema; the message names the field (``meta.weight``) and value."""


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class Schema:
    __slots__ = ()

    def check(self, v: Any, path: str) -> None:
        raise NotImplementedError

    def __call__(self, v: Any, path: str = "meta") -> Any:
        self.check(v, path)
        return v

    def fail(self, v: Any, path: str, want: str) -> None:
        raise SchemaError(f"{path}: expected {want}, got {_show(v)}")


class Int(Schema):
    __slots__ = ("lo", "hi")

    def __init__(self, lo: int = 0, hi: int = I64_MAX) -> None:
        self.lo, self.hi = lo, hi

    def check(self, v: Any, path: str) -> None:
        if type(v) is not int or not self.lo <= v <= self.hi:
            self.fail(v, path, f"an integer in [{self.lo}, {self.hi}]")


class Num(Schema):
    """A finite int or float in [lo, hi] (``lo_open``: lo itself excluded)."""

    __slots__ = ("lo", "hi", "lo_open")

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, f32: bool = False, lo_open: bool = False) -> None:
        if f32:
            lo, hi = max(lo, -F32_MAX), min(hi, F32_MAX)
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def check(self, v: Any, path: str) -> None:
        t = type(v)
        if t is float:
            ok = math.isfinite(v)
        elif t is int:
            ok = -I64_MAX - 1 <= v <= I64_MAX
        else:
            ok = False
        if not ok or not self.lo <= v <= self.hi or (self.lo_open and v == self.lo):
            self.fail(v, path, f"a finite number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]")


class Bool(Schema):
    __slots__ = ()

    def check(self, v: Any, path: str) -> None:
        if type(v) is not bool:
            self.fail(v, path, "true or false")


class Null(Schema):
    __slots__ = ()

    def check(self, v: Any, path: str) -> None:
        if v is not None:
            self.fail(v, path, "null")


class Str(Schema):
    """A string of at most ``max_len`` characters; ``choices``: one of them; ``pattern``: a regular
    expression the whole string matches."""

    __slots__ = ("max_len", "choices", "pattern")

    def __init__(self, max_len: int = 256, choices: tuple[str, ...] | frozenset[str] | None = None,
                 pattern: str | None = None) -> None:
        self.max_len = max_len
        self.choices = frozenset(choices) if choices is not None else None
        self.pattern = re.compile(pattern) if pattern is not None else None

    def check(self, v: Any, path: str) -> None:
        if type(v) is not str or len(v) > self.max_len:
            self.fail(v, path, f"a string of at most {self.max_len} characters")
        if self.choices is not None and v not in self.choices:
            self.fail(v, path, f"one of {sorted(self.choices)}")
        if self.pattern is not None and self.pattern.fullmatch(v) is None:
            self.fail(v, path, f"a string matching {self.pattern.pattern}")


class Opt(Schema):
    __slots__ = ("inner",)

    def __init__(self, inner: Schema) -> None:
        self.inner = inner

    def check(self, v: Any, path: str) -> None:
        if v is not None:
            self.inner.check(v, path)


class Either(Schema):
    __slots__ = ("options", "want")

    def __init__(self, *options: Schema, want: str) -> None:
        self.options, self.want = options, want

    def check(self, v: Any, path: str) -> None:
        for s in self.options:
            try:
                s.check(v, path)
                return
            except SchemaError:
                pass
        self.fail(v, path, self.want)


class List(Schema):
    __slots__ = ("item", "max_len", "length", "min_len")

    def __init__(self, item: Schema, max_len: int = 1 << 16, length: int | None = None, min_len: int = 0) -> None:
        self.item, self.max_len, self.length, self.min_len = item, max_len, length, min_len

    def check(self, v: Any, path: str) -> None:
        if type(v) is not list:
            self.fail(v, path, "a list")
        n = len(v)
        if self.length is not None and n != self.length:
            self.fail(v, path, f"a list of {self.length} items")
        if not self.min_len <= n <= self.max_len:
            self.fail(v, path, f"a list of {self.min_len} to {self.max_len} items")
        item = self.item
        if type(item) is Int:  # the common case (keys, positions): one pass, no call per item
            lo, hi = item.lo, item.hi
            if all(type(x) is int and lo <= x <= hi for x in v):
                return
        for i, x in enumerate(v):
            item.check(x, f"{path}[{i}]")


class Tuple(Schema):
    """A list of exactly ``len(items)`` values, each with its own schema."""

    __slots__ = ("items",)

    def __init__(self, *items: Schema) -> None:
        self.items = items

    def check(self, v: Any, path: str) -> None:
        if type(v) is not list or len(v) != len(self.items):
            self.fail(v, path, f"a list of {len(self.items)} items")
        for i, (s, x) in enumerate(zip(self.items, v)):
            try:
                s.check(x, path)
            except SchemaError:
                s.check(x, f"{path}[{i}]")  # the item's own path, built only for an error (checks are pure)
                raise


class Record(Schema):
    """A mapping whose listed fields have their schemas (absent or None: fine unless required);
    other str keys are checked with ``rest`` (None: an unknown field is refused)."""

    __slots__ = ("fields", "required", "rest", "max_fields")

    def __init__(self, fields: Mapping[str, Schema], required: tuple[str, ...] = (), rest: Schema | None = None,
                 max_fields: int = 64) -> None:
        self.fields = dict(fields)
        self.required = required
        self.rest = rest
        self.max_fields = max_fields

    def check(self, v: Any, path: str) -> None:
        if type(v) is not dict:
            self.fail(v, path, "a mapping")
        if len(v) > self.max_fields:
            self.fail(v, path, f"a mapping of at most {self.max_fields} fields")
        for name in self.required:
            if v.get(name) is None:
                raise SchemaError(f"{path}.{name}: required")
        fields, rest = self.fields, self.rest
        for k, x in v.items():
            s = fields.get(k)
            if s is None:
                if type(k) is not str or len(k) > 64:
                    self.fail(k, f"{path} key", "a string of at most 64 characters")
                if rest is None:
                    raise SchemaError(f"{path}.{k}: unknown field")
                s = rest
            if x is not None:
                try:
                    s.check(x, path)
                except SchemaError:
                    s.check(x, f"{path}.{k}")  # the field's own path, built only for an error (checks are pure)
                    raise


class Dict(Schema):
    __slots__ = ("key", "value", "max_len")

    def __init__(self, key: Schema, value: Schema, max_len: int = 1024) -> None:
        self.key, self.value, self.max_len = key, value, max_len

    def check(self, v: Any, path: str) -> None:
        if type(v) is not dict or len(v) > self.max_len:
            self.fail(v, path, f"a mapping of at most {self.max_len} entries")
        for k, x in v.items():
            self.key.check(k, f"{path} key")
            self.value.check(x, f"{path}.{k}")


class Plain(Schema):
    """Any plain value within bounds: nesting ``max_depth``, ``max_items`` scalars in all, strings of
    at most ``max_str`` characters, finite numbers (unless ``finite`` is False: free-form figures
    such as a loss may be NaN), str-keyed mappings."""

    __slots__ = ("max_depth", "max_items", "max_str", "finite")

    def __init__(self, max_depth: int = 4, max_items: int = 4096, max_str: int = 4096, finite: bool = True) -> None:
        self.max_depth, self.max_items, self.max_str, self.finite = max_depth, max_items, max_str, finite

    def check(self, v: Any, path: str) -> None:
        budget = [self.max_items]
        self._walk(v, path, 0, budget)

    def _walk(self, v: Any, path: str, depth: int, budget: list[int]) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise SchemaError(f"{path}: more than {self.max_items} values")
        t = type(v)
        if v is None or t is bool or t is int and -I64_MAX - 1 <= v <= I64_MAX:
            return
        if t is float:
            if self.finite and not math.isfinite(v):
                self.fail(v, path, "a finite number")
            return
        if t is str:
            if len(v) > self.max_str:
                self.fail(v, path, f"a string of at most {self.max_str} characters")
            return
        if depth >= self.max_depth or t not in (list, dict):
            self.fail(v, path, f"plain data nested at most {self.max_depth} deep")
        if t is list:
            for i, x in enumerate(v):
                self._walk(x, f"{path}[{i}]", depth + 1, budget)
        else:
            for k, x in v.items():
                if type(k) is not str or len(k) > 64:
                    self.fail(k, f"{path} key", "a string of at most 64 characters")
                self._walk(x, f"{path}.{k}", depth + 1, budget)


def drop_none(v: Any) -> Any:
    """``v`` with every None-valued field of its mappings removed, at any depth. A :class:`Record`
    takes a field set to None as absent; what a node keeps of a checked mapping goes through this
    first, so that code reading ``d.get("steps", 0)`` never meets the None."""
    if type(v) is dict:
        return {k: drop_none(x) for k, x in v.items() if x is not None}
    if type(v) is list:
        return [drop_none(x) for x in v]
    return v
