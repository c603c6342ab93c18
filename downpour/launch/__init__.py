"""Launchers start a job's processes and watch them. ``local`` (the default) runs them on this machine."""

from downpour.launch.local import LocalLauncher, RunResult

__all__ = ["LocalLauncher", "RunResult"]
