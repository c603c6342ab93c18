"""Stream sources: Redis Streams (a real redis-server) and a tailed file, behind one interface."""

from __future__ import annotations

import json

import pytest

from downpour.errors import ConfigError, DataError
from downpour.stream import open_source, parse_events
from downpour.stream.redis_source import pack_id, unpack_id
from tests.redis_server import RedisServer, needs_redis, redis_server  # noqa: F401

ROW = "\t".join(["1", *["3"] * 13, *["0a1b2c3d"] * 26])


def _event(i: int, label: int = 1) -> dict[str, str]:
    obj = {"label": label, "I1": i, "C1": format(i, "x"), "ts": 1.5}
    return {"json": json.dumps(obj)}


def test_an_offset_is_a_packed_stream_id_and_back():
    assert unpack_id(pack_id("1700000000123-7")) == "1700000000123-7"
    assert pack_id("5-0") < pack_id("5-1") < pack_id("6-0")
    with pytest.raises(DataError, match="does not fit"):
        pack_id(f"1-{1 << 16}")


def test_a_spec_reads_the_url_query_and_args_override_it():
    src = open_source("redis://127.0.0.1:1/0?stream=clicks&partitions=3", {"partitions": 2})
    assert (src.spec.name, src.spec.partitions, src.spec.url) == ("clicks", 2, "redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="partitions"):
        open_source("redis://127.0.0.1:1/0?partitions=0")
    with pytest.raises(ConfigError, match="no stream source for kafka"):
        open_source("kafka://x:1")


def test_malformed_events_are_counted_and_skipped_and_good_ones_parse():
    from downpour.stream.api import RawEvent

    raws = [RawEvent(1, {"tsv": ROW}), RawEvent(2, {"tsv": "1\t2"}), RawEvent(3, {"json": "{not json"}),
            RawEvent(4, _event(4)), RawEvent(5, {"json": json.dumps({"label": 1, "I1": "x"})}), RawEvent(6, {"other": "1"}),
            RawEvent(7, {"tsv": ROW.replace("0a1b2c3d", "zz", 1)}), RawEvent(8, {"eos": "1"}), RawEvent(9, {"tsv": ROW})]
    b = parse_events(raws, "t", 0)
    assert b.offsets.tolist() == [1, 4] and b.malformed == 5 and b.eos and b.last_offset == 8
    assert b.dense.shape == (2, 13) and b.ids.shape == (2, 26) and b.y.tolist() == [1.0, 1.0]
    assert b.ts[1] == 1.5 and len(b.reasons) == 5 and "t@7" in " ".join(b.reasons)
    # the JSON event's C1 (hex "4") is field 0's ID 4, its missing C2 is field 1's "missing" ID
    assert int(b.ids[1, 0]) == 4 and int(b.ids[1, 1]) == (1 << 33) + (1 << 32)


def test_a_tailed_file_returns_whole_lines_and_resumes_after_an_offset(tmp_path):
    path = tmp_path / "events.jsonl"
    src = open_source(str(path))
    with pytest.raises(DataError, match="does not exist"):
        src.check()
    path.write_text(json.dumps(json.loads(_event(0)["json"])) + "\n" + ROW + "\n" + ROW[:10])  # a half-written line
    src.check()
    r = src.open(0, 0, "w")
    got = r.read(10, 0.1)
    assert len(got) == 2 and "json" in got[0].fields and "tsv" in got[1].fields
    assert r.read(10, 0.05) == []  # the third line has no newline yet
    with open(path, "a") as f:
        f.write(ROW[10:] + "\n")
    third = r.read(10, 0.5)
    assert len(third) == 1 and third[0].fields["tsv"] == ROW and third[0].offset == path.stat().st_size
    again = src.open(0, got[0].offset, "w").read(10, 0.1)  # resume after the first event
    assert [e.offset for e in again] == [got[1].offset, third[0].offset]


@needs_redis
@pytest.mark.slow
def test_redis_partitions_read_in_order_resume_after_an_offset_and_ack_up_to_it(redis_server):  # noqa: F811
    src = open_source(redis_server.url + "?stream=ev&partitions=2")
    with pytest.raises(DataError, match="does not exist"):
        src.check()
    src.create()
    src.check()
    offs = [src.append(i % 2, _event(i)) for i in range(10)]
    r0 = src.open(0, 0, "w0")
    got = r0.read(3, 0.5) + r0.read(100, 0.5)
    assert [e.offset for e in got] == offs[0::2]
    assert r0.read(10, 0.05) == []
    # a new reader (a replacement worker) resuming after the second event gets the rest only
    r0b = src.open(0, offs[2], "w0b")
    assert [e.offset for e in r0b.read(100, 0.5)] == offs[4::2]
    assert r0b.ack(offs[6]) >= 2
    pending = src.client.xpending(src.key(0), "downpour")["pending"]
    assert pending == 1  # only the last event (offs[8]) is not acknowledged
    assert [e.offset for e in src.open(1, 0, "w1").read(100, 0.5)] == offs[1::2]


@needs_redis
@pytest.mark.slow
def test_acknowledging_runs_in_redis_in_bounded_calls_and_survives_a_flushed_script_cache(redis_server, monkeypatch):  # noqa: F811
    import downpour.stream.redis_source as rs

    monkeypatch.setattr(rs, "_ACK_CHUNK", 3)
    monkeypatch.setattr(rs, "_ACK_CHUNKS_PER_CALL", 2)  # 6 per script call: 20 events take 4 calls
    src = open_source(redis_server.url + "?stream=acks")
    src.create()
    offs = [src.append(0, _event(i)) for i in range(25)]
    got = src.open(0, 0, "w").read(100, 0.5)
    assert len(got) == 25
    calls = []
    real = src.ack_script
    monkeypatch.setattr(src, "ack_script", lambda **kw: calls.append(1) or real(**kw))
    assert src.open_acker(0).ack(offs[19]) == 20
    assert len(calls) == 4
    assert src.client.xpending(src.key(0), "downpour")["pending"] == 5
    src.client.script_flush()  # as after a restart: the script is loaded again
    assert src.open_acker(0).ack(offs[-1]) == 5
    assert src.client.xpending(src.key(0), "downpour")["pending"] == 0
    assert src.open_acker(0).ack(offs[-1]) == 0  # nothing left: acknowledging again is a no-op


def _restarted_mid_read(server: RedisServer, events: int, first: int):
    """A reader that read the ``first`` of ``events`` events, then saw redis-server stop and start
    again; returns the source, the reader and the events' offsets."""
    src = open_source(server.url + "?stream=ev")
    src.create()
    offs = [src.append(0, _event(i)) for i in range(events)]
    r = src.open(0, 0, "w")
    assert [e.offset for e in r.read(first, 0.5)] == offs[:first]
    server.stop()
    assert r.read(10, 0.1) == []  # down: waits, returns nothing, does not raise
    server.start()
    return src, r, offs


@needs_redis
@pytest.mark.slow
def test_a_redis_restart_mid_read_is_waited_for_and_nothing_is_read_twice(tmp_path):
    server = RedisServer(str(tmp_path)).start()
    try:
        src, r, offs = _restarted_mid_read(server, 5, 3)
        offs.append(src.append(0, _event(5)))
        got = []
        for _ in range(50):
            got += r.read(10, 0.1)
            if len(got) >= 3:
                break
        assert [e.offset for e in got] == offs[3:]
    finally:
        server.stop()


@needs_redis
@pytest.mark.slow
def test_a_redis_without_persistence_restarted_mid_read_is_waited_for_and_new_events_are_read(tmp_path, caplog):
    """Its streams are gone after the restart: the reader makes its partition anew (the events it held
    are lost, said in a warning) instead of failing the worker, then the job."""
    server = RedisServer(str(tmp_path), persist=False).start()
    try:
        src, r, offs = _restarted_mid_read(server, 3, 2)
        assert not src.client.exists(src.key(0))
        got = []
        for i in range(50):
            got += r.read(10, 0.1)  # (no DataError: the stream and its group are made again)
            if i == 2:
                new = src.append(0, _event(9))
            if got:
                break
        assert [e.offset for e in got] == [new] and new > offs[-1]
        assert "is gone after the restart" in caplog.text
    finally:
        server.stop()


def test_an_event_with_bytes_that_are_not_utf8_or_json_nested_too_deep_is_malformed_alone():
    from downpour.stream.api import RawEvent

    deep = '{"label": 1, "I1": ' + "[" * 100_000 + "]" * 100_000 + "}"
    raws = [RawEvent(1, {"tsv": ROW}), RawEvent(2, {"json": deep}), RawEvent(3, {"tsv": "1\t\ufffd\ufffd"}),
            RawEvent(4, {"json": json.dumps({"label": 1, "ts": 1e400})}), RawEvent(5, {"tsv": ROW})]
    b = parse_events(raws, "t", 0)
    assert b.offsets.tolist() == [1, 5] and b.malformed == 3
    named = parse_events([RawEvent(1, {"tsv": ROW, "ts": "yesterday"})], "t", 0)
    assert named.malformed == 1 and "ts is 'yesterday', expected seconds since the epoch" in named.reasons[0]
    truth = parse_events([RawEvent(1, {"json": json.dumps({"label": 1, "ts": True})})], "t", 0)
    assert truth.malformed == 1 and "ts is 'True', expected seconds since the epoch" in truth.reasons[0]
    huge = parse_events([RawEvent(1, {"json": json.dumps({"label": 1, "I1": 10**19})})], "t", 0)
    assert huge.malformed == 1 and "I1 is 10000000000000000000, beyond the 64-bit integer range" in huge.reasons[0]


@needs_redis
@pytest.mark.slow
def test_a_redis_event_with_bytes_that_are_not_utf8_is_counted_malformed_and_the_others_are_read(redis_server):  # noqa: F811
    """Strict decoding failed the whole read, at every retry: the worker died, and each replacement."""
    src = open_source(redis_server.url + "?stream=bytes")
    src.create()
    good = src.append(0, {"tsv": ROW})
    src.client.xadd(src.key(0), {"tsv": b"\xff\xfe\x00garbage"})
    last = src.append(0, {"tsv": ROW})
    got = src.open(0, 0, "w").read(10, 0.5)
    assert len(got) == 3 and got[0].offset == good and got[2].offset == last
    b = parse_events(got, "bytes", 0)
    assert b.offsets.tolist() == [good, last] and b.malformed == 1


@needs_redis
def test_a_reader_opened_while_redis_is_down_waits_and_reads_after_its_offset_once_it_is_back(tmp_path):
    server = RedisServer(str(tmp_path)).start()
    try:
        src = open_source(server.url + "?stream=ev")
        src.create()
        offs = [src.append(0, _event(i)) for i in range(4)]
        server.stop()
        r = src.open(0, offs[1], "w")  # (a worker rewinding while redis restarts): no error
        assert r.read(10, 0.1) == []
        server.start()
        got = []
        for _ in range(50):
            got += r.read(10, 0.1)
            if len(got) >= 2:
                break
        assert [e.offset for e in got] == offs[2:]
    finally:
        server.stop()


def test_redis_unreachable_at_start_is_a_clear_error():
    from tests.redis_server import free_port

    src = open_source(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(DataError, match="unreachable"):
        src.check()


def test_a_stream_job_refuses_to_start_when_redis_is_unreachable_naming_the_url():
    from downpour.api import check_data
    from downpour.config import parse_job
    from tests.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0?stream=clicks&partitions=2"
    job = parse_job({"model": {"name": "wide_deep"}, "data": {"name": "stream", "url": url}})
    assert job.data.shard_size == 1 << 58 and job.data.path == url
    with pytest.raises(DataError, match=r"redis at redis://127\.0\.0\.1:\d+/0 is unreachable"):
        check_data(job)
    with pytest.raises(Exception, match="data.url: a stream needs a URL"):
        parse_job({"model": {"name": "wide_deep"}, "data": {"name": "stream"}})
