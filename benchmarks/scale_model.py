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

* ``cpu``: one host of C cores: C' / (worker CPU + server CPU): oversubscription spreads the
  whole demand over the cores. C' = C less ``Topology.other_load``, the cores' worth of CPU that
  work outside the workers and servers takes on the same host (the coordinator and the launcher,
  and on a shared machine other users' processes: ``benchmarks/scale_probe.py`` measures both);
  with none, C' = C;
* ``worker``: each worker is a serial chain: W / (worker CPU + one server's CPU + 2·latency +
  transfer), transfer = 2·bytes / bandwidth on a network and 0 on one host;
* ``server``: each server's request loop is one thread and sees every worker's step: 1 / (server
  CPU / S);
* ``network``: a server's link carries its share of every step: bandwidth / (bytes / S) per
  direction (a worker's own link is inside the ``worker`` bound); with ``split``, the one link
  between the two hosts carries every step: bandwidth / bytes.

Examples/s = rate × batch. CPU per example, per role, is the CPU per step over the batch: the
model predicts no contention, so a host where more processes than cores share caches shows more.

The least bound is where the job goes with many workers, and it is optimistic where two bounds
meet (the knee): with ``Topology(queueing=True)`` the rate is instead that of a closed queueing
network solved by exact mean value analysis (Reiser & Lavenberg; any queueing text, e.g. Lazowska
et al., *Quantitative System Performance*, ch. 6 and 20). Each of the W workers is one customer
with one step outstanding at a time (async, no overlap), cycling through

* ``cpu``: the cores, a station of C' servers (load-dependent: min(j, C') steps served at once when j
  are there), demand worker CPU + server CPU per step;
* ``push`` and ``pull``: with ``split`` and a bandwidth, the link's two directions (full duplex: each
  host's egress is its own queue), demand bytes / bandwidth each. Several TCP flows share a link
  about equally, so a direction is a processor-sharing station, for which the solution holds
  whatever the distribution of the transfer times (BCMP);
* ``latency``: a delay (no queue) of 2·latency.

MVA: R_k(n) = D_k·(1 + Q_k(n−1)) at a queue, D_k at a delay, and at the cores
Σ_j j/min(j, C)·D_k·p_k(j−1 | n−1); X(n) = n / Σ_k R_k(n); Q_k(n) = X(n)·R_k(n), for n = 1…W.
Then examples/s = min(X(W), the ``server`` bound) × batch, and the bottleneck is the busiest
station. With one worker it is the serial chain (less the servers' parallelism: all S servers'
CPU is in the chain, where the ``worker`` bound counts one server's share); with many, the least
bound. Between, the queues: at the knee of 3 workers and two link directions of equal demand, a
link is busy 3/4 of the time, not all of it.

On one host the cores are not C ideal servers of W steps: a step is a chain of threads (the
worker's, two ZeroMQ I/O threads each way, the server's request loop) that wake each other, and
each wake-up joins the host's run queue behind whatever other threads are runnable, so 2 workers
wait for 2 cores although exact MVA says two steps never queue there (``benchmarks/scale_probe.py``
measures the wait per thread from /proc). ``Topology(queueing=True, shared_cores=True)`` solves the
cores as that run queue: Seidmann's approximation of a C-server station (a queue C times as fast,
where a step waits behind all work queued, plus a delay of (C − 1)/C of its demand), with the
chain's demand worker CPU + one server's share (the S servers of a step run in parallel), and the
other S − 1 shares and ``other_load`` as open load on the cores (:func:`run_queue_mva`). One worker
is its serial chain again; many, the ``cpu`` bound with C'.
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
    queueing: bool = False  # the rate of a closed queueing network (mean value analysis), not the least bound; needs cores
    other_load: float = 0.0  # cores' worth of CPU taken on the host(s) by work outside the workers and servers; needs cores
    shared_cores: bool = False  # with queueing: the cores as one queue C' times as fast (the run queue), not C' ideal servers


def job_cores(topo: Topology) -> float:
    """The cores left to the workers and servers: ``cores`` less ``other_load`` (the coordinator, the
    launcher, other users' processes), never below a hundredth of a core."""
    if topo.cores is None:
        raise ValueError("other_load needs the cores of the host(s): Topology(..., cores=C)")
    return max(0.01 * topo.cores, topo.cores - topo.other_load)


@dataclass(frozen=True)
class Prediction:
    examples_per_s: float
    bottleneck: str
    bounds: dict[str, float] = field(default_factory=dict)  # steps/s (all workers) each bound allows
    worker_cpu_per_step_s: float = 0.0  # one worker step's CPU in the worker
    server_cpu_per_step_s: float = 0.0  # one worker step's CPU in all servers together
    requests_per_server: float = 1.0  # per worker step
    bounds_examples_per_s: float = 0.0  # the least bound × batch (the prediction without ``queueing``)
    stations: dict[str, dict[str, float]] = field(default_factory=dict)  # with ``queueing``: demand, residence s, utilisation

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
        bounds["cpu"] = job_cores(topo) / (worker_cpu + server_cpu)
    elif topo.other_load:
        raise ValueError("other_load needs the cores of the host(s): Topology(..., cores=C)")
    if network:
        bounds["network"] = costs.bandwidth_Bps * (1 if topo.split else s) / nbytes
    bottleneck = min(bounds, key=bounds.get)
    if bottleneck == "worker" and work.compute_s < 0.5 * (worker_cpu + server_cpu / s + 2 * costs.latency_s + transfer):
        bottleneck = "worker (messaging)"  # the chain is mostly requests, not forward/backward
    elif bottleneck == "worker":
        bottleneck = "worker (compute)"
    least = bounds[min(bounds, key=bounds.get)] * work.batch
    if not topo.queueing:
        return Prediction(least, bottleneck, bounds, worker_cpu, server_cpu, k, least)
    if topo.cores is None:
        raise ValueError("queueing needs the cores of the host(s): Topology(..., cores=C)")
    if topo.shared_cores:
        if network:
            raise ValueError("shared_cores models one host's run queue: no link (split or bandwidth) with it")
        serial = worker_cpu + server_cpu / s  # a step's chain: its worker, and one server's share (the S run in parallel)
        rate, wait = run_queue_mva(serial, server_cpu - server_cpu / s, topo.cores, min(topo.other_load, 0.99 * topo.cores),
                                   2 * costs.latency_s, w)
        if bounds["server"] < rate:
            rate, bottleneck = bounds["server"], "server"
        else:
            bottleneck = "cpu" if wait > 0.5 * serial else bottleneck
        table = {"cpu": {"demand_s": worker_cpu + server_cpu, "serial_s": serial, "wait_s": wait,
                         "utilisation": (rate * (worker_cpu + server_cpu) + topo.other_load) / topo.cores}}
        return Prediction(rate * work.batch, bottleneck, bounds, worker_cpu, server_cpu, k, least, table)
    stations = {"cpu": (worker_cpu + server_cpu, job_cores(topo)), "latency": (2 * costs.latency_s, 0.0)}
    if network:
        stations["push"] = stations["pull"] = (nbytes / costs.bandwidth_Bps, 1.0)
    rate, residence = mva(stations, w)
    if bounds["server"] < rate:
        rate, bottleneck = bounds["server"], "server"
    else:
        busy = {name: rate * d / c for name, (d, c) in stations.items() if c > 0}
        bottleneck = max(busy, key=busy.get)
        bottleneck = "network" if bottleneck in ("push", "pull") else bottleneck
    table = {name: {"demand_s": d, "residence_s": residence[name], "utilisation": rate * d / c if c > 0 else 0.0}
             for name, (d, c) in stations.items()}
    return Prediction(rate * work.batch, bottleneck, bounds, worker_cpu, server_cpu, k, least, table)


def mva(stations: dict[str, tuple[float, float]], customers: int) -> tuple[float, dict[str, float]]:
    """Exact mean value analysis of a closed network: ``stations`` maps a name to (demand per cycle in s,
    servers): 0 servers a delay, 1 a queue (FCFS or processor sharing), C > 1 a load-dependent station
    serving min(j, C) at once. Returns the throughput (cycles/s) and each station's residence time per
    cycle with ``customers`` in the network."""
    queue = {k: 0.0 for k in stations}  # Q_k(n-1)
    marginal = {k: [1.0] for k, (_, c) in stations.items() if c > 1}  # p_k(j | n-1), j = 0..n-1
    rate, residence = 0.0, {}
    for n in range(1, customers + 1):
        for k, (d, c) in stations.items():
            if c <= 0:
                residence[k] = d
            elif c <= 1:
                residence[k] = d / c * (1 + queue[k])
            else:
                residence[k] = sum(j / min(j, c) * d * marginal[k][j - 1] for j in range(1, n + 1))
        rate = n / sum(residence.values())
        for k, (d, c) in stations.items():
            queue[k] = rate * residence[k]
            if c > 1:
                p = [0.0] + [rate * d / min(j, c) * marginal[k][j - 1] for j in range(1, n + 1)]
                p[0] = max(0.0, 1.0 - sum(p[1:]))
                marginal[k] = p
    return rate, residence


def run_queue_mva(serial_s: float, parallel_s: float, cores: float, other_load: float, delay_s: float,
                  customers: int) -> tuple[float, float]:
    """Mean value analysis with the cores as the host's run queue: ``customers`` steps (one per worker)
    each need ``serial_s`` of CPU in their chain, ``parallel_s`` more beside it (the other servers'
    shares of the step, run at the same time), and a delay of ``delay_s``. The cores are one queue
    ``cores`` times as fast plus a delay of the rest of the demand (Seidmann's approximation of a
    multi-server station: a step waits behind whatever CPU work is queued, whichever core frees
    first), and ``other_load`` (cores' worth of CPU of other processes) and the parallel shares are
    open load on it: R = serial/C · (1 + Q(n−1)) / (1 − U) + serial · (C − 1)/C + delay, with
    U = (other_load + X·parallel) / C (Lazowska et al., ch. 7, open load in a closed network), and
    X(n) = n / R solved at each n by bisection (X·R(X) grows with X). Returns (steps/s of all
    customers, run-queue wait per step: the residence at the cores less ``serial_s``)."""
    queue, rate, wait = 0.0, 0.0, 0.0
    free = 1.0 - other_load / cores
    if free <= 0:
        raise ValueError(f"other_load {other_load:g} leaves none of {cores:g} cores")

    def at_queue(x: float, q: float) -> float:
        return serial_s / cores * (1 + q) / (free - x * parallel_s / cores)

    for n in range(1, customers + 1):
        lo = 0.0
        hi = n / (serial_s + delay_s)  # no wait at all
        if parallel_s > 0:
            hi = min(hi, free * cores / parallel_s * (1 - 1e-12))
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid * (at_queue(mid, queue) + serial_s * (cores - 1) / cores + delay_s) < n:
                lo = mid
            else:
                hi = mid
        rate = lo
        r = at_queue(rate, queue)
        wait = r + serial_s * (cores - 1) / cores - serial_s
        queue = rate * r
    return rate, wait


def at_scale(costs: Costs, gbit_s: float, latency_s: float) -> Costs:
    """``costs`` with a network between the hosts: ``gbit_s`` Gbit/s links, ``latency_s`` one way."""
    return replace(costs, bandwidth_Bps=gbit_s * 1e9 / 8, latency_s=latency_s)
