"""Launchers: what starts and watches a job's processes, chosen by name.

Every launcher honours one contract (:class:`Launcher`): built from a validated job and a run
folder, ``run(on_status)`` starts every process, calls ``on_status`` with the coordinator's
STATUS while the job runs, and returns a :class:`RunResult` once the coordinator wrote
``RUN_DIR/summary.json`` (or raises :class:`~downpour.errors.JobFailed` naming the first node that
failed, after stopping every process it started); ``request_stop()`` asks for a graceful stop and
is safe to call from a signal handler. The run folder's layout (config.yaml, logs/, keys/,
coordinator.addr, summary.json, model.pt, checkpoints/) is the same whatever the launcher.

    launcher = make_launcher(job, run_dir)            # job.launcher: "local" or "ray"
    summary = launcher.run().summary

A new engine is a class with that contract, added with :func:`register_launcher`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from downpour.config import JobConfig
from downpour.errors import ConfigError
from downpour.launch.local import LocalLauncher, RunResult


class Launcher(Protocol):
    run_dir: str

    def run(self, on_status: Callable[[dict[str, Any]], None] | None = None) -> RunResult: ...

    def request_stop(self) -> None: ...


def _ray(job: JobConfig, run_dir: str, **options: Any) -> Launcher:
    from downpour.launch.ray_cluster import RayLauncher  # imports ray: only when asked for

    return RayLauncher(job, run_dir, **options)


_LAUNCHERS: dict[str, Callable[..., Launcher]] = {"local": LocalLauncher, "ray": _ray}


def register_launcher(name: str, factory: Callable[..., Launcher]) -> None:
    """Make ``factory(job, run_dir, **options)`` available as ``launcher: NAME``."""
    _LAUNCHERS[name] = factory


def launcher_names() -> list[str]:
    return sorted(_LAUNCHERS)


def make_launcher(job: JobConfig, run_dir: str, name: str | None = None, **options: Any) -> Launcher:
    """The launcher ``name`` (default: the job's ``launcher``) for ``job``. Options: ``insecure``
    (every launcher); ``address`` (ray: the cluster, ``auto`` or HOST:PORT). Unknown names and
    options are config errors naming what exists."""
    name = name or job.launcher
    factory = _LAUNCHERS.get(name)
    if factory is None:
        raise ConfigError(f"launcher {name!r} is unknown; launchers: {', '.join(launcher_names())}")
    if name != "ray" and options.get("address") is not None:
        raise ConfigError(f"--address names a Ray cluster; the {name} launcher takes none (use --launcher ray)")
    if name != "ray":
        options.pop("address", None)
    return factory(job, run_dir, **options)


__all__ = ["Launcher", "LocalLauncher", "RunResult", "launcher_names", "make_launcher", "register_launcher"]
