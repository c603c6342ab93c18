"""The user code a job names by import path: loss, metrics, collate function, server update rule.

Every path is resolved once before any process starts (:func:`check_extensions`, called by
``downpour train`` and :func:`downpour.train`) and again where it runs; a path that does not
import, or names something that is not callable, is a :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from downpour.config import JobConfig
from downpour.errors import ConfigError, DataError
from downpour.imports import import_object

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def _binary_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out.reshape(-1), y.to(out.dtype).reshape(-1))


BUILTIN_LOSSES: dict[str, LossFn] = {"cross_entropy": _cross_entropy, "binary_cross_entropy": _binary_cross_entropy}


def resolve_loss(spec: str) -> LossFn:
    """``training.loss``: a built-in name or an import path; the result is checked per batch by :func:`checked_loss`."""
    fn = BUILTIN_LOSSES.get(spec)
    return fn if fn is not None else import_object(spec, "training.loss")


def checked_loss(spec: str, value: Any) -> torch.Tensor:
    """``value`` (what the loss returned) if it is a finite-typed scalar tensor, else a clear error."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
        got = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(f"training.loss {spec!r} must return a scalar floating-point tensor (the batch's mean loss), "
                          f"got {got}")
    return value


def resolve_metrics(specs: dict[str, str]) -> dict[str, Callable[[torch.Tensor, torch.Tensor], Any]]:
    return {name: import_object(path, f"training.metrics.{name}") for name, path in specs.items()}


def metric_value(name: str, spec: str, value: Any) -> float:
    """A metric's result as a float (a number or a one-element tensor), else a clear error."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"training.metrics.{name} ({spec}) must return a number, got {type(value).__name__}")
    if not math.isfinite(value):  # (an empty class, a division by zero): reported as the metric's error
        raise DataError(f"training.metrics.{name} ({spec}) returned {float(value)}, not a finite number")
    return float(value)


def check_extensions(job: JobConfig) -> None:
    """Import every path the job names (before anything starts); raise :class:`ConfigError` naming the field."""
    from downpour.server.optim import check_rule

    t = job.training
    resolve_loss(t.loss)
    resolve_metrics(t.metrics)
    if job.data.loader.collate_fn:
        import_object(job.data.loader.collate_fn, "data.loader.collate_fn")
    from downpour.models import model_factory

    model_factory(job.model)  # imported and its arguments checked, not called (the coordinator builds the model)
    check_rule(job.optimizer)
