"""Checkpoint storage behind fsspec: a local folder by default, or any URL fsspec knows
(``s3://`` with s3fs, ``hdfs://`` with pyarrow, ``memory://`` for tests)."""

from downpour.storage.checkpoints import CheckpointStore, Manifest, resolve_location, same_location, sha256_hex

__all__ = ["CheckpointStore", "Manifest", "resolve_location", "same_location", "sha256_hex"]
