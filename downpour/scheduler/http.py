"""The scheduler's HTTP API (FastAPI, served by uvicorn).

    POST /jobs               {"job_yaml": TEXT, "user", "queue", "priority", "overrides", "memory_mb", "cwd"} -> the job
    GET  /jobs               every job, queue order first          GET /jobs/{id}          one job
    POST /jobs/{id}/cancel   cancel it                              GET /jobs/{id}/logs?lines=N   its output
    GET  /cluster            capacity, free resources, policy       GET /metrics            Prometheus text

Errors are JSON ``{"detail": MESSAGE}``: 400 for a refused request (the message names the field or
resource), 404 for an unknown job ID.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict

from downpour.errors import ConfigError, DownpourError
from downpour.scheduler.metrics import SchedulerCollector
from downpour.scheduler.model import Job, Phase
from downpour.scheduler.service import Scheduler, UnknownJob


class Submission(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_yaml: str
    user: str = "default"
    queue: str = "default"
    priority: int = 0
    overrides: list[str] = []
    memory_mb: int | None = None
    cwd: str | None = None


def job_view(s: Scheduler, job: Job, now: float, position: int | None = None) -> dict:
    run = now - job.started_s if job.phase.holds_resources and job.started_s is not None else 0.0
    end = job.finished_s if job.finished_s is not None else now
    return {"id": job.id, "name": job.name, "user": job.user, "queue": job.queue, "priority": job.priority,
            "phase": job.phase.value, "position": position, "tasks": len(job.tasks), "demand": job.demand.as_dict(),
            "submitted_s": job.submitted_s, "first_started_s": job.first_started_s, "finished_s": job.finished_s,
            "wait_s": (job.first_started_s if job.first_started_s is not None else end) - job.submitted_s,
            "jct_s": job.finished_s - job.submitted_s if job.finished_s is not None else None,
            "running_s": run, "ran_s": job.attained_at(now) / max(1, job.width),  # (the current run; every run's)
            "attained": job.attained_at(now), "rank": s.policy.describe(job, now),
            "preemptions": job.preemptions, "restarts": job.restarts, "attempt": job.attempt, "pid": job.pid,
            "run_dir": job.run_dir, "message": job.message, "cancel_requested": job.cancel_requested}


def build_app(s: Scheduler) -> FastAPI:
    app = FastAPI(title="downpour scheduler")
    registry = CollectorRegistry()
    registry.register(SchedulerCollector(s))

    @app.exception_handler(DownpourError)
    async def _refused(request: Request, err: DownpourError):
        return JSONResponse({"detail": str(err)}, status_code=404 if isinstance(err, UnknownJob) else 400)

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, err: RequestValidationError):
        # 400 as any refusal, naming the fields; the values are not echoed (an infinity is no JSON: that was a 500)
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg', 'invalid')}"
                          for e in err.errors()[:5])
        return JSONResponse({"detail": f"malformed request: {where}"}, status_code=400)

    @app.post("/jobs")
    def submit(body: Submission):
        job = s.submit(body.job_yaml, body.user, body.queue, body.priority, body.overrides, body.memory_mb, body.cwd)
        return job_view(s, job, s.clock())

    @app.get("/jobs")
    def jobs():
        with s.lock:
            now = s.clock()
            all_jobs = list(s.jobs.values())
            queued = s.policy.order([j for j in all_jobs if j.phase is Phase.QUEUED],
                                    [j for j in all_jobs if j.phase.holds_resources], s.capacity, now)
            pos = {j.id: k + 1 for k, j in enumerate(queued)}
            order = sorted(all_jobs, key=lambda j: (j.phase.finished, j.phase is Phase.QUEUED, pos.get(j.id, 0), j.id))
            return [job_view(s, j, now, pos.get(j.id)) for j in order]

    @app.get("/jobs/{job_id}")
    def one(job_id: int):
        with s.lock:
            return job_view(s, s.get(job_id), s.clock())

    @app.post("/jobs/{job_id}/cancel")
    def cancel(job_id: int):
        job = s.cancel(job_id)
        return job_view(s, job, s.clock())

    @app.get("/jobs/{job_id}/logs", response_class=PlainTextResponse)
    def logs(job_id: int, lines: int = 100):
        if lines <= 0:
            raise ConfigError(f"lines: must be > 0, got {lines}")
        return s.logs(job_id, lines)

    @app.get("/cluster")
    def cluster():
        return {"capacity": s.capacity.as_dict(), "nodes": {n: r.as_dict() for n, r in s.settings.nodes.items()},
                "free": {n: r.as_dict() for n, r in s.free().items()}, "policy": s.policy.name}

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
