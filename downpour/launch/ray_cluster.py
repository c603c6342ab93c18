"""Run a job on a Ray cluster: Ray places the processes, Downpour's sockets carry the tensors.

Every process of the job (coordinator, servers, workers) is a ``downpour`` process started and
watched by a small Ray actor (:class:`RoleHost`) that holds the role's resources. The servers'
and workers' actors are gang-scheduled in one placement group per job (``ray.placement_strategy``:
PACK, SPREAD or STRICT_SPREAD), each in its own bundle sized by ``ray.server`` / ``ray.worker``.
The coordinator's actor is pinned to the node this launcher runs on, so the run folder
(``model.pt``, ``summary.json``, ``coordinator.db``) is the same as a local job's.

Everything else is :class:`LocalLauncher`: the same watching, the same recovery (a process that
dies is replaced by a new actor in the dead one's bundle, and the coordinator's recovery paths
take it in), the same summary. Nothing but the start of processes goes through Ray: parameters
and gradients travel on Downpour's own sockets, never through Ray's object store: tcp with CURVE
keys (handed to each actor as the files its role needs) where the job may span machines, and the
local launcher's unix sockets and shared memory where every Ray node is this machine (see
:meth:`RayLauncher._one_machine`). Each process's log is written on its
node and copied into ``RUN_DIR/logs`` when it exits where the run folder is not visible.
``RUN_DIR/placement.json`` says where each process ran (Ray node id and address, pid, the arguments it was started with).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from downpour.config import JobConfig, RayResources
from downpour.errors import ConfigError, JobFailed
from downpour.launch.local import LocalLauncher, Proc

log = logging.getLogger(__name__)

try:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy
except ImportError:  # pragma: no cover - the extra is missing
    ray = None

NODE_IP = "{node_ip}"  # in a process's arguments: the address of the Ray node it runs on
_PUBLIC_ENV = ("PYTHONPATH", "FSSPEC_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def bundle(res: RayResources) -> dict[str, float]:
    """A role's request as a placement-group bundle (Ray's resource names)."""
    b: dict[str, float] = {"CPU": res.num_cpus}
    if res.num_gpus:
        b["GPU"] = res.num_gpus
    if res.memory_mb:
        b["memory"] = float(res.memory_mb) * 2**20
    b.update(res.resources)
    return {k: v for k, v in b.items() if v}


def missing_resources(bundles: list[dict[str, float]], total: dict[str, float], strategy: str, nodes: int,
                      outside: dict[str, float] | None = None) -> list[str]:
    """What a cluster with ``total`` resources over ``nodes`` alive nodes lacks for ``bundles`` and
    ``outside`` (the coordinator's request: not a bundle), one phrase per resource (empty: the totals
    suffice, placement may still wait for free ones)."""
    want: dict[str, float] = {}
    for b in [*bundles, outside or {}]:
        for k, v in b.items():
            want[k] = want.get(k, 0.0) + v
    out = [f"{k}: the job asks for {v:g}, the cluster has {total.get(k, 0.0):g}" for k, v in sorted(want.items())
           if v > total.get(k, 0.0) + 1e-9]
    if strategy == "STRICT_SPREAD" and len(bundles) > nodes:
        out.append(f"nodes: STRICT_SPREAD puts each of the {len(bundles)} servers and workers on its own node, the cluster has {nodes}")
    return out


class RoleHost:
    """A Ray actor that runs one ``downpour`` process on its node and reports how it ends."""

    def __init__(self, args: list[str], log_path: str, env: dict[str, str], keys: dict[str, bytes] | None,
                 job_file: bytes | None = None) -> None:
        """``keys``: the key files this process needs (name -> bytes); ``job_file``: the bytes of the
        file its ``--job`` names (an insecure worker's trusted job), which may be on another machine."""
        from downpour.launch.local import _die_with_parent

        self.node = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
        self.private = tempfile.mkdtemp(prefix="downpour-ray-")  # 0700
        args = [a.replace(NODE_IP, self.node["node_ip"]) for a in args]
        if keys:
            folder = os.path.join(self.private, "keys")
            os.makedirs(folder, mode=0o700)
            for name, data in keys.items():
                path = os.path.join(folder, name)
                with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                    f.write(data)
            args = [*args, "--keys", folder]
        if job_file is not None and "--job" in args:  # the launcher's path need not exist on this node
            path = os.path.join(self.private, "job.yaml")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(job_file)
            i = args.index("--job")
            args = [*args[: i + 1], path, *args[i + 2 :]]
        self.args = args
        self.shared_log = os.path.isdir(os.path.dirname(log_path))
        self.log_path = log_path if self.shared_log else os.path.join(self.private, os.path.basename(log_path))
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen([sys.executable, "-m", "downpour", *args], stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env={**os.environ, **env}, start_new_session=True,
                                          preexec_fn=_die_with_parent)

    def where(self) -> dict[str, Any]:
        return {**self.node, "pid": self.popen.pid, "args": self.args}

    def wait(self) -> tuple[int, str | None]:
        """The exit code once the process ends, and its log when the run folder is not on this node. The
        private folder (the role's key files, the job file) goes with the process."""
        code = self.popen.wait()
        text = None
        if not self.shared_log:
            with open(self.log_path, errors="replace") as f:
                text = f.read()
        self._remove_private()
        return code, text

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def close(self) -> None:
        """Kill the process if it still runs and remove the private folder: the launcher calls this
        before ``ray.kill``, which ends the actor without running its clean-up."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._remove_private()

    def _remove_private(self) -> None:
        shutil.rmtree(self.private, ignore_errors=True)


def _here_free() -> dict[str, float]:
    """This node's free resources (Ray's names), or {} when Ray does not say."""
    try:
        here = ray.get_runtime_context().get_node_id()
        for node_id, free in (ray.state.available_resources_per_node() or {}).items():
            if node_id == here:
                return dict(free)
    except Exception:  # noqa: BLE001 - an internal API of Ray's: only a message depends on it
        pass
    return {}


class RayProcess:
    """The parts of ``subprocess.Popen`` the launcher uses, for a process a :class:`RoleHost` runs."""

    def __init__(self, actor: Any, log_path: str, name: str, start_timeout_s: float) -> None:
        self.actor = actor
        self.log_path = log_path
        try:
            self.where = ray.get(actor.where.remote(), timeout=start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor)
            why = ("it runs on this node, outside the placement group, and this node's CPUs went to the group's bundles: "
                   f"free here now {_short(_here_free())}; lower ray.coordinator.num_cpus (0 is allowed) or give this node "
                   "more" if name == "coordinator" else "its bundle's resources are still taken, or its node is gone")
            raise JobFailed(f"Ray did not start {name} within ray.start_timeout_s={start_timeout_s:g}s ({why})",
                            node=name) from None
        except ray.exceptions.RayError as err:
            raise JobFailed(f"Ray could not start {name}: {err}", node=name) from None
        self.pid = int(self.where["pid"])
        self._exit = actor.wait.remote()
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            done, _ = ray.wait([self._exit], timeout=0)
            if done:
                self._collect()
        return self.returncode

    def _collect(self) -> None:
        try:
            code, text = ray.get(self._exit)
        except ray.exceptions.RayError:  # the actor itself died (its node went away): like a SIGKILL
            code, text = -signal.SIGKILL, None
        if text is not None:
            with open(self.log_path, "a") as f:
                f.write(text)
        self.returncode = code
        ray.kill(self.actor)  # its bundle's resources are free for a replacement

    def wait(self, timeout: float | None = None) -> int:
        done, _ = ray.wait([self._exit], timeout=timeout)
        if not done:
            raise subprocess.TimeoutExpired("downpour", timeout or 0.0)
        self._collect()
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            self.actor.signal.remote(int(signum))

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Raise :class:`JobFailed` at once for a ``HOST:PORT`` Ray address where nothing answers (``ray.init``
    would retry for minutes), and for a cluster listening on 127.0.0.1 only: Ray connects to a
    loopback host as this machine's own address (``resolve_ip_for_localhost``), where it is not."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit():
        return
    port = int(port_text)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise JobFailed(f"cannot reach the Ray cluster at {address}: nothing answers there ({err.strerror or err})",
                        node="launcher") from None
    if host not in _LOOPBACK:
        return
    try:
        from ray._private.services import resolve_ip_for_localhost  # (Ray's own rewrite: private, so guarded)

        used = resolve_ip_for_localhost(host)
    except Exception:  # noqa: BLE001 - another Ray version: ray.init says what it finds
        return
    if used == host:
        return
    try:
        socket.create_connection((used, port), timeout=timeout_s).close()
    except OSError:
        raise JobFailed(f"the Ray cluster at {address} listens on {host} only, but Ray connects to {host} as this machine's "
                        f"address {used}, where nothing answers (ray.init would wait for minutes): start the cluster with "
                        f"--node-ip-address {used} (or another loopback address, such as 127.0.0.2) and give that "
                        "address", node="launcher") from None


class RayLauncher(LocalLauncher):
    """:class:`LocalLauncher`'s contract (``run``, ``request_stop``) with processes placed by Ray."""

    def __init__(self, job: JobConfig, run_dir: str, insecure: bool = False, address: str | None = None) -> None:
        if ray is None:
            raise ConfigError("launcher ray needs Ray: pip install 'downpour[ray]'")
        super().__init__(job, run_dir, insecure=insecure)
        self.ipc = False  # decided once Ray is reached (_one_machine): tcp unless every node is this machine
        self.ray_address = address if address is not None else job.ray.address
        self.group = None
        self.started_ray = False
        self.bundle_of: dict[str, int] = {}  # process name (without restart suffix) -> bundle index
        self.placement: dict[str, dict[str, Any]] = {}
        self.start_s: float | None = None  # Ray connection + placement group ready, seconds

    # -- Ray ----------------------------------------------------------------
    def _connect(self) -> None:
        t0 = time.monotonic()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": self.ray_address, "log_to_driver": False, "include_dashboard": False}
            if self.ray_address is None:  # a Ray for this job only, sized by the job's requests
                cpus = sum(b.get("CPU", 0.0) for b in self._bundles()) + self.job.ray.coordinator.num_cpus
                kwargs.update(num_cpus=max(1, int(cpus + 0.999)), object_store_memory=80 * 2**20)
                kwargs.pop("include_dashboard")
            check_ray_address(self.ray_address)
            try:
                ray.init(**kwargs)
            except ConnectionError as err:
                raise JobFailed(f"cannot reach the Ray cluster at {self.ray_address}: {err}", node="launcher") from None
            self.started_ray = True
        bundles = self._bundles()
        cfg = self.job.ray
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        # The coordinator runs on this node, outside the placement group: its share counts too.
        missing = missing_resources(bundles, ray.cluster_resources(), cfg.placement_strategy, len(nodes), bundle(cfg.coordinator))
        if missing:
            raise JobFailed("the Ray cluster lacks the job's resources: " + "; ".join(missing)
                            + " (lower ray.server / ray.worker requests, or add nodes)", node="launcher")
        self.group = placement_group(bundles, strategy=cfg.placement_strategy, name=f"downpour-{self.job.name}-{os.getpid()}")
        ready, _ = ray.wait([self.group.ready()], timeout=cfg.start_timeout_s)
        if not ready:
            free = ray.available_resources()
            raise JobFailed(f"Ray could not place the job's {len(bundles)} bundles ({cfg.placement_strategy}) within "
                            f"ray.start_timeout_s={cfg.start_timeout_s:g}s: asked {bundles[0]} per server and "
                            f"{bundles[-1]} per worker; free now: {_short(free)}", node="launcher")
        self.start_s = time.monotonic() - t0
        log.info("ray: placement group ready in %.2fs (%s)", self.start_s, cfg.placement_strategy)

    def _one_machine(self) -> bool:
        """Whether the job's processes talk over unix sockets and shared memory, as a local job's
        do, rather than tcp with CURVE keys.

        ``cluster.transport: tcp`` always means tcp. ``auto`` means ipc only for a Ray this launcher
        started itself (no ``--address``, no ``RAY_ADDRESS``) whose every node has this machine's
        address: nothing can then run elsewhere. ``ipc`` asks for it on any cluster and is refused,
        naming the other nodes, when a node has another address."""
        transport = self.job.cluster.transport
        if transport == "tcp":
            return False
        here = ray.util.get_node_ip_address()
        elsewhere = sorted({str(n.get("NodeManagerAddress")) for n in ray.nodes() if n.get("Alive")} - {here})
        if transport == "ipc":
            if elsewhere:
                raise JobFailed(f"cluster.transport: ipc needs every process on this machine ({here}), but the Ray cluster "
                                f"has nodes at {', '.join(elsewhere)}; use tcp or auto", node="launcher")
            return True
        own = self.started_ray and self.ray_address is None and not os.environ.get("RAY_ADDRESS")
        return own and not elsewhere

    def _bundles(self) -> list[dict[str, float]]:
        cl, cfg = self.job.cluster, self.job.ray
        return [bundle(cfg.server)] * cl.num_servers + [bundle(cfg.worker)] * cl.num_workers

    def _keys_for(self, role: str) -> dict[str, bytes] | None:
        if not self.keys:
            return None
        files = [f for f in os.listdir(self.keys) if f.endswith(".key") or f == f"{role}.key_secret"]
        out = {}
        for f in files:
            with open(os.path.join(self.keys, f), "rb") as fh:
                out[f] = fh.read()
        return out

    # -- LocalLauncher's hooks ------------------------------------------------
    def start(self) -> str:
        self._connect()
        self.ipc = self._one_machine()
        log.info("ray: the job's processes talk over %s", "unix sockets and shared memory (every Ray node is this machine)"
                 if self.ipc else "tcp")
        # Over tcp each process listens on its own node's address (RoleHost fills it in); with a
        # Ray of its own on this machine, the job stays on loopback.
        self.bind_host = "127.0.0.1" if self.started_ray and self.ray_address is None else NODE_IP
        return super().start()

    def _spawn(self, name: str, args: list[str], inherited_error: str | None = None) -> Proc:
        role = args[0]
        if "--ipc-dir" in args and not self.ipc:  # (tcp: the folder is not used)
            i = args.index("--ipc-dir")
            args = args[:i] + args[i + 2 :]
        if self.insecure:
            args = [*args, "--insecure"]
        log_path = os.path.join(self.run_dir, "logs", f"{name}.log")
        env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.job.training.torch_threads),
               **{k: self.env[k] for k in _PUBLIC_ENV if k in self.env}}
        cfg = self.job.ray
        if role == "coordinator":  # on this node: the run folder is here
            res, strategy = cfg.coordinator, NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        else:  # a replacement takes its predecessor's bundle (freed when that actor ended)
            base = name.split(".")[0]
            index = self.bundle_of.setdefault(base, len(self.bundle_of))
            res = cfg.server if role == "server" else cfg.worker
            strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index)
        options: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "scheduling_strategy": strategy,
                                   "max_concurrency": 4, "max_restarts": 0}
        if res.memory_mb:
            options["memory"] = float(res.memory_mb) * 2**20
        if res.resources:
            options["resources"] = dict(res.resources)
        job_file = None
        if "--job" in args:  # an insecure worker's trusted job file: its bytes travel, not its path
            with open(args[args.index("--job") + 1], "rb") as f:
                job_file = f.read()
        actor = ray.remote(RoleHost).options(**options).remote(args, log_path, env, self._keys_for(role), job_file)
        popen = RayProcess(actor, log_path, name, cfg.start_timeout_s)
        proc = Proc(name, popen, log_path, [a for a in args if a != "--insecure"], inherited_error=inherited_error)  # type: ignore[arg-type]
        self.procs.append(proc)
        self.placement[name] = {"role": role, **popen.where}
        self._write_placement()  # replacements too
        return proc

    def _write_placement(self) -> None:
        path = os.path.join(self.run_dir, "placement.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"strategy": self.job.ray.placement_strategy, "start_s": self.start_s, "processes": self.placement}, f, indent=1)
        os.replace(path + ".tmp", path)

    def stop_all(self, grace_s: float = 3.0) -> None:
        try:
            super().stop_all(grace_s)
        except subprocess.TimeoutExpired:  # a signal not delivered in time: killing the actors ends their processes too
            pass
        closing = []
        for p in self.procs:
            try:
                closing.append(p.popen.actor.close.remote())  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - already gone
                pass
        if closing:  # the key files each actor wrote on its node; best effort, a gone node keeps none
            ray.wait(closing, num_returns=len(closing), timeout=grace_s)
        for p in self.procs:
            try:
                ray.kill(p.popen.actor)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def _short(resources: dict[str, float]) -> str:
    shown = {k: round(v, 2) for k, v in resources.items() if not k.startswith("node:") and k != "object_store_memory"}
    return json.dumps(shown, sort_keys=True)
