"""``downpour status``: a one-screen terminal summary of a running job (its coordinator's
``STATUS``) or a finished one (its ``summary.json``)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from downpour.cli.common import coordinator_url, node_security
from downpour.errors import ConfigError, DownpourError

_STATE_STYLE = {"alive": "green", "done": "cyan", "finished": "dim", "dead": "bold red"}


def _num(x: Any, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _clock(seconds_ago: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(time.time() - seconds_ago))


def render_live(status: dict[str, Any], dashboard: str | None = None) -> Group:
    s = status
    head = Text()
    head.append(f"{s.get('job', 'job')}  ", style="bold")
    head.append(s["phase"], style="bold red" if s["phase"] == "failed" else "bold green")
    live = sum(1 for n in s["nodes"] if n["role"] == "worker" and n["state"] in ("alive", "done", "finished"))
    planned_workers = s.get("num_workers", "?")  # (an elastic job's workers come and go: those there now, too)
    workers = f"{planned_workers} workers" if live == planned_workers else f"{live} workers ({planned_workers} planned)"
    head.append(f"  {s.get('consistency', '')}  {s.get('num_servers', '?')} servers, {workers}  up {s['elapsed_s']:.0f}s\n")
    planned = s.get("planned_examples")  # (None: a stream)
    head.append(f"examples {s['examples']}{'' if planned is None else f'/{planned}'}  step {s['steps']}  {s['examples_per_s']:.0f} ex/s"
                f"  loss {_num(s.get('loss'), '.4f')}")
    st = s.get("staleness") or {}
    if st:
        head.append(f"  staleness mean {st.get('mean', 0):.2f} max {st.get('max', 0)}")
    b = s.get("bytes") or {}
    if b:
        head.append(f"  workers sent {_bytes(b.get('sent'))}, received {_bytes(b.get('received'))}")
    _shards(head, s.get("data_shards"))
    if dashboard:
        head.append(f"\ndashboard: {dashboard}")
    nodes = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("node", "state", "host/pid", "heartbeat", "rate", "loss/staleness", "detail"):
        nodes.add_column(col)
    for n in s["nodes"]:
        p = n.get("progress") or {}
        if n["role"] == "worker":
            rate, level = f"{_num(p.get('examples_per_s'))} ex/s", f"loss {_num(p.get('loss'), '.4f')}"
            detail = f"step {p.get('steps', 0)}" + (f", epoch {p['shard'][0]} shard {p['shard'][1]}" if p.get("shard") else "")
        else:
            rate, level = f"{p.get('pushes', 0)} pushes", f"staleness {_num(p.get('staleness_mean'), '.2f')}"
            detail = f"v{p.get('version', 0)}, {p.get('rejected', 0)} rejected"
        nodes.add_row(n["name"], Text(n["state"], style=_STATE_STYLE.get(n["state"], "")), f"{n['host']}/{n['pid']}",
                      f"{n['heartbeat_age_s']:.1f}s ago", rate, level, detail)
    parts: list[Any] = [head, nodes]
    for a in s.get("alerts") or []:
        affected = a.get("affected") or {}
        what = ", ".join(affected.get("keys") or affected.get("shards") or []) or "-"
        parts.append(Text(f"! {a['node']} {a['kind']} since {_clock(a['since_s'])} ({a['since_s']:.0f}s): {a['message']}; "
                          f"affects {what}", style="yellow"))
    for f in s.get("failures") or []:
        detected = f" (detected after {f['detected_after_s']:.1f}s)" if f.get("detected_after_s") is not None else ""
        parts.append(Text(f"x {f['node']} {f['kind']} at {f['at_s']:.1f}s{detected}: {f['reason']}", style="red"))
    if s.get("error"):
        parts.append(Text(f"error: {s['error']}", style="bold red"))
    return Group(*parts)


def _shards(head: Text, shards: dict[str, Any] | None) -> None:
    if shards:
        done = sum(shards["completed_per_epoch"].values())
        left = f", {shards['remaining']} left in the job" if "remaining" in shards else ""
        head.append(f"\ndata shards: {done} completed, {shards['unfinished']} unfinished in the epochs begun{left} "
                    f"({shards['num_shards']} per epoch)")


def render_summary(s: dict[str, Any]) -> Group:
    head = Text()
    head.append(f"{s.get('job', 'job')}  ", style="bold")
    head.append(s.get("status", "?"), style="bold green" if s.get("status") == "ok" else "bold red")
    head.append(f"  {s.get('consistency')}  {s.get('num_servers')} servers, {s.get('num_workers')} workers\n")
    head.append(f"test accuracy {_num(s.get('test_accuracy'), '.4f')}  test loss {_num(s.get('test_loss'), '.4f')}")
    if s.get("test_auc") is not None:
        head.append(f"  test AUC {_num(s.get('test_auc'), '.4f')}  log loss {_num(s.get('test_logloss'), '.4f')}")
    for name, value in (s.get("test_metrics") or {}).items():
        head.append(f"  {name} {_num(value, '.4f')}")
    online = s.get("online") or {}
    if online:
        head.append(f"\nstream: {online.get('events')} events, prequential AUC {_num(online.get('prequential_auc'), '.4f')}, "
                    f"log loss {_num(online.get('prequential_logloss'), '.4f')}")
    head.append("\n")
    head.append(f"{s.get('examples')} examples in {s.get('steps')} steps, {s.get('train_s', 0):.1f}s training "
                f"({s.get('examples_per_s', 0):.0f} ex/s), {s.get('wall_s', 0):.1f}s wall")
    if s.get("resumed_from"):  # this run's figures above; the job's whole count with the runs before it
        head.append(f"\nresumed from {s['resumed_from']}: {s.get('job_examples')} examples in the job so far")
    st = s.get("staleness") or {}
    if st:
        head.append(f"\nstaleness mean {st.get('mean', 0):.2f} p50 {st.get('p50')} p90 {st.get('p90')} "
                    f"p99 {st.get('p99')} max {st.get('max')}")
    nodes = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("node", "steps/pushes", "examples/s", "bytes in/out", "cpu"):
        nodes.add_column(col)
    for name, w in sorted((s.get("workers") or {}).items()):
        nodes.add_row(name, str(w.get("steps", "-")), _num(w.get("examples_per_s")),
                      f"{_bytes(w.get('bytes_received'))}/{_bytes(w.get('bytes_sent'))}", f"{_num(w.get('cpu_s'), '.1f')}s")
    for name, v in sorted((s.get("servers") or {}).items()):
        nodes.add_row(name, str(v.get("pushes", "-")), "-", f"{_bytes(v.get('bytes_in'))}/{_bytes(v.get('bytes_out'))}",
                      f"{_num(v.get('cpu_s'), '.1f')}s")
    _shards(head, s.get("data_shards"))
    ck = s.get("checkpoints") or {}
    if ck.get("enabled"):
        head.append(f"\ncheckpoints {ck.get('count', 0)} committed (last {ck.get('last') or '-'}), {ck.get('abandoned', 0)} abandoned; "
                    f"{ck.get('url')}")
    parts: list[Any] = [head, nodes]
    if ck.get("enabled") and ck.get("abandoned") and not ck.get("count"):
        parts.append(Text("! no checkpoint was committed: this job cannot be resumed (the coordinator's log says why)",
                          style="yellow"))
    for f in s.get("failures") or []:
        parts.append(Text(f"x {f['node']} {f['kind']} at {f['at_s']:.1f}s: {f['reason']}", style="red"))
    if s.get("error"):
        parts.append(Text(f"error: {s['error']}", style="bold red"))
    return Group(*parts)


def show(renderable: Group, title: str) -> None:
    Console().print(Panel(renderable, title=title, expand=False))


def cmd_status(args) -> int:
    """``downpour status TARGET``: the summary of a finished run folder, else the live STATUS of its coordinator."""
    target, dashboard = args.target, None
    run_dir = None
    if os.path.isfile(target) and os.path.basename(target) == "summary.json":  # the run folder's summary, named
        target = os.path.dirname(target) or "."
    if os.path.isdir(target) and not args.keys and os.path.isdir(os.path.join(target, "keys")):
        args.keys = os.path.join(target, "keys")
    if os.path.isdir(target):
        path = os.path.join(target, "summary.json")
        addr_path = os.path.join(target, "coordinator.addr")
        url_path = os.path.join(target, "dashboard.url")
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    summary = json.load(f)
            except (OSError, ValueError) as err:  # (UnicodeDecodeError is a ValueError)
                raise ConfigError(f"{path} cannot be read as a job summary: {err}") from None
            if not isinstance(summary, dict) or "status" not in summary:
                raise ConfigError(f"{path} is not a job summary (no status in it)")
            if args.json:
                print(json.dumps(summary, indent=2))
            else:
                show(render_summary(summary), f"downpour status: {target} (finished)")
            return 1 if summary.get("status") == "failed" else 0  # (for scripts: a failed job's status is not 0)
        if not os.path.exists(addr_path):
            raise ConfigError(f"{target} holds neither summary.json nor coordinator.addr")
        with open(addr_path) as f:
            run_dir, target = target, f.read().strip()
        if os.path.exists(url_path):
            with open(url_path) as f:
                dashboard = f.read().strip()
    elif "://" not in target and (os.sep in target or target.startswith(".") or ":" not in target):
        raise ConfigError(f"{target}: no such run folder (TARGET is a run folder, or a coordinator's HOST:PORT)")
    from downpour.protocol import Message, Op
    from downpour.protocol.rpc import RpcClient
    from downpour.transport import new_context

    url = coordinator_url(target)
    security = None if args.insecure or not (args.keys or os.environ.get("DOWNPOUR_KEYS")) else node_security(args, "client", url)
    ctx = new_context()
    rpc = RpcClient(ctx, f"status-{os.getpid()}", request_timeout_s=5.0, security=security)
    try:
        rpc.connect("coordinator", url, role="coordinator")
        status = rpc.call("coordinator", Message(Op.STATUS)).meta
    except DownpourError as err:
        if run_dir is None:
            raise
        raise ConfigError(f"{run_dir}: no summary.json, and its coordinator at {target} does not answer ({err}): if the job "
                          f"is not running (stopped at once, or its machine went down), `downpour train JOB --resume {run_dir}` "
                          f"continues from its latest checkpoint") from None
    finally:
        rpc.close()
        ctx.destroy(linger=0)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        show(render_live(status, dashboard), f"downpour status: {target}")
    return 0
