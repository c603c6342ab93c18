"""What both benchmarks record about the machine and the run."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
import zmq


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or platform.processor() where there is none: the
    development VMs change hosts, and a figure is only comparable on the same CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_busy_s() -> float | None:
    """CPU seconds every core of this machine has spent busy since boot (/proc/stat: all but idle
    and iowait), or None where there is no /proc/stat. Whole machine: every process and thread,
    the kernel's work for them, and anything else running."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "loadavg_at_start": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
    }


def spread(values: list[float], fmt: str = ".1f") -> str:
    """``mean (min–max)`` of a benchmark's repeated figures, for its markdown table."""
    return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def write_runs(path: str | None, args: Any, runs: dict[str, list[dict[str, Any]]]) -> None:
    """Every run of a benchmark, with the machine and the arguments, as JSON at ``path`` (None: nothing)."""
    if path:
        with open(path, "w") as f:
            json.dump({"environment": environment(), "args": vars(args), "runs": runs}, f, indent=1)
