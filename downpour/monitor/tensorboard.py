"""Scalars in TensorBoard's event-file format (``tensorboard --logdir RUN_DIR/tensorboard``)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class ScalarLog:
    """Writes scalars through PyTorch's ``SummaryWriter`` (the ``tensorboard`` package)."""

    def __init__(self, folder: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where wanted

        self.folder = folder
        self.writer = SummaryWriter(log_dir=folder, flush_secs=5)

    def add(self, scalars: dict[str, float | None], step: int) -> None:
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
