"""SparseClient: a worker's side of the sparse tables (the row source of its SparseEmbedding modules).

One batch, as the worker sees it::

    forward: each SparseEmbedding asks unique(IDs): the batch's IDs made unique once and grouped
             by server (a Plan, shared by the tables read from the same IDs), then rows(table, keys)
        -> one SPARSE request per server holding any of the IDs, carrying also the summed
           gradients of the previous batch still waiting for that server (push, then pull)
    backward: autograd sums each unique ID's gradient into its row
    after_backward(): those gradients wait, split by server (slices of the gradient), for the next request

so a steady-state step costs one sparse round trip per server per table call, and a push
never needs a message of its own. :meth:`SparseClient.flush` sends what is still waiting
(at the end of training, before an evaluation).

**Rows pulled a batch ahead** (``sparse.prefetch``, on by default in async jobs): before a step,
the trainer names the batch after it (:meth:`SparseClient.prepare`), and that batch's rows of
every table the last forward read straight from one of its inputs go out at once, all tables in
one request per server (carrying the pushes waiting for it). The step's forward then finds its
rows already pulled (or arriving) while its own compute hides the next batch's round trip::

    prepare(batch t, batch t+1): SPARSE to each server: [push: batch t-1's gradients] + [pull: batch t+1's rows, every table]
    forward t: rows of batch t from the request sent a step earlier
    backward t; after_backward(): batch t's gradients wait for the request of batch t+2

The rows a batch trains on then miss the update of the batch just before it (one step more
staleness, as ``training.overlap`` adds for the dense values); every gradient is still pushed
exactly once. A pull sent ahead for a batch that is then not trained (training stopped before
it) was a sighting for row admission all the same; its pushes were applied. Sync and SSP jobs
never pull ahead (their rows are those of the last round, as without the pipeline).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from downpour.errors import ProtocolError, RemoteError, RequestTimeout
from downpour.layout import Layout
from downpour.nn import merge_row_grads
from downpour.protocol import Message, Op
from downpour.protocol.rpc import RpcClient
from downpour.worker.sparse_plan import Ahead, Inputs, Plan, as_tensors, make_plan, same_tensor

_HEADER = 64  # rough bytes of a request header per table, for the wire counters
_NO_KEYS = np.zeros(0, np.int64)


class SparseClient:
    def __init__(self, rpc: RpcClient, layout: Layout, server_peers: dict[int, str], wire: dict[str, Counter[str]] | None = None,
                 replay: bool = False, clock: Callable[[], int] | None = None) -> None:
        """``replay``: the servers keep backups; a request whose server was replaced meanwhile (a
        backup took over) is sent again as it was, pushes included, and the new primary applies
        its pushes unless it holds them already (``meta.seq``, counted per server). ``clock``: the
        number the worker's next dense push will carry (its ``meta.clock``); a request carrying
        row gradients says the push of the step they came from (``meta.clock``), so that a
        checkpoint's cut holds them as it holds that push (server/snapshot.py)."""
        self.rpc, self.layout, self.peers = rpc, layout, server_peers
        self.replay = replay
        self.clock = clock
        self._clocks: dict[int, int] = {}  # server -> the push number of the gradients waiting for it
        self.seq: dict[int, int] = {}
        self._unanswered: dict[int, tuple[int, Message]] = {}  # request id -> (server, request), for replay
        self.replayed = 0
        self.num_servers = layout.num_servers
        # server -> table -> (unique IDs, summed gradients) waiting to be pushed
        self.pending: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.fetched: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # this batch's rows that need gradients
        self.wire = wire if wire is not None else {"push": Counter(), "pull": Counter()}
        self.requests = 0
        self.wait_s = 0.0  # waiting for SPARSE answers
        self.ids_pulled = 0
        self.ids_pushed = 0
        self.sent: list = []  # push-only requests sent by send_pending, not yet answered
        self.gaps = 0  # stream pushes a server refused as starting after its mark (the worker rewinds)
        # Plans (sparse_plan.py): the last one made on demand; the server split of each key tensor
        # handed out for this batch (id(keys) -> (keys, bounds)), for after_backward.
        self._last: Plan | None = None
        self._bounds: dict[int, tuple[torch.Tensor, Plan]] = {}
        self.grouped = False  # plans group their keys by server (set by the pipeline: see prepare)
        # The pipeline (sparse.prefetch): the batch being trained and the rows pulled ahead for it
        # and for the batch after it; which table the last forward read from which input.
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._now: Ahead | None = None
        self._next: Ahead | None = None
        self._reads: list[tuple[str, int, int | None]] = []  # (table, dim, input) read by the forward under way
        self._trace: list[tuple[str, int, int | None]] = []  # ... by the last complete one
        self.reads_ahead = 0  # table reads served by rows pulled ahead
        self.ahead_dropped = 0  # batches pulled ahead and not used (rows dropped; their pushes applied)

    # -- RowSource -----------------------------------------------------------------------------
    def unique(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat int64 ``ids`` made unique: (keys, inverse) with ``ids == keys[inverse]``, the keys
        grouped by server. The same IDs asked again (another table read from them, or a batch
        pulled ahead) get the same answer without sorting them again."""
        for ahead in (self._now, self._next):
            if ahead is not None:
                for _, plan in ahead.tables.values():
                    if plan.made_from(ids):
                        return plan.keys, plan.inverse
        if self._last is None or not self._last.made_from(ids):
            self._last = make_plan(ids, self.num_servers, self.layout.sparse_servers, self.grouped, self._input_index(ids))
        return self._last.keys, self._last.inverse

    def _input_index(self, ids: torch.Tensor) -> int | None:
        for i, x in enumerate(self._inputs):
            if x.dtype == torch.int64 and x.is_contiguous() and same_tensor(x.reshape(-1), ids):
                return i
        return None

    def _plan_of(self, keys: torch.Tensor) -> Plan | None:
        for ahead in (self._now, self._next):
            if ahead is not None:
                for _, plan in ahead.tables.values():
                    if plan.keys is keys:
                        return plan
        return self._last if self._last is not None and self._last.keys is keys else None

    def rows(self, table: str, keys: torch.Tensor, dim: int, train: bool) -> torch.Tensor:
        self._settle_sent()
        if not train and (self.pending or self._now or self._next):  # a read-only pull must not carry pushes: send them first
            self.flush()
        plan = self._plan_of(keys)
        if train:
            self._reads.append((table, dim, plan.source if plan is not None else None))
        if train and self._now is not None and self._now.serves(table, keys):
            out = self._take_ahead(table, dim)
        else:
            out = self._pull(table, keys.numpy(), dim, train, plan)
        self.ids_pulled += len(keys)
        t = torch.from_numpy(out)
        if train:
            t.requires_grad_(True)
            self.fetched.append((table, keys, t))
            if plan is not None:
                self._bounds[id(keys)] = (keys, plan)
        return t

    def _pull(self, table: str, k: np.ndarray, dim: int, train: bool, plan: Plan | None) -> np.ndarray:
        """Rows of ``k`` now: one request per server holding some (with its waiting pushes).
        Requests pulled ahead are answered first, so that after a failover the replacement gets
        the replayed requests, and applies their pushes, in the order they were sent (it would
        apply them in any order, once each: server/replays.py)."""
        self._settle_ahead(self._now)
        self._settle_ahead(self._next)
        if plan is None:
            k = np.ascontiguousarray(k, dtype=np.int64)
            order, bounds = self._split(k)
        futures = []
        for s in range(self.num_servers):
            idx = plan.part(s) if plan is not None else order[bounds[s] : bounds[s + 1]]
            part = k[idx]
            if len(part) or (train and s in self.pending):
                pulls = {table: (dim, part)}
                futures.append((s, idx, pulls, self._send(s, pulls, peek=not train)))
        out = np.empty((len(k), dim), dtype=np.float32)
        for s, idx, pulls, (fut, ats) in futures:
            reply, ats = self._result(s, fut, ats, pulls, not train)
            out[idx] = self._rows_of(reply, ats, table, dim, len(pulls[table][1]), fut.peer)
        return out

    def _rows_of(self, reply: Message, ats: dict[str, int], table: str, dim: int, n: int, peer: str) -> np.ndarray:
        at = ats.get(table, len(reply.tensors))
        rows = reply.tensors[at] if at < len(reply.tensors) else None
        if rows is None or tuple(rows.shape) != (n, dim) or rows.dtype != torch.float32:
            got = "nothing" if rows is None else f"{rows.dtype} {tuple(rows.shape)}"
            raise ProtocolError(f"{peer} answered a pull of {n} rows of {table!r} (dim {dim}) with {got}")
        self.wire["pull"]["values"] += n * dim * 4
        return rows.numpy()

    def _result(self, server: int, fut, ats: dict[str, int], pulls: dict[str, tuple[int, np.ndarray]], peek: bool,
                attempts: int = 5) -> tuple[Message, dict[str, int]]:
        """The reply to a SPARSE request; if its server was replaced meanwhile (or died and did not
        answer), the pulls are sent again, to the replacement (the pushes it carried are lost with
        the old process, as everything since the checkpoint the replacement loaded)."""
        for attempt in range(attempts):
            w0 = time.perf_counter()
            try:
                reply = fut.result()
                self._unanswered.pop(fut.req_id, None)
                return reply, ats
            except (RemoteError, RequestTimeout) as err:
                if attempt == attempts - 1 or (isinstance(err, RemoteError) and err.code != "peer_replaced"):
                    raise
                again = self._again(fut, err)
                fut, ats = (again, ats) if again is not None else self._send(server, pulls, peek)
            finally:
                self.wait_s += time.perf_counter() - w0
        raise AssertionError("unreachable")

    def _split(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A permutation grouping ``keys`` by server, and where each server's group starts."""
        if self.num_servers == 1:
            return np.arange(len(keys)), np.array([0, len(keys)])
        srv = self.layout.sparse_servers(keys)
        order = np.argsort(srv, kind="stable")
        return order, np.concatenate([[0], np.cumsum(np.bincount(srv, minlength=self.num_servers))])

    def _send(self, server: int, pulls: dict[str, tuple[int, np.ndarray]], peek: bool, stream: dict | None = None):
        """One SPARSE request: this server's waiting pushes (every table) and the pulls (table ->
        (dim, IDs); none: pushes only). Returns the future and, per pulled table, the index of its
        rows among the reply's tensors. ``stream``: the stream batch the pushes are of ({"pos",
        "from"}; sent even with no rows)."""
        pushes = self.pending.pop(server, {}) if not peek else {}
        clock = self._clocks.pop(server, None) if pushes else None
        if clock is None and stream is not None and self.clock is not None:  # a stream batch's mark moves with its push
            clock = self.clock()
        names = list(pushes) + [t for t in pulls if t not in pushes]
        if not names and stream is not None:  # no rows for this server: the request still moves its mark
            first = self.layout.tables[0]
            names, pulls = [first.name], {first.name: (first.dim, _NO_KEYS)}
        spec, tensors, ats = [], [], {}
        for i, name in enumerate(names):
            if name in pushes:
                keys, grads = pushes[name]
            else:
                keys, grads = _NO_KEYS, np.zeros((0, pulls[name][0]), np.float32)
            q = pulls[name][1] if name in pulls else _NO_KEYS
            if name in pulls:
                ats[name] = i
            spec.append([name, len(keys), len(q)])
            tensors += [torch.from_numpy(keys), torch.from_numpy(grads), torch.from_numpy(q)]
            self.wire["push"]["indices"] += keys.nbytes
            self.wire["push"]["values"] += grads.nbytes
            self.wire["pull"]["indices"] += q.nbytes
            self.ids_pushed += len(keys)
        self.wire["push"]["headers"] += _HEADER * len(spec)
        meta: dict = {"tables": spec, "peek": True} if peek else {"tables": spec}
        if stream is not None:
            meta.update(stream)
        if clock is not None:
            meta["clock"] = clock
        if not peek:
            self.seq[server] = meta["seq"] = self.seq.get(server, 0) + 1
        self.requests += 1
        fut = self.rpc.request(self.peers[server], Message(Op.SPARSE, meta=meta, tensors=tensors))
        if self.replay and not peek:
            self._unanswered[fut.req_id] = (server, Message(Op.SPARSE, meta=meta, tensors=tensors))
        return fut, ats

    def _again(self, fut, err: Exception):
        """After ``peer_replaced``: the same request (same ``seq``) to the server's new process
        (None: not kept for replay; the caller sends a new pull)."""
        kept = self._unanswered.pop(fut.req_id, None)
        if kept is None or not (isinstance(err, RemoteError) and err.code == "peer_replaced"):
            return None
        server, msg = kept
        self.replayed += 1
        again = self.rpc.request(self.peers[server], Message(Op.SPARSE, meta=msg.meta, tensors=msg.tensors))
        self._unanswered[again.req_id] = (server, msg)
        return again

    # -- rows a batch ahead ------------------------------------------------------------------
    def prepare(self, now: Inputs, after: Inputs | None) -> None:
        """Before a training step on batch ``now``: send the pull of batch ``after``'s rows (the
        step after this one; None: there is none, or it is not known yet), for every table the
        last forward read straight from one of its inputs, one request per server carrying that
        server's waiting pushes. Rows pulled ahead for another batch than ``now`` are dropped.
        From the first call on, plans group their keys by server (rows and pushes move as slices)."""
        self.grouped = True
        self._inputs = as_tensors(now)
        if self._reads:
            self._trace, self._reads = self._reads, []
        self._drop(self._now)
        ahead, self._next = self._next, None
        self._now = ahead if ahead is not None and ahead.of(self._inputs) else self._drop(ahead)
        if after is None:
            return
        inputs = as_tensors(after)
        once = Counter(table for table, _, _ in self._trace)
        plans: dict[int, Plan] = {}
        tables: dict[str, tuple[int, Plan]] = {}
        for table, dim, i in self._trace:
            if i is None or once[table] > 1 or i >= len(inputs) or inputs[i].dtype != torch.int64:
                continue  # read from derived IDs, or twice: pulled when the forward asks
            if i not in plans:
                plans[i] = make_plan(inputs[i].reshape(-1), self.num_servers, self.layout.sparse_servers, True, i)
            tables[table] = (dim, plans[i])
        if not tables:
            return
        self._settle_sent()
        ahead = Ahead(tables)
        for s in range(self.num_servers):
            pulls = {table: (dim, plan.keys.numpy()[plan.part(s)]) for table, (dim, plan) in tables.items()}
            if any(len(q) for _, q in pulls.values()) or s in self.pending:
                ahead.pulls[s] = pulls
                ahead.requests[s] = self._send(s, pulls, peek=False)
        self._next = ahead

    def _settle_ahead(self, ahead: Ahead | None) -> None:
        """Wait for every reply of ``ahead`` (a failed request is sent again, as a pull is)."""
        if ahead is None:
            return
        while ahead.requests:
            s, (fut, ats) = ahead.requests.popitem()
            ahead.replies[s] = self._result(s, fut, ats, ahead.pulls[s], False)

    def _take_ahead(self, table: str, dim: int) -> np.ndarray:
        """The rows of ``table`` pulled ahead for this batch, as one [keys, dim] block."""
        ahead = self._now
        assert ahead is not None
        self._settle_ahead(ahead)
        _, plan = ahead.tables.pop(table)
        out = np.empty((len(plan.keys), dim), dtype=np.float32)
        for s, (reply, ats) in ahead.replies.items():
            if plan.size(s):
                out[plan.part(s)] = self._rows_of(reply, ats, table, dim, plan.size(s), self.peers[s])
        if not ahead.tables:
            self._now = None
        self.reads_ahead += 1
        return out

    def _drop(self, ahead: Ahead | None) -> None:
        """Forget rows pulled ahead that will not be used; their requests are settled as pushes are
        (what they pushed stays applied)."""
        if ahead is None:
            return None
        self.ahead_dropped += bool(ahead.tables)
        self.sent += [fut for fut, _ in ahead.requests.values()]
        ahead.requests.clear()
        return None

    def after_backward(self) -> None:
        """Queue this batch's row gradients (summed per unique ID) for the servers that hold them.
        Keys of a plan are grouped by server already: each server's share is a slice (a view)."""
        bounds_of, self._bounds = self._bounds, {}
        clock = self.clock() if self.clock is not None else None
        for s in [s for s, c in self._clocks.items() if c != clock and s in self.pending]:
            # still waiting from an earlier push's step (its batch's rows were all pulled ahead): sent
            # now, so that no request mixes the gradients of two pushes (each is held by its own)
            self.sent.append(self._send(s, {}, False)[0])
        for table, keys, grad in merge_row_grads(self.fetched):
            k, g = keys.numpy(), grad.numpy()
            kept = bounds_of.get(id(keys))
            plan = kept[1] if kept is not None and kept[0] is keys else None
            order, bounds = (None, plan.bounds) if plan is not None else self._split(k)
            for s in range(self.num_servers):
                if bounds[s + 1] == bounds[s]:
                    continue
                idx = plan.part(s) if plan is not None else order[bounds[s] : bounds[s + 1]]
                waiting = self.pending.setdefault(s, {})
                old = waiting.get(table)
                waiting[table] = (k[idx], g[idx]) if old is None else _sum_rows(old[0], old[1], k[idx], g[idx])
                if clock is not None:
                    self._clocks[s] = clock
        self.fetched = []

    def send_pending(self, position: list[int] | None = None, start: int | None = None) -> None:
        """Send every waiting gradient now (one push-only request per server) without waiting;
        the answers are collected before the next request that needs them. With a stream batch's
        ``position`` and ``start`` (its offsets (start, position[2]]), every server gets one, rows
        or not, and applies it once (servers answer a gap with ``stream_gap``: :attr:`gaps`)."""
        if position is not None and start is not None:
            stream = {"pos": position, "from": start}
            self.sent += [self._send(s, {}, False, stream)[0] for s in range(self.num_servers)]
            return
        self.sent += [self._send(server, {}, False)[0] for server in sorted(self.pending)]

    def _settle_sent(self) -> None:
        sent, self.sent = self.sent, []
        w0 = time.perf_counter()
        for fut in sent:
            for _ in range(5):
                try:
                    fut.result()
                    break
                except (RemoteError, RequestTimeout) as err:  # a replaced server: lost with it, as any push since its checkpoint
                    if isinstance(err, RemoteError) and err.code == "stream_gap":  # not applied: the stream rewinds
                        self.gaps += 1
                        self._unanswered.pop(fut.req_id, None)
                        fut = None
                        break
                    if isinstance(err, RemoteError) and err.code != "peer_replaced":
                        raise
                    fut = self._again(fut, err)  # (unless a backup took over: then sent again)
                    if fut is None:
                        break
            if fut is not None:
                self._unanswered.pop(fut.req_id, None)
        self.wait_s += time.perf_counter() - w0

    def flush(self) -> None:
        """Push every waiting gradient now (one request per server) and wait for the answers, those
        of rows pulled ahead included (their rows are kept for their batch)."""
        self._settle_sent()
        self._settle_ahead(self._now)
        self._settle_ahead(self._next)
        self.sent = [self._send(server, {}, False)[0] for server in sorted(self.pending)]
        self._settle_sent()

    def stats(self) -> dict[str, float]:
        return {"requests": self.requests, "ids_pulled": self.ids_pulled, "ids_pushed": self.ids_pushed, "wait_s": self.wait_s,
                "reads_ahead": self.reads_ahead, "ahead_dropped": self.ahead_dropped}


def _sum_rows(k1: np.ndarray, g1: np.ndarray, k2: np.ndarray, g2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two sets of (unique IDs, gradient rows) as one, gradients of shared IDs summed."""
    keys, inverse = np.unique(np.concatenate([k1, k2]), return_inverse=True)
    grads = np.zeros((len(keys), g1.shape[1]), dtype=np.float32)
    np.add.at(grads, inverse, np.concatenate([g1, g2]))
    return keys, grads

