"""The worker: trains the model on the data shards the coordinator hands out (docs/architecture.md, "Roles").

Public surface (import it from its module; this file imports nothing, so that ``KVClient``
alone does not load the training loop):

* ``worker.client``: :class:`KVClient` (``push``/``pull``/``push_pull``/``wait``), the
  parameter servers' client; also exported as ``downpour.KVClient``.
* ``worker.service``: :func:`run_worker` (the process).
* ``worker.trainer``: :class:`Trainer`, the training loop over one shard at a time.

Everything else (flat parameters, sparse rows, precision, online loop, metrics) is internal to
the role.
"""
