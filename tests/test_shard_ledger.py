"""The data ledger (coordinator/shards.py): where each worker stands in the data, and every example
trained exactly once per epoch across snapshots and resumes."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from downpour.coordinator.shards import ShardLedger
from tests.checkpoint_helpers import (
    handed,
)

# -- the data ledger --------------------------------------------------------------------


def resumed(state: dict) -> ShardLedger:
    """A new ledger continuing from ``state`` as a job.json holds it."""
    ledger = ShardLedger(40, 4, 2, seed=7)
    ledger.restore(json.loads(json.dumps(state)))
    return ledger


def test_a_worker_mid_shard_resumes_it_after_the_examples_it_had_done():
    ledger = ShardLedger(40, 4, 2, seed=7)  # ten shards of four
    e, s = handed(ledger, "w0")
    state = ledger.state_at({"w0": [e, s, 3]})
    assert state["queue"][0] == [e, s, 3] and [e, s] not in state["completed"]
    again = resumed(state)
    assert again.next("w1") == {"epoch": e, "shard": s, "start": 4 * s, "stop": 4 * s + 4, "skip": 3}


def test_a_shard_fully_done_but_not_yet_reported_counts_as_completed():
    ledger = ShardLedger(40, 4, 2, seed=7)
    e, s = handed(ledger, "w0")
    state = ledger.state_at({"w0": [e, s, 4]})
    assert [e, s] in state["completed"]
    assert all((q[0], q[1]) != (e, s) for q in state["queue"])


def test_a_shard_reported_done_after_the_snapshot_goes_back_with_the_examples_the_snapshot_holds():
    ledger = ShardLedger(40, 4, 2, seed=7)
    e, s = handed(ledger, "w0")
    assert ledger.done("w0", e, s)
    state = ledger.state_at({"w0": [e, s, 1]})
    assert state["queue"][0] == [e, s, 1] and [e, s] not in state["completed"]


def test_shards_handed_out_after_the_snapshot_go_back_first_in_their_hand_out_order():
    ledger = ShardLedger(40, 4, 2, seed=7)
    a = handed(ledger, "w0")
    b = handed(ledger, "w1")
    c = handed(ledger, "w0")
    d = handed(ledger, "w1")
    e = handed(ledger, "w0")
    rest = list(ledger.queue)
    assert ledger.done("w0", *a)
    state = ledger.state_at({"w0": [*a, 4], "w1": [*b, 2]})
    assert state["completed"] == [list(a)]
    assert state["queue"] == [[*b, 2], [*c, 0], [*d, 0], [*e, 0], *([*k, 0] for k in rest)]


def test_a_worker_with_no_position_gives_back_every_shard_it_was_handed():
    ledger = ShardLedger(40, 4, 2, seed=7)
    a = handed(ledger, "w0")
    ledger.done("w0", *a)
    b = handed(ledger, "w0")
    c = handed(ledger, "w1")
    state = ledger.state_at({"w1": [*c, 1]})
    assert state["completed"] == []
    assert state["queue"][:3] == [[*a, 0], [*b, 0], [*c, 1]]


def test_a_position_in_a_shard_the_worker_was_not_handed_gives_back_all_its_shards():
    ledger = ShardLedger(40, 4, 2, seed=7)
    a = handed(ledger, "w0")
    state = ledger.state_at({"w0": [1, 9, 2]})
    assert state["queue"][0] == [*a, 0]


def test_restore_hands_out_the_partial_shard_first_with_its_skip_and_then_the_rest():
    ledger = ShardLedger(40, 4, 2, seed=7)
    a = handed(ledger, "w0")
    b = handed(ledger, "w1")
    state = ledger.state_at({"w0": [*a, 2], "w1": [*b, 4]})
    again = resumed(state)
    first = again.next("w5")
    assert (first["epoch"], first["shard"], first["skip"]) == (*a, 2)
    second = again.next("w5")
    assert second["skip"] == 0 and (second["epoch"], second["shard"]) not in (a, b)
    assert again.done("w5", *a) and again.skips == {}


def test_earliest_takes_the_position_handed_out_first_then_the_fewest_examples():
    ledger = ShardLedger(40, 4, 2, seed=7)
    a = handed(ledger, "w0")
    b = handed(ledger, "w0")
    assert ledger.earliest("w0", [[*b, 1], [*a, 3]]) == [*a, 3]
    assert ledger.earliest("w0", [[*a, 3], [*a, 1], [*b, 0]]) == [*a, 1]
    assert ledger.earliest("w0", [[*b, 2]]) == [*b, 2]


class SimWorker:
    """A worker of the data loop: asks for a shard (reporting the previous one done first), then
    trains it a batch at a time; each batch's push carries its position, as the trainer's do."""

    def __init__(self, name: str, ledger: ShardLedger, batch: int) -> None:
        self.name, self.ledger, self.batch = name, ledger, batch
        self.shard: dict | None = None
        self.done = 0  # examples of the shard trained, skipped ones included
        self.position: list[int] | None = None
        self.finished = False

    def act(self, trained: list[tuple[int, int, int]]) -> None:
        size = (self.shard["stop"] - self.shard["start"]) if self.shard else 0
        if self.shard is None or self.done == size:
            if self.shard is not None:
                assert self.ledger.done(self.name, self.shard["epoch"], self.shard["shard"])
            self.shard = self.ledger.next(self.name)
            self.finished = self.shard is None
            self.done = self.shard["skip"] if self.shard else 0
            return
        n = min(self.batch, size - self.done)
        trained += [(self.shard["epoch"], self.shard["shard"], i) for i in range(self.done, self.done + n)]
        self.done += n
        self.position = [self.shard["epoch"], self.shard["shard"], self.done]


def drive(workers: list[SimWorker], trained: list, rng: random.Random, actions: int | None = None) -> None:
    """Let workers act in a random order (some faster than others) until all finished or ``actions`` ran."""
    count = 0
    while actions is None or count < actions:
        active = [w for w in workers if not w.finished]
        if not active:
            return
        rng.choices(active, weights=[1 + 2 * i for i in range(len(active))])[0].act(trained)
        count += 1


LOOP = {"num_examples": 30, "shard_size": 4, "epochs": 3}  # eight shards an epoch, the last of two


def every_example() -> Counter:
    ledger = ShardLedger(seed=0, **LOOP)
    return Counter((e, s, i) for e in range(LOOP["epochs"]) for s in range(ledger.num_shards)
                   for i in range(ledger.bounds(s)[1] - ledger.bounds(s)[0]))


def interrupted(ledger: ShardLedger, trained: list, rng: random.Random, at: int, written_after: int) -> dict:
    """Train ``at`` actions, snapshot, train ``written_after`` more (the checkpoint is being written):
    the ledger's state at the snapshot, as job.json holds it; ``trained`` is cut back to the snapshot."""
    workers = [SimWorker(f"w{i}", ledger, batch=3) for i in range(3)]
    drive(workers, trained, rng, at)
    positions = {w.name: list(w.position) for w in workers if w.position is not None}
    in_snapshot = len(trained)
    drive(workers, trained, rng, written_after)
    del trained[in_snapshot:]  # lost with the job
    return json.loads(json.dumps(ledger.state_at(positions)))


def finish(state: dict, trained: list, rng: random.Random) -> None:
    ledger = ShardLedger(seed=0, **LOOP)
    ledger.restore(state)
    drive([SimWorker(f"w{i}", ledger, batch=3) for i in range(3)], trained, rng)


def test_an_uninterrupted_loop_trains_every_example_once_per_epoch():
    trained: list = []
    ledger = ShardLedger(seed=0, **LOOP)
    drive([SimWorker(f"w{i}", ledger, batch=3) for i in range(3)], trained, random.Random(1))
    assert Counter(trained) == every_example()
    assert ledger.summary()["completed_per_epoch"] == {"0": 8, "1": 8, "2": 8} and ledger.summary()["unfinished"] == 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("at", [1, 9, 25, 40, 61, 90])
@pytest.mark.parametrize("written_after", [0, 4, 17])
def test_a_job_resumed_from_a_snapshot_trains_every_example_exactly_once_per_epoch(seed, at, written_after):
    rng = random.Random(seed)
    trained: list = []
    state = interrupted(ShardLedger(seed=0, **LOOP), trained, rng, at, written_after)
    finish(state, trained, rng)
    assert Counter(trained) == every_example()


def test_a_resumed_shard_finished_after_the_next_snapshot_without_its_worker_position_goes_back_with_its_skip():
    """Resume with shard P at skip 2. The next snapshot is copied before P's worker pushed anything
    (no position); P is then trained to the end and reported done before that snapshot's state is
    taken: P goes back to the queue, and the parameters still hold its examples 0 and 1."""
    ledger = ShardLedger(40, 4, 2, seed=7)
    p = handed(ledger, "w0")
    again = resumed(ledger.state_at({"w0": [*p, 2]}))
    assert again.next("w0")["skip"] == 2
    assert again.done("w0", *p)  # examples 2 and 3 trained after the snapshot was copied
    state = again.state_at({})  # w0 had pushed nothing when the servers copied their shards
    assert [*p, 2] in state["queue"]


def test_a_resumed_shard_handed_out_after_the_next_snapshot_and_finished_goes_back_with_its_skip():
    """Resume with shards P (skip 1) and Q (skip 2). w0 trains P and is at example 2 of it when the
    next snapshot is copied; then it finishes P, takes Q, finishes it, reports both done, and only then
    is the snapshot's state taken: Q, begun after the snapshot, goes back with the skip it had."""
    ledger = ShardLedger(40, 4, 2, seed=7)
    p, q = handed(ledger, "w0"), handed(ledger, "w1")
    again = resumed(ledger.state_at({"w0": [*p, 1], "w1": [*q, 2]}))
    assert again.next("w0")["skip"] == 1
    assert again.done("w0", *p)
    assert again.next("w0")["skip"] == 2
    assert again.done("w0", *q)
    state = again.state_at({"w0": [*p, 2]})
    assert state["queue"][:2] == [[*p, 2], [*q, 2]]


TWICE = [(seed, at) for seed in range(3) for at in (3, 20, 47)]


@pytest.mark.parametrize(("seed", "at"), TWICE)
def test_a_job_resumed_twice_trains_every_example_exactly_once_per_epoch(seed, at):
    rng = random.Random(seed)
    trained: list = []
    state = interrupted(ShardLedger(seed=0, **LOOP), trained, rng, at, 6)
    second = ShardLedger(seed=0, **LOOP)
    second.restore(state)
    state = interrupted(second, trained, rng, at // 2 + 1, 6)
    finish(state, trained, rng)
    assert Counter(trained) == every_example()


def test_a_resumed_ledger_keeps_its_shard_size_and_refuses_data_of_another_length():
    from downpour.errors import ConfigError

    ledger = ShardLedger(40, 4, 2, seed=7)
    e, s = handed(ledger, "w0")
    state = json.loads(json.dumps(ledger.state_at({"w0": [e, s, 3]})))
    more_workers = ShardLedger(40, 8, 2, seed=7)  # the automatic size of a job resumed with other workers
    more_workers.restore(state)
    assert more_workers.shard_size == 4 and more_workers.num_shards == 10 and more_workers.queue[0] == (e, s)
    with pytest.raises(ConfigError, match="trained on 40 training examples, this job's data holds 60"):
        ShardLedger(60, 4, 2, seed=7).restore(state)
    old = {k: v for k, v in state.items() if k not in ("num_examples", "shard_size")}  # a checkpoint of an older version
    ShardLedger(40, 4, 2, seed=7).restore(old)


def test_a_state_says_how_many_examples_it_holds_the_training_of():
    ledger = ShardLedger(42, 4, 2, seed=7)  # eleven shards, the last of two examples
    a, b = handed(ledger, "w0"), handed(ledger, "w1")
    ledger.done("w0", *a)
    assert ShardLedger.trained_in(ledger.state_at({"w0": [*a, 4], "w1": [*b, 3]})) == 4 + 3
    last = (a[0], 10)  # the short shard counts its two examples, not four
    assert ShardLedger.trained_in({**ledger.state_at({}), "completed": [list(last)], "queue": []}) == 2
    assert ShardLedger.trained_in({"completed": [], "queue": []}) is None  # an older state: no sizes


def test_in_a_final_snapshot_a_shard_reported_done_is_done_whatever_its_last_push_position():
    """A stream partition ends at its end marker, read after its last push: the final checkpoint kept
    it in the queue at that push's offset, and a resume waited for events after it forever."""
    ledger = ShardLedger(40, 4, 2, seed=7)
    e, s = handed(ledger, "w0")
    assert ledger.done("w0", e, s)
    later = handed(ledger, "w0")
    assert ledger.done("w0", *later)  # done with no push of its own (a partition holding only its end marker)
    final = ledger.state_at({"w0": [e, s, 1]}, final=True)
    assert [e, s] in final["completed"] and list(later) in final["completed"]
    assert all((q[0], q[1]) not in ((e, s), tuple(later)) for q in final["queue"])
    periodic = ledger.state_at({"w0": [e, s, 1]})  # while training goes on: what the snapshot holds
    assert periodic["queue"][0] == [e, s, 1] and [e, s] not in periodic["completed"]
