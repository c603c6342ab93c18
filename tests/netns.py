"""Hosts made of Linux network namespaces, for tests of jobs that span machines.

:class:`Hosts` creates namespaces (each with its own loopback and one veth interface with a
private address in 10.77.0.0/24), joined by a bridge that lives in a namespace of its own, so
nothing changes in the machine's own network. Processes started with :meth:`Hosts.popen` see only
their namespace's interfaces: ``--host 0.0.0.0`` binds only there. Everything is deleted on close.
Needs root and ``ip`` (iproute2): :func:`unavailable` says why not, for a loud skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (these two-host tests run as root in CI's container)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"dpchk{uuid.uuid4().hex[:6]}"
    probe = _ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"`ip netns add` fails here: {probe.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class Hosts:
    """Namespaces as hosts: ``add("a")`` returns the host's address."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.switch = f"dp{self.tag}sw"
        self.names: dict[str, str] = {}  # host -> namespace
        self.addresses: dict[str, str] = {}
        self.devices: dict[str, str] = {}
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self, host: str) -> str:
        i = len(self.names) + 1
        ns, dev = f"dp{self.tag}{host}", f"dp{self.tag}{i}"
        _ip("netns", "add", ns)
        self.names[host] = ns
        _ip("link", "add", dev, "type", "veth", "peer", "name", f"{dev}s")
        _ip("link", "set", dev, "netns", ns)
        _ip("link", "set", f"{dev}s", "netns", self.switch)
        _ip("-n", self.switch, "link", "set", f"{dev}s", "master", "br0")
        _ip("-n", self.switch, "link", "set", f"{dev}s", "up")
        address = f"10.77.0.{i}"
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.addresses[host], self.devices[host] = address, dev
        return address

    def shape(self, host: str, rate_mbit: float) -> None:
        """Limit what ``host`` sends to ``rate_mbit`` (tc tbf; this kernel has no netem for delays)."""
        subprocess.run(["ip", "netns", "exec", self.names[host], "tc", "qdisc", "replace", "dev", self.devices[host], "root", "tbf",
                        "rate", f"{rate_mbit}mbit", "burst", "256kbit", "latency", "20ms"], check=True, capture_output=True, timeout=20)

    def popen(self, host: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.names[host], *cmd], **kwargs)

    def close(self) -> None:
        for ns in [*self.names.values(), self.switch]:
            _ip("netns", "del", ns, check=False)  # its interfaces go with it
        self.names.clear()

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
