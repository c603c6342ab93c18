"""Frames and sockets only: this layer never sees keys, tensors or gradients."""

from downpour.transport.zmq_transport import Channel, Listener, Poller, bind_address, new_context, send_copies

__all__ = ["Channel", "Listener", "Poller", "bind_address", "new_context", "send_copies"]
