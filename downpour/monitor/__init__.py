"""Monitoring building blocks shared by every role: an HTTP endpoint, Prometheus
families built from a node's own counters at scrape time, rates and histograms
cheap enough for the hot path, and a TensorBoard writer.

Role-specific pieces live with their role (``server/metrics.py``,
``worker/metrics.py``, ``coordinator/metrics.py``, ``coordinator/health.py``,
``coordinator/history.py``); the dashboard's page is ``monitor/static/``.
"""

from downpour.monitor.http import HttpEndpoint, advertised_host
from downpour.monitor.metrics import Buckets, Families, RateMeter, metrics_route, node_labels

__all__ = ["Buckets", "Families", "HttpEndpoint", "RateMeter", "advertised_host", "metrics_route", "node_labels"]
