"""Which address a listener hands its peers.

A node binds what it is told (``--host 0.0.0.0`` listens on every interface) but must *advertise*
an address its peers can connect to: never a wildcard (a peer would connect to itself), and never
a loopback address when its peers are on other hosts. The rules, in order:

1. an explicit advertised host (``--advertise HOST``, ``DOWNPOUR_ADVERTISE``) is used as given,
   after checking it is neither a wildcard nor loopback while the coordinator is remote;
2. a wildcard bind advertises the address of the interface that routes to the coordinator
   (learnt by "connecting" a UDP socket, which sends nothing);
3. a concrete bind advertises itself, unless it is loopback while the coordinator is remote.

Anything else stops the node at start-up with an :class:`AddressError` that names the address and
the fix. ipc addresses are local by nature and pass unchanged.
"""

from __future__ import annotations

import ipaddress
import socket

from downpour.errors import AddressError

WILDCARDS = ("0.0.0.0", "::", "*", "")


def split_url(url: str) -> tuple[str, str, str]:
    """``tcp://HOST:PORT`` (or ``HOST:PORT``) -> (scheme, host, port); brackets of IPv6 hosts removed."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    host, _, port = rest.rpartition(":")
    return scheme, host.strip("[]"), port


def is_wildcard(host: str) -> bool:
    return host in WILDCARDS


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


def route_to(host: str, port: int = 9) -> str:
    """The local address of the interface whose route reaches ``host`` (no packet is sent: a UDP
    socket's connect only picks the route). Raises AddressError when no route exists."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as err:
        raise AddressError(f"cannot resolve {host!r}: {err}") from None
    family, _, _, _, target = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect(target)
        except OSError as err:
            raise AddressError(f"no route from this host to {host}: {err}") from None
        return str(s.getsockname()[0])


def is_local(host: str) -> bool:
    """Whether ``host`` is an address of this machine (of this network namespace): it can be bound."""
    if is_wildcard(host) or is_loopback(host):
        return True
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    family, _, _, _, target = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((target[0], 0))
            return True
        except OSError:
            return False


def advertised(bound: str, coordinator: str | None, advertise: str | None = None, what: str = "this node",
               loopback_ok: bool = False) -> str:
    """The address to hand peers for a listener bound at ``bound`` (``tcp://HOST:PORT``, ``HOST:PORT``
    or ``ipc://PATH``), where the job's coordinator is ``coordinator`` (None: this node is the
    coordinator; a wildcard bind then advertises the interface of the default route).
    ``advertise``: the host to advertise instead (``--advertise``). Raises AddressError naming
    the address and the fix. ``loopback_ok``: a listener meant for this host only (metrics bound
    to 127.0.0.1 by default) keeps its loopback address."""
    if bound.startswith("ipc://"):
        return bound
    scheme, host, port = split_url(bound)
    prefix = f"{scheme}://" if scheme else ""
    coord_host = split_url(coordinator)[1] if coordinator and not coordinator.startswith("ipc://") else None
    remote = coord_host is not None and not is_loopback(coord_host)
    if advertise:
        if is_wildcard(advertise):
            raise AddressError(f"{what}: cannot advertise {advertise!r}: a peer would connect to itself. "
                               "Give --advertise an address of this host that the other hosts can reach (or leave it out)")
        if is_loopback(advertise) and remote:
            raise AddressError(f"{what}: cannot advertise {advertise} while the coordinator is at {coord_host}: peers on other "
                               "hosts would connect to themselves. Give --advertise an address they can reach")
        return f"{prefix}{_bracket(advertise)}:{port}"
    if is_wildcard(host):
        target = coord_host if coord_host else "192.0.2.1"  # TEST-NET-1: any routable address picks the default route
        try:
            host = route_to(target)
        except AddressError as err:
            if coord_host:
                raise AddressError(f"{what} listens on every interface but cannot tell which one its peers reach: {err}. "
                                   "Give --advertise HOST (or DOWNPOUR_ADVERTISE)") from None
            host = _hostname_address()
        return f"{prefix}{_bracket(host)}:{port}"
    if is_loopback(host) and remote and not loopback_ok:
        raise AddressError(f"{what} listens on {host}, a loopback address, but the coordinator is at {coord_host}: "
                           f"peers on other hosts could not reach it. Listen on an address they reach (--host 0.0.0.0 "
                           "or --host THIS_HOST_ADDRESS), or give --advertise HOST")
    return bound


def _hostname_address() -> str:
    """This host's address for a host without a default route (nor a coordinator to route to): the
    address its name resolves to unless that is loopback, else its first non-loopback interface's."""
    try:
        by_name = socket.gethostbyname(socket.gethostname())
    except OSError:
        by_name = "127.0.0.1"
    if not is_loopback(by_name):
        return by_name
    return next((a for a in interface_addresses() if not is_loopback(a)), by_name)


def interface_addresses() -> list[str]:
    """The IPv4 address of each interface of this host (Linux: SIOCGIFADDR), in interface order."""
    import fcntl
    import struct

    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue  # no IPv4 address
            found.append(socket.inet_ntoa(raw[20:24]))
    return found


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
