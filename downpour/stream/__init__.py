"""Live event streams: sources behind one small interface (Redis Streams, a tailed file), the
events' parsing into CTR batches, and positions that checkpoints can hold (docs/online.md)."""

from downpour.stream.api import PartitionReader, StreamSource, StreamSpec, open_source, register_source
from downpour.stream.events import EventBatch, parse_events

__all__ = ["EventBatch", "PartitionReader", "StreamSource", "StreamSpec", "open_source", "parse_events", "register_source"]
