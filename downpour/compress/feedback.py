"""Wrappers that make lossy codecs converge, composed around any codec (as BytePS does).

* :class:`ErrorFeedback` (Seide et al. 2014; Karimireddy et al. 2019): what a codec
  dropped is kept on the worker and added to the next gradient, so every
  gradient's mass is sent eventually.
* :class:`DGC` (Lin et al. 2018, Deep Gradient Compression): momentum
  correction (the worker accumulates momentum-corrected velocity and sends its
  largest entries, so momentum is not lost to sparsification), momentum factor
  masking (sent entries leave the velocity), local gradient clipping, and a
  warm-up that starts dense and sparsifies exponentially. The accumulation *is*
  its error feedback. The servers' optimizer must then run without momentum
  (the worker applies it); the job config refuses both at once.

Both keep their state as views into one flat vector per worker (one allocation),
and both decode their own payload to learn what was sent: it works for any codec.
"""

from __future__ import annotations

import math

import torch

from downpour.compress.base import Codec, Payload, Shape, decode


class Encoder:
    """What the worker calls per key: ``encode(x, shape)``. Plain codecs are encoders too."""

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:  # pragma: no cover - interface
        raise NotImplementedError


class ErrorFeedback(Encoder):
    """``y = x + residual``; send ``codec(y)``; keep ``residual = y - decode(codec(y))``."""

    def __init__(self, codec: Codec, residual: torch.Tensor) -> None:
        self.codec = codec
        self.residual = residual  # a zeroed view this wrapper owns

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:
        y = self.residual.add_(x)
        payload = self.codec.encode(y, shape)
        sent = decode(self.codec.name, payload.meta, payload.tensors, y.numel())
        if payload.tensors and payload.tensors[0].data_ptr() == y.data_ptr():  # a codec that sent y itself
            payload.tensors[0] = y.clone()
        y.sub_(sent)
        return payload


class DGC(Encoder):
    """Momentum-corrected sparsification around a codec with a ``ratio`` (topk, randomk).

    ``ratio`` is the target density; during the first ``warmup_steps`` calls the density
    falls exponentially from ``warmup_start`` to it (DGC's 25% → 6.25% → ... → 0.1%).
    ``clip_norm`` (None: off) clips each gradient's L2 norm before it is accumulated."""

    def __init__(self, codec: Codec, state: torch.Tensor, momentum: float = 0.9, clip_norm: float | None = None,
                 warmup_steps: int = 0, warmup_start: float = 0.25) -> None:
        if not hasattr(codec, "ratio"):
            raise ValueError(f"DGC needs a sparsifying codec with a ratio (topk, randomk), not {codec.name}")
        n = state.numel() // 2
        self.codec, self.u, self.v = codec, state[:n], state[n:]
        self.momentum, self.clip_norm = momentum, clip_norm
        self.ratio = float(codec.ratio)
        self.warmup_steps, self.warmup_start = warmup_steps, max(warmup_start, self.ratio)
        self.calls = 0

    def density(self, call: int) -> float:
        """The density used at ``call`` (0-based): exponential from warmup_start to ratio."""
        if call >= self.warmup_steps:
            return self.ratio
        frac = call / self.warmup_steps
        return math.exp(math.log(self.warmup_start) * (1 - frac) + math.log(self.ratio) * frac)

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:
        if self.clip_norm is not None:
            norm = float(x.norm())
            if norm > self.clip_norm:
                x = x * (self.clip_norm / norm)
        self.u.mul_(self.momentum).add_(x)  # momentum correction
        self.v.add_(self.u)  # accumulation (error feedback)
        self.codec.ratio = self.density(self.calls)
        self.calls += 1
        payload = self.codec.encode(self.v, shape)
        sent = decode(self.codec.name, payload.meta, payload.tensors, self.v.numel())
        mask = sent != 0
        self.v.sub_(sent)
        self.u.masked_fill_(mask, 0.0)  # momentum factor masking
        return payload
