"""Scores for click-through-rate models: ROC AUC and log loss, in numpy.

Both take whole arrays (labels 0/1, one score or probability per example) and
return a Python float. ``roc_auc`` sorts once (O(n log n)) and averages the ranks
of tied scores, so it equals the pairwise definition exactly: the probability that
a random positive scores above a random negative, ties counting one half.
"""

from __future__ import annotations

import numpy as np

from downpour.errors import DataError


def _labels(labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if len(y) != n:
        raise DataError(f"{len(y)} labels but {n} scores")
    if not np.isin(y, (0, 1)).all():
        raise DataError("labels must be 0 or 1")
    return y.astype(bool)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U / (positives × negatives)).

    Tied scores get the mean of their ranks. Raises DataError when the labels are not
    all 0/1 or hold only one class (the AUC is undefined then)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = _labels(labels, len(s))
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        raise DataError(f"AUC needs both classes; got {pos} positives and {neg} negatives")
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    # Runs of equal scores: each element's rank is the mean of its run's 1-based ranks.
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    ends = np.r_[starts[1:], len(s)]
    run_rank = (starts + 1 + ends) / 2.0  # mean of starts+1 .. ends
    ranks = np.repeat(run_rank, ends - starts)
    rank_sum = float(ranks[y[order]].sum())
    return (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (natural log) of ``probs`` (clipped to [eps, 1 - eps])."""
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), eps, 1.0 - eps)
    y = _labels(labels, len(p))
    if len(p) == 0:
        raise DataError("log loss of no examples")
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))
