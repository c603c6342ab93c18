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

from downpour.stream import parse_events
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

    def _out_of_time(self) -> bool:
        limit = self.data.max_seconds
        return limit is not None and time.monotonic() - self.started >= limit

    def train(self, shard: dict[str, Any]) -> int:
        """Train partition ``shard["shard"]`` from its ``skip`` on; returns the shard's whole
        length when its end marker was reached (the shard is then done), else what was trained."""
        t = self.trainer
        part, after = int(shard["shard"]), int(shard.get("skip", 0))
        self.partitions.append(part)
        reader = self.source.open(part, after, self.name)
        where = f"{self.source.spec.url}#{part}"
        log.info("%s: training partition %d after offset %d", self.name, part, after)
        trained = 0
        try:
            while not t.finished:
                if t.leave.due(t.kv.versions):  # a graceful stop: leave at the settled position
                    t.left = True
                    break
                if self._out_of_time():
                    t.max_steps = t.steps  # finished: the worker reports and the job ends
                    break
                raws = reader.read(self.job_batch, self.data.wait_s)
                if not raws:
                    continue
                batch = parse_events(raws, where, after)
                self._count_bad(batch)
                if len(batch):
                    x = (batch.dense.to(t.flat.device), batch.ids.to(t.flat.device))
                    t.step(x, batch.y.to(t.flat.device), [int(shard["epoch"]), part, batch.last_offset])
                    self.prequential.add(batch.y.numpy(), torch.sigmoid(t.last_output.reshape(-1)).cpu().numpy())
                    self.events += len(batch)
                    trained += len(batch)
                    self.batches += 1
                    if not np.isnan(batch.ts).all():
                        self.freshness_lag_s.append(time.time() - float(np.nanmax(batch.ts)))
                after = batch.last_offset
                if batch.eos:
                    log.info("%s: partition %d ended (its end marker) after %d events here", self.name, part, trained)
                    return shard["stop"] - shard["start"] - shard.get("skip", 0)
        finally:
            reader.close()
        return trained

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
        out: dict[str, Any] = {"events": self.events, "malformed": self.malformed}
        curve = self.prequential.curve
        if curve and curve[-1][2] == curve[-1][2]:  # the last window's AUC (not NaN)
            out["prequential_auc"] = curve[-1][2]
        return out

    def stats(self) -> dict[str, Any]:
        lag = np.asarray(self.freshness_lag_s) if self.freshness_lag_s else None
        return {"events": self.events, "malformed": self.malformed, "batches": self.batches, "partitions": self.partitions,
                "prequential": self.prequential.summary(),
                **({"event_to_push_s": {"p50": float(np.percentile(lag, 50)), "p99": float(np.percentile(lag, 99))}}
                   if lag is not None else {})}
