"""Many jobs on one cluster: policies, gang placement, a simulator and the ``downpour scheduler`` service.

Layers: resources/model (data) -> placement, drf, policies -> decide (one round, a pure function)
-> sim (simulated clock) and service (real processes, SQLite, HTTP).
"""

from downpour.scheduler.decide import Preempt, Start, decide
from downpour.scheduler.model import Job, Phase
from downpour.scheduler.policies import POLICIES, Policy, make_policy
from downpour.scheduler.resources import Resources, machine_resources

__all__ = ["POLICIES", "Job", "Phase", "Policy", "Preempt", "Resources", "Start", "decide", "machine_resources", "make_policy"]
