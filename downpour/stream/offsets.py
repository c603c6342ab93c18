"""Stream offsets in checkpoints, and acknowledging what a checkpoint made durable.

A stream job's checkpoint holds, beside the parameters, each partition's offset: the
position after the last event whose update is in those parameters (the ledger's ``skip``
of the partition's shard; ``"end"`` once its end marker was trained). The coordinator
writes them into the manifest (``job.stream``) and then, off its loop, acknowledges every
event up to them in the broker's consumer group: an event is acknowledged only once its
update is durable.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from downpour.stream.api import MAX_OFFSET

log = logging.getLogger(__name__)


def partition_offsets(ledger_state: dict[str, Any], partitions: int) -> dict[str, int | str]:
    """{partition: offset or "end"} from a checkpoint's ledger state (see ShardLedger.state_at)."""
    out: dict[str, int | str] = {str(p): 0 for p in range(partitions)}
    for _epoch, shard, skip in ledger_state.get("queue", []):
        out[str(shard)] = int(skip)
    for _epoch, shard in ledger_state.get("completed", []):
        out[str(shard)] = "end"
    return out


class Acknowledger:
    """Acknowledges committed offsets on a thread of its own (a broker that is down must not
    hold up the coordinator); a newer request replaces one not yet started."""

    def __init__(self, source) -> None:
        self.source = source
        self._want: dict[str, int | str] | None = None
        self._busy = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="stream-ack", daemon=True)
        self._thread.start()
        self.acked = 0

    def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until the last offsets asked for are acknowledged."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self._want is not None or self._busy) and time.monotonic() < deadline:
                self._cv.wait(0.05)

    def committed(self, offsets: dict[str, int | str]) -> None:
        with self._cv:
            self._want = dict(offsets)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._want is None:
                    self._cv.wait()
                want, self._want = self._want, None
                self._busy = True
            for part, off in want.items():
                upto = MAX_OFFSET - 1 if off == "end" else int(off)
                if upto <= 0:
                    continue
                try:
                    reader = self.source.open_acker(int(part)) if hasattr(self.source, "open_acker") else None
                    if reader is not None:
                        self.acked += reader.ack(upto)
                except Exception as err:  # a broker error: the next checkpoint acknowledges again
                    log.warning("coordinator: acknowledging partition %s up to %s failed: %s", part, off, err)
            with self._cv:
                self._busy = False
                self._cv.notify_all()
