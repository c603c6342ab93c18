"""Progressive (prequential) validation: each event is scored by the model before it is
trained on, so the scores are an honest test set that keeps coming.

:class:`Prequential` keeps every (label, score) pair of a worker (two float32 per event,
8 MB per million events) and, every ``window`` events, the AUC and log loss of the last
window: the curve over time. The totals are over everything seen.

It also counts the scores of clicks and non-clicks in :data:`BINS` equal bins of [0, 1]: two
short lists that travel in every heartbeat, so that the job's prequential AUC pools every
worker's events (:func:`hist_auc`), a worker that died included (up to its last heartbeat).
"""

from __future__ import annotations

import math
import time

import numpy as np

from downpour.data.scoring import log_loss, roc_auc
from downpour.errors import DataError


def _scores(y: np.ndarray, p: np.ndarray) -> tuple[float | None, float | None]:
    if not len(y):
        return None, None
    try:
        auc = roc_auc(y, p)
    except DataError:  # one class only: AUC undefined
        auc = None
    return auc, log_loss(y, p)


BINS = 1024  # score bins of the pooled AUC: ties within a bin count half (width 1/1024 of probability)


def hist_auc(counts) -> float | None:
    """AUC from per-bin counts [[non-clicks per bin], [clicks per bin]] (ascending scores); None
    with one class only."""
    neg, pos = (np.asarray(c, dtype=np.float64) for c in counts)
    n_neg, n_pos = neg.sum(), pos.sum()
    if not n_neg or not n_pos:
        return None
    below = np.cumsum(neg) - neg  # non-clicks scored in lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (n_neg * n_pos))


class Prequential:
    def __init__(self, window: int = 10_000, clock=time.monotonic) -> None:
        self.window, self.clock = window, clock
        self.t0 = clock()
        self._y: list[np.ndarray] = []
        self._p: list[np.ndarray] = []
        self.n = 0
        self.curve: list[list[float]] = []  # [seconds, events, window AUC, window log loss]
        self._since = 0
        self.counts = np.zeros((2, BINS), dtype=np.int64)  # [non-clicks, clicks] per score bin

    def add(self, labels: np.ndarray, probs: np.ndarray) -> None:
        """Scores of events not yet trained on (probabilities of a click)."""
        y = np.asarray(labels, dtype=np.float32).reshape(-1)
        p = np.asarray(probs, dtype=np.float32).reshape(-1)
        self._y.append(y)
        self._p.append(p)
        self.n += len(y)
        self._since += len(y)
        b = np.clip((p * BINS).astype(np.int64), 0, BINS - 1)
        click = y > 0.5
        self.counts[0] += np.bincount(b[~click], minlength=BINS)
        self.counts[1] += np.bincount(b[click], minlength=BINS)
        if self._since >= self.window:
            self._since = 0
            yy, pp = self.arrays(self.window)
            auc, ll = _scores(yy, pp)
            self.curve.append([round(self.clock() - self.t0, 3), self.n, auc if auc is not None else math.nan, ll])

    def arrays(self, last: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if len(self._y) > 64:  # keep the list short
            self._y, self._p = [np.concatenate(self._y)], [np.concatenate(self._p)]
        y = np.concatenate(self._y) if self._y else np.zeros(0, np.float32)
        p = np.concatenate(self._p) if self._p else np.zeros(0, np.float32)
        return (y[-last:], p[-last:]) if last else (y, p)

    def summary(self) -> dict:
        y, p = self.arrays()
        auc, ll = _scores(y, p)
        return {"events": self.n, "auc": auc, "logloss": ll, "curve": self.curve, "counts": self.counts.tolist()}


def online_summary(workers: dict, acked: int) -> dict:
    """The job's stream figures from its workers' stats (a worker that died: its last heartbeat's
    progress): events, malformed events, the prequential AUC pooled over every worker's scores
    (from the binned counts: ``prequential_auc``) and the events-weighted mean of the workers' own
    exact AUC and log loss (``prequential_auc_workers``, ``prequential_logloss``; a worker that died
    has none)."""
    events = malformed = 0
    auc_w = ll_w = n_auc = n_ll = 0.0
    counts = np.zeros((2, BINS), dtype=np.int64)
    for stats in workers.values():
        if not isinstance(stats, dict):
            continue
        o = stats.get("online")
        if not o and "prequential_counts" in stats:  # a worker that died: its last heartbeat
            o = {"events": stats.get("events", 0), "malformed": stats.get("malformed", 0),
                 "prequential": {"counts": stats["prequential_counts"]}}
        if not o:
            continue
        events += int(o.get("events", 0))
        malformed += int(o.get("malformed", 0))
        pq = o.get("prequential") or {}
        c = np.asarray(pq.get("counts") or np.zeros((2, BINS)), dtype=np.int64)
        if c.shape == counts.shape:
            counts += c
        n = float(pq.get("events") or 0)
        if pq.get("auc") is not None:
            auc_w, n_auc = auc_w + n * pq["auc"], n_auc + n
        if pq.get("logloss") is not None:
            ll_w, n_ll = ll_w + n * pq["logloss"], n_ll + n
    mean = auc_w / n_auc if n_auc else None
    pooled = hist_auc(counts) if counts.any() else None
    return {"events": events, "malformed": malformed, "acknowledged": acked,
            "prequential_auc": pooled if pooled is not None else mean, "prequential_auc_workers": mean,
            "prequential_events": int(counts.sum()), "prequential_logloss": ll_w / n_ll if n_ll else None}
