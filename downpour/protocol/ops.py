"""The schema of every request's meta, per op, and the error codes of refusals.

Each node validates a request's meta against :data:`REQUESTS` (:func:`validate`) before any
handler reads it, so a handler sees exact types, bounded sizes and finite numbers. What a
field's value means for the job (a key this server holds, a codec the job configured) is
checked by the handler, still before anything changes. The same node schemas check the
coordinator's saved state when it is loaded (:data:`PROGRESS`, :data:`STATS`).

Fields not listed are tolerated (bounded plain data, never read), so that a newer node may add
one; a listed field of the wrong type is refused with :attr:`Code.INVALID` naming it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from downpour.protocol.messages import Op
from downpour.protocol.schema import (
    F32_MAX,
    SAFE_NAME,
    Bool,
    Dict,
    Int,
    List,
    Num,
    Plain,
    Record,
    Schema,
    SchemaError,
    Str,
    Tuple,
    drop_none,
)

# An unanswered request to the coordinator is sent again after this long (REGISTER: always), so a
# restarted coordinator hears every request the old one had not answered (coordinator/client.py).
ATTEMPT_S = 5.0


class Code(StrEnum):
    """Why a request was refused (an ERROR reply's ``code``; the refusal counters' keys)."""

    MALFORMED = "malformed"  # the frames are not a message
    INVALID = "invalid"  # a field's type, range or meaning is wrong
    INTERNAL = "internal"  # the handler failed; nothing was changed
    BAD_OP = "bad_op"
    FORBIDDEN = "forbidden"  # the sender's key or connection may not do this
    NOT_MEMBER = "not_member"  # a push from a worker outside the job's current membership
    RATE_LIMITED = "rate_limited"
    UNKNOWN_NODE = "unknown_node"
    DECLARED_DEAD = "declared_dead"
    BAD_ROLE = "bad_role"
    BAD_ADDRESS = "bad_address"
    BAD_LEAVE = "bad_leave"
    BAD_SHARD = "bad_shard"
    JOB_RUNNING = "job_running"
    JOB_FULL = "job_full"
    JOB_FAILED = "job_failed"
    UNINITIALIZED = "uninitialized"
    NO_TABLES = "no_tables"
    PEER_REPLACED = "peer_replaced"
    SYNC_ROUND = "sync_round"
    SYNC_DUPLICATE = "sync_duplicate"
    SYNC_PARTIAL = "sync_partial"
    SSP_CLOCK = "ssp_clock"
    STOPPING = "stopping"  # a sync push after a graceful stop ended the rounds (a worker left): not applied
    # replication: a message from a primary or a backup that does not fit the stream
    REPLICA_ORDER = "replica_order"  # a sequence number out of order (a gap)
    REPLICA_DUPLICATE = "replica_duplicate"  # a sequence number already held
    REPLICA_RANK = "replica_rank"  # state or updates for another rank than this link's
    # a stream batch's push that starts after the last offset this server applied of its partition
    # (a server restored from a checkpoint, or a push lost with a dead peer): the worker rewinds
    STREAM_GAP = "stream_gap"


# -- shared field schemas (one definition of each check) -------------------------------------------
NAME = Str(64)  # a node's name (worker-0, server-1.2)
COUNT = Int(0)  # a non-negative counter
SECONDS = Num(0.0, 1e12)
POSITION = List(Int(0), length=3)  # [epoch, shard, examples of the shard done]
REST = Plain(max_depth=3, max_items=512, max_str=256)  # fields a newer node may add: bounded, never read
# A node's free-form figures (stats): kept in summary.json, never read as numbers; NaN allowed.
FIGURES = Plain(max_depth=8, max_items=1 << 20, max_str=4096, finite=False)
# A gradient's (or delta's) largest magnitude a server applies: with |g| at most this, weights
# at most F32_MAX / this and the job's learning rates, no update rule reaches Inf.
MAX_GRADIENT = 1e15
WEIGHT = Num(0.0, 1e12, lo_open=True)  # a push's weight (examples it covers), finite as float32

PROGRESS = Record({
    # workers
    "steps": COUNT, "examples": COUNT, "examples_per_s": SECONDS, "compute_s": SECONDS, "push_s": SECONDS,
    "pull_wait_s": SECONDS, "bytes_sent": COUNT, "bytes_received": COUNT, "position": POSITION,
    "shard": List(Int(0), length=2), "loss": Num(f32=True),
    # online learning: prequential score counts per bin, [non-clicks, clicks] (stream/prequential.py)
    "prequential_counts": List(List(COUNT, 1024), length=2),
    # servers
    "pushes": COUNT, "pulls": COUNT, "bytes_in": COUNT, "bytes_out": COUNT, "staleness_mean": Num(0.0, 1e18),
    "staleness_max": COUNT, "rejected": COUNT, "apply_s": SECONDS, "version": COUNT,
}, rest=REST)

STATS = Record({
    "steps": COUNT, "examples": COUNT, "pushes": COUNT, "dropped_pushes": COUNT, "train_s": SECONDS,
    "compute_s": SECONDS, "push_s": SECONDS, "wait_s": SECONDS, "examples_per_s": SECONDS,
    "final_loss": Num(f32=True), "bytes_sent": COUNT, "bytes_received": COUNT,
    "wire": Dict(Str(16), Dict(Str(16), COUNT, 16), 4),
    "curve": List(List(Num(), length=3), 1 << 20),
    "state": Str(16),
    # online learning (a stream): what the coordinator's summary adds up
    "online": Record({"events": COUNT, "malformed": COUNT,
                      "prequential": Record({"events": COUNT, "auc": Num(), "logloss": Num()}, rest=FIGURES)}, rest=FIGURES),
}, rest=FIGURES)

SERVER_STATS = Record({
    "staleness_histogram": Dict(Str(20, pattern=r"[0-9]+"), COUNT, 1 << 20),
}, rest=FIGURES)

EVAL = Record({
    "test_accuracy": Num(0.0, 1.0), "test_loss": Num(f32=True), "test_examples": COUNT,
    "test_auc": Num(0.0, 1.0), "test_logloss": Num(f32=True), "optimum_auc": Num(0.0, 1.0),
    "optimum_logloss": Num(f32=True), "test_auc_undefined": Str(256), "test_loss_undefined": Str(256),
    "test_logloss_undefined": Str(256),
}, rest=REST)

SHA256 = Str(64, pattern=r"[0-9a-f]{64}")
FILE = Str(128, pattern=SAFE_NAME)  # a file inside a checkpoint folder: no path
CHECKPOINT_NAME = Str(128, pattern=SAFE_NAME)
CHECKPOINT_REPORT = Record({
    "name": CHECKPOINT_NAME, "file": FILE, "sha256": SHA256, "bytes": COUNT, "version": COUNT,
    "positions": Dict(NAME, POSITION, 1 << 16), "write_s": SECONDS, "missed": Bool(), "error": Str(4096),
    "sparse": Record({"file": FILE, "sha256": SHA256, "bytes": COUNT}, required=("file", "sha256", "bytes")),
    "needs": List(CHECKPOINT_NAME, 1 << 16),
}, required=("name",), rest=REST)

REPORTS: dict[str, Schema] = {
    "eval": EVAL,
    "error": Record({"error": Str(4096)}, rest=REST),
    "checkpoint": CHECKPOINT_REPORT,
    "server": SERVER_STATS,
}

_NODE = {"node": NAME}
_PULL_CODEC = Tuple(Str(16), Int(1, 1 << 24))  # [codec, bucket]: the server takes only the job's compression.pull
_SHM = Tuple(Str(128), Int(1, 1 << 40))  # [slot name, values]
_INTO = Tuple(Str(128), Int(0, 1 << 40), Int(1, 1 << 40))  # [slot name, first value, values]: where a reply's values go
# A worker's count of its requests that change this server's state (pushes; SPARSE): a replay after
# a failover repeats it, so the promoted primary applies each exactly once.
SEQ = Int(1)
KEYS = List(Int(0, (1 << 31) - 1), 1 << 24)  # the server's limit (cluster.max_keys_per_request) applies after

COUNTERS = Record({"steps": COUNT, "examples": COUNT, "pushes": COUNT}, required=("steps", "examples"))

REQUESTS: dict[Op, Record] = {
    Op.REGISTER: Record({**_NODE, "role": Str(16), "rank": Int(0, 1 << 20), "address": Str(512), "host": Str(256),
                         "pid": Int(0, 1 << 40), "hosted_by": NAME}, required=("role",), rest=REST),
    # restoring: a server still loading its checkpoint (alive, not serving yet; coordinator/membership.py).
    Op.HEARTBEAT: Record({**_NODE, "progress": PROGRESS, "metrics": Str(255), "restoring": Bool()}, required=("node",), rest=REST),
    Op.BARRIER: Record({**_NODE, "name": Str(64)}, required=("node", "name"), rest=REST),
    # done: the shard this worker just finished, as SHARD_DONE reports it (one request instead of two).
    # progress: the worker's steps and examples when it finished that shard (counted from then on).
    Op.NEXT_SHARD: Record({**_NODE, "done": POSITION, "progress": COUNTERS}, required=("node",), rest=REST),
    Op.SHARD_DONE: Record({**_NODE, "epoch": COUNT, "shard": COUNT, "examples": COUNT, "progress": COUNTERS},
                          required=("node", "epoch", "shard"), rest=REST),
    # buffers: the names of the model's buffers its tensor frames hold, in order (models/buffers.py).
    Op.WORKER_DONE: Record({**_NODE, "stats": STATS, "buffers": List(Str(1024), 1 << 16)}, required=("node",), rest=REST),
    Op.REPORT: Record({**_NODE, "kind": Str(16, choices=tuple(REPORTS)), "data": Plain(max_depth=6, max_items=1 << 18)},
                      required=("node", "kind"), rest=REST),
    Op.STATUS: Record(_NODE, rest=REST),
    Op.ABORT: Record({**_NODE, "reason": Str(4096)}, required=("reason",), rest=REST),
    Op.LEAVE: Record({**_NODE, "position": POSITION, "stats": STATS}, required=("node",), rest=REST),
    Op.INIT: Record({"keys": KEYS, "shm": _SHM}, required=("keys",), rest=REST),
    Op.PULL: Record({"keys": KEYS, "pq": _PULL_CODEC, "shm": _SHM, "into": _INTO}, required=("keys",), rest=REST),
    Op.PUSH: Record({"keys": KEYS, "version": COUNT, "weight": WEIGHT, "clock": Int(1), "delta": Bool(),
                     "kv": List(COUNT, 1 << 24), "pos": POSITION, "from": COUNT, "seq": SEQ, "pq": _PULL_CODEC, "shm": _SHM,
                     "into": _INTO,
                     "enc": List(Tuple(Str(16), Dict(Str(8), Plain(max_depth=0, max_str=16), 16), Int(0, 64)), 1 << 24)},
                    required=("keys", "version"), rest=REST),
    # clock: the number of the dense push whose step produced the rows' gradients it carries (an
    # async checkpoint's cut holds it as it holds that push: server/snapshot.py).
    Op.SPARSE: Record({"tables": List(Tuple(Str(128), COUNT, COUNT), 1024),
                       "peek": Bool(), "seq": SEQ, "pos": POSITION, "from": COUNT, "clock": Int(1)}, required=("tables",), rest=REST),
    Op.MARKS: Record({"shard": List(COUNT, length=2)}, required=("shard",), rest=REST),
}
REQUESTS[Op.PUSHPULL] = REQUESTS[Op.PUSH]
REQUESTS[Op.REPLICA_HELLO] = Record({"rank": Int(0, 1 << 20), **_NODE}, required=("rank", "node"), rest=REST)
REQUESTS[Op.REPLICA_ACK] = Record({"rank": Int(0, 1 << 20), "seq": COUNT, **_NODE}, required=("rank", "seq", "node"), rest=REST)
# A primary's stream, checked by the backup (it replays the forwarded request ``m`` through the
# same validation as a worker's request).
REPLICA_STREAM = {
    Op.REPLICATE: Record({"rank": Int(0, 1 << 20), "seq": Int(1), "peer": Str(128), "op": Int(0, 255),
                          "m": Plain(max_depth=4, max_items=1 << 24, max_str=256)}, required=("rank", "seq", "peer", "op", "m")),
    Op.REPLICA_STATE: Record({"rank": Int(0, 1 << 20), "seq": COUNT, "info": Plain(max_depth=4, max_items=1 << 20, max_str=4096)},
                             required=("rank", "seq", "info")),
}


# The mappings of a request a node keeps (a worker's progress and stats, a report's data): a field
# set to None there is absent (a Record's rule), so it is dropped before anyone reads the mapping.
_KEPT = {Op.HEARTBEAT: ("progress",), Op.LEAVE: ("stats",), Op.WORKER_DONE: ("stats",), Op.REPORT: ("data",)}


def validate(op: Op, meta: Any) -> None:
    """Check a request's meta against its op's schema; :class:`SchemaError` names the field. The
    mappings a node keeps lose their None-valued fields (``meta`` is changed in place)."""
    schema = REQUESTS.get(op)
    if schema is not None:
        schema.check(meta, "meta")
        for name in _KEPT.get(op, ()):
            if type(meta.get(name)) is dict:
                meta[name] = drop_none(meta[name])


def report_data(kind: str, data: Any) -> None:
    """Check a REPORT's data against its kind's schema."""
    REPORTS[kind].check(data if data is not None else {}, f"meta.data ({kind})")


def valid(schema: Schema, value: Any) -> bool:
    try:
        schema.check(value, "value")
        return True
    except SchemaError:
        return False


__all__ = ["Code", "F32_MAX", "MAX_GRADIENT", "PROGRESS", "REQUESTS", "STATS", "validate", "report_data", "valid"]
