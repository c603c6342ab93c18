"""Serving a trained model and keeping it fresh: exports (a full snapshot, then deltas) written
from checkpoints, and ``downpour serve`` following them (docs/online.md)."""
