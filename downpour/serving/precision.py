"""Row codecs of an export: float32 (exact), float16, or int8 with one float32 scale per row.

A "row" is a sparse row, or a dense slice: ``encode(rows [n, d])`` returns the tensors to
store under a prefix and ``decode`` reverses it (int8: value = q · scale, scale = max|row| / 127).
"""

from __future__ import annotations

import numpy as np

from downpour.errors import DataError

PRECISIONS = ("float32", "float16", "int8")


def encode(rows: np.ndarray, precision: str) -> dict[str, np.ndarray]:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if precision == "float32":
        return {"val": rows}
    if precision == "float16":
        return {"val": rows.astype(np.float16)}
    if precision == "int8":
        scale = np.abs(rows).max(axis=1) / np.float32(127) if rows.size else np.zeros(len(rows), np.float32)
        safe = np.where(scale > 0, scale, np.float32(1))
        q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
        return {"val": q, "scale": scale.astype(np.float32)}
    raise DataError(f"export precision {precision!r}: known {PRECISIONS}")


def decode(parts: dict[str, np.ndarray], precision: str, dim: int, where: str) -> np.ndarray:
    val = parts.get("val")
    want = {"float32": np.float32, "float16": np.float16, "int8": np.int8}.get(precision)
    if val is None or want is None or val.dtype != want or val.ndim != 2 or val.shape[1] != dim:
        got = "nothing" if val is None else f"{val.dtype} {val.shape}"
        raise DataError(f"{where}: expected {precision} rows of {dim}, got {got}")
    if precision != "int8":
        return val.astype(np.float32)
    scale = parts.get("scale")
    if scale is None or scale.dtype != np.float32 or scale.shape != (len(val),) or not np.isfinite(scale).all():
        raise DataError(f"{where}: int8 rows without one finite float32 scale each")
    return val.astype(np.float32) * scale[:, None]


def row_bytes(dim: int, precision: str) -> int:
    """Bytes of one row in an export, its int64 key (or slice index) included."""
    return 8 + dim * {"float32": 4, "float16": 2, "int8": 1}[precision] + (4 if precision == "int8" else 0)
