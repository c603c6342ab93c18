"""Frames and sockets only: this layer never sees parameter keys, tensors or gradients
(the keys of security.py are CURVE keys)."""

from downpour.transport.addresses import advertised, is_local, split_url
from downpour.transport.security import Security, bound_name, create_job_keys
from downpour.transport.shm import Slot, SlotMaps, remove_slots, slot_folder
from downpour.transport.uds import Both, UnixChannel, UnixListener, unix_path
from downpour.transport.zmq_transport import Channel, Context, Listener, Poller, WouldBlock, bind_address, new_context, send_copies

__all__ = ["Both", "Channel", "Context", "Listener", "Poller", "Security", "Slot", "SlotMaps", "UnixChannel", "UnixListener",
           "WouldBlock", "advertised", "bind_address", "bound_name", "create_job_keys", "is_local", "new_context", "remove_slots",
           "send_copies", "slot_folder", "split_url", "unix_path"]
