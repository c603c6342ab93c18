"""The public Python API: run a job from code, seed-style.

    import downpour

    def model_fn():
        return torch.nn.Sequential(...)

    def dataset_fn():
        return downpour.data.load_idx_dataset("/usr/share/datasets/fashion-mnist")

    summary = downpour.train(model_fn, dataset_fn, {"training": {"epochs": 1}})

``model_fn`` and ``dataset_fn`` run inside every worker process, so they must be
importable there: module-level functions (of a module or of the script being
run, whose top level must then sit under ``if __name__ == "__main__":``), or
``"package.module:function"`` strings. Nothing is pickled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from downpour.config import JobConfig, apply_overrides, job_to_dict, load_job, parse_job
from downpour.data import build_dataset
from downpour.errors import ConfigError
from downpour.imports import object_path
from downpour.server.scaling import check_hyperparameters


def default_run_dir(name: str) -> str:
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def check_data(job: JobConfig) -> None:
    """Fail early, before any process starts, when the job's data cannot be found, or when its
    optimizer settings do not fit the job's length (warm-up, schedule)."""
    check_hyperparameters(job, len(build_dataset(job.data).train))


def resolve_job(
    config: JobConfig | dict[str, Any] | str | Path | None,
    model_fn: Callable | str | None = None,
    dataset_fn: Callable | str | None = None,
    overrides: list[str] | None = None,
) -> JobConfig:
    """A validated job from a JobConfig, a mapping or a job file, with the factories filled in."""
    if isinstance(config, (str, Path)):
        raw = job_to_dict(load_job(config))
    elif isinstance(config, JobConfig):
        raw = job_to_dict(config)
    elif config is None or isinstance(config, dict):
        raw = dict(config or {})
    else:
        raise ConfigError(f"config must be a JobConfig, a mapping or a job file path, got {type(config).__name__}")
    if model_fn is not None:
        raw["model"] = {"factory": object_path(model_fn, "model_fn"), "args": (raw.get("model") or {}).get("args", {})}
    if dataset_fn is not None:
        data = dict(raw.get("data") or {})
        data.pop("name", None)
        data["factory"] = object_path(dataset_fn, "dataset_fn")
        raw["data"] = data
    return parse_job(apply_overrides(raw, overrides or []), source="downpour.train")


def train(
    model_fn: Callable | str | None = None,
    dataset_fn: Callable | str | None = None,
    config: JobConfig | dict[str, Any] | str | Path | None = None,
    run_dir: str | None = None,
    launcher: str | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Train a job on local processes (coordinator, servers, workers) and return its summary.
    ``launcher``: "local" or "ray" (default: the config's ``launcher``); ``address``: with ray,
    the cluster (``auto`` or HOST:PORT; default: the config's ``ray.address``).

    Blocks until the job ends. Raises :class:`ConfigError` for a bad config,
    :class:`DataError` when the data is missing (nothing is started then), and
    :class:`JobFailed` naming the first node that failed.
    """
    from downpour.launch import make_launcher

    job = resolve_job(config, model_fn, dataset_fn)
    check_data(job)
    return make_launcher(job, run_dir or default_run_dir(job.name), launcher, address=address).run().summary
