"""Mixed precision on a worker: forward and loss under ``torch.autocast`` (bf16 or fp16).

Parameters, gradients and the servers' master copy stay float32: autocast only runs the
forward's matrix products in the lower precision. fp16's narrow range needs a loss scale: the
loss is multiplied by ``scale`` before backward and the gradients divided by it after; a batch
whose gradients overflow is dropped (its gradient is zero) and the scale halves; after
``growth_interval`` good batches in a row the scale doubles (as ``torch.amp.GradScaler``).
"""

from __future__ import annotations

import contextlib
import math

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, mode: str, device: torch.device, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.mode, self.device = mode, device
        self.dtype = _DTYPES.get(mode)
        self.scale = init_scale if mode == "fp16" else 1.0
        self.growth_interval = growth_interval
        self._good = 0
        self.skipped = 0  # fp16 batches dropped for overflowing gradients

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale if self.scale != 1.0 else loss).backward()

    def unscale(self, params: list[torch.nn.Parameter]) -> bool:
        """Divide the gradients by the loss scale; False when they overflowed (the batch is dropped)."""
        if self.scale == 1.0 and self.mode != "fp16":
            return True
        grads = [p.grad for p in params if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            self.scale = max(1.0, self.scale / 2)
            self._good = 0
            self.skipped += 1
            return False
        inv = 1.0 / self.scale
        for g in grads:
            g.mul_(inv)
        self._good += 1
        if self._good % self.growth_interval == 0 and math.isfinite(self.scale * 2):
            self.scale *= 2
        return True
