"""Per-step host<->device cost of a CUDA worker: what one training step moves between the host and the GPU.

A CUDA worker keeps the model's flat parameter vector on the GPU and a host mirror the servers' replies
are written into. Each step copies the new values host->device (``FlatModel.host_to_device``) and the
gradient device->host (``FlatModel.grad_vector``). This times both, with the mirror pinned (what the
worker does) and pageable (for comparison), beside the step's forward+backward, for the reference MLP
and a larger one.

    python benchmarks/gpu_transfer.py            (needs a CUDA device)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment  # noqa: E402
from downpour.layout import make_layout  # noqa: E402
from downpour.models import mlp, param_shapes  # noqa: E402
from downpour.worker.flat import FlatModel  # noqa: E402


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def measure(name: str, hidden: list[int], batch: int = 32, reps: int = 100) -> dict:
    dev = torch.device("cuda", 0)
    model = mlp(hidden=hidden, dropout=0.0)
    flat = FlatModel(model, make_layout(param_shapes(model), 1), dev)
    x, y = torch.randn(batch, 28, 28, device=dev), torch.randint(0, 10, (batch,), device=dev)

    def compute():
        flat.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    compute()
    h2d_pinned = _time(flat.host_to_device, reps)
    pageable = torch.empty_like(flat.host, pin_memory=False).copy_(flat.host)
    h2d_pageable = _time(lambda: flat.flat.copy_(pageable, non_blocking=True), reps)
    d2h = _time(flat.grad_vector, reps)
    step = _time(compute, reps)
    mb = flat.flat.numel() * 4 / 1e6
    return {"model": name, "params": flat.flat.numel(), "MB": round(mb, 2), "h2d_pinned_ms": h2d_pinned * 1e3,
            "h2d_pageable_ms": h2d_pageable * 1e3, "d2h_grad_ms": d2h * 1e3, "forward_backward_ms": step * 1e3,
            "h2d_pinned_GB_s": mb / 1e3 / h2d_pinned, "d2h_GB_s": mb / 1e3 / d2h}


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_transfer.py: no CUDA device")
    rows = [measure("reference mlp 784-128-10", [128]), measure("mlp 784-4096-4096-10", [4096, 4096])]
    print(json.dumps({"environment": environment(), "gpu": torch.cuda.get_device_name(0), "rows": rows}))
    print(f"{'model':<26}{'params':>11}{'H2D pinned':>12}{'H2D pageable':>14}{'D2H grad':>10}{'fwd+bwd':>9}   (ms per step)")
    for r in rows:
        print(f"{r['model']:<26}{r['params']:>11}{r['h2d_pinned_ms']:>12.3f}{r['h2d_pageable_ms']:>14.3f}"
              f"{r['d2h_grad_ms']:>10.3f}{r['forward_backward_ms']:>9.3f}")


if __name__ == "__main__":
    main()
