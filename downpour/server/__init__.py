"""The parameter server: one per shard of the parameters (docs/architecture.md, "Roles").

Public surface (import it from its module; this file imports nothing, so that loading one rule
or check does not load the request loop):

* ``server.service``: :func:`run_server` (the process), :class:`ParameterServer` (one shard
  behind a listener: ``handle`` and the request loop), :class:`HostedRanks`.
* ``server.optim``: :func:`register_rule`, :class:`UpdateRule` and the built-in update rules
  (sgd, adagrad, adam, adamw); ``server.schedule`` and ``server.scaling``: lr schedules and the
  effective hyperparameters of each update.

Everything else (store, consistency policies, grouped sync rounds, sparse shards, snapshots,
metrics) is internal to the role.
"""
