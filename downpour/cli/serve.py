"""``downpour serve`` and ``downpour export``: serving a model from its exports.

    downpour serve EXPORT_URL [--host 127.0.0.1] [--port 8080] [--poll-s 0.5]
    downpour export RUN_DIR_OR_CHECKPOINT_URL EXPORT_URL [--precision float32|float16|int8] [--full-every 20]
"""

from __future__ import annotations


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="answer predictions over HTTP from an export, following its new versions")
    s.add_argument("url", help="the export's folder or fsspec URL (a job's export.url)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
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
    print(f"serving {args.url} on http://{args.host}:{args.port} (/predict, /healthz, /metrics)", flush=True)
    serve(args.url, args.host, args.port, args.poll_s)
    return 0


def cmd_export(args) -> int:
    from downpour.errors import DownpourError
    from downpour.serving.export import export_all
    from downpour.storage.checkpoints import resolve_location

    try:
        versions = export_all(resolve_location(args.checkpoints), args.url, args.precision, args.full_every)
    except DownpourError as err:
        print(f"downpour export: {err}")
        return 2
    print(f"exported {len(versions)} version(s) to {args.url}" + (f": {versions[0]}..{versions[-1]}" if versions else ""))
    return 0
