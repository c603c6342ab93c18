"""The scheduler's persistent queue: every job, as JSON, in one SQLite table.

A job's row is written (and committed) before the scheduler acts on a change, as the coordinator
does with its state: a scheduler killed at any point finds every job again, with the pid and run
folder of each one that was running (:meth:`JobStore.load`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, fields

from downpour.errors import DataError
from downpour.scheduler.model import Job, Phase
from downpour.scheduler.resources import Resources

_SCHEMA = "CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, phase TEXT NOT NULL, record TEXT NOT NULL)"


def job_to_record(job: Job) -> dict:
    rec = asdict(job)
    rec["phase"] = job.phase.value
    return rec


def job_from_record(rec: dict) -> Job:
    names = {f.name for f in fields(Job)}
    rec = {k: v for k, v in rec.items() if k in names}
    rec["tasks"] = tuple(Resources(**t) for t in rec["tasks"])
    rec["phase"] = Phase(rec["phase"])
    if rec.get("placement") is not None:
        rec["placement"] = tuple(rec["placement"])
    return Job(**rec)


class JobStore:
    """Jobs in ``path`` (SQLite, WAL). Thread-safe: one connection behind a lock."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise DataError(f"{path}: not a scheduler database: {err}") from None

    def save(self, job: Job) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO jobs (id, phase, record) VALUES (?, ?, ?)",
                             (job.id, job.phase.value, json.dumps(job_to_record(job))))

    def next_id(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(id) FROM jobs").fetchone()
        return (row[0] or 0) + 1

    def load(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM jobs ORDER BY id").fetchall()
        try:
            return [job_from_record(json.loads(r[0])) for r in rows]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{self.path}: a job record is unreadable: {err}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()
