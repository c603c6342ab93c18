"""Row-wise update rules for sparse tables: only the rows a push names change (lazy updates).

Each rule keeps its state as arrays with one entry (or row) per table row and updates
the pushed rows with whole-array numpy operations. The formulas are torch.optim's
(SGD, Adagrad, Adam) and McMahan et al. 2013's FTRL-Proximal, per touched row.

A rule may also name a compiled kernel (``push_<name>`` in ``_native.c``) that does the same
arithmetic in the same float32 order, fused with the table's index probe; the table uses it when
the extension is built. A rule that names none (``kernel`` returns None) stays on numpy.
"""

from __future__ import annotations

import numpy as np

from downpour.errors import ConfigError

f32 = np.float32


class RowRule:
    zero_init = False  # rows start at zero instead of the table's seeded random values

    def allocate(self, rows: int, dim: int) -> dict[str, np.ndarray]:
        return {}

    def reset(self, state: dict[str, np.ndarray], rows: np.ndarray | slice) -> None:
        """Optimizer state of fresh rows (``rows``: row numbers, or a slice of them)."""
        for v in state.values():
            v[rows] = 0

    def apply(self, values: np.ndarray, state: dict[str, np.ndarray], rows: np.ndarray, grads: np.ndarray) -> None:
        raise NotImplementedError

    def kernel(self, state: dict[str, np.ndarray]) -> tuple[str, tuple] | None:
        """The compiled kernel's name and the arguments that follow the common ones (state arrays,
        then hyperparameters), or None to stay on numpy."""
        return None


class SGD(RowRule):
    def __init__(self, lr: float = 0.01) -> None:
        self.lr = f32(lr)

    def apply(self, values, state, rows, grads) -> None:
        values[rows] -= self.lr * grads

    def kernel(self, state):
        return "sgd", (float(self.lr),)


class Adagrad(RowRule):
    def __init__(self, lr: float = 0.01, eps: float = 1e-10, initial_accumulator_value: float = 0.0) -> None:
        self.lr, self.eps, self.init = f32(lr), f32(eps), f32(initial_accumulator_value)

    def allocate(self, rows: int, dim: int) -> dict[str, np.ndarray]:
        return {"sum": np.full((rows, dim), self.init, dtype=f32)}

    def reset(self, state, rows) -> None:
        state["sum"][rows] = self.init

    def apply(self, values, state, rows, grads) -> None:
        acc = state["sum"][rows] + grads * grads
        state["sum"][rows] = acc
        values[rows] -= self.lr * grads / (np.sqrt(acc) + self.eps)

    def kernel(self, state):
        return "adagrad", (state["sum"], float(self.lr), float(self.eps))


class Adam(RowRule):
    """Lazy Adam: a row's moments and step count advance only when it is pushed."""

    def __init__(self, lr: float = 0.001, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], f32(eps)

    def allocate(self, rows: int, dim: int) -> dict[str, np.ndarray]:
        return {"m": np.zeros((rows, dim), f32), "v": np.zeros((rows, dim), f32), "t": np.zeros(rows, np.int32)}

    def apply(self, values, state, rows, grads) -> None:
        t = state["t"][rows] + 1
        state["t"][rows] = t
        m = state["m"][rows] * f32(self.b1) + grads * f32(1 - self.b1)
        v = state["v"][rows] * f32(self.b2) + grads * grads * f32(1 - self.b2)
        state["m"][rows], state["v"][rows] = m, v
        bc1 = (1 - self.b1 ** t.astype(np.float64)).astype(f32)[:, None]
        bc2 = (1 - self.b2 ** t.astype(np.float64)).astype(f32)[:, None]
        values[rows] -= (f32(self.lr) / bc1) * m / (np.sqrt(v) / np.sqrt(bc2) + self.eps)

    def kernel(self, state):
        return "adam", (state["m"], state["v"], state["t"], self.lr, self.b1, self.b2, float(self.eps))


class FTRL(RowRule):
    """FTRL-Proximal per coordinate: with l1 > 0, weights whose |z| stays below l1 are exactly zero."""

    zero_init = True

    def __init__(self, alpha: float = 0.05, beta: float = 1.0, l1: float = 0.0, l2: float = 0.0) -> None:
        self.alpha, self.beta, self.l1, self.l2 = f32(alpha), f32(beta), f32(l1), f32(l2)

    def allocate(self, rows: int, dim: int) -> dict[str, np.ndarray]:
        return {"z": np.zeros((rows, dim), f32), "n": np.zeros((rows, dim), f32)}

    def apply(self, values, state, rows, grads) -> None:
        z, n, w = state["z"][rows], state["n"][rows], values[rows]
        n_new = n + grads * grads
        sigma = (np.sqrt(n_new) - np.sqrt(n)) / self.alpha
        z += grads - sigma * w
        state["z"][rows], state["n"][rows] = z, n_new
        shrunk = np.sign(z) * self.l1 - z
        values[rows] = np.where(np.abs(z) <= self.l1, f32(0), shrunk / ((self.beta + np.sqrt(n_new)) / self.alpha + self.l2))

    def kernel(self, state):
        return "ftrl", (state["z"], state["n"], float(self.alpha), float(self.beta), float(self.l1), float(self.l2))


RULES = {"sgd": SGD, "adagrad": Adagrad, "adam": Adam, "ftrl": FTRL}


def make_row_rule(name: str, **kwargs) -> RowRule:
    cls = RULES.get(name)
    if cls is None:
        raise ConfigError(f"sparse optimizer: unknown {name!r}; known: {sorted(RULES)}")
    return cls(**kwargs)
