"""Gang placement: all of a job's tasks get a node, or none does.

A cluster's free resources are a mapping node name -> :class:`Resources`. :func:`place_gang`
returns the node of each task, or ``None`` when the whole gang does not fit; it never returns a
partial placement and never lets a node's tasks exceed its free resources. Tasks are packed best
fit, largest first, so a gang spreads over as few nodes as it can (servers and workers of one job
talk to each other constantly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from downpour.scheduler.resources import Resources


def _size(r: Resources) -> tuple[int, int, int]:
    return (r.gpus, r.cpus, r.memory_mb)


def place_gang(tasks: Sequence[Resources], free: Mapping[str, Resources]) -> tuple[str, ...] | None:
    """The node of each task (same order as ``tasks``), or None if the gang cannot be placed whole."""
    left = dict(free)
    where: list[str | None] = [None] * len(tasks)
    used: set[str] = set()
    for i in sorted(range(len(tasks)), key=lambda k: _size(tasks[k]), reverse=True):
        task = tasks[i]
        fitting = [n for n in left if task.fits_in(left[n])]
        if not fitting:
            return None
        # Nodes the gang already uses first, then the one that would have least left (best fit).
        node = min(fitting, key=lambda n: (n not in used, _size(left[n] - task), n))
        left[node] = left[node] - task
        used.add(node)
        where[i] = node
    return tuple(where)  # type: ignore[arg-type]


def take(free: Mapping[str, Resources], tasks: Sequence[Resources], nodes: Sequence[str]) -> dict[str, Resources]:
    """``free`` after the tasks took their nodes' resources."""
    out = dict(free)
    for task, node in zip(tasks, nodes, strict=True):
        out[node] = out[node] - task
    return out


def give(free: Mapping[str, Resources], tasks: Sequence[Resources], nodes: Sequence[str]) -> dict[str, Resources]:
    """``free`` after the tasks gave their nodes' resources back."""
    out = dict(free)
    for task, node in zip(tasks, nodes, strict=True):
        out[node] = out.get(node, Resources()) + task
    return out
