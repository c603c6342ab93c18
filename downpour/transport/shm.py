"""Shared-memory slots beside ipc sockets: the bytes of a request or a reply, without the socket.

Processes on one machine that talk over ``ipc://`` sockets may also share memory: a
requester creates a *slot* (a file in the folder of the listener's socket, mapped into
its memory), writes a request's payload there and sends only the header through the
socket, naming the slot; the listener maps the same file (:class:`SlotMaps`), reads the
payload in place and writes its answer's payload back into it. Each payload then costs
one copy in user space instead of a copy into a ZeroMQ message, two through the kernel
(the I/O threads' socket write and read) and one out of the received message.

Who may use a slot: the folder is the job's socket folder (0700, this user's only), so
a slot is as private as the socket beside it. A listener maps only a regular file of
its own user, directly in its own socket folder (no path, no link), with a name of the
form ``shm-<letters, digits, . _ ->``, of at most :data:`MAX_SLOT_BYTES`; anything else
raises :class:`TransportError` naming the reason. The bytes are only ever read as
numbers: nothing in a slot is parsed or unpickled.

Ordering: the requester writes the payload before it sends the header, and the listener
writes its answer before it sends the reply, so each side reads a slot only after the
message that says it is ready (a socket send and receive order memory between processes).
A requester reuses a slot only once the request it carried was answered; one whose
request got no answer (a timeout, a replaced peer) is never reused.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import uuid
from collections import OrderedDict

from downpour.errors import TransportError

_NAME = re.compile(r"shm-[A-Za-z0-9._-]{1,200}")
MAX_SLOT_BYTES = 1 << 30
_MAPPED = 64  # slots a listener keeps mapped (the least recently used one is dropped beyond)


def remove_slots(folder: str) -> int:
    """Remove the slot files left in ``folder`` (by processes that were killed); returns how many."""
    removed = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if _NAME.fullmatch(name):
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except OSError:
                pass
    return removed


def slot_folder(address: str) -> str | None:
    """The folder where slots for the listener at ``address`` go (None: not an ipc address,
    so the peers may not share memory)."""
    if not address.startswith("ipc://"):
        return None
    return os.path.dirname(address[len("ipc://") :]) or None


class Slot:
    """A requester's slot: ``buffer`` (writable, ``nbytes`` long) is what the listener maps as
    ``name``. ``close`` removes the file; the memory goes once nothing uses the buffer."""

    def __init__(self, folder: str, owner: str, nbytes: int) -> None:
        if not 0 < nbytes <= MAX_SLOT_BYTES:
            raise TransportError(f"a shared-memory slot holds 1 to {MAX_SLOT_BYTES} bytes, not {nbytes}")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", owner)[:80]
        self.name = f"shm-{safe}-{uuid.uuid4().hex[:12]}"
        self.path = os.path.join(folder, self.name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # a full disk fails here, not later as a bus error in a write
            self.buffer = mmap.mmap(fd, nbytes)
        except OSError:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class SlotMaps:
    """A listener's view of its requesters' slots in ``folder`` (its socket's folder)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()

    def map(self, name: object) -> mmap.mmap:
        """The slot called ``name`` (mapped on first use, then kept). Raises TransportError."""
        m = self._maps.get(name) if isinstance(name, str) else None
        if m is not None:
            self._maps.move_to_end(name)
            return m
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise TransportError(f"bad shared-memory slot name {name!r}")
        try:
            fd = os.open(os.path.join(self.folder, name), os.O_RDWR | os.O_NOFOLLOW)
        except OSError as err:
            raise TransportError(f"cannot open shared-memory slot {name}: {err.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise TransportError(f"shared-memory slot {name} is not a regular file of this user")
            if not 0 < st.st_size <= MAX_SLOT_BYTES:
                raise TransportError(f"shared-memory slot {name} holds {st.st_size} bytes (1 to {MAX_SLOT_BYTES})")
            m = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        self._maps[name] = m
        if len(self._maps) > _MAPPED:  # unmapped once no tensor uses it any more
            self._maps.popitem(last=False)
        return m
