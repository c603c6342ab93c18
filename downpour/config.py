"""Validated, frozen job configuration.

A job file (YAML) maps one-to-one onto :class:`JobConfig`. Validation happens
once, at the edge (CLI, job file, :func:`downpour.train`); every component
below receives an already-valid, immutable config. Errors name the field and
the offending value (see :func:`load_job`).

Example (``examples/mnist.yaml``)::

    model: {name: mlp, args: {hidden: [128], dropout: 0.2}}
    data: {name: idx, path: /usr/share/datasets/fashion-mnist}
    optimizer: {name: sgd, lr: 0.01, momentum: 0.9}
    training: {consistency: async, epochs: 1, batch_size: 32, seed: 0}
    cluster: {num_servers: 2, num_workers: 3}

Why one module over 400 lines: it is the job file's schema, one short class per section in the
order a job file reads, and :class:`JobConfig` checks the sections against each other (its
validator needs them all). A reader looks up a field here and finds its default, its bound and
the comment saying why, in one place.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, model_validator

from downpour.errors import ConfigError
from downpour.imports import object_path

# A stream's partition is one data shard this long: more than any offset (downpour/stream/api.py).
STREAM_SPAN = 1 << 58


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # no setting is infinite or NaN


class ModelConfig(_Frozen):
    """The model: a built-in ``name`` (see ``downpour.models``) or an import path
    ``factory: "package.module:function"``; ``args`` are passed to it as keywords."""

    name: str | None = None
    factory: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name is None) == (self.factory is None):
            raise ValueError("give exactly one of model.name (a built-in) or model.factory ('pkg.mod:fn')")
        return self


class LoaderConfig(_Frozen):
    """How a worker reads a ``torch.utils.data.Dataset`` (``torch.utils.data.DataLoader``'s options;
    Downpour's own splits ignore them). The sampler is always the shard's indices."""

    # Loader worker processes per Downpour worker (0: read in the training process).
    num_workers: int = Field(0, ge=0)
    # "pkg.mod:fn" building a batch from a list of examples; it must return (inputs, target).
    collate_fn: str | None = None
    # Batches each loader process reads ahead (only with num_workers > 0).
    prefetch_factor: int | None = Field(None, ge=1)
    # Page-locked host batches, for faster and asynchronous copies to a GPU (on by default there).
    pin_memory: bool = False
    # fork, spawn or forkserver (None: torch's default); spawn needs an importable dataset.
    multiprocessing_context: Literal["fork", "spawn", "forkserver"] | None = None


class DataConfig(_Frozen):
    """Training data. ``name: idx`` reads MNIST-format IDX files (gzipped or not) from
    ``path``; ``factory: "pkg.mod:fn"`` calls a user function that returns a
    :class:`downpour.data.Dataset` whose splits are Downpour splits or any
    ``torch.utils.data.Dataset``, a ``(train, test)`` pair, a ``{"train": ..., "test": ...}``
    mapping, or one torch Dataset (training only: no evaluation)."""

    name: str | None = "idx"
    factory: str | None = None
    path: str = "/usr/share/datasets/fashion-mnist"
    # A live stream (name: stream): redis://HOST:PORT/DB?stream=NAME&partitions=P, or a growing file.
    url: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    # Examples per data shard. The coordinator hands shards to workers one at a time;
    # smaller shards balance load better, larger ones cost fewer coordinator round trips.
    # A stream's shard is one partition (set here, whatever the job file says).
    # None (the default) adapts to the data: an epoch gets at least 4 shards per worker slot
    # (shards of at most 2,048 examples, and at least one batch), so small data is still mixed
    # across workers; a number given here wins.
    shard_size: int | None = Field(None, gt=0)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.name == "stream" and self.factory is None:
            if not self.url:
                raise ValueError("data.url: a stream needs a URL (redis://HOST:PORT/DB?stream=NAME&partitions=P, or a file)")
            object.__setattr__(self, "path", self.url)
            object.__setattr__(self, "shard_size", STREAM_SPAN)
        if self.factory is not None:
            object.__setattr__(self, "name", None)
        if self.name is None and self.factory is None:
            raise ValueError("give data.name (a built-in) or data.factory ('pkg.mod:fn')")
        return self


class StepSchedule(_Frozen):
    """lr × gamma ** (step // step_size), as torch's StepLR."""

    name: Literal["step"]
    step_size: int = Field(gt=0)
    gamma: float = Field(0.1, gt=0)


class MultiStepSchedule(_Frozen):
    """lr × gamma ** (milestones passed), as torch's MultiStepLR."""

    name: Literal["multistep"]
    milestones: list[int] = Field(min_length=1)
    gamma: float = Field(0.1, gt=0)


class ExponentialSchedule(_Frozen):
    """lr × gamma ** step, as torch's ExponentialLR."""

    name: Literal["exponential"]
    gamma: float = Field(gt=0)


class CosineSchedule(_Frozen):
    """From lr down to eta_min over t_max steps along a half cosine, as torch's CosineAnnealingLR."""

    name: Literal["cosine"]
    t_max: int = Field(gt=0)
    eta_min: float = Field(0.0, ge=0)


class LambdaSchedule(_Frozen):
    """lr × function(step), as torch's LambdaLR: an import path "pkg.mod:fn" (the Python API also
    takes the module-level function itself)."""

    name: Literal["lambda"]
    function: str

    @model_validator(mode="before")
    @classmethod
    def _path(cls, data: Any) -> Any:
        if isinstance(data, dict) and callable(data.get("function")):
            data = {**data, "function": object_path(data["function"], "optimizer.schedule.function")}
        return data


class TorchSchedule(_Frozen):
    """Any torch.optim.lr_scheduler-style class: a name in torch.optim.lr_scheduler (e.g.
    OneCycleLR, CosineAnnealingWarmRestarts) or an import path "pkg.mod:Class", built with ``args``
    on a one-parameter optimizer holding the job's lr and stepped once per job step."""

    name: Literal["torch"]
    scheduler: str
    args: dict[str, Any] = Field(default_factory=dict)


ScheduleConfig = Annotated[StepSchedule | MultiStepSchedule | ExponentialSchedule | CosineSchedule | LambdaSchedule
                           | TorchSchedule, Field(discriminator="name")]


class ScalingOptions(_Frozen):
    """How ``optimizer.scaling: auto`` turns the one-worker hyperparameters into the ones a
    cluster uses (docs/scaling.md). A job step is one update a worker pushes: one optimizer step of
    the same job on one worker."""

    # Sync: a round averages the gradients of n workers (a global batch n times larger), and the
    # learning rate grows with it: linear (× n, Goyal et al. 2017), sqrt (× √n), or none.
    # auto: linear for SGD, sqrt for the adaptive rules (Adagrad, Adam).
    sync_lr: Literal["auto", "linear", "sqrt", "none"] = "auto"
    # Sync: over the first warmup_steps job steps the factor rises linearly from 1 to its full
    # value (gradual warm-up). None: 5% of the job's planned steps. 0: no warm-up.
    warmup_steps: int | None = Field(None, ge=0)
    # Async and ssp: lookahead: one momentum buffer per worker, and each reply carries the values
    # the parameters will have once every worker's momentum is applied once more (DANA, Hakimi et
    # al. 2019): the job's lr and momentum, n buffers of the shard's size per server.
    # momentum: the explicit momentum shrinks as the measured staleness s grows, so that explicit
    # plus implicit momentum ("asynchrony begets momentum", Mitliagkas et al. 2016) stays at the
    # job's momentum, and a step's size is the job's over sqrt(1 + s); none.
    # auto: lookahead for SGD with momentum, none for the rest.
    async_rule: Literal["auto", "lookahead", "momentum", "none"] = "auto"
    # Pushes the running mean of staleness (which the async rule follows) averages over.
    staleness_window: int = Field(200, ge=1)


class _Hyperparameters(_Frozen):
    # The lr, momentum and schedule are those of one worker; with scaling auto the servers adapt
    # them to the workers that train (see ScalingOptions). none: exactly as written.
    scaling: Literal["auto", "none"] = "auto"
    scaling_options: ScalingOptions = Field(default_factory=ScalingOptions)
    # A learning-rate schedule over job steps, applied by the servers. None: a constant lr.
    schedule: ScheduleConfig | None = None


class SGDConfig(_Hyperparameters):
    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0)
    dampening: float = Field(0.0, ge=0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    # Linear scaling rule by hand: multiply lr by num_workers, whatever the mode and the live
    # workers (needs scaling: none; scaling: auto does this for sync rounds, with warm-up).
    scale_lr_with_workers: bool = False

    @model_validator(mode="after")
    def _nesterov(self) -> SGDConfig:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("optimizer.nesterov needs momentum > 0 and dampening = 0")
        return self


class AdagradConfig(_Hyperparameters):
    name: Literal["adagrad"]
    lr: float = Field(0.01, gt=0)
    lr_decay: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    initial_accumulator_value: float = Field(0.0, ge=0)
    eps: float = Field(1e-10, gt=0)
    scale_lr_with_workers: bool = False


class AdamConfig(_Hyperparameters):
    name: Literal["adam"]
    lr: float = Field(0.001, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scale_lr_with_workers: bool = False

    @model_validator(mode="after")
    def _betas(self) -> AdamConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas must lie in [0, 1), got {self.betas}")
        return self


class AdamWConfig(AdamConfig):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``."""

    name: Literal["adamw"]  # type: ignore[assignment]
    weight_decay: float = Field(0.01, ge=0)


class RegisteredRuleConfig(_Hyperparameters):
    """Any update rule registered with ``downpour.server.optim.register_rule``, by its name.
    ``module`` is imported first (on every server too), so that its ``register_rule`` runs;
    ``args`` reach the rule as ``cfg.args``."""

    name: str
    module: str | None = None
    lr: float = Field(0.01, gt=0)
    args: dict[str, Any] = Field(default_factory=dict)
    scale_lr_with_workers: bool = False

    @model_validator(mode="before")
    @classmethod
    def _known_name(cls, data: Any) -> Any:
        # An unknown name without a module is the error to report (a typo of a built-in's name, say),
        # before the built-in's own fields (momentum, betas) are refused as unknown to this one.
        if isinstance(data, dict) and data.get("module") is None and isinstance(data.get("name"), str):
            from downpour.server.optim import RULES  # the rules' registry

            if data["name"] not in RULES:
                raise ValueError(f"unknown {data['name']!r}; known: {sorted(RULES)} (a rule of your own: give optimizer.module, "
                                 "the module that registers it)")
        return data

    @model_validator(mode="after")
    def _registered(self) -> RegisteredRuleConfig:
        # Without a module the name must be registered already (a built-in, or imported by the caller).
        # A module is not imported here: parsing a job never runs its code (a job may come from the
        # network); it is imported before the job starts (downpour.extensions.check_extensions) and
        # on each server.
        if self.module is None:
            from downpour.server.optim import check_rule  # the rules' registry

            try:
                check_rule(self)
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return self


def _optimizer_kind(v: Any) -> str:
    name = v.get("name", "sgd") if isinstance(v, dict) else getattr(v, "name", "sgd")
    return name if name in ("sgd", "adagrad", "adam", "adamw") else "registered"


OptimizerConfig = Annotated[
    Annotated[SGDConfig, Tag("sgd")] | Annotated[AdagradConfig, Tag("adagrad")] | Annotated[AdamConfig, Tag("adam")]
    | Annotated[AdamWConfig, Tag("adamw")] | Annotated[RegisteredRuleConfig, Tag("registered")],
    Discriminator(_optimizer_kind)]


class SlowdownConfig(_Frozen):
    """Simulate stragglers (tests, benchmarks): worker ``rank`` (every worker if None) sleeps after
    a step so that the step takes ``factor`` times as long as its computation did; each step is
    slowed with ``probability`` (1: a persistent straggler; below 1: transient delays, drawn
    from the job's seed)."""

    rank: int | None = Field(0, ge=0)
    factor: float = Field(2.0, ge=1)
    probability: float = Field(1.0, gt=0, le=1)


class ConsistencyGroupConfig(_Frozen):
    # Parameter names (shell patterns, e.g. "0.*", "*.bias") this group's consistency applies to.
    params: list[str] = Field(min_length=1)
    consistency: Literal["async", "sync", "ssp"]


class TrainingConfig(_Frozen):
    # async: a server applies each push when it arrives (Downpour/ASP).
    # sync: a server waits for one gradient from every live worker, averages, applies (BSP).
    # ssp: as async, but a worker more than staleness_bound pushes ahead of the slowest live
    # worker gets its reply (the new values) only once that worker caught up (stale synchronous
    # parallel, Ho et al. 2013). staleness_bound 0 moves the workers in lockstep.
    consistency: Literal["async", "sync", "ssp"] = "async"
    staleness_bound: int = Field(3, ge=0)
    # Consistency per parameter group: the first group whose pattern matches a parameter's
    # name decides for it; others follow ``consistency``. E.g. sync for the dense layers and
    # async for the embedding tables, as Persia does.
    consistency_groups: list[ConsistencyGroupConfig] = Field(default_factory=list)
    # async/ssp: scale each push by 1/staleness (its staleness in versions, at least 1), as in
    # Zhang et al. 2016, "Staleness-aware async-SGD".
    staleness_lr: bool = False
    # Delayed updates. accumulate: push once every k micro-batches, the mean of their gradients
    # (equal to one batch k times larger). local_steps: take H steps locally with the job's
    # optimizer, then push the change of the parameters, which the servers add (Paddle's geo-SGD;
    # in sync mode the servers average the changes: local SGD with model averaging).
    accumulate: int = Field(1, ge=1)
    local_steps: int = Field(1, ge=1)
    slowdown: SlowdownConfig | None = None
    epochs: int = Field(1, ge=1)
    # Optional cap on optimizer steps per worker; the run ends at whichever of
    # epochs/steps comes first. A rank's count: its replacement, or a resumed job (each rank an
    # equal share of the steps its checkpoint holds), continues it rather than starting afresh.
    steps: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    # Where a worker computes: cpu; cuda (worker i of a machine takes GPU i modulo the GPUs it
    # sees: cuda:LOCAL_RANK); cuda:N (every worker on GPU N); or a list, one device per worker rank.
    device: str | list[str] = "cpu"
    # The loss: cross_entropy over class logits (labels are class numbers), binary_cross_entropy
    # over one logit per example (labels 0/1; evaluation adds AUC), or "pkg.mod:fn", called as
    # fn(output, target) and returning the batch's mean loss as a scalar tensor.
    loss: str = "cross_entropy"
    # Metrics computed at evaluation, name -> "pkg.mod:fn": fn(outputs, targets) over the whole
    # test split (outputs and targets concatenated, on the CPU) returns a number; summary.json
    # lists them under test_metrics.
    metrics: dict[str, str] = Field(default_factory=dict)
    # Gradient clipping on the worker, before the push (of each micro-batch's gradient): the
    # total L2 norm to at most clip_grad_norm, and/or each element to [-clip_grad_value, clip_grad_value].
    clip_grad_norm: float | None = Field(None, gt=0)
    clip_grad_value: float | None = Field(None, gt=0)
    # Mixed precision: forward and loss under torch.autocast in bf16 or fp16 (fp16 with a
    # dynamic loss scale). Parameters and the servers' master copy stay as they are (float32).
    autocast: Literal["none", "bf16", "fp16"] = "none"
    # Buffers (BatchNorm running statistics...): "average" (the examples-weighted mean over the
    # workers at the end of training) or "evaluator" (those of the worker that evaluates); the
    # result is what evaluation uses and what model.pt holds. buffer_policies overrides it per
    # buffer name (shell patterns, the first match wins).
    buffers: Literal["average", "evaluator"] = "average"
    buffer_policies: dict[str, Literal["average", "evaluator"]] = Field(default_factory=dict)
    # Async only: keep one push+pull in flight while the next batch computes, hiding
    # communication behind compute at the price of one more step of staleness per
    # worker. Off by default: on a CPU-bound 2-core machine it gains no speed and the
    # extra staleness costs accuracy (see benchmarks/RESULTS.md).
    overlap: bool = False

    @model_validator(mode="after")
    def _delays(self) -> TrainingConfig:
        if self.accumulate > 1 and self.local_steps > 1:
            raise ValueError("training.accumulate and training.local_steps cannot both exceed 1")
        for d in [self.device] if isinstance(self.device, str) else self.device:
            if not (d in ("cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
                raise ValueError(f"training.device: {d!r} is not cpu, cuda or cuda:N")
        if self.loss not in ("cross_entropy", "binary_cross_entropy") and ":" not in self.loss:
            raise ValueError(f"training.loss: {self.loss!r} is neither cross_entropy, binary_cross_entropy "
                             "nor an import path 'pkg.mod:fn'")
        return self
    # Torch intra-op threads per worker process. 1 suits many processes sharing few cores.
    torch_threads: int = Field(1, ge=1)


class ClusterConfig(_Frozen):
    num_servers: int = Field(2, ge=1)
    num_workers: int = Field(3, ge=1)
    # How `downpour train`'s processes on one machine talk. ipc: unix sockets in RUN_DIR/sock,
    # a folder only this user can open (0700), so they need no keys. tcp: 127.0.0.1, with
    # CURVE keys in RUN_DIR/keys unless --insecure. auto (the default) means ipc. Hand-started
    # nodes use whatever the coordinator's --bind says (tcp, with CURVE keys).
    transport: Literal["auto", "tcp", "ipc"] = "auto"
    # With ipc, a worker and a server pass the values of pushes and pulls through shared memory
    # (a file per request slot in the socket folder); only the headers go through the socket.
    shared_memory: bool = True
    # With ipc, workers send their requests to servers over a plain Unix socket beside each
    # server's ZeroMQ one: one wake-up per message instead of three (transport/uds.py).
    unix_sockets: bool = True
    # The CPU scheduling policy of the job's processes (downpour/processes.py). batch (Linux's
    # SCHED_BATCH): a process that wakes up does not preempt one running on its core, which spares
    # context switches where the job has more busy processes than cores; normal: the default policy.
    cpu_policy: Literal["batch", "normal"] = "batch"
    partitioner: str = "bytes"
    # Largest slice of one tensor stored under one key, in bytes. Larger tensors are cut.
    max_slice_bytes: int = Field(2 * 1024 * 1024, gt=0)
    # Async only: a worker sends a server's keys in requests of at most this many bytes
    # (whole keys), so the server updates one while the next is on the wire.
    max_request_bytes: int = Field(2 * 1024 * 1024, gt=0)
    heartbeat_interval_s: float = Field(0.5, gt=0)
    # A node silent for this long is declared dead.
    heartbeat_timeout_s: float = Field(5.0, gt=0)
    # What a dead or failed worker costs the job. recover: its unfinished data shards go back
    # to the queue (the shard it was in resumes after the examples its pushes covered), the
    # others train on, and a replacement may take its place. fail: the job stops.
    on_worker_failure: Literal["recover", "fail"] = "recover"
    # `downpour train` starts a replacement for a worker that died, up to this many times per job.
    worker_restarts: int = Field(3, ge=0)
    # What a dead server costs the job. recover: a replacement (started by `downpour train`, up
    # to server_restarts times, or by hand with the same --rank) loads the server's keys from the
    # latest checkpoint, workers reconnect to it and training goes on; the updates that server
    # applied since that checkpoint are lost (reported). Needs checkpoints: without a committed
    # one the job stops. fail: the job stops.
    on_server_failure: Literal["recover", "fail"] = "recover"
    server_restarts: int = Field(3, ge=0)
    # A dead server's rank that has no replacement this long after the death was detected (its
    # machine is gone, or `downpour train` has no server_restarts left) moves onto the surviving
    # server that holds the fewest bytes: that process loads the rank's keys from the latest
    # checkpoint and serves them beside its own.
    server_replace_timeout_s: float = Field(30.0, gt=0)
    # Backups of each server rank, each kept by another server process (server/replica.py,
    # placed by coordinator/replication.py, on other hosts first): the primary forwards every
    # request that changes its shard, in order; a backup that joins gets the state, then the
    # stream. When a primary dies the coordinator promotes its most advanced caught-up backup (no
    # checkpoint is loaded, nothing is rolled back), workers replay their unanswered pushes to it
    # (each applied once), and a new backup is built while it serves. `downpour train` starts no
    # replacement process for a dead server then. docs/checkpoints.md, "Replicated servers".
    # Default 0, by measurement: on a 2-core machine shared by every process one backup per rank
    # cost 23-57% of the reference job's examples/s and 33-54% of the CTR job's (each backup
    # repeats its primary's updates on the same cores); a server lost without replicas is
    # survivable from the step-0 checkpoint on (benchmarks/RESULTS.md, "Replicated servers").
    replicas: int = Field(0, ge=0)
    # sync: a push is answered only once every caught-up backup holds it (nothing acknowledged
    # is lost). async: answered at once while the backups lag by at most replication_max_lag
    # forwarded requests (a failover may lose up to that many acknowledged pushes).
    replication: Literal["sync", "async"] = "sync"
    replication_max_lag: int = Field(64, ge=1)
    # A coordinator keeps its state in RUN_DIR/coordinator.db; `downpour train` restarts a dead one
    # (up to coordinator_restarts times) on the same address, and it picks up the running job.
    # Servers and workers keep training meanwhile, repeat the requests that got no answer, and
    # stop only once the coordinator has not answered for coordinator_timeout_s.
    coordinator_restarts: int = Field(3, ge=0)
    coordinator_timeout_s: float = Field(30.0, gt=0)
    # Workers that may train at once: extra workers may join a running job (elastic) up to
    # this many. None: num_workers.
    max_workers: int | None = Field(None, ge=1)
    # A request with no reply for this long fails with an error naming the peer.
    request_timeout_s: float = Field(30.0, gt=0)
    # How long the coordinator waits for all expected nodes to register.
    startup_timeout_s: float = Field(120.0, gt=0)
    # Largest message accepted, in bytes (header plus tensor frames).
    max_message_bytes: int = Field(1 << 30, gt=0)
    # Hard limits against hostile or broken peers: keys in one request (a request for exactly
    # all of a server's keys, in order, is always accepted: that is what a sync push carries),
    # and requests per second from one peer (beyond it a server drops requests and counts them).
    max_keys_per_request: int = Field(1 << 16, gt=0)
    # Feature IDs (pushed and pulled, all tables) in one SPARSE request.
    max_sparse_ids_per_request: int = Field(1 << 21, gt=0)
    max_requests_per_s: float = Field(100_000.0, gt=0)
    # The coordinator's limit per connection (nodes send a few requests per heartbeat interval).
    coordinator_max_requests_per_s: float = Field(2_000.0, gt=0)
    # Simulate a slow network (benchmarks): each worker's link to the servers carries at most
    # this many megabits per second in each direction. None: as fast as the machine goes.
    link_mbit_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _timeouts(self) -> ClusterConfig:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("cluster.heartbeat_timeout_s must exceed cluster.heartbeat_interval_s")
        if self.coordinator_timeout_s < self.heartbeat_timeout_s:
            raise ValueError("cluster.coordinator_timeout_s must be at least cluster.heartbeat_timeout_s")
        if self.max_workers is not None and self.max_workers < self.num_workers:
            raise ValueError(f"cluster.max_workers ({self.max_workers}) is below cluster.num_workers ({self.num_workers})")
        if self.replicas > self.num_servers - 1:
            raise ValueError(f"cluster.replicas: {self.replicas} backups of each server rank need at least "
                             f"{self.replicas + 1} server processes (cluster.num_servers is {self.num_servers})")
        return self

    @property
    def worker_slots(self) -> int:
        """Workers that may train at once (max_workers, or num_workers)."""
        return self.max_workers or self.num_workers


class MonitorConfig(_Frozen):
    """What a job shows of itself while it runs (see docs/monitoring.md)."""

    # Every server and worker serves Prometheus metrics at http://HOST:PORT/metrics (a free
    # port, listed in the run folder's prometheus_targets.json); so does the coordinator.
    metrics: bool = True
    # The coordinator serves a live dashboard (and /api/status, /api/history, /targets).
    dashboard: bool = True
    # The dashboard's port; 0 takes a free one (written to the run folder's dashboard.url).
    dashboard_port: int = Field(0, ge=0, le=65535)
    # Interface every HTTP endpoint binds. 127.0.0.1 keeps them on this machine; give
    # 0.0.0.0 (or an address) for a Prometheus on another host.
    http_host: str = "127.0.0.1"
    # Also write the targets to DIR/<run folder name>.json, emptied when the job ends: one
    # Prometheus file_sd entry (DIR/*.json) then covers every job started with the same DIR.
    targets_dir: str | None = None
    # Scalars (loss, examples/s, staleness, test accuracy) under RUN_DIR/tensorboard.
    tensorboard: bool = True
    # Seconds between the coordinator's samples of the job: dashboard history, TensorBoard.
    sample_interval_s: float = Field(1.0, gt=0)
    # A training worker whose step count has not moved for this long is reported as stalled.
    stall_after_s: float = Field(10.0, gt=0)
    # A worker slower than this fraction of the other workers' median examples/s, for
    # longer than stall_after_s, is reported as falling behind.
    slow_fraction: float = Field(0.5, gt=0, lt=1)
    # Worker 0 evaluates the test split after every this many of the shards it trained, and
    # summary.json keeps the curve (test accuracy against seconds of training) for
    # time-to-accuracy figures. None: only the final evaluation.
    eval_every_shards: int | None = Field(None, ge=1)


CodecName = Literal["none", "fp16", "bf16", "topk", "randomk", "qsgd", "onebit", "powersgd", "int8"]


class DGCConfig(_Frozen):
    """Deep Gradient Compression around topk/randomk (see downpour/compress/feedback.py)."""

    # Momentum applied on the worker (momentum correction); the servers must then use none.
    momentum: float = Field(0.9, ge=0, lt=1)
    # Clip each gradient's L2 norm to this before it is accumulated (None: no clipping).
    clip_norm: float | None = Field(None, gt=0)
    # Over the first warmup_steps pushes the density falls exponentially from warmup_start
    # to the codec's ratio.
    warmup_steps: int = Field(0, ge=0)
    warmup_start: float = Field(0.25, gt=0, le=1)


class PushCodecConfig(_Frozen):
    """How gradients (or local-SGD deltas) are encoded on push. Only the fields of the chosen
    codec matter: ratio (topk, randomk), bits (qsgd), bucket (qsgd, onebit, int8: elements per
    scale), rank (powersgd), seed (randomk, qsgd, powersgd)."""

    codec: CodecName = "none"
    ratio: float = Field(0.01, gt=0, le=1)
    bits: Literal[4, 8] = 8
    bucket: int = Field(512, ge=1, le=1 << 24)
    rank: int = Field(2, ge=1, le=64)
    seed: int = Field(0, ge=0)
    # Keep what the codec did not send and add it to the next push (needed by topk, randomk,
    # onebit, powersgd to converge).
    error_feedback: bool = False
    dgc: DGCConfig | None = None
    # Parameters with fewer elements than this (biases, usually) are sent uncompressed.
    min_numel: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _dgc(self) -> PushCodecConfig:
        if self.dgc is not None and self.codec not in ("topk", "randomk"):
            raise ValueError(f"dgc needs codec topk or randomk, not {self.codec}")
        return self


class GroupCodecConfig(_Frozen):
    # Parameter names (shell patterns, e.g. "*.bias", "0.*") this group's codec applies to.
    params: list[str] = Field(min_length=1)
    push: PushCodecConfig


class CompressionConfig(_Frozen):
    """What travels between workers and servers (see docs/compression.md)."""

    # The default push codec, and per-group overrides (the first group whose pattern matches
    # a parameter's name decides for it).
    push: PushCodecConfig = Field(default_factory=PushCodecConfig)
    groups: list[GroupCodecConfig] = Field(default_factory=list)
    # Parameters as workers receive them: float32 (none), fp16, or int8 with one scale per
    # pull_block elements. The servers keep float32 either way; evaluation pulls float32.
    pull: Literal["none", "fp16", "int8"] = "none"
    pull_block: int = Field(1024, ge=1, le=1 << 24)


class SparseSGDConfig(_Frozen):
    name: Literal["sgd"]
    lr: float = Field(0.01, gt=0)


class SparseAdagradConfig(_Frozen):
    name: Literal["adagrad"] = "adagrad"
    lr: float = Field(0.05, gt=0)
    eps: float = Field(1e-10, gt=0)
    initial_accumulator_value: float = Field(0.0, ge=0)


class SparseAdamConfig(_Frozen):
    """Lazy Adam: a row's moments and step advance only when the row is pushed."""

    name: Literal["adam"]
    lr: float = Field(0.001, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)


class SparseFTRLConfig(_Frozen):
    """FTRL-Proximal (McMahan et al. 2013); l1 > 0 leaves weights exactly zero."""

    name: Literal["ftrl"]
    alpha: float = Field(0.05, gt=0)
    beta: float = Field(1.0, ge=0)
    l1: float = Field(0.0, ge=0)
    l2: float = Field(0.0, ge=0)


SparseOptimizerConfig = Annotated[SparseSGDConfig | SparseAdagradConfig | SparseAdamConfig | SparseFTRLConfig,
                                  Field(discriminator="name")]


class SparseTableConfig(_Frozen):
    """How the servers keep one sparse table (see docs/sparse.md)."""

    @model_validator(mode="before")
    @classmethod
    def _default_rule(cls, data: Any) -> Any:
        # An optimizer section without a name means Adagrad, as the default section does.
        if isinstance(data, dict) and isinstance(data.get("optimizer"), dict) and "name" not in data["optimizer"]:
            data = {**data, "optimizer": {**data["optimizer"], "name": "adagrad"}}
        return data

    optimizer: SparseOptimizerConfig = Field(default_factory=SparseAdagradConfig)
    # New rows start uniform in [-init_scale, init_scale), from a hash of (seed, ID, column).
    init_scale: float = Field(0.01, ge=0)
    # Admission: an ID gets a row only at its admit_after-th sighting, and then with probability
    # admit_probability; until then it reads as zeros and its gradients are dropped.
    admit_after: int = Field(1, ge=1)
    admit_probability: float = Field(1.0, gt=0, le=1)
    # Eviction: rows not pushed for this many of a server's pushes are dropped; each server keeps
    # at most max_rows rows of the table (the least recently pushed go first). None: no limit.
    evict_after_steps: int | None = Field(None, ge=1)
    max_rows: int | None = Field(None, ge=1)


class SparseConfig(SparseTableConfig):
    """Every sparse table's settings; ``tables.<name>`` overrides fields for one table (the fields
    it leaves out come from this section)."""

    tables: dict[str, SparseTableConfig] = Field(default_factory=dict)
    # A worker pulls the next batch's rows (every table, one request per server) while it trains
    # this one, for one step more staleness of the rows (as training.overlap for the dense values).
    # None: on in async jobs (without consistency_groups), off otherwise; sync and ssp refuse it.
    prefetch: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _inherit(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("tables"), dict):
            base = {k: v for k, v in data.items() if k not in ("tables", "prefetch")}
            data = {**data, "tables": {name: {**base, **t} if isinstance(t, dict) else t for name, t in data["tables"].items()}}
        return data

    def table(self, name: str) -> SparseTableConfig:
        t = self.tables.get(name)
        return t if t is not None else SparseTableConfig(**{f: getattr(self, f) for f in SparseTableConfig.model_fields})


class CheckpointConfig(_Frozen):
    """Snapshots of the servers' shards and the job's state (see docs/checkpoints.md)."""

    enabled: bool = True
    # Where: a folder or any fsspec URL (s3://bucket/path, memory://...); default RUN_DIR/checkpoints.
    url: str | None = None
    # The url is a folder every host of the job mounts at the same path (NFS, a shared volume): a
    # local path is then accepted with servers on other hosts (otherwise they are refused).
    shared: bool = False
    # When: every this many optimizer steps (all workers' together), and/or every this many
    # seconds of training, and when training ends.
    every_steps: int | None = Field(None, ge=1)
    every_s: float | None = Field(60.0, gt=0)
    at_end: bool = True
    # One right after the servers are initialized (step 0): a server lost before the first periodic
    # checkpoint is then replaced from it instead of ending the job (off: such a loss ends the job).
    at_start: bool = True
    # Checkpoints kept; older ones are deleted once a newer one is complete (except those a kept
    # checkpoint's sparse deltas build on).
    keep: int = Field(3, ge=1)
    # Sparse tables are saved incrementally: a full base, then only the rows changed since the
    # previous checkpoint; every this many checkpoints a new full base starts the chain again.
    sparse_full_every: int = Field(5, ge=1)
    # A checkpoint not complete after this long is abandoned (the previous one stays the latest).
    timeout_s: float = Field(120.0, gt=0)
    # Continue a stopped job from the latest checkpoint under this run folder or URL: same step,
    # same data position, same optimizer state (``downpour train --resume``).
    resume_from: str | None = None


class RayResources(_Frozen):
    """What one process of a role asks Ray for (its bundle in the job's placement group)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_mb: int | None = Field(None, ge=1)  # Ray's memory resource; None: none asked
    resources: dict[str, float] = Field(default_factory=dict)  # custom resources, e.g. {"trainer": 1}


class RayConfig(_Frozen):
    """The Ray launcher (``launcher: ray``; docs/multi-host.md)."""

    # The cluster: "auto" (the one this machine belongs to), HOST:PORT or ray://HOST:PORT; None:
    # a Ray instance started for this job on this machine.
    address: str | None = None
    # How the servers' and workers' bundles are spread over the nodes (one placement group per job).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    coordinator: RayResources = Field(default_factory=lambda: RayResources(num_cpus=0.5))
    server: RayResources = Field(default_factory=RayResources)
    worker: RayResources = Field(default_factory=RayResources)
    # The placement group must be ready within this long, or the job fails naming what is missing.
    start_timeout_s: float = Field(60.0, gt=0)


class ExportConfig(_Frozen):
    """Exports for serving (docs/online.md): each committed checkpoint is written to ``url`` as
    a version, a full snapshot first and every ``full_every`` versions, deltas between (the
    changed sparse rows and dense slices of ``slice_size`` elements). The export interval is
    the checkpoint interval (``checkpoint.every_s``)."""

    url: str | None = None  # a folder or fsspec URL; None: no export
    precision: Literal["float32", "float16", "int8"] = "float32"
    full_every: int = Field(20, ge=1)
    slice_size: int = Field(256, ge=1)


class JobConfig(_Frozen):
    name: str = "job"

    @model_validator(mode="before")
    @classmethod
    def _default_optimizer_name(cls, data: Any) -> Any:
        # An optimizer section without a name means SGD, as the default section does.
        if isinstance(data, dict) and isinstance(data.get("optimizer"), dict) and "name" not in data["optimizer"]:
            data = {**data, "optimizer": {**data["optimizer"], "name": "sgd"}}
        return data

    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=SGDConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    sparse: SparseConfig = Field(default_factory=SparseConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    # Warm start: take the parameters (not the optimizer state or data position) of the latest
    # checkpoint under this run folder or URL. Parameters new in this model are initialised as
    # usual; one whose shape changed is an error naming it.
    init_from: str | None = None
    # What starts the job's processes: "local" (this machine) or "ray" (a Ray cluster, see ray below).
    launcher: str = "local"
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _momentum_once(self) -> JobConfig:
        codecs = [self.compression.push, *(g.push for g in self.compression.groups)]
        if any(c.dgc is not None and c.dgc.momentum > 0 for c in codecs) and getattr(self.optimizer, "momentum", 0) > 0:
            raise ValueError("compression dgc.momentum and optimizer.momentum would both apply momentum: "
                             "set optimizer.momentum: 0 (DGC applies it on the workers)")
        t = self.training
        if self.cluster.replicas and (t.consistency == "ssp" or t.consistency_groups):
            raise ValueError("cluster.replicas: replication supports training.consistency async and sync (without "
                             "consistency_groups); this job uses " + ("consistency_groups" if t.consistency_groups else "ssp"))
        if self.sparse.prefetch and (t.consistency != "async" or t.consistency_groups):
            raise ValueError("sparse.prefetch: pulling rows a batch ahead adds a step of staleness, which only "
                             f"async training allows; this job uses {'consistency_groups' if t.consistency_groups else t.consistency}")
        slow = self.training.slowdown
        if slow is not None and slow.rank is not None and slow.rank >= self.cluster.num_workers:
            raise ValueError(f"training.slowdown.rank {self.training.slowdown.rank} is not a worker rank "
                             f"(0..{self.cluster.num_workers - 1})")
        return self

    @model_validator(mode="after")
    def _scaling(self) -> JobConfig:
        opt, t = self.optimizer, self.training
        o, f = opt.scaling_options, "optimizer.scaling_options"
        if opt.scaling == "none":
            if o != ScalingOptions():
                raise ValueError(f"{f} is set but optimizer.scaling is none: set optimizer.scaling: auto to use it")
            return self
        if opt.scale_lr_with_workers:
            raise ValueError("optimizer.scale_lr_with_workers scales by hand: it needs optimizer.scaling: none "
                             "(auto scales sync rounds by the live workers itself)")
        if t.staleness_lr:
            raise ValueError("training.staleness_lr compensates staleness by hand: it needs optimizer.scaling: none "
                             "(auto compensates the measured staleness itself)")
        if t.local_steps > 1 and (o.sync_lr not in ("auto", "none") or o.async_rule in ("momentum", "lookahead")):
            raise ValueError(f"{f}: training.local_steps pushes changes of the parameters, which no update rule "
                             "applies, so there is nothing to scale; leave sync_lr and async_rule at auto")
        if o.async_rule in ("momentum", "lookahead") and getattr(opt, "momentum", 0) <= 0:
            raise ValueError(f"{f}.async_rule: {o.async_rule} needs an update rule with momentum; optimizer "
                             f"{opt.name} has {'momentum 0' if opt.name == 'sgd' else 'none'}")
        modes = {t.consistency, *(g.consistency for g in t.consistency_groups)}
        if o.warmup_steps and "sync" not in modes:
            raise ValueError(f"{f}.warmup_steps: warm-up applies to sync rounds, and this job has none "
                             f"(training.consistency: {t.consistency})")
        if o.warmup_steps and t.steps is not None and o.warmup_steps > t.steps * self.cluster.num_workers:
            raise ValueError(f"{f}.warmup_steps ({o.warmup_steps}) is longer than the job "
                             f"({t.steps * self.cluster.num_workers} job steps: training.steps × cluster.num_workers)")
        return self

    @property
    def sparse_prefetch(self) -> bool:
        """Whether workers pull sparse rows a batch ahead (``sparse.prefetch``, resolved)."""
        t = self.training
        if self.sparse.prefetch is not None:
            return self.sparse.prefetch
        return t.consistency == "async" and not t.consistency_groups

    def planned_steps(self, num_train: int) -> int:
        """Job steps (updates a worker pushes, all workers together: the unit of schedules and
        warm-up) this job plans to take over ``num_train`` training examples; 0 for a stream (no end)."""
        t = self.training
        if num_train >= STREAM_SPAN:
            return 0
        total = -(-num_train // (t.batch_size * t.accumulate)) * t.epochs
        return min(total, t.steps * self.cluster.num_workers) if t.steps is not None else total

    def effective_lr(self) -> float:
        """The learning rate the servers use, after the optional linear scaling rule."""
        opt = self.optimizer
        return opt.lr * (self.cluster.num_workers if opt.scale_lr_with_workers else 1)


_OPTIMIZER_TAGS: dict[str, type[BaseModel]] = {"sgd": SGDConfig, "adagrad": AdagradConfig, "adam": AdamConfig, "adamw": AdamWConfig}
_SPARSE_TAGS: dict[str, type[BaseModel]] = {"sgd": SparseSGDConfig, "adagrad": SparseAdagradConfig, "adam": SparseAdamConfig,
                                            "ftrl": SparseFTRLConfig}
_TAGS = {*_OPTIMIZER_TAGS, *_SPARSE_TAGS, "registered"}  # the optimizer unions' tags (not fields a user wrote)


def _rule_at(loc: tuple) -> tuple[str, str, type[BaseModel]] | None:
    """(the optimizer section's path, its rule's name, the rule's config) when ``loc`` is inside a dense
    (``optimizer``) or sparse (``sparse[.tables.T].optimizer``) optimizer of a known rule."""
    for i in range(len(loc) - 1):
        if loc[i] == "optimizer":
            rule = (_SPARSE_TAGS if loc[0] == "sparse" else _OPTIMIZER_TAGS).get(str(loc[i + 1]))
            return (".".join(str(p) for p in loc[: i + 1]), str(loc[i + 1]), rule) if rule is not None else None
    return None


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid job configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for i, p in enumerate(e["loc"]) if not (i > 0 and e["loc"][i - 1] == "optimizer" and p in _TAGS))
        loc = loc or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
            msg = f"must be one of {e['ctx']['expected']}"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown name {e['ctx'].get('tag')!r}; allowed: {e['ctx'].get('expected_tags')}"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
            at = _rule_at(e["loc"]) if len(e["loc"]) > 2 else None
            if at is not None:  # (a job switched to another rule on the command line, keeping the old one's fields)
                section, name, rule = at
                msg = (f"unknown field for optimizer {name} (it takes {', '.join(rule.model_fields)}; "
                       f"replace the whole mapping to switch rules: --set '{section}={{name: {name}, ...}}')")
        given = e.get("input")
        shown = "" if isinstance(given, dict) or e["type"] == "missing" else f" (got {given!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def parse_job(raw: Any, source: str = "job") -> JobConfig:
    """Validate a plain mapping into a :class:`JobConfig`; raise :class:`ConfigError` naming the bad fields."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid job configuration ({source}): expected a mapping at the top level")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars) to a raw job mapping.

    A bare top-level training key may be given without its section
    (``epochs=3`` means ``training.epochs=3``). ``key=null`` sets null where the field takes it
    (``training.clip_grad_norm=null``: no clipping) and otherwise restores the field's default.
    """
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, _, text = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if len(parts) == 1 and parts[0] in TrainingConfig.model_fields:
            parts = ["training", parts[0]]
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: cannot parse value {text!r}: {err}") from None
        node = out
        if value is None and not _takes_null(parts):  # the default, as though the job file did not set it
            for p in parts[:-1]:
                node = node.get(p) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(parts[-1], None)
            continue
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _takes_null(parts: list[str]) -> bool:
    """Whether the job field at ``parts`` accepts null (an optional field). A path the schema does not
    know, or one inside a free mapping (``model.args``), says yes: validation judges it as given."""
    models: list[Any] = [JobConfig]
    for i, part in enumerate(parts):
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            return True
        if i == len(parts) - 1:
            try:
                TypeAdapter(fields[0].annotation).validate_python(None)
            except ValidationError:
                return False
            return True
        models = _models_in(fields[0].annotation)
    return True


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config sections an annotation names: a section, or each section of a union of them."""
    if isinstance(annotation, type):
        return [annotation] if issubclass(annotation, BaseModel) else []
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently, so a section written twice would lose the first one's settings)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            twice = key in seen
        except TypeError:  # an unhashable key: PyYAML's own error follows
            break
        if twice:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_yaml(text: str, where: str) -> Any:
    """A job file's text as Python values (safe: plain types only); a clear error when it is not YAML
    or gives a key twice."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"job file {where} is not valid YAML: {err}") from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job file, apply ``--set`` overrides, validate."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read job file {p}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"job file {p} is not UTF-8 text (byte {err.start}): a YAML job file is expected") from None
    raw = parse_yaml(text, str(p))
    if raw is None:
        raise ConfigError(f"job file {p} is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid job configuration ({p}): expected a mapping at the top level")
    return parse_job(apply_overrides(raw, overrides or []), source=str(p))


def job_to_dict(job: JobConfig) -> dict[str, Any]:
    """A JSON/YAML-safe mapping that :func:`parse_job` turns back into the same config."""
    return job.model_dump(mode="json")
