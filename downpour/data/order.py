"""The order of an epoch's examples, the same on every node: the coordinator's shards are ranges
of it (:mod:`downpour.coordinator.shards`), and a worker reads the examples a shard names from it."""

from __future__ import annotations

import numpy as np


def example_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation that an epoch's shards index into (identical on every node)."""
    return np.random.default_rng([seed, 0x5A4D, epoch]).permutation(num_examples)
