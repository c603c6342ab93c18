"""One exception hierarchy for everything Downpour raises on purpose.

Callers catch :class:`DownpourError` for "anything Downpour refused or could not
do"; the subclasses say which layer gave up. Nothing here carries -1/None
sentinels: a failure is always an exception with a message that names the
field, peer or node involved.
"""

from __future__ import annotations


class DownpourError(Exception):
    """Base class of every error Downpour raises deliberately."""


class ConfigError(DownpourError):
    """A job file, flag or API argument is invalid. The message names the field."""


class DataError(DownpourError):
    """Training data is missing or malformed."""


class TransportError(DownpourError):
    """A socket-level failure: a peer did not answer in time or went away."""


class RequestTimeout(TransportError):
    """A request got no reply within its timeout. ``peer`` names who was asked."""

    def __init__(self, message: str, peer: str = "") -> None:
        super().__init__(message)
        self.peer = peer


class AddressError(TransportError):
    """A node would listen on, or advertise, an address its peers cannot use (named in the message, with the fix)."""


class ProtocolError(DownpourError):
    """A message is malformed, oversized, of an unknown type, or has a bad tensor.

    ``req_id`` is set when the header was readable, so the sender can be answered.
    """

    req_id: int | None = None


class RemoteError(DownpourError):
    """A peer answered a request with an error reply; ``peer`` and ``code`` say which and why."""

    def __init__(self, message: str, peer: str = "", code: str = "") -> None:
        super().__init__(message)
        self.peer = peer
        self.code = code


class JobFailed(DownpourError):
    """The job stopped because a node failed; ``node`` is the first node that failed."""

    def __init__(self, message: str, node: str = "") -> None:
        super().__init__(message)
        self.node = node


class JobEnded(DownpourError):
    """There is nothing to recover: the job a coordinator was asked to continue has ended already.
    ``code``: the exit code its end had (0: it finished, 1: it failed)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
