"""The scheduler's HTTP API as seen by the CLI (standard library only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from downpour.errors import ConfigError, DownpourError, TransportError


class SchedulerClient:
    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def _call(self, method: str, path: str, body: dict | None = None, raw: bool = False) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as err:
            try:
                detail = json.loads(err.read()).get("detail", "")
            except ValueError:
                detail = ""
            if isinstance(detail, list):  # FastAPI's own validation errors
                detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail)
            raise (ConfigError if err.code in (400, 404, 422) else DownpourError)(detail or f"HTTP {err.code}") from None
        except (urllib.error.URLError, OSError) as err:
            raise TransportError(f"no scheduler answers at {self.url}: {getattr(err, 'reason', err)} "
                                 "(start one with `downpour scheduler`, or give --scheduler URL)") from None
        return payload.decode(errors="replace") if raw else json.loads(payload)

    def submit(self, **body) -> dict:
        return self._call("POST", "/jobs", body)

    def jobs(self) -> list[dict]:
        return self._call("GET", "/jobs")

    def job(self, job_id: int) -> dict:
        return self._call("GET", f"/jobs/{int(job_id)}")

    def cancel(self, job_id: int) -> dict:
        return self._call("POST", f"/jobs/{int(job_id)}/cancel")

    def logs(self, job_id: int, lines: int = 100) -> str:
        return self._call("GET", f"/jobs/{int(job_id)}/logs?lines={int(lines)}", raw=True)

    def cluster(self) -> dict:
        return self._call("GET", "/cluster")

    def metrics(self) -> str:
        return self._call("GET", "/metrics", raw=True)
