"""The scheduler service's core: the queue, a round of decisions every tick, and the jobs' processes.

:class:`Scheduler` owns the jobs (saved in SQLite before each change is acted on), the policy and a
:class:`Runner`. :meth:`Scheduler.step` is one tick: it notes every attempt that ended (finished,
stopped after a preemption or a cancel, or failed: restarted from its last checkpoint up to
``max_restarts`` times, waiting ``backoff_s`` x 2^k first), escalates stops that take too long,
then performs :func:`decide`'s actions. Everything here takes ``now`` from an injectable clock.
The HTTP API (http.py) and the CLI only call :meth:`submit`, :meth:`cancel`, :meth:`jobs` and
:meth:`view`; one lock keeps them and the tick apart.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import yaml

from downpour.api import check_data
from downpour.config import apply_overrides, job_to_dict, parse_job, parse_yaml
from downpour.errors import ConfigError, DownpourError
from downpour.scheduler.decide import Preempt, Start, decide, free_resources
from downpour.scheduler.model import Job, Phase
from downpour.scheduler.placement import place_gang
from downpour.scheduler.policies import make_policy
from downpour.scheduler.resources import Resources, total
from downpour.scheduler.runner import Exit, Runner, job_folder, log_path, run_folder
from downpour.scheduler.store import JobStore

log = logging.getLogger(__name__)


class UnknownJob(ConfigError):
    """No job has this ID."""


REFUSED = 2  # downpour train's exit code for a job refused before it started (its config, data, storage)


_RAISED = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Failed|Interrupt|Exit)\b")


def last_error(path: str, tail: int = 8192) -> str:
    """``": LINE"``: the last line of an attempt's log that says why it ended ("downpour: ..."), or "".
    When the launcher quoted the end of the failing process's log after it ("--- end of PATH ---"),
    that process's last exception line is added: the cause, not only that the process died."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - tail))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    said = [i for i, line in enumerate(lines) if line.startswith("downpour: ")]
    if not said:
        return ""
    line = lines[said[-1]].strip()[len("downpour: "):][:300]
    quoted = next((j for j in range(said[-1] + 1, len(lines)) if lines[j].startswith("--- end of ")), None)
    if quoted is not None:
        raised = [s.strip() for s in lines[quoted + 1:] if _RAISED.match(s.strip())]
        if raised:
            name = os.path.basename(lines[quoted][len("--- end of "):].rstrip(" -")).removesuffix(".log")
            line += f" [{name}: {raised[-1][:200]}]"
    return f": {line}"


@dataclass(frozen=True)
class SchedulerSettings:
    root: str                                    # the scheduler's folder: scheduler.db, jobs/ID/...
    nodes: dict[str, Resources]                  # name -> capacity; by default this machine alone
    policy: str = "las"
    policy_options: dict = field(default_factory=dict)
    tick_s: float = 1.0                          # how often processes are checked and a round decided
    min_run_s: float = 0.0                       # a job runs at least this long before it may be preempted
    max_restarts: int = 3                        # restarts after failures, per job
    backoff_s: float = 5.0                       # wait before the k-th restart: backoff_s * 2^(k-1)
    stop_timeout_s: float = 300.0                # a stop asked for this long is forced (second SIGTERM, then SIGKILL)
    memory_mb_per_task: int = 512                # a task's memory when the submission does not say


class Scheduler:
    def __init__(self, settings: SchedulerSettings, clock: Callable[[], float] = time.time, runner: Runner | None = None) -> None:
        if not settings.nodes:
            raise ConfigError("the scheduler needs at least one node with resources")
        self.settings, self.clock = settings, clock
        os.makedirs(os.path.join(settings.root, "jobs"), exist_ok=True)
        self.policy = make_policy(settings.policy, **settings.policy_options)
        self.capacity = total(settings.nodes.values())
        self.store = JobStore(os.path.join(settings.root, "scheduler.db"))
        self.runner = runner or Runner(settings.root)
        self.lock = threading.RLock()
        self.jobs: dict[int, Job] = {j.id: j for j in self.store.load()}
        self._adopt()

    # -- API ------------------------------------------------------------------
    def submit(self, job_yaml: str, user: str = "default", queue: str = "default", priority: int = 0,
               overrides: list[str] | None = None, memory_mb_per_task: int | None = None, cwd: str | None = None) -> Job:
        """Validate and queue a job; refused (ConfigError naming the field or resource) if it is
        invalid or asks more than the whole cluster has. Nothing is stored for a refused job."""
        for name, value in (("user", user), ("queue", queue)):
            if not value or not all(c.isalnum() or c in "-_." for c in value):
                raise ConfigError(f"{name}: expected letters, digits, '-', '_' or '.', got {value!r}")
        raw = parse_yaml(job_yaml, "(submitted)")
        if not isinstance(raw, dict):
            raise ConfigError("job file: expected a mapping of sections (model, data, training, ...)")
        try:
            with _importable_from(cwd):  # (a factory beside the job file, as `downpour train` there would find it)
                spec = parse_job(apply_overrides(raw, list(overrides or [])), "submitted job")
                check_data(spec)  # missing data: refused now, not after N failed starts
        except DownpourError:
            raise
        except (Exception, SystemExit) as err:  # the job's own code, imported to check it: it may do anything
            raise ConfigError(f"the job's code failed while it was checked: {type(err).__name__}: {err}"[:2000]) from None
        mem = self.settings.memory_mb_per_task if memory_mb_per_task is None else int(memory_mb_per_task)
        if mem <= 0:
            raise ConfigError(f"memory_mb: must be > 0, got {mem}")
        gpu = 1 if spec.training.device == "cuda" else 0
        tasks = tuple([Resources(cpus=1, memory_mb=mem)] * spec.cluster.num_servers
                      + [Resources(cpus=1, gpus=gpu, memory_mb=mem)] * spec.cluster.num_workers)
        if place_gang(tasks, self.settings.nodes) is None:
            want = total(tasks)
            over = want.exceeds(self.capacity) or ["a node large enough for one task"]
            raise ConfigError(f"the job asks for {want.as_dict()} ({spec.cluster.num_servers} servers + "
                              f"{spec.cluster.num_workers} workers) but the cluster has {self.capacity.as_dict()}: "
                              f"too little {', '.join(over)}; it would never start")
        with self.lock:
            job = Job(self.store.next_id(), tasks, self.clock(), user=user, queue=queue, priority=int(priority), name=spec.name)
            job.extra.update(cwd=cwd or os.getcwd(), queued_since_s=job.submitted_s)
            folder = job_folder(self.settings.root, job.id)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "job.yaml"), "w") as f:
                yaml.safe_dump(job_to_dict(spec), f, sort_keys=False)
            self.store.save(job)
            self.jobs[job.id] = job
            log.info("scheduler: job %d (%s) queued for %s/%s, priority %d", job.id, job.name, queue, user, job.priority)
            return job

    def get(self, job_id: int) -> Job:
        job = self.jobs.get(int(job_id))
        if job is None:
            known = ", ".join(str(i) for i in sorted(self.jobs)[-10:]) or "none yet"
            raise UnknownJob(f"no job {job_id} (latest job IDs: {known})")
        return job

    def cancel(self, job_id: int) -> Job:
        """Cancel a job: a queued one at once, a running one after it has checkpointed and stopped;
        one being preempted is cancelled instead of queued again."""
        with self.lock:
            job = self.get(job_id)
            if job.phase.finished:
                raise ConfigError(f"job {job.id} is already {job.phase.value}")
            job.cancel_requested = True
            if job.phase is Phase.QUEUED:
                job.phase, job.finished_s = Phase.CANCELLED, self.clock()
            elif job.phase is Phase.RUNNING:
                self._stop(job, "cancelled")
            self.store.save(job)
            return job

    def logs(self, job_id: int, lines: int = 100) -> str:
        job = self.get(job_id)
        path = log_path(self.settings.root, job.id, job.attempt)
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    # -- the tick ---------------------------------------------------------------
    def step(self) -> None:
        with self.lock:
            now = self.clock()
            for job in list(self.jobs.values()):
                if job.phase.holds_resources:
                    self._watch(job, now)
            for act in decide(list(self.jobs.values()), self.settings.nodes, self.policy, now, self.settings.min_run_s):
                job = self.jobs[act.job_id]
                if isinstance(act, Start):
                    self._start(job, act.placement, now)
                elif isinstance(act, Preempt):
                    log.info("scheduler: preempting job %d for job %d", job.id, act.for_job)
                    claimant = self.jobs[act.for_job]
                    if claimant.claimed_s is None:  # it starts first once its victims have stopped (drf)
                        claimant.claimed_s = now
                        self.store.save(claimant)
                    job.preemptions += 1
                    self._stop(job, f"preempted for job {act.for_job}")
                    self.store.save(job)

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop`` is set; a failing tick is logged, not fatal."""
        while not stop.is_set():
            try:
                self.step()
            except DownpourError as err:
                log.error("scheduler: tick failed: %s", err)
            except Exception:
                log.exception("scheduler: tick failed")
            stop.wait(self.settings.tick_s)

    def free(self) -> dict[str, Resources]:
        with self.lock:
            return free_resources(self.settings.nodes, list(self.jobs.values()))

    # -- internals ----------------------------------------------------------------
    def _start(self, job: Job, placement: tuple[str, ...], now: float) -> None:
        job.phase, job.placement, job.started_s, job.pid, job.claimed_s = Phase.RUNNING, placement, now, None, None
        job.run_dir = run_folder(self.settings.root, job.id, job.attempt)
        job.first_started_s = job.first_started_s if job.first_started_s is not None else now
        self.store.save(job)  # saved first: a scheduler killed right after finds the process by its run folder
        try:
            job.pid, job.run_dir, resumed = self.runner.start(job.id, job.attempt, job.extra.get("cwd"))
            job.extra["resumed_from"] = resumed
            # (what the last attempt's end said, "preempted for job N", no longer holds)
            job.message = f"running (attempt {job.attempt}{', resumed' if resumed else ''})" if job.attempt else "running"
        except OSError as err:
            job.phase, job.placement, job.message = Phase.FAILED, None, f"could not start: {err}"
            job.finished_s = now
        self.store.save(job)

    def _stop(self, job: Job, why: str) -> None:
        job.phase, job.message = Phase.STOPPING, why
        job.extra["stop_sent_s"], job.extra["stop_signals"] = self.clock(), 1
        self.store.save(job)  # saved before the signal: a restarted scheduler knows the stop was asked
        if job.pid is not None:
            self.runner.signal(job.pid, job.run_dir, signal.SIGTERM)

    def _watch(self, job: Job, now: float) -> None:
        if job.pid is not None and self.runner.alive(job.pid, job.run_dir):
            if job.phase is Phase.STOPPING:
                self._escalate(job, now)
            return
        ended = self.runner.exit(job.pid, job.run_dir) if job.pid is not None else Exit(None, None)
        self._ended(job, ended, now)
        self.store.save(job)

    def _escalate(self, job: Job, now: float) -> None:
        waited = now - job.extra.get("stop_sent_s", now)
        sent = job.extra.get("stop_signals", 1)
        if waited > self.settings.stop_timeout_s * sent and sent < 3:
            sig = signal.SIGTERM if sent == 1 else signal.SIGKILL
            log.warning("scheduler: job %d did not stop within %.0f s: %s", job.id, waited, sig.name)
            self.runner.signal(job.pid, job.run_dir, sig)
            job.extra["stop_signals"] = sent + 1
            self.store.save(job)

    def _ended(self, job: Job, ended: Exit, now: float) -> None:
        ran = max(0.0, now - (job.started_s or now))
        job.attained += job.width * ran
        job.extra.update(last_run_s=ran, queued_since_s=now, last_exit=ended.code)
        job.placement, job.pid = None, None
        if ended.completed:
            job.phase, job.finished_s, job.message = Phase.DONE, now, "finished"
        elif job.cancel_requested:
            job.phase, job.finished_s, job.message = Phase.CANCELLED, now, "cancelled"
        elif job.phase is Phase.STOPPING or ended.stopped:  # preempted (or stopped by hand): resumes from its checkpoint
            job.phase, job.attempt, job.retrying = Phase.QUEUED, job.attempt + 1, False
        elif ended.code != REFUSED and job.restarts < self.settings.max_restarts:
            job.restarts += 1
            delay = self.settings.backoff_s * 2 ** (job.restarts - 1)
            why = last_error(log_path(self.settings.root, job.id, job.attempt))
            job.phase, job.attempt, job.not_before_s, job.retrying = Phase.QUEUED, job.attempt + 1, now + delay, True
            job.message = f"attempt {job.attempt - 1} failed (exit {ended.code}{why}); restart {job.restarts} in {delay:.0f} s"
            log.warning("scheduler: job %d: %s", job.id, job.message)
        else:
            job.phase, job.finished_s = Phase.FAILED, now
            where = log_path(self.settings.root, job.id, job.attempt)
            why = last_error(where)
            job.message = (f"refused before it started (exit {REFUSED}{why}): not restarted; see {where}" if ended.code == REFUSED
                           else f"failed (exit {ended.code}{why}) after {job.restarts} restarts; see {where}")
            log.error("scheduler: job %d %s", job.id, job.message)

    def _adopt(self) -> None:
        """After a restart: keep every job whose process still runs; note those that ended meanwhile."""
        now = self.clock()
        for job in self.jobs.values():
            if not job.phase.holds_resources:
                continue
            if job.pid is None:
                job.pid = self.runner.find(job.run_dir) if job.run_dir else None
            if job.pid is not None and self.runner.alive(job.pid, job.run_dir):
                log.info("scheduler: adopted job %d (pid %d, %s)", job.id, job.pid, job.run_dir)
                continue
            self._ended(job, self.runner.exit(job.pid, job.run_dir) if job.pid is not None else Exit(None, None), now)
            self.store.save(job)


_IMPORTS = threading.Lock()  # sys.path is the process's: one submission's folder on it at a time


@contextlib.contextmanager
def _importable_from(folder: str | None) -> Iterator[None]:
    """A job's import paths (``mymodels:net``) resolve from the folder it was submitted from, where it
    will run, first, as in the job's processes (``python -m downpour`` there). The modules imported
    from there are forgotten afterwards: another submission's folder may hold others of the same name."""
    if not folder or not os.path.isdir(folder):
        yield
        return
    folder = os.path.abspath(folder)
    with _IMPORTS:
        before, added = set(sys.modules), folder not in sys.path
        if added:
            sys.path.insert(0, folder)
        try:
            yield
        finally:
            if added:
                sys.path.remove(folder)
            for name in set(sys.modules) - before:
                where = getattr(sys.modules[name], "__file__", None) or ""
                if where.startswith(folder + os.sep):
                    del sys.modules[name]
            importlib.invalidate_caches()
