"""The typed messages Downpour nodes exchange.

Every message is ``(op, req_id, meta, tensors)``: ``op`` says what it is,
``req_id`` pairs a reply with its request, ``meta`` is a small mapping of plain
values (msgpack), and ``tensors`` travel as raw buffers in frames of their own.
Replies reuse the request's ``req_id`` with ``op`` :attr:`Op.OK` or
:attr:`Op.ERROR`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch


class Op(IntEnum):
    # node -> coordinator
    REGISTER = 1  # meta: role, address (servers), host, pid -> OK: rank, node, job, layout
    HEARTBEAT = 2  # meta: node, progress, restoring? -> OK: stop?
    BARRIER = 3  # meta: node, name -> OK once every live participant arrived
    NEXT_SHARD = 4  # meta: node, done? ([epoch, shard, examples]: as SHARD_DONE) -> OK: shard (or none left)
    SHARD_DONE = 5  # meta: node, epoch, shard, examples
    WORKER_DONE = 6  # meta: node, stats -> OK once every worker is done: evaluator?
    REPORT = 7  # meta: node, test metrics
    STATUS = 8  # -> OK: job status snapshot (launcher, `downpour status`)
    LEAVE = 9  # meta: node, position, stats: a worker leaves a running job cleanly
    # launcher -> coordinator: the job failed where the coordinator cannot see it (every worker process
    # died and none is left to start); meta: reason, node -> OK. The coordinator fails the job with it.
    ABORT = 10
    # coordinator -> node (sent unprompted on the node's coordinator socket)
    STOP = 20  # meta: reason
    # coordinator -> server
    MEMBERSHIP = 21  # meta: workers (ids whose gradients a sync round waits for)
    SERVER_STATS = 22  # -> OK: stats
    CHECKPOINT = 23  # meta: name, url, at_version (None: now) -> the server REPORTs kind "checkpoint"
    PROMOTE = 24  # meta: ranks (the ranks this server's process takes over: its backups of them, promoted)
    # worker -> server
    INIT = 30  # meta: keys; tensors: values  (first INIT wins)
    PULL = 31  # meta: keys -> OK: version, tensors
    PUSH = 32  # meta: keys, version, weight; tensors: gradients -> OK: version
    PUSHPULL = 33  # PUSH, then reply with the values after the update -> OK: version, tensors
    # meta: tables [[name, n_push, n_pull], ...], peek?; tensors per table: push keys i64 [n_push],
    # push gradients f32 [n_push, dim], pull keys i64 [n_pull] -> OK: per table rows f32 [n_pull, dim]
    SPARSE = 34
    # server <-> server: replication (server/replica.py). A backup's HELLO (meta: rank, node) asks
    # the primary of ``rank`` for its state; the primary answers with REPLICA_STATE (meta: rank,
    # seq, info; one u8 tensor: the state as safetensors), then sends every request that changes
    # its shard as REPLICATE (meta: rank, seq, peer, op, m = the request's meta; its tensors), in
    # order; the backup acknowledges with REPLICA_ACK (meta: rank, seq: the last one it holds).
    REPLICA_HELLO = 35
    REPLICATE = 36
    REPLICA_STATE = 37
    REPLICA_ACK = 38
    # worker -> server: where this server stands in a stream partition (meta: shard [epoch, shard])
    # -> OK: marks {tag: offset}, floor. A tag is a dense push's first key, or "s" for sparse pushes.
    MARKS = 39
    # replies
    OK = 50
    ERROR = 51


REPLY_OPS = frozenset({Op.OK, Op.ERROR})


@dataclass(slots=True)
class Message:
    op: Op
    req_id: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)

    def reply(self, meta: dict[str, Any] | None = None, tensors: list[torch.Tensor] | None = None) -> Message:
        return Message(Op.OK, self.req_id, meta or {}, tensors or [])

    def error(self, code: str, text: str) -> Message:
        return Message(Op.ERROR, self.req_id, {"code": str(code), "error": text})
