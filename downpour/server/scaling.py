"""Effective hyperparameters: the lr and momentum a server's update rule uses at each update.

    lr(t)       = optimizer.lr × schedule(t) × sync_factor(n, t) × async_lr_factor(s)
    momentum(t) = async_momentum(s)  (optimizer.momentum when nothing is stale; a cycle_momentum
                                      schedule's momentum(t) in its place, and Adam's beta1(t))

(async_lr_factor and async_momentum are 1 and the job's momentum under ``async_rule: lookahead``.)

``t`` is the job step of the keys updated (updates workers pushed to them, all workers
together: one optimizer step of the same job on one worker), ``n`` the number of gradients a
sync round averaged (the live workers: it follows joins, leaves and deaths), ``s`` the running
mean of the staleness the server measures. With ``optimizer.scaling: none`` only the schedule
applies, so the update rule sees exactly the job's lr and momentum (today's behaviour).

**Sync** (a round averages n gradients: one batch n times larger). The linear scaling rule
(Goyal et al. 2017) multiplies the lr by n, sqrt by √n; over the first ``warmup_steps`` job steps
the factor rises linearly from 1 to its full value.

**Async and ssp, lookahead** (the default for SGD with momentum; server/lookahead.py): the job's lr
and momentum, with one momentum buffer per worker and replies that look ahead over the other
workers' pending momentum (DANA, Hakimi et al. 2019). It needs nothing from this module beyond
the schedule: what a stale push would add as implicit momentum is taken out of the workers'
gradients instead of out of the explicit momentum.

**Async and ssp, momentum** ("asynchrony begets momentum", Mitliagkas et al. 2016). With pushes s versions
stale on average (geometrically distributed), asynchronous SGD with lr η behaves in expectation
like momentum SGD with implicit momentum μ_i = s / (1 + s) and lr η / (1 + s). Explicit momentum μ_e
composes with it as 1 - μ_total = (1 - μ_e)(1 - μ_i), so the rule keeps μ_total at the job's μ:

    μ_e = max(0, 1 - (1 - μ)(1 + s))
    lr  × (1 - μ_e) / ((1 - μ) sqrt(1 + s))

so that a step's gain, lr / (1 - μ_e), is the job's, lr / (1 - μ), over sqrt(1 + s): for s below
μ / (1 - μ) that is lr × sqrt(1 + s), giving back the square root of the 1 / (1 + s) the implicit
momentum took; beyond, where no explicit momentum is left, a staleness-aware lr (the square
root of Zhang et al.'s 1 / s). Giving back all of it (lr × (1 + s)) keeps a step's size but is
unstable under delay; none of it leaves training slow (benchmarks/RESULTS.md). Why not all of it:
the implicit-momentum model holds for geometrically distributed staleness, but a cluster of
similar workers makes nearly every push about n - 1 versions stale, and a fixed delay τ
destabilises long before the momentum it is equivalent to in expectation (gradient descent with
delay τ on curvature λ is stable only for lr·λ < 2 sin(π / (2(2τ + 1))) ≈ π / (2τ + 1)). What the
square root gives up shows with many workers: at 16 async workers on the reference job a step's
gain is a quarter of the job's, which alone costs about 2 points at 1 epoch, and the delay about
as much again (benchmarks/RESULTS.md). At s = 0 nothing changes. It is
closed loop: s is re-measured on every push (a running mean over ``staleness_window`` pushes),
so more workers, stragglers or ``overlap`` move it. Adaptive rules (Adagrad, Adam) normalise
their steps by the gradients' own scale; they get the sync factor (sqrt by default) and no
async rule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from downpour.config import JobConfig
from downpour.errors import ConfigError
from downpour.server.schedule import check_schedule, make_schedule

WARMUP_FRACTION = 0.05  # default warm-up: this share of the job's planned steps
TRACE_POINTS = 200  # effective values kept for the summary over a job
UNBOUNDED_CHECK_STEPS = 100_000  # job steps a stream job's schedule is checked over


@dataclass(frozen=True)
class Plan:
    """What ``scaling: auto`` resolved to for one job (shown in summary.json)."""

    sync_lr: str  # linear | sqrt | none
    warmup_steps: int
    async_rule: str  # lookahead | momentum | none
    staleness_window: int


def resolve(job: JobConfig, planned_steps: int | None) -> Plan:
    """The scaling ``job`` asks for, with every ``auto`` decided (``planned_steps``: the job's
    length in job steps, for the default warm-up; None when unknown)."""
    opt, t = job.optimizer, job.training
    o = opt.scaling_options
    if opt.scaling == "none" or t.local_steps > 1:  # local SGD pushes changes that no rule applies
        return Plan("none", 0, "none", o.staleness_window)
    sync_lr = o.sync_lr if o.sync_lr != "auto" else ("linear" if opt.name == "sgd" else "sqrt")
    momentum = getattr(opt, "momentum", 0.0)
    async_rule = o.async_rule if o.async_rule != "auto" else ("lookahead" if opt.name == "sgd" and momentum > 0 else "none")
    if o.warmup_steps is not None:
        warmup = o.warmup_steps
    else:
        warmup = round(WARMUP_FRACTION * planned_steps) if planned_steps else 0
    return Plan(sync_lr, warmup, async_rule, o.staleness_window)


def check_hyperparameters(job: JobConfig, num_train: int) -> None:
    """Checks that need the job's length (known once the data is): a warm-up longer than the job,
    a schedule that yields something other than a finite factor ≥ 0 over the job's steps."""
    planned = job.planned_steps(num_train)
    if planned:  # a stream has no planned length: its schedule is checked over its first steps
        check_scaling(job, planned)
    check_schedule(job.optimizer.schedule, job.effective_lr(), planned or UNBOUNDED_CHECK_STEPS,
                   getattr(job.optimizer, "momentum", None), getattr(job.optimizer, "betas", None))


def check_scaling(job: JobConfig, planned_steps: int) -> None:
    o = job.optimizer.scaling_options
    if job.optimizer.scaling == "auto" and o.warmup_steps and o.warmup_steps > planned_steps:
        raise ConfigError(f"optimizer.scaling_options.warmup_steps ({o.warmup_steps}) is longer than the job "
                          f"({planned_steps} job steps: its examples × epochs / (training.batch_size × "
                          "training.accumulate))")


def sync_factor(rule: str, n: int, step: int, warmup_steps: int) -> float:
    """The lr factor of a sync round that averaged ``n`` gradients, at job ``step``."""
    if rule == "none" or n <= 1:
        return 1.0
    full = float(n) if rule == "linear" else math.sqrt(n)
    if step < warmup_steps:
        return 1.0 + (full - 1.0) * step / warmup_steps
    return full


def async_compensation(momentum: float, staleness: float) -> tuple[float, float]:
    """(explicit momentum, lr factor) that keep the job's ``momentum`` in total under a mean
    ``staleness`` (module docstring)."""
    if staleness <= 0 or momentum <= 0:
        return momentum, 1.0
    # 1 - total = (1 - explicit)(1 - implicit), implicit = s / (1 + s): the explicit momentum left.
    explicit = max(0.0, 1.0 - (1.0 - momentum) * (1.0 + staleness))
    # A step's gain lr / (1 - explicit) is the job's, lr / (1 - momentum), over sqrt(1 + s).
    return explicit, (1.0 - explicit) / ((1.0 - momentum) * math.sqrt(1.0 + staleness))


def total_momentum(explicit: float, staleness: float) -> float:
    """Explicit and implicit momentum together: 1 - total = (1 - explicit)(1 - implicit), with
    implicit = s / (1 + s) for a mean staleness s."""
    return 1.0 - (1.0 - explicit) / (1.0 + max(staleness, 0.0))


class RunningMean:
    """Mean of the last ~``window`` values: the plain mean until ``window`` values were seen,
    then an exponential average with weight 1/window (no list of values kept)."""

    def __init__(self, window: int) -> None:
        self.window, self.n, self.value = window, 0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.value += (x - self.value) / min(self.n, self.window)


class Hyperparams:
    """One server's effective hyperparameters (pure: no clock, no sockets). The store asks
    :meth:`set_rule` before each update; the policy's staleness records feed :meth:`observe`."""

    def __init__(self, job: JobConfig, planned_steps: int | None = None) -> None:
        opt = job.optimizer
        self.base_lr = job.effective_lr()
        self.momentum = getattr(opt, "momentum", None)
        self.plan = resolve(job, planned_steps)
        self.betas = getattr(opt, "betas", None)  # Adam's: a cycle_momentum schedule sets beta1
        self.schedule = make_schedule(opt.schedule, self.base_lr, self.momentum, self.betas)
        self.scheduled = opt.schedule is not None
        self.staleness = RunningMean(self.plan.staleness_window)
        self.workers = job.cluster.num_workers  # live workers (MEMBERSHIP); shown beside the values
        self.lr, self.explicit = self.base_lr, self.momentum  # the last values handed to the rule
        self.step = 0
        self.every = max(1, (planned_steps or 0) // TRACE_POINTS)
        self.trace: list[list[float]] = []  # [job step, lr, explicit momentum, total momentum, staleness]
        self._next_trace = 0

    def observe(self, staleness: int) -> None:
        """A push ``staleness`` versions stale was applied (async, ssp)."""
        self.staleness.add(staleness)

    def set_workers(self, n: int) -> None:
        self.workers = n

    def at(self, step: int, pushes: int = 1) -> tuple[float, float | None]:
        """(lr, momentum) for an update at job ``step`` averaging ``pushes`` gradients."""
        lr, momentum = self.base_lr, self.momentum
        if self.scheduled:
            f = float(self.schedule.factor(step))
            if not (math.isfinite(f) and f >= 0):
                raise ConfigError(f"optimizer.schedule: lr factor {f} at job step {step}; it must be a finite number of at least 0")
            lr = lr * f
            scheduled = self.schedule.momentum(step)  # (OneCycleLR's cycle_momentum)
            if scheduled is not None and momentum is not None:
                momentum = scheduled
        p = self.plan
        if pushes > 1 and p.sync_lr != "none":
            lr = lr * sync_factor(p.sync_lr, pushes, step, p.warmup_steps)
        if p.async_rule == "momentum" and momentum and self.staleness.value > 0:
            momentum, factor = async_compensation(momentum, self.staleness.value)
            lr = lr * factor
        return lr, momentum

    def set_rule(self, rule: Any, step: int, pushes: int = 1) -> None:
        """Give ``rule`` the lr (and momentum, where it has one) for this update."""
        self.lr, self.explicit = self.at(step, pushes)
        rule.lr = self.lr
        if self.explicit is not None and hasattr(rule, "momentum"):
            rule.momentum = self.explicit
        if self.betas is not None and self.scheduled and hasattr(rule, "beta1"):
            beta1 = self.schedule.momentum(step)  # (OneCycleLR's cycle_momentum on Adam)
            rule.beta1 = self.betas[0] if beta1 is None else beta1
        self.step = step
        if step >= self._next_trace and len(self.trace) < 4 * TRACE_POINTS:
            self._next_trace = step + self.every
            self.trace.append(self.current_row())

    def current_row(self) -> list[float]:
        s = self.staleness.value
        # The look-ahead takes the delay's implicit momentum out of the workers' gradients: the total is the explicit.
        compensated = self.explicit is not None and self.plan.async_rule == "momentum"
        total = total_momentum(self.explicit, s) if compensated else self.explicit
        return [self.step, self.lr, self.explicit if self.explicit is not None else 0.0,
                total if total is not None else 0.0, s]

    def progress(self) -> dict[str, float]:
        """The current effective values (heartbeat, /metrics)."""
        step, lr, explicit, total, s = self.current_row()
        return {"lr": lr, "momentum": explicit, "momentum_total": total, "staleness_recent": s, "job_step": step}

    def report(self) -> dict[str, Any]:
        """For summary.json: what was resolved, and the effective values over the job."""
        return {"base_lr": self.base_lr, "momentum": self.momentum, "plan": asdict(self.plan),
                "final": self.progress(), "trace": [*self.trace, self.current_row()]}
