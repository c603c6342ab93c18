"""Prometheus exposition built from a node's own counters, when it is scraped.

A role keeps plain counters for its own use (``stats()``, heartbeats); a
:class:`Families` builder turns them into metric families only when Prometheus
asks, so metrics cost nothing per request but the few :class:`Buckets`
observations. Names follow Prometheus conventions: a ``downpour_`` prefix, the
unit in the name (``_seconds``, ``_bytes``), ``_total`` on counters, and the
labels ``job``, ``role``, ``rank`` (plus ``node``) on every sample.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

# Bucket upper bounds, in seconds, for request and step times.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Buckets:
    """A histogram written by one thread and read by the scrape thread.

    ``observe`` is one bisect and two additions (no lock): a scrape may see a
    count without its sum for an instant, never a bucket going backwards.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS_S) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_counts(self, counts: Mapping[int, int]) -> None:
        """Replace the contents with a {value: count} table (for example staleness per push)."""
        fresh, total = [0] * (len(self.bounds) + 1), 0.0
        for value, n in counts.items():
            fresh[bisect_left(self.bounds, value)] += n
            total += value * n
        self.counts, self.sum = fresh, total

    def cumulative(self) -> list[tuple[str, float]]:
        counts, out, seen = list(self.counts), [], 0
        for bound, n in zip([*map(_le, self.bounds), "+Inf"], counts):
            seen += n
            out.append((bound, float(seen)))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


class RateMeter:
    """Events per second of a growing total, over windows of at least ``window_s``."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self.rate = 0.0
        self._mark: tuple[float, float] | None = None

    def update(self, total: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self._mark is None:
            self._mark = (now, total)
        elif now - self._mark[0] >= self.window_s:
            self.rate = (total - self._mark[1]) / (now - self._mark[0])
            self._mark = (now, total)
        return self.rate


class Families:
    """Collects samples into metric families; every sample carries the node's labels."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        self.labels = dict(labels)
        self._families: dict[str, Metric] = {}

    def _family(self, kind: type, name: str, doc: str, extra: Mapping[str, str]) -> Metric:
        fam = self._families.get(name)
        if fam is None:
            # Counter families are named without _total; the exposition adds it.
            base = name[: -len("_total")] if kind is CounterMetricFamily and name.endswith("_total") else name
            fam = kind(base, doc, labels=[*self.labels, *extra])
            self._families[name] = fam
        return fam

    def _values(self, extra: Mapping[str, str]) -> list[str]:
        return [*self.labels.values(), *(str(v) for v in extra.values())]

    def counter(self, name: str, doc: str, value: float, **extra: str) -> None:
        self._family(CounterMetricFamily, name, doc, extra).add_metric(self._values(extra), float(value))

    def gauge(self, name: str, doc: str, value: float | None, **extra: str) -> None:
        fam = self._family(GaugeMetricFamily, name, doc, extra)
        if value is not None:
            fam.add_metric(self._values(extra), float(value))

    def histogram(self, name: str, doc: str, buckets: Buckets, **extra: str) -> None:
        fam = self._family(HistogramMetricFamily, name, doc, extra)
        fam.add_metric(self._values(extra), buckets.cumulative(), float(buckets.sum))

    def families(self) -> list[Metric]:
        return list(self._families.values())


class _Collector(Collector):
    def __init__(self, fill: Callable[[Families], None], labels: Mapping[str, str]) -> None:
        self.fill, self.labels = fill, labels

    def collect(self) -> Iterable[Metric]:
        fams = Families(self.labels)
        self.fill(fams)
        return fams.families()


def metrics_route(fill: Callable[[Families], None], labels: Mapping[str, str]) -> Callable[[], tuple[str, bytes]]:
    """An HTTP route serving Prometheus' text format of what ``fill`` adds to a :class:`Families`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(fill, labels))
    return lambda: (CONTENT_TYPE_LATEST, generate_latest(registry))


def node_labels(job: str, role: str, rank: int | str, node: str) -> dict[str, str]:
    return {"job": job, "role": role, "rank": str(rank), "node": node}
