"""The job over time: one sample of every node's progress per ``monitor.sample_interval_s``.

Nodes report cumulative counters (examples, bytes, pushes); the history turns
them into per-second rates between samples. It keeps the last ``capacity``
samples (an hour at one a second), for the dashboard's charts.

The coordinator's thread samples; the HTTP thread serialises (only when a dashboard asks):
both hold the history's lock.
"""

from __future__ import annotations

import json
import threading
from typing import Any

# counter in a node's progress -> the rate the history shows
_RATES = {
    "worker": {"examples": "examples_per_s", "bytes_sent": "bytes_sent_per_s", "bytes_received": "bytes_received_per_s"},
    "server": {"pushes": "pushes_per_s", "pulls": "pulls_per_s", "bytes_in": "bytes_in_per_s", "bytes_out": "bytes_out_per_s"},
}
# values shown as they are
_LEVELS = {"worker": ("loss", "prequential_auc"), "server": ("staleness_mean",)}


class History:
    def __init__(self, capacity: int = 3600) -> None:
        self.capacity = capacity
        self.t: list[float] = []
        self.series: dict[str, dict[str, list[float | None]]] = {}
        self._last: dict[str, tuple[float, dict[str, Any]]] = {}
        self.lock = threading.Lock()

    def _put(self, node: str, metric: str, value: float | None) -> None:
        values = self.series.setdefault(node, {}).setdefault(metric, [])
        values.extend([None] * (len(self.t) - 1 - len(values)))  # a node that appeared late
        values.append(value)

    def sample(self, t: float, status: dict[str, Any]) -> None:
        """Record one sample of a ``STATUS`` answer taken ``t`` seconds into the job."""
        with self.lock:
            self._sample(t, status)

    def _sample(self, t: float, status: dict[str, Any]) -> None:
        self.t.append(round(t, 3))
        job_rate = 0.0
        for node in status.get("nodes", []):
            role, name, progress = node["role"], node["name"], node.get("progress") or {}
            last = self._last.get(name)
            for counter, metric in _RATES.get(role, {}).items():
                rate = None
                if last is not None and t > last[0] and counter in progress:
                    rate = max(0.0, (float(progress[counter]) - float(last[1].get(counter, 0))) / (t - last[0]))
                self._put(name, metric, rate)
                if metric == "examples_per_s" and rate is not None:
                    job_rate += rate
            for metric in _LEVELS.get(role, ()):
                value = progress.get(metric)
                self._put(name, metric, float(value) if isinstance(value, (int, float)) else None)
            self._last[name] = (t, dict(progress))
        self._put("job", "examples_per_s", job_rate)
        self._put("job", "loss", status.get("loss"))
        if len(self.t) > self.capacity:
            drop = len(self.t) - self.capacity
            del self.t[:drop]
            for metrics in self.series.values():
                for values in metrics.values():
                    del values[:drop]
        for metrics in self.series.values():  # nodes that sent nothing this time
            for values in metrics.values():
                values.extend([None] * (len(self.t) - len(values)))

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.t, "series": self.series}

    def to_json(self) -> bytes:
        with self.lock:
            return json.dumps(self.to_dict()).encode()

    def latest(self, node: str, metric: str) -> float | None:
        values = self.series.get(node, {}).get(metric)
        return values[-1] if values else None
