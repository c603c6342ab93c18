"""Module-level factories for the Python-API test (workers import them by name)."""

from torch import nn

from downpour.data import load_idx_dataset


def small_model(width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10))


def idx_dataset(path: str):
    return load_idx_dataset(path)
