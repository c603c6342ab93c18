"""Reading ahead: a partition reader whose reads happen on a thread of their own, so that
waiting on the broker and decoding its reply overlap the training step (as the file job's
loader does with its prefetch threads).

The thread reads at most ``depth`` chunks ahead. Nothing it reads is acknowledged or counted
anywhere: events read ahead and not yet returned are dropped at :meth:`close`, and a reader
opened again after an offset (a rewind, a resumed partition) reads them again. Errors of the
inner reader (a stream that was deleted, say) are raised by the next :meth:`read`.
"""

from __future__ import annotations

import collections
import threading

from downpour.stream.api import PartitionReader, RawEvent


class PrefetchReader:
    """Wraps a :class:`PartitionReader`; ``read`` returns events the thread has read (waiting
    at most ``wait_s`` for a batch of ``max_events`` to fill once one event is there)."""

    def __init__(self, inner: PartitionReader, chunk: int, wait_s: float, depth: int = 2) -> None:
        if chunk < 1 or depth < 1:
            raise ValueError(f"chunk and depth must be ≥ 1 (got {chunk}, {depth})")
        self.inner, self.chunk, self.wait_s, self.depth = inner, chunk, wait_s, depth
        self.partition = inner.partition
        self._events: collections.deque[RawEvent] = collections.deque()
        self._error: BaseException | None = None
        self._stop = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"stream-read-{inner.partition}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and len(self._events) >= self.chunk * self.depth:
                    self._cv.wait()
                if self._stop:
                    return
            try:
                got = self.inner.read(self.chunk, self.wait_s)
            except BaseException as err:  # handed to the reader's owner at its next read
                with self._cv:
                    self._error = err
                    self._cv.notify_all()
                return
            if got:
                with self._cv:
                    self._events.extend(got)
                    self._cv.notify_all()

    def read(self, max_events: int, timeout_s: float) -> list[RawEvent]:
        """Up to ``max_events`` events: waits at most ``timeout_s`` for the first, then at most
        ``wait_s`` (the constructor's) for the rest to arrive. Waiting for the batch to fill keeps
        a batch's size from depending on when the worker happened to ask: a broker that hands
        over a producer's write in pieces would otherwise make a worker that keeps up with the
        stream train on many small batches, and one that lags behind on full ones (each push is
        an optimizer step: the two learn differently from the same events)."""
        with self._cv:
            if not self._events and self._error is None:
                self._cv.wait_for(lambda: self._events or self._error is not None, timeout_s)
            if self._events and len(self._events) < max_events and self._error is None:
                self._cv.wait_for(lambda: len(self._events) >= max_events or self._error is not None or self._stop,
                                  self.wait_s)
            if not self._events and self._error is not None:
                raise self._error
            n = min(max_events, len(self._events))
            out = [self._events.popleft() for _ in range(n)]
            self._cv.notify_all()
            return out

    def ack(self, upto: int) -> int:
        return self.inner.ack(upto)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop reading ahead (what was read and not returned is dropped), then close the inner
        reader. Waits for a read in flight, which the inner reader bounds by ``wait_s`` and its
        socket timeout."""
        with self._cv:
            self._stop = True
            self._events.clear()
            self._cv.notify_all()
        self._thread.join(timeout_s)
        self.inner.close()
