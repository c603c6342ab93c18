"""When a worker pushes, and what: the push schedule, one small strategy per kind.

* :class:`Accumulate` sums the gradients of ``training.accumulate`` micro-batches into their
  examples-weighted mean and pushes it once (``accumulate: 1``, the default: every step's
  gradient as it is). The mean equals one batch that many times larger.
* :class:`LocalSGD` steps a local copy of the job's optimizer ``training.local_steps`` times and
  pushes the change of the parameters since the values last received, which the servers add
  (Paddle's geo-SGD).

The trainer calls :meth:`~PushSchedule.after_backward` once per step (True: a push is due),
:meth:`~PushSchedule.take` for what to push (None: nothing since the last push), and
:meth:`~PushSchedule.received` whenever new values sit in the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from downpour.config import JobConfig
from downpour.errors import ConfigError
from downpour.worker.client import Flat, Pieces
from downpour.worker.flat import FlatModel

_LOCAL_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda params, o: torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay),
    "sgd": lambda params, o: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, dampening=o.dampening,
                                             nesterov=o.nesterov, weight_decay=o.weight_decay),
    "adagrad": lambda params, o: torch.optim.Adagrad(params, lr=o.lr, lr_decay=o.lr_decay, weight_decay=o.weight_decay,
                                                     initial_accumulator_value=o.initial_accumulator_value, eps=o.eps),
    "adam": lambda params, o: torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay),
}


def local_optimizer(job: JobConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The job's optimizer as a torch optimizer on the worker (local SGD's local steps)."""
    make = _LOCAL_OPTIMIZERS.get(job.optimizer.name)
    if make is None:
        raise ConfigError(f"training.local_steps > 1 runs the optimizer on the workers too, which knows no torch "
                          f"equivalent of the registered rule {job.optimizer.name!r}")
    return make(params, job.optimizer)


class PushSchedule:
    """The contract; see the module's docstring."""

    # True when the model's values are the worker's own between pushes (not the servers').
    own_values = False

    def after_backward(self, examples: int, steps: int) -> bool:
        """The step that just computed its gradients (``examples`` in its batch, ``steps`` so far
        including it): record it; True when a push is due now."""
        raise NotImplementedError

    def take(self, steps: int, pushed_at: int) -> tuple[Flat, float, bool] | None:
        """What to push now, as (vector, weight, is_delta), and forget it; None when nothing is owed
        (``pushed_at``: ``steps`` at the last push)."""
        raise NotImplementedError

    def received(self, values: torch.Tensor) -> None:
        """New values (the first pull, or a push+pull settled) now sit in the model."""


class Accumulate(PushSchedule):
    def __init__(self, flat: FlatModel, every: int) -> None:
        self.flat, self.every = flat, every
        # The examples-weighted mean of the gradients since the last push, over ``n`` examples.
        self.mean: Flat | None = None
        self.n = 0

    def after_backward(self, examples: int, steps: int) -> bool:
        self.n += examples
        if self.mean is None:  # one batch's mean, as it is: no pass over the vector
            # Pushed at once (every step): the gradients as they are, gathered by the push itself.
            self.mean = self.flat.grad_pieces() if self.every == 1 else self.flat.grad_vector()
        else:  # running mean: mean += (grad - mean) * n / N
            if isinstance(self.mean, Pieces):
                self.mean = self.mean.vector()
            self.mean.add_(self.flat.grad_vector().sub_(self.mean), alpha=examples / self.n)
        return steps % self.every == 0

    def take(self, steps: int, pushed_at: int) -> tuple[Flat, float, bool] | None:
        if self.mean is None:
            return None
        out = (self.mean, float(self.n), False)
        self.mean, self.n = None, 0
        return out


class LocalSGD(PushSchedule):
    own_values = True

    def __init__(self, job: JobConfig, flat: FlatModel, every: int) -> None:
        if flat.cast:
            raise ConfigError("training.local_steps > 1 needs float32 parameters (the local steps update the "
                              f"model's own tensors); {len(flat.cast)} are not")
        self.flat, self.every = flat, every
        self.optimizer = local_optimizer(job, flat.params)
        self.base: torch.Tensor | None = None  # the values last received

    def after_backward(self, examples: int, steps: int) -> bool:
        self.optimizer.step()
        return steps % self.every == 0

    def take(self, steps: int, pushed_at: int) -> tuple[torch.Tensor, float, bool] | None:
        if self.base is None or steps == pushed_at:
            return None
        current = self.flat.flat.detach()
        return (current.cpu() if current.is_cuda else current) - self.base, float(steps - pushed_at), True

    def received(self, values: torch.Tensor) -> None:
        self.base = values.clone()  # the next change is measured from these


def push_schedule(job: JobConfig, flat: FlatModel) -> PushSchedule:
    t = job.training
    return LocalSGD(job, flat, t.local_steps) if t.local_steps > 1 else Accumulate(flat, t.accumulate)
