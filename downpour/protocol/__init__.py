"""Typed messages and their zero-copy codec (header frame + raw tensor frames)."""

from downpour.protocol.codec import decode, encode
from downpour.protocol.messages import Message, Op

__all__ = ["Message", "Op", "decode", "encode"]
