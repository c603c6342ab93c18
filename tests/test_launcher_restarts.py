"""The local launcher's decisions about dead processes, on made-up ones (no process starts here):
when a failure is a crash loop, and when no worker is left (the end-to-end case: tests/test_recovery.py)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from downpour.config import parse_job
from downpour.errors import JobFailed
from downpour.launch.local import LocalLauncher, Proc
from downpour.processes import EXIT_STOPPED

JOB = parse_job({"name": "t", "model": {"name": "mlp"}, "data": {"name": "idx", "path": "/nonexistent"},
                 "cluster": {"num_servers": 1, "num_workers": 2, "worker_restarts": 5}})


def proc(tmp_path, name: str, code: int | None, log: str, inherited: str | None = None, at: float = 0.0) -> Proc:
    path = tmp_path / f"{name}.log"
    path.write_text(log)
    return Proc(name, SimpleNamespace(pid=1000), str(path), ["worker"], exit_code=code, exited_at=at, inherited_error=inherited)


@pytest.fixture
def launcher(tmp_path):
    """A launcher that has started nothing (its decisions only)."""
    return LocalLauncher(JOB, str(tmp_path))


TRACE = "Traceback (most recent call last):\n  File 'x.py', line 1\nRuntimeError: a broken loss\n\n"


def test_an_error_exit_names_its_code_and_last_line_and_a_kill_names_nothing(tmp_path):
    assert proc(tmp_path, "w", 1, TRACE).error() == "exit code 1: RuntimeError: a broken loss"
    assert proc(tmp_path, "w", -signal.SIGKILL, TRACE).error() is None  # killed from outside
    assert proc(tmp_path, "w", 0, TRACE).error() is None
    assert proc(tmp_path, "w", None, TRACE).error() is None  # still running


def test_only_the_same_failure_twice_in_a_row_is_a_crash_loop(tmp_path, launcher):
    first = proc(tmp_path, "worker-0", 1, TRACE)
    same = proc(tmp_path, "worker-0.2", 1, TRACE, inherited=first.error())
    assert launcher._crash_loop(same, "...")
    other = proc(tmp_path, "worker-0.3", 1, "ValueError: something else\n", inherited=first.error())
    assert not launcher._crash_loop(other, "...")
    # killed twice with the same log (a kill leaves the last line a normal one): each kill is replaced
    killed = proc(tmp_path, "worker-1", -signal.SIGKILL, "worker-1: training on cpu\n")
    again = proc(tmp_path, "worker-1.2", -signal.SIGKILL, "worker-1: training on cpu\n", inherited=killed.error())
    assert killed.error() is None and not launcher._crash_loop(again, "...")
    first_of_rank = proc(tmp_path, "worker-2", 1, TRACE)  # an original process has nothing inherited
    assert not launcher._crash_loop(first_of_rank, "...")


@pytest.mark.parametrize("codes, replaced, stopping, left", [
    ((1, 1), (True, True), False, True),  # every worker failed and none is coming: fail now
    ((1, None), (True, False), False, False),  # one still runs
    ((1, 0), (True, False), False, False),  # the last one ended cleanly: the job is ending
    ((1, 1), (True, False), False, False),  # one failure not yet dealt with (the launcher's failure path has it)
    ((1, 1), (True, True), True, False),  # a graceful stop under way
])
def test_no_worker_left_only_when_every_worker_failed_and_none_can_be_started(tmp_path, launcher, codes, replaced, stopping,
                                                                             left):
    launcher.stopping = stopping
    launcher.procs = [proc(tmp_path, "coordinator", None, ""), proc(tmp_path, "server-0", None, "")]
    for i, (code, rep) in enumerate(zip(codes, replaced)):
        p = proc(tmp_path, f"worker-{i}", code, TRACE, at=float(i))
        p.replaced = rep
        launcher.procs.append(p)
    gone = launcher._no_worker_left()
    assert (gone is not None) == left
    if left:
        assert isinstance(gone, JobFailed) and gone.node == "worker-1"
        assert "none is left to start" in str(gone) and "RuntimeError: a broken loss" in str(gone)
        assert "not restarted again" not in str(gone)
        # Restarts were left, but each rank's replacement failed as it did: the message says why none was started
        launcher._crash_loop(proc(tmp_path, "worker-0.2", 1, TRACE, inherited=launcher.procs[2].error()), "...")
        assert "0 used; worker-0 not restarted again: its replacement failed with the same error" in str(launcher._no_worker_left())


def test_a_logged_error_is_the_same_whatever_its_time_pid_and_replacement_name(tmp_path, launcher):
    first = proc(tmp_path, "worker-1", 1, "2026-12-07 04:07:09,544 ERROR worker-1: the model's parameters do not match (pid 2492)\n")
    again = proc(tmp_path, "worker-1.2", 1, "2026-12-07 04:07:12,001 ERROR worker-1.2: the model's parameters do not match (pid 2525)\n",
                 inherited=first.error())
    assert first.error() == "exit code 1: ERROR worker-1: the model's parameters do not match (pid)"
    assert launcher._crash_loop(again, "...")
    other = proc(tmp_path, "worker-1.3", 1, "2026-12-07 04:07:15,001 ERROR worker-1.3: lost the coordinator\n",
                 inherited=again.error())
    assert not launcher._crash_loop(other, "...")
    assert proc(tmp_path, "w", 2, TRACE).error() != first.error()  # another exit code


@pytest.mark.parametrize("code, stopping, replaced_by", [
    (1, False, "worker-0.2"),  # a crash: replaced
    (-signal.SIGKILL, False, "worker-0.2"),  # killed from outside: replaced
    (EXIT_STOPPED, False, None),  # the coordinator stopped it (the job failed or ended): not a crash
    (1, True, None),  # a graceful stop under way: nothing is started any more
    (-signal.SIGKILL, True, None),
])
def test_a_worker_is_replaced_only_while_the_job_goes_on_and_only_if_it_was_not_stopped_by_the_coordinator(
        tmp_path, launcher, code, stopping, replaced_by):
    started = []
    launcher._spawn = lambda name, args, inherited_error=None: started.append(name)
    launcher.stopping = stopping
    assert launcher._recover(proc(tmp_path, "worker-0", code, "worker-0: stopped by the coordinator: server-1 died\n"))
    assert started == ([replaced_by] if replaced_by else [])
    assert launcher.restarts == (1 if replaced_by else 0)  # (a worker that was stopped uses up no restart)


def test_a_replacement_that_cannot_be_started_leaves_the_job_to_go_on_without_it(tmp_path, launcher, caplog):
    def cannot(name, args, inherited_error=None):
        raise JobFailed(f"Ray did not start {name} within ray.start_timeout_s=20s (its node is gone)")

    launcher._spawn = cannot
    assert launcher._recover(proc(tmp_path, "worker-1", -signal.SIGKILL, ""))
    assert "could not start worker-1.2 in place of worker-1 (Ray did not start" in caplog.text
    assert "the other workers take over its data" in caplog.text


@pytest.mark.parametrize("code", [-signal.SIGTERM, -signal.SIGINT, 130])
def test_a_coordinator_stopped_by_a_signal_during_the_stop_is_not_restarted(tmp_path, launcher, code):
    """Killed by the stop's own SIGTERM before it could take it, or stopped at once (a second SIGTERM:
    exit 130). Before, a 130 was restarted into the stop, and the launcher then killed the new one."""
    (tmp_path / "coordinator.db").write_text("")
    coord = Proc("coordinator", SimpleNamespace(pid=1000), str(tmp_path / "c.log"), ["coordinator", "--bind", "ipc://x"],
                 exit_code=code)
    launcher.stopping = True
    assert not launcher._restart_coordinator(coord) and launcher.coordinator_restarts == 0


def test_a_replacement_is_named_by_its_ranks_next_generation_as_the_coordinator_names_it(tmp_path, launcher):
    started = []
    launcher._spawn = lambda name, args, inherited_error=None: started.append(name)
    launcher.procs = [proc(tmp_path, n, None, "") for n in ("worker-0", "worker-1")]
    for dead in ("worker-0", "worker-1"):  # (the job's second restart is worker-1's first: worker-1.2, not .3)
        assert launcher._recover(proc(tmp_path, dead, -signal.SIGKILL, ""))
        launcher.procs.append(proc(tmp_path, started[-1], None, ""))
    assert launcher._recover(proc(tmp_path, "worker-1.2", -signal.SIGKILL, ""))
    assert started == ["worker-0.2", "worker-1.2", "worker-1.3"]


@pytest.mark.parametrize("aborted, ordered, dead, stopped", [
    (True, True, False, True),  # the coordinator's answer said stop (the job failed or ended): exit EXIT_STOPPED
    (True, True, True, False),  # ... declared dead: exit 1, a replacement takes its rank
    (True, False, False, False),  # the coordinator went silent or refused a heartbeat: exit 1
    (False, True, False, False),
])
def test_a_worker_exits_stopped_only_when_the_coordinators_answer_told_it_to_stop_and_not_as_dead(aborted, ordered, dead, stopped):
    import threading

    from downpour.worker.service import WorkerProcess

    w = WorkerProcess.__new__(WorkerProcess)  # (only what stopped() reads)
    w.abort = threading.Event()
    if aborted:
        w.abort.set()
    w.hb = SimpleNamespace(ordered=ordered, declared_dead=dead, reason="stopped by the coordinator: server-1 died")
    assert w.stopped() is stopped


def test_a_worker_that_dies_once_the_job_has_ended_is_not_replaced_and_a_summary_left_by_an_earlier_run_does_not_count(
        tmp_path, launcher):
    (tmp_path / "summary.json").write_text('{"status": "ok"}')
    late = proc(tmp_path, "worker-2", 130, "")  # (SIGTERM just after the job finished)
    spawned = []
    launcher._spawn = lambda *a, **k: spawned.append(a)
    assert launcher._recover(late) and late.replaced and spawned == []  # the job has ended: nothing to replace
    launcher._clear_last_run()  # a job resumed in its own folder: that summary is the last run's
    assert not (tmp_path / "summary.json").exists() and (tmp_path / "summary.previous.json").read_text() == '{"status": "ok"}'
    crashed = proc(tmp_path, "worker-1", 1, TRACE)
    assert launcher._recover(crashed) and [a[0] for a in spawned] == ["worker-1.2"]
