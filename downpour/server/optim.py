"""Server-side update rules (optimizers) on flat parameter ranges.

An update rule owns its state for a server's whole flat shard and updates any
range of it in place: ``apply(param, grad, lo, hi, step)`` where ``param`` is the
shard, ``grad`` the gradient for ``param[lo:hi]`` and ``step`` how many updates
that range had before (0 for its first). The math follows ``torch.optim``
exactly (tests compare them to 1e-5), with no per-element Python loops.

New rules register with :func:`register_rule`; an unknown name lists the known ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from downpour.config import AdagradConfig, AdamConfig, SGDConfig
from downpour.errors import ConfigError
from downpour.server import kernels


class UpdateRule:
    """Base class: subclasses allocate state in ``__init__`` and implement ``apply``. A rule whose
    ``apply`` takes ``out=`` (``fuses_out``) writes the range's new values there too, in the same
    pass; for the others the store copies them."""

    fuses_out = False
    # A rule with ``apply_mean`` (``fuses_mean``) takes a sync round's gradients as they came and
    # averages them in the same pass as its step (server/store.py's apply_mean).
    fuses_mean = False

    def __init__(self, cfg, lr: float, numel: int) -> None:
        self.cfg = cfg
        self.lr = lr

    def apply(self, param: torch.Tensor, grad: torch.Tensor, lo: int, hi: int, step: int) -> None:
        raise NotImplementedError

    def apply_mean(self, param: torch.Tensor, grads: list[torch.Tensor], weights: list[float], lo: int, hi: int,
                   step: int, outs: list[torch.Tensor]) -> None:
        """:meth:`apply` with the weighted mean of ``grads`` (each for ``param[lo:hi]``, summed in the
        order given), the range's new values also into each of ``outs``. Only where ``fuses_mean``."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """The rule's state tensors (for checkpoints)."""
        return {}

    def yield_momentum(self) -> None:
        """Another component owns every key's momentum (server/lookahead.py): free the rule's own,
        so that it is neither kept nor saved; the rule's :meth:`apply` is then never called."""


RULES: dict[str, type[UpdateRule]] = {}


def register_rule(name: str) -> Callable[[type[UpdateRule]], type[UpdateRule]]:
    def deco(cls: type[UpdateRule]) -> type[UpdateRule]:
        RULES[name] = cls
        return cls

    return deco


def check_rule(cfg) -> type[UpdateRule]:
    """The rule class ``cfg.name`` names, after importing ``cfg.module`` (a registered rule's home)."""
    module = getattr(cfg, "module", None)
    if module:
        import importlib

        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"optimizer.module: cannot import {module!r}: {err}") from None
    cls = RULES.get(cfg.name)
    if cls is None:
        raise ConfigError(f"optimizer.name: unknown {cfg.name!r}; known: {sorted(RULES)}"
                          + ("" if module else " (give optimizer.module: the module that registers it)"))
    return cls


def make_rule(cfg, lr: float, numel: int) -> UpdateRule:
    return check_rule(cfg)(cfg, lr, numel)


@register_rule("sgd")
class SGD(UpdateRule):
    fuses_out = fuses_mean = True

    def __init__(self, cfg: SGDConfig, lr: float, numel: int) -> None:
        super().__init__(cfg, lr, numel)
        self.buf = torch.zeros(numel) if cfg.momentum else None
        self.momentum = cfg.momentum  # the effective momentum (server/scaling.py may lower it under staleness)
        self.yielded = False  # the look-ahead owns the momentum (yield_momentum)

    def apply(self, param, grad, lo, hi, step, out=None):
        assert not self.yielded, "SGD.apply after yield_momentum: the look-ahead applies every gradient"
        c = self.cfg  # (one pass, compiled where built: server/kernels.py)
        kernels.sgd(param[lo:hi], None if self.buf is None else self.buf[lo:hi], grad, out, lr=self.lr,
                    momentum=self.momentum, weight_decay=c.weight_decay, dampening=c.dampening, nesterov=c.nesterov,
                    first=step == 0)

    def apply_mean(self, param, grads, weights, lo, hi, step, outs):
        assert not self.yielded, "SGD.apply_mean after yield_momentum"
        c = self.cfg
        kernels.sgd_mean(param[lo:hi], None if self.buf is None else self.buf[lo:hi], grads, weights, outs, lr=self.lr,
                         momentum=self.momentum, weight_decay=c.weight_decay, dampening=c.dampening,
                         nesterov=c.nesterov, first=step == 0)

    def state(self):
        return {"momentum_buffer": self.buf} if self.buf is not None else {}

    def yield_momentum(self):
        self.buf, self.yielded = None, True


@register_rule("adagrad")
class Adagrad(UpdateRule):
    def __init__(self, cfg: AdagradConfig, lr: float, numel: int) -> None:
        super().__init__(cfg, lr, numel)
        self.sum = torch.full((numel,), cfg.initial_accumulator_value)

    def apply(self, param, grad, lo, hi, step):
        c = self.cfg
        p = param[lo:hi]
        if c.weight_decay:
            grad = grad.add(p, alpha=c.weight_decay)
        clr = self.lr / (1 + step * c.lr_decay)
        s = self.sum[lo:hi]
        s.addcmul_(grad, grad, value=1)
        p.addcdiv_(grad, s.sqrt().add_(c.eps), value=-clr)

    def state(self):
        return {"sum": self.sum}


@register_rule("adam")
class Adam(UpdateRule):
    def __init__(self, cfg: AdamConfig, lr: float, numel: int) -> None:
        super().__init__(cfg, lr, numel)
        self.m = torch.zeros(numel)
        self.v = torch.zeros(numel)
        self.beta1 = cfg.betas[0]  # the effective beta1 (a cycle_momentum schedule sets it: server/scaling.py)

    def apply(self, param, grad, lo, hi, step):
        c = self.cfg
        b1, b2 = self.beta1, c.betas[1]
        p = param[lo:hi]
        if c.weight_decay:
            grad = grad.add(p, alpha=c.weight_decay)
        m, v = self.m[lo:hi], self.v[lo:hi]
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = step + 1
        step_size = self.lr / (1 - b1**t)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(c.eps)
        p.addcdiv_(m, denom, value=-step_size)

    def state(self):
        return {"exp_avg": self.m, "exp_avg_sq": self.v}


@register_rule("adamw")
class AdamW(Adam):
    """Adam with decoupled weight decay: the parameters shrink by lr * weight_decay before the Adam step."""

    def apply(self, param, grad, lo, hi, step):
        c = self.cfg
        if c.weight_decay:
            param[lo:hi].mul_(1 - self.lr * c.weight_decay)
        b1, b2 = self.beta1, c.betas[1]
        m, v = self.m[lo:hi], self.v[lo:hi]
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = step + 1
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(c.eps)
        param[lo:hi].addcdiv_(m, denom, value=-self.lr / (1 - b1**t))
