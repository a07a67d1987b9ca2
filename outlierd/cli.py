"""The ``outlierd`` console script: parses arguments and dispatches to the layers. No logic here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import MISSING, Field, fields
from typing import Any

from . import feedback_cli, health_cli, registry_cli

EXIT_ERROR = 2


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a detector on a CSV/Parquet file and publish it to a registry",
                       description="Validate the data, fit a detector, calibrate its threshold to an alert rate, "
                                   "evaluate it when labels are given, and publish it with full lineage.")
    p.add_argument("--data", metavar="FILE", help="training data: .csv, .csv.gz, .tsv, .parquet")
    p.add_argument("--events", metavar="FILE|DIR",
                   help="raw events instead of --data (with --features): replayed into features by the engine the server "
                        "runs; the model then serves raw events (ScoreRequest.arrow_events)")
    p.add_argument("--features", metavar="SPEC", help="feature spec (JSON, docs/features.md) for --events; stored in the artifact")
    p.add_argument("--registry", required=True, metavar="DIR", help="registry root directory")
    p.add_argument("--model", required=True, metavar="NAME", help="model name in the registry")
    p.add_argument("--detector", default=None,
                   choices=("iforest", "robust_z", "hbos", "knn", "lof", "autoencoder", "auto", "stacked", "hst", "rshash"),
                   help="detector (default: iforest, or auto when the labels used for training -- a partially labelled "
                        "--label-column, --labels-from-feedback -- hold at least 2 anomalies and 2 normals; the lineage "
                        "records what the default became and why; an explicit --detector iforest stays unsupervised); knn/lof: k=20 neighbours in a reference sample of up to 4096 "
                        "training rows; autoencoder needs the torch extra; auto: chosen on the labelled records out of fold "
                        "among --select's candidates: the stacked model when there are --min-labels labels of each kind "
                        "(unless the labels show with 90%% bootstrap confidence that it ranks them worse), else iforest "
                        "unless another candidate beats it with that confidence; stacked: the semi-supervised model "
                        "over the unsupervised detectors (needs --min-labels of each kind); hst: Half-Space Trees that learn while they "
                        "score (25 trees of height 15, window 250), rshash: streaming RS-Hash (100 components, window 256); both: "
                        "the artifact holds the state after learning the training rows")
    p.add_argument("--label-column", metavar="COL",
                   help="column of labels: 0/1, true/false or anomaly/normal; an empty cell = unlabelled. Every row "
                        "labelled (and no --select/--detector auto): evaluation only. Partially labelled: reviewers' "
                        "labels, used for training (known anomalies left out of the fit, metrics out of fold)")
    p.add_argument("--feature-columns", metavar="LIST",
                   help="comma-separated feature columns to train on, in order (default: every column but --label-column; "
                        "a column named like a label -- label, target, class, is_anomaly ... -- is then refused: name it "
                        "with --label-column, or list it here to keep it as a feature)")
    p.add_argument("--labels-from-feedback", action="store_true",
                   help="append the captured records of --model that reviewers labelled (the feedback store) to the "
                        "training data, with their labels")
    p.add_argument("--feedback-store", metavar="PATH", help="feedback store (default <registry>/feedback.sqlite)")
    p.add_argument("--select", metavar="LIST",
                   help="choose the detector by out-of-fold PR-AUC on the labelled records among these comma-separated "
                        "candidates: iforest, iforest_1024, robust_z, hbos, knn, lof, stacked (implies --detector auto; "
                        "default candidates of auto: iforest,iforest_1024,robust_z,hbos,knn,stacked)")
    p.add_argument("--min-labels", type=int, default=3, metavar="N",
                   help="labelled anomalies and normals (each) needed for the stacked model (default 3)")
    p.add_argument("--folds", type=int, default=5, metavar="K", help="folds of the out-of-fold evaluation (default 5)")
    p.add_argument("--alert-rate", type=float, default=0.01, metavar="R", help="share of records to flag (default 0.01)")
    p.add_argument("--alias", metavar="ALIAS", help="alias to point at the new version, e.g. champion")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    registry_cli.add_mlflow_args(p, what="also log the run (params, metrics, lineage, artifact) to MLflow and mirror the version and --alias to its Model Registry")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from outlierd.training.train import TrainSpec, run_train

    if args.mlflow_uri:  # fail before training when the extra is missing
        from outlierd.training.tracking import require_mlflow
        require_mlflow()
    # no --detector: the spec's default (auto with --select; with labels of both kinds for training, auto;
    # else iforest); an explicit --detector X with --select is refused by the spec
    # training takes labelled records as data: the CLI reads them from the feedback store
    feedback = (feedback_cli.labelled_records(args.registry, args.model, args.feedback_store)
                if args.labels_from_feedback else None)
    if (args.events is None) == (args.data is None) or (args.events is None) != (args.features is None):
        from outlierd.core.errors import InvalidInputError

        raise InvalidInputError("give --data FILE (feature vectors), or --events FILE|DIR with --features SPEC (raw events)")
    res = run_train(TrainSpec(args.events or args.data, args.registry, args.model, detector=args.detector, label_column=args.label_column,
                              alert_rate=args.alert_rate, alias=args.alias, seed=args.seed, quiet=args.quiet,
                              select=args.select, feedback=feedback, min_labels=args.min_labels, folds=args.folds,
                              feature_columns=args.feature_columns, events_spec=args.features))
    mlflow, mlflow_rc = registry_cli.train_to_mlflow(
        args, res, None if args.quiet else (lambda msg: print(f"[mlflow] {msg}", file=sys.stderr, flush=True)))
    if args.json:
        print(json.dumps({"model": args.model, "version": res.version, "path": str(res.path), "threshold": res.threshold,
                          "metrics": res.metrics, "warnings": res.warnings, **({"mlflow": mlflow} if mlflow else {})},
                         indent=2, sort_keys=True))
        return mlflow_rc
    detector = res.metrics.get("chosen") or args.detector or "iforest"
    print(f"model {args.model} version {res.version} ({detector}): {res.rows} rows x {res.n_features} features")
    print(f"  artifact   {res.path}")
    print(f"  threshold  {res.threshold:.6g} (alert rate {args.alert_rate:g}; flags {res.metrics['train_alert_rate']:.4f} of the training rows)")
    for key in ("roc_auc", "pr_auc", "precision_at_k", "precision_at_alert_rate", "recall_at_alert_rate"):
        if key in res.metrics:
            extra = f" (k={res.metrics['k']})" if key == "precision_at_k" else ""
            print(f"  {key:<24} {res.metrics[key]:.4f}{extra}")
    if "note" in res.metrics:
        print(f"  note: {res.metrics['note']}")
    if "detector_default" in res.metrics:
        print(f"  default    no --detector: {res.metrics['detector_default']} (see the lineage's detector_choice)")
    if "chosen" in res.metrics:
        sel = res.metrics.get("selection_pr_auc", {})
        print(f"  chosen     {res.metrics['chosen']}" + (" (out-of-fold PR-AUC: " + ", ".join(f"{k} {v:.3f}" for k, v in sel.items()) + ")" if sel else ""))
    if "label_eval" in res.metrics:
        print(f"  labels     {res.metrics['label_eval']}")
    for line in res.metrics.get("label_notes", []):
        print(f"  note: {line}")
    if mlflow and mlflow.get("run_id"):
        print(f"  mlflow     run {mlflow['run_id']}, model version {mlflow['model_version']} ({mlflow['uri']})")
    return mlflow_rc


def _add_score(sub: Any) -> None:
    from outlierd.core.registry import CHAMPION

    p = sub.add_parser("score", help="score a CSV/Parquet file or dataset with a registry model (streamed, or on Dask)",
                       description="Score every record of a file or directory, streamed in bounded record batches with a "
                                   "progress line on stderr; optionally write, in input order, [id], score, anomalous, "
                                   "version (and top-k explanations) to a file, batch by batch.")
    p.add_argument("--input", "--data", dest="data", required=True, metavar="FILE|DIR",
                   help="records to score: .csv, .csv.gz, .tsv, .parquet, or a directory (a Parquet dataset, or "
                        "CSV/Parquet files read in sorted order)")
    p.add_argument("--registry", required=True, metavar="DIR")
    p.add_argument("--model", required=True, metavar="NAME")
    p.add_argument("--ref", "--alias", dest="ref", default=CHAMPION, metavar="VERSION|ALIAS", help=f"version or alias (default {CHAMPION})")
    p.add_argument("--output", "--out", dest="out", metavar="FILE",
                   help="write [id], score, anomalous, version columns here (.csv, .csv.gz, .tsv or .parquet, by extension)")
    p.add_argument("--label-column", metavar="COL", help="evaluate against this 0/1 column")
    p.add_argument("--backend", default="numba", choices=("numba", "onnx", "torch", "cuda"),
                   help="scoring backend (default numba; cuda: the custom CUDA kernel, Isolation Forest only)")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"), help="cpu, cuda or auto (default auto)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--id-column", metavar="COL", help="pass this input column through, first in the output")
    p.add_argument("--explain", action="store_true",
                   help="add top1_feature, top1_contribution, ... (the features that made each record's score) to the output")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="features per explained record (default 3)")
    p.add_argument("--explain-flagged-only", action="store_true",
                   help="with --explain, explain only anomalous records (cheaper; the others get empty columns)")
    p.add_argument("--batch-rows", type=int, default=65536, metavar="N", help="records per streamed batch (default 65536)")
    p.add_argument("--dask", metavar="ADDRESS|local",
                   help="score a Parquet input partition by partition on the Dask scheduler at ADDRESS, or on a "
                        "LocalCluster started for the job ('local'); needs the dask extra")
    p.add_argument("--dask-workers", type=int, default=2, metavar="N",
                   help="with --dask local: worker processes, one thread each (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from outlierd.training.scoring import ScoreSpec, run_score

    # keep_scores=False: only the output file (and, with labels, scores + labels) -- flat memory
    res = run_score(ScoreSpec(args.data, args.registry, args.model, args.ref, out=args.out, label_column=args.label_column,
                              backend=args.backend, device=args.device, id_column=args.id_column, explain=args.explain,
                              top_k=args.top_k, explain_flagged_only=args.explain_flagged_only, batch_rows=args.batch_rows,
                              keep_scores=False, dask=args.dask, dask_workers=args.dask_workers, quiet=args.quiet))
    rate = res.rows / res.seconds if res.seconds > 0 else float("inf")
    summary = {"model": res.model, "version": res.version, "rows": res.rows, "anomalies": res.anomalies,
               "seconds": res.seconds, "records_per_s": rate, "metrics": res.metrics, "backend": res.backend, "device": res.device,
               "mode": res.mode, "explained": res.explained, "output": res.output, "setup_seconds": res.setup_seconds,
               "threshold": res.threshold, "threshold_version": res.threshold_version, "warnings": res.warnings}
    for w in res.warnings:  # the input checked against the model: stderr, and the JSON summary
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    where = f"{res.backend} on {res.device}" + (f", Dask {args.dask}" if args.dask else "")
    print(f"scored {res.rows} records with {res.model} version {res.version} ({where}) in {res.seconds * 1e3:.1f} ms "
          f"({rate:,.0f} records/s); {res.anomalies} flagged at threshold {res.threshold:.6g}"
          + (f" (threshold version {res.threshold_version})" if res.threshold_version else "")
          + (f", {res.explained} explained" if args.explain else ""))
    for key in ("roc_auc", "pr_auc", "precision_at_alert_rate", "recall_at_alert_rate"):
        if key in res.metrics:
            print(f"  {key:<24} {res.metrics[key]:.4f}")
    if args.out:
        print(f"  scores written to {args.out}")
    return 0


def _add_serve(sub: Any) -> None:
    """``serve``'s flags, one per :class:`ServeSettings` field (its docstring is the help; see
    ``outlierd.server.settings``). Every default is None here, so that ``ServeSettings.from_env``
    can tell a flag given from one left out, and take the OUTLIERD_<FIELD> variable instead."""
    from outlierd.server.settings import ServeSettings, field_docs

    p = sub.add_parser("serve", help="serve a registry model over gRPC (Score, ScoreStream, GetModelInfo)",
                       description="Serve the model an alias points at; hot-reloads when the alias moves. "
                                   "Every flag can also come from an OUTLIERD_<FLAG> environment variable.")
    docs = field_docs()
    for f in fields(ServeSettings):
        flag, kwargs = serve_argument(f, docs[f.name])
        p.add_argument(flag, **kwargs)
    p.set_defaults(func=_run_serve)


class _FirstAndMore(argparse.Action):
    """A flag given several times: the first value in ``dest``, the others in ``more_<dest>s``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is None:
            setattr(namespace, self.dest, values)
        else:
            more = f"more_{self.dest}s"
            setattr(namespace, more, [*(getattr(namespace, more, None) or []), values])


def serve_argument(f: Field, doc: str) -> tuple[str, dict[str, Any]]:
    """``(flag, add_argument keyword arguments)`` for the ServeSettings field ``f`` with docstring ``doc``."""
    meta = f.metadata
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    kwargs: dict[str, Any] = {"dest": meta.get("dest", f.name), "default": None}
    note: str | None
    shown = None if f.default is MISSING or f.default is None else f.default
    if "const" in meta:  # --no-drift, --no-capture
        kwargs.update(action="store_const", const=meta["const"])
        note = f"default {shown}; {flag} sets {meta['const']}"
    else:
        ftype = str(f.type)
        if ftype == "int":
            kwargs.update(type=int, metavar="N")
        elif ftype == "float":
            kwargs.update(type=float, metavar="S" if f.name.endswith(("_s", "_seconds")) else "R")
        elif "Path" in ftype:
            kwargs.update(metavar="PATH")  # kept a string here: from_env makes it a Path, as for OUTLIERD_*
        if meta.get("append"):  # --model A --model B: A in args.model (a string, as before), B in args.more_models
            kwargs["action"] = _FirstAndMore
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        note = meta.get("cli_note") or (None if shown is None else f"default {shown:g}" if isinstance(shown, float)
                                        else f"default {shown}")
    kwargs["help"] = (doc + (f" ({note})" if note else "")).replace("%", "%%")  # argparse formats help with %
    return flag, kwargs


def _run_serve(args: argparse.Namespace) -> int:
    from outlierd.server.auth import read_token
    from outlierd.server.settings import ServeSettings
    from outlierd.server.workers import serve

    more = getattr(args, "more_models", None)
    if more:  # --model A --model B: A is the default, B joins --models
        extra = more + ([args.models or os.environ.get("OUTLIERD_MODELS", "")] if args.models != "all" else [])
        args.models = "all" if args.models == "all" else ",".join(m for m in extra if m) or None
    if args.model is None and (args.models or os.environ.get("OUTLIERD_MODELS")) == "all":
        args.model = ""  # every model with the alias; the first in name order is the default
    for name in ("registry", "model"):  # like every flag, these two may come from the environment
        if getattr(args, name) is None and not os.environ.get(f"OUTLIERD_{name.upper()}"):
            print(f"outlierd serve: error: --{name} is required (or set OUTLIERD_{name.upper()})", file=sys.stderr)
            return 2
    overrides = {f.name: getattr(args, f.name) for f in fields(ServeSettings) if f.name != "auth_token"}
    overrides["auth_token"] = read_token(args.auth_token_file, os.environ.get("OUTLIERD_AUTH_TOKEN"))
    return serve(ServeSettings.from_env(**overrides))


def _add_demo(sub: Any) -> None:
    from . import demo

    p = sub.add_parser("demo", help="train on raw payment events, serve, stream them with injected frauds, recall per fraud kind",
                       description="End to end on 127.0.0.1, on raw card-payment events (card, merchant, category code, "
                                   "amount, place, time): replay a history through the shipped feature spec "
                                   "data/payments.features.json, train an Isolation Forest on those features and publish it "
                                   "as 'champion' with the spec in its artifact; start 'outlierd serve'; stream fresh events "
                                   "with injected frauds (impossible travel, card testing, night sprees, cash-outs) through "
                                   "ScoreStream as Arrow IPC; print recall per fraud kind, precision and throughput; stop the "
                                   "server. With --vectors: the older demo on ready-made feature vectors, with a retrain and "
                                   "a hot swap mid-stream. Ends after --records or --seconds, whichever comes first.")
    p.add_argument("--registry", metavar="DIR", help="registry to publish to (default: a temporary one, deleted at the end)")
    p.add_argument("--records", type=int, default=None, metavar="N",
                   help=f"payments to stream at most (default {EVENTS_DEMO_RECORDS:,}; with --vectors {demo.DEFAULT_RECORDS:,})")
    p.add_argument("--seconds", type=float, default=demo.DEFAULT_SECONDS, metavar="S",
                   help=f"stream for at most this long (default {demo.DEFAULT_SECONDS:g})")
    p.add_argument("--port", type=int, default=0, metavar="P", help="gRPC port on 127.0.0.1 (default 0: a free one)")
    p.add_argument("--batch", type=int, default=demo.DEFAULT_BATCH, metavar="N",
                   help=f"records per stream message (default {demo.DEFAULT_BATCH})")
    p.add_argument("--train-records", type=int, default=None, metavar="N",
                   help=f"training records (default {EVENTS_DEMO_RECORDS:,} events; with --vectors "
                        f"{demo.DEFAULT_TRAIN_RECORDS:,}, and the retrained version gets twice as many)")
    p.add_argument("--anomaly-rate", type=float, default=None, metavar="R",
                   help=f"share of streamed payments with an injected anomaly (default {EVENTS_DEMO_ANOMALY_RATE:g}: 200 fraud "
                        f"incidents per 100,000 payments; with --vectors {demo.DEFAULT_ANOMALY_RATE:g})")
    p.add_argument("--alert-rate", type=float, default=demo.DEFAULT_ALERT_RATE, metavar="R",
                   help=f"share of training records flagged: sets the threshold (default {demo.DEFAULT_ALERT_RATE:g})")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--events", action="store_true",
                      help="the demo on raw payment events (the default; kept for scripts that name it; docs/features.md)")
    kind.add_argument("--vectors", action="store_true",
                      help="the older demo on ready-made feature vectors (13 features computed by the generator), with a "
                           "retrain and a hot swap of 'champion' mid-stream")
    p.set_defaults(func=_run_demo)


# the events demo's defaults when --records / --train-records are not given (the vector demo's
# 10,000,000 and 20,000 do not fit events: the history must cover the cards, the run stay ~30 s)
EVENTS_DEMO_RECORDS = 100_000
EVENTS_DEMO_ANOMALY_RATE = 0.011


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    if not args.vectors:
        from .demo_events import run_events_demo

        res = run_events_demo(args.registry, records=_given(args.records, EVENTS_DEMO_RECORDS),
                              train_records=_given(args.train_records, EVENTS_DEMO_RECORDS), batch=args.batch,
                              seconds=args.seconds, anomaly_rate=_given(args.anomaly_rate, EVENTS_DEMO_ANOMALY_RATE),
                              alert_rate=args.alert_rate, port=args.port, seed=args.seed)
        return 0 if res.ok else 1

    summary = demo.run_demo(args.registry, records=_given(args.records, demo.DEFAULT_RECORDS), seconds=args.seconds,
                            port=args.port, batch=args.batch, train_records=_given(args.train_records, demo.DEFAULT_TRAIN_RECORDS),
                            anomaly_rate=_given(args.anomaly_rate, demo.DEFAULT_ANOMALY_RATE), alert_rate=args.alert_rate,
                            seed=args.seed)
    return 0 if summary.ok else 1


def _add_drift(sub: Any) -> None:
    from outlierd.core.registry import CHAMPION

    p = sub.add_parser("drift", help="drift and data-quality reports against a model's reference profile",
                       description="Compare data with the reference profile stored in a model's artifact.")
    dsub = p.add_subparsers(dest="drift_command", metavar="{report}", required=True)
    r = dsub.add_parser("report", help="an HTML drift report of a file against a registry model",
                        description="Score a file with a registry model and test it against the model's reference "
                                    "profile (PSI, Wasserstein and a state per feature; KS on scores; the alert rate against "
                                    "the calibrated rate); write one self-contained HTML page and optionally a JSON summary.")
    r.add_argument("--registry", required=True, metavar="DIR", help="registry root directory")
    r.add_argument("--model", required=True, metavar="NAME", help="model name in the registry")
    r.add_argument("--ref", "--alias", dest="ref", default=CHAMPION, metavar="VERSION|ALIAS",
                   help=f"version or alias (default {CHAMPION})")
    r.add_argument("--data", "--input", dest="data", required=True, metavar="FILE", help="records to test (.csv, .parquet)")
    r.add_argument("--out", required=True, metavar="FILE", help="write the HTML report here")
    r.add_argument("--json", metavar="FILE", help="also write the JSON summary here")
    r.add_argument("--top-records", type=int, default=20, metavar="N",
                   help="list the N highest-scoring records with their top 3 features (default 20; 0: none)")
    r.set_defaults(func=_run_drift)


def _run_drift(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from outlierd.core.registry import Registry
    from outlierd.monitoring.report import drift_report
    from outlierd.training.data import load_dataset

    features = [f["name"] for f in Registry(args.registry).get(args.model, args.ref)["manifest"]["features"]]
    # require_rows=0: a column that is entirely missing is drift to report, not an error
    ds = load_dataset(args.data, feature_names=features, require_rows=0)
    rep = drift_report(args.registry, args.model, replace(ds, path=args.data), args.out, ref=args.ref, json_out=args.json,
                       top_records=args.top_records)
    s = rep.summary()
    feats = s["features"]
    flagged = [f for f in feats if f["state"] != "ok"]
    print(f"drift report: {rep.model} version {rep.version} on {rep.data} ({rep.rows} rows): "
          + (f"{sum(f['state'] == 'drift' for f in feats)} drift, {sum(f['state'] == 'warn' for f in feats)} warn "
             f"of {len(feats)} features" if s["judged"] else f"not judged (fewer than {rep.config.min_records} records)"))
    for f in flagged[:10]:
        print(f"  {f['state']:<5} {f['name']:<24} PSI {f['psi']:.3f}  Wasserstein {f['wasserstein']:.3f}")
    if len(flagged) > 10:
        print(f"  ... and {len(flagged) - 10} more")
    if not flagged and feats:
        print(f"  highest PSI: {feats[0]['name']} {feats[0]['psi']:.3f}")
    expected = s["expected_alert_rate"]
    print(f"  score KS {s['score_ks']:.3f}{' (drift)' if s['score_drift'] else ''}; alert rate {s['alert_rate']:.4f}"
          + (f" vs {expected:.4f} expected (p={s['alert_rate_p']:.3g}){' shifted' if s['alert_rate_shift'] else ''}"
             if expected is not None else ""))
    why = s["alert_features"]["features"][:3]
    if why:
        print(f"  top features of the {rep.flagged} flagged records: "
              + ", ".join(f"{f['name']} {100 * f['top1_share']:.0f}%" for f in why))
    print(f"  report written to {args.out}" + (f"; summary to {args.json}" if args.json else ""))
    return 0


def _add_retrain_policy(sub: Any) -> None:
    p = sub.add_parser("retrain-policy", help="retrain on sustained drift, on a schedule or on demand; publish as 'challenger'",
                       description="Train on --data and publish the result as the 'challenger' alias (never 'champion'): "
                                   "once with --now, or in a loop when a feature of the served model has been in drift "
                                   "(state 2) for --sustained consecutive windows of --metrics-url (one scrape every "
                                   "--interval seconds is one window: match the server's --drift-pane-seconds), and/or "
                                   "every --every seconds. Every trigger and its reason go to the registry audit log. "
                                   "Exit status 1 when a trigger's training failed.")
    p.add_argument("--registry", required=True, metavar="DIR", help="registry root directory")
    p.add_argument("--model", required=True, metavar="NAME", help="model name in the registry")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="training data (.csv, .csv.gz, .tsv, .parquet), or a directory: its newest data file at each trigger")
    p.add_argument("--metrics-url", metavar="URL", help="the server's Prometheus endpoint, e.g. http://127.0.0.1:9100/metrics")
    p.add_argument("--sustained", type=int, default=3, metavar="N", help="drifted windows in a row that trigger (default 3)")
    p.add_argument("--interval", type=float, default=15.0, metavar="S", help="seconds between scrapes (default 15)")
    p.add_argument("--every", type=float, default=0.0, metavar="S", help="also retrain every S seconds (default 0: no schedule)")
    p.add_argument("--now", action="store_true", help="retrain once now (on demand) and exit")
    p.add_argument("--max-triggers", type=int, metavar="N", help="exit after N triggers")
    p.add_argument("--max-seconds", type=float, metavar="S", help="exit after S seconds")
    p.add_argument("--detector", choices=("iforest", "robust_z", "hbos", "knn", "lof", "autoencoder"),
                   help="detector (default: the champion's, from its lineage; else train's default)")
    p.add_argument("--label-column", metavar="COL",
                   help="column with 0/1 labels, passed to training (default: the champion's; see outlierd train --help)")
    p.add_argument("--alert-rate", type=float, metavar="R",
                   help="share of records to flag (default: the champion's; 0.01 without a champion)")
    p.add_argument("--feature-columns", metavar="A,B,...",
                   help="features to train on (default: the champion's features, so the challenger can serve beside it)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="also receive Alertmanager webhooks (payload version 4) here: a firing drift alert for --model "
                        "retrains (POST any path; GET /healthz)")
    p.add_argument("--alert-cooldown", type=float, default=3600.0, metavar="S",
                   help="with --listen: an alert group (its groupKey) retrains at most once per S seconds (default 3600)")
    p.add_argument("--alertname", action="append", metavar="NAME",
                   help="with --listen: alert names that retrain (repeatable; default OutlierdFeatureDrift, OutlierdAlertRateShift)")
    p.set_defaults(func=_run_retrain_policy)


def champion_training_options(registry: str, model: str) -> dict[str, Any]:
    """The training options the champion was published with (its lineage): detector, label
    column, alert rate, and its feature names as the feature columns; {} without a champion."""
    from outlierd.core.errors import ModelNotFoundError
    from outlierd.core.registry import CHAMPION, Registry

    try:
        manifest = Registry(registry).get(model, CHAMPION)["manifest"]
    except ModelNotFoundError:
        return {}
    lineage = manifest.get("lineage") or {}
    params = lineage.get("parameters") or {}
    options = {k: params[k] for k in ("detector", "label_column", "alert_rate") if params.get(k) is not None}
    if lineage.get("detector_choice") is not None:  # the champion took the default: so does its retraining
        options.pop("detector", None)
    options["feature_columns"] = [f["name"] for f in manifest["features"]]
    return options


def _run_retrain_policy(args: argparse.Namespace) -> int:
    from outlierd.monitoring.trigger import CHALLENGER, RetrainPolicy
    from outlierd.training.train import train

    # what is not given is the champion's: a challenger must serve beside it (same features, labels kept out)
    inherited = champion_training_options(args.registry, args.model)
    given = {"detector": args.detector, "label_column": args.label_column, "alert_rate": args.alert_rate,
             "feature_columns": args.feature_columns}
    kwargs = {**{"alert_rate": 0.01}, **inherited, **{k: v for k, v in given.items() if v is not None}}
    policy = RetrainPolicy(args.registry, args.model, args.data, train=train, train_kwargs=kwargs,
                           metrics_url=args.metrics_url, sustained=args.sustained, interval=args.interval, every=args.every,
                           max_triggers=args.max_triggers, max_seconds=args.max_seconds)
    if args.now:
        triggers = [policy.trigger_now()]
    elif args.listen:
        triggers = _listen(args, policy)
    else:
        with policy.handle_signals():
            triggers = policy.run()
    for t in triggers:
        print(f"{CHALLENGER}: {args.model} version {t.version} ({t.kind}: {t.reason})" if t.ok
              else f"failed: {args.model} ({t.kind}: {t.reason}): {t.error}")
    return 0 if all(t.ok for t in triggers) else 1


def _listen(args: argparse.Namespace, policy: Any) -> list:
    """``retrain-policy --listen``: the Alertmanager webhook, beside the drift / schedule loop when
    one is asked for, until SIGTERM / SIGINT or --max-seconds."""
    from outlierd.monitoring.alerts import DRIFT_ALERTS, AlertReceiver, parse_listen, serve

    host, port = parse_listen(args.listen)
    receiver = AlertReceiver(policy, cooldown_s=args.alert_cooldown, alertnames=args.alertname or DRIFT_ALERTS)
    httpd = serve(receiver, host, port)
    policy.log("listening", address=f"{host}:{httpd.server_address[1]}", cooldown=args.alert_cooldown)
    looped: list = []
    try:
        with policy.handle_signals():
            if args.metrics_url or args.every > 0:
                looped = policy.run()
            else:
                policy.wait_stopped(args.max_seconds)
    finally:
        httpd.shutdown()
        receiver.close()  # a retraining in progress finishes
    return looped + receiver.triggers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outlierd",
        description="outlierd: anomaly-detection training, registry and high-performance scoring. "
                    "Scores are higher for more anomalous records.",
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("outlierd")
    except PackageNotFoundError:
        ver = "unknown"
    parser.add_argument("--version", action="version", version=f"outlierd {ver}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_score(sub)
    _add_serve(sub)
    _add_demo(sub)
    _add_drift(sub)
    _add_retrain_policy(sub)
    registry_cli.add_parser(sub)
    __import__("outlierd.rollout_cli").rollout_cli.add_parser(sub)  # threshold, compare, promote, rollback
    feedback_cli.add_parser(sub)
    health_cli.add_parser(sub)
    __import__("outlierd.bench.cli").bench.cli.add_parser(sub)  # bench, bench compare
    __import__("outlierd.features_cli").features_cli.add_parser(sub)  # features replay
    __import__("outlierd.consume_cli").consume_cli.add_parser(sub)  # Kafka / MQTT consumers
    return parser


def terminal_safe(text: str) -> str:
    """``text`` with control characters escaped as ``repr`` does (``\\x1b``): an error message may
    quote a data file's bytes, and escape codes must not reach the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: parse, run the command, and the CLI's one error boundary: an error
    becomes ``outlierd: error: <message>`` on stderr and its exit code (OUTLIERD_DEBUG=1 re-raises
    it, with its traceback)."""
    args = build_parser().parse_args(argv)
    from outlierd.core.errors import OutlierdError

    try:
        return int(args.func(args) or 0)
    except OutlierdError as e:
        if os.environ.get("OUTLIERD_DEBUG"):
            raise
        print(f"outlierd: error: {terminal_safe(e.message)}", file=sys.stderr)
        return e.exit_code
    except (OSError, ValueError) as e:
        # OSError: a file or socket the command needs (one line: str() of an OSError is one).
        # ValueError: a library's refusal of input that no layer wrapped (pyarrow's ArrowInvalid,
        # NumPy): still one line, never a traceback. Everything the project raises on purpose is
        # an OutlierdError, above.
        if os.environ.get("OUTLIERD_DEBUG"):
            raise
        print(f"outlierd: error: {terminal_safe(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("outlierd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
