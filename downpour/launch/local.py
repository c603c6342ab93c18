"""Run a whole job as local processes: one coordinator, the servers, the workers.

The launcher starts the coordinator first (it binds a free port and writes its
address into the run folder), then the servers and workers pointed at it. It
polls the coordinator for progress and watches every process. A worker that
dies is replaced (``cluster.worker_restarts`` times per job; the coordinator puts
its data back, see ``CoordinatorState._worker_lost``), so is a server (it loads
the latest checkpoint) and the coordinator (on the same address; it picks up
the job from the state it saved in the run folder); any other process that
dies unexpectedly is reported as the root cause (with the end of its log),
and every process started is stopped, on success, failure or Ctrl-C alike.
A replacement that fails as the process it replaced did (the same exit code and
last log line: a deterministic error, a bug in user code, a bad file; not a kill
by a signal) is not replaced again,
and once no worker is left to train and none can be started the job fails at
once with that error, rather than when ``cluster.startup_timeout_s`` runs out.
Children also die with the launcher (``PR_SET_PDEATHSIG``), so none is orphaned.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from downpour.config import JobConfig, job_to_dict
from downpour.errors import DownpourError, JobFailed
from downpour.monitor.targets import targets_paths, write_targets
from downpour.processes import EXIT_STOPPED
from downpour.protocol import Message, Op
from downpour.protocol.rpc import RpcClient
from downpour.transport import Security, create_job_keys, new_context, remove_slots

log = logging.getLogger(__name__)

_STATUS_EVERY_S = 0.25
_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ ")  # logging's asctime
_PID = re.compile(r"\bpid \d+")
_REPLACEMENT = re.compile(r"\b((?:worker|server|coordinator)(?:-\d+)?)\.\d+\b")
_START_TIMEOUT_S = 60.0
_EXIT_GRACE_S = 10.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: str
    args: list[str] = field(default_factory=list)
    exit_code: int | None = None
    exited_at: float | None = None
    replaced: bool = False  # a worker that died and was replaced (or left for the coordinator to recover from)
    inherited_error: str | None = None  # a replacement: the :meth:`error` of the process it replaced

    def error(self) -> str | None:
        """How the process failed by itself: its exit code (> 0) and the last non-blank line of its log
        (a traceback's last line names the exception). None while it runs, after a clean exit, or when
        a signal killed it (a kill from outside, e.g. the OOM killer, says nothing about the next one)."""
        if self.exit_code is None or self.exit_code <= 0:
            return None
        tail = self.log_tail(lines=4).splitlines()
        last = next((line.strip() for line in reversed(tail) if line.strip()), "")
        # the same error in a replacement: another time stamp, pid and name (worker-1.2 for worker-1)
        last = _REPLACEMENT.sub(r"\1", _PID.sub("pid", _STAMP.sub("", last)))
        return f"exit code {self.exit_code}: {last}"

    def describe_exit(self) -> str:
        rc = self.exit_code
        if rc is not None and rc < 0:
            try:
                how = f"was killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"was killed by signal {-rc}"
        else:
            how = f"exited with code {rc}"
        return f"{self.name} (pid {self.popen.pid}) {how}"

    def log_tail(self, lines: int = 8) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:]).rstrip()
        except OSError:
            return ""


@dataclass
class RunResult:
    run_dir: str
    summary: dict[str, Any]
    exit_codes: dict[str, int | None] = field(default_factory=dict)


class LocalLauncher:
    def __init__(self, job: JobConfig, run_dir: str, python: str = sys.executable, insecure: bool = False) -> None:
        """Over ipc (``cluster.transport`` auto or ipc) the job's sockets sit in ``RUN_DIR/sock``,
        a folder only this user can open. Over tcp they authenticate and encrypt with CURVE keys
        made in ``RUN_DIR/keys`` (handed over as that folder's path, never on a command line),
        unless ``insecure``."""
        self.ipc = job.cluster.transport in ("auto", "ipc")
        self._tmp_sock: str | None = None
        self.insecure = insecure
        self.keys: str | None = None
        self.job = job
        self.run_dir = os.path.abspath(run_dir)
        self.python = python
        self.procs: list[Proc] = []
        self.restarts = 0  # worker replacements started
        self.server_restarts = 0  # server replacements started
        self.crash_loops: set[str] = set()  # ranks (worker-1, server-0) not restarted again: a crash loop
        self.coordinator_restarts = 0
        self.coordinator: Proc | None = None
        self.stopping = False  # request_stop() was called: a graceful stop is under way
        self._stop_sent: Proc | None = None  # the coordinator process told so (a restarted one is told again)
        self.address: str | None = None
        self.bind_host = "127.0.0.1"  # over tcp, the interface the coordinator and servers listen on
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(job.training.torch_threads))

    # -- processes ----------------------------------------------------------
    def _spawn(self, name: str, args: list[str], inherited_error: str | None = None) -> Proc:
        if self.insecure:
            args = [*args, "--insecure"]
        elif self.keys:
            args = [*args, "--keys", self.keys]
        log_path = os.path.join(self.run_dir, "logs", f"{name}.log")
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                [self.python, "-m", "downpour", *args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True, preexec_fn=_die_with_parent,
            )
        proc = Proc(name, popen, log_path, list(args), inherited_error=inherited_error)
        self.procs.append(proc)
        return proc

    def start(self) -> str:
        """Start every process; returns the coordinator's address."""
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)  # logs, state and keys: the user's only
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        job_path = os.path.join(self.run_dir, "config.yaml")
        with open(job_path, "w") as f:
            yaml.safe_dump(job_to_dict(self.job), f, sort_keys=False)
        if not (self.insecure or self.ipc):
            self.keys = os.path.join(self.run_dir, "keys")
            if not os.path.isdir(self.keys):
                create_job_keys(self.keys)
        addr_file = os.path.join(self.run_dir, "coordinator.addr")
        self._clear_last_run()
        cl = self.job.cluster
        ipc_dir = os.path.join(self.run_dir, "sock")
        if self.ipc and len(ipc_dir) > 70:  # unix socket paths are limited to about 107 bytes
            ipc_dir = self._tmp_sock = tempfile.mkdtemp(prefix="downpour-sock-")  # 0700, like RUN_DIR/sock
        bind = f"ipc://{ipc_dir}/coordinator.sock" if self.ipc else f"tcp://{self.bind_host}:*"
        if self.ipc:
            os.makedirs(ipc_dir, mode=0o700, exist_ok=True)
            os.chmod(ipc_dir, 0o700)
        coord = self.coordinator = self._spawn("coordinator", ["coordinator", job_path, "--bind", bind, "--run-dir", self.run_dir])
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not os.path.exists(addr_file):
            if coord.popen.poll() is not None:
                coord.exit_code = coord.popen.returncode
                raise JobFailed(f"the coordinator failed to start: {coord.describe_exit()}\n{coord.log_tail()}", node="coordinator")
            if time.monotonic() > deadline:
                raise JobFailed(f"the coordinator did not start within {_START_TIMEOUT_S:g}s; see {coord.log_path}", node="coordinator")
            time.sleep(0.05)
        with open(addr_file) as f:
            address = self.address = f.read().strip()
        for r in range(cl.num_servers):
            self._spawn(f"server-{r}", ["server", "--coordinator", address, "--rank", str(r), "--host", self.bind_host,
                                        "--ipc-dir", ipc_dir])
        for r in range(cl.num_workers):
            # Without keys a worker imports only the factories of a job file of its own (the one written here).
            trusted = ["--job", job_path] if self.insecure else []
            self._spawn(f"worker-{r}", ["worker", "--coordinator", address, "--rank", str(r), *trusted])
        return address

    def _clear_last_run(self) -> None:
        """What a run before this one in the same folder left (a job resumed in its own folder): its
        address file, and its summary, kept as ``summary.previous.json``. A summary there reads as this
        run's verdict: no replacement would be started, nor a crashed coordinator restarted."""
        addr_file = os.path.join(self.run_dir, "coordinator.addr")
        if os.path.exists(addr_file):
            os.remove(addr_file)
        summary = os.path.join(self.run_dir, "summary.json")
        if os.path.exists(summary):
            os.replace(summary, os.path.join(self.run_dir, "summary.previous.json"))

    def request_stop(self) -> None:
        """Stop the job gracefully: the coordinator (SIGTERM) has the workers leave after their
        current step, commits a final checkpoint and stops every node; :meth:`run` then returns
        a summary with ``status: stopped``. Safe to call from a signal handler."""
        self.stopping = True  # _watch passes it on to the coordinator (once it runs)

    def stop_all(self, grace_s: float = 3.0) -> None:
        """Stop every process still running at once: SIGINT (to each node SIGTERM means a graceful
        step: the coordinator's stop, a worker's leaving after its step, a server's serving on to
        the job's end), then SIGKILL after ``grace_s``."""
        live = [p for p in self.procs if p.popen.poll() is None]
        for p in live:
            try:
                p.popen.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        for p in live:
            try:
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=5.0)

    # -- watching -----------------------------------------------------------
    def run(self, on_status: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
        """Start the job, watch it to the end, and return its summary.

        Raises :class:`JobFailed` naming the first node that failed (and why), after
        stopping every process it started.
        """
        ctx = new_context()
        status_rpc: RpcClient | None = None
        try:
            address = self.start()
            security = Security.load(self.keys, "client") if self.keys else None
            status_rpc = RpcClient(ctx, f"launcher-{uuid.uuid4().hex[:6]}", request_timeout_s=2.0, security=security)
            status_rpc.connect("coordinator", address, role="coordinator")
            return self._watch(status_rpc, on_status)
        finally:
            self.stop_all()
            self._clear_targets()
            if self._tmp_sock:
                shutil.rmtree(self._tmp_sock, ignore_errors=True)
            elif self.ipc:
                remove_slots(os.path.join(self.run_dir, "sock"))  # shared-memory slots of workers that were killed
            if status_rpc is not None:
                status_rpc.close()
            ctx.term()

    def _clear_targets(self) -> None:
        """No Prometheus target outlives the job (the coordinator may have had no time to say so)."""
        write_targets(targets_paths(self.run_dir, self.job.monitor.targets_dir, self.job.name), [], only_existing=True)

    def _watch(self, rpc: RpcClient, on_status) -> RunResult:
        pending = None
        next_status = 0.0
        while True:
            now = time.monotonic()
            for p in self.procs:
                if p.exit_code is None and p.popen.poll() is not None:
                    p.exit_code, p.exited_at = p.popen.returncode, now
            failed = sorted((p for p in self.procs if p.exit_code not in (None, 0)), key=lambda p: p.exited_at or 0)
            coord = self.coordinator
            if self.stopping and self._stop_sent is not coord and coord.popen.poll() is None:
                coord.popen.send_signal(signal.SIGTERM)
                self._stop_sent = coord
            if coord.exit_code is not None and not self._restart_coordinator(coord):
                return self._finish(failed)
            failed = [p for p in failed if not (p.replaced or self._recover(p))]
            if failed:
                first = failed[0]
                # The coordinator's verdict names the root cause (a node it stopped after another failed
                # exits with an error too) and writes summary.json; it hears of a process of this machine
                # that was killed at once (coordinator/failures.py: exited), of others after
                # cluster.heartbeat_timeout_s, and is not waited for that long.
                if self._coordinator_ends(coord):
                    return self._finish(failed)
                tail = first.log_tail()
                raise JobFailed(f"{first.describe_exit()}; stopping the job.\n"
                                f"--- end of {first.log_path} ---\n{tail}" if tail else f"{first.describe_exit()}; stopping the job.",
                                node=first.name)
            gone = self._no_worker_left()
            if gone is not None:
                # The coordinator would wait cluster.startup_timeout_s for a worker to join: told, it fails
                # the job now and writes its summary (what was trained, the checkpoints, why it failed).
                self._abort(rpc, gone)
                if self._coordinator_ends(coord):
                    return self._finish(failed)
                raise gone
            if on_status is not None:
                if pending is not None and pending.done():
                    try:
                        on_status(pending.result().meta)
                    except DownpourError:
                        pass
                    pending = None
                elif pending is not None and pending.expired():  # a slow answer: ask again
                    pending = None
                if pending is None and now >= next_status:
                    next_status = now + _STATUS_EVERY_S
                    pending = rpc.request("coordinator", Message(Op.STATUS))
            time.sleep(0.05)

    def _recover(self, p: Proc) -> bool:
        """A worker died: with ``cluster.on_worker_failure: recover`` the coordinator puts its
        shards back, and (up to ``cluster.worker_restarts`` times per job) a replacement is
        started, which joins the running job. Returns whether the job goes on."""
        cl = self.job.cluster
        ended = os.path.exists(os.path.join(self.run_dir, "summary.json"))  # (the coordinator wrote its verdict)
        if self.stopping or p.exit_code == EXIT_STOPPED or ended:  # a graceful stop under way, or the job is over
            p.replaced = True
            log.info("%s; not replaced: %s", p.describe_exit(), "the job is stopping" if self.stopping else
                     "the job has ended" if ended else "the coordinator stopped it (the job failed or ended)")
            return True
        if p.name.startswith("server-"):  # a replacement loads the latest checkpoint (the coordinator says which)
            if cl.on_server_failure != "recover" or not (self.job.checkpoint.enabled or cl.replicas):
                return False
            p.replaced = True
            survivors = [q for q in self.procs if q.name.startswith("server-") and q.exit_code is None]
            if cl.replicas and survivors:  # the coordinator promotes a backup of each rank it served, on the other processes
                log.warning("%s; its ranks fail over to their backups (cluster.replicas=%d)", p.describe_exit(), cl.replicas)
                return True
            if cl.replicas:  # no process is left to hold a backup: a replacement loads the latest checkpoint
                if not (self.job.checkpoint.enabled or self.job.checkpoint.resume_from):
                    return False  # (nothing to load: the job cannot go on)
                log.warning("%s, the last server process: no backup is left to fail over to", p.describe_exit())
            if self.server_restarts >= cl.server_restarts:
                log.warning("%s; no server restarts left (cluster.server_restarts=%d): a surviving server takes over its "
                            "keys after cluster.server_replace_timeout_s=%gs", p.describe_exit(), cl.server_restarts,
                            cl.server_replace_timeout_s)
                return True
            if self._crash_loop(p, "a surviving server takes over its keys after cluster.server_replace_timeout_s"):
                return True
            self.server_restarts += 1
            name = self._next_name(p)
            log.warning("%s; starting %s in its place (server restart %d of %d)", p.describe_exit(), name,
                        self.server_restarts, cl.server_restarts)
            self._replace(p, name, "a surviving server takes over its keys after cluster.server_replace_timeout_s")
            return True
        if not p.name.startswith("worker-") or cl.on_worker_failure != "recover":
            return False
        p.replaced = True
        if self.restarts >= cl.worker_restarts:
            log.warning("%s; no restarts left (cluster.worker_restarts=%d): the other workers take over its data",
                        p.describe_exit(), cl.worker_restarts)
            return True
        if self._crash_loop(p, "the other workers take over its data"):
            return True
        self.restarts += 1
        name = self._next_name(p)
        log.warning("%s; starting %s in its place (restart %d of %d)", p.describe_exit(), name, self.restarts,
                    cl.worker_restarts)
        self._replace(p, name, "the other workers take over its data")
        return True

    def _next_name(self, p: Proc) -> str:
        """The name of ``p``'s replacement: its rank's next generation (worker-1.2, then worker-1.3), the
        name the coordinator gives it too (its log file is logs/NAME.log)."""
        base = p.name.split(".")[0]
        gens = [int(q.name.partition(".")[2] or 1) for q in [p, *self.procs] if q.name.split(".")[0] == base]
        return f"{base}.{1 + max(gens)}"

    def _replace(self, p: Proc, name: str, instead: str) -> None:
        """Start ``name`` in place of ``p``; one that cannot be started (on Ray: its node went with the
        process and no node has room for its bundle) does not fail the job, which goes on without it."""
        try:
            self._spawn(name, self._respawn_args(p), inherited_error=p.error())
        except (JobFailed, OSError) as err:
            log.warning("could not start %s in place of %s (%s): %s", name, p.name, str(err).splitlines()[0], instead)

    def _crash_loop(self, p: Proc, instead: str) -> bool:
        """Whether ``p``, a replacement, failed as the process it replaced did (the same exit code and
        last log line: :meth:`Proc.error`): then a third would too, and it is not started (logged, with
        what happens instead). A process killed by a signal is never part of a loop."""
        error = p.error()
        if error is None or error != p.inherited_error:
            return False
        log.warning("%s with the same error as the process it replaced (%s): not replaced again; %s",
                    p.describe_exit(), error[:200], instead)
        self.crash_loops.add(p.name.split(".")[0])
        return True

    def _no_worker_left(self) -> JobFailed | None:
        """Every worker process died and none will be started (no restarts left, or each rank in a crash
        loop): no worker can join, so the job fails now, with the last one's error, rather than when the
        coordinator's ``cluster.startup_timeout_s`` runs out. Not after a worker exited cleanly (the job is
        ending) or while a graceful stop is under way."""
        workers = [p for p in self.procs if p.name.startswith("worker-")]
        if self.stopping or not workers or any(p.exit_code is None for p in workers):
            return None
        last = max(workers, key=lambda p: p.exited_at or 0.0)
        if last.exit_code == 0 or not all(p.replaced for p in workers if p.exit_code):
            return None
        tail = last.log_tail()
        looped = sorted(r for r in self.crash_loops if r.startswith("worker-"))
        why = (f"; {', '.join(looped)} not restarted again: {'its replacement' if len(looped) == 1 else 'each one replacement'} "
               "failed with the same error, as every other would" if looped else "")
        return JobFailed(f"every worker process has died and none is left to start (cluster.worker_restarts="
                         f"{self.job.cluster.worker_restarts}, {self.restarts} used{why}); the last: {last.describe_exit()}; "
                         "stopping the job." + (f"\n--- end of {last.log_path} ---\n{tail}" if tail else ""), node=last.name)

    @staticmethod
    def _abort(rpc: RpcClient, failure: JobFailed) -> None:
        """Fail the job at the coordinator with ``failure`` (its first line: the log tail is added
        from the failed node's log when the verdict comes back). A coordinator that does not answer
        is then waited for as before, and the job fails without its summary."""
        reason = str(failure).split("\n", 1)[0][:4000]
        try:
            rpc.call("coordinator", Message(Op.ABORT, meta={"reason": reason, "node": failure.node or "launcher"}), timeout_s=2.0)
        except DownpourError as err:
            log.warning("could not tell the coordinator that the job failed: %s", err)

    def _kill_declared_dead(self, name: str | None) -> None:
        """The node the coordinator failed the job for, if its process still runs, is hung (no
        heartbeat, a restore that never ended): it will not exit when told, so it is killed now
        rather than after the others' grace period."""
        if name is None:
            return
        for p in self.procs:
            if p.name.split(".")[0] == name and p.popen.poll() is None:  # (worker-1.2 serves as worker-1)
                log.warning("%s (pid %d) was declared dead by the coordinator but still runs; killing it", p.name, p.popen.pid)
                p.popen.kill()

    def _coordinator_ends(self, coord: Proc) -> bool:
        """A node exited with an error: often because the coordinator stopped it after another
        node failed (the coordinator then ends the job moments later, naming that node). Wait a
        little for the coordinator to end; returns whether it did."""
        try:
            coord.popen.wait(timeout=3 * self.job.cluster.heartbeat_interval_s + 3.0)
        except subprocess.TimeoutExpired:
            return False
        coord.exit_code, coord.exited_at = coord.popen.returncode, time.monotonic()
        return os.path.exists(os.path.join(self.run_dir, "summary.json"))

    def _restart_coordinator(self, p: Proc) -> bool:
        """The coordinator died before the job ended (no summary written): start another on the
        same address with ``--recover`` (it continues from ``RUN_DIR/coordinator.db``; the nodes
        reconnect by themselves), up to ``cluster.coordinator_restarts`` times. Returns whether
        one was started."""
        from downpour.coordinator.persist import STATE_FILE

        cl = self.job.cluster
        # Stopped by a signal while the job stops: killed by the stop's own SIGTERM before it could take it,
        # or stopped at once by a second SIGTERM or a SIGINT (130): what was asked for, not a crash to recover from.
        if self.stopping and p.exit_code in (-signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT):
            return False
        if (p.exit_code == 0 or os.path.exists(os.path.join(self.run_dir, "summary.json"))
                or not os.path.exists(os.path.join(self.run_dir, STATE_FILE)) or self.coordinator_restarts >= cl.coordinator_restarts):
            return False
        p.replaced = True
        self.coordinator_restarts += 1
        args = self._respawn_args(p)
        args[args.index("--bind") + 1] = self.address
        name = f"coordinator.{self.coordinator_restarts + 1}"
        log.warning("%s; starting %s on %s to continue the job (coordinator restart %d of %d)", p.describe_exit(), name,
                    self.address, self.coordinator_restarts, cl.coordinator_restarts)
        self.coordinator = self._spawn(name, [*args, "--recover", "--lost-at", repr(time.time())])
        return True

    def _record_exits(self, summary: dict[str, Any], path: str) -> None:
        """Add the processes that died while the job ran, as this launcher saw them, to the summary
        (``launcher.exits``, ``launcher.restarts``): the coordinator's ``failures`` name only nodes it
        knew, so not a process that died before it registered, and not how a process ended."""
        exits = [{"process": p.name, "pid": p.popen.pid, "exit_code": p.exit_code, "how": p.describe_exit(),
                  **({"error": p.error()} if p.error() else {})}
                 for p in self.procs if p.replaced and p.exit_code not in (0, EXIT_STOPPED)]  # (not those that left as told)
        if not exits:
            return
        from downpour.coordinator.service import write_json

        summary["launcher"] = {"exits": exits, "restarts": {"worker": self.restarts, "server": self.server_restarts,
                                                             "coordinator": self.coordinator_restarts}}
        try:
            write_json(path, summary)
        except OSError as err:
            log.warning("could not add the launcher's record to %s: %s", path, err)

    def _respawn_args(self, p: Proc) -> list[str]:
        args = [a for a in p.args if a not in ("--insecure", "--recover")]
        for flag in ("--keys", "--lost-at"):
            if flag in args:
                i = args.index(flag)
                del args[i : i + 2]
        return args

    def _finish(self, failed: list[Proc]) -> RunResult:
        summary_path = os.path.join(self.run_dir, "summary.json")
        try:
            with open(summary_path) as f:
                summary = json.load(f)
        except (OSError, ValueError):
            summary = None
        if summary is not None and summary.get("status") not in ("ok", "stopped"):
            self._kill_declared_dead(summary.get("failed_node"))
        # The coordinator is done; the others exit on their own within a heartbeat or two.
        deadline = time.monotonic() + _EXIT_GRACE_S
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if p.exit_code is None and p.popen.poll() is not None:
                p.exit_code = p.popen.returncode
        if summary is None:
            coord = self.coordinator
            tail = coord.log_tail()
            raise JobFailed(f"{coord.describe_exit()} before writing the job's summary; stopping the job."
                            + (f"\n--- end of {coord.log_path} ---\n{tail}" if tail else ""), node="coordinator") from None
        codes = {p.name: p.exit_code for p in self.procs}
        self._record_exits(summary, summary_path)
        if summary.get("status") not in ("ok", "stopped"):
            node = summary.get("failed_node") or (failed[0].name if failed else "coordinator")
            culprit = next((p for p in self.procs if p.name == node), None)
            tail = culprit.log_tail() if culprit else ""
            detail = f"\n--- end of {culprit.log_path} ---\n{tail}" if tail else ""
            killed = f" ({culprit.describe_exit()})" if culprit is not None and (culprit.exit_code or 0) < 0 else ""
            raise JobFailed(f"{summary.get('error')}{killed}{detail}", node=node)
        return RunResult(self.run_dir, summary, codes)
