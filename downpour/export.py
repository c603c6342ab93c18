"""Export a trained job for plain-PyTorch inference: dense parameters, buffers and sparse tables.

``model.pt`` holds the dense parameters and buffers; a model with :class:`~downpour.nn.SparseEmbedding`
layers also needs its tables' rows, which live in the checkpoints (a base plus deltas per server).
:func:`export_model` replays the latest checkpoint's tables and writes one state_dict
(``export.pt``, tensors only: ``torch.load(path, weights_only=True)``) in which every
SparseEmbedding at ``path`` is a :class:`~downpour.nn.TableEmbedding` (``path.ids``: sorted
feature IDs; ``path.weight``: their rows). :func:`plain_model` swaps those modules into a model
and loads the export strictly::

    downpour.export.export_model("runs/ctr-...")                      # -> runs/ctr-.../export.pt
    model = downpour.export.plain_model(my_model(), torch.load("runs/ctr-.../export.pt", weights_only=True))
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from downpour.config import parse_job
from downpour.coordinator.restore import latest_checkpoint
from downpour.errors import DataError
from downpour.layout import Layout
from downpour.nn import SparseEmbedding, TableEmbedding


def read_tables(where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every sparse table of the latest checkpoint under a run folder or URL: (sorted IDs int64 [n], rows float32 [n, dim])."""
    from downpour.server.sparse import make_table, read_chain

    store, manifest, state = latest_checkpoint(where)
    job = parse_job(state["job"], source=store.where(manifest.name))
    layout = Layout.from_dict(state["layout"])
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {t.name: [] for t in layout.tables}
    for file in sorted(f for f in manifest.files if f.startswith("sparse-server-")):
        chain = read_chain(store, manifest, file)
        for t in layout.tables:
            replay = make_table(job.sparse.table(t.name), t.dim, job.training.seed)
            replay.restore([{k[len(t.name) + 1 :]: v for k, v in snap.items() if k.startswith(t.name + "/")} for snap in chain])
            snap = replay.snapshot(True)
            parts[t.name].append((snap["keys"], snap["values"]))
    out = {}
    for t in layout.tables:
        keys = np.concatenate([k for k, _ in parts[t.name]]) if parts[t.name] else np.zeros(0, np.int64)
        rows = np.concatenate([v for _, v in parts[t.name]]) if parts[t.name] else np.zeros((0, t.dim), np.float32)
        order = np.argsort(keys, kind="stable")
        out[t.name] = (torch.from_numpy(keys[order].astype(np.int64)), torch.from_numpy(rows[order].astype(np.float32)))
    return out


def export_model(run_dir: str, out: str | None = None, checkpoints: str | None = None) -> str:
    """Write ``out`` (default RUN_DIR/export.pt): ``model.pt`` plus every SparseEmbedding's table
    (from the latest checkpoint under ``checkpoints``, default the run folder's). Returns the path."""
    from downpour.models import build_model

    state = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    store, manifest, job_state = latest_checkpoint(checkpoints or run_dir)
    job = parse_job(job_state["job"], source=run_dir)
    with torch.device("meta"):
        model = build_model(job.model, job.training.seed)
    sparse = any(isinstance(m, SparseEmbedding) for m in model.modules())
    if sparse and not manifest.job.get("final"):  # model.pt is the end of training's: its tables must be too
        raise DataError(f"{run_dir}: the latest checkpoint, {store.where(manifest.name)} (step {manifest.step}), is not the "
                        "end of training's (checkpoint.at_end was off, or it was abandoned): its sparse tables are older than "
                        "model.pt's dense parameters, and an export would pair the two; --resume the job from it with "
                        "checkpoint.at_end: true to write one")
    tables = read_tables(checkpoints or run_dir) if sparse else {}
    for path, m in model.named_modules():
        if isinstance(m, SparseEmbedding):
            if m.table not in tables:
                raise DataError(f"{run_dir}: the checkpoint has no table {m.table!r} (used by {path})")
            ids, rows = tables[m.table]
            state[f"{path}.ids"], state[f"{path}.weight"] = ids, rows
    out = out or os.path.join(run_dir, "export.pt")
    torch.save(state, out + ".tmp")
    os.replace(out + ".tmp", out)
    return out


def plain_model(model: nn.Module, exported: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with each SparseEmbedding replaced by a :class:`TableEmbedding` sized from
    ``exported`` (an :func:`export_model` state_dict), and the export loaded strictly."""
    for path, m in list(model.named_modules()):
        if isinstance(m, SparseEmbedding):
            plain = TableEmbedding(len(exported[f"{path}.ids"]), m.dim, m.mode, m.padding_idx)
            parent_path, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, name, plain)
    model.load_state_dict(exported, strict=True)
    return model.eval()
