"""``outlierd features``: the feature engine offline.

    outlierd features replay --spec SPEC --events FILE|DIR --out FEATURES.parquet [--id-column COL]
                             [--categories-from ARTIFACT] [--json]

Every event's features as the server would have computed them when it arrived (event-time order,
point in time: an event never sees a later one), written in input order, one column per feature
in spec order (``--id-column`` first). Category frequencies are learned from the events, or taken
from a trained model's artifact (``--categories-from``) to reproduce exactly what it serves.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("features", help="the feature engine offline: replay raw events into features",
                              description="Replay raw events through the feature engine the server runs.")
    sub = p.add_subparsers(dest="features_command", metavar="ACTION", required=True)
    r = sub.add_parser("replay", help="compute every event's features (point in time) into a file",
                       description=__doc__.split("\n\n")[2] if __doc__ else None)
    r.add_argument("--spec", required=True, metavar="SPEC", help="feature spec (JSON, docs/features.md)")
    r.add_argument("--events", required=True, metavar="FILE|DIR", help="raw events: .csv, .csv.gz, .tsv, .parquet or a directory")
    r.add_argument("--out", required=True, metavar="FILE", help="features file: .parquet or .csv")
    r.add_argument("--id-column", metavar="COL", help="pass this event column through, first in the output")
    r.add_argument("--categories-from", metavar="ARTIFACT",
                   help="a model artifact directory whose learned category frequencies to use (default: learn them from --events)")
    r.add_argument("--dask", metavar="ADDRESS|local", help=argparse.SUPPRESS)
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(func=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pyarrow as pa

    from outlierd.core.errors import InvalidInputError
    from outlierd.core.features import load_features
    from outlierd.training.features import features_table, load_feature_spec, read_events, replay

    if args.dask:
        raise InvalidInputError("--dask: the replay runs in one process for now (entities would have to be partitioned "
                                "by key across workers); drop --dask")
    spec = load_feature_spec(args.spec)
    fitted = None
    if args.categories_from:
        loaded = load_features(args.categories_from)
        if loaded is None:
            raise InvalidInputError(f"--categories-from {args.categories_from}: that artifact has no features.json")
        if loaded[0].digest != spec.digest:
            raise InvalidInputError(f"--categories-from {args.categories_from}: its feature spec differs from --spec {args.spec}")
        fitted = loaded[1]
    events = read_events(args.events)
    if args.id_column and args.id_column not in events.column_names:
        raise InvalidInputError(f"--id-column {args.id_column!r} is not a column of the events")
    out = Path(args.out)
    if not out.name.lower().endswith((".parquet", ".csv")):
        raise InvalidInputError(f"--out {out}: write .parquet or .csv")
    r = replay(spec, events, fitted)
    table = features_table(r, events, [args.id_column] if args.id_column else [])
    try:
        if out.name.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            pq.write_table(table, out)
        else:
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, out)
    except (pa.ArrowException, OSError) as e:
        raise InvalidInputError(f"cannot write {out}: {e}") from e
    rate = events.num_rows / r.seconds if r.seconds > 0 else float("inf")
    summary = {"events": events.num_rows, "features": spec.output_names, "seconds": r.seconds, "events_per_s": rate,
               "output": str(out), **{f"state_{k}": v for k, v in r.stats.items()}}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"replayed {events.num_rows} events into {len(spec.output_names)} features in {r.seconds:.2f} s "
              f"({rate:,.0f} events/s, {r.stats['entities']} entities); written to {out}")
    return 0
