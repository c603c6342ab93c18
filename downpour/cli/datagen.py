"""``downpour datagen``: write synthetic training data.

    downpour datagen criteo --out DIR|URL [--rows N] [--seed S] [--test-fraction F] [--files K]

writes ``train-*.tsv`` and ``test-*.tsv`` in the Criteo format, ``test-truth.npy``
(the true click probability of each test row) and ``criteo.json`` (counts, the
optimum test AUC and log loss, the generator's parameters); see docs/ctr-data.md.
"""

from __future__ import annotations

import argparse
import sys
import time


def _count(text: str) -> int:
    """A row count: 3000000, 3_000_000 or 3e6."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def add_datagen_parser(sub) -> None:
    """The ``datagen`` command and its generators, on the main parser's subcommands. Flags
    left out take the generator's calibrated defaults (downpour.data.criteo_gen.CriteoSpec),
    which are not imported here: building the parser must not import torch."""
    d = sub.add_parser("datagen", help="write synthetic training data (with its known optimum)")
    gens = d.add_subparsers(dest="generator", required=True)
    c = gens.add_parser("criteo", help="click logs in the Criteo display-ads format, from a known logistic model")
    c.add_argument("--out", help="folder or fsspec URL to write to")
    c.add_argument(
        "--stream", help="instead of files: append events to this stream (redis://HOST:PORT/DB?stream=NAME&partitions=P or a file)")
    c.add_argument("--rate", type=float, default=0.0, help="--stream: events per second (default 0: as fast as possible)")
    c.add_argument("--events", type=_count, default=100_000, help="--stream: events to append (default 100000)")
    c.add_argument("--drift-every", type=_count, help="--stream: the hidden model changes every this many events (concept drift)")
    c.add_argument("--end-marker", action="store_true", help="--stream: end every partition with an end marker (the job stops there)")
    c.add_argument("--rows", type=_count, help="rows in all, train and test: 3000000, 3_000_000 or 3e6 (default 3e6)")
    c.add_argument("--seed", type=int, help="the rows and the hidden model depend only on the seed and --rows (default 0)")
    c.add_argument("--test-fraction", type=float, help="share of the rows in the test split (default 0.1)")
    c.add_argument("--files", type=int, help="files per split (default 4)")
    c.add_argument("--ctr", type=float, help="mean click rate (default 0.25)")
    c.add_argument("--overwrite", action="store_true", help="--out holds a data set already: remove its files first")
    c.set_defaults(fn=cmd_datagen_criteo)


def cmd_datagen_criteo(args) -> int:
    if args.stream:
        return _to_stream(args)
    if not args.out:
        print("downpour datagen criteo: give --out (files) or --stream (events)")
        return 2
    from downpour.data.criteo_gen import CriteoSpec, generate

    given = {"rows": args.rows, "seed": args.seed, "test_fraction": args.test_fraction, "files": args.files, "ctr": args.ctr}
    spec = CriteoSpec(**{k: v for k, v in given.items() if v is not None})
    start = time.monotonic()
    try:
        meta = generate(spec, args.out, overwrite=args.overwrite)
    except OSError as err:
        print(f"downpour datagen criteo: cannot write to {args.out}: {err}", file=sys.stderr)
        return 2
    opt = meta["optimum"]
    print(
        f"wrote {meta['rows']['train']:,} training and {meta['rows']['test']:,} test rows to {args.out} "
        f"in {time.monotonic() - start:.1f}s; click rate {meta['ctr']['train']:.3f}"
    )
    if opt is not None:
        print(f"optimum on the test split: AUC {opt['test_auc']:.4f}, log loss {opt['test_logloss']:.4f} (criteo.json)")
    return 0


def _to_stream(args) -> int:
    from downpour.errors import DownpourError
    from downpour.stream import open_source
    from downpour.stream.generator import stream_events

    try:
        source = open_source(args.stream)
        if hasattr(source, "create"):
            source.create()
        got = stream_events(source, args.events, args.rate, args.seed or 0, args.drift_every, args.end_marker)
    except DownpourError as err:
        print(f"downpour datagen criteo: {err}")
        return 2
    print(f"appended {got['events']:,} events to {args.stream} in {got['seconds']:.1f}s "
          f"({got['events'] / max(got['seconds'], 1e-9):,.0f}/s; {got['phases']} phase(s) of the hidden model)")
    return 0
