"""SparseClient: a worker's side of the sparse tables (the row source of its SparseEmbedding modules).

One batch, as the worker sees it::

    forward: each SparseEmbedding asks rows(table, unique IDs)
        -> one SPARSE request per server holding any of the IDs, carrying also the summed
           gradients of the previous batch still waiting for that server (push, then pull)
    backward: autograd sums each unique ID's gradient into its row
    after_backward(): those gradients wait, split by server, for the next request

so a steady-state step costs one sparse round trip per server per table call, and a push
never needs a message of its own. :meth:`SparseClient.flush` sends what is still waiting
(at the end of training, before an evaluation).
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch

from downpour.errors import ProtocolError, RemoteError, RequestTimeout
from downpour.layout import Layout
from downpour.nn import merge_row_grads
from downpour.protocol import Message, Op
from downpour.protocol.rpc import RpcClient

_HEADER = 64  # rough bytes of a request header per table, for the wire counters


class SparseClient:
    def __init__(self, rpc: RpcClient, layout: Layout, server_peers: dict[int, str], wire: dict[str, Counter[str]] | None = None,
                 replay: bool = False) -> None:
        """``replay``: the servers keep backups; a request whose server was replaced meanwhile (a
        backup took over) is sent again as it was, pushes included, and the new primary applies
        its pushes unless it holds them already (``meta.seq``, counted per server)."""
        self.rpc, self.layout, self.peers = rpc, layout, server_peers
        self.replay = replay
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

    # -- RowSource -----------------------------------------------------------------------------
    def rows(self, table: str, keys: torch.Tensor, dim: int, train: bool) -> torch.Tensor:
        self._settle_sent()
        if not train and self.pending:  # a read-only pull must not carry pushes: send them first
            self.flush()
        k = np.ascontiguousarray(keys.numpy(), dtype=np.int64)
        order, bounds = self._split(k)
        futures = []
        for s in range(self.num_servers):
            part = k[order[bounds[s] : bounds[s + 1]]]
            if len(part) or (train and s in self.pending):
                futures.append((s, self._send(s, table, dim, part, peek=not train)))
        out = np.empty((len(k), dim), dtype=np.float32)
        for s, (fut, at) in futures:
            idx = order[bounds[s] : bounds[s + 1]]
            reply, at = self._result(s, fut, at, table, dim, k[idx], not train)
            rows = reply.tensors[at] if at < len(reply.tensors) else None
            if rows is None or tuple(rows.shape) != (len(idx), dim) or rows.dtype != torch.float32:
                got = "nothing" if rows is None else f"{rows.dtype} {tuple(rows.shape)}"
                raise ProtocolError(f"{fut.peer} answered a pull of {len(idx)} rows of {table!r} (dim {dim}) with {got}")
            out[idx] = rows.numpy()
            self.wire["pull"]["values"] += len(idx) * dim * 4
        self.ids_pulled += len(k)
        t = torch.from_numpy(out)
        if train:
            t.requires_grad_(True)
            self.fetched.append((table, keys, t))
        return t

    def _result(self, server: int, fut, at: int, table: str, dim: int, pull: np.ndarray, peek: bool,
                attempts: int = 5) -> tuple[Message, int]:
        """The reply to a SPARSE request; if its server was replaced meanwhile (or died and did not
        answer), the pull is sent again, to the replacement (the pushes it carried are lost with
        the old process, as everything since the checkpoint the replacement loaded)."""
        for attempt in range(attempts):
            w0 = time.perf_counter()
            try:
                reply = fut.result()
                self._unanswered.pop(fut.req_id, None)
                return reply, at
            except (RemoteError, RequestTimeout) as err:
                if attempt == attempts - 1 or (isinstance(err, RemoteError) and err.code != "peer_replaced"):
                    raise
                again = self._again(fut, err)
                fut, at = (again, at) if again is not None else self._send(server, table, dim, pull, peek)
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

    def _send(self, server: int, table: str | None, dim: int, pull: np.ndarray, peek: bool, stream: dict | None = None):
        """One SPARSE request: this server's waiting pushes (every table) and the pull of ``table``
        (None: pushes only). Returns the future and the index of the pulled rows among the reply's tensors.
        ``stream``: the stream batch the pushes are of ({"pos", "from"}; sent even with no rows)."""
        pushes = self.pending.pop(server, {}) if not peek else {}
        spec, tensors = [], []
        names = list(pushes)
        if table is not None and table not in pushes:
            names.append(table)
        if not names and stream is not None:  # no rows for this server: the request still moves its mark
            first = self.layout.tables[0]
            names, table, dim, pull = [first.name], first.name, first.dim, np.zeros(0, np.int64)
        at = 0
        for i, name in enumerate(names):
            keys, grads = pushes[name] if name in pushes else (np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
            q = pull if name == table else np.zeros(0, np.int64)
            if name == table:
                at = i
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
        if not peek:
            self.seq[server] = meta["seq"] = self.seq.get(server, 0) + 1
        self.requests += 1
        fut = self.rpc.request(self.peers[server], Message(Op.SPARSE, meta=meta, tensors=tensors))
        if self.replay and not peek:
            self._unanswered[fut.req_id] = (server, Message(Op.SPARSE, meta=meta, tensors=tensors))
        return fut, at

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

    # -- after backward -----------------------------------------------------------------------
    def after_backward(self) -> None:
        """Queue this batch's row gradients (summed per unique ID) for the servers that hold them."""
        for table, keys, grad in merge_row_grads(self.fetched):
            k, g = keys.numpy(), grad.numpy()
            order, bounds = self._split(k)
            for s in range(self.num_servers):
                idx = order[bounds[s] : bounds[s + 1]]
                if not len(idx):
                    continue
                waiting = self.pending.setdefault(s, {})
                old = waiting.get(table)
                waiting[table] = (k[idx], g[idx]) if old is None else _sum_rows(old[0], old[1], k[idx], g[idx])
        self.fetched = []

    def send_pending(self, position: list[int] | None = None, start: int | None = None) -> None:
        """Send every waiting gradient now (one push-only request per server) without waiting;
        the answers are collected before the next request that needs them. With a stream batch's
        ``position`` and ``start`` (its offsets (start, position[2]]), every server gets one, rows
        or not, and applies it once (servers answer a gap with ``stream_gap``: :attr:`gaps`)."""
        if position is not None and start is not None:
            stream = {"pos": position, "from": start}
            self.sent += [self._send(s, None, 0, np.zeros(0, np.int64), False, stream)[0] for s in range(self.num_servers)]
            return
        self.sent += [self._send(server, None, 0, np.zeros(0, np.int64), False)[0] for server in sorted(self.pending)]

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
        """Push every waiting gradient now (one request per server) and wait for the answers."""
        self._settle_sent()
        self.sent = [self._send(server, None, 0, np.zeros(0, np.int64), False)[0] for server in sorted(self.pending)]
        self._settle_sent()

    def stats(self) -> dict[str, float]:
        return {"requests": self.requests, "ids_pulled": self.ids_pulled, "ids_pushed": self.ids_pushed, "wait_s": self.wait_s}


def _sum_rows(k1: np.ndarray, g1: np.ndarray, k2: np.ndarray, g2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two sets of (unique IDs, gradient rows) as one, gradients of shared IDs summed."""
    keys, inverse = np.unique(np.concatenate([k1, k2]), return_inverse=True)
    grads = np.zeros((len(keys), g1.shape[1]), dtype=np.float32)
    np.add.at(grads, inverse, np.concatenate([g1, g2]))
    return keys, grads

