"""Which of a worker's numbered requests a server rank applied: each exactly once across failovers.

With replicated servers a worker numbers the requests that change a rank (``meta.seq``, counted
per worker and rank; its row requests, SPARSE, have their own count under ``"NAME/sparse"``), and
sends a request whose server was replaced (``peer_replaced``) again, as it was, to the rank's new
process: a backup that applied the same stream as the old primary, so it holds the request or it
does not. It must tell which.

"Applied if ``seq`` is not past the last one applied" is right only while a worker's requests
arrive in the order they were numbered, and a failover breaks that when the worker has more than
one request out to the rank: one sent to the old primary that died before forwarding it to its
backup is lost with it, and the worker can send its next request to the new primary before it
learns of the loss and sends the lost one again (rows pulled a batch ahead always have one
request out while the next goes). So a stream also keeps ``skipped``: the seqs below its last
that never came here (the newest :data:`MAX_SKIPPED`; a worker has only a few requests out at a
time). One of them that comes later is applied, and leaves the list.

Pure functions of the two tables (``last``: stream -> last seq applied; ``skipped``: stream ->
seqs), so that a backup, which runs the same requests in the same order, keeps the same tables,
and a joining backup is sent them with the rest of the state (server/replica.py).
"""

from __future__ import annotations

MAX_SKIPPED = 64  # per stream: seqs below the last applied one still awaited, the newest kept


def is_replay(last: dict[str, int], skipped: dict[str, list[int]], who: str, seq: int) -> bool:
    """Request ``seq`` of stream ``who`` was applied here already (answer it, do not apply it)."""
    return seq <= last.get(who, 0) and seq not in skipped.get(who, ())


def record(last: dict[str, int], skipped: dict[str, list[int]], who: str, seq: int) -> None:
    """Request ``seq`` of stream ``who`` (not a replay: see :func:`is_replay`) was applied here."""
    top = last.get(who, 0)
    if seq > top:
        gap = range(max(top + 1, seq - MAX_SKIPPED), seq)
        if gap:
            skipped[who] = (skipped.get(who, []) + list(gap))[-MAX_SKIPPED:]
        last[who] = seq
        return
    waiting = skipped[who]
    waiting.remove(seq)
    if not waiting:
        del skipped[who]


def parse_skipped(value: object) -> dict[str, list[int]]:
    """``skipped`` as sent in a state (stream -> ascending positive seqs); anything else is dropped."""
    if not isinstance(value, dict):
        return {}
    out = {}
    for who, seqs in value.items():
        if isinstance(seqs, list) and seqs and all(type(s) is int and s > 0 for s in seqs):
            out[str(who)] = sorted(seqs)[-MAX_SKIPPED:]
    return out
