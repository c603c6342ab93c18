"""The worker process: register, build model and data, initialise, train, report.

A heartbeat thread (its own socket) tells the coordinator this worker is alive
and carries its progress; if the coordinator goes silent or orders a stop, the
thread sets the abort flag and every wait of the main thread ends at once
with :class:`JobFailed` rather than waiting out its timeout.
"""

from __future__ import annotations

import logging
import signal
import threading
import traceback
from collections.abc import Callable
from typing import Any

import torch

from downpour.config import JobConfig, job_to_dict, parse_job
from downpour.coordinator.client import CoordinatorClient, Heartbeat, connection_id
from downpour.data import build_dataset
from downpour.errors import ConfigError, DownpourError, RemoteError
from downpour.layout import Layout
from downpour.models import buffers as bufs
from downpour.models import build_model
from downpour.monitor import HttpEndpoint, metrics_route, node_labels
from downpour.nn import attach
from downpour.processes import EXIT_STOPPED, TermSignal, apply_cpu_policy
from downpour.protocol import Message, Op
from downpour.protocol.ops import Code
from downpour.protocol.rpc import RpcClient
from downpour.transport import Context, Security, advertised
from downpour.worker.client import KVClient
from downpour.worker.flat import FlatModel
from downpour.worker.metrics import worker_metrics
from downpour.worker.sparse import SparseClient
from downpour.worker.trainer import LeaveOrder, Trainer

log = logging.getLogger(__name__)

# Waits for other workers (the start, the end of training) last as long as the
# job; they end early through the abort flag when the coordinator stops answering.
_LONG_WAIT_S = 7 * 24 * 3600.0


class HeartbeatThread(threading.Thread):
    def __init__(self, ctx: Context, address: str, node: str, job: JobConfig,
                 progress: Callable[[], dict[str, Any]], abort: threading.Event, extra: dict[str, Any] | None = None,
                 security: Security | None = None, on_reply: Callable[[dict[str, Any]], None] | None = None,
                 identity: str | None = None) -> None:
        """``identity``: the routing id the node registered with (the coordinator takes heartbeats
        for ``node`` only from that id + ``.hb``)."""
        super().__init__(name=f"{node}-heartbeat", daemon=True)
        self.identity = identity or node
        self.on_reply = on_reply
        self.security = security
        self.ctx, self.address, self.node, self.job = ctx, address, node, job
        self.progress, self.abort, self.extra = progress, abort, extra
        self.reason = "stopped"
        self.declared_dead = False  # the coordinator's stop said this worker was declared dead
        self.ordered = False  # the coordinator's answer said stop (not an error, not a coordinator gone silent)
        self._halt = threading.Event()

    def run(self) -> None:
        cl = self.job.cluster
        client = CoordinatorClient(self.ctx, self.address, f"{self.identity}.hb", cl.request_timeout_s,
                                   security=self.security)
        client.node = self.node
        hb = Heartbeat(client, cl.heartbeat_interval_s, cl.coordinator_timeout_s, extra=self.extra, on_reply=self.on_reply)
        client.rpc.on_push = self._pushed
        try:
            while not self._halt.wait(min(0.1, cl.heartbeat_interval_s / 4)):
                try:
                    client.rpc.pump(0.0)  # (an unprompted PROMOTE need not wait for the next heartbeat)
                    reason = hb.tick(self.progress)
                    self.ordered = reason is not None
                except DownpourError as err:
                    reason = str(err)
                if reason is not None:
                    self.reason = f"stopped by the coordinator: {reason}"
                    self.declared_dead = hb.declared_dead
                    self.abort.set()
                    return
        finally:
            client.close()

    def _pushed(self, peer: str, msg: Message) -> None:
        """The coordinator's unprompted PROMOTE: a backup took over a server rank (meta: servers,
        servers_gen, as in heartbeat answers)."""
        if msg.op == Op.PROMOTE and self.on_reply is not None:
            self.on_reply({k: msg.meta.get(k) for k in ("servers", "servers_gen")})

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5.0)


class ServerMap:
    """Where each server listens. The heartbeat thread hands in what the coordinator says after a
    server was replaced (:meth:`offer`); the main thread applies it whenever it waits on a request
    (:meth:`apply`, as ``RpcClient.on_wait``): it reconnects to the new process, and requests
    still waiting on the old one end with ``peer_replaced``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rpc: RpcClient | None = None
        self.kv: KVClient | None = None
        self.addresses: dict[str, str] = {}
        self.pids: dict[str, int] = {}  # each server's process, as the coordinator last said
        self.gen = 0
        self._offered: tuple[int, list] | None = None

    def offer(self, meta: dict[str, Any]) -> None:
        gen, servers = meta.get("servers_gen"), meta.get("servers")
        if type(gen) is int and gen > self.gen and isinstance(servers, list):
            self._offered = (gen, servers)  # one reference assignment: safe across threads

    def apply(self) -> None:
        offered = self._offered
        if offered is None or offered[0] <= self.gen or self.rpc is None:
            return
        self.gen = offered[0]
        for s in offered[1]:
            name, address, pid = (s.get("name"), s.get("address"), s.get("pid")) if isinstance(s, dict) else (None, None, None)
            if name not in self.addresses or not isinstance(address, str):
                continue
            moved = address != self.addresses[name]
            restarted = type(pid) is int and pid > 0 and self.pids.get(name, pid) != pid  # a new process at the same address
            if type(pid) is int:
                self.pids[name] = pid
            if moved or restarted:
                self.addresses[name] = address
                lost = self.rpc.reconnect(name, address)
                if self.kv is not None:
                    self.kv.set_address(name, address)
                log.warning("%s: %s %s (a replacement); %d request(s) to the old one dropped", self.name, name,
                            f"moved to {address}" if moved else f"restarted at {address}", lost)


def device_for(job: JobConfig, rank: int, local_rank: int | None = None) -> torch.device:
    """The worker's device: ``training.device`` cpu; cuda (GPU ``local_rank`` modulo the GPUs visible,
    ``local_rank`` being the worker's place among this machine's workers, its rank by default);
    cuda:N; or a list naming one device per worker rank."""
    want = job.training.device
    if isinstance(want, list):
        want = want[rank % len(want)]
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("device: %s asked for, but no GPU is visible; computing on the CPU", want)
        return torch.device("cpu")
    index = int(want[5:]) if want.startswith("cuda:") else (rank if local_rank is None else local_rank) % torch.cuda.device_count()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"training.device: {want} but this machine has {torch.cuda.device_count()} GPU(s)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def job_factories(job: JobConfig) -> set[str]:
    """Every import string a job names: each ``factory`` (model, data, and any section that has one),
    the loss, metrics and collate function, and a registered update rule's module."""
    found: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if k.endswith("factory") and isinstance(x, str):
                    found.add(x)
                else:
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(job_to_dict(job))
    # The other user code a job names by import path (downpour/extensions.py): imported on workers too.
    t = job.training
    found.update(t.metrics.values())
    if ":" in t.loss:
        found.add(t.loss)
    if job.data.loader.collate_fn:
        found.add(job.data.loader.collate_fn)
    module = getattr(job.optimizer, "module", None)
    if module:
        found.add(module)
    return found


def run_worker(ctx: Context, coordinator: str, rank: int | None = None, startup_timeout_s: float = 120.0,
               metrics_host: str | None = None, security: Security | None = None,
               trusted_factories: set[str] | None = None, advertise: str | None = None,
               local_rank: int | None = None) -> int:
    """Entry point of ``downpour worker``: returns the process exit code. ``metrics_host``
    overrides the job's ``monitor.http_host`` for this worker's metrics endpoint (advertised
    as ``advertise`` when given: see :func:`~downpour.transport.advertised`).
    ``trusted_factories`` (unauthenticated workers): the only factories the job from the
    coordinator may name; any other is refused before anything is imported. ``local_rank``
    (the worker's place among its machine's workers, e.g. from LOCAL_RANK) picks its GPU."""
    w = WorkerProcess(ctx, coordinator, rank, security)
    try:
        w.join(startup_timeout_s, trusted_factories, metrics_host, advertise)
        w.build(local_rank)
        left = w.train()
        if left is not None:
            return left
        w.report()
        return 0
    except RemoteError as err:
        if err.code == "job_running" and w.coord.node == w.coord.identity:  # came too late to join: not a failure
            log.warning("%s: %s", w.name, err)
            return 0
        log.error("%s: %s", w.name, err)
        if not w.abort.is_set():
            _report_error(w.coord, str(err))
        return EXIT_STOPPED if err.code == "job_failed" or w.stopped() else 1
    except DownpourError as err:
        log.error("%s: %s", w.name, err)
        if not w.abort.is_set():  # when the coordinator stopped us, it knows why already
            _report_error(w.coord, str(err))
        return EXIT_STOPPED if w.stopped() else 1
    except Exception as err:  # a bug or a user-code failure: tell the coordinator the root cause
        log.error("%s: %s\n%s", w.name, err, traceback.format_exc())
        _report_error(w.coord, f"{type(err).__name__}: {err}")
        return 1
    finally:
        w.close()


class WorkerProcess:
    """One worker's life, in the order :func:`run_worker` calls it: :meth:`join` (register, check
    the job, start heartbeats and metrics), :meth:`build` (model, data, connections to the
    servers, the trainer), :meth:`train` (initialise, then train until the shards run out or the
    job stops), :meth:`report` (statistics and buffers to the coordinator, then the evaluation
    it asks for); :meth:`close` releases whatever was opened, at any point."""

    def __init__(self, ctx: Context, coordinator: str, rank: int | None, security: Security | None) -> None:
        self.ctx, self.coordinator, self.rank, self.security = ctx, coordinator, rank, security
        self.abort = threading.Event()
        self.hb: HeartbeatThread | None = None
        self.endpoint: HttpEndpoint | None = None
        self.coord = CoordinatorClient(ctx, coordinator, connection_id("worker", rank),
                                       abort=self.abort, abort_reason=self._reason, security=security)
        self.rpc: RpcClient | None = None
        self.kv: KVClient | None = None
        self.trainer: Trainer | None = None
        self.name = self.coord.identity
        self.servers = ServerMap(self.name)
        self.leave = LeaveOrder()  # the coordinator asked this worker to leave (a graceful stop of the job)

    def _reason(self) -> str:
        return self.hb.reason if self.hb else "aborted"

    def stopped(self) -> bool:
        """Whether the coordinator stopped this worker (the job failed or ended), not as declared dead."""
        return self.abort.is_set() and self.hb is not None and self.hb.ordered and not self.hb.declared_dead

    def join(self, startup_timeout_s: float, trusted_factories: set[str] | None, metrics_host: str | None,
             advertise: str | None) -> None:
        coord = self.coord
        reply = coord.register("worker", self.rank, None, timeout_s=startup_timeout_s)
        self.reply, self.name = reply, reply["node"]
        self.servers.name = self.name
        self.job = job = parse_job(reply["job"], source="coordinator")
        apply_cpu_policy(job.cluster.cpu_policy)
        if trusted_factories is not None:
            foreign = sorted(job_factories(job) - trusted_factories)
            if foreign:
                raise ConfigError(f"{self.name}: the coordinator's job names {', '.join(foreign)}, which no job file given "
                                  "with --job names: an unauthenticated coordinator may not make this worker import code")
        self.layout = Layout.from_dict(reply["layout"])
        coord.configure(job.cluster.coordinator_timeout_s, job.cluster.heartbeat_timeout_s)
        # Heartbeats start at once: the coordinator watches this worker from now on, and
        # building the model and reading the data can take seconds on a busy machine.
        if job.monitor.metrics:
            labels = node_labels(job.name, "worker", reply["rank"], self.name)
            route = metrics_route(worker_metrics(lambda: self.trainer), labels)
            self.endpoint = HttpEndpoint(metrics_host or job.monitor.http_host, 0, {"/metrics": route}, self.name)
        extra = {"metrics": advertised(self.endpoint.address, self.coordinator, advertise, "metrics", True)} if self.endpoint else None
        self.hb = HeartbeatThread(self.ctx, self.coordinator, self.name, job,
                                  self._progress, self.abort, extra=extra,
                                  security=self.security, on_reply=self._on_reply, identity=coord.identity)
        self.hb.start()

    def _progress(self) -> dict[str, Any]:
        """What the heartbeat carries: the trainer's progress and the pushes made (the clock an async
        checkpoint's cut is placed by, server/snapshot.py)."""
        return {**self.trainer.progress(), "pushes": self.trainer.kv.pushes} if self.trainer else {}

    def _on_reply(self, meta: dict[str, Any]) -> None:
        self.servers.offer(meta)
        if meta.get("leave") and not self.leave.event.is_set():
            self.leave.set(meta.get("leave_at"))

    def build(self, local_rank: int | None) -> None:
        job, layout, reply, name = self.job, self.layout, self.reply, self.name
        torch.set_num_threads(job.training.torch_threads)
        self.device = device_for(job, int(reply["rank"]), local_rank)
        self.model = model = build_model(job.model, job.training.seed)
        dataset = build_dataset(job.data, unreachable_wait_s=job.cluster.startup_timeout_s)
        self.flat = flat = FlatModel(model, layout, self.device)
        link = job.cluster.link_mbit_s * 1e6 / 8 if job.cluster.link_mbit_s else None
        self.rpc = rpc = RpcClient(self.ctx, name, job.cluster.request_timeout_s, job.cluster.max_message_bytes, abort=self.abort,
                                   abort_reason=self._reason, security=self.security, link_bytes_per_s=link,
                                   unix_sockets=job.cluster.unix_sockets and link is None)
        peers = {}
        for s in reply["servers"]:
            rpc.connect(s["name"], s["address"])
            peers[int(s["rank"])] = s["name"]
            self.servers.addresses[s["name"]] = s["address"]
            if type(s.get("pid")) is int:
                self.servers.pids[s["name"]] = s["pid"]
        self.servers.rpc = rpc
        rpc.on_wait = self.servers.apply
        t = job.training
        any_sync = t.consistency == "sync" or any(g.consistency == "sync" for g in t.consistency_groups)
        chunk = job.cluster.max_request_bytes if not any_sync else None  # a sync push holds all of a server's keys
        self.kv = kv = KVClient(rpc, layout, peers, request_bytes=chunk, compression=job.compression,
                                key_versions=bool(t.consistency_groups), shared_memory=job.cluster.shared_memory,
                                replay=job.cluster.replicas > 0)
        for s in reply["servers"]:
            kv.set_address(s["name"], s["address"])
        self.servers.kv = kv
        sparse = None
        if layout.tables:  # the model's SparseEmbedding rows come from the servers' tables
            sparse = SparseClient(rpc, layout, peers, kv.wire, replay=job.cluster.replicas > 0, clock=lambda: kv.pushes + 1)
            attach(model, sparse)
        trainer = Trainer(job, flat, kv, dataset, name, int(reply["rank"]), sparse)
        if type(reply.get("steps_left")) is int:  # what is left of training.steps for this rank (resumed, replaced)
            trainer.max_steps = reply["steps_left"]
        trainer.leave = self.leave
        # Touch the data before training starts: a split may read its files lazily, and that
        # read belongs to start-up, not to the first step (where it would stall this worker).
        trainer.batches.touch()
        self.trainer = trainer

    def train(self) -> int | None:
        """Initialise the parameters (the initializer worker), wait for every worker, pull, train.
        Returns the exit code when this worker left the running job, None when training ended."""
        coord, kv, flat, trainer, name = self.coord, self.kv, self.flat, self.trainer, self.name
        assert kv is not None and trainer is not None
        if self.reply.get("initializer"):
            kv.wait(kv.init(flat.host))
        trainer.warm_up()  # (while the other workers start: torch's first calls are not the first step's)
        coord.barrier("init", timeout_s=_LONG_WAIT_S)
        try:
            trainer.pull_all()
        except RemoteError as err:
            if err.code != Code.UNINITIALIZED:
                raise
            # The worker told to write the initial values died before it did (the barrier lets the
            # live workers through): this one writes them. Each key keeps the first INIT it gets,
            # and every worker built the model from the job's seed, so racing workers write the same.
            log.warning("%s: %s; writing the initial parameters itself (the initializing worker was lost)", name, err)
            kv.wait(kv.init(flat.host))
            trainer.pull_all()
        flat.host_to_device()
        trainer.start()
        log.info("%s: training on %s", name, self.device)
        # SIGTERM while training: leave after this step, as the coordinator's order to leave does (its
        # push settled, so the position is exact: one still in flight may be applied, and the batch
        # must not be trained again). A second SIGTERM (not a repeat), or Ctrl-C: leave at once.
        previous = signal.getsignal(signal.SIGTERM)

        def signalled() -> None:
            self.leave.signalled = True

        term = TermSignal(signalled).install() if threading.current_thread() is threading.main_thread() else None
        try:
            trainer.run(lambda: coord.next_shard(self.leave), coord.shard_done)
        except KeyboardInterrupt:  # at once: the position is that of the last push answered
            log.info("%s: interrupted; leaving the job (its shards go back to the queue)", name)
            return _leave(coord, trainer, 2.0)
        finally:
            if term is not None:
                signal.signal(signal.SIGTERM, previous)
        if trainer.left:  # the job stops gracefully: the last push is settled, so the position is exact
            log.info("%s: %s; leaving at data position %s", name,
                     "SIGTERM" if self.leave.signalled else "the job is stopping", trainer.position)
            return _leave(coord, trainer, self.job.cluster.request_timeout_s)
        return None

    def report(self) -> None:
        """This worker's statistics and the model's buffers to the coordinator; then, when it asks,
        the evaluation on the final parameters."""
        coord, trainer, model, name = self.coord, self.trainer, self.model, self.name
        assert trainer is not None
        stats = trainer.stats()
        log.info("%s: trained %d steps, %d examples, %.0f examples/s", name, stats["steps"], stats["examples"], stats["examples_per_s"])
        # The model's buffers (BatchNorm statistics...) go along: the coordinator merges them.
        answer = coord.worker_done(stats, timeout_s=_LONG_WAIT_S,
                                   buffers=bufs.pack(bufs.model_buffers(model, {p.name for p in self.layout.params})))
        end = answer.meta
        if end.get("evaluate"):
            trainer.pull_all(exact=True)
            self.flat.host_to_device()
            if end.get("buffers"):  # evaluate with the buffers model.pt will hold
                model.load_state_dict(bufs.unpack(end["buffers"], answer.tensors), strict=False)
            result = trainer.evaluate()
            log.info("%s: test accuracy %s, test loss %s", name, result["test_accuracy"], result["test_loss"])
            coord.report("eval", {k: v for k, v in result.items() if v is not None})  # None: no such figure

    def close(self) -> None:
        if self.hb is not None:
            self.hb.stop()
        if self.endpoint is not None:
            self.endpoint.close()
        if self.kv is not None:
            self.kv.close()
        if self.rpc is not None:
            self.rpc.close()
        self.coord.close()


def _leave(coord: CoordinatorClient, trainer: Trainer, timeout_s: float) -> int:
    """Leave the running job cleanly: the coordinator puts this worker's unfinished shard back,
    to resume after its last acknowledged push."""
    try:
        coord.leave(trainer.position, trainer.stats(), timeout_s=timeout_s)
    except DownpourError as err:
        log.info("%s: could not tell the coordinator: %s", coord.node, err)
    return 0


def _report_error(coord: CoordinatorClient, text: str) -> None:
    if coord.node == coord.identity:  # never registered: nobody to tell
        return
    try:
        coord.rpc.abort = None
        coord.report("error", {"error": text}, timeout_s=2.0)
    except DownpourError:
        pass
