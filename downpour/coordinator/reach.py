"""Whether a server's advertised address can be handed to its peers, and whether the job's
checkpoints can reach it.

A checkpoint is written by every server (its shard) and read back by any server that replaces
one, so when the job's servers run on more than one host the checkpoint location must be one
every host reaches: an fsspec URL (``s3://...``) or a folder every host mounts at the same path
(``checkpoint.shared: true``). A plain local path with a server on another host would scatter the
checkpoint over the hosts' disks; such a server is refused when it registers.
"""

from __future__ import annotations

from collections.abc import Callable

from downpour.transport.addresses import is_wildcard, split_url


def local_path(url: str) -> bool:
    """A checkpoint location on this host's own filesystem (a path or ``file://``)."""
    scheme = url.partition("://")[0] if "://" in url else ""
    return scheme in ("", "file", "local")


def address_problem(address: str, checkpoint_url: str | None, shared: bool, is_local: Callable[[str], bool]) -> str | None:
    """Why the server at ``address`` cannot join (None: it can). ``is_local(host)``: whether a
    host is this (the coordinator's) host."""
    if address.startswith("ipc://"):
        return None
    host = split_url(address)[1]
    if is_wildcard(host):
        return (f"the server advertised {address}, a wildcard address its peers cannot connect to; "
                "start it with --advertise HOST (an address of its host that the others reach)")
    if checkpoint_unreachable(address, checkpoint_url, shared, is_local):
        return (f"checkpoints go to {checkpoint_url}, a folder on the coordinator's host, but this server is on another "
                f"host ({host}): its shard would be written to its own disk, where no other host finds it. Set "
                "checkpoint.url to a location every host reaches (s3://BUCKET/PATH or another fsspec URL), or to a "
                "folder every host mounts at the same path with checkpoint.shared: true")
    return None


def checkpoint_unreachable(address: str, checkpoint_url: str | None, shared: bool, is_local: Callable[[str], bool]) -> bool:
    """Whether the server at ``address`` is on another host than a checkpoint folder of this host's
    own (not a job setting a server can change: every server of that host would be refused)."""
    if address.startswith("ipc://") or not checkpoint_url or shared or not local_path(checkpoint_url):
        return False
    host = split_url(address)[1]
    return not is_wildcard(host) and not is_local(host)
