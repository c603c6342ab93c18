"""A scaling model of a Downpour job: examples/s and the bottleneck for S servers × W workers.

It is arithmetic over a few costs measured on the machine at hand (``benchmarks/scale_measure.py``
measures them and checks the model against real jobs; this file holds no timing):

* :class:`Costs`: CPU per request and per byte on each side, the update rule's CPU per parameter,
  the one-way latency of a message and the link bandwidth;
* :class:`Workload`: what one worker step does: forward+backward CPU at the batch, the worker's
  other CPU per step, the dense parameters it pushes and pulls, the sparse rows it moves;
* :class:`Topology`: servers, workers, and either the cores of one shared host (every process on
  it) or one host per process joined by links of ``Costs.bandwidth_Bps``; or, with ``split``, the
  servers on one host and the workers on another, one link of ``Costs.bandwidth_Bps`` between them
  (with ``cores``, both hosts share those cores: network namespaces of one machine).

One worker step (async, no overlap) is: forward+backward, one push+pull request per server (more
when a server's share exceeds ``max_request_bytes``), wait for the slowest reply. Per step:

    worker CPU  = compute + worker_step + S·k·worker_msg + 2·bytes·worker_byte
    server CPU  = S·k·server_msg + 2·bytes·server_byte + P·apply + rows·server_row   (all servers)

with ``bytes`` = 4·P + rows·row_bytes each way and k requests per server. The job's rate in
steps/s (all workers) is the least of these bounds, and the least one names the bottleneck:

* ``cpu``: one host of C cores: C / (worker CPU + server CPU): oversubscription spreads the
  whole demand over the cores;
* ``worker``: each worker is a serial chain: W / (worker CPU + one server's CPU + 2·latency +
  transfer), transfer = 2·bytes / bandwidth on a network and 0 on one host;
* ``server``: each server's request loop is one thread and sees every worker's step: 1 / (server
  CPU / S);
* ``network``: a server's link carries its share of every step: bandwidth / (bytes / S) per
  direction (a worker's own link is inside the ``worker`` bound); with ``split``, the one link
  between the two hosts carries every step: bandwidth / bytes.

Examples/s = rate × batch. CPU per example, per role, is the CPU per step over the batch: the
model predicts no contention, so a host where more processes than cores share caches shows more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

FLOAT_BYTES = 4


@dataclass(frozen=True)
class Costs:
    """Seconds of CPU (or wall, for latency) per unit, measured on one machine."""

    worker_msg_s: float  # a worker's CPU per request it sends and whose reply it takes in
    worker_byte_s: float  # a worker's CPU per byte of gradients out and values back
    server_msg_s: float  # a server's CPU per request (decode, validate, reply), besides the bytes
    server_byte_s: float  # a server's CPU per byte in and out (checks, copies), besides the update rule
    apply_s_per_param: float  # the update rule (SGD with momentum) per parameter
    latency_s: float  # one way, per message: a wake-up on one host, the network's latency across hosts
    bandwidth_Bps: float | None = None  # bytes/s of each host's link, each direction; None: one host


@dataclass(frozen=True)
class Workload:
    """One worker step of a job."""

    name: str
    params: int  # dense parameters pushed and pulled every step
    batch: int  # examples per step
    compute_s: float  # forward+backward of one batch, one thread
    worker_step_s: float = 0.0  # the worker's other CPU per step: the batch's data, copies into the model, bookkeeping
    sparse_rows: float = 0.0  # sparse rows pulled and pushed per step (unique IDs of the batch, all tables)
    row_bytes: int = 0  # bytes of one row each way (values or gradients, and its ID)
    server_row_s: float = 0.0  # a server's CPU per row pulled and pushed (lookup, update rule)
    requests_per_server: float = 1.0  # per step, before splitting: the CTR job sends a dense push+pull and sparse requests


@dataclass(frozen=True)
class Topology:
    servers: int
    workers: int
    cores: float | None = None  # one host with this many cores for every process; None: a host per process
    max_request_bytes: int = 2 * 1024 * 1024  # cluster.max_request_bytes: a server's share is split into such requests
    split: bool = False  # servers on one host, workers on another, one link of Costs.bandwidth_Bps between them


@dataclass(frozen=True)
class Prediction:
    examples_per_s: float
    bottleneck: str
    bounds: dict[str, float] = field(default_factory=dict)  # steps/s (all workers) each bound allows
    worker_cpu_per_step_s: float = 0.0  # one worker step's CPU in the worker
    server_cpu_per_step_s: float = 0.0  # one worker step's CPU in all servers together
    requests_per_server: float = 1.0  # per worker step

    def cpu_per_example_s(self, batch: int) -> dict[str, float]:
        return {"worker": self.worker_cpu_per_step_s / batch, "server": self.server_cpu_per_step_s / batch}


def step_bytes(work: Workload) -> float:
    """Bytes one worker step moves each way (gradients out, values back), all servers together."""
    return FLOAT_BYTES * work.params + work.sparse_rows * work.row_bytes


def predict(costs: Costs, work: Workload, topo: Topology) -> Prediction:
    """Examples/s of ``work`` on ``topo`` with ``costs``, and which bound sets it (see the module)."""
    if topo.servers < 1 or topo.workers < 1:
        raise ValueError(f"a topology needs at least one server and one worker, got {topo.servers}×{topo.workers}")
    s, w = topo.servers, topo.workers
    nbytes = step_bytes(work)
    k = max(work.requests_per_server, math.ceil(nbytes / s / topo.max_request_bytes))
    worker_cpu = work.compute_s + work.worker_step_s + s * k * costs.worker_msg_s + 2 * nbytes * costs.worker_byte_s
    server_cpu = (
        s * k * costs.server_msg_s
        + 2 * nbytes * costs.server_byte_s
        + work.params * costs.apply_s_per_param
        + work.sparse_rows * work.server_row_s
    )
    network = costs.bandwidth_Bps is not None and (topo.cores is None or topo.split)
    transfer = 2 * nbytes / costs.bandwidth_Bps if network else 0.0
    bounds = {
        "worker": w / (worker_cpu + server_cpu / s + 2 * costs.latency_s + transfer),
        "server": s / server_cpu if server_cpu > 0 else math.inf,
    }
    if topo.cores is not None:
        bounds["cpu"] = topo.cores / (worker_cpu + server_cpu)
    if network:
        bounds["network"] = costs.bandwidth_Bps * (1 if topo.split else s) / nbytes
    bottleneck = min(bounds, key=bounds.get)
    if bottleneck == "worker" and work.compute_s < 0.5 * (worker_cpu + server_cpu / s + 2 * costs.latency_s + transfer):
        bottleneck = "worker (messaging)"  # the chain is mostly requests, not forward/backward
    elif bottleneck == "worker":
        bottleneck = "worker (compute)"
    return Prediction(bounds[min(bounds, key=bounds.get)] * work.batch, bottleneck, bounds, worker_cpu, server_cpu, k)


def at_scale(costs: Costs, gbit_s: float, latency_s: float) -> Costs:
    """``costs`` with a network between the hosts: ``gbit_s`` Gbit/s links, ``latency_s`` one way."""
    return replace(costs, bandwidth_Bps=gbit_s * 1e9 / 8, latency_s=latency_s)
