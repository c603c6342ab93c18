"""Compression of what workers and servers exchange: codecs, error feedback, the wire plan."""

from downpour.compress import codecs as _codecs  # noqa: F401  (registers the codecs)
from downpour.compress.base import CODECS, Codec, Payload, Shape, decode
from downpour.compress.feedback import DGC, ErrorFeedback
from downpour.compress.plan import PushCompressor, decode_pull, decode_push, encode_pull, make_codec, pull_codec, pull_request

__all__ = ["CODECS", "DGC", "Codec", "ErrorFeedback", "Payload", "PushCompressor", "Shape", "decode", "decode_pull",
           "decode_push", "encode_pull", "make_codec", "pull_codec",
           "pull_request"]
