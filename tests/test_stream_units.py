"""The pieces of online learning that need no process: offsets from a ledger, prequential
scores, acknowledgement on a thread, the generator (into a file) with concept drift."""

from __future__ import annotations

import json
import os

import numpy as np

from downpour.stream import open_source, parse_events
from downpour.stream.generator import stream_events
from downpour.stream.offsets import Acknowledger, partition_offsets
from downpour.stream.prequential import Prequential, online_summary


def test_partition_offsets_come_from_the_ledger_state_and_an_ended_partition_says_end():
    state = {"epoch": 0, "completed": [[0, 2]], "queue": [[0, 0, 1234], [0, 1, 0]]}
    assert partition_offsets(state, 4) == {"0": 1234, "1": 0, "2": "end", "3": 0}


def test_prequential_scores_keep_a_curve_per_window_and_totals():
    clock = iter(range(100)).__next__
    pq = Prequential(window=100, clock=clock)
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        pq.add(y, np.clip(y * 0.6 + rng.random(60) * 0.4, 0, 1))  # informative scores
    s = pq.summary()
    assert s["events"] == 300 and len(s["curve"]) == 2 and s["auc"] > 0.8 and s["logloss"] > 0
    assert [c[1] for c in s["curve"]] == [120, 240]
    both = online_summary({"w0": {"online": {"events": 300, "malformed": 2, "prequential": s}},
                           "w1": {"online": {"events": 100, "malformed": 1, "prequential": {"events": 100, "auc": 0.5, "logloss": 1.0}}},
                           "w2": {"steps": 3}}, acked=7)
    assert both["events"] == 400 and both["malformed"] == 3 and both["acknowledged"] == 7
    assert abs(both["prequential_auc_workers"] - (300 * s["auc"] + 100 * 0.5) / 400) < 1e-12
    assert both["prequential_events"] == 300 and abs(both["prequential_auc"] - s["auc"]) < 0.01  # pooled from the bins


def test_the_pooled_prequential_auc_is_the_auc_of_every_score_a_dead_workers_last_heartbeat_included():
    from downpour.data.scoring import roc_auc

    rng = np.random.default_rng(1)
    y = (rng.random(40_000) < 0.25).astype(np.float32)
    p = 1 / (1 + np.exp(-(rng.normal(size=40_000) + 0.9 * y - 1.3)))
    a, b = Prequential(), Prequential()
    a.add(y[:25_000], p[:25_000])
    b.add(y[25_000:], p[25_000:])
    dead = {"steps": 9, "events": 15_000, "malformed": 0, "prequential_counts": b.counts.tolist(), "state": "dead"}
    out = online_summary({"w0": {"online": {"events": 25_000, "malformed": 0, "prequential": a.summary()}}, "w1": dead}, 0)
    assert out["events"] == 40_000 and out["prequential_events"] == 40_000
    assert abs(out["prequential_auc"] - roc_auc(y, p)) < 1e-4  # 1,024 bins: ties within a bin count half
    assert out["prequential_auc_workers"] == a.summary()["auc"]  # the exact mean has the survivor only


class _FakeReader:
    def __init__(self, log, part):
        self.log, self.part = log, part

    def ack(self, upto):
        self.log.append((self.part, upto))
        return 1


def test_acknowledgements_run_on_their_own_thread_and_the_latest_offsets_win():
    log = []
    src = type("S", (), {"open_acker": lambda self, p: _FakeReader(log, p)})()
    ack = Acknowledger(src)
    ack.committed({"0": 10, "1": 0})
    ack.drain(timeout_s=5)
    ack.committed({"0": 20, "1": "end"})
    ack.drain(timeout_s=5)
    assert log[0] == (0, 10) and (0, 20) in log and log[-1][0] == 1 and log[-1][1] > 1 << 50
    assert ack.acked == 3  # partition 1 at offset 0: nothing to acknowledge


def test_the_generator_writes_a_bounded_drifting_stream_that_parses(tmp_path):
    url = str(tmp_path / "ev.tsv")
    src = open_source(url, {"partitions": 2})
    for p in range(2):
        open(src.part(p), "w").close()
    slept = []
    t = [0.0]
    got = stream_events(src, 600, rate=1000.0, seed=1, drift_every=300, end_marker=True,
                        clock=lambda: t[0], sleep=lambda s: (slept.append(s), t.__setitem__(0, t[0] + s)))
    assert got["events"] == 600 and got["phases"] == 2 and slept and abs(t[0] - 0.6) < 0.3
    labels = []
    for p in range(2):
        raws = src.open(p, 0, "t").read(1000, 0.1)
        b = parse_events(raws, "gen", 0)
        assert len(b) == 300 and b.eos and b.malformed == 0
        labels.append(b.y.numpy())
    assert 0.1 < np.concatenate(labels).mean() < 0.45  # the generator's click rate (0.25)


def test_a_file_source_counts_a_bad_json_line_and_reads_on():
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write('{"label": 1, "I1": 2}\n{"label": 2}\n\n{"eos": 1}\n')
    raws = open_source(f.name).open(0, 0, "t").read(10, 0.1)
    b = parse_events(raws, "f", 0)
    assert len(b) == 1 and b.malformed == 2 and b.eos
    assert json.loads(raws[0].fields["json"])["I1"] == 2
    os.unlink(f.name)


def test_a_file_source_reads_a_backlog_a_batch_at_a_time_and_says_when_the_file_shrank(tmp_path, caplog):
    """Before: every read took another chunk and copied the whole buffer, so a backlog went into memory
    whole, read in time quadratic in its size."""
    path = tmp_path / "events.tsv"
    row = "\t".join(["1", *["3"] * 13, *["0a1b2c3d"] * 26]) + "\n"
    path.write_text(row * 20_000)  # ~5 MB
    r = open_source(str(path)).open(0, 0, "t")
    held = []
    for _ in range(40):
        got = r.read(128, 0.1)
        assert len(got) == 128
        held.append(len(r._buf))
    assert max(held) < 2 * max(1 << 16, 128 * 400) + len(row)  # bounded by a read's size, not the backlog
    assert r.after == 40 * 128 * len(row)
    path.write_text(row)  # truncated under the reader: what it had read ahead is still handed out, then a warning
    with caplog.at_level("WARNING", logger="downpour.stream.file_source"):
        for _ in range(1000):
            if not r.read(128, 0.01):
                break
    assert "shorter than the" in caplog.text


class _ListReader:
    """A partition reader over a list; records how far ahead it was read."""

    def __init__(self, n: int, fail_after: int | None = None) -> None:
        from downpour.stream.api import RawEvent

        self.partition, self.pos, self.closed, self.fail_after = 0, 0, False, fail_after
        self.events = [RawEvent(i + 1, {"i": str(i)}) for i in range(n)]

    def read(self, max_events, timeout_s):
        import time

        from downpour.errors import DataError

        if self.fail_after is not None and self.pos >= self.fail_after:
            raise DataError("the stream was deleted")
        out = self.events[self.pos:self.pos + max_events]
        self.pos += len(out)
        if not out:
            time.sleep(timeout_s)
        return out

    def ack(self, upto):
        return 0

    def close(self):
        self.closed = True


def test_a_prefetching_reader_returns_every_event_once_in_order_and_reads_a_bounded_way_ahead():
    import time

    from downpour.stream.prefetch import PrefetchReader

    inner = _ListReader(100)
    r = PrefetchReader(inner, chunk=8, wait_s=0.01, depth=2)
    first = r.read(5, 2.0)
    deadline = time.monotonic() + 5
    while inner.pos < 5 + 16 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert inner.pos <= 5 + 16 + 8  # never more than depth chunks buffered (one more read in flight)
    got = first
    while len(got) < 100:
        more = r.read(7, 2.0)
        assert more, "a prefetching reader returned nothing while events were left"
        assert len(more) <= 7
        got += more
    assert [e.offset for e in got] == list(range(1, 101))
    assert r.read(10, 0.05) == []  # the end: waits at most its timeout
    r.close()
    assert inner.closed and not r._thread.is_alive()


class _TrickleReader(_ListReader):
    """Hands over its events a few at a time, as a broker does with a write it sees in pieces."""

    def read(self, max_events, timeout_s):
        import time

        time.sleep(0.002)
        return super().read(min(max_events, 3), timeout_s)


def test_a_prefetching_reader_waits_for_a_batch_to_fill_rather_than_return_the_first_pieces():
    from downpour.stream.prefetch import PrefetchReader

    r = PrefetchReader(_TrickleReader(40), chunk=16, wait_s=5.0)
    assert [len(r.read(16, 5.0)) for _ in range(2)] == [16, 16]  # not the 3 events there at first
    r.close()
    short = PrefetchReader(_TrickleReader(5), chunk=16, wait_s=0.05)
    assert [e.offset for e in short.read(16, 5.0)] == [1, 2, 3, 4, 5]  # a partial batch once wait_s has passed
    short.close()


def test_a_prefetching_reader_raises_its_inner_readers_error_after_the_events_read_before_it():
    import pytest

    from downpour.errors import DataError
    from downpour.stream.prefetch import PrefetchReader

    r = PrefetchReader(_ListReader(10, fail_after=10), chunk=4, wait_s=0.01)
    got = []
    with pytest.raises(DataError, match="deleted"):
        for _ in range(10):
            got += r.read(4, 2.0)
    assert [e.offset for e in got] == list(range(1, 11))
    r.close()


def test_closing_a_prefetching_reader_drops_what_it_read_ahead_and_a_new_one_reads_it_again(tmp_path):
    from downpour.stream.prefetch import PrefetchReader

    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps({"label": i % 2, "dense": [i], "sparse": [str(i)]}) + "\n" for i in range(30)))
    src = open_source(str(path))
    r = PrefetchReader(src.open(0, 0, "w"), chunk=8, wait_s=0.01)
    head = r.read(3, 2.0)
    r.close()
    again = PrefetchReader(src.open(0, head[-1].offset, "w"), chunk=8, wait_s=0.01)
    rest = []
    while len(rest) < 27:
        more = again.read(100, 2.0)
        assert more
        rest += more
    again.close()
    offsets = [e.offset for e in head + rest]
    assert offsets == sorted(set(offsets)) and len(offsets) == 30


class _LoadingRedis:
    """A redis client whose server answers "loading" to the first ``loading`` calls."""

    def __init__(self, loading: int) -> None:
        self.loading = loading

    def _answer(self):
        import redis

        if self.loading:
            self.loading -= 1
            raise redis.BusyLoadingError("Redis is loading the dataset in memory")
        return True

    def ping(self):
        return self._answer()

    def exists(self, key):
        return self._answer()


def test_a_redis_server_still_loading_its_data_is_waited_for_and_one_that_never_finishes_is_a_clear_error():
    import pytest

    pytest.importorskip("redis")
    from downpour.errors import DataError

    src = open_source("redis://127.0.0.1:1/0?stream=clicks&partitions=2")  # (no connection is made here)
    now = [0.0]
    naps = []

    def sleep(s):
        naps.append(s)
        now[0] += s

    src.client = _LoadingRedis(loading=3)  # a replaced worker starting while redis-server restarts
    src.check(loading_wait_s=60, clock=lambda: now[0], sleep=sleep)
    assert len(naps) == 3 and src.client.loading == 0
    src.client = _LoadingRedis(loading=10**6)
    with pytest.raises(DataError, match=r"redis at redis://127\.0\.0\.1:1/0 was still loading its data after 5s"):
        src.check(loading_wait_s=5, clock=lambda: now[0], sleep=sleep)


class _DownRedis(_LoadingRedis):
    """A redis client whose server does not answer the first ``down`` calls."""

    def __init__(self, down: int) -> None:
        super().__init__(0)
        self.down = down

    def _answer(self):
        import redis

        if self.down:
            self.down -= 1
            raise redis.ConnectionError("Connection refused")
        return True


def test_a_node_waits_for_an_unreachable_redis_up_to_its_limit_and_the_check_before_the_start_waits_for_nothing():
    import pytest

    pytest.importorskip("redis")
    from downpour.errors import DataError

    src = open_source("redis://127.0.0.1:1/0?stream=clicks&partitions=2")
    now = [0.0]

    def sleep(s):
        now[0] += s

    src.client = _DownRedis(down=4)  # back after ~2 s: a node started during a short outage starts
    src.check(clock=lambda: now[0], sleep=sleep, unreachable_wait_s=120)
    assert src.client.down == 0 and 1.5 <= now[0] <= 2.5
    src.client = _DownRedis(down=10**6)
    with pytest.raises(DataError, match=r"redis at redis://127\.0\.0\.1:1/0 is unreachable \(waited 30s\)"):
        src.check(clock=lambda: now[0], sleep=sleep, unreachable_wait_s=30)
    src.client = _DownRedis(down=1)  # downpour train's own check: at once
    with pytest.raises(DataError, match="is unreachable: Connection refused"):
        src.check(clock=lambda: now[0], sleep=sleep)

    class _Refused(_DownRedis):
        def _answer(self):
            import redis

            raise redis.AuthenticationError("invalid username-password pair")

    src.client, before = _Refused(down=0), now[0]
    with pytest.raises(DataError, match="invalid username-password pair"):  # no wait mends a password
        src.check(clock=lambda: now[0], sleep=sleep, unreachable_wait_s=120)
    assert now[0] == before


def test_a_stream_shares_the_hidden_model_of_a_file_data_set_of_its_seed_but_no_row():
    from downpour.data.criteo_gen import CriteoSpec, generate_rows
    from downpour.stream.generator import _phase_rows

    biases: dict = {}
    streamed = next(_phase_rows(0, 0, 0, 2000, biases))
    spec, bias = biases[0]
    in_files = next(generate_rows(CriteoSpec(rows=100_000, seed=0), bias, 0, 2000))
    assert spec.seed == 0  # phase 0 draws its labels from the seed's own model, as the files do
    file_rows = {r.tobytes() for r in in_files.ints}
    assert not any(r.tobytes() in file_rows for r in streamed.ints)
