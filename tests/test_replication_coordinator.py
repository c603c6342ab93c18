"""The coordinator's side of replication, as a state machine with a fake clock: where each rank's
backups go, which backup is promoted when a primary dies (and when none may be), what servers and
workers are told, and that the plan survives a coordinator restart."""

from __future__ import annotations

from downpour.config import parse_job
from downpour.coordinator.failures import EXIT_CHECK_S
from downpour.coordinator.persist import STATE_FILE, StateStore, adopt_state, export_state, open_store
from downpour.coordinator.state import CoordinatorState
from downpour.layout import make_layout
from downpour.models import build_model, param_shapes
from downpour.protocol import Message, Op
from tests.test_coordinator_state import error_code, ident, ok, one, replies

NUM_TRAIN = 10
SERVERS = [f"server-{i}" for i in range(3)]
WORKERS = [f"worker-{i}" for i in range(2)]


def job(replicas: int = 1, **cluster):
    return parse_job({
        "name": "tiny",
        "model": {"name": "mlp", "args": {"input_shape": [4], "hidden": [3], "num_classes": 2}},
        "data": {"shard_size": 4},
        "training": {"epochs": 2},
        "cluster": {"num_servers": 3, "num_workers": 2, "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 5.0,
                    "startup_timeout_s": 60.0, "replicas": replicas, **cluster},
    })


class Cluster:
    """A coordinator with 3 server processes (pids 100..102) and 2 workers, training."""

    def __init__(self, replicas: int = 1, **cluster) -> None:
        self.job = job(replicas, **cluster)
        self.layout = make_layout(param_shapes(build_model(self.job.model, 0)), 3)
        self.now = 0.0
        self.state = CoordinatorState(self.job, self.layout, NUM_TRAIN, self.now)
        self.req = 0
        for i, s in enumerate(SERVERS):
            self.send(s, Op.REGISTER, role="server", rank=i, address=f"tcp://127.0.0.1:{7000 + i}", host="h", pid=100 + i)
        for i, w in enumerate(WORKERS):
            self.send(w, Op.REGISTER, role="worker", rank=i, host="h", pid=200 + i)
        assert self.state.phase == "training"

    def send(self, who: str, op: Op, **meta) -> list:
        self.req += 1
        if op not in (Op.REGISTER, Op.STATUS):
            meta.setdefault("node", who)
        return self.state.handle(ident(who), Message(op, self.req, meta), self.now)

    def heartbeat(self, who: str, **progress) -> dict:
        return ok(one(self.send(who, Op.HEARTBEAT, progress=progress), to=who))

    def caught_up(self, seq: int = 40) -> None:
        """Every primary reports its backup caught up; every backup reports itself ready at ``seq``."""
        plan = self.state.replica_plan
        for s in SERVERS:
            rank = int(s.split("-")[1])
            backups = [f"server-{int(p.split('/')[1]) - 100}/{p.split('/')[1]}" for p in plan[rank]]
            kept = {str(r): [True, seq, self.state.replica_addresses[r]] for r, procs in plan.items() if f"h/{100 + rank}" in procs}
            self.heartbeat(s, version=seq, replication={"seq": seq, "backups": backups}, backups=kept)

    def silent(self, victim: str, until: float) -> list:
        """Everyone but ``victim`` heartbeats (as :meth:`caught_up`) until ``until``; then the clock passes."""
        out = []
        t = self.now
        while t + 1.0 < until:
            t += 1.0
            self.now = t
            for n in [*SERVERS, *WORKERS]:
                node = self.state.nodes.get(n)
                if n != victim and node is not None and node.state == "alive":
                    if n.startswith("server"):
                        rank = int(n.split("-")[1])
                        procs = self.state.replica_plan.get(rank, [])
                        self.heartbeat(n, replication={"backups": [f"server-{int(p.split('/')[1]) - 100}/{p.split('/')[1]}"
                                                                   for p in procs]},
                                       backups={str(r): [True, 40, self.state.replica_addresses[r]]
                                                for r, ps in self.state.replica_plan.items() if f"h/{100 + rank}" in ps})
                    else:
                        self.send(n, Op.HEARTBEAT)
        self.now = until
        out += self.state.tick(until)
        return out


def test_each_rank_gets_its_backups_on_the_next_processes_and_servers_learn_theirs_in_heartbeat_answers():
    c = Cluster()
    assert c.state.replica_plan == {0: ["h/101"], 1: ["h/102"], 2: ["h/100"]}
    answer = c.heartbeat("server-1")
    assert answer["backups"] == [{"rank": 0, "address": "tcp://127.0.0.1:7000"}] and answer["replica_gen"] == 1
    assert answer["keepers"] == ["server-2/102"]  # who keeps server-1's own rank: backups name themselves NAME/PID
    two = Cluster(replicas=2)
    plan = two.state.replica_plan  # every other process, each keeping two backups
    assert {r: sorted(p) for r, p in plan.items()} == {0: ["h/101", "h/102"], 1: ["h/100", "h/102"], 2: ["h/100", "h/101"]}


def test_without_replicas_nothing_is_planned_and_heartbeat_answers_say_nothing_of_backups():
    c = Cluster(replicas=0)
    assert c.state.replica_plan == {} and "backups" not in c.heartbeat("server-1")


def test_a_dead_primary_is_replaced_by_its_caught_up_backup_without_a_checkpoint_and_workers_learn_its_address():
    c = Cluster()
    c.caught_up()
    out = c.silent("server-1", 7.0)
    assert c.state.nodes["server-1"].state == "dead" and c.state.phase == "training"  # no checkpoint, yet not failed
    [promote] = replies(out, to="server-2")
    assert promote.msg.op == Op.PROMOTE and promote.msg.meta["ranks"] == [1]
    assert c.heartbeat("server-2")["host_ranks"] == [1]  # repeated until it registers
    [record] = c.state.failures
    assert record.promoted_to == "server-2" and record.rolled_back_versions == 0 and record.restored_from is None
    assert c.state.replica_plan[1] == ["h/102"]  # its backups stay as they were until the promoted one registers
    # The backup's server registers for the rank, from server-2's process: no checkpoint to load.
    c.now = 7.2
    registered = c.send("server-1.p", Op.REGISTER, role="server", rank=1, address="tcp://127.0.0.1:7102", host="h",
                        pid=102, hosted_by="server-2", promoted=True)
    answer = ok(replies(registered, to="server-1.p")[0])
    assert answer["rank"] == 1 and answer["restore"] is None
    assert record.promoted_after_s == 0.2 and record.replaced_by == "server-1 (pid 102)"
    assert c.state.replica_plan == {0: ["h/102"], 1: ["h/100"], 2: ["h/100"]}  # nothing on the dead process
    assert c.state.replica_addresses[1] == "tcp://127.0.0.1:7102"
    told = [r for r in replies(registered) if r.msg.op == Op.PROMOTE]  # the workers, at once, on their heartbeat connection
    assert sorted(r.to for r in told) == [ident("worker-0") + b".hb", ident("worker-1") + b".hb"]
    assert told[0].msg.meta["servers_gen"] == c.state.servers_gen
    worker = c.heartbeat("worker-0")
    assert {"name": "server-1", "address": "tcp://127.0.0.1:7102"}.items() <= next(s for s in worker["servers"] if s["rank"] == 1).items()
    # Its first heartbeat: serving (recovered); its first request and its new backup complete the record.
    c.now = 7.5
    c.state.handle(ident("server-1.p"), Message(Op.HEARTBEAT, 99, {"node": "server-1", "progress": {
        "replication": {"backups": ["server-0/100"], "first_request_s": 0.05}}}), c.now)
    assert record.recovered_after_s == 0.5 and record.failover_s == 0.25 and record.rereplicated_after_s == 0.3
    assert "host_ranks" not in c.heartbeat("server-2")


def test_the_backup_furthest_along_is_promoted():
    c = Cluster(replicas=2)
    c.caught_up()
    # server-2's process is further along than server-0's for rank 1.
    for s, seq in (("server-2", 50), ("server-0", 45)):
        kept = {str(r): [True, seq, c.state.replica_addresses[r]] for r, ps in c.state.replica_plan.items()
                if f"h/{100 + int(s[-1])}" in ps}
        c.heartbeat(s, backups=kept)
    c.now = 5.0
    for n in ("server-0", "server-2", *WORKERS):
        c.send(n, Op.HEARTBEAT)
    out = c.state.tick(7.0)
    assert [r.to for r in replies(out) if r.msg.op == Op.PROMOTE] == [ident("server-2")]


def test_a_backup_the_primary_never_reported_caught_up_is_not_promoted():
    c = Cluster()
    for s in SERVERS:  # the backups say they are ready, but no primary confirmed them
        rank = int(s[-1])
        c.heartbeat(s, backups={str(r): [True, 40, c.state.replica_addresses[r]] for r, ps in c.state.replica_plan.items()
                                if f"h/{100 + rank}" in ps})
    c.now = 1.0
    for n in ("server-0", "server-2", *WORKERS):
        c.send(n, Op.HEARTBEAT)
    out = c.state.tick(7.0)
    assert not [r for r in replies(out) if r.msg.op == Op.PROMOTE]
    assert c.state.phase == "failed" and "no checkpoint to restart a server from" in c.state.error  # as without replicas


def test_a_server_registering_while_a_promotion_is_pending_does_not_take_the_rank_from_a_checkpoint():
    c = Cluster()
    c.caught_up()
    c.silent("server-1", 7.0)
    # The promoted backup registers first, whatever else comes.
    ok(replies(c.send("server-1.p", Op.REGISTER, role="server", rank=1, address="tcp://127.0.0.1:7102", host="h", pid=102,
                  hosted_by="server-2", promoted=True), to="server-1.p")[0])
    late = c.send("server-1.x", Op.REGISTER, role="server", rank=1, address="tcp://127.0.0.1:7999", host="h", pid=300)
    assert late == [] or error_code(one(late))  # waits, or is refused: never handed the served rank
    assert c.state.nodes["server-1"].pid == 102


def test_the_plan_and_a_pending_promotion_survive_a_coordinator_restart(tmp_path):
    c = Cluster()
    c.caught_up()
    c.silent("server-1", 7.0)
    store = StateStore(str(tmp_path / STATE_FILE))
    store.save(export_state(c.state, 7.0), c.state.ledger.journal)
    store.close()
    again = CoordinatorState(c.job, c.layout, NUM_TRAIN, 100.0)
    _, parts = open_store(str(tmp_path), recover=True)
    adopt_state(again, parts, 100.0)
    assert again.replica_plan == c.state.replica_plan and again.replica_gen == c.state.replica_gen
    assert again.replica_addresses == c.state.replica_addresses and again.hosting == {1: "server-2"}
    assert again.failures[0].promoted_to == "server-2" and 1 in again.server_slots


def test_with_replicas_a_server_whose_process_exited_is_declared_dead_at_once_but_only_once_seen_running():
    c = Cluster()
    c.caught_up()
    running = {100: True, 101: True, 102: True}
    c.state.pid_alive = lambda pid: running.get(pid)
    c.now = 0.5
    assert c.state.tick(0.5) == []  # every server process seen running
    running[101] = False
    assert c.state.tick(0.6) == []  # (processes are looked for every EXIT_CHECK_S)
    out = c.state.tick(0.5 + EXIT_CHECK_S)
    assert c.state.nodes["server-1"].state == "dead" and [r.msg.op for r in replies(out)] == [Op.PROMOTE]
    assert "exited" in c.state.failures[0].reason
    # A process never seen running (another pid namespace, a pid this machine does not have) is
    # left to the heartbeat timeout.
    other = Cluster()
    other.state.pid_alive = lambda pid: False
    assert other.state.tick(0.5) == [] and all(n.state == "alive" for n in other.state.nodes.values())
    # Not of this machine: left to the heartbeat timeout.
    remote = Cluster()
    remote.state.is_local = lambda host: False
    remote.state.pid_alive = lambda pid: pid != 101
    remote.state.tick(0.5)
    assert remote.state.tick(0.5 + EXIT_CHECK_S) == [] and remote.state.nodes["server-1"].state == "alive"


def test_a_backup_of_a_dead_process_is_not_kept_by_a_later_server_of_the_same_name():
    """The promoted server of rank 1 is named server-1 again, in another process: the backup that
    the dead server-1's process kept for rank 0 is no longer among rank 0's keepers."""
    c = Cluster()
    c.caught_up()
    c.silent("server-1", 7.0)
    c.send("server-1.p", Op.REGISTER, role="server", rank=1, address="tcp://127.0.0.1:7102", host="h", pid=102,
           hosted_by="server-2", promoted=True)
    keepers = c.heartbeat("server-0")["keepers"]
    assert "server-1/101" not in keepers and keepers == ["server-1/102", "server-2/102"]


def test_a_dead_process_loses_the_backups_it_kept_and_ranks_short_of_backups_are_reported():
    from downpour.coordinator.metrics import coordinator_metrics
    from downpour.monitor.metrics import Families

    c = Cluster(replicas=2)
    c.caught_up()
    rep = c.state.status(c.now)["replication"]
    assert rep == {"replicas": 2, "planned": {"0": 2, "1": 2, "2": 2}, "caught_up": {"0": 2, "1": 2, "2": 2}, "short": []}
    c.silent("server-1", 7.0)  # its process kept backups of ranks 0 and 2
    [record] = c.state.failures
    assert record.backups_lost == [0, 2] and record.to_dict()["backups_lost"] == [0, 2]
    # Two processes left: every rank can have one backup only (rank 1 keeps its two until its promotion).
    status = c.state.status(c.now)
    assert status["replication"]["planned"] == {"0": 1, "1": 2, "2": 1} and status["replication"]["short"] == [0, 2]
    assert c.state.summary(c.now)["replication"]["short"] == [0, 2]
    fams = Families({})
    coordinator_metrics(lambda: status)(fams)
    [short] = [f for f in fams.families() if f.name == "downpour_coordinator_ranks_short_of_backups"]
    assert short.samples[0].value == 2


def test_without_replicas_no_replication_is_reported():
    c = Cluster(replicas=0)
    assert "replication" not in c.state.status(c.now) and "replication" not in c.state.summary(c.now)
