"""``downpour serve`` and ``downpour export``: serving a model from its exports.

    downpour serve EXPORT_URL [--host 127.0.0.1] [--port 8080] [--poll-s 0.5]
    downpour export RUN_DIR_OR_CHECKPOINT_URL EXPORT_URL [--precision float32|float16|int8] [--full-every 20]
"""

from __future__ import annotations

import sys

from downpour.cli.common import port_number


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="answer predictions over HTTP from an export, following its new versions")
    s.add_argument("url", help="the export's folder or fsspec URL (a job's export.url)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port_number, default=8080)
    s.add_argument("--poll-s", type=float, default=0.5, help="how often to look for a new version (seconds)")
    s.set_defaults(fn=cmd_serve)
    e = sub.add_parser("export", help="export a run's checkpoints for serving (a snapshot, then deltas)")
    e.add_argument("checkpoints", help="a run folder (its checkpoints) or a checkpoint URL")
    e.add_argument("url", help="where to write the export")
    e.add_argument("--precision", choices=["float32", "float16", "int8"], default="float32")
    e.add_argument("--full-every", type=int, default=20)
    e.set_defaults(fn=cmd_export)


def cmd_serve(args) -> int:
    from downpour.serving.app import serve

    if args.poll_s <= 0:
        print("downpour serve: --poll-s must be positive")
        return 2
    problem = _cannot_listen(args.host, args.port)
    if problem:  # (said before "serving ... on", not after it)
        print(f"downpour serve: cannot listen on {args.host}:{args.port}: {problem}", file=sys.stderr, flush=True)
        return 3
    print(f"serving {args.url} on http://{args.host}:{args.port} (/predict, /healthz, /metrics)", flush=True)
    _say_if_empty(args.url, args.poll_s)
    serve(args.url, args.host, args.port, args.poll_s)
    return 0


def _cannot_listen(host: str, port: int) -> str | None:
    """Why nothing can listen on ``host:port`` (in use, no such address), else None."""
    import socket

    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(where)
    except OSError as err:
        return err.strerror or str(err)
    return None


def _say_if_empty(url: str, poll_s: float) -> None:
    """A warning when the export URL holds no version yet (a job's exports may still come: not an error)."""
    import fsspec

    from downpour.serving.export import list_versions

    try:
        fs, root = fsspec.core.url_to_fs(url)
        found = list_versions(fs, root)
    except Exception as err:  # noqa: BLE001 - any fsspec backend's error; serving reports it as it polls
        print(f"downpour serve: WARNING: cannot list {url}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return
    if not found:
        print(f"downpour serve: WARNING: no exported version under {url} yet: /predict answers 503 until one appears "
              f"(polled every {poll_s:g} s; `downpour export` or a job's export.url writes them)", file=sys.stderr, flush=True)


def cmd_export(args) -> int:
    from downpour.errors import DownpourError
    from downpour.serving.export import export_all
    from downpour.storage.checkpoints import resolve_location

    try:
        versions = export_all(resolve_location(args.checkpoints), args.url, args.precision, args.full_every)
    except DownpourError as err:
        print(f"downpour export: {err}")
        return 2
    if not versions:
        from downpour.serving.export import exported_through

        print(f"nothing new to export: {args.url} holds up to checkpoint {exported_through(args.url)} already")
        return 0
    print(f"exported {len(versions)} version(s) to {args.url}: {versions[0]}..{versions[-1]}")
    return 0
