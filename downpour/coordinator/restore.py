"""Reading a checkpoint at the coordinator's start: ``--resume`` (everything) or ``init_from`` (parameters).

The coordinator checks the checkpoint against the job before any node starts (its files'
SHA-256, its layout against the model's) and hands the servers what they need to load their
keys. Servers read the shard files themselves, by parameter name and element range, so a job
may resume on another number of servers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from downpour.coordinator.checkpointing import JOB_STATE
from downpour.coordinator.shards import ShardLedger
from downpour.errors import ConfigError, DataError
from downpour.layout import Layout
from downpour.storage import CheckpointStore, resolve_location

log = logging.getLogger(__name__)


def latest_checkpoint(where: str) -> tuple[CheckpointStore, Any, dict[str, Any]]:
    """The newest complete, verified checkpoint under a run folder or URL, and its job state; or,
    where ``where`` names one checkpoint's folder (``.../checkpoints/ckpt-...``), that one."""
    url = resolve_location(where)
    base, _, leaf = url.rstrip("/").rpartition("/")
    if leaf.startswith("ckpt-") and base:  # one checkpoint, named: an older one than the latest, say
        store = CheckpointStore(base)
        try:
            manifest = store.manifest(leaf)
            store.verify(manifest)
        except (DataError, OSError) as err:
            raise DataError(f"checkpoint {url} cannot be used: {err}") from None
    else:
        store = CheckpointStore(url)
        manifest = store.latest()
    if manifest is None:
        raise DataError(f"no complete checkpoint under {url} (a checkpoint exists once its manifest.json is written; "
                        "give a run folder, its checkpoints folder, or one checkpoint's folder)")
    try:
        state = json.loads(store.read(manifest, JOB_STATE))
        Layout.from_dict(state["layout"])
    except (ValueError, KeyError, TypeError, ConfigError) as err:
        raise DataError(f"{store.where(manifest.name, JOB_STATE)}: not a valid job state: {err}") from None
    return store, manifest, state


def _shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Every dense parameter's shape, and every sparse table as ``table NAME`` of shape (dim,)."""
    return {**{p.name: tuple(p.shape) for p in layout.params}, **{f"table {t.name}": (t.dim,) for t in layout.tables}}


def sparse_rules(job: dict[str, Any], tables: Iterable[str]) -> dict[str, str]:
    """Each sparse table's row optimizer by name, from a job's dict (``sparse.tables.<name>``, else
    ``sparse``); tables it does not name are left out."""
    sparse = job.get("sparse") or {}
    base = (sparse.get("optimizer") or {}).get("name")
    out = {}
    for t in tables:
        name = ((((sparse.get("tables") or {}).get(t)) or {}).get("optimizer") or {}).get("name") or base
        if isinstance(name, str):
            out[t] = name
    return out


def rules_of(job: Any, layout: Layout) -> dict[str, str]:
    """Each sparse table's row optimizer by name, for a validated job (a JobConfig)."""
    return {t.name: job.sparse.table(t.name).optimizer.name for t in layout.tables}


def plan_resume(where: str, layout: Layout, optimizer: str | None = None, announce: bool = True,
                sparse: dict[str, str] | None = None) -> dict[str, Any]:
    """What the coordinator continues from: the ledger, the step, and the servers' restore order.
    ``optimizer`` (the job's update rule) and ``sparse`` (each table's row optimizer) must be the
    checkpoint's: their state is restored. ``announce``: log it (the coordinator's; not a check
    made before the start)."""
    store, manifest, state = latest_checkpoint(where)
    old = Layout.from_dict(state["layout"])
    old_opt = ((state.get("job") or {}).get("optimizer") or {}).get("name")
    shapes, now = _shapes(old), _shapes(layout)
    if not set(shapes) & set(now):  # (the model first: an optimizer's name says nothing of another model)
        raise ConfigError(f"cannot resume from {store.where(manifest.name)}: it is another model's checkpoint, sharing no "
                          f"parameter with this one: it holds {listed(shapes)}, the model has {listed(now)}")
    old_rules = sparse_rules(state.get("job") or {}, [t.name for t in old.tables])
    changed = [f"table {t!r}: {old_rules[t]!r} in the checkpoint, {r!r} now" for t, r in (sparse or {}).items()
               if t in old_rules and old_rules[t] != r]
    if changed:
        raise ConfigError(f"cannot resume from {store.where(manifest.name)}: its sparse tables were trained with another "
                          f"row optimizer ({'; '.join(changed)}); use init_from to start new optimizer state from its rows")
    if optimizer is not None and old_opt is not None and old_opt != optimizer:
        raise ConfigError(f"cannot resume from {store.where(manifest.name)}: it was trained with optimizer {old_opt!r}, "
                          f"this job uses {optimizer!r}; use init_from to start a new optimizer from its parameters")
    if shapes != now:
        raise ConfigError(f"cannot resume from {store.where(manifest.name)}: the model differs from the checkpoint's "
                          f"({_difference(shapes, now)}); init_from warm-starts a model with parameters added or "
                          "removed (one whose shape changed cannot be taken: rename it to start it afresh)")
    (log.info if announce else log.debug)("coordinator: resuming from %s (step %d)", store.where(manifest.name), manifest.step)
    return {"name": store.where(manifest.name), "ledger": state["ledger"], "step": manifest.step,
            "examples": state.get("examples", 0),
            # the examples the checkpoint holds the training of, by its ledger (the count above also has
            # those trained after its cut, which this run trains again)
            "trained": ShardLedger.trained_in(state["ledger"]),
            "restore": {"url": store.url, "name": manifest.name, "layout": state["layout"], "full": True}}


def plan_warm_start(where: str, layout: Layout, announce: bool = True) -> dict[str, Any]:
    """The servers' restore order for ``init_from``: parameters only; a changed shape is an error.
    ``announce``: log what is taken (the coordinator's; not a check made before the start)."""
    store, manifest, state = latest_checkpoint(where)
    old, new = _shapes(Layout.from_dict(state["layout"])), _shapes(layout)
    changed = [f"{n}: {list(old[n])} in the checkpoint, {list(new[n])} now" for n in new if n in old and old[n] != new[n]]
    if changed:
        raise ConfigError(f"init_from {store.where(manifest.name)}: parameters changed shape: " + "; ".join(changed))
    fresh = [n for n in new if n not in old]
    if new and len(fresh) == len(new):  # nothing to take: another model's checkpoint, not a warm start
        raise ConfigError(f"init_from {store.where(manifest.name)} shares no parameter with this model: it holds "
                          f"{listed(old)}, the model has {listed(new)}")
    (log.info if announce else log.debug)(
        "coordinator: warm start from %s: %d parameters taken%s", store.where(manifest.name), len(new) - len(fresh),
        f", {len(fresh)} new ones initialised ({', '.join(fresh)})" if fresh else "")
    return {"url": store.url, "name": manifest.name, "layout": state["layout"], "full": False}


def listed(names: Iterable[str], most: int = 6) -> str:
    """Names for a message: the first ``most``, and how many more."""
    names = list(names)
    shown = list(names)[:most]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "")


def _difference(old: dict[str, tuple[int, ...]], new: dict[str, tuple[int, ...]]) -> str:
    parts = [f"{n} only in the checkpoint" for n in old if n not in new]
    parts += [f"{n} new" for n in new if n not in old]
    parts += [f"{n} {list(old[n])} -> {list(new[n])}" for n in new if n in old and old[n] != new[n]]
    return "; ".join(parts)
