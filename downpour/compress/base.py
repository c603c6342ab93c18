"""The codec contract and its registry (after hivemind's ``compression/``).

A codec turns a flat float32 vector into a :class:`Payload` (a little plain
meta plus tensors that travel as raw frames) and back. Encoding may keep state
(PowerSGD's warm-started basis); **decoding never does**: everything the
receiver needs is in the payload, so a server decodes any codec with nothing
but its wire name. Decoders validate what they are given (dtypes, lengths,
index ranges, finite values) and raise :class:`ProtocolError` rather than
return something wrong: a corrupt payload is refused, never applied.

Wrappers (error feedback, DGC) live in ``feedback.py`` and compose with any
codec; they are not codecs themselves and never appear on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from downpour.errors import ConfigError, ProtocolError


@dataclass(frozen=True)
class Shape:
    """How a flat range of a matrix lies in it: ``pad`` elements of the first row come before
    the range, rows are ``cols`` long. Codecs for matrices (PowerSGD) use it; others ignore it."""

    cols: int
    pad: int = 0


@dataclass
class Payload:
    """One encoded vector: ``meta`` (msgpack-able scalars/lists) and ``tensors``, with the role
    of each tensor (``values``, ``indices`` or ``scales``) for the byte accounting."""

    meta: dict[str, Any]
    tensors: list[torch.Tensor]
    roles: list[str] = field(default_factory=list)

    def nbytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t, role in zip(self.tensors, self.roles or ["values"] * len(self.tensors)):
            out[role] = out.get(role, 0) + t.numel() * t.element_size()
        return out


class Codec:
    """Base class. ``name`` is the wire id; ``lossless`` says decode(encode(x)) == x."""

    name: ClassVar[str]
    lossless: ClassVar[bool] = False

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:
        """``x``: a 1-d float32 CPU tensor (read only; it may be a view of a larger vector)."""
        raise NotImplementedError

    @staticmethod
    def decode(meta: dict[str, Any], tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
        """A new 1-d float32 tensor of ``numel`` elements; ProtocolError for anything malformed."""
        raise NotImplementedError


CODECS: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    if cls.name in CODECS:
        raise ValueError(f"codec {cls.name!r} registered twice")
    CODECS[cls.name] = cls
    return cls


def codec_class(name: str) -> type[Codec]:
    cls = CODECS.get(name)
    if cls is None:
        raise ConfigError(f"unknown codec {name!r}; known: {sorted(CODECS)}")
    return cls


def decode(name: Any, meta: Any, tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
    """Decode one payload received from the network (validates the name and meta types too)."""
    cls = CODECS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown codec {name!r}; known: {sorted(CODECS)}")
    if not isinstance(meta, dict):
        raise ProtocolError(f"codec {name}: meta must be a mapping")
    out = cls.decode(meta, tensors, numel)
    if out.dtype != torch.float32 or out.numel() != numel:  # an internal invariant of every decoder
        raise ProtocolError(f"codec {name}: decoded {out.numel()} {out.dtype} values, expected {numel} float32")
    return out


# -- helpers for decoders: every check raises ProtocolError ------------------------------------
def expect(cond: bool, codec: str, what: str) -> None:
    if not cond:
        raise ProtocolError(f"codec {codec}: {what}")


def tensors_of(codec: str, tensors: list[torch.Tensor], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    expect(len(tensors) == len(dtypes), codec, f"expected {len(dtypes)} tensors, got {len(tensors)}")
    for i, (t, d) in enumerate(zip(tensors, dtypes)):
        expect(t.dtype == d, codec, f"tensor {i} must be {d}, got {t.dtype}")
    return [t.reshape(-1) for t in tensors]


def int_field(codec: str, meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    expect(type(v) is int and lo <= v <= hi, codec, f"{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def finite(codec: str, t: torch.Tensor) -> torch.Tensor:
    # One reduction on the usual path; only a sum that overflowed needs the elementwise test.
    ok = t.numel() == 0 or math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())
    expect(ok, codec, "values contain NaN or Inf")
    return t


def buckets(n: int, size: int) -> int:
    return (n + size - 1) // size if n else 0


Factory = Callable[..., Codec]
