"""``outlierd threshold|compare|promote|rollback``: thresholds from live traffic, champion vs challenger.

Forms::

    outlierd threshold calibrate --registry DIR --model NAME [--version V | --alias A] (--alert-rate R | --precision P)
                                 [--feedback-store PATH] [--dry-run] [--json]
    outlierd threshold list      --registry DIR --model NAME [--version V | --alias A] [--json]
    outlierd compare  --registry DIR --model NAME [--feedback-store PATH] [--json]
    outlierd promote  --registry DIR --model NAME [--gates FILE.json] [--min-records N] [--min-agreement A] [--min-jaccard J]
                      [--min-labelled N] [--min-precision-gain G] [--max-latency-ratio L] [--force]
                      [--feedback-store PATH] [--json]
    outlierd rollback --registry DIR --model NAME [--json]

Errors are one ``outlierd: error: ...`` line on stderr and exit code 2 (raised to ``outlierd.cli.main``);
``promote`` exits 1 when a gate fails (and says which).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from outlierd.core.errors import InvalidInputError
from outlierd.core.registry import CHAMPION

EXIT_GATES_FAILED = 1
GATE_FLAGS = ("min_records", "min_agreement", "min_jaccard", "min_labelled", "min_precision_gain", "max_latency_ratio")


OFF = "off"


def _gate_value(text: str) -> float | str:
    """A gate flag's value: a number, or ``off`` to switch the gate off."""
    if text.strip().lower() in ("off", "none", "null"):
        return OFF
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off'; got {text!r}") from None


def add_parser(subparsers: Any) -> None:
    """Add ``threshold``, ``compare``, ``promote`` and ``rollback`` to an argparse subparsers object."""
    from outlierd.monitoring.promotion import DEFAULT_GATES

    def common(p: argparse.ArgumentParser, store: bool = True) -> None:
        # as in the issue's forms (`outlierd promote --model NAME`), the registry may come from the
        # environment, like `outlierd serve`'s: OUTLIERD_REGISTRY (and OUTLIERD_MODEL)
        for flag, var, meta, what in (("--registry", "OUTLIERD_REGISTRY", "DIR", "registry root directory"),
                                      ("--model", "OUTLIERD_MODEL", "NAME", "model name")):
            env = os.environ.get(var) or None
            p.add_argument(flag, required=env is None, default=env, metavar=meta, help=f"{what} (default ${var})")
        if store:
            p.add_argument("--feedback-store", metavar="PATH", help="feedback store (default: <registry>/feedback.sqlite)")
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    th = subparsers.add_parser("threshold", help="threshold versions: calibrate from live traffic and labels, list",
                               description="A model version's threshold can be re-calibrated without a new artifact: each "
                                           "calibration is published as a threshold version (1, 2, 3 ...) beside the "
                                           "immutable artifact (whose own threshold is version 0); serving workers pick it "
                                           "up within a second, without reloading the model.")
    tsub = th.add_subparsers(dest="threshold_command", metavar="{calibrate,list,use}", required=True)
    cal = tsub.add_parser("calibrate", help="compute a threshold from captured scores / labels and publish it",
                          description="--alert-rate R: the threshold flagging a share R of the captured live traffic "
                                      "(sampled captures weighted by their inverse sample rate). --precision P: the lowest "
                                      "threshold whose precision among labelled records is at least P.")
    common(cal)
    ref = cal.add_mutually_exclusive_group()
    ref.add_argument("--version", metavar="V", help="model version number")
    ref.add_argument("--alias", metavar="A", help="alias (default champion)")
    target = cal.add_mutually_exclusive_group(required=True)
    target.add_argument("--alert-rate", type=float, metavar="R", help="share of live records to flag, in (0, 1)")
    target.add_argument("--precision", type=float, metavar="P", help="precision target among labelled records, in (0, 1]")
    cal.add_argument("--dry-run", action="store_true", help="compute and print, publish nothing")
    cal.add_argument("--force", action="store_true",
                     help="publish even a threshold whose estimated alert rate is far above the current one")
    cal.set_defaults(func=_run_calibrate)

    use = tsub.add_parser("use", help="go back to an earlier threshold version (published again as the newest)",
                          description="Publish the value of threshold version N (0: the artifact's own) of a model version "
                                      "as its next threshold version: serving workers pick it up within a second.")
    common(use, store=False)
    ref = use.add_mutually_exclusive_group()
    ref.add_argument("--version", metavar="V", help="model version number")
    ref.add_argument("--alias", metavar="A", help="alias (default champion)")
    use.add_argument("threshold_version", type=int, metavar="N", help="the threshold version to use again")
    use.set_defaults(func=_run_use)

    ls = tsub.add_parser("list", help="the threshold versions of a model version")
    common(ls, store=False)
    ref = ls.add_mutually_exclusive_group()
    ref.add_argument("--version", metavar="V", help="model version number")
    ref.add_argument("--alias", metavar="A", help="alias (default champion)")
    ls.set_defaults(func=_run_list)

    cmp = subparsers.add_parser("compare", help="champion vs challenger on captured traffic",
                                description="Alert rates, agreement of the alert sets, rank correlation of scores, precision on "
                                            "labelled records and latency of 'champion' vs 'challenger', from the captures of "
                                            "a server run with --rollout shadow (or split).")
    common(cmp)
    cmp.set_defaults(func=_run_compare)

    d = DEFAULT_GATES
    pro = subparsers.add_parser("promote", help="move 'champion' to the challenger's version if the gates pass",
                                description="Compare champion and challenger on captured traffic and move 'champion' to the "
                                            "challenger's version only when every gate passes; otherwise list the failed "
                                            "gates and exit 1. Every attempt is audited. A gate set to 'off' is skipped.")
    common(pro)
    pro.add_argument("--gates", metavar="FILE.json", help="gates as a JSON object (keys: " + ", ".join(GATE_FLAGS) + "); flags override it")
    pro.add_argument("--min-records", type=_gate_value, metavar="N", help=f"challenger records captured at least (default {d.min_records})")
    pro.add_argument("--min-agreement", type=_gate_value, metavar="A",
                     help=f"share of records flagged alike at least (default {d.min_agreement}; needs shadow captures)")
    pro.add_argument("--min-jaccard", type=_gate_value, metavar="J",
                     help=f"overlap of the two roles' alerts (Jaccard of the flagged ids) at least (default {d.min_jaccard}; "
                          "needs shadow captures)")
    pro.add_argument("--min-labelled", type=_gate_value, metavar="N",
                     help=f"labelled flagged records per role at least (default {d.min_labelled})")
    pro.add_argument("--min-precision-gain", type=_gate_value, metavar="G",
                     help=f"challenger minus champion precision on labels at least (default {d.min_precision_gain})")
    pro.add_argument("--max-latency-ratio", type=_gate_value, metavar="L",
                     help=f"challenger / champion mean latency at most (default {d.max_latency_ratio})")
    pro.add_argument("--force", action="store_true", help="promote whatever the gates say (audited as forced)")
    pro.set_defaults(func=_run_promote)

    rb = subparsers.add_parser("rollback", help="return 'champion' to the previous champion version",
                               description="Move 'champion' back to the version it pointed at before its last move "
                                           "(from the audit log); audited. Repeated rollbacks walk further back.")
    common(rb, store=False)
    rb.set_defaults(func=_run_rollback)


def _open_store(args: argparse.Namespace):
    from outlierd.monitoring.store import open_store, store_exists, store_location

    path = store_location(args.feedback_store, args.registry)
    if not store_exists(path):
        raise InvalidInputError(f"no feedback store at {path}: nothing captured yet (serve with capture on, or pass --feedback-store)")
    return path, open_store(path)


def _registry(args: argparse.Namespace):
    from outlierd.core.registry import Registry

    if not Path(args.registry).is_dir():
        raise InvalidInputError(f"registry {args.registry} does not exist")
    return Registry(args.registry)


def _ref(args: argparse.Namespace) -> str:
    return args.version if args.version is not None else (args.alias or CHAMPION)


def _run_calibrate(args: argparse.Namespace) -> int:
    from outlierd.monitoring.recalibration import calibrate, publish

    reg = _registry(args)
    path, store = _open_store(args)
    try:
        cal = calibrate(reg, store, args.model, _ref(args), alert_rate=args.alert_rate, precision=args.precision)
    finally:
        store.close()
    if cal.refused is not None and not args.force and not args.dry_run:
        raise InvalidInputError(f"threshold {cal.threshold:.6g} not published: {cal.refused} (--dry-run shows it all)")
    if not args.dry_run:
        publish(reg, cal, path)
    if args.json:
        print(json.dumps({**asdict(cal), "published": not args.dry_run}, indent=2, sort_keys=True))
        return 0
    what = f"alert rate {cal.target:g}" if cal.method == "alert_rate" else f"precision {cal.target:g}"
    print(f"{cal.model} version {cal.version}: threshold {cal.threshold:.6g} for {what} "
          f"(was {cal.previous:.6g}, threshold version {cal.previous_threshold_version})")
    if cal.estimated_alert_rate is not None:
        print(f"  estimated alert rate on captured traffic {cal.estimated_alert_rate:.4f}")
    if cal.current_alert_rate is not None:
        print(f"  estimated alert rate at the threshold in force {cal.current_alert_rate:.4f}")
    if cal.precision is not None:
        ci = f", 90% interval {cal.precision_ci[0]:.3f}-{cal.precision_ci[1]:.3f}" if cal.precision_ci else ""
        print(f"  estimated precision {cal.precision:.4f}{ci} ({cal.flagged_labelled} of {cal.labelled} labelled records at "
              "or above, weighted by their chance to be captured and labelled)")
    if cal.refused is not None:
        print(f"  refused unless --force: {cal.refused}")
    print(f"  from {cal.records} captured records ({cal.sampled} sampled)")
    for note in cal.notes:
        print(f"  note: {note}")
    print("  dry run: nothing published" if args.dry_run else f"  published as threshold version {cal.threshold_version}")
    return 0


def _run_use(args: argparse.Namespace) -> int:
    reg = _registry(args)
    version = reg.resolve(args.model, _ref(args))
    own = float(reg.get(args.model, version)["manifest"]["threshold"])
    values = {0: own, **{int(r["threshold_version"]): float(r["threshold"]) for r in reg.thresholds(args.model, version)}}
    if args.threshold_version not in values:
        raise InvalidInputError(f"{args.model} version {version} has no threshold version {args.threshold_version}; it has "
                                f"{', '.join(map(str, sorted(values)))} (outlierd threshold list)")
    value = values[args.threshold_version]
    n = reg.publish_threshold(args.model, version, value, {"method": "use", "from_threshold_version": args.threshold_version,
                                                           "tool": "outlierd threshold use"})
    if args.json:
        print(json.dumps({"model": args.model, "version": version, "threshold": value, "threshold_version": n,
                          "from_threshold_version": args.threshold_version}, indent=2, sort_keys=True))
        return 0
    print(f"{args.model} version {version}: threshold {value:.6g} (threshold version {args.threshold_version}) published again "
          f"as threshold version {n}")
    return 0


def _run_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    version = reg.resolve(args.model, _ref(args))
    own = float(reg.get(args.model, version)["manifest"]["threshold"])
    rows = [{"threshold_version": 0, "threshold": own, "method": "artifact", "time": None}] + reg.thresholds(args.model, version)
    current = reg.threshold(args.model, version)[1]
    if args.json:
        print(json.dumps({"model": args.model, "version": version, "in_force": current, "thresholds": rows}, indent=2, sort_keys=True))
        return 0
    print(f"{args.model} version {version}: threshold versions (* in force)")
    for r in rows:
        mark = "*" if r["threshold_version"] == current else " "
        target = f" target {r['target']:g}" if isinstance(r.get("target"), (int, float)) else ""
        print(f" {mark}{r['threshold_version']:>4}  {r['threshold']:<12.6g} {r.get('method', ''):<11}{target:<16} "
              f"{r.get('time') or ''} {r.get('by', '')}".rstrip())
    return 0


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def _print_comparison(c) -> None:
    a, b = c.champion, c.challenger
    print(f"{c.model}: champion version {a.version} vs challenger version {b.version}")
    print(f"  {'':<22}{'champion':>12}{'challenger':>12}")
    for label, x, y, spec in (("records captured", a.records, b.records, "d"), ("flagged", a.flagged, b.flagged, "d"),
                              ("alert rate (est.)", a.alert_rate, b.alert_rate, ".4f"),
                              ("labelled flagged", a.labelled_flagged, b.labelled_flagged, "d"),
                              ("precision", a.precision, b.precision, ".4f"),
                              ("latency mean (us)", a.latency_mean_us, b.latency_mean_us, ".2f"),
                              ("latency p99 (us)", a.latency_p99_us, b.latency_p99_us, ".2f")):
        print(f"  {label:<22}{_fmt(x, spec):>12}{_fmt(y, spec):>12}")
    print(f"  alert rate diff {_fmt(c.alert_rate_diff, '+.4f')}; agreement {_fmt(c.agreement)} "
          f"(joined {c.joined} records: {_fmt(c.agreement_joined)}); Jaccard of alerts {_fmt(c.jaccard)}; "
          f"Spearman {_fmt(c.spearman)}; precision gain {_fmt(c.precision_gain, '+.4f')}; latency ratio {_fmt(c.latency_ratio, '.3f')}")
    for note in c.notes:
        print(f"  note: {note}")


def _run_compare(args: argparse.Namespace) -> int:
    from outlierd.monitoring.promotion import compare

    reg = _registry(args)
    _, store = _open_store(args)
    try:
        c = compare(reg, store, args.model)
    finally:
        store.close()
    if args.json:
        print(json.dumps(c.to_dict(), indent=2, sort_keys=True))
    else:
        _print_comparison(c)
    return 0


def _run_promote(args: argparse.Namespace) -> int:
    from outlierd.monitoring.promotion import DEFAULT_GATES, Gates, promote

    gates = Gates.from_json(args.gates) if args.gates else DEFAULT_GATES
    flags = {k: (None if getattr(args, k) == OFF else getattr(args, k)) for k in GATE_FLAGS if getattr(args, k) is not None}
    gates = replace(gates, **{k: (int(v) if k in ("min_records", "min_labelled") and v is not None else v)
                              for k, v in flags.items()}).validated()
    reg = _registry(args)
    _, store = _open_store(args)
    try:
        res = promote(reg, store, args.model, gates, force=args.force)
    finally:
        store.close()
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, sort_keys=True))
    else:
        if res.comparison is not None:
            _print_comparison(res.comparison)
        for g in res.gates:
            print(f"  gate {g.name:<20} {'pass' if g.passed else 'FAIL'}  {g.reason}")
        if res.error:
            print(f"  no comparison: {res.error}")
        if res.promoted:
            print(f"promoted: champion of {res.model} is now version {res.to_version} (was {res.from_version})"
                  + (" -- forced, gates skipped" if res.forced else ""))
        else:
            print(f"not promoted: gates failed: {', '.join(g.name for g in res.failed)}; champion stays version {res.from_version}")
    return 0 if res.promoted else EXIT_GATES_FAILED


def _run_rollback(args: argparse.Namespace) -> int:
    from outlierd.monitoring.promotion import rollback

    reg = _registry(args)
    old, new = rollback(reg, args.model)
    if args.json:
        print(json.dumps({"model": args.model, "from_version": old, "to_version": new}, sort_keys=True))
    else:
        print(f"rolled back: champion of {args.model} is now version {new} (was {old})")
    return 0
