"""A server's part of a checkpoint: its shard copied at one moment, written in the background,
and read back (by the same server, or by servers of another layout: re-sharding by parameter name).

File format (safetensors: a JSON header, then raw little-endian tensors; never a pickle):

* ``values`` float32 [numel]: the shard's flat values, key after key;
* ``versions`` int64 [keys], ``keys`` int64 [keys], ``lengths`` int64 [keys];
* ``steps`` int64 [keys]: each key's job steps, the clock of lr schedules (older files lack it:
  their versions stand in);
* ``state.<name>`` float32 [numel]: the update rule's state (``momentum_buffer``, ``exp_avg`` ...);
* ``lookahead.<worker>`` float32 [numel]: under ``async_rule: lookahead``, each worker's momentum
  buffer (by worker name, server/lookahead.py), and ``lookahead_sum`` float32 [numel] their sum as
  the server kept it (so replies after a resume are the ones it would have sent);
* metadata ``positions`` (JSON: worker -> [epoch, shard, examples done] of its last push included),
  ``marks`` (JSON: stream partition marks, "epoch:shard:TAG" -> offset; see ParameterServer.marks),
  ``rule``, ``rank``, ``version``.

When the copy is taken: at once (the end of training, a graceful stop's final checkpoint), or at
a cut every server reaches with the same pushes applied:

* sync mode: right after the round that brings the shard to version ``at_version`` is applied.
  Every server of a sync job then holds round ``at_version`` exactly: a worker pushes round v+1
  only after every server answered round v, so no server can apply v+1 before all applied v.
* async and ssp (``at_clock``: worker -> a push number T_w, its ``meta.clock``): the copy holds
  every worker's pushes 1..T_w and none after, on every server. A worker sends push T+1 only once
  every server answered every request of push T (it settles a push before the next, with or
  without ``overlap``), so each server can stop at T_w on its own: it holds
  (does not apply) a push beyond its worker's T_w, and copies once every worker of the cut is
  there (its push T_w applied here whole, or its push T_w+1 held: every request of T_w was
  answered, so all of T_w is in) or has left the membership;
  then the held pushes are applied in the order they came. Pushes of workers not in the cut (one
  that joined since) are held too. A server that applied a push beyond T_w already reports
  ``missed`` and the coordinator asks again further ahead; one that does not reach the cut
  within ``timeout_s`` gives up (reports an error) and applies what it held.

Sparse-table rows are copied at the same moment and hold the same pushes. A worker sends the row
gradients of its step T after its dense push T, in SPARSE requests numbered T (``meta.clock``);
they are held past T_w as pushes are. Push T_w applied here is then not enough (its rows may still
be on their way): with sparse tables a worker of the cut counts as there once a request of it past
T_w (push or rows) is held, or it left. In sync mode, once round ``at_version`` is applied, the cut
becomes each member's push of that round (its rows come with its next step).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from downpour.errors import DataError
from downpour.layout import Layout
from downpour.server.sparse import SparseShard, sparse_file
from downpour.server.store import ShardStore
from downpour.storage import CheckpointStore, Manifest

log = logging.getLogger(__name__)


LOOKAHEAD, LOOKAHEAD_SUM = "lookahead.", "lookahead_sum"  # tensor names: a worker's buffer (prefix), their sum


def shard_file(rank: int) -> str:
    return f"server-{rank}.safetensors"


@dataclass
class Request:
    name: str
    url: str
    keep: int
    at_version: int | None
    asked: float
    committed: str | None = None  # the coordinator's latest committed checkpoint
    full_every: int = 5  # sparse tables: a full base at least every this many checkpoints
    at_clock: dict[str, int] | None = None  # async/ssp: worker -> the last push number in the copy
    timeout_s: float = 120.0  # async/ssp: give up the cut (and release held pushes) after this long
    reached: set[str] = field(default_factory=set)  # workers of at_clock whose push T_w is applied here whole


def _clocks(value: object) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    return {str(w): t for w, t in value.items() if type(t) is int and t >= 0}


class Snapshotter:
    """Takes the copies a coordinator asks for and writes them on a thread of its own."""

    def __init__(self, store: ShardStore, rank: int, rule_name: str, node: str, sparse: SparseShard | None = None) -> None:
        self.store, self.rank, self.rule_name, self.node = store, rank, rule_name, node
        self.sparse = sparse if sparse else None
        self.armed: Request | None = None
        self.reports: queue.Queue[dict[str, Any]] = queue.Queue()
        self.writes = 0
        self.marks: Callable[[], dict[str, int]] = dict  # the server's stream marks (saved with the shard)
        self.members: Callable[[], set[str]] = set  # the workers of the job's membership (empty: not known yet)
        # Per worker: (the number of its last push applied here, whether that request held every key
        # of this shard). Worker clocks start again with each worker process, as this map does on restore.
        self.clocks: dict[str, tuple[int, bool]] = {}
        # Per worker: the highest push number whose row gradients (SPARSE) were applied here.
        self.row_clocks: dict[str, int] = {}

    def request(self, meta: dict[str, Any], positions: dict[str, list[int]]) -> None:
        """A CHECKPOINT from the coordinator (replaces any request not yet taken)."""
        at = meta.get("at_version")
        committed, full_every = meta.get("committed"), meta.get("full_every", 5)
        timeout = meta.get("timeout_s")
        req = Request(str(meta.get("name")), str(meta.get("url")), int(meta.get("keep", 3)),
                      at if isinstance(at, int) else None, time.monotonic(),
                      committed if isinstance(committed, str) else None, full_every if type(full_every) is int and full_every > 0 else 5,
                      _clocks(meta.get("at_clock")), float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else 120.0)
        if req.at_version is not None and self.version() > req.at_version:
            self.reports.put({"name": req.name, "missed": True, "version": self.version()})
            return
        if req.at_clock is not None:
            past = [w for w, t in req.at_clock.items() if max(self.clocks.get(w, (0, True))[0], self.row_clocks.get(w, 0)) > t]
            if past:
                log.info("%s: checkpoint %s: %s already past push %d here", self.node, req.name, past[0], req.at_clock[past[0]])
                self.armed = None  # (an earlier cut no longer holds pushes either: the coordinator asks again)
                self.reports.put({"name": req.name, "missed": True, "version": self.version()})
                return
            if not self.sparse:  # (with rows, only a later request says that every part of T_w is in)
                req.reached = {w for w, t in req.at_clock.items() if self.clocks.get(w, (0, True)) == (t, True)}
        self.armed = req
        self.maybe_take(positions)

    def probe(self, name: str, held: list[tuple[str, object]]) -> None:
        """The coordinator places checkpoint ``name``'s async cut: report the highest push number
        of each worker seen here (a push or rows applied, or a request ``held``: (worker, clock))."""
        seen = {w: c for w, (c, _) in self.clocks.items()}
        for w, c in [*self.row_clocks.items(), *held]:
            if type(c) is int and c > seen.get(w, 0):
                seen[w] = c
        self.reports.put({"name": name, "probe": True, "clocks": seen})

    def version(self) -> int:
        return max(self.store.versions, default=0)

    def holds(self, who: str, clock: object) -> bool:
        """Must push number ``clock`` of worker ``who`` wait until the copy is taken (it is past the cut)?"""
        req = self.armed
        if req is None or req.at_clock is None or type(clock) is not int:
            return False
        target = req.at_clock.get(who)
        if target is None:
            return True  # a worker not in the cut (it joined since): none of its pushes are in it
        if clock > target:
            req.reached.add(who)  # its push T_w+1 is here: every request of T_w was answered, all of it is in
            return True
        return False

    def applied(self, who: str, clock: object, whole: bool) -> None:
        """Push number ``clock`` of ``who`` was applied here (``whole``: that request held every key
        of the shard, so the whole push is in)."""
        if type(clock) is not int:
            return
        self.clocks[who] = (clock, whole)
        req = self.armed
        if req is not None and req.at_clock is not None and req.at_clock.get(who) == clock and whole and not self.sparse:
            req.reached.add(who)

    def rows_applied(self, who: str, clock: object) -> None:
        """A SPARSE request of ``who`` carrying the row gradients of its push ``clock`` was applied here."""
        if type(clock) is int and clock > self.row_clocks.get(who, 0):
            self.row_clocks[who] = clock

    def expired(self, now: float) -> bool:
        """An async cut not reached within its timeout: given up (reported as an error); the caller
        applies the pushes held for it."""
        req = self.armed
        if req is None or req.at_clock is None or now - req.asked <= req.timeout_s:
            return False
        self.armed = None
        waiting = sorted(set(req.at_clock) - req.reached)
        self.reports.put({"name": req.name, "error": f"the checkpoint's cut was not reached within {req.timeout_s:g}s "
                                                     f"(waiting for {', '.join(waiting) or 'nobody'})"})
        return True

    def _due(self, req: Request) -> bool:
        if req.at_version is not None:
            if self.version() < req.at_version:
                return False
            if not self.sparse:
                return True
            # Round at_version is applied, but the workers send its rows' gradients with their next
            # step, after its answer: from here on the cut is each worker's push of that round.
            members = self.members()
            req.at_clock = {w: c for w, (c, _) in self.clocks.items() if not members or w in members}
            req.at_version, req.asked = None, time.monotonic()
        if req.at_clock is not None:
            members = self.members()
            return all(w in req.reached or (members and w not in members) for w in req.at_clock)
        return True

    def maybe_take(self, positions: dict[str, list[int]]) -> bool:
        """Called after every request handled: takes the copy once its moment came (returns whether it did)."""
        req = self.armed
        if req is None or not self._due(req):
            return False
        self.armed = None
        tensors = {
            "values": self.store.data.clone(),
            "versions": torch.tensor(self.store.versions, dtype=torch.int64),
            "keys": torch.tensor(self.store.keys, dtype=torch.int64),
            "lengths": torch.tensor(self.store.lengths, dtype=torch.int64),
            "steps": torch.tensor(self.store.steps, dtype=torch.int64),
        }
        for k, v in self.store.rule.state().items():
            tensors[f"state.{k}"] = v.clone()
        tensors |= lookahead_tensors(self.store)
        meta = {"positions": json.dumps(positions), "rule": self.rule_name, "rank": str(self.rank), "version": str(self.version()),
                "marks": json.dumps(self.marks())}
        sparse = self.sparse.snapshot(req.name, req.committed, req.full_every) if self.sparse is not None else None
        threading.Thread(target=self._write, args=(req, tensors, meta, sparse), name=f"{self.node}-checkpoint", daemon=True).start()
        return True

    def _write(self, req: Request, tensors: dict[str, torch.Tensor], meta: dict[str, str], sparse) -> None:
        t0 = time.monotonic()
        try:
            store = CheckpointStore(req.url, req.keep)
            entry = store.write_file(req.name, shard_file(self.rank), st_save(tensors, metadata=meta))
            extra: dict[str, Any] = {}
            if sparse is not None:  # this server's rows of the sparse tables (a base, or a delta on `needs`)
                arrays, sparse_meta, needs = sparse
                file = sparse_file(self.rank)
                written = store.write_file(req.name, file, st_save(arrays, metadata=sparse_meta))
                self.sparse.written[req.name] = written["sha256"]  # a later delta names it
                extra = {"sparse": {"file": file, **written}, "needs": needs}
            self.writes += 1
            self.reports.put({"name": req.name, "file": shard_file(self.rank), **entry, "version": int(meta["version"]),
                              "positions": json.loads(meta["positions"]), "write_s": time.monotonic() - t0, **extra})
        except Exception as err:  # storage errors of any fsspec backend: report, never kill the server
            log.error("%s: checkpoint %s not written: %s", self.node, req.name, err)
            self.reports.put({"name": req.name, "error": f"{type(err).__name__}: {err}"})

    def finished(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self.reports.get_nowait())
            except queue.Empty:
                return out


def lookahead_tensors(store: ShardStore) -> dict[str, torch.Tensor]:
    """Copies of the per-worker momentum of ``async_rule: lookahead`` and their sum, as named in
    shard files and a backup's state (none without the rule or before any push)."""
    la = store.lookahead
    if la is None or not la.buffers:
        return {}
    return {**{f"{LOOKAHEAD}{who}": v.clone() for who, v in la.state().items()}, LOOKAHEAD_SUM: la.total.clone()}


def bad_lookahead(name: str, t: torch.Tensor, numel: int) -> bool:
    """Is ``name`` a look-ahead tensor (a worker's buffer or their sum) that is not float32 [numel]?"""
    return (name.startswith(LOOKAHEAD) or name == LOOKAHEAD_SUM) and (t.dtype != torch.float32 or tuple(t.shape) != (numel,))


# -- reading ---------------------------------------------------------------------
def load_shard_file(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse and check one shard file: dtypes, shapes and sizes agree with each other."""
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as err:
        raise DataError(f"{where}: not a readable shard file: {err}") from None
    for name, dtype in (("values", torch.float32), ("versions", torch.int64), ("keys", torch.int64), ("lengths", torch.int64)):
        t = tensors.get(name)
        if t is None or t.dtype != dtype or t.dim() != 1:
            raise DataError(f"{where}: {name!r} missing or not a 1-d {dtype} tensor")
    n = tensors["values"].numel()
    if not (tensors["versions"].numel() == tensors["keys"].numel() == tensors["lengths"].numel()):
        raise DataError(f"{where}: keys, versions and lengths differ in length")
    steps = tensors.get("steps")
    if steps is not None and (steps.dtype != torch.int64 or steps.shape != tensors["versions"].shape):
        raise DataError(f"{where}: 'steps' is {steps.dtype} {tuple(steps.shape)}, expected int64 like 'versions'")
    if int(tensors["lengths"].sum()) != n or bool((tensors["lengths"] <= 0).any()):
        raise DataError(f"{where}: key lengths do not add up to the {n} values")
    for k, t in tensors.items():
        if k.startswith("state.") and (t.dtype != torch.float32 or t.shape != (n,)):
            raise DataError(f"{where}: {k!r} is {t.dtype} {tuple(t.shape)}, expected float32 ({n},)")
        if bad_lookahead(k, t, n):
            what = f"the look-ahead momentum of {k[len(LOOKAHEAD):]}" if k != LOOKAHEAD_SUM else "the sum of the look-ahead momentum"
            raise DataError(f"{where}: {what} ({k!r}) is {t.dtype} {tuple(t.shape)}, expected float32 ({n},) like the shard's values")
    if LOOKAHEAD_SUM in tensors and not any(k.startswith(LOOKAHEAD) for k in tensors):
        raise DataError(f"{where}: {LOOKAHEAD_SUM!r} without any 'lookahead.<worker>' buffer")
    return tensors, meta


class OldParams:
    """The parameters of a checkpoint, addressable by name: values, rule state, versions and, with
    ``lookahead`` (not needed to export values), the per-worker look-ahead momentum."""

    def __init__(self, store: CheckpointStore, manifest: Manifest, layout: Layout, lookahead: bool = True) -> None:
        self.layout = layout
        self._params = {p.name: p for p in layout.params}
        files = sorted(f for f in manifest.files if f.startswith("server-"))
        # The layout comes from the checkpoint's job.json: its size may not exceed what the server
        # files hold (4 bytes per value), so an altered layout cannot size a huge allocation.
        held = sum(int(manifest.files[f]["bytes"]) for f in files) // 4
        if layout.numel > held:
            raise DataError(f"{store.where(manifest.name)}: the layout has {layout.numel} values, its files hold at most {held}")
        self.values = torch.zeros(layout.numel)
        self.state: dict[str, torch.Tensor] = {}
        # async_rule: lookahead: worker -> its momentum buffer, and their sum (None: a file lacked it)
        self.lookahead: dict[str, torch.Tensor] = {}
        self.lookahead_sum: torch.Tensor | None = None
        sums_complete = True
        self.key_versions = [0] * len(layout.slices)
        self.key_steps = [0] * len(layout.slices)
        self.positions: list[dict[str, list[int]]] = []
        self.marks: dict[int, dict[str, int]] = {}  # by server rank: its stream marks
        seen = [False] * len(layout.slices)
        for file in files:
            where = store.where(manifest.name, file)
            tensors, meta = load_shard_file(store.read(manifest, file), where)
            self.positions.append(json.loads(meta.get("positions", "{}")))
            self.marks[int(file[len("server-") :].split(".")[0])] = _marks(meta.get("marks", "{}"), where)
            if not lookahead:
                tensors = {k: t for k, t in tensors.items() if not k.startswith(LOOKAHEAD) and k != LOOKAHEAD_SUM}
            elif LOOKAHEAD_SUM not in tensors:
                sums_complete = False
            at = 0
            steps = tensors.get("steps", tensors["versions"]).tolist()
            for key, length, version, step in zip(tensors["keys"].tolist(), tensors["lengths"].tolist(),
                                                  tensors["versions"].tolist(), steps):
                if not 0 <= key < len(layout.slices) or layout.slices[key].length != length:
                    raise DataError(f"{where}: key {key} of length {length} does not fit the checkpoint's layout")
                s = layout.slices[key]
                self.values[s.start : s.stop] = tensors["values"][at : at + length]
                for name, t in tensors.items():
                    if name.startswith("state."):
                        self.state.setdefault(name[6:], torch.zeros(layout.numel))[s.start : s.stop] = t[at : at + length]
                    elif name.startswith(LOOKAHEAD):
                        self.lookahead.setdefault(name[len(LOOKAHEAD) :], torch.zeros(layout.numel))[s.start : s.stop] = t[at : at + length]
                    elif name == LOOKAHEAD_SUM:
                        if self.lookahead_sum is None:
                            self.lookahead_sum = torch.zeros(layout.numel)
                        self.lookahead_sum[s.start : s.stop] = t[at : at + length]
                self.key_versions[key] = version
                self.key_steps[key] = step
                seen[key] = True
                at += length
        if not all(seen):
            missing = [layout.describe(s) for s, ok in zip(layout.slices, seen) if not ok]
            raise DataError(f"{store.where(manifest.name)}: no server file holds {', '.join(missing[:5])}")
        if not sums_complete or not self.lookahead:
            self.lookahead_sum = None  # summed again on restore
        for what, t in [("values", self.values), *self.state.items(),
                        *((f"look-ahead momentum of {who}", t) for who, t in self.lookahead.items()),
                        *([("look-ahead sum", self.lookahead_sum)] if self.lookahead_sum is not None else [])]:
            if not bool(torch.isfinite(t).all()):
                raise DataError(f"{store.where(manifest.name)}: the checkpoint's {what} hold NaN or Inf")

    def marks_for(self, rank: int, num_servers: int) -> tuple[dict[str, int], dict[str, int]]:
        """The stream marks a server of ``rank`` continues from, and the floor of tags it does
        not hold: its own rank's marks when the checkpoint had as many servers; otherwise (its keys
        and rows come from several old servers) no marks and, per partition, the lowest mark any
        old server held as the floor (events after it may then be applied twice to some keys)."""
        if num_servers == self.layout.num_servers and rank in self.marks:
            return dict(self.marks[rank]), {}
        floor: dict[str, int] = {}
        for held in self.marks.values():
            for tag, offset in held.items():
                part = tag.rsplit(":", 1)[0]
                floor[part] = min(floor.get(part, offset), offset)
        if floor:
            log.warning("stream marks: a checkpoint of %d servers restored on %d; each partition resumes at the lowest "
                        "mark, so some events after it may be applied twice", self.layout.num_servers, num_servers)
        return {}, floor

    def param_range(self, name: str) -> tuple[int, int] | None:
        p = self._params.get(name)
        return (p.offset, p.offset + p.numel) if p is not None else None


def _marks(text: str, where: str) -> dict[str, int]:
    try:
        marks = json.loads(text)
    except ValueError:
        marks = None
    if not isinstance(marks, dict) or not all(isinstance(k, str) and k.count(":") == 2 and type(v) is int and v >= 0
                                              for k, v in marks.items()):
        raise DataError(f"{where}: its stream marks are not a mapping of 'epoch:shard:tag' to offsets")
    return marks


def restore_store(store: ShardStore, layout: Layout, old: OldParams, full: bool) -> int:
    """Fill this server's keys from a checkpoint's parameters, by parameter name and element range.

    ``full`` (resume): also the rule's state, the versions and the look-ahead momentum (when both
    the checkpoint and this job's rule have it; a checkpoint without it starts every worker's at
    zero, the workers of a job that does not use it have theirs dropped). Otherwise (warm start) only the
    values; keys of parameters the checkpoint lacks stay uninitialised (a worker INITs them).
    Returns how many keys were filled."""
    state = store.rule.state()
    starts = [p.offset for p in layout.params]
    old_order = sorted((o.start, o.key) for o in old.layout.slices)  # keys need not be in element order
    old_starts = [start for start, _ in old_order]
    la = store.lookahead if full else None
    buffers = {who: torch.zeros(store.numel) for who in old.lookahead} if la is not None else {}
    total = torch.zeros(store.numel) if buffers and old.lookahead_sum is not None else None
    filled = 0
    for i, key in enumerate(store.keys):
        s = layout.slices[key]
        p = layout.params[bisect_right(starts, s.start) - 1]  # the parameter this key is a slice of
        rng = old.param_range(p.name)
        if rng is None:
            continue
        lo = rng[0] + (s.start - p.offset)
        dst = slice(store.offsets[i], store.offsets[i + 1])
        store.data[dst] = old.values[lo : lo + s.length]
        if full:
            for name, t in state.items():
                if name in old.state:
                    t[dst] = old.state[name][lo : lo + s.length]
            for who, t in buffers.items():
                t[dst] = old.lookahead[who][lo : lo + s.length]
            if total is not None:
                total[dst] = old.lookahead_sum[lo : lo + s.length]
            first = max(0, bisect_right(old_starts, lo) - 1)
            covering = [old_order[j][1] for j in range(first, bisect_right(old_starts, lo + s.length - 1))]
            store.versions[i] = max((old.key_versions[k] for k in covering), default=0)
            store.steps[i] = max((old.key_steps[k] for k in covering), default=0)
        store.key_initialized[i] = True
        filled += 1
    store.initialized = all(store.key_initialized)
    if la is not None:
        la.load(buffers, total)
    elif full and old.lookahead:
        log.info("the checkpoint's look-ahead momentum of %d workers is not used: this job's async rule is not lookahead",
                 len(old.lookahead))
    return filled
