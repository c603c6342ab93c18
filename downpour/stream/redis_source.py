"""Redis Streams as a source: partition p is the stream ``NAME:p``; a consumer group records
what is acknowledged (durable) so that ``XINFO GROUPS`` shows each partition's backlog.

Offsets are stream IDs ``ms-seq`` packed into one integer, ``ms << 16 | seq``: resuming after
an offset is ``XGROUP SETID`` to its ID, then ``XREADGROUP >``. The reader also keeps its own
cursor and drops anything at or before it, so a redis-server restarted from an older
persisted state (``appendfsync everysec`` can lose the last second of group state) never
makes an event read twice. While redis is unreachable a read waits, logs once, and goes on
when it is back (re-creating the group at the reader's cursor if it was lost).
"""

from __future__ import annotations

import logging
import time

from downpour.errors import DataError
from downpour.stream.api import MAX_OFFSET, RawEvent, StreamSpec, register_source

log = logging.getLogger(__name__)

_SEQ_BITS = 16  # IDs within one millisecond: at most 65,536 (ms fits 42 bits until 2109)

# Acknowledging up to an ID: XPENDING lists pending IDs in order, XACK takes them, in chunks
# (Lua's unpack has a stack limit) and a bounded number of chunks per call (a script blocks
# redis-server while it runs). Returns {acknowledged, 1 if a full call's worth was found}.
_ACK_LUA = """
local n = 0
for _ = 1, tonumber(ARGV[4]) do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', ARGV[2], tonumber(ARGV[3]))
  if #pending == 0 then return {n, 0} end
  local ids = {}
  for i, entry in ipairs(pending) do ids[i] = entry[1] end
  n = n + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  if #pending < tonumber(ARGV[3]) then return {n, 0} end
end
return {n, 1}
"""
_ACK_CHUNK = 1_000
# How long a worker starting (or a job checking its data) waits for a redis-server that answers
# but is still loading its append-only file; loading takes seconds, not minutes.
_LOADING_WAIT_S = 60.0
_ACK_CHUNKS_PER_CALL = 10


def pack_id(stream_id: str) -> int:
    ms, _, seq = stream_id.partition("-")
    m, s = int(ms), int(seq or 0)
    if s >= 1 << _SEQ_BITS or (m << _SEQ_BITS | s) >= MAX_OFFSET:
        raise DataError(f"stream ID {stream_id} does not fit an offset (sequence ≥ 2**16 within one millisecond, or a time past 2109)")
    return m << _SEQ_BITS | s


def unpack_id(offset: int) -> str:
    return f"{offset >> _SEQ_BITS}-{offset & ((1 << _SEQ_BITS) - 1)}"


def _redis():
    try:
        import redis
    except ImportError:
        raise DataError("a redis:// stream needs the redis client: pip install 'downpour[stream]' (redis)") from None
    return redis


class RedisReader:
    def __init__(self, source: RedisSource, partition: int, after: int, consumer: str) -> None:
        self.source, self.partition, self.consumer = source, partition, consumer
        self.key = source.key(partition)
        self.after = after
        self._down_since: float | None = None
        redis = _redis()
        try:
            self._group_at(after)
        except (redis.ConnectionError, redis.TimeoutError) as err:  # (BusyLoadingError too): the first read waits
            self._down_since = time.monotonic()
            log.warning("%s: %s unreachable (%s); waiting for it", consumer, source.where, err)

    def _group_at(self, offset: int, again: bool = False) -> None:
        """The group's cursor at ``offset``. ``again`` (redis is back after being down): a stream that
        is gone (a redis-server without persistence restarted) is made anew, empty, with a warning:
        what the producers write from now on is read, and what it held is lost with it."""
        r, group = self.source.client, self.source.spec.group
        if again and not r.exists(self.key):
            log.warning("%s: %s: stream %s is gone after the restart (redis-server without persistence?): the events it "
                        "held past %s are lost; reading what the producers write from now on", self.consumer, self.source.where,
                        self.key, unpack_id(offset))
        try:
            r.xgroup_create(self.key, group, id=unpack_id(offset), mkstream=again)
        except _redis().ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise DataError(f"{self.source.where}: cannot create consumer group on {self.key}: {err}") from None
            r.xgroup_setid(self.key, group, id=unpack_id(offset))

    def read(self, max_events: int, timeout_s: float) -> list[RawEvent]:
        redis = _redis()
        try:
            if self._down_since is not None:  # back: the group may be older than our cursor, or gone
                self._group_at(self.after, again=True)
                log.warning("%s: %s reachable again after %.1fs; reading on after %s", self.consumer, self.source.where,
                            time.monotonic() - self._down_since, unpack_id(self.after))
                self._down_since = None
            got = self.source.client.xreadgroup(self.source.spec.group, self.consumer, {self.key: ">"},
                                                count=max_events, block=max(1, int(timeout_s * 1000)))
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as err:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("%s: %s unreachable (%s); waiting for it", self.consumer, self.source.where, err)
            time.sleep(min(timeout_s, 0.2))
            return []
        except redis.ResponseError as err:
            if "NOGROUP" in str(err):  # redis restarted without the group (or the stream was deleted)
                self._down_since = self._down_since or time.monotonic()
                time.sleep(min(timeout_s, 0.2))
                return []
            raise DataError(f"{self.source.where}: reading {self.key}: {err}") from None
        out = []
        for _key, entries in got or []:
            for sid, fields in entries:
                off = pack_id(sid)
                if off <= self.after:  # delivered again after a rewind of the group: already read
                    continue
                out.append(RawEvent(off, fields))
                self.after = off
        return out

    def ack(self, upto: int) -> int:
        """Acknowledge the group's pending entries up to ``upto``. The listing and the XACK run
        inside redis-server (a script), a bounded number per call, so the IDs never travel to
        this process to be decoded and sent back."""
        n = 0
        try:
            while True:
                done, more = self.source.ack_script(keys=[self.key], args=[self.source.spec.group, unpack_id(upto),
                                                                            _ACK_CHUNK, _ACK_CHUNKS_PER_CALL])
                n += int(done)
                if not int(more):
                    return n
        except (_redis().ConnectionError, _redis().TimeoutError) as err:
            log.warning("%s: could not acknowledge %s up to %s (%s); the next checkpoint will", self.consumer, self.key,
                        unpack_id(upto), err)
            return n

    def close(self) -> None:
        pass


@register_source("redis", "rediss")
class RedisSource:
    def __init__(self, spec: StreamSpec) -> None:
        redis = _redis()
        self.spec = spec
        self.where = spec.url
        # Bytes that are not UTF-8 become U+FFFD, so such an event fails to parse and is counted as
        # malformed on its own (strict decoding failed the whole read, every time it was retried).
        self.client = redis.Redis.from_url(spec.url, decode_responses=True, encoding_errors="replace", socket_timeout=5.0,
                                           socket_connect_timeout=2.0)
        self.ack_script = self.client.register_script(_ACK_LUA)  # EVALSHA, loaded again after a restart

    def key(self, partition: int) -> str:
        return f"{self.spec.name}:{partition}"

    def check(self, loading_wait_s: float = _LOADING_WAIT_S, clock=time.monotonic, sleep=time.sleep,
              unreachable_wait_s: float = 0.0) -> None:
        """Redis answers and every partition's stream exists, else a :class:`DataError` that says
        which. A redis-server still loading its persisted data (``BusyLoadingError``: reachable,
        restarted a moment ago) is waited for, up to ``loading_wait_s`` seconds: a worker replaced
        while redis-server restarts then starts once it is loaded instead of failing. One that
        does not answer is waited for up to ``unreachable_wait_s`` (a job's node, started after
        ``downpour train`` found it reachable: an outage of a few seconds is not a failed job)."""
        redis = _redis()
        start = clock()
        deadline = start + loading_wait_s
        waiting = False
        while True:
            try:
                self.client.ping()
                missing = [self.key(p) for p in range(self.spec.partitions) if not self.client.exists(self.key(p))]
                break
            except redis.BusyLoadingError as err:
                if clock() >= deadline:
                    raise DataError(f"data.url: redis at {self.where} was still loading its data after "
                                    f"{loading_wait_s:g}s: {err}") from None
                sleep(0.2)
            except (redis.ConnectionError, redis.TimeoutError) as err:
                if isinstance(err, redis.AuthenticationError) or clock() >= start + unreachable_wait_s:  # (no wait mends a password)
                    waited = f" (waited {unreachable_wait_s:g}s)" if unreachable_wait_s else ""
                    raise DataError(f"data.url: redis at {self.where} is unreachable{waited}: {err}") from None
                if not waiting:
                    waiting = True
                    log.warning("data.url: redis at %s is unreachable (%s); waiting up to %gs for it", self.where, err,
                                unreachable_wait_s)
                sleep(0.5)
        if waiting:
            log.info("data.url: redis at %s answers again", self.where)
        if missing:
            raise DataError(f"data.url: stream {missing[0]!r} does not exist at {self.where} ({len(missing)} of "
                            f"{self.spec.partitions} partitions missing); start the producer first "
                            f"(downpour datagen criteo --stream ...) or create it (XGROUP CREATE {missing[0]} "
                            f"{self.spec.group} 0 MKSTREAM)")

    def create(self) -> None:
        """Create every partition's stream and group (producers call this before writing)."""
        for p in range(self.spec.partitions):
            try:
                self.client.xgroup_create(self.key(p), self.spec.group, id="0", mkstream=True)
            except _redis().ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise DataError(f"{self.where}: {err}") from None

    def open_acker(self, partition: int) -> RedisReader:
        """A reader used only to acknowledge (it leaves the group's position alone)."""
        r = RedisReader.__new__(RedisReader)
        r.source, r.partition, r.consumer, r.key, r.after, r._down_since = self, partition, "acker", self.key(partition), 0, None
        return r

    def open(self, partition: int, after: int, consumer: str) -> RedisReader:
        return RedisReader(self, partition, after, consumer)

    def append(self, partition: int, fields: dict[str, str]) -> int:
        return pack_id(self.client.xadd(self.key(partition), fields))

    def append_many(self, partition: int, events: list[dict[str, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for fields in events:
            pipe.xadd(self.key(partition), fields)
        pipe.execute()

    def close(self) -> None:
        self.client.close()
