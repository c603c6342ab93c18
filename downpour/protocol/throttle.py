"""Per-peer limits that hold against a peer sending as fast as it can: a request rate, and a
log line per peer per interval (a flood of bad requests must not flood the log too).

Both keep a bounded table: a peer past ``max_peers`` shares one entry with every other such
peer, so new identities cannot grow memory or reset anyone's window.
"""

from __future__ import annotations

import time
from collections.abc import Callable

_OVERFLOW = b"\x00overflow"  # the shared entry of peers beyond the table's size


class RateLimit:
    """At most ``max_per_s`` requests per peer in each one-second window."""

    def __init__(self, max_per_s: float, max_peers: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_per_s = max_per_s
        self.max_peers = max_peers
        self.clock = clock
        self._windows: dict[bytes, list[float]] = {}  # peer -> [window start, requests in it]

    def over(self, peer: bytes) -> bool:
        """Count one request of ``peer``; True when it is over the limit (drop it)."""
        now = self.clock()
        w = self._windows.get(peer)
        if w is None:
            if len(self._windows) >= self.max_peers:
                self._windows = {p: x for p, x in self._windows.items() if now - x[0] < 1.0}  # expired ones go
                if len(self._windows) >= self.max_peers:
                    peer = _OVERFLOW
            w = self._windows.get(peer)
            if w is None:
                w = self._windows[peer] = [now, 0]
        if now - w[0] >= 1.0:
            w[0], w[1] = now, 0
        w[1] += 1
        return w[1] > self.max_per_s


class LogOnce:
    """``first(peer)``: True once per peer per ``interval_s`` (then log; else count silently)."""

    def __init__(self, interval_s: float = 10.0, max_peers: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.max_peers = max_peers
        self.clock = clock
        self._last: dict[bytes, float] = {}

    def first(self, peer: bytes) -> bool:
        now = self.clock()
        last = self._last.get(peer)
        if last is not None and now - last < self.interval_s:
            return False
        if last is None and len(self._last) >= self.max_peers:
            self._last = {p: t for p, t in self._last.items() if now - t < self.interval_s}
            if len(self._last) >= self.max_peers:
                peer = _OVERFLOW
                if now - self._last.get(peer, -self.interval_s) < self.interval_s:
                    return False
        self._last[peer] = now
        return True
