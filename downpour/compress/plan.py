"""Compression as the push/pull path sees it: which encoder serves each key, and the wire layout.

A compressed push carries ``meta["enc"] = [[codec, codec_meta, tensor_count], ...]``, one entry
per key of the request in request order, and the payload tensors of every key one after the
other. A compressed reply (pull) carries ``meta["enc"] = [codec, codec_meta, tensor_count]``
for all of its values at once; the request asks for it with ``meta["pq"] = [codec, bucket]``.
Messages without ``enc`` are plain float32, as before: compression off costs nothing.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections import Counter
from typing import Any

import torch

from downpour.compress.base import Codec, Payload, Shape, codec_class, decode
from downpour.compress.feedback import DGC, Encoder, ErrorFeedback
from downpour.config import CompressionConfig, PushCodecConfig
from downpour.errors import ProtocolError
from downpour.layout import Layout, ParamSpec

PULL_CODECS = ("fp16", "int8")  # what a server encodes replies with on request


def make_codec(cfg: PushCodecConfig, key: int = 0) -> Codec:
    """A codec from its config: each codec takes the config fields its constructor names
    (ratio, bits, bucket, rank, seed); seeds differ per key so keys draw independently."""
    cls = codec_class(cfg.codec)
    args = {}
    for name in inspect.signature(cls.__init__).parameters:
        if name in PushCodecConfig.model_fields:
            args[name] = getattr(cfg, name) + (7919 * key if name == "seed" else 0)
    return cls(**args)


def _shape(p: ParamSpec, start: int) -> Shape | None:
    if len(p.shape) < 2:
        return None
    cols = math.prod(p.shape[1:])
    return Shape(cols, (start - p.offset) % cols)


class PushCompressor:
    """One worker's encoders, one per key, with their error-feedback state in one flat vector."""

    def __init__(self, cfg: CompressionConfig, layout: Layout) -> None:
        plans: list[tuple[PushCodecConfig, Shape | None, int]] = []
        state = 0
        for s in layout.slices:
            p = next(p for p in layout.params if p.offset <= s.start < p.offset + p.numel)
            c = next((g.push for g in cfg.groups if any(fnmatch.fnmatchcase(p.name, pat) for pat in g.params)), cfg.push)
            shape = _shape(p, s.start)
            if p.numel < c.min_numel or (c.codec == "powersgd" and shape is None):
                c = PushCodecConfig()  # small, or a vector PowerSGD cannot factor: sent as float32
            plans.append((c, shape, state))
            state += s.length * (2 if c.dgc else 1 if c.error_feedback else 0)
        self.state = torch.zeros(state)
        self.encoders: list[tuple[Encoder | Codec, Shape | None]] = []
        for s, (c, shape, at) in zip(layout.slices, plans):
            codec = make_codec(c, s.key)
            enc: Encoder | Codec = codec
            if c.dgc:
                d = c.dgc
                enc = DGC(codec, self.state[at : at + 2 * s.length], d.momentum, d.clip_norm, d.warmup_steps, d.warmup_start)
            elif c.error_feedback:
                enc = ErrorFeedback(codec, self.state[at : at + s.length])
            self.encoders.append((enc, shape))
        # Nothing to do when every key goes out as plain float32 without feedback.
        self.active = any(not (isinstance(e, Codec) and e.name == "none") for e, _ in self.encoders)
        self.layout = layout
        self.bytes: Counter[str] = Counter()  # payload bytes pushed by role (values, indices, scales)

    def encode(self, keys: list[int], flat: torch.Tensor) -> tuple[list[list[Any]], list[torch.Tensor]]:
        """Encode ``flat``'s ranges of ``keys`` (request order): the ``enc`` meta and tensors."""
        enc: list[list[Any]] = []
        tensors: list[torch.Tensor] = []
        for k in keys:
            s = self.layout.slices[k]
            encoder, shape = self.encoders[k]
            payload = encoder.encode(flat[s.start : s.stop], shape)
            enc.append([_wire_name(encoder), payload.meta, len(payload.tensors)])
            tensors.extend(payload.tensors)
            self.bytes.update(payload.nbytes())
        return enc, tensors


def _wire_name(encoder: Encoder | Codec) -> str:
    return encoder.name if isinstance(encoder, Codec) else encoder.codec.name  # type: ignore[attr-defined]


def decode_push(enc: Any, tensors: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """A server's view of a compressed push: one float32 vector (keys in request order).
    Raises ProtocolError for any inconsistency; nothing is applied before this returns."""
    if not isinstance(enc, list) or len(enc) != len(lengths):
        raise ProtocolError(f"enc must list one entry per key ({len(lengths)}), got {type(enc).__name__}")
    out = torch.empty(sum(lengths))
    at = pos = 0
    for entry, n in zip(enc, lengths):
        if not (isinstance(entry, list) and len(entry) == 3 and type(entry[2]) is int and 0 <= entry[2] <= len(tensors) - pos):
            raise ProtocolError(f"bad enc entry {entry!r:.80}")
        name, meta, count = entry
        out[at : at + n] = decode(name, meta, tensors[pos : pos + count], n)
        at, pos = at + n, pos + count
    if pos != len(tensors):
        raise ProtocolError(f"enc accounts for {pos} tensors, the message has {len(tensors)}")
    return out


def pull_request(cfg: CompressionConfig) -> list[Any] | None:
    """What a worker puts in ``meta["pq"]`` to receive compressed values (None: float32)."""
    return None if cfg.pull == "none" else [cfg.pull, cfg.pull_block]


def pull_codec(pq: Any) -> Codec:
    """The codec a request's ``pq`` ([codec, bucket]) asks replies to use; ProtocolError if invalid.
    Servers check it before applying anything, so a bad ``pq`` changes nothing."""
    if not (isinstance(pq, list) and len(pq) == 2 and pq[0] in PULL_CODECS and type(pq[1]) is int and 1 <= pq[1] <= 1 << 24):
        raise ProtocolError(f"pq must be [one of {list(PULL_CODECS)}, bucket], got {pq!r:.80}")
    return make_codec(PushCodecConfig(codec=pq[0], bucket=pq[1]))


def encode_pull(codec: Codec, values: torch.Tensor) -> tuple[list[Any], list[torch.Tensor]]:
    """Reply values encoded: the reply's ``enc`` meta and its tensors."""
    payload: Payload = codec.encode(values)
    return [codec.name, payload.meta, len(payload.tensors)], payload.tensors


def decode_pull(enc: Any, tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
    if not (isinstance(enc, list) and len(enc) == 3 and enc[2] == len(tensors)):
        raise ProtocolError(f"bad reply enc {enc!r:.80}")
    return decode(enc[0], enc[1], tensors, numel)
