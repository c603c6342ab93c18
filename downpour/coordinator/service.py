"""The coordinator process: a listener, a clock, and the state machine.

The service owns the sockets and the run folder; every decision is made by
:class:`CoordinatorState`. It writes ``summary.json`` (and its own address, so
a launcher can find it) into the run folder.

Why a module of about 400 lines: it is the coordinator's whole executor (the serve loop, the
actions it performs, monitoring and the run folder); the decisions it carries out live in the
small modules beside it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import torch

from downpour.config import JobConfig, job_to_dict
from downpour.coordinator.checkpointing import JOB_STATE
from downpour.coordinator.history import History
from downpour.coordinator.keys import key_refusal
from downpour.coordinator.metrics import coordinator_metrics
from downpour.coordinator.persist import adopt_state, export_state, open_store
from downpour.coordinator.restore import plan_resume, plan_warm_start, rules_of
from downpour.coordinator.saving import pull_parameters, write_model
from downpour.coordinator.state import CommitCheckpoint, CoordinatorState, Finish, Reply, SaveModel
from downpour.data import build_dataset
from downpour.errors import ConfigError, DownpourError, ProtocolError
from downpour.layout import Layout, make_layout
from downpour.models import buffers as bufs
from downpour.models import build_model, param_shapes
from downpour.monitor import HttpEndpoint, metrics_route, node_labels
from downpour.monitor.http import static_file
from downpour.monitor.targets import targets_paths, write_targets
from downpour.nn import sparse_tables
from downpour.protocol import Op, decode, encode
from downpour.protocol.ops import Code
from downpour.protocol.rpc import RpcClient
from downpour.protocol.throttle import RateLimit
from downpour.server.scaling import check_hyperparameters
from downpour.storage import CheckpointStore, Manifest
from downpour.stream.offsets import Acknowledger, partition_offsets
from downpour.stream.prequential import online_summary
from downpour.transport import Context, Listener, Poller, Security, WouldBlock, advertised, is_local

log = logging.getLogger(__name__)

_TICK_S = 0.05
_SAVE_EVERY_S = 1.0  # the nodes' progress reaches the state file at least this often
# Requests that change nothing worth keeping (progress is saved once a second anyway).
_NOT_SAVED = (Op.HEARTBEAT, Op.STATUS)
_BURST = 256  # requests handled before the clock is looked at again


def plan_layout(job: JobConfig) -> Layout:
    """Build the model on the meta device (no memory) to learn its parameters, then partition them."""
    return plan_model(job)[0]


def plan_model(job: JobConfig) -> tuple[Layout, dict[str, str], set[str]]:
    """:func:`plan_layout`, the other names of trained parameters (tied weights) for ``model.pt``, and
    its bool buffers (they travel as uint8). A buffer no message can carry is a :class:`ConfigError`."""
    try:
        with torch.device("meta"):
            model = build_model(job.model, job.training.seed)
    except (RuntimeError, NotImplementedError):  # a factory that cannot run on meta tensors
        model = build_model(job.model, job.training.seed)
    cl = job.cluster
    shapes = param_shapes(model)
    layout = make_layout(shapes, cl.num_servers, "f32", cl.partitioner, cl.max_slice_bytes, tables=sparse_tables(model))
    trained = {name for name, _ in shapes}
    buffers = bufs.model_buffers(model, trained)
    bufs.check_sendable(buffers)
    return layout, bufs.aliases(model, trained), {n for n, t in buffers.items() if t.dtype == torch.bool}


def write_atomic(path: str, text: str) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never half."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, data: Any) -> None:
    """Strict JSON (NaN and infinities, which JSON has not, written as null): any parser reads it."""
    write_atomic(path, json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class Coordinator:
    def __init__(self, ctx: Context, job: JobConfig, address: str, run_dir: str | None,
                 security: Security | None = None, recover: bool = False, lost_at: float | None = None,
                 advertise: str | None = None) -> None:
        """``security``: the coordinator's CURVE keys (None: plain sockets, for trusted networks).
        ``advertise``: the host written into ``coordinator.addr`` (default: see :func:`advertised`).
        With a run folder the state is saved there (``coordinator.db``); ``recover`` continues the
        job a coordinator saved there (it crashed; found dead at ``lost_at``, wall clock)."""
        if recover and not run_dir:
            raise ConfigError("--recover needs --run-dir: the folder where the crashed coordinator saved its state")
        self.job = job
        self.security = security
        self.run_dir = run_dir
        layout, self.aliases, self.bool_buffers = plan_model(job)
        # (a short outage: it is waited for before coordinator.addr is written, which a launcher waits a minute for)
        dataset = build_dataset(job.data, unreachable_wait_s=min(30.0, job.cluster.startup_timeout_s))
        num_train = len(dataset.train)
        check_hyperparameters(job, num_train)  # warm-up and schedule against the job's length
        # A stream: each checkpoint's partition offsets go into its manifest, then are acknowledged.
        self.stream = Acknowledger(dataset.source) if getattr(dataset, "source", None) is not None else None
        cp = job.checkpoint
        self.checkpoint_url = cp.url or (os.path.abspath(os.path.join(run_dir, "checkpoints")) if run_dir else None)
        if cp.enabled and self.checkpoint_url is None:
            log.warning("coordinator: no run folder and no checkpoint.url: this job writes no checkpoints")
        self.exports = None  # each committed checkpoint, exported for serving (export.url)
        if job.export.url and self.checkpoint_url:
            from downpour.serving.export import Exporter, ExportThread

            ex = job.export
            self.exports = ExportThread(Exporter(ex.url, ex.precision, ex.full_every, ex.slice_size, job.data.url), self.checkpoint_url)
        resume = (plan_resume(cp.resume_from, layout, job.optimizer.name, sparse=rules_of(job, layout))
                  if cp.resume_from and not recover else None)
        self.state = CoordinatorState(job, layout, num_train, time.monotonic(), self.checkpoint_url if cp.enabled else None, resume)
        self.state.pid = os.getpid()
        self.store = None
        if run_dir:
            self.store, saved = open_store(run_dir, recover)
            if saved is not None:
                adopt_state(self.state, saved, time.monotonic(), lost_at)
        if job.init_from and resume is None and not recover:
            self.state.restore = plan_warm_start(job.init_from, layout)
        self._next_save = 0.0
        self._stop_asked = False  # request_stop() was called (SIGTERM); the serve loop passes it on
        self.ctx = ctx
        self.layout = layout
        self.listener = Listener(ctx, address, job.cluster.max_message_bytes, security)
        self.address = advertised(self.listener.address, None, advertise, "coordinator")
        self.advertise = advertise
        self.state.is_local = is_local
        self.state.pid_alive = pid_alive
        self.rejected: dict[str, int] = {}  # messages refused before the state machine saw them, by reason
        self.limit = RateLimit(job.cluster.coordinator_max_requests_per_s)
        log.info("coordinator: listening on %s; %d parameters in %d keys over %d servers",
                 self.address, layout.numel, len(layout.slices), layout.num_servers)
        if run_dir:
            write_atomic(os.path.join(run_dir, "coordinator.addr"), self.address)
        self._start_monitoring()

    # -- monitoring --------------------------------------------------------
    def _start_monitoring(self) -> None:
        """Dashboard, /metrics, Prometheus targets and TensorBoard, as the job's monitor section asks.

        The HTTP thread only serves bytes prepared here, in the coordinator's own thread, once per
        ``monitor.sample_interval_s``: it never reads the state machine while it changes."""
        mon = self.job.monitor
        self.history = History()
        self.snapshot: dict[str, Any] | None = None
        self._json = {"status": b"{}", "targets": b"[]"}
        self._targets: list[dict[str, Any]] = []
        self._next_sample = 0.0
        routes: dict[str, Any] = {}
        if mon.metrics:
            labels = node_labels(self.job.name, "coordinator", 0, "coordinator")
            routes["/metrics"] = metrics_route(coordinator_metrics(lambda: self.snapshot), labels)
            routes["/targets"] = lambda: ("application/json", self._json["targets"])
        if mon.dashboard:
            routes["/"] = lambda: static_file("index.html")
            routes["/api/status"] = lambda: ("application/json", self._json["status"])
            routes["/api/history"] = lambda: ("application/json", self.history.to_json())  # built on request
        self.endpoint = HttpEndpoint(mon.http_host, mon.dashboard_port, routes, "coordinator") if routes else None
        if self.endpoint is not None:
            log.info("coordinator: %s at http://%s/ (metrics at /metrics, Prometheus targets at /targets)",
                     "dashboard" if mon.dashboard else "HTTP endpoint (monitor.dashboard is off)", self.endpoint.address)
            if self.run_dir:
                url = advertised(self.endpoint.address, None, self.advertise, "dashboard", True)
                write_atomic(os.path.join(self.run_dir, "dashboard.url"), f"http://{url}/\n")
        self.tensorboard = None
        if mon.tensorboard and self.run_dir:
            from downpour.monitor.tensorboard import open_scalar_log

            self.tensorboard = open_scalar_log(os.path.join(self.run_dir, "tensorboard"))

    def _sample(self, now: float) -> None:
        status = self.state.status(now)
        self.history.sample(status["elapsed_s"], status)
        status["recent_examples_per_s"] = self.history.latest("job", "examples_per_s")
        self.snapshot = status
        self._json["status"] = json.dumps(status).encode()
        self._update_targets(status)
        if self.tensorboard is not None and status["phase"] == "training":
            scalars: dict[str, float | None] = {
                "train/loss": status["loss"], "train/examples_per_s": status["recent_examples_per_s"],
                "train/staleness_mean": status["staleness"]["mean"],
                **{f"optimizer/{k}": v for k, v in status["optimizer"].items() if k != "job_step"}}
            for n in status["nodes"]:
                if n["role"] == "worker" and n["state"] == "alive":
                    scalars[f"{n['name']}/loss"] = n["progress"].get("loss")
                    scalars[f"{n['name']}/examples_per_s"] = n["progress"].get("examples_per_s")
                    if "prequential_auc" in n["progress"]:  # a stream: the last window's AUC, scored before training
                        scalars[f"{n['name']}/prequential_auc"] = n["progress"]["prequential_auc"]
            self.tensorboard.add(scalars, status["steps"])

    def _update_targets(self, status: dict[str, Any]) -> None:
        """Prometheus file_sd targets: every node's /metrics, labelled with job, role, rank and node.
        A dead node stays listed (Prometheus then shows it down); a finished one is dropped."""
        targets = []
        if self.endpoint is not None and self.job.monitor.metrics:
            targets.append({"targets": [advertised(self.endpoint.address, None, self.advertise, "metrics", True)],
                            "labels": {"job": self.job.name, "role": "coordinator", "rank": "0", "node": "coordinator"}})
        for n in status["nodes"]:
            if n["metrics"] and n["state"] in ("alive", "done", "dead"):
                targets.append({"targets": [n["metrics"]],
                                "labels": {"job": self.job.name, "role": n["role"], "rank": str(n["rank"]), "node": n["name"]}})
        if targets == self._targets:
            return
        self._targets = targets
        self._json["targets"] = json.dumps(targets).encode()
        write_targets(self._targets_paths(), targets)

    def _targets_paths(self) -> list[str]:
        return targets_paths(self.run_dir, self.job.monitor.targets_dir, f"{self.job.name}-{os.getpid()}")

    def _stop_monitoring(self, summary: dict[str, Any]) -> None:
        self._sample(time.monotonic())
        write_targets(self._targets_paths(), [])  # the job is over: nothing left to scrape
        if self.tensorboard is not None:
            metrics = {f"test/{name}": v for name, v in (summary.get("test_metrics") or {}).items() if isinstance(v, (int, float))}
            self.tensorboard.add({"test/accuracy": summary.get("test_accuracy"), "test/loss": summary.get("test_loss"),
                                  "test/auc": summary.get("test_auc"), "test/logloss": summary.get("test_logloss"), **metrics,
                                  "train/examples_per_s_overall": summary.get("examples_per_s")}, int(summary.get("steps") or 0))
            self.tensorboard.close()
        if self.endpoint is not None:
            self.endpoint.close()

    def _save(self, now: float) -> None:
        """The state to disk (the parts that changed), before any answer that depends on it leaves."""
        self._next_save = now + _SAVE_EVERY_S
        if self.store is not None:
            self.store.save(export_state(self.state, now), self.state.ledger.journal)

    def _serve_requests(self, poller: Poller, timeout_s: float, finished: bool = False) -> Finish | None:
        """Handle every request that arrives within ``timeout_s``. Each is decoded within the job's
        size limits, rate-limited per connection (per key for a worker's own key), checked
        against the sender key's role (and a worker's own key against its rank) and handled; a
        handler that fails answers ERROR ``internal`` (counted, logged once per peer per interval)
        and the coordinator goes on. ``finished``: the job is over, only replies go out."""
        finish = None
        if not poller.poll(timeout_s):
            return None
        for i in range(_BURST):
            if i and not self.listener.ready():  # (the poll said the first one waits)
                break
            try:
                peer, frames = self.listener.recv()
            except WouldBlock:  # (not expected after ready(): a guard)
                break
            bound = self.listener.peer_rank(frames)  # a worker's own key: one rate window per key
            if self.limit.over(peer if bound is None else b"key:worker-%d" % bound):
                self.rejected[Code.RATE_LIMITED] = self.rejected.get(Code.RATE_LIMITED, 0) + 1
                continue  # dropped unanswered: an answer would cost as much
            try:
                msg = decode(frames, self.job.cluster.max_message_bytes)
            except ProtocolError as err:
                self.rejected[Code.MALFORMED] = self.rejected.get(Code.MALFORMED, 0) + 1
                if self.state.refusal_log.first(peer):
                    log.warning("coordinator: dropped a malformed message from %r: %s", peer, err)
                continue
            # Fail closed: with CURVE on, a sender whose key maps to no role may do nothing but STATUS.
            role = self.listener.peer_role(frames) or ("unknown" if self.security is not None else None)
            try:
                why = key_refusal(self.state, bound, peer, msg) if bound is not None else None
                if why is not None:
                    self.rejected[Code.FORBIDDEN] = self.rejected.get(Code.FORBIDDEN, 0) + 1
                    if self.state.refusal_log.first(peer):
                        log.warning("coordinator: refused %s from %r: %s", msg.op.name, peer, why)
                    actions = [Reply(peer, msg.error(Code.FORBIDDEN, why))]
                else:
                    actions = self.state.handle(peer, msg, time.monotonic(), role)
            except Exception as err:  # a bug, not the sender's fault: answer, count, keep serving
                self.rejected[Code.INTERNAL] = self.rejected.get(Code.INTERNAL, 0) + 1
                if self.state.refusal_log.first(peer):
                    log.exception("coordinator: %s from %r failed: %s", msg.op.name, peer, err)
                actions = [Reply(peer, msg.error(Code.INTERNAL, f"the coordinator failed to handle {msg.op.name}"))]
            if finished:
                self._perform([a for a in actions if isinstance(a, Reply)])
                continue
            refused = all(isinstance(a, Reply) and a.msg.op == Op.ERROR for a in actions)
            if msg.op not in _NOT_SAVED and not refused:  # (a refusal changes nothing worth a write)
                self._save(time.monotonic())
            # Each request's actions before the next request is handled: an action may
            # change the state a later request depends on (a checkpoint's commit).
            finish = self._perform(actions) or finish
        return finish

    def _perform(self, actions: list) -> Finish | None:
        finish = None
        for a in actions:
            if isinstance(a, Reply):
                self.listener.send(a.to, encode(a.msg))
            elif isinstance(a, Finish):
                finish = a
            elif isinstance(a, SaveModel):
                self._save_model(a)
            elif isinstance(a, CommitCheckpoint):
                self._commit_checkpoint(a)
                self._next_save = 0.0  # that it was committed: saved on the next turn
        return finish

    def _commit_checkpoint(self, a: CommitCheckpoint) -> None:
        """The job state, then the manifest: only a checkpoint with a manifest exists."""
        store = CheckpointStore(self.checkpoint_url, self.job.checkpoint.keep)
        state = {**a.job_state, "job": job_to_dict(self.job), "layout": self.layout.to_dict()}
        try:
            files = dict(a.files, **{JOB_STATE: store.write_file(a.name, JOB_STATE, json.dumps(state, indent=1).encode())})
            offsets = partition_offsets(state["ledger"], self.stream.source.spec.partitions) if self.stream else None
            manifest = Manifest(a.name, a.step, files, {"version": state["version"], "final": a.final, "time": time.time(),
                                                        "needs": a.needs, **({"stream": offsets} if offsets else {})})
            store.verify(manifest)  # every server's file is where the coordinator reads, whole (size, SHA-256), or no checkpoint
            store.commit(manifest)
            if offsets:  # the end of a job that read every partition to its end marker: all of it (an end
                # marker read in a batch of its own is in no push's position, so in no offset)
                done = a.final and self.state.ledger.complete()
                self.stream.committed({p: "end" for p in offsets} if done else offsets)
            if self.exports is not None:
                self.exports.committed(a.name)
        except Exception as err:  # any fsspec backend's error: this checkpoint is lost, the job goes on
            self.state.checkpoint_committed(time.monotonic(), False, f"{type(err).__name__}: {err}")
            return
        self.state.checkpoint_committed(time.monotonic(), True)
        log.info("coordinator: checkpoint %s complete (step %d)", store.where(a.name), a.step)

    def _save_model(self, action: SaveModel) -> None:
        """Write the trained parameters as a state_dict (``model.pt``, read with
        ``torch.load(path, weights_only=True)``) into the run folder."""
        if not self.run_dir:
            return
        rpc = RpcClient(self.ctx, f"coordinator-save-{os.getpid()}", self.job.cluster.request_timeout_s, security=self.security)
        try:
            for s in action.servers:
                rpc.connect(s["name"], s["address"])
            servers = {int(s["rank"]): s["name"] for s in action.servers}
            flat = pull_parameters(rpc, self.layout, servers, self.job.cluster.max_request_bytes)
            path = os.path.join(self.run_dir, "model.pt")
            # (bool buffers travel as uint8: model.pt holds them as the model does)
            buffers = {n: t.bool() if n in self.bool_buffers else t for n, t in action.buffers.items()} if action.buffers else None
            write_model(path, self.layout, flat, buffers, self.aliases)
            log.info("coordinator: saved the trained parameters to %s", path)
        except DownpourError as err:
            log.error("coordinator: could not save the trained parameters: %s", err)
        finally:
            rpc.close()

    def request_stop(self) -> None:
        """Stop the job gracefully (see :meth:`CoordinatorState.request_stop`). Safe to call from a
        signal handler or another thread: the serve loop acts on it within one tick."""
        self._stop_asked = True

    def serve(self) -> int:
        """Run until the job finishes or fails; returns the exit code (0 on success)."""
        poller = Poller()
        poller.register(self.listener)
        started = time.monotonic()
        for node in self.state.nodes.values():  # (restored ones) silent since this process serves, not since it loaded them
            node.last_seen = max(node.last_seen, started)
        finish = None
        while finish is None:
            finish = self._serve_requests(poller, _TICK_S)
            now = time.monotonic()
            if self._stop_asked:
                self._stop_asked = False
                asked = self.state.request_stop(now)
                self._save(now)
                finish = self._perform(asked) or finish
            ticked = self.state.tick(now)
            if ticked or now >= self._next_save:
                self._save(now)
            finish = self._perform(ticked) or finish
            if now >= self._next_sample:
                self._next_sample = now + self.job.monitor.sample_interval_s
                self._sample(now)
        summary = dict(finish.summary)
        refused = dict(summary.get("coordinator_refused") or {})
        for code, n in self.rejected.items():  # what never reached the state machine, with what it refused
            refused[str(code)] = refused.get(str(code), 0) + n
        summary["coordinator_refused"] = refused
        if self.exports is not None:  # the last checkpoint exported
            self.exports.drain(timeout_s=60.0)
        summary["sparse_kernel"] = _sparse_kernel(summary)
        if self.stream is not None:  # the last checkpoint's offsets acknowledged; the stream's figures
            self.stream.drain(timeout_s=5.0)
            summary["online"] = online_summary(summary.get("workers") or {}, self.stream.acked)
        if self.run_dir:
            write_json(os.path.join(self.run_dir, "summary.json"), summary)
        if finish.code == 0:
            log.info("coordinator: job finished: test accuracy %s", summary.get("test_accuracy"))
        # (a failed job's "job failed" line was logged when it failed: failures.fail)
        # Answer status queries a moment longer, so a launcher polling us sees the end: the same
        # checks as before (roles, limits), but only replies are sent and nothing is saved.
        end = time.monotonic() + 0.5
        while (left := end - time.monotonic()) > 0:
            self._serve_requests(poller, min(0.05, left), finished=True)
        self._stop_monitoring(summary)
        self.listener.close()
        if self.store is not None:
            self.store.close()
        return finish.code


def _sparse_kernel(summary: dict[str, Any]) -> str:
    """Which path the sparse tables took: "compiled", or why numpy (the servers' word, else this process's)."""
    from downpour.sparse.index import KERNEL

    said = [s["sparse"]["kernel"] for s in (summary.get("servers") or {}).values()
            if isinstance(s, dict) and isinstance(s.get("sparse"), dict) and "kernel" in s["sparse"]]
    slow = [k for k in said if k != "compiled"]
    return slow[0] if slow else (said[0] if said else KERNEL)


def pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` of this machine runs (a zombie has exited); None: cannot tell."""
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return None  # another user's process: not one of ours, and not ours to judge
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
