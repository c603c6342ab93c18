"""Operating-system settings of a job's processes: their CPU scheduling policy, their exit codes,
and what a SIGTERM means to them.

A training job's processes are batch work: what counts is how much they get done, not how soon
one of them runs after it wakes up. Under Linux's ``SCHED_BATCH`` a thread that wakes (a server
receiving a request, a worker receiving its reply) does not preempt the thread running on that
core; it runs when that one blocks or its time slice ends. On a machine with fewer cores than the
job's busy processes that spares a context switch, and the caches it costs, per message: the
reference job on 2 cores ran 3-10 % more examples/s with it (benchmarks/RESULTS.md §30). It is
not a priority: the processes' nice value stays, and any user may set it on their own processes.
``cluster.cpu_policy: normal`` keeps the default policy (e.g. where a latency-bound neighbour
shares the cores and the job should not wait behind it).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# The exit code of a worker the coordinator stopped (the job failed or is over, its request refused
# with job_failed): not a crash, so its launcher starts no replacement. A node the coordinator
# declared dead exits 1 instead: its work went to others and a replacement takes its rank.
EXIT_STOPPED = 3

# A server stopped by SIGTERM outside a graceful stop of its job: 128 + SIGTERM, as a shell reports a
# process the signal ended (its launcher starts the rank's replacement, as for one killed by it).
EXIT_TERMINATED = 128 + signal.SIGTERM

# A SIGTERM that comes less than this after the first is the same stop arriving by a second route
# (a service manager, `pkill` or `timeout` signalling every process of the job, and the launcher
# passing its own stop on to the coordinator): it does not turn a graceful stop into one at once.
REPEAT_S = 1.0


def die_by_sigterm() -> None:
    """End this process as SIGTERM's default action does (its parent sees it killed by the signal)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


class TermSignal:
    """The SIGTERMs of a process that stops in steps: the first calls ``first`` (from the signal
    handler: it may only set flags); a later one, :data:`REPEAT_S` or more after it, calls ``again``
    (default: raise KeyboardInterrupt, the stop at once); one sooner is ignored."""

    def __init__(self, first: Callable[[], None], again: Callable[[], None] | None = None) -> None:
        self.at: float | None = None
        self._first, self._again = first, again

    def install(self) -> TermSignal:
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.at is None:
            self.at = now
            self._first()
        elif now - self.at >= REPEAT_S:
            if self._again is None:
                raise KeyboardInterrupt
            self._again()


def apply_cpu_policy(policy: str) -> bool:
    """Put every thread of this process under ``policy`` (``batch`` or ``normal``); threads started
    later inherit it from the thread that starts them. Returns whether it was applied (False where
    the system has no such policy, e.g. not Linux, or refused it: the process then runs as it was)."""
    if policy not in ("batch", "normal"):
        raise ValueError(f"cpu policy must be batch or normal, not {policy!r}")
    value = getattr(os, "SCHED_BATCH" if policy == "batch" else "SCHED_OTHER", None)
    if value is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    applied = True
    for tid in tids:
        try:
            os.sched_setscheduler(tid, value, os.sched_param(0))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except OSError as err:
            log.debug("cpu policy %s not applied to thread %d: %s", policy, tid, err)
            applied = False
    return applied
