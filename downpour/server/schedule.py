"""Learning-rate schedules, as factors of the job's lr at each job step.

A schedule maps a job step (one update a worker pushes; one optimizer step of the same job on
one worker) to a factor of ``optimizer.lr``. The built-in schedules are torch's closed forms
(StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR); ``lambda`` calls the user's
function, as LambdaLR does; ``torch`` builds any ``torch.optim.lr_scheduler``-style class on a
one-parameter optimizer and steps it once per job step, remembering every value it produced,
so that keys at different steps cost nothing. Tests compare each to torch to 1e-7. A scheduler that
also sets the momentum (OneCycleLR's and CyclicLR's ``cycle_momentum``) gives SGD's momentum, or
Adam's beta1, at each step too (:meth:`Schedule.momentum`), built on an optimizer of the job's kind
as torch.optim's would be; for a job with neither to give it to, it is refused.

:func:`check_schedule` runs a schedule over a job's planned steps at load time and names the
field when it yields something that is not a positive finite factor (NaN, Inf, below 0).
"""

from __future__ import annotations

import bisect
import logging
import math
import warnings
from array import array
from collections.abc import Callable

import torch

from downpour.config import (
    CosineSchedule,
    ExponentialSchedule,
    LambdaSchedule,
    MultiStepSchedule,
    ScheduleConfig,
    StepSchedule,
    TorchSchedule,
)
from downpour.errors import ConfigError
from downpour.imports import import_object

log = logging.getLogger(__name__)

FIELD = "optimizer.schedule"
_CHECK_STEPS = 100_000  # check_schedule looks at every step up to this many, then at 1,000 more spread over the rest


class Schedule:
    """A constant lr (no schedule): factor 1 at every step."""

    def factor(self, step: int) -> float:
        return 1.0

    def momentum(self, step: int) -> float | None:
        """SGD's momentum (Adam's beta1) at ``step`` where the schedule sets it; None: the job's own."""
        return None


class ClosedForm(Schedule):
    def __init__(self, fn: Callable[[int], float]) -> None:
        self.fn = fn

    def factor(self, step: int) -> float:
        return self.fn(step)


class Recorded(Schedule):
    """A torch lr_scheduler-style object stepped forward on demand; every value is kept."""

    def __init__(self, cls: Callable, args: dict, base_lr: float, momentum: float | None = None,
                 betas: tuple[float, float] | None = None) -> None:
        self.base_lr = base_lr
        self.param = torch.nn.Parameter(torch.zeros(1))
        # The optimizer's kind decides what a cycle_momentum scheduler sets: SGD's momentum, Adam's betas.
        self.opt = (torch.optim.Adam([self.param], lr=base_lr, betas=betas) if betas is not None else
                    torch.optim.SGD([self.param], lr=base_lr, momentum=momentum or 0.0))
        self.job_momentum = betas[0] if betas is not None else momentum
        try:
            self.sched = cls(self.opt, **args)
        except Exception as err:  # the user's class and arguments: any failure is a config error
            raise ConfigError(f"{FIELD}: cannot build {getattr(cls, '__name__', cls)}({args}): {err}") from None
        if not hasattr(self.sched, "step"):
            raise ConfigError(f"{FIELD}: {type(self.sched).__name__} has no step() method")
        self.values = array("d", [self.opt.param_groups[0]["lr"] / base_lr])
        self.momenta = array("d", [self._momentum()])
        self.failed = False

    def factor(self, step: int) -> float:
        while len(self.values) <= step and not self.failed:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.opt.step()  # no gradient: changes nothing, but schedulers expect it first
                    self.sched.step()
            except Exception as err:  # e.g. OneCycleLR past total_steps: hold its last value
                log.warning("%s: %s stopped at step %d (%s); its last lr holds", FIELD, type(self.sched).__name__,
                            len(self.values) - 1, err)
                self.failed = True
                break
            self.values.append(self.opt.param_groups[0]["lr"] / self.base_lr)
            self.momenta.append(self._momentum())
        return self.values[min(step, len(self.values) - 1)]

    def _momentum(self) -> float:
        group = self.opt.param_groups[0]
        return float(group["betas"][0] if "betas" in group else group["momentum"])

    def momentum(self, step: int) -> float | None:
        self.factor(step)  # (stepped that far)
        return self.momenta[min(step, len(self.momenta) - 1)] if self.job_momentum else None

    def sets_momentum(self) -> bool:
        """Whether the scheduler changed the momentum in the steps taken so far."""
        return any(m != self.momenta[0] for m in self.momenta) or self.momenta[0] != (self.job_momentum or 0.0)


def make_schedule(cfg: ScheduleConfig | None, base_lr: float, momentum: float | None = None,
                  betas: tuple[float, float] | None = None) -> Schedule:
    """The schedule ``cfg`` describes, for a job whose lr is ``base_lr`` and SGD momentum ``momentum``,
    or Adam's ``betas`` (None: its optimizer has none)."""
    if cfg is None:
        return Schedule()
    if isinstance(cfg, StepSchedule):
        return ClosedForm(lambda t: cfg.gamma ** (t // cfg.step_size))
    if isinstance(cfg, MultiStepSchedule):
        milestones = sorted(cfg.milestones)
        return ClosedForm(lambda t: cfg.gamma ** bisect.bisect_right(milestones, t))
    if isinstance(cfg, ExponentialSchedule):
        return ClosedForm(lambda t: cfg.gamma**t)
    if isinstance(cfg, CosineSchedule):
        floor = cfg.eta_min / base_lr
        return ClosedForm(lambda t: floor + (1 - floor) * (1 + math.cos(math.pi * t / cfg.t_max)) / 2)
    if isinstance(cfg, LambdaSchedule):
        return ClosedForm(import_object(cfg.function, f"{FIELD}.function"))
    if isinstance(cfg, TorchSchedule):
        return Recorded(_scheduler_class(cfg.scheduler), cfg.args, base_lr, momentum, betas)
    raise ConfigError(f"{FIELD}: unknown schedule {cfg!r}")


def _scheduler_class(name: str) -> Callable:
    if ":" in name:
        return import_object(name, f"{FIELD}.scheduler")
    if name == "ReduceLROnPlateau":
        raise ConfigError(f"{FIELD}.scheduler: ReduceLROnPlateau needs a metric each step; the servers have none")
    cls = getattr(torch.optim.lr_scheduler, name, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.optim.lr_scheduler.LRScheduler):
        known = sorted(n for n, c in vars(torch.optim.lr_scheduler).items() if isinstance(c, type)
                       and issubclass(c, torch.optim.lr_scheduler.LRScheduler) and not n.startswith("_")
                       and n not in ("LRScheduler", "ReduceLROnPlateau", "ChainedScheduler", "SequentialLR"))
        raise ConfigError(f"{FIELD}.scheduler: {name!r} is not a torch.optim.lr_scheduler class; known: {known}, "
                          "or an import path 'pkg.mod:Class'")
    return cls


def check_schedule(cfg: ScheduleConfig | None, base_lr: float, steps: int, momentum: float | None = None,
                   betas: tuple[float, float] | None = None) -> None:
    """Raise :class:`ConfigError` naming the field if the schedule's factor is not a finite number
    of at least 0 at some step in ``[0, steps]`` (every step up to 100,000, then a sample), or if it
    sets a momentum the job has not (``momentum``: the job's SGD momentum, None or 0: none; ``betas``:
    Adam's)."""
    if cfg is None:
        return
    schedule = make_schedule(cfg, base_lr, momentum, betas)
    dense = min(steps, _CHECK_STEPS)
    where = list(range(dense + 1))
    if steps > dense and not isinstance(schedule, Recorded):  # a recorded one would step to each sample
        where += [dense + (steps - dense) * i // 1000 for i in range(1, 1001)]
    for t in where:
        try:
            f = float(schedule.factor(t))
        except Exception as err:  # the user's function: any failure is a config error
            raise ConfigError(f"{FIELD}: {cfg.name} schedule fails at step {t}: {err}") from None
        if not (math.isfinite(f) and f >= 0):
            raise ConfigError(f"{FIELD}: the {cfg.name} schedule yields lr factor {f} at step {t}; "
                              "it must be a finite number of at least 0")
    if isinstance(schedule, Recorded) and not schedule.job_momentum and schedule.sets_momentum():
        raise ConfigError(f"{FIELD}: {type(schedule.sched).__name__} changes the momentum at each step (cycle_momentum), which "
                          f"this job's optimizer has none of: set {FIELD}.args.cycle_momentum: false (the servers give it to "
                          "SGD's momentum when optimizer.momentum > 0, and to Adam's beta1)")
