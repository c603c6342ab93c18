"""A job's processes: ``downpour train`` started, watched, stopped and re-adopted.

Each job lives in its own folder ``DIR/jobs/ID``: ``job.yaml`` (the validated job, frozen at
submission), then one run folder per attempt, ``run-0``, ``run-1``, ... with all that ``downpour
train`` writes there, and its output in ``run-N.log``. An attempt after the first resumes
(``--resume``) from the newest earlier run folder holding a complete checkpoint.

A job is started in its own session, not as a child that dies with the scheduler: a scheduler
that is killed leaves its jobs running, and the next one *adopts* them by pid, checking that the
pid is still the ``downpour train`` of that run folder (a reused pid is not taken for the job).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from downpour.storage import CheckpointStore, resolve_location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exit:
    """How an attempt ended: ``code`` (None when the process was adopted and its code is unknown),
    ``summary`` (summary.json, if the job wrote one) and whether it says the job was stopped early."""

    code: int | None
    summary: dict | None

    @property
    def stopped(self) -> bool:
        """It stopped early on request (the graceful stop: a final checkpoint was committed)."""
        return (self.summary or {}).get("status") == "stopped"

    @property
    def completed(self) -> bool:
        """It trained to the end: summary.json says ``ok`` (and the exit code, when known, is 0)."""
        return self.summary is not None and self.summary.get("status", "ok") == "ok" and self.summary.get("error") is None \
            and self.code in (0, None)


def job_folder(root: str, job_id: int) -> str:
    return os.path.join(root, "jobs", str(job_id))


def run_folder(root: str, job_id: int, attempt: int) -> str:
    return os.path.join(job_folder(root, job_id), f"run-{attempt}")


def log_path(root: str, job_id: int, attempt: int) -> str:
    return run_folder(root, job_id, attempt) + ".log"


def resume_source(root: str, job_id: int, attempt: int) -> str | None:
    """The newest run folder before ``attempt`` with a complete checkpoint, or None."""
    for k in range(attempt - 1, -1, -1):
        folder = run_folder(root, job_id, k)
        where = resolve_location(folder)  # its checkpoints/ folder, or the checkpoint.url its job wrote to
        if "://" in where or os.path.isdir(where):
            try:
                if CheckpointStore(where).latest() is not None:
                    return folder
            except Exception as err:  # noqa: BLE001 - a damaged folder is skipped, an older one may do
                log.warning("scheduler: job %d: %s has no usable checkpoint: %s", job_id, folder, err)
    return None


class Runner:
    """Starts, polls and signals the ``downpour train`` processes of jobs under ``root``."""

    def __init__(self, root: str, python: str = sys.executable) -> None:
        self.root, self.python = root, python
        self._children: dict[int, subprocess.Popen] = {}

    def start(self, job_id: int, attempt: int, cwd: str | None = None) -> tuple[int, str, str | None]:
        """Start attempt ``attempt`` of the job in ``cwd`` (where it was submitted, so relative paths
        in the job mean what they meant there); returns (pid, run folder, the folder it resumes from)."""
        folder = job_folder(self.root, job_id)
        run_dir = run_folder(self.root, job_id, attempt)
        resume = resume_source(self.root, job_id, attempt)
        args = [self.python, "-m", "downpour", "train", os.path.join(folder, "job.yaml"), "--run-dir", run_dir, "--quiet"]
        if resume:
            args += ["--resume", resume]
        with open(log_path(self.root, job_id, attempt), "ab") as out:
            popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=cwd if cwd and os.path.isdir(cwd) else folder)
        self._children[popen.pid] = popen
        log.info("scheduler: job %d attempt %d started (pid %d)%s", job_id, attempt, popen.pid,
                 f", resuming from {resume}" if resume else "")
        return popen.pid, run_dir, resume

    def alive(self, pid: int, run_dir: str) -> bool:
        """Whether ``pid`` is still the job's process (a child not yet reaped, or an adopted one)."""
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z" and run_dir.encode() in cmd and b"train" in cmd

    def find(self, run_dir: str) -> int | None:
        """The pid of the ``downpour train`` of ``run_dir``, if one runs (for a job whose start was
        saved but not its pid)."""
        for name in os.listdir("/proc"):
            if name.isdigit() and self.alive(int(name), run_dir):
                return int(name)
        return None

    def exit(self, pid: int, run_dir: str) -> Exit:
        """How the attempt ended (call once ``alive`` is False)."""
        child = self._children.pop(pid, None)
        code = child.poll() if child is not None else None
        summary = None
        try:
            with open(os.path.join(run_dir, "summary.json")) as f:
                summary = json.load(f)
        except (OSError, ValueError):
            pass
        return Exit(code, summary)

    def signal(self, pid: int, run_dir: str, sig: int = signal.SIGTERM) -> bool:
        """Send ``sig`` to the job's process if it is still the job's; False if it is gone."""
        if not self.alive(pid, run_dir):
            return False
        try:
            os.kill(pid, sig)
            return True
        except ProcessLookupError:
            return False
