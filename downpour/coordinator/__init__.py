"""The coordinator: one per job; membership, heartbeats, barriers, data shards, checkpoints, the
end of the job (docs/architecture.md, "Roles").

Public surface (import it from its module; this file imports nothing, so that a node importing
the coordinator's contract does not load the whole role):

* ``coordinator.service``: :class:`Coordinator` (the process: ``serve()`` until the job ends),
  :func:`plan_layout`.
* ``coordinator.client``: :class:`CoordinatorClient` and :class:`Heartbeat`, the coordinator's
  contract as servers and workers see it; :func:`connection_id`.
* ``coordinator.state``: :class:`CoordinatorState` (``handle``/``tick`` -> actions) with the
  state as data in ``coordinator.model`` (:class:`JobState`, :class:`Phase`, :class:`NodeState`,
  :class:`FailureRecord`) and the actions in ``coordinator.actions``.
* ``coordinator.persist``: :func:`open_store`, :func:`export_state`, :func:`adopt_state`
  (``--recover``); ``coordinator.restore``: :func:`latest_checkpoint` and the resume plans.

Everything else (membership, failures, hosting, checkpoints, report, health, history, shards,
reach, saving, metrics) is internal to the role.
"""
