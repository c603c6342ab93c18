"""Downpour: a parameter-server system for training on more data, and bigger models, than one machine holds.

Public surface: :func:`train`, :class:`KVClient`, the configs and the errors.
"""

from downpour.api import TrainResult, resolve_job, train
from downpour.config import ClusterConfig, DataConfig, JobConfig, ModelConfig, TrainingConfig, load_job
from downpour.errors import (
    ConfigError,
    DataError,
    DownpourError,
    JobFailed,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    TransportError,
)
from downpour.worker.client import KVClient

__version__ = "0.1.0"

__all__ = [
    "ClusterConfig", "ConfigError", "DataConfig", "DataError", "DownpourError", "JobConfig", "JobFailed",
    "KVClient", "ModelConfig", "ProtocolError", "RemoteError", "RequestTimeout", "TrainingConfig",
    "TrainResult", "TransportError", "load_job", "resolve_job", "train",
]
