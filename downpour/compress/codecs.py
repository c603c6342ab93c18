"""The codecs: each a small class with a stateless, validating decoder.

============  =====================================================  =========================
name          what goes on the wire                                  bytes per element (f32=4)
============  =====================================================  =========================
none          the float32 values (a view: no copy)                   4
fp16, bf16    16-bit floats (fp16 clamped to its range)              2
topk          the k largest |x|: values + indices (16-bit when the   (4 + 2 or 4) · ratio
              vector has at most 65,536 elements)
randomk       k values at positions drawn from a seed sent along     4 · ratio
              (the receiver draws the same positions: no indices)
qsgd          stochastic rounding to 2^(b-1)-1 levels per bucket,    b/8 + 4/bucket
              unbiased (QSGD, Alistarh et al. 2017), b = 8 or 4
onebit        signs (packed bits) times each bucket's mean |x|       1/8 + 4/bucket
              (1-bit SGD / EF-signSGD's scaled sign)
powersgd      rank-r factors P, Q of the matrix (one power           4 · r · (rows + cols) / n
              iteration per call, warm-started; Vogels et al. 2019)
int8          round-to-nearest int8 with one scale per bucket        1 + 4/bucket
============  =====================================================  =========================

``topk``/``randomk``/``onebit``/``powersgd`` are biased or drop information; use
them inside :class:`downpour.compress.feedback.ErrorFeedback` (or DGC).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from downpour.compress.base import Codec, Payload, Shape, buckets, expect, finite, int_field, register, tensors_of

_FP16_MAX = 65504.0
_MAX_BUCKET = 1 << 24


@register
class NoCodec(Codec):
    name = "none"
    lossless = True

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:
        return Payload({}, [x], ["values"])

    @staticmethod
    def decode(meta: dict[str, Any], tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
        (v,) = tensors_of("none", tensors, [torch.float32])
        expect(v.numel() == numel, "none", f"{v.numel()} values for {numel} elements")
        return finite("none", v)


@register
class FP16(Codec):
    name = "fp16"

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:
        return Payload({}, [x.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)], ["values"])

    @staticmethod
    def decode(meta: dict[str, Any], tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
        (v,) = tensors_of("fp16", tensors, [torch.float16])
        expect(v.numel() == numel, "fp16", f"{v.numel()} values for {numel} elements")
        return finite("fp16", v.float())


@register
class BF16(Codec):
    name = "bf16"

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:
        return Payload({}, [x.to(torch.bfloat16)], ["values"])

    @staticmethod
    def decode(meta: dict[str, Any], tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
        (v,) = tensors_of("bf16", tensors, [torch.bfloat16])
        expect(v.numel() == numel, "bf16", f"{v.numel()} values for {numel} elements")
        return finite("bf16", v.float())


def _k(ratio: float, n: int) -> int:
    return max(1, min(n, math.ceil(ratio * n)))


def _scatter(codec: str, idx: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
    expect(idx.numel() == values.numel(), codec, f"{idx.numel()} indices for {values.numel()} values")
    if idx.numel():
        expect(int(idx.min()) >= 0 and int(idx.max()) < numel, codec, f"an index lies outside 0..{numel - 1}")
    out = torch.zeros(numel)
    out[idx.long()] = finite(codec, values)
    return out


@register
class TopK(Codec):
    """The ``ratio``·n entries of largest magnitude (exactly k = ceil(ratio·n), at least 1)."""

    name = "topk"

    def __init__(self, ratio: float = 0.01) -> None:
        self.ratio = ratio  # DGC's warm-up changes it between calls

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:
        n = x.numel()
        idx = torch.topk(x.abs(), _k(self.ratio, n), sorted=False).indices
        values = x[idx]
        if n <= 1 << 16:  # 16-bit indices: stored as the low half of the int32 (read back masked)
            return Payload({"w": 16}, [values, idx.to(torch.int32).to(torch.int16)], ["values", "indices"])
        return Payload({"w": 32}, [values, idx.to(torch.int32)], ["values", "indices"])

    @staticmethod
    def decode(meta: dict[str, Any], tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
        w = meta.get("w")
        expect(w in (16, 32), "topk", f"index width must be 16 or 32, got {w!r}")
        values, idx = tensors_of("topk", tensors, [torch.float32, torch.int16 if w == 16 else torch.int32])
        if w == 16:
            idx = idx.to(torch.int32) & 0xFFFF
        return _scatter("topk", idx, values, numel)


@register
class RandomK(Codec):
    """k = ceil(ratio·n) values at positions drawn from a seed that travels instead of indices.
    Not rescaled by n/k: meant for use with error feedback, which keeps what was not sent."""

    name = "randomk"

    def __init__(self, ratio: float = 0.01, seed: int = 0) -> None:
        self.ratio = ratio
        self.seed = seed
        self.calls = 0

    @staticmethod
    def _positions(seed: int, n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:
        n = x.numel()
        self.calls += 1
        seed = (self.seed * 1_000_003 + self.calls) % (1 << 62)
        k = _k(self.ratio, n)
        return Payload({"k": k, "s": seed}, [x[self._positions(seed, n, k)]], ["values"])

    @staticmethod
    def decode(meta: dict[str, Any], tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
        k = int_field("randomk", meta, "k", 1, max(1, numel))
        seed = int_field("randomk", meta, "s", 0, (1 << 62) - 1)
        (values,) = tensors_of("randomk", tensors, [torch.float32])
        expect(values.numel() == k, "randomk", f"{values.numel()} values for k={k}")
        return _scatter("randomk", RandomK._positions(seed, numel, k), values, numel)


def _scales(codec: str, scale: torch.Tensor, numel: int, size: int) -> torch.Tensor:
    """Check a payload's per-bucket scales (one per bucket of ``size``, finite, >= 0)."""
    nb = buckets(numel, size)
    expect(scale.numel() == nb, codec, f"{scale.numel()} scales for {nb} buckets")
    expect(bool((finite(codec, scale) >= 0).all()), codec, "negative scale")
    return scale


def _per_element(scale: torch.Tensor, size: int, numel: int) -> torch.Tensor:
    """Each bucket's scale repeated over its elements: ``numel`` values. At most ``2·numel`` are
    allocated whatever ``size`` says (a bucket larger than the key is one bucket of ``numel``)."""
    if scale.numel() <= 1:
        return scale.expand(numel) if scale.numel() else torch.zeros(numel)
    return scale.repeat_interleave(size)[:numel]


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1 (an all-zero bucket encodes as zeros either way)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _bucketed(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` zero-padded to whole buckets, as a (buckets, size) matrix."""
    nb = buckets(x.numel(), size)
    if nb * size == x.numel():
        return x.view(nb, size)
    out = torch.zeros(nb * size)
    out[: x.numel()] = x
    return out.view(nb, size)


@register
class QSGD(Codec):
    """Unbiased stochastic quantization to ``2^(bits-1) - 1`` levels of each bucket's max |x|.
    8-bit sends one int8 per element, 4-bit two per byte (level + 8 in each nibble)."""

    name = "qsgd"

    def __init__(self, bits: int = 8, bucket: int = 512, seed: int = 0) -> None:
        if bits not in (4, 8):
            raise ValueError(f"qsgd bits must be 4 or 8, got {bits}")
        self.bits, self.bucket = bits, bucket
        self.gen = torch.Generator().manual_seed(seed)

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:
        n, levels = x.numel(), (1 << (self.bits - 1)) - 1
        m = _bucketed(x, self.bucket)
        scale = m.abs().amax(1)
        # |x| / scale lies in [0, 1]; the clamp keeps float rounding from giving level + 1.
        a = (m.abs() / _nonzero(scale)[:, None]).mul_(levels).clamp_(max=levels)
        q = a.floor()
        q += torch.rand(m.shape, generator=self.gen) < (a - q)  # round up with probability a - floor(a)
        q = (q * m.sign()).reshape(-1)[:n].to(torch.int8)
        if self.bits == 4:
            u = (q + 8).to(torch.uint8)
            if n % 2:
                u = torch.cat([u, torch.full((1,), 8, dtype=torch.uint8)])
            q = u[0::2] | (u[1::2] << 4)
        return Payload({"b": self.bits, "B": self.bucket}, [q, scale], ["values", "scales"])

    @staticmethod
    def decode(meta: dict[str, Any], tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
        bits = meta.get("b")
        expect(type(bits) is int and bits in (4, 8), "qsgd", f"bits must be the integer 4 or 8, got {bits!r}")
        size = int_field("qsgd", meta, "B", 1, _MAX_BUCKET)
        q, scale = tensors_of("qsgd", tensors, [torch.int8 if bits == 8 else torch.uint8, torch.float32])
        levels = (1 << (bits - 1)) - 1
        _scales("qsgd", scale, numel, size)
        if bits == 4:
            expect(q.numel() == (numel + 1) // 2, "qsgd", f"{q.numel()} bytes for {numel} 4-bit values")
            levels_u = torch.stack([q & 0xF, q >> 4], 1).reshape(-1)[:numel]
            q = levels_u.to(torch.int8) - 8
        expect(q.numel() == numel, "qsgd", f"{q.numel()} values for {numel} elements")
        expect(numel == 0 or (int(q.min()) >= -levels and int(q.max()) <= levels), "qsgd", f"a level exceeds ±{levels}")
        return q.float() * _per_element(scale, size, numel) / levels


@register
class OneBit(Codec):
    """Scaled sign: one bit per element (x >= 0) and each bucket's mean |x|."""

    name = "onebit"

    def __init__(self, bucket: int = 1024) -> None:
        self.bucket = bucket

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:
        n = x.numel()
        m = _bucketed(x, self.bucket)
        counts = torch.full((m.shape[0],), float(self.bucket))
        if m.shape[0]:
            counts[-1] = n - (m.shape[0] - 1) * self.bucket
        scale = m.abs().sum(1) / counts
        bits = torch.from_numpy(np.packbits((x >= 0).numpy()))
        return Payload({"B": self.bucket}, [bits, scale], ["values", "scales"])

    @staticmethod
    def decode(meta: dict[str, Any], tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
        size = int_field("onebit", meta, "B", 1, _MAX_BUCKET)
        bits, scale = tensors_of("onebit", tensors, [torch.uint8, torch.float32])
        expect(bits.numel() == (numel + 7) // 8, "onebit", f"{bits.numel()} bytes for {numel} signs")
        _scales("onebit", scale, numel, size)
        signs = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(np.float32)).mul_(2).sub_(1)
        return signs * _per_element(scale, size, numel)


@register
class PowerSGD(Codec):
    """Rank-``rank`` approximation P·Qᵀ of the range seen as a matrix (rows of ``shape.cols``;
    the range is zero-padded to whole rows). One power iteration per call, starting from the
    previous call's Q, so the basis keeps improving; needs error feedback to converge."""

    name = "powersgd"

    def __init__(self, rank: int = 2, seed: int = 0) -> None:
        self.rank = rank
        self.gen = torch.Generator().manual_seed(seed)
        self.q: torch.Tensor | None = None

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:
        cols, pad = (shape.cols, shape.pad) if shape is not None else (x.numel(), 0)
        n = x.numel()
        rows = buckets(pad + n, cols)
        m = torch.zeros(rows * cols)
        m[pad : pad + n] = x
        m = m.view(rows, cols)
        r = min(self.rank, rows, cols)
        if self.q is None or self.q.shape != (cols, r):
            self.q = torch.randn(cols, r, generator=self.gen)
        p = torch.linalg.qr(m @ self.q).Q  # orthonormal columns
        self.q = m.T @ p
        return Payload({"c": cols, "p": pad}, [p.contiguous(), self.q.contiguous()], ["values", "values"])

    @staticmethod
    def decode(meta: dict[str, Any], tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
        cols = int_field("powersgd", meta, "c", 1, _MAX_BUCKET)
        pad = int_field("powersgd", meta, "p", 0, cols - 1)
        expect(len(tensors) == 2 and all(t.dim() == 2 for t in tensors), "powersgd", "expected two matrices P and Q")
        p, q = tensors
        expect(p.dtype == torch.float32 and q.dtype == torch.float32, "powersgd", "P and Q must be float32")
        rows = buckets(pad + numel, cols)
        # The product is rows x cols: at most what the key's own matrix rows hold (a budget per key).
        expect(rows * cols <= 2 * numel + (1 << 20), "powersgd", f"a {rows}x{cols} matrix is too large for {numel} elements")
        expect(p.shape[0] == rows and q.shape[0] == cols and p.shape[1] == q.shape[1] and 1 <= p.shape[1] <= 64,
               "powersgd", f"P {tuple(p.shape)} and Q {tuple(q.shape)} do not fit a {rows}x{cols} matrix")
        finite("powersgd", p)
        finite("powersgd", q)
        return (p @ q.T).reshape(-1)[pad : pad + numel].contiguous()


@register
class Int8(Codec):
    """Round-to-nearest int8 with one float32 scale (max |x| / 127) per ``bucket`` elements.
    Deterministic; meant for parameters on pull (4x fewer bytes)."""

    name = "int8"

    def __init__(self, bucket: int = 1024) -> None:
        self.bucket = bucket

    def encode(self, x: torch.Tensor, shape: Shape | None = None) -> Payload:
        m = _bucketed(x, self.bucket)
        scale = m.abs().amax(1) / 127.0
        q = (m / _nonzero(scale)[:, None]).round_().clamp_(-127, 127).reshape(-1)[: x.numel()].to(torch.int8)
        return Payload({"B": self.bucket}, [q, scale], ["values", "scales"])

    @staticmethod
    def decode(meta: dict[str, Any], tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
        size = int_field("int8", meta, "B", 1, _MAX_BUCKET)
        q, scale = tensors_of("int8", tensors, [torch.int8, torch.float32])
        expect(q.numel() == numel, "int8", f"{q.numel()} values for {numel} elements")
        _scales("int8", scale, numel, size)
        return q.float() * _per_element(scale, size, numel)
