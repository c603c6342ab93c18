"""Per-worker keys: what the holder of worker R's own key may ask of the coordinator.

A job whose keys were made with ``downpour keys DIR --workers N`` gives each worker rank its
own CURVE key (``worker-R``). The coordinator learns from each message which key sent it (the
ZAP handler's User-Id) and binds the key to the rank, not to names in the message:

* ``REGISTER`` from worker R's key registers the worker of rank R, and only while no live
  worker of that rank is registered on another connection (the key cannot take a second slot,
  nor push a live worker out);
* any other request from it may name only a node of rank R (``worker-R``, or ``worker-R.G`` when
  it replaced an earlier worker of that rank).

Everything else (the role, the connection the node registered on, the schemas) the state
machine checks as for any key. Servers apply the same binding to routing ids (the node's name).
A pure function of the state and the message, so it is tested without a network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from downpour.coordinator.model import ALIVE, DONE
from downpour.protocol import Message, Op
from downpour.transport import bound_name

if TYPE_CHECKING:
    from downpour.coordinator.state import CoordinatorState


def key_refusal(state: CoordinatorState, rank: int, peer: bytes, msg: Message) -> str | None:
    """Why a request from the holder of worker ``rank``'s own key is refused (FORBIDDEN), or None.

    A REGISTER it may send has its ``meta.rank`` set to ``rank`` (the slot its key is for)."""
    meta = msg.meta
    if msg.op == Op.REGISTER:
        if meta.get("role") != "worker":
            return None  # the state machine refuses a worker key registering as another role
        want = meta.get("rank")
        if want is not None and (type(want) is not int or want != rank):
            return f"worker-{rank}'s key registers only the worker of rank {rank}, not rank {want!r:.20}"
        if rank >= state.cl.worker_slots:
            return f"worker-{rank}'s key is for rank {rank}; this job has {state.cl.worker_slots} worker slots"
        for n in state.nodes.values():
            if n.role == "worker" and n.rank == rank and n.state in (ALIVE, DONE) and n.identity != peer:
                return f"{n.name} is registered on another connection and alive: worker-{rank}'s key cannot take a second slot"
        meta["rank"] = rank
        return None
    node = meta.get("node")
    if isinstance(node, str) and node in state.nodes and not bound_name(rank, node):
        return f"worker-{rank}'s key cannot act for {node}"
    return None
