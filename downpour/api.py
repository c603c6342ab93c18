"""The public Python API: run a job from code, seed-style.

    import downpour

    def model_fn():
        return torch.nn.Sequential(...)

    def dataset_fn():
        return downpour.data.load_idx_dataset("/usr/share/datasets/fashion-mnist")

    result = downpour.train(model_fn, dataset_fn, {"training": {"epochs": 1}})
    result.summary["test_accuracy"], result.run_dir, result.model_path
    model = result.load_model()          # the trained torch.nn.Module (strict load of model.pt)

``model_fn`` and ``dataset_fn`` run inside every worker process, so they must be
importable there: module-level functions (of a module or of the script being
run, whose top level must then sit under ``if __name__ == "__main__":``), or
``"package.module:function"`` strings. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from downpour.config import JobConfig, apply_overrides, job_to_dict, load_job, parse_job
from downpour.data import build_dataset
from downpour.errors import ConfigError, DataError, DownpourError
from downpour.imports import object_path
from downpour.layout import Layout
from downpour.server.scaling import check_hyperparameters

log = logging.getLogger(__name__)


def default_run_dir(name: str) -> str:
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def check_run_dir(job: JobConfig, run_dir: str, api: bool = False) -> None:
    """A run folder holds one job: one that already holds a job's state (its summary, its coordinator's
    state, checkpoints) is refused unless this job resumes from it. Another job's checkpoints there
    would mix with this one's (the latest and the ones pruned go by step, whichever job wrote them).
    It is created here: a path that cannot be a folder is a clear error before anything starts.
    ``api``: the advice names :func:`train`'s arguments, not the command line's."""
    try:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)  # (its keys, state, model: the user's only)
    except OSError as err:
        raise ConfigError(f"the run folder {run_dir} cannot be created: {err.strerror or err}") from None
    held = [name for name in ("summary.json", "coordinator.db") if os.path.exists(os.path.join(run_dir, name))]
    checkpoints = os.path.join(run_dir, "checkpoints")
    if job.checkpoint.url is None and os.path.isdir(checkpoints) and any(e.startswith("ckpt-") for e in os.listdir(checkpoints)):
        held.append("checkpoints/")
    resume, here = job.checkpoint.resume_from, os.path.abspath(run_dir)
    new = "run_dir" if api else "--run-dir"
    in_place = resume is not None and "://" not in resume and os.path.commonpath([os.path.abspath(resume), here]) == here
    if in_place and os.path.basename(resume.rstrip("/")).startswith("ckpt-"):
        # Its newer checkpoints would stay beside the ones this job writes, and a later --resume take them.
        raise ConfigError(f"resuming from the checkpoint {resume} in its own run folder would leave the newer checkpoints "
                          f"there beside this job's: give this job a new {new}")
    resume_it = (f"config checkpoint.resume_from={run_dir!r}" if api else
                 f"--resume {shlex.quote(run_dir)} (checkpoint.resume_from)")
    if held and not in_place:
        if job.checkpoint.url is None and "checkpoints/" not in held:  # (e.g. a job stopped before training began)
            raise ConfigError(f"the run folder {run_dir} already holds a job ({', '.join(held)}) that left no checkpoint "
                              f"to continue from: remove the folder, or give this job a new {new}")
        raise ConfigError(f"the run folder {run_dir} already holds a job ({', '.join(held)}); continue it with {resume_it}, "
                          f"or give this job a new {new}")
    if job.checkpoint.enabled and job.checkpoint.url:
        check_checkpoint_url(job)


def check_checkpoint_url(job: JobConfig) -> None:
    """``checkpoint.url`` must be a place every process of the job can write to, and hold no other
    job's checkpoints (they would mix: the latest and the ones pruned go by step, whichever job wrote
    them) unless this job resumes from there. Checked by writing and deleting a small file."""
    from downpour.storage import CheckpointStore, resolve_location, same_location

    url = job.checkpoint.url
    if url.startswith("memory://"):
        raise ConfigError(f"checkpoint.url {url}: memory:// is one process's memory, and each server writes its part "
                          "from its own process; use a folder or a shared URL (s3://, ...)")
    try:
        store = CheckpointStore(url)
        store.fs.makedirs(store.root, exist_ok=True)
        probe = f"{store.root}/.downpour-write-check-{os.getpid()}"
        with store.fs.open(probe, "wb") as f:
            f.write(b"downpour")
        store.fs.rm(probe)
        names = store.names()
    except DownpourError as err:
        raise ConfigError(f"checkpoint.url {url}: {err}") from None
    except Exception as err:  # noqa: BLE001 - any fsspec backend's error: the job cannot checkpoint there
        raise ConfigError(f"checkpoint.url {url}: cannot write there: {type(err).__name__}: {err}") from None
    resume = job.checkpoint.resume_from
    if names and not (resume is not None and same_location(resolve_location(resume), url)):
        raise ConfigError(f"checkpoint.url {url} already holds a job's checkpoints (newest {names[-1]}); continue that job "
                          f"with --resume {shlex.quote(url)}, or give this job another checkpoint.url")


def check_data(job: JobConfig) -> None:
    """Fail early, before any process starts, when the job's data cannot be found, an import path it
    names (loss, metrics, collate function, update rule) does not resolve, its model has a buffer no
    message can carry, or its optimizer settings do not fit the job's length (warm-up, schedule)."""
    from downpour.coordinator.service import plan_layout
    from downpour.extensions import check_extensions

    check_extensions(job)
    with _one_line("model: building it failed", ConfigError):  # the user's factory: whatever it raises
        layout = plan_layout(job)  # the model builds, and each of its buffers can be sent (a complex one cannot)
    unknown = sorted(set(job.sparse.tables) - {t.name for t in layout.tables})
    if unknown:  # (a misspelt table's settings would apply to nothing, silently)
        have = ", ".join(t.name for t in layout.tables) or "none"
        raise ConfigError(f"sparse.tables: {', '.join(map(repr, unknown))} is no table of the model (its sparse tables: {have})")
    d = job.data
    with _one_line(f"data: loading it with {d.factory} failed" if d.factory else f"data: cannot read {d.url or d.path}"):
        train = len(build_dataset(job.data).train)
    check_hyperparameters(job, train)
    cp = job.checkpoint
    with _one_line(f"cannot read the checkpoint at {cp.resume_from or job.init_from}"):
        check_restore_points(job, layout)


@contextlib.contextmanager
def _one_line(what: str, error: type[DownpourError] = DataError) -> Iterator[None]:
    """Whatever fails inside (storage: an S3 endpoint down, wrong credentials; a user's model or data
    factory raising) as one line, ``what: Type: message``, before anything starts."""
    try:
        yield
    except DownpourError:
        raise
    except Exception as err:  # noqa: BLE001 - fsspec back ends raise their own types (botocore's, say)
        raise error(f"{what}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def check_restore_points(job: JobConfig, layout: Layout | None = None) -> None:
    """A job that resumes (``checkpoint.resume_from``) or warm-starts (``init_from``): the checkpoint
    is there and fits the model, checked here rather than by the coordinator after the start."""
    cp = job.checkpoint
    if not cp.resume_from and not job.init_from:
        return
    from downpour.coordinator.restore import plan_resume, plan_warm_start, rules_of
    from downpour.coordinator.service import plan_layout

    layout = layout or plan_layout(job)
    if cp.resume_from:
        plan = plan_resume(cp.resume_from, layout, job.optimizer.name, announce=False, sparse=rules_of(job, layout))
        kept = (plan.get("ledger") or {}).get("shard_size")
        if job.data.shard_size is not None and kept is not None and kept != job.data.shard_size:
            log.warning("downpour: data.shard_size %d is not used: a resumed job keeps its checkpoint's shards (%d examples "
                        "each), so that every example is still trained once per epoch", job.data.shard_size, kept)
    else:
        plan_warm_start(job.init_from, layout, announce=False)


_LOSSY = ("topk", "randomk", "onebit", "powersgd")  # codecs that drop information for good without error feedback


def advisories(job: JobConfig) -> list[str]:
    """What in a valid job is probably not what its author meant (``downpour train`` prints each as a
    WARNING before the start, ``downpour.train`` logs it): a codec that drops information without
    error feedback, and a parameter pattern that matches no parameter of the model (a typo)."""
    out = []
    comp = job.compression
    for where, push in [("compression.push", comp.push), *((f"compression.groups[{i}].push", g.push) for i, g in enumerate(comp.groups))]:
        if push.codec in _LOSSY and not push.error_feedback and push.dgc is None:
            out.append(f"{where}: codec {push.codec} without error_feedback drops what it does not send for good "
                       "(docs/compression.md); set error_feedback: true")
    t = job.training
    moved = t.staleness_bound != type(t).model_fields["staleness_bound"].default  # (set: a job's dict sets every field)
    if moved and t.consistency != "ssp" and not t.consistency_groups:
        out.append(f"training.staleness_bound {t.staleness_bound} applies to consistency ssp only; this job is "
                   f"{t.consistency}, so it is not used (set consistency: ssp to bound staleness)")
    patterns = [(f"compression.groups[{i}].params", g.params) for i, g in enumerate(comp.groups)]
    patterns += [(f"training.consistency_groups[{i}].params", g.params) for i, g in enumerate(job.training.consistency_groups)]
    if patterns:
        import fnmatch

        from downpour.coordinator.restore import listed
        from downpour.coordinator.service import plan_layout

        names = [p.name for p in plan_layout(job).params]
        for where, pats in patterns:
            for pat in pats:
                if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                    out.append(f"{where}: {pat!r} matches no parameter of the model ({listed(names, most=8)})")
    return out


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
    if model_fn is not None:  # (the arguments a factory in the config had go to model_fn; a built-in model's do not)
        model = raw.get("model") or {}
        raw["model"] = {"factory": object_path(model_fn, "model_fn"), "args": {} if model.get("name") else model.get("args", {})}
    if dataset_fn is not None:
        data = dict(raw.get("data") or {})
        data.pop("name", None)
        data["factory"] = object_path(dataset_fn, "dataset_fn")
        raw["data"] = data
    return parse_job(apply_overrides(_named(raw), overrides or []), source="downpour.train")


def _named(value: Any, field: str = "") -> Any:
    """``value`` with every callable in it (a loss, a metric, a collate function, a factory: any field
    that takes an import path) replaced by its import path, which the job's processes import."""
    if isinstance(value, dict):
        return {k: _named(v, f"{field}.{k}" if field else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_named(v, f"{field}[{i}]") for i, v in enumerate(value))
    return object_path(value, field) if callable(value) else value


@dataclass(frozen=True)
class TrainResult(Mapping):
    """What :func:`train` returns: the job's summary, its run folder and the trained model.

    It reads as the summary mapping too (``result["test_accuracy"]``), as ``train`` returned
    the summary itself before."""

    summary: dict[str, Any]
    run_dir: str
    job: JobConfig

    @property
    def model_path(self) -> str:
        """The trained parameters and buffers (a state_dict; ``torch.load(path, weights_only=True)``)."""
        return os.path.join(self.run_dir, "model.pt")

    def load_model(self, device: str = "cpu"):
        """The job's model (built by its factory) with the trained state loaded strictly."""
        import torch

        from downpour.models import build_model

        model = build_model(self.job.model, self.job.training.seed)
        model.load_state_dict(torch.load(self.model_path, map_location=device, weights_only=True), strict=True)
        return model.to(device).eval()

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.summary)

    def __len__(self) -> int:
        return len(self.summary)


def train(
    model_fn: Callable | str | None = None,
    dataset_fn: Callable | str | None = None,
    config: JobConfig | dict[str, Any] | str | Path | None = None,
    run_dir: str | None = None,
    launcher: str | None = None,
    address: str | None = None,
) -> TrainResult:
    """Train a job on local processes (coordinator, servers, workers) and return its result.
    ``launcher``: "local" or "ray" (default: the config's ``launcher``); ``address``: with ray,
    the cluster (``auto`` or HOST:PORT; default: the config's ``ray.address``).

    Blocks until the job ends. Raises :class:`ConfigError` for a bad config or an import path
    that does not resolve, :class:`DataError` when the data is missing (nothing is started
    then), and :class:`JobFailed` naming the first node that failed.

    Called from the main thread, the first Ctrl-C (SIGINT) stops the job gracefully, as
    ``downpour train`` does: the workers leave after their step, a final checkpoint is committed,
    and the result comes back with ``status`` ``"stopped"``; ``train(..., config=<the same job,
    with checkpoint.resume_from=run_dir>, run_dir=run_dir)`` continues it. A second Ctrl-C stops
    every process at once and raises :class:`KeyboardInterrupt`.

    A module beside the script that calls this (``from mymodels import net``) is found by the
    job's processes too: the script's folder goes on their ``PYTHONPATH``.
    """
    from downpour import imports
    from downpour.launch import make_launcher

    if imports.importing:  # a job's process imports the script for its functions, and its top level called this
        raise ConfigError(f"downpour.train was called while a job's process imported {imports.importing[-1]} for the "
                          "functions it names: every process runs the script's top level again. Put the call under "
                          "`if __name__ == \"__main__\":`")
    job = resolve_job(config, model_fn, dataset_fn)
    check_data(job)
    for advice in advisories(job):
        log.warning("downpour: %s", advice)
    run_dir = run_dir or default_run_dir(job.name)
    check_run_dir(job, run_dir, api=True)
    job_launcher = make_launcher(job, run_dir, launcher, address=address)
    folder, env = _script_folder(), getattr(job_launcher, "env", None)  # (the environment of the processes it starts)
    if folder is not None and isinstance(env, dict):  # (they run python -m downpour in this folder, which may be another)
        env["PYTHONPATH"] = os.pathsep.join([p for p in (env.get("PYTHONPATH"), folder) if p])
    with _graceful_interrupt(job_launcher):
        run = job_launcher.run()
    return TrainResult(run.summary, run.run_dir, job)


def _script_folder() -> str | None:
    """The folder of the script being run, where Python put it on this process's path and the job's
    processes would not find it: a module beside the script (``from mymodels import net``) is to
    import there too. None for none (an interactive session, ``python -m``, ``python -P``)."""
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    if not isinstance(script, str):
        return None
    folder = os.path.dirname(os.path.realpath(script))  # (as Python puts it on sys.path)
    on_path = {os.path.realpath(p) for p in sys.path if p}
    return folder if folder in on_path and folder != os.path.realpath(os.getcwd()) else None


@contextlib.contextmanager
def _graceful_interrupt(job_launcher: Any) -> Iterator[None]:
    """In the main thread: the first Ctrl-C asks the job to stop gracefully, the second raises
    KeyboardInterrupt (every process is then stopped at once). Elsewhere: Python's own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def again(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # (the clean-up is not cut short)
        raise KeyboardInterrupt

    def first(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, again)
        log.warning("downpour: Ctrl-C: stopping the job gracefully (final checkpoint, then every process stops); "
                    "Ctrl-C again stops at once")
        job_launcher.request_stop()

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:  # (None: a handler set outside Python)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
