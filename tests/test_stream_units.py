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
