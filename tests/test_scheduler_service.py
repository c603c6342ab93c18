"""The scheduler service with fake processes and a fake clock: submission checks, cancels, preemption
bookkeeping, restarts with back-off, a restarted scheduler, and the HTTP API through its client."""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn
import yaml

from downpour.errors import ConfigError, DataError
from downpour.scheduler import Phase, Resources
from downpour.scheduler.runner import Exit, run_folder
from downpour.scheduler.service import Scheduler, SchedulerSettings, UnknownJob
from tests.conftest import tiny_job


class FakeRunner:
    """Processes that run until the test ends them (``finish``/``crash``) or a signal arrives."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.procs: dict[int, dict] = {}
        self.next_pid = 1000
        self.signals: list[tuple[int, int]] = []

    def start(self, job_id, attempt, cwd=None):
        self.next_pid += 1
        run_dir = run_folder(self.root, job_id, attempt)
        self.procs[self.next_pid] = {"job": job_id, "alive": True, "exit": None, "run_dir": run_dir}
        return self.next_pid, run_dir, run_folder(self.root, job_id, attempt - 1) if attempt else None

    def alive(self, pid, run_dir):
        p = self.procs.get(pid)
        return bool(p and p["alive"] and p["run_dir"] == run_dir)

    def find(self, run_dir):
        return next((pid for pid, p in self.procs.items() if p["alive"] and p["run_dir"] == run_dir), None)

    def exit(self, pid, run_dir):
        return self.procs[pid]["exit"] if pid in self.procs else Exit(None, None)

    def signal(self, pid, run_dir, sig=15):
        self.signals.append((pid, sig))
        return self.alive(pid, run_dir)

    def end(self, job, how):
        p = self.procs[job.pid]
        p["alive"] = False
        p["exit"] = {"finish": Exit(0, {"status": "ok", "error": None}), "stopped": Exit(0, {"status": "stopped", "error": None}),
                     "crash": Exit(1, None),  # killed before it wrote a summary
                     "refused": Exit(2, None),  # downpour train refused the job before it started
                     # a failure seen by a scheduler that adopted the process: no exit code, the summary says it
                     "failed": Exit(None, {"status": "failed", "error": "worker-0 died"})}[how]



class GracefulRunner(FakeRunner):
    """A SIGTERM asks for a stop; the process ends as a graceful stop does (a final checkpoint, then
    exit 0 with status "stopped") only when the test calls :meth:`release`, from any thread."""

    def release(self, pid):
        self.procs[pid]["exit"] = Exit(0, {"status": "stopped", "error": None})
        self.procs[pid]["alive"] = False


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def make(tmp_path, tiny_data):
    made = []

    def build(policy="fifo", cpus=4, root=None, runner=None, clock=None, **kw):
        root = root or str(tmp_path / "sched")
        runner = runner or FakeRunner(root)
        clock = clock or Clock()
        s = Scheduler(SchedulerSettings(root=root, nodes={"here": Resources(cpus=cpus, memory_mb=8192)}, policy=policy, **kw),
                      clock=clock, runner=runner)
        made.append(s)
        return s, runner, clock

    yield build
    for s in made:
        s.store.close()


def job_yaml(data, servers=1, workers=1, **sections):
    return yaml.safe_dump(tiny_job(data, cluster={"num_servers": servers, "num_workers": workers}, **sections))


def test_a_job_naming_a_factory_beside_its_job_file_is_checked_where_it_was_submitted_from(make, tiny_data, tmp_path,
                                                                                           monkeypatch):
    """`downpour submit` from a project folder: the scheduler imports the factory from there, as
    `downpour train` there would, and forgets it afterwards (another folder may hold another one)."""
    import sys

    s, _, _ = make()
    job = yaml.safe_load(job_yaml(tiny_data))
    job["model"] = {"factory": "projmodels:net"}
    for n, width in (("a", 8), ("b", 12)):
        (tmp_path / n).mkdir()
        (tmp_path / n / "projmodels.py").write_text(
            f"import torch\ndef net(): return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, {width}), "
            f"torch.nn.ReLU(), torch.nn.Linear({width}, 10))\n")
    with pytest.raises(ConfigError, match="model.factory: cannot import 'projmodels'"):
        s.submit(yaml.safe_dump(job), cwd=str(tmp_path))  # no such module there
    assert s.submit(yaml.safe_dump(job), cwd=str(tmp_path / "a")).name == "tiny"
    assert "projmodels" not in sys.modules and str(tmp_path / "a") not in sys.path
    bad = dict(job, training={**job["training"], "loss": "projmodels:nope"})
    with pytest.raises(ConfigError, match="projmodels:nope"):
        s.submit(yaml.safe_dump(bad), cwd=str(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "projmodels.py").write_text("import sys\nsys.exit('a module that exits when imported')\n")
    with pytest.raises(ConfigError, match="the job's code failed while it was checked: SystemExit: a module that exits"):
        s.submit(yaml.safe_dump(job), cwd=str(tmp_path / "c"))  # (the scheduler goes on)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "projshadow.py").write_text("raise RuntimeError('the local projshadow, found first')\n")
    (tmp_path / "installed").mkdir()  # (a module of the same name where installed packages are)
    (tmp_path / "installed" / "projshadow.py").write_text((tmp_path / "a" / "projmodels.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path / "installed"))
    shadowed = dict(job, model={"factory": "projshadow:net"})
    with pytest.raises(ConfigError, match="RuntimeError: the local projshadow, found first"):  # as the job's processes would find it
        s.submit(yaml.safe_dump(shadowed), cwd=str(tmp_path / "d"))
    assert len(s.jobs) == 1


def test_a_bad_job_is_refused_naming_the_field_and_nothing_is_stored(make, tiny_data):
    s, _, _ = make()
    bad = yaml.safe_load(job_yaml(tiny_data))
    bad["training"]["batch_size"] = 0
    with pytest.raises(ConfigError, match="training.batch_size"):
        s.submit(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="not valid YAML"):
        s.submit("model: [unclosed")
    with pytest.raises(ConfigError, match="user"):
        s.submit(job_yaml(tiny_data), user="a b")
    with pytest.raises(ConfigError, match="too little cpus"):
        s.submit(job_yaml(tiny_data, servers=2, workers=3))  # 5 tasks, 4 slots: never queued forever
    missing = yaml.safe_load(job_yaml(tiny_data))
    missing["data"]["path"] = "/nonexistent/folder"
    with pytest.raises(DataError, match="nonexistent"):
        s.submit(yaml.safe_dump(missing))
    assert s.jobs == {} and s.store.load() == []


def test_unknown_job_ids_are_named(make, tiny_data):
    s, _, _ = make()
    s.submit(job_yaml(tiny_data))
    with pytest.raises(UnknownJob, match="no job 7 .latest job IDs: 1"):
        s.cancel(7)
    with pytest.raises(UnknownJob):
        s.logs(7)


def test_jobs_start_in_policy_order_and_finish(make, tiny_data):
    s, runner, clock = make(cpus=2)
    a = s.submit(job_yaml(tiny_data))
    b = s.submit(job_yaml(tiny_data))
    s.step()
    assert (a.phase, b.phase) == (Phase.RUNNING, Phase.QUEUED)
    clock.t += 10
    runner.end(a, "finish")
    s.step()
    assert a.phase is Phase.DONE and b.phase is Phase.RUNNING and a.attained == 2 * 10


def test_a_preempted_job_resumes_from_its_checkpoint_and_a_cancel_during_the_stop_wins(make, tiny_data):
    s, runner, clock = make(policy="las", cpus=2, policy_options={"thresholds": [20.0]})
    long = s.submit(job_yaml(tiny_data))
    s.step()
    clock.t += 30  # 60 task-s: past the threshold
    short = s.submit(job_yaml(tiny_data))
    s.step()
    assert long.phase is Phase.STOPPING and long.preemptions == 1 and runner.signals == [(long.pid, 15)]
    runner.end(long, "stopped")
    s.step()
    assert long.phase is Phase.QUEUED and long.attempt == 1 and short.phase is Phase.RUNNING
    runner.end(short, "finish")
    s.step()
    assert long.phase is Phase.RUNNING and long.extra["resumed_from"] == run_folder(s.settings.root, long.id, 0)
    # Preempted again, and cancelled while it stops: it ends cancelled, not queued.
    clock.t += 30
    third = s.submit(job_yaml(tiny_data))
    s.step()
    assert long.phase is Phase.STOPPING
    s.cancel(long.id)
    runner.end(long, "stopped")
    s.step()
    assert long.phase is Phase.CANCELLED and third.phase is Phase.RUNNING
    with pytest.raises(ConfigError, match="already cancelled"):
        s.cancel(long.id)


def test_a_failing_job_is_restarted_with_back_off_then_failed(make, tiny_data):
    s, runner, clock = make(cpus=2, max_restarts=2, backoff_s=10.0)
    job = s.submit(job_yaml(tiny_data))
    s.step()
    for k, delay in enumerate((10.0, 20.0)):
        runner.end(job, "crash")
        s.step()
        assert job.phase is Phase.QUEUED and job.restarts == k + 1 and job.not_before_s == clock.t + delay
        clock.t += delay - 1
        s.step()
        assert job.phase is Phase.QUEUED  # still backing off
        clock.t += 1
        s.step()
        assert job.phase is Phase.RUNNING and job.attempt == k + 1
    runner.end(job, "crash")
    s.step()
    assert job.phase is Phase.FAILED and "after 2 restarts" in job.message


def test_a_job_refused_before_it_started_is_failed_at_once_with_why(make, tiny_data):
    # exit 2: its config, data or storage was refused; another attempt would be refused the same way
    from downpour.scheduler.runner import log_path

    s, runner, clock = make(cpus=2, max_restarts=3, backoff_s=10.0)
    job = s.submit(job_yaml(tiny_data))
    s.step()
    with open(log_path(s.settings.root, job.id, job.attempt), "a") as f:
        f.write("starting\ndownpour: checkpoint.url memory://x: memory:// is one process's memory\n")
    runner.end(job, "refused")
    s.step()
    assert job.phase is Phase.FAILED and job.restarts == 0
    assert job.message.startswith("refused before it started (exit 2: checkpoint.url memory://x: memory:// is one process's")


def test_a_job_stopped_by_hand_goes_back_to_the_queue_without_counting_as_a_failure(make, tiny_data):
    s, runner, clock = make(cpus=2)
    job = s.submit(job_yaml(tiny_data))
    s.step()
    runner.end(job, "stopped")  # someone sent its downpour train SIGTERM: it committed a checkpoint and stopped
    s.step()
    assert job.phase is Phase.RUNNING and job.attempt == 1 and job.restarts == 0


def test_a_restarted_scheduler_loses_no_job_and_adopts_the_running_ones(make, tiny_data, tmp_path):
    s, runner, clock = make(cpus=2)
    ids = [s.submit(job_yaml(tiny_data)).id for _ in range(3)]
    s.step()
    running = s.jobs[ids[0]]
    s.store.close()  # killed: nothing more is written
    s2, _, _ = make(cpus=2, root=s.settings.root, runner=runner, clock=clock)
    assert sorted(s2.jobs) == ids and s2.jobs[ids[0]].phase is Phase.RUNNING and s2.jobs[ids[0]].pid == running.pid
    runner.end(running, "finish")  # ends while no scheduler watches... or under the new one
    s2.step()
    assert s2.jobs[ids[0]].phase is Phase.DONE and s2.jobs[ids[1]].phase is Phase.RUNNING
    # A job whose process failed while the scheduler was down is restarted, not forgotten.
    runner.end(s2.jobs[ids[1]], "failed")
    s2.store.close()
    s3, _, _ = make(cpus=2, root=s.settings.root, runner=runner, clock=clock)
    assert s3.jobs[ids[1]].phase is Phase.QUEUED and s3.jobs[ids[1]].restarts == 1
    assert s3.jobs[ids[2]].phase is Phase.QUEUED


def test_the_http_api_and_metrics(make, tiny_data):
    from downpour.scheduler.client import SchedulerClient
    from downpour.scheduler.http import build_app

    s, runner, clock = make(cpus=2)
    config = uvicorn.Config(build_app(s), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        client = SchedulerClient(f"http://127.0.0.1:{sock.getsockname()[1]}", timeout_s=10)
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        a = client.submit(job_yaml=job_yaml(tiny_data), user="ann", queue="research", priority=2)
        b = client.submit(job_yaml=job_yaml(tiny_data), user="bob")
        s.step()
        jobs = client.jobs()
        assert [j["id"] for j in jobs] == [a["id"], b["id"]] and jobs[0]["phase"] == "running" and jobs[1]["position"] == 1
        with pytest.raises(ConfigError, match="no job 99"):
            client.job(99)
        bad = yaml.safe_load(job_yaml(tiny_data))
        bad["cluster"]["num_workers"] = "many"
        with pytest.raises(ConfigError, match="cluster.num_workers"):
            client.submit(job_yaml=yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match="priority"):
            client.submit(job_yaml=job_yaml(tiny_data), priority="high")
        # A malformed body is a 400 naming the field, as documented (an infinity was a 500, other errors 422)
        import json
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{sock.getsockname()[1]}/jobs", data=b'{"job_yaml": "x", "priority": 1e400}',
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 400 and "priority" in json.loads(refused.value.read())["detail"]
        text = client.metrics()
        assert 'downpour_scheduler_queue_length{queue="default",user="bob"} 1.0' in text
        assert 'downpour_scheduler_dominant_share{queue="research",user="ann"} 1.0' in text
        assert client.cancel(b["id"])["phase"] == "cancelled"
        assert client.cluster()["capacity"]["cpus"] == 2
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _wait_for(done, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"not done in {timeout_s} s"
        time.sleep(0.002)


def test_cancels_racing_the_end_of_a_preemption_from_other_threads_lose_no_job(make, tiny_data, tmp_path, caplog):
    """The scheduler ticks in its own thread (as `downpour scheduler` does); each round a new job
    preempts the running one, and while that one stops, three threads cancel it at the moment its
    stop completes. Whichever wins, it ends cancelled, is never started again, and the job that
    preempted it runs; every job is in the store as it is in memory."""
    root = str(tmp_path / "sched")
    runner = GracefulRunner(root)
    s, _, clock = make(policy="las", cpus=2, root=root, runner=runner, policy_options={"thresholds": [20.0]}, tick_s=0.001)
    stop = threading.Event()
    loop = threading.Thread(target=s.run, args=(stop,), daemon=True)
    loop.start()
    answers: list[str] = []
    try:
        prev = s.submit(job_yaml(tiny_data))
        _wait_for(lambda: prev.phase is Phase.RUNNING and prev.pid is not None)
        for _ in range(10):
            clock.t += 30  # 60 task-s: past the threshold, so the next job preempts it
            pid = prev.pid
            nxt = s.submit(job_yaml(tiny_data))
            _wait_for(lambda a=prev: a.phase is Phase.STOPPING)
            go = threading.Barrier(4, timeout=10)

            def cancel(job_id=prev.id, go=go):
                go.wait()
                try:
                    s.cancel(job_id)
                    answers.append("cancelled")
                except ConfigError as err:
                    answers.append("already" if "already cancelled" in str(err) else f"unexpected: {err}")

            def stopped(pid=pid, go=go):
                go.wait()
                runner.release(pid)

            threads = [threading.Thread(target=cancel) for _ in range(3)] + [threading.Thread(target=stopped)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=10)
            _wait_for(lambda a=prev, b=nxt: a.phase is Phase.CANCELLED and b.phase is Phase.RUNNING and b.pid is not None)
            assert [p["job"] for p in runner.procs.values()].count(prev.id) == 1  # never started again
            prev = nxt
    finally:
        stop.set()
        loop.join(timeout=10)
    assert not loop.is_alive()
    assert set(answers) <= {"cancelled", "already"} and "cancelled" in answers, answers
    assert [j.phase for j in sorted(s.jobs.values(), key=lambda j: j.id)] == [Phase.CANCELLED] * 10 + [Phase.RUNNING]
    assert {j.id: (j.phase, j.attempt) for j in s.store.load()} == {j.id: (j.phase, j.attempt) for j in s.jobs.values()}
    assert [p["job"] for p in runner.procs.values() if p["alive"]] == [prev.id]
    assert s.free()["here"].cpus == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_a_finished_jobs_view_says_how_long_it_ran_over_every_attempt():
    from downpour.scheduler.http import job_view
    from downpour.scheduler.model import Job

    job = Job(7, (Resources(cpus=1),) * 5, 0.0, phase=Phase.DONE, first_started_s=10.0, finished_s=100.0, attained=5 * 42.0)
    s = Scheduler.__new__(Scheduler)  # (job_view reads only the policy's rank of the job)
    s.policy = type("P", (), {"describe": lambda self, job, now: "-"})()
    view = job_view(s, job, now=200.0)
    assert view["running_s"] == 0.0 and view["ran_s"] == 42.0  # (it is not running; it ran 42 s in all)


@pytest.mark.parametrize("columns,shown", [(80, False), (200, True)])
def test_the_jobs_table_keeps_what_matters_on_a_narrow_terminal(monkeypatch, capsys, columns, shown):
    import argparse

    from downpour.cli import scheduler as cli

    job = {"id": 7, "name": "mnist", "queue": "default", "user": "ana", "priority": 5, "phase": "running", "position": None,
           "tasks": 5, "wait_s": 1.0, "running_s": 12.0, "ran_s": 12.0, "attained": 60.0, "rank": "0.4", "preemptions": 1, "restarts": 0,
           "message": "attempt 1 failed (exit 1: worker-0 died of a CUDA error); restart 1 in 5 s"}
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setattr(cli, "_client", lambda args: argparse.Namespace(jobs=lambda: [job]))
    assert cli.cmd_jobs(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("mnist", "running", "message", "CUDA", "restart")), out  # (the message wraps)
    assert ("policy rank" in out) is shown


def test_a_failed_attempt_s_message_names_the_failing_process_s_exception_from_the_quoted_log(tmp_path):
    """The launcher's last line says that every worker died; the cause is in the worker's log, which the
    launcher quotes after it. The scheduler's message carries both."""
    from downpour.scheduler.service import last_error

    log = tmp_path / "attempt-1.log"
    log.write_text("downpour: job: 1 servers, 2 workers, async\n"
                   "downpour: job failed: every worker process has died and none is left to start; stopping the job.\n"
                   "--- end of /runs/j/logs/worker-1.log ---\n"
                   "  File \"/home/u/model.py\", line 9, in forward\n"
                   "    raise ValueError('boom in my forward')\n"
                   "ValueError: boom in my forward\n")
    assert last_error(str(log)) == (": job failed: every worker process has died and none is left to start; stopping the job. "
                                    "[worker-1: ValueError: boom in my forward]")
    log.write_text("downpour: job failed: the coordinator failed to start: exit 1\n"
                   "--- end of /runs/j/logs/coordinator.log ---\n"
                   "torch.OutOfMemoryError: CUDA out of memory\nsomething after\n")
    assert last_error(str(log)).endswith("[coordinator: torch.OutOfMemoryError: CUDA out of memory]")
    log.write_text("downpour: job failed: a server is unreachable\n")  # nothing quoted: the line alone
    assert last_error(str(log)) == ": job failed: a server is unreachable"
    log.write_text("Traceback (most recent call last):\nValueError: not ours\n")  # no line of ours: nothing
    assert last_error(str(log)) == ""
    assert last_error(str(tmp_path / "missing.log")) == ""
