"""A worker's side of online learning: train one stream partition (a data shard) event batch
by event batch, scoring each batch before training on it (prequential validation).

The ledger hands out partitions as shards; the shard's ``skip`` is where the partition
resumes (the offset after the last event whose update reached the servers). Each push
carries ``[epoch, partition, offset after its batch]`` as its data position, so a
checkpoint, or the coordinator after this worker died, knows exactly where the partition
stands. The batch's sparse-row gradients are sent before its dense push (both go over the
same ordered connection per server), so a server that applied a position has applied
every row update of the batches up to it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from downpour.errors import ConfigError, RemoteError, RequestTimeout
from downpour.stream import parse_events
from downpour.stream.prefetch import PrefetchReader
from downpour.stream.prequential import Prequential

log = logging.getLogger(__name__)

_LOG_EVERY_S = 10.0  # malformed events are logged at most this often


class OnlineLoop:
    def __init__(self, trainer, dataset, name: str) -> None:
        self.trainer, self.data, self.name = trainer, dataset, name
        self.source = dataset.source
        self.prequential = Prequential()
        self.events = 0
        self.malformed = 0
        self.batches = 0
        self.freshness_lag_s: list[float] = []  # event time to its push, per batch (the newest event)
        self._logged_at = 0.0
        self.started = time.monotonic()
        self.partitions: list[int] = []
        self._scored: dict[int, int] = {}  # per partition: the last offset scored (and counted) here
        self.rewinds = 0  # partitions read again because a server lacked events (stream_gap)

    def _out_of_time(self) -> bool:
        limit = self.data.max_seconds
        return limit is not None and time.monotonic() - self.started >= limit

    def train(self, shard: dict[str, Any]) -> int:
        """Train partition ``shard["shard"]`` from where the servers stand in it; returns the
        shard's whole length when its end marker was reached (the shard is then done), else what
        was trained.

        Where to resume is asked of the servers (:meth:`KVClient.stream_marks`), not taken from
        the ledger's ``skip``: each server knows the last offset of the partition it applied, and
        they may differ (a worker that died between its requests to two servers, a server restored
        from a checkpoint). The partition is read again from the lowest, and every batch ends at
        each of the others, so that a server answers the batches it holds already without applying
        them and applies the rest: each event's update reaches each server once. A server that
        refuses a push as starting after its mark (``stream_gap``: it lost updates since) makes the
        worker settle, ask again and rewind the same way."""
        t = self.trainer
        part, epoch = int(shard["shard"]), int(shard["epoch"])
        self.partitions.append(part)
        after, cuts = self._resume_point(epoch, part, int(shard.get("skip", 0)))
        reader = self._open(part, after)
        where = f"{self.source.spec.url}#{part}"
        log.info("%s: training partition %d after offset %d%s", self.name, part, after,
                 f" (batches cut at {len(cuts)} server marks ahead)" if cuts else "")
        trained = 0
        pushed = after  # the offset the last push ended at: the next one covers (pushed, its last event]
        held: list = []  # events read beyond a cut, for the next batch
        scored = self._scored.get(part, -1)
        gaps = self._gaps()
        try:
            while not t.finished:
                if t.leave.due(t.kv.versions):  # a graceful stop: leave at the settled position
                    t.left = True
                    break
                if self._out_of_time():
                    t.max_steps = t.steps  # finished: the worker reports and the job ends
                    break
                if self._gaps() != gaps:  # a server lacks events this worker pushed after: rewind
                    t._settle()
                    if t.sparse is not None:
                        t.sparse._settle_sent()
                    gaps = self._gaps()
                    after, cuts = self._resume_point(epoch, part, after)
                    reader.close()
                    reader = self._open(part, after)
                    pushed, held = after, []
                    self.rewinds += 1
                    log.warning("%s: a server lacked events of partition %d; reading it again after offset %d", self.name,
                                part, after)
                    continue
                need = self.job_batch - len(held)
                raws = held + (reader.read(need, self.data.wait_s) if need > 0 else [])
                held = []
                if not raws:
                    continue
                while cuts and cuts[0] <= after:
                    cuts.pop(0)
                if cuts:  # end the batch at the next server's mark
                    n = sum(1 for r in raws if r.offset <= cuts[0])
                    if 0 < n < len(raws):
                        raws, held = raws[:n], raws[n:]
                batch = parse_events(raws, where, after)
                self._count_bad(batch)
                if len(batch):
                    x = (batch.dense.to(t.flat.device), batch.ids.to(t.flat.device))
                    t.step(x, batch.y.to(t.flat.device), [epoch, part, batch.last_offset], pushed)
                    pushed = batch.last_offset
                    new = batch.offsets > scored  # events read again after a rewind are scored once
                    if new.any() and t.last_output is None:
                        raise ConfigError("the model's output is not a tensor: online learning scores each batch "
                                          "from it (a probability's logit per event) before training on it")
                    if new.any():
                        probs = torch.sigmoid(t.last_output.reshape(-1)).cpu().numpy()
                        self.prequential.add(batch.y.numpy()[new], probs[new])
                        self.events += int(new.sum())
                        trained += int(new.sum())
                        scored = int(batch.offsets[-1])
                        self._scored[part] = scored
                    self.batches += 1
                    if not np.isnan(batch.ts).all():
                        self.freshness_lag_s.append(time.time() - float(np.nanmax(batch.ts)))
                after = batch.last_offset
                if batch.eos:
                    t._settle()  # a server that refuses the last push makes the partition rewind
                    if t.sparse is not None:
                        t.sparse._settle_sent()
                    if self._gaps() != gaps:
                        continue
                    log.info("%s: partition %d ended (its end marker) after %d events here", self.name, part, trained)
                    return shard["stop"] - shard["start"] - shard.get("skip", 0)
        finally:
            reader.close()
        return trained

    def _open(self, part: int, after: int) -> PrefetchReader:
        """A reader of ``part`` after ``after`` that reads the next batch's events while this
        one trains (a rewind closes it, dropping what it read ahead, and opens another)."""
        return PrefetchReader(self.source.open(part, after, self.name), self.job_batch, self.data.wait_s)

    def _gaps(self) -> int:
        t = self.trainer
        return t.stream_gaps + (t.sparse.gaps if t.sparse is not None else 0)

    def _resume_point(self, epoch: int, part: int, fallback: int, attempts: int = 20) -> tuple[int, list[int]]:
        """(the offset to read the partition after, the later server marks batches must end at)."""
        t = self.trainer
        for attempt in range(attempts):
            try:
                marks = t.kv.stream_marks([epoch, part], t.sparse is not None)
                break
            except (RemoteError, RequestTimeout) as err:  # a server being replaced: ask again
                if attempt == attempts - 1:
                    raise
                log.info("%s: asking the servers where partition %d stands failed (%s); again", self.name, part, err)
                time.sleep(0.5)
        if not marks:
            return fallback, []
        low = min(marks)
        return low, sorted(set(m for m in marks if m > low))

    @property
    def job_batch(self) -> int:
        return self.trainer.job.training.batch_size

    def _count_bad(self, batch) -> None:
        if not batch.malformed:
            return
        self.malformed += batch.malformed
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning("%s: %d malformed event(s) skipped so far; e.g. %s", self.name, self.malformed, "; ".join(batch.reasons[:2]))

    def progress(self) -> dict[str, Any]:
        """What the heartbeat carries (read from the heartbeat thread: plain numbers only)."""
        out: dict[str, Any] = {"events": self.events, "malformed": self.malformed,
                               "prequential_counts": self.prequential.counts.tolist()}
        curve = self.prequential.curve
        if curve and curve[-1][2] == curve[-1][2]:  # the last window's AUC (not NaN)
            out["prequential_auc"] = curve[-1][2]
        return out

    def stats(self) -> dict[str, Any]:
        lag = np.asarray(self.freshness_lag_s, dtype=np.float64) if self.freshness_lag_s else None
        lag = lag[np.isfinite(lag)] if lag is not None else None  # (events without a time: NaN)
        lag = lag if lag is not None and lag.size else None
        return {"events": self.events, "malformed": self.malformed, "batches": self.batches, "partitions": self.partitions,
                "rewinds": self.rewinds,
                "prequential": self.prequential.summary(),
                **({"event_to_push_s": {"p50": float(np.percentile(lag, 50)), "p99": float(np.percentile(lag, 99))}}
                   if lag is not None else {})}
