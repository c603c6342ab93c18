"""Where a job's Prometheus targets go (file_sd): the run folder, and optionally a folder shared by
many jobs (``monitor.targets_dir``), so that one glob there covers every job."""

from __future__ import annotations

import json
import os
from typing import Any

RUN_FILE = "prometheus_targets.json"


def targets_paths(run_dir: str | None, targets_dir: str | None, fallback_name: str) -> list[str]:
    """``RUN_DIR/prometheus_targets.json`` and ``targets_dir/<run folder name>.json`` (named
    ``fallback_name`` when there is no run folder)."""
    paths = [os.path.join(run_dir, RUN_FILE)] if run_dir else []
    if targets_dir:
        run = os.path.basename(os.path.normpath(run_dir)) if run_dir else fallback_name
        paths.append(os.path.join(targets_dir, f"{run}.json"))
    return paths


def write_targets(paths: list[str], targets: list[dict[str, Any]], only_existing: bool = False) -> None:
    """Write the list atomically to each path (a reader sees the old list or the new one, never half)."""
    for path in paths:
        if only_existing and not os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(targets, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
