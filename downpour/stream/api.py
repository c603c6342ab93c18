"""The contract every stream source meets, and the registry that opens one from a URL.

A stream has ``partitions`` partitions, each an ordered, append-only sequence of events.
An event's *offset* is a non-negative integer below 2**58, increasing along its partition;
"resume after offset o" is all a checkpoint needs to know to continue exactly there
(0: from the partition's first event). What an offset means is the source's business:
a packed Redis stream ID, a byte position in a file.

A worker opens one partition at a time (:meth:`StreamSource.open`) and reads batches of
raw events; it acknowledges (:meth:`PartitionReader.ack`) only offsets whose updates are
durable, so a broker that tracks deliveries (a Redis consumer group) knows what is safe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from downpour.errors import ConfigError

MAX_OFFSET = 1 << 58  # offsets stay below a stream shard's span (config.STREAM_SPAN); P · 2**58 fits int64


@dataclass(frozen=True)
class RawEvent:
    offset: int  # where the stream resumes after this event
    fields: dict[str, str]  # the event as text fields: {"tsv": row} or {"json": object} (or the fields themselves)


@dataclass(frozen=True)
class StreamSpec:
    """Where a stream is and how it is cut. ``url``: ``redis://HOST:PORT/DB`` or a file path
    (``file://`` or plain); ``name``: the Redis key prefix (partition p is key ``NAME:p``);
    ``group``: the consumer group that records acknowledgements."""

    url: str
    name: str = "events"
    partitions: int = 1
    group: str = "downpour"
    options: dict = field(default_factory=dict)

    @staticmethod
    def parse(url: str, args: dict | None = None) -> StreamSpec:
        """A spec from a URL whose query may carry ``stream``, ``partitions``, ``group``;
        ``args`` (a job's ``data.args``) override the query."""
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        merged = {**query, **(args or {})}
        base = parts._replace(query="").geturl()
        try:
            partitions = int(merged.get("partitions", 1))
        except (TypeError, ValueError):
            raise ConfigError(f"stream partitions: {merged.get('partitions')!r} is not a whole number") from None
        if not 1 <= partitions <= 16:
            raise ConfigError(f"stream partitions: {partitions} is not between 1 and 16")
        name = str(merged.get("stream", "events"))
        if not name or any(c.isspace() for c in name):
            raise ConfigError(f"stream name: {name!r} is empty or has spaces")
        known = {"stream", "partitions", "group"}
        return StreamSpec(base, name, partitions, str(merged.get("group", "downpour")),
                          {k: v for k, v in merged.items() if k not in known})


class PartitionReader(Protocol):
    partition: int

    def read(self, max_events: int, timeout_s: float) -> list[RawEvent]:
        """Up to ``max_events`` events after the last one returned (or after the offset the
        reader was opened at), waiting at most ``timeout_s`` for the first; [] if none came.
        A broker that is down is waited for (logged), not reported as the end of the stream."""
        ...

    def ack(self, upto: int) -> int:
        """Acknowledge every event at or before offset ``upto``; returns how many were."""
        ...

    def close(self) -> None: ...


class StreamSource(Protocol):
    spec: StreamSpec

    def check(self, *, unreachable_wait_s: float = 0.0) -> None:
        """Raise a :class:`~downpour.errors.DataError` naming the URL if the stream cannot be
        read (broker unreachable, a partition that does not exist). A broker that does not answer
        is waited for up to ``unreachable_wait_s`` first."""
        ...

    def open(self, partition: int, after: int, consumer: str) -> PartitionReader:
        """A reader of ``partition`` that starts after offset ``after``."""
        ...

    def append(self, partition: int, fields: dict[str, str]) -> int:
        """Append one event (producers, tests); returns its offset."""
        ...

    def close(self) -> None: ...


_SOURCES: dict[str, Callable[[StreamSpec], StreamSource]] = {}


def register_source(*schemes: str):
    def deco(factory):
        for s in schemes:
            _SOURCES[s] = factory
        return factory

    return deco


def open_source(url: str, args: dict | None = None) -> StreamSource:
    """The source a URL names: ``redis://`` (Redis Streams) or a file (``file://`` or a path)."""
    import downpour.stream.file_source  # noqa: F401  (registers)
    import downpour.stream.redis_source  # noqa: F401

    spec = StreamSpec.parse(url, args)
    scheme = urlsplit(spec.url).scheme or "file"
    factory = _SOURCES.get(scheme)
    if factory is None:
        raise ConfigError(f"data.url: no stream source for {scheme}:// (known: {sorted(_SOURCES)})")
    return factory(spec)
