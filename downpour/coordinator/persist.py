"""The coordinator's state on disk, so that a restarted coordinator picks up the running job.

:class:`StateStore` keeps the state in SQLite (``RUN_DIR/coordinator.db``, WAL mode): one row per
part (job, nodes, failures, checkpoints), each a JSON document rewritten only when it changed, and
the data-shard ledger as its journal (one row per change, appended: a save costs what changed, not
the job's history). The service saves before it sends the answers that depend on a change (a shard
handed out is on disk before the worker hears of it), and once a second for the nodes' progress.
A SIGKILLed coordinator loses nothing it answered; SQLite's WAL makes each save all or nothing.

:func:`export_state` and :func:`adopt_state` turn a :class:`CoordinatorState` into those parts and
back, field by field of :class:`~downpour.coordinator.model.JobState` (a field marked ``TRANSIENT`` is
not saved; one marked ``TIME`` is saved relative to the job's start), so a new field is saved without
a change here. Requests that were waiting inside the old process (a barrier, WORKER_DONE, REGISTER) are not
kept: the nodes send them again (:class:`~downpour.coordinator.client.CoordinatorClient` repeats a
request that got no answer), and every handler takes a repeat as the same request. A checkpoint
that was being written is abandoned. Times are kept relative to the job's start, and the time the
coordinator was down counts as time that passed.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import MISSING, Field, asdict, fields
from enum import Enum
from types import UnionType
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin, get_type_hints

from downpour.config import job_to_dict
from downpour.coordinator.model import ALIVE, DONE, FailureRecord, JobState, Node, NodeState, Phase
from downpour.coordinator.shards import ShardLedger, shard_size_for
from downpour.errors import ConfigError, JobEnded
from downpour.protocol.ops import EVAL, NAME, PROGRESS, SERVER_STATS, STATS, valid
from downpour.protocol.schema import Bool, Int, Opt, Record, SchemaError, Str

if TYPE_CHECKING:
    from downpour.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)

STATE_FILE = "coordinator.db"
_VERSION = 2  # 2: every saved field of JobState, failures as FailureRecord fields
# A saved node's own fields (its progress and stats are checked with the schemas of the messages
# that carry them: a node whose progress is malformed gets {}).
_NODE = Record({"name": NAME, "role": Str(16, choices=("server", "worker")), "rank": Int(0, 1 << 20),
                "identity": Str(1024, pattern=r"[0-9a-f]*"), "address": Opt(Str(512)), "host": Str(256), "pid": Int(0, 1 << 40),
                "state": Str(16, choices=tuple(s.value for s in NodeState)), "metrics": Opt(Str(255)), "idle": Bool(),
                "heard": Bool()}, required=("name", "role", "rank", "identity", "host", "pid", "state"), rest=None)


class StateStore:
    """Parts of the coordinator's state, each a JSON text, in one SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))  # the job's state: the user's only
        self.db = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # safe against a killed process; a power cut may lose the last save
        self.db.execute("CREATE TABLE IF NOT EXISTS state (part TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, event TEXT NOT NULL)")
        self._saved: dict[str, str] = {}
        self.journal_saved = int(self.db.execute("SELECT COUNT(*) FROM journal").fetchone()[0])

    def save(self, parts: dict[str, Any], journal: list | None = None) -> int:
        """Write the parts that changed since the last save and the events of ``journal`` (the
        whole list; what was saved before is skipped), in one transaction; returns how many rows."""
        texts = {k: json.dumps(v, separators=(",", ":"), sort_keys=True) for k, v in parts.items()}
        changed = {k: t for k, t in texts.items() if self._saved.get(k) != t}
        events = [(json.dumps(e, separators=(",", ":")),) for e in (journal or [])[self.journal_saved :]]
        if not changed and not events:
            return 0
        with self.db:  # one transaction: all of it or none
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO state (part, value) VALUES (?, ?)", list(changed.items()))
            self.db.executemany("INSERT INTO journal (event) VALUES (?)", events)
        self._saved.update(changed)
        self.journal_saved += len(events)
        return len(changed) + len(events)

    def load(self) -> dict[str, Any]:
        """Every part saved (empty when nothing was), and the journal under ``journal``."""
        parts = {k: json.loads(v) for k, v in self.db.execute("SELECT part, value FROM state")}
        parts["journal"] = [json.loads(e) for (e,) in self.db.execute("SELECT event FROM journal ORDER BY seq")]
        return parts

    def close(self) -> None:
        self.db.close()


def open_store(run_dir: str, recover: bool) -> tuple[StateStore, dict[str, Any] | None]:
    """The run folder's state store, and (``recover``) the state a coordinator saved there. A new
    job in a folder that holds an old job's state starts it afresh."""
    path = os.path.join(run_dir, STATE_FILE)
    if not recover:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        return StateStore(path), None
    if not os.path.exists(path):
        raise ConfigError(f"--recover: {path} does not exist (no coordinator of this run saved its state)")
    store = StateStore(path)
    parts = store.load()
    if "job" not in parts:
        raise ConfigError(f"--recover: {path} holds no saved job state")
    phase = parts["job"].get("phase")
    if phase in ("finished", "failed"):  # (it would serve for ever: no node comes to end the job again)
        store.close()
        raise JobEnded(f"--recover: the job in {run_dir} has ended already ({phase}"
                       + (f": {str(parts['job'].get('error'))[:300]}" if phase == "failed" else "") + "); nothing to recover",
                       0 if phase == "finished" else 1)
    return store, parts


def _saved(cls: type) -> list[Field]:
    return [f for f in fields(cls) if not f.metadata.get("transient")]


def _default(f: Field) -> Any:
    """A field's default, for a part saved before the field existed."""
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


# JobState's fields saved in parts of their own (every other one goes into the "job" part).
_NODES, _FAILURES = ("nodes",), ("failures", "recovering", "server_slots")


def _encode(value: Any) -> Any:
    """A field's value as JSON (enums are strings already; dicts with int keys get string keys)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Enum):
        return value.value
    return value


def _decode(tp: Any, value: Any) -> Any:
    """``value`` (JSON) as the field's declared type ``tp``: enums, bytes, int keys, numbers."""
    if value is None:
        return None
    if get_origin(tp) in (Union, UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return _decode(args[0], value) if len(args) == 1 else value
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(value)
    if tp is bytes:
        return bytes.fromhex(value)
    if tp in (int, float):
        return tp(value)
    if get_origin(tp) is dict:
        kt, vt = get_args(tp)
        return {_decode(kt, k): _decode(vt, v) for k, v in value.items()}
    return value


def _rel(t: float | None, base: float) -> float | None:
    return None if t is None else t - base


def _abs(t: float | None, base: float) -> float | None:
    return None if t is None else base + float(t)


def export_state(self: CoordinatorState, now: float) -> dict[str, Any]:
    """The state as plain data, in parts (see :class:`StateStore`): every saved field of
    :class:`JobState` (times relative to the job's start), the checkpoint plan's own export; the
    ledger is its journal (``self.ledger.journal``), saved beside them."""
    base = self.started
    job: dict[str, Any] = {"version": _VERSION, "config": job_to_dict(self.job), "wall": time.time(), "elapsed": now - base}
    for f in _saved(JobState):
        if f.name not in _NODES + _FAILURES:
            value = getattr(self, f.name)
            job[f.name] = _rel(value, base) if f.metadata.get("time") else _encode(value)
    index = {id(r): i for i, r in enumerate(self.failures)}
    return {
        "job": job,
        "nodes": [{f.name: _encode(getattr(n, f.name)) for f in _saved(Node)} for n in self.nodes.values()],
        "failures": {
            "records": [asdict(r) for r in self.failures],
            "recovering": [[_rel(at, base), index[id(r)]] for at, r in self.recovering if id(r) in index],
            "server_slots": [[rank, _rel(at, base), index[id(r)]] for rank, (at, r) in self.server_slots.items() if id(r) in index],
        },
        "checkpoints": self.checkpoints.export(base),
    }


def adopt_state(self: CoordinatorState, parts: dict[str, Any], now: float, lost_at: float | None = None) -> None:
    """Continue from ``parts`` (:func:`export_state`'s, saved by a coordinator of the same job).
    ``lost_at``: when (wall clock) the old coordinator was found dead, for the failure record."""
    j = parts["job"]
    if j.get("version") != _VERSION:
        raise ConfigError(f"the saved coordinator state is version {j.get('version')}, this coordinator reads {_VERSION}")
    if json.dumps(j["config"], sort_keys=True) != json.dumps(job_to_dict(self.job), sort_keys=True):
        raise ConfigError("the saved coordinator state belongs to another job (its config differs): "
                          "recover with the job file the run started with")
    down_s = max(0.0, time.time() - float(j["wall"]))
    base = self.started = now - float(j["elapsed"]) - down_s  # the time it was down passed for the job too
    hints = get_type_hints(JobState)
    try:
        for f in _saved(JobState):
            if f.name not in _NODES + _FAILURES:
                value = j.get(f.name, _default(f))
                setattr(self, f.name, _abs(value, base) if f.metadata.get("time") else _decode(hints[f.name], value))
        records = [FailureRecord(**r) for r in parts["failures"]["records"]]
    except (TypeError, ValueError, AttributeError) as err:
        raise ConfigError(f"--recover: {STATE_FILE} is corrupt: {err}") from None
    self.restarts += 1
    if not valid(EVAL, self.evaluation or {}):
        log.warning("coordinator: the saved evaluation is malformed; dropped")
        self.evaluation = None
    self.nodes, self.by_identity = {}, {}
    for d in parts["nodes"]:
        node = _adopt_node(d, now)
        self.nodes[node.name] = node
        self.by_identity[node.identity] = node.name
    t = self.job.training
    size = shard_size_for(self.job.data.shard_size, self.num_train, self.job.cluster.worker_slots, t.batch_size)
    self.ledger = ShardLedger(self.num_train, size, t.epochs, t.seed)
    self.ledger.replay(parts["journal"])
    f = parts["failures"]
    self.failures = records
    self.recovering = [(base + float(at), records[i]) for at, i in f["recovering"]]
    self.server_slots = {int(rank): (base + float(at), records[i]) for rank, at, i in f["server_slots"]}
    self.checkpoints.adopt(parts["checkpoints"], base, resumed=self.resume is not None)
    if self.phase == Phase.FAILED:  # it was stopping the job already: finish that
        self.stop_deadline = now + 3 * self.cl.heartbeat_interval_s + 1.0
    # The coordinator's own failure: found dead (by the launcher) at lost_at; recovered when the first
    # node gets an answer, reconnected once every node that was alive has been heard from again.
    detected = None if lost_at is None else now - max(0.0, time.time() - lost_at)
    record = FailureRecord("coordinator", "dead", round(float(j["elapsed"]), 3),
                           f"coordinator restarted (restart {self.restarts}); its state was saved {down_s:.1f}s before",
                           scope="coordinator", down_s=round(down_s, 3),
                           detected_after_s=None if lost_at is None else round(max(0.0, lost_at - float(j["wall"])), 3))
    self.failures.append(record)
    awaited = {n.name for n in self.nodes.values() if n.state in (ALIVE, DONE)}
    self.reconnecting = (awaited, detected if detected is not None else now, record)
    log.warning("coordinator: recovered the job from %s (phase %s, %d nodes, %d shards done); waiting for the nodes to reconnect",
                STATE_FILE, self.phase, len(self.nodes), len(self.ledger.completed))


def _adopt_node(d: dict[str, Any], now: float) -> Node:
    """A saved node, checked (its progress and stats with the schemas of the messages that carry them)."""
    try:
        _NODE.check({k: v for k, v in d.items() if k not in ("progress", "stats")}, "saved node")
    except SchemaError as err:
        raise ConfigError(f"--recover: {STATE_FILE} is corrupt: {err}") from None
    hints = get_type_hints(Node)
    values = {f.name: _decode(hints[f.name], d.get(f.name, _default(f))) for f in _saved(Node)}
    values["progress"] = values["progress"] or {}
    if not valid(PROGRESS, values["progress"]):  # saved by an older coordinator that stored it unchecked
        log.warning("coordinator: %s's saved progress is malformed; it is replaced at its next heartbeat", d["name"])
        values["progress"] = {}
    stats = values["stats"]
    if stats is not None and not valid(SERVER_STATS if d["role"] == "server" else STATS, stats):
        log.warning("coordinator: %s's saved stats are malformed; dropped", d["name"])
        values["stats"] = None
    return Node(**values, last_seen=now)
