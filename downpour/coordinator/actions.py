"""What the coordinator's decisions ask the service to do (:mod:`downpour.coordinator.service` performs them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from downpour.protocol import Message


@dataclass
class Reply:
    """Send ``msg`` to the peer whose routing id is ``to`` (an answer, or an unprompted order)."""

    to: bytes
    msg: Message


@dataclass
class Finish:
    """The job is over: write ``summary`` (summary.json) and exit with ``code``."""

    code: int
    summary: dict[str, Any]


@dataclass
class SaveModel:
    """Pull the final parameters from the servers (still serving) and save them."""

    servers: list[dict[str, Any]]
    buffers: dict[str, torch.Tensor] | None = None  # the model's merged buffers (models/buffers.py), saved beside the parameters


@dataclass
class CommitCheckpoint:
    """Every server wrote its file: write the job's state, then the manifest (which commits it)."""

    name: str
    step: int
    files: dict[str, dict[str, Any]]  # server file -> {"sha256", "bytes"}
    job_state: dict[str, Any]
    final: bool
    needs: list[str] = field(default_factory=list)  # earlier checkpoints holding the base of its sparse deltas


Action = Reply | Finish | SaveModel | CommitCheckpoint
