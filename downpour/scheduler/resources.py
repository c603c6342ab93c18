"""What a job asks for and what a cluster has: CPU slots, GPUs and memory.

A job is a *gang* of tasks (its servers and workers, one process each); every task asks for a
:class:`Resources` vector and lands on one node. A cluster is a set of named nodes, each with a
capacity. This machine alone is one node (:func:`machine_resources`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RESOURCE_NAMES = ("cpus", "gpus", "memory_mb")


@dataclass(frozen=True)
class Resources:
    """A resource vector: CPU slots, GPUs, memory in MiB. Non-negative in every use."""

    cpus: int = 0
    gpus: int = 0
    memory_mb: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.gpus + other.gpus, self.memory_mb + other.memory_mb)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpus - other.cpus, self.gpus - other.gpus, self.memory_mb - other.memory_mb)

    def fits_in(self, other: Resources) -> bool:
        """Every component is at most ``other``'s."""
        return self.cpus <= other.cpus and self.gpus <= other.gpus and self.memory_mb <= other.memory_mb

    def minimum(self, other: Resources) -> Resources:
        return Resources(min(self.cpus, other.cpus), min(self.gpus, other.gpus), min(self.memory_mb, other.memory_mb))

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in RESOURCE_NAMES}

    def shares(self, capacity: Resources) -> list[float]:
        """This vector as fractions of ``capacity``, per resource the capacity has."""
        return [getattr(self, n) / getattr(capacity, n) for n in RESOURCE_NAMES if getattr(capacity, n) > 0]

    def dominant_share(self, capacity: Resources) -> float:
        """The largest fraction of any resource of ``capacity`` this vector takes (DRF's dominant share)."""
        return max(self.shares(capacity), default=0.0)

    def exceeds(self, capacity: Resources) -> list[str]:
        """The names of the resources of which this asks more than ``capacity`` has."""
        return [n for n in RESOURCE_NAMES if getattr(self, n) > getattr(capacity, n)]


def total(vectors) -> Resources:
    out = Resources()
    for v in vectors:
        out = out + v
    return out


def machine_resources(gpus: int | None = None) -> Resources:
    """This machine: its CPU cores as slots, its GPUs (``gpus`` if given; else what torch sees), its memory."""
    if gpus is None:
        try:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001 - no usable torch build means no GPUs
            gpus = 0
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    return Resources(cpus=os.cpu_count() or 1, gpus=gpus, memory_mb=int(memory_mb))
