"""``outlierd registry``: list, show and alias model versions in a directory registry.

Public forms (used by tools outside the project; keep them stable)::

    outlierd registry list  --registry DIR --model NAME [--json]
    outlierd registry show  --registry DIR --model NAME (VERSION|ALIAS) [--json]
    outlierd registry alias --registry DIR --model NAME ALIAS VERSION [--force]

Extensions (optional extra ``outlierd[mlflow]``)::

    outlierd registry alias  ... [--mlflow-uri URI [--mlflow-experiment NAME]]
    outlierd registry mirror --registry DIR --model NAME --mlflow-uri URI [--mlflow-experiment NAME] [--json]

The embedded registry stays the source the servers read; MLflow is a view of it. An alias move is
made in the registry first and then mirrored: when the mirror fails the move stands, and the
command says so and exits 1 (``registry mirror`` finishes the job later).

Errors are one ``outlierd: error: ...`` line on stderr and exit code 2 (bad input, nothing done) or
1 (the registry changed but MLflow could not be updated).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from outlierd.core.errors import InvalidInputError
from outlierd.core.registry import Registry

EXIT_ERROR = 2
EXIT_NOT_MIRRORED = 1


def add_parser(subparsers: Any) -> None:
    """Add the ``registry`` subcommand (``list``, ``show``, ``alias``) to an argparse subparsers object."""
    reg = subparsers.add_parser(
        "registry",
        help="list, show and alias model versions in a registry",
        description="Inspect a directory registry and move its aliases.",
    )
    reg.set_defaults(func=run)
    sub = reg.add_subparsers(dest="registry_command", metavar="{list,show,alias,mirror,snapshot}", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--registry", required=True, metavar="DIR", help="registry root directory")
        p.add_argument("--model", required=True, metavar="NAME", help="model name")

    p_snap = sub.add_parser("snapshot", help="publish a streaming model's checkpointed state as a new version",
                            description="Take the checkpoint that a server wrote for a streaming model (serve "
                                        "--checkpoint-dir) and publish that learned state as the next version, so a "
                                        "drifting stream can be frozen, compared and rolled back.")
    common(p_snap)
    p_snap.add_argument("--checkpoint-dir", required=True, metavar="DIR", help="the server's --checkpoint-dir")
    p_snap.add_argument("--version", default="champion", metavar="VERSION|ALIAS",
                        help="the served version whose checkpoint to publish (default champion)")
    p_snap.add_argument("--alias", metavar="ALIAS", help="alias to point at the new version")

    p_list = sub.add_parser("list", help="list a model's versions, oldest first")
    common(p_list)
    p_list.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    p_show = sub.add_parser("show", help="show one version (by number or alias)")
    common(p_show)
    p_show.add_argument("ref", metavar="VERSION|ALIAS", help="version number or alias name")
    p_show.add_argument("--json", action="store_true", help="print JSON (including the full manifest)")

    p_alias = sub.add_parser("alias", help="point an alias (e.g. champion) at a version")
    common(p_alias)
    p_alias.add_argument("alias", metavar="ALIAS", help="alias name, e.g. champion or challenger")
    p_alias.add_argument("version", metavar="VERSION", help="version number (or an existing alias)")
    p_alias.add_argument("--force", action="store_true",
                         help="move the alias even when the version fails verification (checksums, probe scores); "
                              "the move and the failure are recorded in the audit log")
    add_mlflow_args(p_alias, what="also set the alias on the MLflow registered model (mirroring the version when missing)")

    p_mirror = sub.add_parser("mirror", help="mirror every version and alias of a model to the MLflow Model Registry",
                              description="Create the MLflow registered model, a run holding each version's artifact "
                                          "and a model version per outlierd version when missing (found again by the "
                                          "tag outlierd.version), then set every alias as in the registry. "
                                          "Idempotent: run it again after a failure.")
    common(p_mirror)
    add_mlflow_args(p_mirror, what="MLflow tracking / registry URI, e.g. http://mlflow:5000 or sqlite:///mlflow.db",
                    required=True)
    p_mirror.add_argument("--json", action="store_true", help="print what was mirrored as JSON")


def add_mlflow_args(p: argparse.ArgumentParser, *, what: str, required: bool = False) -> None:
    """Add ``--mlflow-uri`` and ``--mlflow-experiment`` (used by ``train`` and ``registry``)."""
    from outlierd.training.tracking import DEFAULT_EXPERIMENT

    p.add_argument("--mlflow-uri", required=required, metavar="URI",
                   help=f"{what} (needs the mlflow extra; the server is retried per MLFLOW_HTTP_REQUEST_MAX_RETRIES)")
    p.add_argument("--mlflow-experiment", default=DEFAULT_EXPERIMENT, metavar="NAME",
                   help=f"MLflow experiment for runs (created when missing; default {DEFAULT_EXPERIMENT})")


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``outlierd registry ...`` command; returns the exit code."""
    registry = Registry(args.registry)
    if args.registry_command == "list":
        return _list(registry, args)
    if args.registry_command == "show":
        return _show(registry, args)
    if args.registry_command == "alias":
        return _alias(registry, args)
    if args.registry_command == "mirror":
        return _mirror(registry, args)
    if args.registry_command == "snapshot":
        return _snapshot(registry, args)
    raise InvalidInputError(f"unknown registry command {args.registry_command!r}")


def _snapshot(registry: Registry, args: argparse.Namespace) -> int:
    import shutil

    from outlierd.core.snapshot import snapshot_artifact

    version = registry.resolve(args.model, args.version)
    art, meta = snapshot_artifact(registry.path(args.model, version), args.checkpoint_dir, args.model, version)
    try:
        new = registry.publish(args.model, art, aliases=(args.alias,) if args.alias else ())
    finally:
        shutil.rmtree(art.parent, ignore_errors=True)
    print(f"published {args.model} version {new}: the state of version {version} at stream position {meta['position']}"
          + (f" ({args.alias})" if args.alias else ""))
    return 0


def _message(e: BaseException) -> str:
    # LookupError subclasses (ModelNotFoundError) would otherwise be shown through repr().
    return str(e.args[0]) if len(e.args) == 1 else str(e)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for k, v in sorted(metrics.items()):
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts) or "-"


def _list(registry: Registry, args: argparse.Namespace) -> int:
    versions = registry.versions(args.model)
    if args.json:
        _print_json(versions)
        return 0
    rows = [
        (
            str(v["version"]),
            ",".join(v["aliases"]) or "-",
            v["created"] or "-",
            v["detector"] or ("(corrupt)" if v.get("error") else "-"),
            _fmt_metrics(v["metrics"]),
        )
        for v in versions
    ]
    header = ("VERSION", "ALIASES", "CREATED", "DETECTOR", "METRICS")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
    return 0


def _show(registry: Registry, args: argparse.Namespace) -> int:
    info = registry.get(args.model, args.ref)
    if args.json:
        _print_json(info)
        return 0
    m = info["manifest"]
    features = [f.get("name") for f in m.get("features", [])]
    lines = [
        f"model:      {info['model']}",
        f"version:    {info['version']}",
        f"aliases:    {', '.join(info['aliases']) or '-'}",
        f"created:    {info['created'] or '-'}",
        f"detector:   {info['detector']} {json.dumps((m.get('detector') or {}).get('params', {}), sort_keys=True)}",
        f"threshold:  {info['threshold']}",
        f"features:   {len(features)} ({', '.join(map(str, features[:8]))}{', …' if len(features) > 8 else ''})",
        f"metrics:    {_fmt_metrics(info['metrics'])}",
        f"lineage:    {json.dumps(m.get('lineage') or {}, sort_keys=True)}",
        f"path:       {info['path']}",
    ]
    print("\n".join(lines))
    return 0


def _alias(registry: Registry, args: argparse.Namespace) -> int:
    if getattr(args, "mlflow_uri", None):
        from outlierd.training.tracking import require_mlflow

        require_mlflow()  # before the move: a missing extra is bad input, nothing done
    try:
        previous: int | None = registry.aliases(args.model).get(args.alias)
    except ValueError:
        previous = None  # an invalid alias name is reported by set_alias below
    # verified first: a worker that restarts must find a version it can serve behind the alias
    version = registry.set_alias(args.model, args.alias, args.version, verify=True, force=args.force)
    was = f" (was {previous})" if previous is not None and previous != version else ""
    print(f"{args.model}: {args.alias} -> {version}{was}")
    if not getattr(args, "mlflow_uri", None):
        return 0
    from outlierd.training.tracking import MirrorError, mirror_alias

    try:
        mv = mirror_alias(args.mlflow_uri, registry, args.model, args.alias, experiment=args.mlflow_experiment)
    except MirrorError as e:
        return not_mirrored(f"alias {args.alias!r} of {args.model} was moved to version {version} in {registry.root}",
                            e, args.registry, args.model, args.mlflow_uri, args.mlflow_experiment)
    print(f"  mlflow: {args.model} alias {args.alias} -> MLflow version {mv.mlflow_version}"
          f"{' (created)' if mv.created else ''} at {args.mlflow_uri}")
    return 0


def not_mirrored(done: str, error: BaseException, registry: str, model: str, uri: str, experiment: str | None) -> int:
    """Say that ``done`` stands in the registry but MLflow was not updated, and how to retry; returns 1."""
    from outlierd.training.tracking import retry_hint

    print(f"outlierd: error: {done} but not mirrored to MLflow ({_message(error)}); "
          f"retry with: {retry_hint(registry, model, uri, experiment)}", file=sys.stderr)
    return EXIT_NOT_MIRRORED


def _mirror(registry: Registry, args: argparse.Namespace) -> int:
    from outlierd.training.tracking import MirrorError, mirror_model, require_mlflow

    require_mlflow()
    registry.versions(args.model)  # an unknown model is bad input (exit 2), not an MLflow failure
    try:
        rep = mirror_model(args.mlflow_uri, registry, args.model, experiment=args.mlflow_experiment)
    except MirrorError as e:
        print(f"outlierd: error: mirroring {args.model} from {registry.root} to MLflow failed part-way "
              f"({_message(e)}); the registry is unchanged; run the same command again to finish", file=sys.stderr)
        return EXIT_NOT_MIRRORED
    if args.json:
        _print_json({
            "model": rep.model, "mlflow_uri": args.mlflow_uri,
            "versions": [{"version": v.version, "mlflow_version": v.mlflow_version, "run_id": v.run_id,
                          "created": v.created} for v in rep.versions],
            "aliases": rep.aliases, "removed_aliases": rep.removed_aliases,
            "skipped": {str(k): v for k, v in rep.skipped.items()},
        })
    else:
        created = sum(v.created for v in rep.versions)
        print(f"{rep.model}: {len(rep.versions)} version(s) in MLflow at {args.mlflow_uri} ({created} created)")
        for v in rep.versions:
            print(f"  version {v.version} -> MLflow version {v.mlflow_version}{' (created)' if v.created else ''}")
        for alias, number in sorted(rep.aliases.items()):
            print(f"  alias {alias} -> version {number}")
        for alias in rep.removed_aliases:
            print(f"  alias {alias} removed (not in the registry)")
        for number, why in sorted(rep.skipped.items()):
            print(f"  version {number} skipped: {why}")
    return EXIT_NOT_MIRRORED if rep.skipped else 0


def train_to_mlflow(args: argparse.Namespace, result: Any, progress: Any = None) -> tuple[dict[str, Any] | None, int]:
    """After ``outlierd train`` published ``result``: log the MLflow run, mirror the version (and the
    alias when ``--alias`` was given). Returns (what to add to the JSON output, exit code); without
    ``--mlflow-uri`` it does nothing. A failure is reported here (the version stays published)."""
    uri = getattr(args, "mlflow_uri", None)
    if not uri:
        return None, 0
    from outlierd.training.tracking import MirrorError, log_version_run, mirror_alias, mirror_version

    info: dict[str, Any] = {"uri": uri, "experiment": args.mlflow_experiment, "run_id": None, "model_version": None}
    say = progress or (lambda _msg: None)
    try:
        say(f"logging the MLflow run to {uri} (experiment {args.mlflow_experiment})")
        info["run_id"] = log_version_run(uri, args.registry, args.model, result.version, experiment=args.mlflow_experiment)
        if args.alias:
            mv = mirror_alias(uri, args.registry, args.model, args.alias, experiment=args.mlflow_experiment,
                              run_id=info["run_id"])
        else:
            mv = mirror_version(uri, args.registry, args.model, result.version, run_id=info["run_id"],
                                experiment=args.mlflow_experiment)
        info["model_version"] = mv.mlflow_version
    except MirrorError as e:
        info["error"] = _message(e)
        return info, not_mirrored(f"{args.model} version {result.version} was published to {args.registry}", e,
                                  args.registry, args.model, uri, args.mlflow_experiment)
    return info, 0
