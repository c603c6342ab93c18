"""Scalars in TensorBoard's event-file format (``tensorboard --logdir RUN_DIR/tensorboard``).

TensorBoard is an optional dependency (``pip install 'downpour[tensorboard]'``): without it
:func:`open_scalar_log` says once, clearly, that TensorBoard logging is off, and the job runs on.
"""

from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger(__name__)


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def open_scalar_log(folder: str) -> ScalarLog | None:
    """A writer into ``folder``, or None (logged as a warning) where tensorboard is not installed."""
    if not tensorboard_installed():
        log.warning("coordinator: TensorBoard logging is OFF: the tensorboard package is not installed "
                    "(pip install 'downpour[tensorboard]', or set monitor.tensorboard: false to silence this)")
        return None
    return ScalarLog(folder)


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
