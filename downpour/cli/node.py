"""``downpour node``: one role of a job, configured from the environment alone (containers).

    DOWNPOUR_ROLE         coordinator | server | worker
    DOWNPOUR_COORDINATOR  HOST:PORT of the coordinator (servers, workers)
    DOWNPOUR_RANK         preferred rank (servers, workers)
    DOWNPOUR_JOB          job file (coordinator)
    DOWNPOUR_RUN_DIR      run folder (coordinator: state, model.pt, summary.json, logs)
    DOWNPOUR_RECOVER=1    (or true, yes, on) the coordinator takes over the job a crashed one saved in DOWNPOUR_RUN_DIR
    DOWNPOUR_BIND         coordinator: address to listen on (tcp://HOST:PORT)
    DOWNPOUR_HOST         server: interface to listen on
    DOWNPOUR_PORT         server: fixed port (coordinator: port of DOWNPOUR_BIND's default)
    DOWNPOUR_ADVERTISE    the host name or address peers use to reach this node
    DOWNPOUR_METRICS_HOST interface of this node's /metrics
    DOWNPOUR_KEYS         the job's key folder; DOWNPOUR_INSECURE=1 for plain sockets

``TF_CONFIG`` (as Kubeflow's TFJob operator sets it) gives the cluster instead:
``cluster.chief`` (or ``master``) is the coordinator, ``cluster.ps`` the servers, ``cluster.worker``
the workers, and ``task`` {type, index} names this node. Each node listens on every interface at
its entry's port and advertises its entry's host. Without a chief (a TF1 ``ClusterSpec`` of ps and
workers) worker 0 is the chief, as in TF1: its process also runs the coordinator, on its entry's
port. The coordinator takes the number of servers and workers from the cluster. A DOWNPOUR_*
variable set explicitly wins over what TF_CONFIG implies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from downpour.errors import ConfigError

ROLES = ("coordinator", "server", "worker")
_TF_ROLES = {"chief": "coordinator", "master": "coordinator", "ps": "server", "worker": "worker"}


@dataclass
class NodeSettings:
    role: str
    job: str | None = None
    coordinator: str | None = None
    rank: int | None = None
    run_dir: str | None = None
    recover: bool = False
    bind: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    advertise: str | None = None
    metrics_host: str | None = None
    keys: str | None = None
    insecure: bool = False
    overrides: list[str] = field(default_factory=list)  # job overrides (the coordinator's cluster size from TF_CONFIG)
    also_coordinator: bool = False  # TF1 style: worker 0 of a cluster without a chief runs the coordinator too


def _flag(env: Mapping[str, str], name: str) -> bool:
    """A yes/no variable: 1, true, yes, on (any case) or 0, false, no, off, empty; anything else is refused
    (a setting that reads as "no" where "yes" was meant would fail later, and further from why)."""
    v = env.get(name, "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {env[name]!r}")


def _int(env: Mapping[str, str], name: str) -> int | None:
    v = env.get(name)
    if v is None or v == "":
        return None
    if not v.lstrip("-").isdigit():
        raise ConfigError(f"{name} must be an integer, got {v!r}")
    return int(v)


def _entry(text: object, where: str) -> tuple[str, int]:
    if not isinstance(text, str):
        raise ConfigError(f"TF_CONFIG: {where} must be a 'HOST:PORT' string, got {text!r}")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"TF_CONFIG: {where} must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def from_tf_config(text: str) -> NodeSettings:
    """This node's settings from a TF_CONFIG JSON string (see the module's docstring)."""
    try:
        tf = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"TF_CONFIG is not valid JSON: {err}") from None
    cluster, task = (tf.get("cluster"), tf.get("task")) if isinstance(tf, dict) else (None, None)
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ConfigError("TF_CONFIG must hold 'cluster' (role -> list of HOST:PORT) and 'task' ({type, index})")
    for kind, entries in cluster.items():
        if kind not in _TF_ROLES and kind != "evaluator":
            raise ConfigError(f"TF_CONFIG: cluster.{kind}: unknown task type (Downpour knows {', '.join(_TF_ROLES)})")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"TF_CONFIG: cluster.{kind} must be a non-empty list of HOST:PORT")
    chiefs = cluster.get("chief") or cluster.get("master")
    if chiefs is not None and len(chiefs) != 1:
        raise ConfigError(f"TF_CONFIG: a job has one chief (the coordinator), got {len(chiefs)}")
    if not cluster.get("ps"):
        raise ConfigError("TF_CONFIG: cluster.ps lists no parameter server")
    if not cluster.get("worker"):
        raise ConfigError("TF_CONFIG: cluster.worker lists no worker")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in _TF_ROLES:
        raise ConfigError(f"TF_CONFIG: task.type {kind!r} is not one Downpour runs ({', '.join(_TF_ROLES)})")
    if type(index) is not int or not 0 <= index < len(cluster.get(kind) or []):
        raise ConfigError(f"TF_CONFIG: task.index {index!r} is not an entry of cluster.{kind}")
    coord_entry = chiefs[0] if chiefs else cluster["worker"][0]
    coord_host, coord_port = _entry(coord_entry, "the chief" if chiefs else "cluster.worker[0] (the chief)")
    host, port = _entry(cluster[kind][index], f"cluster.{kind}[{index}]")
    role = _TF_ROLES[kind]
    s = NodeSettings(role=role, advertise=host, host="0.0.0.0")
    if role == "coordinator":
        s.bind = f"tcp://0.0.0.0:{port}"
    else:
        s.coordinator = f"tcp://{coord_host}:{coord_port}"
        s.rank = index
        s.port = port if role == "server" else None
    if role == "coordinator" or (role == "worker" and index == 0 and not chiefs):
        s.overrides = [f"cluster.num_servers={len(cluster['ps'])}", f"cluster.num_workers={len(cluster['worker'])}"]
        s.also_coordinator = role == "worker"
        if s.also_coordinator:
            s.bind = f"tcp://0.0.0.0:{coord_port}"
    return s


def node_settings(env: Mapping[str, str]) -> NodeSettings:
    """Every setting of ``downpour node`` from ``env``: TF_CONFIG first (when set), then the
    DOWNPOUR_* variables, which win."""
    s = from_tf_config(env["TF_CONFIG"]) if env.get("TF_CONFIG") else None
    role = env.get("DOWNPOUR_ROLE") or (s.role if s else "")
    if role not in ROLES:
        raise ConfigError(f"DOWNPOUR_ROLE must be coordinator, server or worker (or set TF_CONFIG), got {role!r}")
    if s is None:
        s = NodeSettings(role=role)
    elif role != s.role:
        raise ConfigError(f"DOWNPOUR_ROLE={role} but TF_CONFIG's task is a {s.role}")
    s.job = env.get("DOWNPOUR_JOB") or s.job
    s.coordinator = env.get("DOWNPOUR_COORDINATOR") or s.coordinator
    rank = _int(env, "DOWNPOUR_RANK")
    s.rank = rank if rank is not None else s.rank
    s.run_dir = env.get("DOWNPOUR_RUN_DIR") or s.run_dir
    s.recover = _flag(env, "DOWNPOUR_RECOVER") or s.recover
    s.bind = env.get("DOWNPOUR_BIND") or s.bind
    s.host = env.get("DOWNPOUR_HOST") or s.host
    port = _int(env, "DOWNPOUR_PORT")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"DOWNPOUR_PORT must be a port number (1-65535), got {port}")
    s.port = port if port is not None else s.port
    s.advertise = env.get("DOWNPOUR_ADVERTISE") or s.advertise
    s.metrics_host = env.get("DOWNPOUR_METRICS_HOST") or s.metrics_host
    s.keys = env.get("DOWNPOUR_KEYS") or s.keys
    s.insecure = _flag(env, "DOWNPOUR_INSECURE")
    if (s.role == "coordinator" or s.also_coordinator) and not s.job:
        raise ConfigError("the coordinator needs the job file: set DOWNPOUR_JOB")
    if s.role == "coordinator" and not s.bind:
        s.bind = f"tcp://127.0.0.1:{s.port or 7070}"
    if s.role != "coordinator" and not s.coordinator:
        raise ConfigError(f"a {s.role} needs the coordinator's address: set DOWNPOUR_COORDINATOR (HOST:PORT) or TF_CONFIG")
    return s
