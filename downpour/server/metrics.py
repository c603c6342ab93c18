"""A server's Prometheus metrics, read from its counters when scraped."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from downpour.layout import Layout
from downpour.monitor import Buckets, Families

if TYPE_CHECKING:
    from downpour.server.service import ParameterServer

# Staleness bucket bounds, in versions (updates applied since the gradient's values were pulled).
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
MAX_TRAFFIC_KEYS = 256  # keys exported by traffic: all of them up to this many, else the busiest
# Every refusal a server counts, so each series exists (at 0) before its first increment.
REJECT_REASONS = ("malformed", "bad_op", "invalid", "forbidden", "rate_limited", "uninitialized", "sync_duplicate",
                  "sync_partial", "sync_round", "no_tables")


def server_metrics(server: ParameterServer, layout: Layout) -> Callable[[Families], None]:
    slices = layout.server_slices(server.rank)
    names = [layout.describe(s) for s in slices]
    elem_bytes = 4  # float32 on the wire

    def fill(f: Families) -> None:
        f.counter("downpour_server_pushes_total", "Gradient pushes received (PUSH and PUSHPULL).", server.counts["push"])
        f.counter("downpour_server_pulls_total", "Parameter pulls answered (PULL and PUSHPULL).", server.counts["pull"])
        for op, buckets in server.request_times.items():
            f.histogram("downpour_server_request_seconds", "Time to handle one request, from decoded to answered.", buckets, op=op.name)
        f.histogram("downpour_server_apply_seconds", "Time to apply one push (consistency policy and update rule).", server.apply_times)
        staleness = Buckets(STALENESS_BUCKETS)
        staleness.observe_counts(dict(server.staleness))
        f.histogram("downpour_server_staleness_versions", "Staleness of each push: versions its keys moved on since the pull.",
                    staleness)
        eff = server.hyper.progress()
        f.gauge("downpour_server_effective_lr", "Learning rate of the latest update (schedule and scaling).", eff["lr"])
        f.gauge("downpour_server_effective_momentum", "Explicit momentum of the latest update.", eff["momentum"])
        f.gauge("downpour_server_effective_momentum_total", "Explicit plus implicit (staleness) momentum.", eff["momentum_total"])
        f.gauge("downpour_server_staleness_recent", "Running mean of recent pushes' staleness (what scaling follows).",
                eff["staleness_recent"])
        f.gauge("downpour_server_job_step", "Job step of the latest update (the clock of schedules).", eff["job_step"])
        f.gauge("downpour_server_parameters", "Parameters (elements) this server holds.", server.store.numel)
        f.gauge("downpour_server_keys", "Keys this server holds.", len(server.store.keys))
        f.gauge("downpour_server_version", "Highest version of any key (updates applied).", max(server.store.versions, default=0))
        f.counter("downpour_server_received_bytes_total", "Bytes received (headers and tensor frames).", server.bytes_in)
        f.counter("downpour_server_sent_bytes_total", "Bytes sent (headers and tensor frames).", server.bytes_out)
        rejected = dict(server.rejected)
        for reason in sorted(set(REJECT_REASONS) | set(rejected)):
            f.counter("downpour_server_rejected_total", "Requests refused or dropped, by reason.", rejected.get(reason, 0), reason=reason)
        for name, table in server.sparse.tables.items():
            f.gauge("downpour_server_sparse_rows", "Rows of a sparse table on this server.", len(table), table=name)
            f.counter("downpour_server_sparse_admitted_total", "Rows created (IDs admitted) in a sparse table.",
                      table.stats.admitted, table=name)
            f.counter("downpour_server_sparse_evicted_total", "Rows evicted from a sparse table.", table.stats.evicted, table=name)
        if server.sparse:
            f.counter("downpour_server_sparse_ids_total", "Feature IDs served by SPARSE requests.",
                      server.sparse.counts["keys_pushed"], direction="push")
            f.counter("downpour_server_sparse_ids_total", "Feature IDs served by SPARSE requests.",
                      server.sparse.counts["keys_pulled"], direction="pull")
        if server.replicas is not None:  # this server is a primary that keeps backups (cluster.replicas)
            rep = server.replicas.stats()
            f.gauge("downpour_server_replication_lag", "Forwarded changes the slowest caught-up backup does not hold yet.", rep["lag"])
            f.gauge("downpour_server_replication_max_lag", "Largest replication lag seen.", rep["max_lag"])
            f.gauge("downpour_server_replication_backups", "Backups of this rank caught up.", len(rep["backups"]))
            f.counter("downpour_server_replication_sent_bytes_total", "Bytes of changes forwarded to backups.", rep.get("bytes", 0))
            f.counter("downpour_server_replication_transfers_total", "Whole-state transfers to joining backups.",
                      rep.get("transfers", 0))
            f.counter("downpour_server_replication_transfer_bytes_total", "Bytes of whole-state transfers.",
                      rep.get("transfer_bytes", 0))
            f.counter("downpour_server_replication_dropped_total", "Backups dropped (silent, or no longer planned).",
                      rep.get("dropped", 0))
            f.counter("downpour_server_replayed_pushes_total", "Pushes sent again after a failover, answered without "
                      "applying them again.", server.counts["replayed"])
        full, per_key = server.full_transfers, dict(server.key_transfers)
        traffic = [((full + per_key.get(i, 0)) * n * elem_bytes, i) for i, n in enumerate(server.store.lengths)]
        if len(traffic) > MAX_TRAFFIC_KEYS:
            traffic = sorted(traffic, reverse=True)[:MAX_TRAFFIC_KEYS]
        for value, i in traffic:
            f.counter("downpour_server_key_traffic_bytes_total",
                      f"Value bytes moved per key (every key, or the {MAX_TRAFFIC_KEYS} busiest when there are more).",
                      value, key=names[i])

    return fill
