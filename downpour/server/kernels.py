"""The dense update rules' inner loops, compiled where ``_dense.c`` is built, in torch otherwise.

Two kernels, each on one contiguous float32 run of a shard and each fused with the reply's values:

* :func:`sgd`: SGD with momentum (server/optim.py), and the new values copied into ``out``;
* :func:`lookahead`: the look-ahead update of one worker's momentum (server/lookahead.py) and the
  values that worker is sent, θ − c Σ_j v_j + c v_own, written into ``out``.

and the check every pushed gradient passes before anything is applied, :func:`within` (finite and
bounded: one read-only pass, where torch needs a reduction and a dispatch or two).

The torch path does one pass over memory per operation (a look-ahead push and its reply: six, and a
cat and a copy); the compiled one does one pass in all, with the GIL released. Both give bit-identical
values (tests/test_dense_kernels.py): the C code repeats torch's float32 operations in torch's order,
an add with alpha as the fused multiply-add torch's CPU kernels use. ``out`` may be the gradient's
own memory (a request's shared-memory slot): each value's gradient is read before its reply is
written. :data:`KERNEL` says which path runs ("compiled", or why torch); ``DOWNPOUR_DENSE_NATIVE=0``
forces torch, for comparisons.
"""

from __future__ import annotations

import math
import os
from types import ModuleType

import torch


def _load_native() -> tuple[ModuleType | None, str]:
    if os.environ.get("DOWNPOUR_DENSE_NATIVE", "1") == "0":
        return None, "torch (DOWNPOUR_DENSE_NATIVE=0)"
    try:
        from downpour.server import _dense
    except ImportError as err:
        return None, f"torch (the C kernel is not built: {err}; install a C compiler and reinstall for the fast path)"
    if not _dense.available():  # (x86-64 without AVX2 and FMA: torch's own adds are not fused there)
        return None, "torch (this CPU lacks AVX2 and FMA, which the compiled kernels need to match torch bit for bit)"
    return _dense, "compiled"


# Decided once, at import, like the sparse tables' (sparse/index.py): servers report it in their stats.
NATIVE, KERNEL = _load_native()


def _fits(t: torch.Tensor | None, n: int) -> bool:
    return t is None or (t.dtype == torch.float32 and t.is_contiguous() and t.numel() == n)


def _holds(t: torch.Tensor | None, n: int) -> bool:
    return t is None or (t.dtype == torch.float32 and t.is_contiguous() and t.numel() >= n)


# The state (p, b, total) is a server's own: slices of 1-d float32 tensors of the shard's size, so
# contiguous and as long as each other (checked where they are made or loaded: server/lookahead.py's
# load, server/replica.py's load_state). Only what comes from a request, g, and where the reply
# goes, out, are checked per call.


def sgd(p: torch.Tensor, buf: torch.Tensor | None, g: torch.Tensor, out: torch.Tensor | None, *, lr: float,
        momentum: float, weight_decay: float, dampening: float, nesterov: bool, first: bool,
        native: bool = True) -> None:
    """One SGD step on ``p`` in place (``torch.optim.SGD``'s: ``buf`` the momentum buffer of ``p``'s
    range, None without momentum; ``first``: the range's first update, the buffer becomes the
    gradient), then the new values copied into ``out`` (None: not). All 1-d of one length.
    ``native=False``: the torch path, whatever :data:`KERNEL` says."""
    n, native = p.numel(), NATIVE if native else None
    if native is not None and _fits(g, n) and _fits(out, n):
        flags = ((native.MOMENTUM if buf is not None else 0) | (native.FIRST if first else 0)
                 | (native.DAMPENING if dampening else 0) | (native.NESTEROV if nesterov else 0)
                 | (native.DECAY if weight_decay else 0) | (native.OUT if out is not None else 0))
        native.sgd(p.data_ptr(), 0 if buf is None else buf.data_ptr(), g.data_ptr(),
                   0 if out is None else out.data_ptr(), n, lr, momentum, weight_decay, 1 - dampening, flags)
        return
    if weight_decay:
        g = g.add(p, alpha=weight_decay)
    if buf is not None:
        if first:
            buf.copy_(g)
        elif dampening == 0:
            torch.add(g, buf, alpha=momentum, out=buf)  # one kernel for buf = momentum * buf + grad
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    p.add_(g, alpha=-lr)
    if out is not None:
        out.copy_(p)


def mean(grads: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The weighted mean of ``grads``, summed in the order given (float addition is not associative:
    the order is the caller's to fix), as a new tensor: torch's operations, which :func:`sgd_mean`'s
    compiled path repeats."""
    acc = grads[0].mul(weights[0])
    for g, w in zip(grads[1:], weights[1:]):
        acc.add_(g, alpha=w)
    return acc.div_(sum(weights))


def sgd_mean(p: torch.Tensor, buf: torch.Tensor | None, grads: list[torch.Tensor], weights: list[float],
             outs: list[torch.Tensor], *, lr: float, momentum: float, weight_decay: float, dampening: float,
             nesterov: bool, first: bool, native: bool = True) -> None:
    """A sync round's step: :func:`sgd` on the weighted :func:`mean` of ``grads`` (each as long as
    ``p``), the new values also into each of ``outs`` (a reply slot may be a worker's own gradient).
    Compiled, one pass over memory for all of it (block by block); torch: the mean, the step, a copy
    per out. Bit for bit the same either way."""
    n, native = p.numel(), NATIVE if native else None
    if (native is not None and _HAS_MEAN and all(_fits(g, n) for g in grads) and all(_fits(o, n) for o in outs)
            and len(weights) == len(grads) >= 1):
        flags = ((native.MOMENTUM if buf is not None else 0) | (native.FIRST if first else 0)
                 | (native.DAMPENING if dampening else 0) | (native.NESTEROV if nesterov else 0)
                 | (native.DECAY if weight_decay else 0))
        native.sgd_mean(p.data_ptr(), 0 if buf is None else buf.data_ptr(), tuple(g.data_ptr() for g in grads),
                        tuple(float(w) for w in weights), float(sum(weights)), tuple(o.data_ptr() for o in outs), n,
                        lr, momentum, weight_decay, 1 - dampening, flags)
        return
    g = mean(grads, weights)
    sgd(p, buf, g, outs[0] if outs else None, lr=lr, momentum=momentum, weight_decay=weight_decay,
        dampening=dampening, nesterov=nesterov, first=first, native=native is not None)
    for o in outs[1:]:
        o.copy_(p)


def lookahead(p: torch.Tensor, b: torch.Tensor, total: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None, *,
              lr: float, momentum: float, weight_decay: float, dampening: float, nesterov: bool, c: float,
              own: bool, lo: int = 0, hi: int | None = None, at: int = 0, native: bool = True) -> None:
    """One look-ahead step of a worker on the range ``[lo, hi)`` of ``p``, ``b`` and ``total`` (whole
    1-d tensors of one length; ``hi`` None: to the end), with the range's gradient at ``g[at:]``: the
    worker's buffer ``b`` takes the gradient as SGD's momentum buffer does, ``total`` (Σ of every
    worker's buffer) follows, ``p`` moves by ``lr`` times the step; then into ``out[at:]`` (None:
    nowhere) the values the worker is sent: ``p − c·total + c·b`` with ``own`` (look-ahead over the
    others' momentum), else ``p``. Taking the range rather than slices spares the compiled path five
    tensor views per call. ``native=False``: the torch path, whatever :data:`KERNEL` says."""
    hi = p.numel() if hi is None else hi
    n, native = hi - lo, NATIVE if native else None
    assert 0 <= lo <= hi <= p.numel() and at >= 0, "a range of the shard (internal)"
    if native is not None and _holds(g, at + n) and _holds(out, at + n):
        flags = ((native.DAMPENING if dampening else 0) | (native.NESTEROV if nesterov else 0)
                 | (native.DECAY if weight_decay else 0) | (native.OUT if out is not None else 0)
                 | (native.OWN if own else 0))
        native.lookahead(p.data_ptr() + 4 * lo, b.data_ptr() + 4 * lo, total.data_ptr() + 4 * lo,
                         g.data_ptr() + 4 * at, 0 if out is None else out.data_ptr() + 4 * at, n, lr, momentum,
                         weight_decay, 1 - dampening, c, flags)
        return
    p, b, total, g = p[lo:hi], b[lo:hi], total[lo:hi], g[at : at + n]
    out = None if out is None else out[at : at + n]
    if weight_decay:
        g = g.add(p, alpha=weight_decay)
    total.sub_(b)
    if dampening == 0:
        torch.add(g, b, alpha=momentum, out=b)  # as the SGD rule: bit for bit the same with one worker
    else:
        b.mul_(momentum).add_(g, alpha=1 - dampening)
    total.add_(b)
    p.add_(g.add(b, alpha=momentum) if nesterov else b, alpha=-lr)
    if out is not None:
        if own:
            torch.add(p, total, alpha=-c, out=out).add_(b, alpha=c)
        else:
            out.copy_(p)


def float32_at_most(limit: float) -> float:
    """The largest float32 not above ``limit``: a float32 value is at most ``limit`` exactly when it
    is at most this (what :func:`within` compares in float32)."""
    x = torch.tensor(limit, dtype=torch.float32)
    if float(x) > limit:
        x = torch.nextafter(x, torch.tensor(-math.inf))
    return float(x)


def within(t: torch.Tensor, limit: float, native: bool = True) -> bool:
    """Whether every value of ``t`` is finite and at most ``limit`` in magnitude (NaN is not). One
    read-only pass, compiled for a contiguous float32 tensor where built (``limit`` must then be a
    float32 value: see :func:`float32_at_most`); torch's ``aminmax`` otherwise."""
    native_mod = NATIVE if native else None
    if native_mod is not None and _WITHIN and t.dtype == torch.float32 and t.is_contiguous():
        return native_mod.within(t.data_ptr(), t.numel(), limit)
    if not t.numel():
        return True
    lo, hi = torch.aminmax(t)
    return -limit <= float(lo) and float(hi) <= limit  # (NaN fails both)


# A build from before the bound check was compiled has no ``within``: the torch check runs there.
_WITHIN = NATIVE is not None and hasattr(NATIVE, "within")
_HAS_MEAN = NATIVE is not None and hasattr(NATIVE, "sgd_mean")  # (likewise the sync round's)
