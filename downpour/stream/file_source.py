"""A growing file as a source: JSON lines (``{...}``) or Criteo TSV rows, one event a line.

The file is tailed: a read returns the whole lines appended since the last one (a line
still being written, without its ``\\n``, waits for it). An event's offset is the byte
position after its line, so resuming after an offset is a seek. One file is one partition;
with ``partitions: P`` the files are ``PATH.0`` … ``PATH.{P-1}``. Acknowledging does nothing
(the position in the checkpoint is the only record a file needs).
"""

from __future__ import annotations

import json
import logging
import os
import time
from urllib.parse import urlsplit

from downpour.errors import DataError
from downpour.stream.api import RawEvent, StreamSpec, register_source

log = logging.getLogger(__name__)


def _is_eos(text: str) -> bool:
    if '"eos"' not in text:
        return False
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and "eos" in obj


class FileReader:
    def __init__(self, path: str, partition: int, after: int) -> None:
        self.path, self.partition, self.after = path, partition, after
        self._buf = b""
        self._shrank = False  # warned that the file is shorter than what was read (truncated, rotated)

    def read(self, max_events: int, timeout_s: float) -> list[RawEvent]:
        deadline = time.monotonic() + timeout_s
        while True:
            out = self._take(max_events)
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _take(self, max_events: int) -> list[RawEvent]:
        # More is read only while the buffer holds fewer lines than asked for: a backlog is read a
        # batch at a time, not into memory whole (and copied once per batch: quadratic).
        if self._buf.count(b"\n") < max_events:
            pos = self.after + len(self._buf)
            try:
                with open(self.path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size < pos and not self._shrank:
                        self._shrank = True
                        log.warning("%s: the file is %d bytes, shorter than the %d read (truncated or rotated?): waiting for "
                                    "it to grow past them; a new file belongs under another path", self.path, size, pos)
                    f.seek(pos)
                    self._buf += f.read(max(1 << 16, max_events * 400))
            except FileNotFoundError:
                return []
        out = []
        at = 0
        while len(out) < max_events:
            nl = self._buf.find(b"\n", at)
            if nl < 0:
                break
            line = self._buf[at:nl].rstrip(b"\r")
            at = nl + 1
            off = self.after + at
            if not line.strip():
                out.append(RawEvent(off, {"skip": ""}))  # an empty line: counted as malformed, never blocks
                continue
            text = line.decode("utf-8", errors="replace")
            if text.lstrip().startswith("{"):
                out.append(RawEvent(off, {"eos": "1"} if _is_eos(text) else {"json": text}))
            else:
                out.append(RawEvent(off, {"tsv": text}))
        self.after += at
        self._buf = self._buf[at:]
        return out

    def ack(self, upto: int) -> int:
        return 0

    def close(self) -> None:
        pass


@register_source("file", "")
class FileSource:
    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.path = urlsplit(spec.url).path if spec.url.startswith("file://") else spec.url

    def part(self, partition: int) -> str:
        return self.path if self.spec.partitions == 1 else f"{self.path}.{partition}"

    def check(self, *, unreachable_wait_s: float = 0.0) -> None:  # (a file is there or not: nothing to wait for)
        missing = [self.part(p) for p in range(self.spec.partitions) if not os.path.exists(self.part(p))]
        if missing:
            raise DataError(f"data.url: stream file {missing[0]} does not exist ({len(missing)} of {self.spec.partitions} missing)")

    def open(self, partition: int, after: int, consumer: str) -> FileReader:
        return FileReader(self.part(partition), partition, after)

    def append(self, partition: int, fields: dict[str, str]) -> int:
        line = '{"eos": 1}' if "eos" in fields else fields.get("json") or fields.get("tsv") or ""
        with open(self.part(partition), "ab") as f:
            f.write(line.encode() + b"\n")
            return f.tell()

    def close(self) -> None:
        pass
