"""``outlierd feedback``: import, export and summarise reviewers' labels in the feedback store.

Public forms::

    outlierd feedback import --registry DIR --model NAME [--feedback-store PATH] FILE.csv
    outlierd feedback export --registry DIR --model NAME [--feedback-store PATH] --out FILE.csv
    outlierd feedback stats  --registry DIR --model NAME [--feedback-store PATH] [--since DURATION] [--json]
    outlierd feedback queue  --registry DIR --model NAME [--feedback-store PATH] [--since DURATION] [--limit N] [--top-k K] [--json]

``--feedback-store`` is a SQLite file or a ``postgresql://`` URL (one store for many replicas).

CSV columns: ``record_id,label[,reviewer,note]`` with a header row; labels ``anomaly``/``normal``
(also ``1``/``0``, ``true``/``false``). An import is one transaction, fsynced: every row or none.
Export writes every stored label in arrival order, in the same columns (it round-trips with import).
The store defaults to ``<registry>/feedback.sqlite``. Errors are one ``outlierd: error: ...`` line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from outlierd.core.errors import DataError, InvalidInputError, OutlierdError, StoreUnavailableError
from outlierd.core.labels import label_of
from outlierd.core.registry import CHAMPION, Registry
from outlierd.monitoring.store import LabelRow, open_store, store_exists, store_location, store_name

if TYPE_CHECKING:
    from outlierd.training.labels import LabelledRecords

EXIT_ERROR = 2
COLUMNS = ("record_id", "label", "reviewer", "note")


def add_parser(subparsers: Any) -> None:
    """Add the ``feedback`` subcommand (``import``, ``export``, ``stats``) to an argparse subparsers object."""
    fb = subparsers.add_parser("feedback", help="import, export and summarise reviewers' labels",
                               description="Labels from reviewers, joined to the predictions the server captured, "
                                           "in the feedback store (default: feedback.sqlite in the registry directory).")
    fb.set_defaults(func=run)
    sub = fb.add_subparsers(dest="feedback_command", metavar="{import,export,stats,queue}", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--registry", required=True, metavar="DIR", help="registry root directory")
        p.add_argument("--model", required=True, metavar="NAME", help="model name")
        p.add_argument("--feedback-store", metavar="PATH", help="feedback store: a SQLite file or a postgresql:// URL (default: DIR/feedback.sqlite)")

    p_imp = sub.add_parser("import", help="store labels from a CSV file (record_id,label[,reviewer,note]); all or nothing")
    common(p_imp)
    p_imp.add_argument("file", metavar="FILE.csv", help="CSV with a header: record_id,label[,reviewer,note]")
    p_exp = sub.add_parser("export", help="write every stored label to a CSV file (same columns as import)")
    common(p_exp)
    p_exp.add_argument("--out", required=True, metavar="FILE.csv", help="CSV to write ('-' for stdout)")
    p_st = sub.add_parser("stats", help="label counts, precision of alerts, estimated recall, reviewer disagreement")
    common(p_st)
    p_st.add_argument("--json", action="store_true", help="print JSON")
    p_st.add_argument("--since", type=parse_duration, metavar="DURATION",
                      help="only captures and labels of the last DURATION (e.g. 90s, 30m, 24h, 7d; a number: seconds)")
    p_q = sub.add_parser("queue", help="the review queue: captured alerts not labelled yet, newest first")
    common(p_q)
    p_q.add_argument("--since", type=parse_duration, metavar="DURATION", help="only alerts captured in the last DURATION (e.g. 24h)")
    p_q.add_argument("--limit", type=int, default=50, metavar="N", help="at most N alerts (default 50)")
    p_q.add_argument("--top-k", type=int, default=3, metavar="K", help="features explaining each alert (default 3; 0: none)")
    p_q.add_argument("--json", action="store_true", help="print JSON")


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds of ``90s``, ``30m``, ``24h``, ``7d`` or a plain number of seconds (argparse type)."""
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: give e.g. 90s, 30m, 24h, 7d or seconds")
    return value


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``outlierd feedback ...`` command; returns the exit code."""
    Registry(args.registry).aliases(args.model)  # the model must exist: catches typos before touching the store
    path = store_location(args.feedback_store, args.registry)
    if args.feedback_command == "import":
        return _import(args, path)
    if args.feedback_command == "export":
        return _export(args, path)
    if args.feedback_command == "stats":
        return _stats(args, path)
    if args.feedback_command == "queue":
        return _queue(args, path)
    raise InvalidInputError(f"unknown feedback command {args.feedback_command!r}")


def parse_label(value: str) -> str:
    """``anomaly`` or ``normal`` from anomaly/normal/1/0/true/false (any case), or ValueError."""
    label = label_of(value)
    if label is None:
        raise DataError(f"label {value!r} is not one of anomaly, normal, 1, 0, true, false")
    return label


def read_labels(file: str | os.PathLike) -> list[LabelRow]:
    """Every row of a labels CSV, validated; ValueError naming the file and line of the first bad row."""
    try:
        f = open(file, newline="", encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {file}: {e.strerror}") from e
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{file} is empty: expected a header record_id,label[,reviewer,note]")
        header = [h.strip().lower() for h in header]
        unknown = [h for h in header if h not in COLUMNS]
        if "record_id" not in header or "label" not in header or unknown or len(set(header)) != len(header):
            raise DataError(f"{file} line 1: header is {','.join(header)!r}; expected the columns record_id,label[,reviewer,note]")
        col = {h: i for i, h in enumerate(header)}
        rows: list[LabelRow] = []
        try:
            for rec in reader:
                line = reader.line_num
                if not rec or all(not c.strip() for c in rec):
                    continue  # blank line
                if len(rec) != len(header):
                    raise DataError(f"{file} line {line}: {len(rec)} fields, the header has {len(header)}")
                rid = rec[col["record_id"]].strip()
                if not rid:
                    raise DataError(f"{file} line {line}: record_id is empty")
                try:
                    label = parse_label(rec[col["label"]])
                except ValueError as e:
                    raise DataError(f"{file} line {line}: {e}") from None
                rows.append(LabelRow(rid, label, rec[col["reviewer"]] if "reviewer" in col else "",
                                     rec[col["note"]] if "note" in col else ""))
        except csv.Error as e:
            raise DataError(f"{file} line {reader.line_num}: not valid CSV: {e}") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{file}: not UTF-8 text: {e}") from e
    return rows


def _open_existing(path: Path | str):
    if not store_exists(path):
        raise StoreUnavailableError(f"no feedback store at {path} (nothing captured or imported yet; or pass --feedback-store)")
    return open_store(path)


def labelled_records(registry: str | os.PathLike, model: str,
                     feedback_store: str | os.PathLike | None = None) -> LabelledRecords:
    """The captured records of ``model`` that reviewers labelled, read from the feedback store
    (default: the registry's) as :class:`~outlierd.training.labels.LabelledRecords` for training
    (``outlierd train --labels-from-feedback``)."""
    from outlierd.training.labels import LabelledRecords

    store = store_location(feedback_store, registry)
    if not store_exists(store):
        raise DataError(f"--labels-from-feedback: no feedback store at {store} (submit labels first, or pass --feedback-store)")
    st = open_store(store)
    try:
        X, y, ids = st.labelled(model)
    finally:
        st.close()
    return LabelledRecords(X, y, tuple(ids), store_name(store))


def _import(args: argparse.Namespace, path: Path | str) -> int:
    rows = read_labels(args.file)  # every row validated before anything is written
    store = open_store(path)
    try:
        known = store.add_labels(args.model, rows)  # one transaction, fsynced
    finally:
        store.close()
    k = sum(known)
    print(f"imported {len(rows)} labels for {args.model} into {store_name(path)} ({k} for captured predictions, "
          f"{len(rows) - k} for unknown record ids)")
    return 0


def _export(args: argparse.Namespace, path: Path | str) -> int:
    store = _open_existing(path)
    try:
        labels = store.labels(args.model)
    finally:
        store.close()

    def write(f) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in labels:
            w.writerow((r.record_id, r.label, r.reviewer, r.note))

    if args.out == "-":
        write(sys.stdout)
    else:
        out = Path(args.out)
        # write beside the target, then rename: a reader never sees half a file
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                write(f)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        print(f"exported {len(labels)} labels for {args.model} to {out}")
    return 0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _stats(args: argparse.Namespace, path: Path | str) -> int:
    from outlierd.monitoring.quality import from_store

    since = None if args.since is None else time.time() - args.since
    store = _open_existing(path)
    try:
        q = from_store(store, args.model, since=since)
        why = _anomaly_features(args, store)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"model": args.model, "store": store_name(path), "since": since, **q.as_dict(), "anomaly_features": why},
                         indent=2, sort_keys=True))
        return 0
    counts = ", ".join(f"{n} {lab}" for lab, n in q.by_label.items())
    window = "" if args.since is None else f", captures and labels of the last {_duration_text(args.since)}"
    print(f"feedback for {args.model} ({store_name(path)}{window})")
    print(f"  labels          {q.labels} ({counts}) on {q.labelled_records} records; {q.unknown_records} unknown record ids")
    print(f"  captured        {q.captured_flagged} flagged, {q.captured_sampled} sampled unflagged (champion)")
    print(f"  precision       {_fmt(q.precision)} ({q.reviewed_flagged_anomalies} anomalies of {q.reviewed_flagged} reviewed flagged)")
    print(f"  recall (est.)   {_fmt(q.recall_estimate)} ({q.reviewed_sampled_anomalies} anomalies of {q.reviewed_sampled} reviewed "
          f"sampled unflagged, weighted by 1/sample rate)")
    print(f"  disagreement    {_fmt(q.disagreement)} ({q.disagreeing_records} of {q.multi_reviewer_records} records with 2+ reviewers)")
    if why["features"]:
        print("  anomalies by    " + ", ".join(f"{f['name']} {100 * f['share']:.0f}%" for f in why["features"][:5])
              + f" (top feature of {why['records']} labelled anomalies, champion version {why['version']})")
    for note in q.notes + ([why["note"]] if why["note"] else []):
        print(f"  note: {note}")
    return 0


def _anomaly_features(args: argparse.Namespace, store: Any) -> dict[str, Any]:
    """Top-1 features (the champion's ``model.explain``) of the captured records labelled anomaly;
    ``note`` says why there are none. Never fails the command: the other statistics stand alone."""
    from outlierd.monitoring.quality import anomaly_features

    out: dict[str, Any] = {"version": None, "records": 0, "features": [], "note": None}
    try:
        X, y, _ = store.labelled(args.model)
        if not (y == 1).any():
            return {**out, "note": "no captured record is labelled anomaly: nothing to explain"}
        reg = Registry(args.registry)
        version = reg.resolve(args.model, CHAMPION)
        return {**anomaly_features(reg.load(args.model, version), X, y), "note": None}
    except (OutlierdError, ValueError, NotImplementedError) as e:
        return {**out, "note": f"labelled anomalies not explained: {e}"}


def review_queue(registry: Registry, store: Any, model: str, *, since: float | None = None, limit: int = 50,
                 top_k: int = 3) -> list[dict[str, Any]]:
    """Captured alerts of ``model`` without a label, newest first: ``{"record_id", "time", "score",
    "version", "top_features": [{"name", "contribution"}]}`` (features from the version that scored
    it; none when that version cannot explain, e.g. deleted)."""
    if limit < 1 or top_k < 0:
        raise InvalidInputError(f"--limit must be >= 1 and --top-k >= 0; got {limit} and {top_k}")
    p = store.unlabelled_alerts(model, since=since, limit=limit)
    out = [{"record_id": rid, "time": float(t), "score": float(sc), "version": int(v), "top_features": []}
           for rid, t, sc, v in zip(p.record_id, p.ts, p.score, p.version)]
    if top_k:
        for v in sorted(set(p.version.tolist())):
            idx = np.flatnonzero(p.version == v)
            try:
                m = registry.load(model, int(v))
                feat, contrib = m.explain(p.X[idx].astype(np.float64), min(top_k, m.n_features))
            except (OutlierdError, ValueError, NotImplementedError, OSError):
                continue  # listed without features: the queue stands alone
            for row, i in enumerate(idx):
                out[i]["top_features"] = [{"name": m.feature_names[j], "contribution": float(c)} for j, c in zip(feat[row], contrib[row])]
    return out


def _queue(args: argparse.Namespace, path: Path | str) -> int:
    since = None if args.since is None else time.time() - args.since
    store = _open_existing(path)
    try:
        rows = review_queue(Registry(args.registry), store, args.model, since=since, limit=args.limit, top_k=args.top_k)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"model": args.model, "store": store_name(path), "alerts": rows}, indent=2))
        return 0
    print(f"{len(rows)} unlabelled alerts for {args.model} ({store_name(path)}), newest first")
    for r in rows:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["time"]))
        feats = ", ".join(f["name"] for f in r["top_features"])
        print(f"  {r['record_id']}  {when}  score {r['score']:.4f}  v{r['version']}" + (f"  {feats}" if feats else ""))
    return 0
