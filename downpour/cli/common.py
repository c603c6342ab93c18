"""What the role commands share: the coordinator's address, integer environment variables, a
node's CURVE keys (or none, and when none is safe), and the --advertise check."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from downpour.errors import ConfigError


def coordinator_url(text: str | None) -> str:
    if not text:
        raise ConfigError("--coordinator HOST:PORT is required (or set DOWNPOUR_COORDINATOR)")
    if "://" in text:
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--coordinator: expected HOST:PORT, got {text!r}")
    return f"tcp://{host}:{port}"


def env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    if not v.lstrip("-").isdigit():
        raise ConfigError(f"{name} must be an integer, got {v!r}")
    return int(v)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 (a free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


def private_ipc(address: str) -> bool:
    """An ipc:// address whose socket folder only this user can open (no keys needed there)."""
    if not address.startswith("ipc://"):
        return False
    try:
        st = os.stat(os.path.dirname(address[len("ipc://"):]) or ".")
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o077


def node_security(args, role: str, address: str = "") -> Any:
    """The node's CURVE keys from --keys DIR (or DOWNPOUR_KEYS); None with --insecure (loudly), or
    without keys when ``address`` is an ipc socket in a folder only this user can open. A worker
    whose folder holds per-worker keys takes its own (the one there, or its --rank's)."""
    from downpour.transport import Security

    folder = getattr(args, "keys", None) or os.environ.get("DOWNPOUR_KEYS")
    if not folder and not getattr(args, "insecure", False) and private_ipc(address):
        return None
    if getattr(args, "insecure", False):
        print(f"downpour: WARNING: --insecure: this {role} talks without authentication or encryption; "
              "anyone who can reach its ports can read and rewrite the model. Use it on trusted networks only.",
              file=sys.stderr, flush=True)
        return None
    if not folder:
        raise ConfigError(f"the {role} needs the job's keys: --keys DIR (make them with `downpour keys DIR`), "
                          "or --insecure on a trusted network")
    return Security.load(folder, role, getattr(args, "rank", None) if role == "worker" else None)


def check_advertise(args, role: str, coordinator: str | None) -> None:
    """A wildcard --advertise (or a loopback one with a remote coordinator) stops the node before it starts."""
    from downpour.transport import advertised

    if getattr(args, "advertise", None):
        advertised("tcp://0.0.0.0:1", coordinator, args.advertise, role)
